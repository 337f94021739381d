"""Real mail servers for the tests: a private Dovecot and a private Postfix.

The proxy is only as trustworthy as the backends it is tested against, so the
suite talks to the real thing wherever one exists: Dovecot for IMAP and POP3,
Postfix for SMTP with XCLIENT.  Each peer here runs as a private instance,

* on free ports of the loopback interface only,
* from a configuration written into its own working directory, reading no
  system file except (for Postfix) one line it must add to the system main.cf,
* logging into that working directory, so a failed start can show why.

A peer is ready when its ports answer with a greeting; readiness is polled in
a bounded loop, never waited for with a fixed sleep.  ``stop()`` signals the
master process and waits until it and every process it forked are gone.

Both peers need their binaries (Debian packages dovecot-imapd, dovecot-pop3d
and postfix) and root.  When those are missing, ``start()`` raises
`PeerUnavailable`; the fixtures in conftest.py turn that into a skip on a
developer's machine and into a failure under CI (environment ``CI=true``),
where a missing peer means a broken .ci/run, not a reason to test less.

Typical use::

    with Dovecot(None, users={'joe': 'secret'}) as dovecot:
        dovecot.add_message('joe', b'Subject: hi\\r\\n\\r\\nhello\\r\\n')
        imaplib.IMAP4('127.0.0.1', dovecot.imap_port).login('joe', 'secret')
"""

import contextlib
import ctypes
import fcntl
import itertools
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

LOOPBACK = '127.0.0.1'

# Dovecot's mail processes and Postfix's pipe delivery run as "nobody"
# (65534 on Debian); mailboxes and the delivery directory belong to it.
MAIL_UID = 65534
MAIL_GID = 65534

START_TIMEOUT = 20.0      # seconds a peer may take to answer its first greeting
STOP_TIMEOUT = 10.0       # seconds for the master and its children to exit
POLL_INTERVAL = 0.02      # seconds between two readiness or exit checks
CONNECT_TIMEOUT = 1.0     # seconds for one probe connection
LOG_TAIL_LINES = 40       # lines of a peer's log quoted when it fails to start
CONFIG_BACKDATE = 5       # seconds a Postfix config file's mtime is set back

# Dovecot: enough processes and per-user connections for concurrency tests
# (Dovecot's defaults are 100 processes and 10 connections per user and IP).
DOVECOT_PROCESS_LIMIT = 1000
DOVECOT_USERIP_CONNECTIONS = 1000
DOVECOT_CLIENT_LIMIT = 10000

# Postfix: big enough for the large-message tests (default 10 MB).
POSTFIX_MESSAGE_SIZE_LIMIT = 100 * 1024 * 1024
POSTFIX_PROCESS_LIMIT = 256

# prctl(2) option: orphaned descendants are re-parented to us, not to pid 1.
PR_SET_CHILD_SUBREAPER = 36

SYSTEM_POSTFIX_DIR = pathlib.Path('/etc/postfix')
# Serialises edits of alternate_config_directories between test processes.
POSTFIX_ALTDIRS_LOCK = pathlib.Path(tempfile.gettempdir()) / 'mailproxy-postfix-altdirs.lock'


class PeerUnavailable(Exception):
    """The peer cannot run on this machine (binary missing, not root)."""


class PeerStartError(RuntimeError):
    """The peer is installed but did not come up; the message quotes its log."""


def in_ci():
    """True under CI, where an unavailable peer must fail rather than skip."""
    return os.environ.get('CI', '').lower() == 'true'


def free_port(host=LOOPBACK):
    """Return a TCP port on *host* that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_port(host, port, timeout=START_TIMEOUT, greeting=None, alive=None):
    """Poll until *host*:*port* accepts a connection, or raise TimeoutError.

    With *greeting* (bytes), the server must also send a first line starting
    with it: a listening socket alone does not prove the service behind it is
    up.  *alive* is a callable checked each round, so a peer that died is
    reported at once instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise PeerStartError(f'process for {host}:{port} exited while starting')
        try:
            _probe(host, port, greeting)
            return
        except OSError as exc:
            last_error = exc
        time.sleep(POLL_INTERVAL)
    raise TimeoutError(f'{host}:{port} not ready after {timeout}s: {last_error}')


class _Peer:
    """What both peers share: a working directory, ``with``, requirements.

    Subclasses define ``start()`` and ``stop(remove_workdir=True)``.  With
    ``workdir=None`` the peer makes its own directory (traversable by the
    unprivileged users the servers switch to) and removes it on stop.
    """

    workdir_prefix = 'mailproxy-peer-'

    def __init__(self, workdir):
        self._owns_workdir = workdir is None
        self.workdir = pathlib.Path(workdir or _make_workdir(self.workdir_prefix))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def _require(self, *binaries):
        """Paths of *binaries*; raise `PeerUnavailable` if one is missing or
        we are not root, after removing our own (still empty) workdir."""
        try:
            _require_root(type(self).__name__)
            return [_require_binary(name) for name in binaries]
        except PeerUnavailable:
            self._remove_workdir()
            raise

    def _remove_workdir(self):
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Dovecot(_Peer):
    """A private Dovecot serving IMAP and POP3 on two free loopback ports.

    Callers use ``start()``/``stop()`` (or ``with``), ``imap_port``,
    ``pop3_port`` and ``add_message()``.  Users authenticate with PLAIN or
    LOGIN over plain text; every user's mail lives in ``HOME/Maildir`` owned
    by uid/gid 65534, so a given *workdir* must be reachable by that uid
    (pytest's 0700 ``tmp_path`` is not): prefer ``workdir=None``.
    """

    workdir_prefix = 'mailproxy-dovecot-'

    def __init__(self, workdir=None, users=None, extra_config=''):
        super().__init__(workdir)
        self.users = dict(users or {})
        self.extra_config = extra_config
        self.imap_port = None
        self.pop3_port = None
        self._process = None
        self._counter = itertools.count(1)
        self._counter_lock = threading.Lock()   # add_message may run in threads

    @property
    def log_path(self):
        return self.workdir / 'dovecot.log'

    def log_text(self):
        """Everything Dovecot logged so far (its log file and its stderr)."""
        return _read_text(self.log_path) + _read_text(self.workdir / 'dovecot.stderr')

    def start(self):
        """Write the configuration, run ``dovecot -F`` and wait for greetings."""
        binary, = self._require('dovecot')
        self._check_users()
        self.imap_port, self.pop3_port = _distinct_free_ports(2)
        config = self._write_config()
        _become_subreaper()
        stderr = open(self.workdir / 'dovecot.stderr', 'ab')
        with stderr:
            self._process = subprocess.Popen(
                [binary, '-F', '-c', str(config)], stdin=subprocess.DEVNULL,
                stdout=stderr, stderr=stderr, start_new_session=True)
        try:
            for port, greeting in ((self.imap_port, b'* OK'), (self.pop3_port, b'+OK')):
                wait_port(LOOPBACK, port, START_TIMEOUT, greeting, self._alive)
        except (TimeoutError, PeerStartError) as exc:
            self.stop(remove_workdir=False)
            raise PeerStartError(f'Dovecot did not start: {exc}\n{_tail(self.log_text())}') from exc

    def stop(self, remove_workdir=True):
        """Signal the master, wait for all its processes; idempotent."""
        if self._process is not None:
            _terminate_tree(self._process.pid, self._process)
            self._process = None
        if remove_workdir:
            self._remove_workdir()

    def maildir(self, user):
        """The Maildir of *user*, created (owned by 65534) when missing."""
        home = self.workdir / 'home' / user
        maildir = home / 'Maildir'
        for path in (home, maildir, *(maildir / sub for sub in ('tmp', 'new', 'cur'))):
            if not path.is_dir():
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chown(path, MAIL_UID, MAIL_GID)
        return maildir

    def add_message(self, user, raw, flags=None):
        """Deliver *raw* (bytes, as on the wire) into *user*'s INBOX.

        Without *flags* the message lands in ``new`` (\\Recent, unseen); with
        flags (Maildir letters such as ``'S'`` for \\Seen) it goes to ``cur``.
        The file is written in ``tmp`` and renamed, as the Maildir format
        requires, and named ``TIME.MusecPpidQn.HOST,S=size,W=vsize`` so that
        Dovecot trusts the sizes it reads from the name.  Returns the path.
        """
        maildir = self.maildir(user)
        name = self._maildir_name(raw)
        temporary = maildir / 'tmp' / name
        temporary.write_bytes(raw)
        os.chown(temporary, MAIL_UID, MAIL_GID)
        if flags is None:
            final = maildir / 'new' / name
        else:
            final = maildir / 'cur' / f'{name}:2,{"".join(sorted(flags))}'
        os.rename(temporary, final)
        return final

    def _maildir_name(self, raw):
        with self._counter_lock:
            serial = next(self._counter)
        now = time.time()
        seconds, micros = int(now), int((now % 1) * 1_000_000)
        host = socket.gethostname().replace('/', r'\057').replace(':', r'\072')
        # W= is the size with every line ending in CRLF (RFC 3501 RFC822.SIZE).
        virtual = len(raw) + raw.count(b'\n') - raw.count(b'\r\n')
        return f'{seconds}.M{micros}P{os.getpid()}Q{serial}.{host},S={len(raw)},W={virtual}'

    def _alive(self):
        return self._process is not None and self._process.poll() is None

    def _check_users(self):
        for user, password in self.users.items():
            if ':' in user + password or '\n' in user + password:
                raise ValueError(f'user {user!r}: passwd-file cannot hold ":" or newlines')

    def _write_config(self):
        for sub in ('run', 'state', 'home'):
            (self.workdir / sub).mkdir(exist_ok=True)
        passwd = self.workdir / 'passwd'
        passwd.write_text(''.join(f'{u}:{{PLAIN}}{p}::::::\n' for u, p in self.users.items()))
        for user in self.users:
            self.maildir(user)
        config = self.workdir / 'dovecot.conf'
        config.write_text(DOVECOT_CONFIG.format(
            workdir=self.workdir, imap_port=self.imap_port, pop3_port=self.pop3_port,
            uid=MAIL_UID, gid=MAIL_GID, process_limit=DOVECOT_PROCESS_LIMIT,
            client_limit=DOVECOT_CLIENT_LIMIT,
            userip=DOVECOT_USERIP_CONNECTIONS, extra=self.extra_config))
        return config


DOVECOT_CONFIG = """\
# Private test instance: reads no system file.
base_dir = {workdir}/run
state_dir = {workdir}/state
instance_name = mailproxy-test-{imap_port}
log_path = {workdir}/dovecot.log
info_log_path = {workdir}/dovecot.log
listen = 127.0.0.1
protocols = imap pop3
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 1
first_valid_gid = 1
default_process_limit = {process_limit}
default_client_limit = {client_limit}
mail_location = maildir:~/Maildir
mail_fsync = never
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {workdir}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={workdir}/home/%u
}}
protocol imap {{
  mail_max_userip_connections = {userip}
}}
protocol pop3 {{
  mail_max_userip_connections = {userip}
}}
# Dovecot's anvil slows every login from an IP that failed before (2 s,
# doubling, up to 15 s): tests that log in wrongly would slow all that
# follow.  A listener with mode 0 is not created, which turns it off.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
{extra}
"""


@dataclass
class Delivery:
    """One message as Postfix handed it to the delivery pipe."""
    sender: str
    recipients: list
    data: bytes

    @property
    def body(self):
        """The bytes after the header block (Postfix prepends Received:)."""
        return self.data.partition(b'\r\n\r\n')[2]


class Postfix(_Peer):
    """A private Postfix smtpd on a free loopback port that trusts XCLIENT.

    Callers use ``start()``/``stop()`` (or ``with``), ``port``,
    ``maillog_text()``, ``delivered()``/``deliveries()`` and
    ``wait_delivered(n)``.  Clients on 127.0.0.0/8 may send XCLIENT
    (``smtpd_authorized_xclient_hosts``); the maillog then shows the
    forwarded ``client=`` address and ``sasl_username=``.

    How delivery is captured: every transport (local, virtual, relay,
    default) is a pipe(8) service ``deliver`` that runs, as nobody, a small
    shell script writing each message to ``WORKDIR/delivered/N.eml`` (plus
    ``N.env`` with the envelope sender and recipients).  All recipients of
    one message share the nexthop ``sink``, so one message gives one file.
    Postfix stores lines, not bytes, and pipe writes them ending in LF:
    ``delivered()`` turns them back into CRLF, the SMTP wire form, so a
    message sent with CRLF lines comes back byte-exact after the Received:
    header smtpd prepends (a bare LF sent by a client comes back as CRLF).
    Headers are never added or rewritten (``local_header_rewrite_clients``
    is empty).  The relay rules are Postfix's usual ``permit_mynetworks,
    reject_unauth_destination``; *extra_config* (dict) overrides main.cf.
    """

    workdir_prefix = 'mailproxy-postfix-'

    def __init__(self, workdir=None, hostname='backend.test', extra_config=None):
        super().__init__(workdir)
        self.hostname = hostname
        self.extra_config = dict(extra_config or {})
        self.config_dir = self.workdir / 'etc'
        self.delivery_dir = self.workdir / 'delivered'
        self.port = None
        self._master_pid = None

    @property
    def maillog_path(self):
        return self.workdir / 'maillog'

    def maillog_text(self):
        """Everything Postfix logged so far."""
        return _read_text(self.maillog_path)

    def start(self):
        """Write the configuration, ``postfix start`` and wait for ``220``."""
        postfix, _ = self._require('postfix', 'postconf')
        self.port = free_port()
        self._write_config()
        _register_alternate_config(self.config_dir)
        _become_subreaper()
        started = subprocess.run(
            [postfix, '-c', str(self.config_dir), 'start'], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=START_TIMEOUT)
        output = started.stdout.decode(errors='replace')
        self._master_pid = self._read_master_pid()
        try:
            if started.returncode != 0:
                raise PeerStartError(f'postfix start exited {started.returncode}')
            wait_port(LOOPBACK, self.port, START_TIMEOUT, b'220', self._alive)
        except (TimeoutError, PeerStartError) as exc:
            self.stop(remove_workdir=False)
            log = _tail(output + self.maillog_text())
            raise PeerStartError(f'Postfix did not start: {exc}\n{log}') from exc

    def stop(self, remove_workdir=True):
        """Signal the master, wait for all its processes; idempotent."""
        pid = self._master_pid or self._read_master_pid()
        if pid is not None:
            _terminate_tree(pid)
            self._master_pid = None
        if self.port is not None:
            _unregister_alternate_config(self.config_dir)
        if remove_workdir:
            self._remove_workdir()

    def deliveries(self):
        """Every message delivered so far, oldest first, as `Delivery`."""
        found = []
        for message in sorted(self.delivery_dir.glob('*.eml')):
            envelope = message.with_suffix('.env').read_text().split('\n')[:-1]
            data = message.read_bytes().replace(b'\n', b'\r\n')
            found.append(Delivery(envelope[0], envelope[1:], data))
        return found

    def delivered(self):
        """The bytes of every message delivered so far, oldest first."""
        return [delivery.data for delivery in self.deliveries()]

    def wait_delivered(self, count, timeout=10.0):
        """Poll until at least *count* messages were delivered; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.deliveries()
            if len(found) >= count:
                return found
            time.sleep(POLL_INTERVAL)
        raise TimeoutError(f'{len(self.deliveries())} of {count} messages delivered'
                           f' after {timeout}s\n{_tail(self.maillog_text())}')

    def _alive(self):
        return self._master_pid is not None and _pid_alive(self._master_pid)

    def _read_master_pid(self):
        with contextlib.suppress(OSError, ValueError):
            return int((self.workdir / 'spool' / 'pid' / 'master.pid').read_text().split()[0])
        return None

    def _write_config(self):
        self.config_dir.mkdir(exist_ok=True)
        (self.workdir / 'spool').mkdir(exist_ok=True)
        data_dir = self.workdir / 'data'
        data_dir.mkdir(exist_ok=True)
        shutil.chown(data_dir, 'postfix')       # master takes its lock there
        self.delivery_dir.mkdir(exist_ok=True)
        os.chown(self.delivery_dir, MAIL_UID, MAIL_GID)
        script = self.workdir / 'deliver'
        script.write_text(POSTFIX_DELIVER_SCRIPT.format(directory=self.delivery_dir))
        script.chmod(0o755)
        settings = dict(POSTFIX_MAIN_CF, queue_directory=self.workdir / 'spool',
                        data_directory=data_dir, myhostname=self.hostname,
                        maillog_file=self.maillog_path, maillog_file_prefixes=self.workdir)
        settings.update(self.extra_config)
        _write_settled(self.config_dir / 'main.cf',
                       ''.join(f'{name} = {value}\n' for name, value in settings.items()))
        _write_settled(self.config_dir / 'master.cf',
                       POSTFIX_MASTER_CF.format(port=self.port, script=script))


# main.cf of the private Postfix; paths and the host name are added per instance.
POSTFIX_MAIN_CF = {
    'compatibility_level': '3.6',
    'mail_owner': 'postfix',
    'setgid_group': 'postdrop',
    'inet_interfaces': LOOPBACK,
    'inet_protocols': 'ipv4',
    'mydestination': '$myhostname, localhost',
    'mynetworks': '127.0.0.0/8',
    'smtpd_authorized_xclient_hosts': '127.0.0.0/8',
    'smtpd_relay_restrictions': 'permit_mynetworks, reject_unauth_destination',
    'smtpd_banner': '$myhostname ESMTP',
    'smtpd_peername_lookup': 'no',
    'smtpd_error_sleep_time': '0',
    'in_flow_delay': '0',
    'default_process_limit': str(POSTFIX_PROCESS_LIMIT),
    'message_size_limit': str(POSTFIX_MESSAGE_SIZE_LIMIT),
    'mailbox_size_limit': '0',
    'local_header_rewrite_clients': '',
    'local_recipient_maps': '',
    'alias_maps': '',
    'alias_database': '',
    'default_transport': 'deliver:sink',
    'relay_transport': 'deliver:sink',
    'local_transport': 'deliver:sink',
    'virtual_transport': 'deliver:sink',
    'minimal_backoff_time': '1s',
    'maximal_backoff_time': '5s',
    'queue_run_delay': '1s',
    'biff': 'no',
    'readme_directory': 'no',
}

POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n -       n       -       -       smtpd
pickup     unix  n      -       n       60      1       pickup
cleanup    unix  n      -       n       -       0       cleanup
qmgr       unix  n      -       n       300     1       qmgr
rewrite    unix  -      -       n       -       -       trivial-rewrite
bounce     unix  -      -       n       -       0       bounce
defer      unix  -      -       n       -       0       bounce
trace      unix  -      -       n       -       0       bounce
verify     unix  -      -       n       -       1       verify
flush      unix  n      -       n       1000?   0       flush
proxymap   unix  -      -       n       -       -       proxymap
proxywrite unix  -      -       n       -       1       proxymap
showq      unix  n      -       n       -       -       showq
error      unix  -      -       n       -       -       error
retry      unix  -      -       n       -       -       error
discard    unix  -      -       n       -       -       discard
anvil      unix  -      -       n       -       1       anvil
scache     unix  -      -       n       -       1       scache
postlog    unix-dgram n -       n       -       1       postlogd
deliver    unix  -      n       n       -       -       pipe
  user=nobody argv={script} ${{sender}} ${{recipient}}
"""

# Run by pipe(8) as nobody: argv is the envelope, stdin the message.  The
# name sorts by arrival; .eml appears only once complete (rename is atomic).
POSTFIX_DELIVER_SCRIPT = """\
#!/bin/sh
set -e
name={directory}/$(date +%s%N)-$$
printf '%s\\n' "$@" > "$name.env"
cat > "$name.tmp"
mv "$name.tmp" "$name.eml"
"""


def _probe(host, port, greeting):
    with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as probe:
        if greeting is None:
            return
        with probe.makefile('rb') as reader:
            line = reader.readline(1024)
        if not line.startswith(greeting):
            raise ConnectionError(f'unexpected greeting {line!r}')


def _distinct_free_ports(count):
    ports = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _require_binary(name):
    path = shutil.which(name, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin')
    if path is None:
        raise PeerUnavailable(f'{name} is not installed')
    return path


def _require_root(what):
    if os.geteuid() != 0:
        raise PeerUnavailable(f'{what} test instances need root')


def _make_workdir(prefix):
    """A fresh directory that uid 65534 and the postfix user can traverse."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    os.chmod(workdir, 0o755)
    return workdir


def _write_settled(path, text):
    """Write a config file dated a few seconds in the past.

    Postfix re-reads a main.cf whose mtime is within the last second, 300 ms
    at a time, until it stops changing ("pausing to let it settle"): a fresh
    file costs ~2.4 s per postfix command.  Backdating skips that wait.
    """
    path.write_text(text)
    _backdate(path)


def _backdate(path):
    past = time.time() - CONFIG_BACKDATE
    os.utime(path, (past, past))


def _read_text(path):
    try:
        return pathlib.Path(path).read_text(errors='replace')
    except FileNotFoundError:
        return ''


def _tail(text, lines=LOG_TAIL_LINES):
    return '\n'.join(text.splitlines()[-lines:])


def _pid_alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as stat:
            return stat.read().rpartition(')')[2].split()[0] != 'Z'
    except OSError:
        return False


def _descendants(root):
    """Pids of every process below *root*, read from /proc."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            children.setdefault(_parent_of(entry), []).append(int(entry))
    found, pending = [], [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _terminate_tree(pid, process=None):
    """SIGTERM *pid*, wait for it and its descendants; SIGKILL stragglers.

    *process* is the Popen when *pid* is our child, so it gets reaped.
    """
    tree = [pid] + _descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)
    if not _wait_gone(tree, STOP_TIMEOUT):
        for straggler in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(straggler, signal.SIGKILL)
        _wait_gone(tree, STOP_TIMEOUT)
    if process is not None:
        process.wait(STOP_TIMEOUT)
    _reap([p for p in tree if process is None or p != process.pid], STOP_TIMEOUT)


def _become_subreaper():
    """Adopt the orphans of the peers' process trees, so that we reap them.

    ``postfix start`` daemonises, so its master is re-parented to pid 1, and
    stopping a master orphans whichever child outlives it (Dovecot's log
    process always does).  On machines whose pid 1 is not a real init
    (containers, microVMs) nobody reaps those and they stay as zombies.  As
    a subreaper the test process receives them instead, and `_reap`
    collects exactly those pids, never anyone else's child.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap(pids, timeout):
    """waitpid() each of *pids* that is (or becomes) our zombie child."""
    deadline = time.monotonic() + timeout
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            parent = _parent_of(pid)
            if parent is None or parent == 1:     # gone, or not ours to reap
                pending.discard(pid)
            elif parent == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        if pending:
            time.sleep(POLL_INTERVAL)


def _parent_of(pid):
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(f'/proc/{pid}/stat') as stat:
            return int(stat.read().rpartition(')')[2].split()[1])
    return None


def _wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_pid_alive(pid) for pid in pids):
            return True
        time.sleep(POLL_INTERVAL)
    return False


@contextlib.contextmanager
def _altdirs_locked():
    with open(POSTFIX_ALTDIRS_LOCK, 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _alternate_dirs():
    value = subprocess.run(['postconf', '-h', 'alternate_config_directories'],
                           check=True, capture_output=True, text=True).stdout
    return value.replace(',', ' ').split()


def _set_alternate_dirs(dirs):
    subprocess.run(['postconf', '-e', f'alternate_config_directories = {" ".join(dirs)}'],
                   check=True, capture_output=True)
    _backdate(SYSTEM_POSTFIX_DIR / 'main.cf')   # postfix -c reads it too


def _register_alternate_config(config_dir):
    """Let ``postfix -c config_dir`` run: the system main.cf must list it."""
    with _altdirs_locked():
        dirs = _alternate_dirs()
        if str(config_dir) not in dirs:
            _set_alternate_dirs(dirs + [str(config_dir)])


def _unregister_alternate_config(config_dir):
    """Remove only our entry; other instances' entries stay."""
    with _altdirs_locked():
        dirs = _alternate_dirs()
        if str(config_dir) in dirs:
            _set_alternate_dirs([d for d in dirs if d != str(config_dir)])
