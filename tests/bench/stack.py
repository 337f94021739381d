"""The benchmark's peers on loopback: backends, auth service and the proxies.

Everything runs privately from one work directory, on free 127.0.0.1 ports:

* Dovecot (IMAP, POP3, and IMAPS/POP3S for the direct TLS figures), via
  tests/peers.py, with its limits raised so that it holds 10,000 idle IMAP
  sessions: imap-login in "high-performance" mode (one process serves
  many clients) and imap processes that serve up to 2,000 clients each;
* Postfix's smtp-sink as the SMTP backend (accepts and discards; announces
  AUTH and XCLIENT);
* the auth service: a separate nginx whose `http {}` answers every request
  with static Auth-* headers (the same one for both proxies, so the
  comparison leaves the auth service out), or, without nginx, a tiny static
  HTTP/1.1 keep-alive service in a child process of this script;
* mailproxy (`python mailproxy.py -c CONF`) and nginx's mail module, with
  the very same `mail {}` block.

Each piece has `start()`/`stop()`; `stop()` ends only the processes it
started, by pid, and waits for them.
"""

import contextlib
import http.server
import multiprocessing
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))            # tests/: peers.py
sys.path.insert(0, str(REPO))                   # this checkout's mailproxy
import peers  # noqa: E402
from mailproxy.reference.demo import throwaway_certificate  # noqa: E402

LOOPBACK = "127.0.0.1"
USER, PASSWORD = "bench", "secret"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CHILD_GRACE = 5.0           # seconds a master's workers get to follow it out
NGINX = "/usr/sbin/nginx"
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"
SMTP_SINK = "/usr/sbin/smtp-sink"
PROTOCOLS = ("imap", "pop3", "smtp")
GREETINGS = {"imap": b"* OK", "pop3": b"+OK", "smtp": b"220"}

# Dovecot, tuned to hold 10,000 authenticated IMAP sessions: without this
# every session is one imap process (the default client_limit = 1 and
# service_count = 1), and 10,000 processes do not fit.  Logging of each
# login is off (it is the same cost for every target, but it is noise).
DOVECOT_EXTRA = """
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
info_log_path = /dev/null
service imap-login {{
  service_count = 0
  client_limit = {clients}
  process_min_avail = 2
  vsz_limit = 1G
  inet_listener imaps {{
    port = {imaps}
  }}
}}
service pop3-login {{
  service_count = 0
  client_limit = 2000
  process_min_avail = 2
  inet_listener pop3s {{
    port = {pop3s}
  }}
}}
service imap {{
  service_count = 0
  client_limit = 2000
  process_limit = 100
}}
service pop3 {{
  service_count = 0
  client_limit = 2000
  process_limit = 100
}}
protocol imap {{
  mail_max_userip_connections = {userip}
}}
protocol pop3 {{
  mail_max_userip_connections = {userip}
}}
service auth {{
  client_limit = {userip}
}}
service anvil {{
  client_limit = {userip}
}}
service stats {{
  client_limit = {userip}
}}
"""


class StartError(RuntimeError):
    pass


def free_ports(count):
    ports = set()
    while len(ports) < count:
        ports.add(peers.free_port())
    return sorted(ports)


def wait_greeting(port, greeting, alive=None, timeout=START_TIMEOUT, tls=False):
    """Poll until `port` greets (TLS ports: until they accept)."""
    peers.wait_port(LOOPBACK, port, timeout, None if tls else greeting, alive)


def make_certificate(directory):
    """`mailproxy demo`'s throwaway self-signed ECDSA P-256 certificate (for
    127.0.0.1 and localhost, a week long); returns (cert path, key path)."""
    cert_path, key_path = throwaway_certificate(str(directory))
    # Dovecot reads the key as root, nginx's master as root: 0644 is fine
    # for a throwaway key in a private directory.
    os.chmod(key_path, 0o644)
    return cert_path, key_path


def message(size, subject):
    """A message of exactly `size` bytes, CRLF lines, none starting with a
    dot (so POP3 adds no dot-stuffing and sizes stay exact)."""
    head = (f"From: bench@bench.test\r\nTo: bench@bench.test\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject}@bench.test>\r\n\r\n").encode()
    line = b"X" * 76 + b"\r\n"
    body_size = size - len(head)
    body = line * (body_size // len(line))
    rest = body_size - len(body)
    if rest:
        body += b"Y" * max(rest - 2, 0) + b"\r\n"[:rest]
    data = head + body
    assert len(data) == size, (len(data), size)
    return data


def smtp_body(size):
    """DATA for SMTP: a header, lines of text, no leading dots; `size` bytes
    before the terminating dot line."""
    return message(size, "smtp-bulk")


# --------------------------------------------------------------- backends

class Backends:
    """Dovecot (with the bench user's messages) and smtp-sink."""

    def __init__(self, workdir, cert, key, sizes, idle_max):
        self.workdir = workdir
        self.cert, self.key = cert, key
        self.sizes = sizes
        self.imaps_port, self.pop3s_port = free_ports(2)
        extra = DOVECOT_EXTRA.format(cert=cert, key=key, imaps=self.imaps_port,
                                     pop3s=self.pop3s_port,
                                     clients=max(idle_max + 1000, 2000),
                                     userip=max(2 * idle_max, 20000))
        self.dovecot = peers.Dovecot(None, users={USER: PASSWORD}, extra_config=extra)
        self.smtp_port = None
        self.sink = None
        self.sink_log = None

    @property
    def dovecot_pid(self):
        process = self.dovecot._process
        return process.pid if process else None

    def start(self):
        try:
            self.dovecot.start()
        except peers.PeerUnavailable as exc:
            raise StartError(f"Dovecot unavailable: {exc}") from None
        except peers.PeerStartError as exc:
            raise StartError(str(exc)) from None
        # The messages, in INBOX order: 1 KB, 1 MB, the bulk size.
        for size in self.sizes:
            self.dovecot.add_message(USER, message(size, f"m{size}"), flags="S")
        wait_greeting(self.imaps_port, b"", tls=True)
        wait_greeting(self.pop3s_port, b"", tls=True)
        self.start_sink()

    def start_sink(self):
        if not os.path.exists(SMTP_SINK):
            raise StartError(f"{SMTP_SINK} missing (Debian package postfix)")
        self.smtp_port, = free_ports(1)
        self.sink_log = open(self.workdir / "smtp-sink.log", "ab")
        # -u: it refuses to run as root otherwise; -m: simultaneous sessions
        # (default 256); 1024: the listen backlog.
        self.sink = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-m", "4096", f"{LOOPBACK}:{self.smtp_port}", "1024"],
            stdin=subprocess.DEVNULL, stdout=self.sink_log, stderr=self.sink_log,
            start_new_session=True)
        wait_greeting(self.smtp_port, b"220", lambda: self.sink.poll() is None)

    def ports(self):
        """The direct target: protocol -> port, and TLS ports."""
        return {"imap": self.dovecot.imap_port, "pop3": self.dovecot.pop3_port,
                "smtp": self.smtp_port}, {"imap": self.imaps_port, "pop3": self.pop3s_port}

    def stop(self):
        if self.sink is not None:
            stop_process(self.sink)
            self.sink = None
        if self.sink_log:
            self.sink_log.close()
        self.dovecot.stop()


STRAGGLERS = []             # (name, pids) that needed SIGKILL: reported by the bench


def stop_process(process, sig=signal.SIGTERM, name=None):
    """Signal one process we started, wait for it and for every process
    below it (a master's workers); SIGKILL, by pid, whatever is left after
    STOP_TIMEOUT, and remember it in STRAGGLERS."""
    import procstat
    pids = procstat.tree(process.pid) if process.poll() is None else []
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    left = [pid for pid in pids if pid != process.pid and peers._pid_alive(pid)]
    deadline = time.monotonic() + CHILD_GRACE
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [pid for pid in left if peers._pid_alive(pid)]
    if process.poll() is None:
        left.append(process.pid)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        STRAGGLERS.append((name or str(process.args[0]), left))
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_TIMEOUT)
    peers._reap([pid for pid in left if pid != process.pid], STOP_TIMEOUT)


# ------------------------------------------------------------ auth service

AUTH_NGINX_CONF = """\
# The static auth service: every login is OK, the backend per protocol.
worker_processes 1;
error_log {work}/auth-nginx.err error;
pid {work}/auth-nginx.pid;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {work}/auth-tmp;
    proxy_temp_path {work}/auth-tmp;
    fastcgi_temp_path {work}/auth-tmp;
    uwsgi_temp_path {work}/auth-tmp;
    scgi_temp_path {work}/auth-tmp;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen {host}:{port} backlog=4096;
{locations}
    }}
}}
"""

AUTH_LOCATION = """\
        location = /{protocol} {{
            add_header Auth-Status OK;
            add_header Auth-Server {host};
            add_header Auth-Port {backend};
            return 204;
        }}
"""


def nginx_available():
    return os.path.exists(NGINX) and os.path.exists(NGINX_MAIL_MODULE)


class NginxAuth:
    """nginx's http{} as the static auth service (its own instance, so its
    CPU is never counted as a proxy's)."""

    kind = "nginx http{} with static Auth-* headers (separate nginx instance)"

    def __init__(self, workdir, backend_ports):
        self.workdir = workdir
        self.backend_ports = backend_ports
        self.port, = free_ports(1)
        self.process = None

    def start(self):
        (self.workdir / "auth-tmp").mkdir(exist_ok=True)
        locations = "".join(AUTH_LOCATION.format(protocol=p, host=LOOPBACK, backend=port)
                            for p, port in self.backend_ports.items())
        conf = self.workdir / "auth-nginx.conf"
        conf.write_text(AUTH_NGINX_CONF.format(work=self.workdir, host=LOOPBACK,
                                               port=self.port, locations=locations))
        self.process = start_nginx(conf, self.workdir, "auth-nginx")
        peers.wait_port(LOOPBACK, self.port, START_TIMEOUT, None,
                        lambda: self.process.poll() is None)

    def stop(self):
        if self.process is not None:
            stop_process(self.process, signal.SIGTERM)
            self.process = None


def _static_auth_server(port, backend_ports, ready):
    """The fallback auth service (child process): HTTP/1.1 keep-alive."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # not the bench's handler

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            backend = backend_ports.get(self.path.lstrip("/"))
            self.send_response(204)
            if backend is None:
                self.send_header("Auth-Status", "Unknown protocol")
            else:
                self.send_header("Auth-Status", "OK")
                self.send_header("Auth-Server", LOOPBACK)
                self.send_header("Auth-Port", str(backend))
            self.end_headers()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 1024
        daemon_threads = True

    server = Server((LOOPBACK, port), Handler)
    ready.set()
    server.serve_forever()


class StaticAuth:
    """Without nginx: a tiny static auth service in a child process."""

    kind = "tiny static http.server in a child process (nginx not installed)"

    def __init__(self, workdir, backend_ports):
        self.backend_ports = backend_ports
        self.port, = free_ports(1)
        self.process = None

    def start(self):
        ready = multiprocessing.Event()
        self.process = multiprocessing.Process(
            target=_static_auth_server, args=(self.port, self.backend_ports, ready),
            daemon=True)
        self.process.start()
        if not ready.wait(START_TIMEOUT):
            raise StartError("static auth service did not start")

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.join(STOP_TIMEOUT)
            self.process = None


def start_nginx(conf, workdir, name):
    log = open(workdir / f"{name}.stderr", "ab")
    with log:
        process = subprocess.Popen([NGINX, "-p", str(workdir), "-c", str(conf),
                                    "-e", str(workdir / f"{name}.err"), "-g", "daemon off;"],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True)
    return process


# ----------------------------------------------------------------- proxies

MAIL_BLOCK = """\
mail {{
    server_name bench.test;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    # Everything else is left at the defaults both proxies share
    # (proxy_buffer 4k, timeout 60s, imap/pop3/smtp_auth plain ...).
{extra}{servers}}}
"""

SERVER_BLOCK = """\
    server {{
        listen {host}:{port}{ssl};
        protocol {protocol};
        auth_http {host}:{auth}/{protocol};{extra}
    }}
"""

MAILPROXY_CONF = """\
# mailproxy under benchmark (generated by tests/bench/bench.py)
worker_processes {workers};
error_log {work}/mailproxy.err error;
events {{
    worker_connections 30000;
}}
{mail}"""

NGINX_MAIL_CONF = """\
# nginx's mail module under benchmark (generated by tests/bench/bench.py)
load_module {module};
worker_processes {workers};
worker_rlimit_nofile {nofile};
error_log {work}/nginx-mail.err error;
pid {work}/nginx-mail.pid;
events {{
    worker_connections 30000;
}}
{mail}"""


def login_peers(workdir, started):
    """What a login round needs besides a proxy, started: Dovecot and
    smtp-sink, and the auth service (nginx's http{}, else the static
    one).  Each is appended to `started`, for the caller to stop in
    reverse order.  Returns (cert, key, backend ports, auth)."""
    cert, key = make_certificate(workdir)
    backends = Backends(workdir, cert, key, (1000,), 1000)
    started.append(backends)
    backends.start()
    ports, _ = backends.ports()
    auth = (NginxAuth if nginx_available() else StaticAuth)(workdir, ports)
    started.append(auth)
    auth.start()
    return cert, key, ports, auth


def mail_block(cert, key, auth_port, ports, tls_ports, directives=()):
    """The `mail {}` both proxies run; `directives` ("proxy_buffer 64k", ...)
    are added at the mail level, for trying a setting on both."""
    servers = []
    for protocol in PROTOCOLS:
        extra = "\n        smtp_auth plain login;" if protocol == "smtp" else ""
        for port, ssl in ((ports[protocol], ""), (tls_ports[protocol], " ssl")):
            servers.append(SERVER_BLOCK.format(host=LOOPBACK, port=port, ssl=ssl,
                                               protocol=protocol, auth=auth_port, extra=extra))
    extra = "".join(f"    {d.strip().rstrip(';')};\n" for d in directives)
    return MAIL_BLOCK.format(cert=cert, key=key, extra=extra, servers="".join(servers))


class Proxy:
    """One proxy under test: its ports (plain and TLS per protocol), its
    root pid (for /proc figures) and how to start and stop it."""

    name = ""

    def __init__(self, workdir, mail):
        self.workdir = workdir
        self.mail = mail
        self.process = None
        self.note = ""

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def wait_ready(self):
        alive = lambda: self.process.poll() is None     # noqa: E731
        for protocol in PROTOCOLS:
            wait_greeting(self.ports[protocol], GREETINGS[protocol], alive)
            wait_greeting(self.tls_ports[protocol], b"", alive, tls=True)

    def stop(self):
        if self.process is not None:
            stop_process(self.process, signal.SIGTERM, self.name)
            self.process = None


class Mailproxy(Proxy):
    name = "mailproxy"

    def __init__(self, workdir, mail, ports, tls_ports, workers, checkout=REPO):
        super().__init__(workdir, mail)
        self.ports, self.tls_ports = ports, tls_ports
        self.workers = workers
        self.checkout = pathlib.Path(checkout)
        self.log = None

    def conf_path(self, workers):
        conf = self.workdir / "mailproxy.conf"
        conf.write_text(MAILPROXY_CONF.format(workers=workers, work=self.workdir,
                                              mail=self.mail))
        return conf

    def check(self, conf):
        return subprocess.run([sys.executable, "mailproxy.py", "-t", "-c", str(conf)],
                              cwd=self.checkout, capture_output=True, text=True, timeout=60)

    def start(self):
        conf = self.conf_path(self.workers)
        checked = self.check(conf)
        if checked.returncode != 0 and self.workers > 1:
            text = (checked.stderr + checked.stdout).strip().splitlines()
            self.note = (f"worker_processes {self.workers} refused by this mailproxy "
                         f"({text[-1] if text else 'no message'}); ran with 1")
            self.workers = 1
            conf = self.conf_path(1)
            checked = self.check(conf)
        if checked.returncode != 0:
            raise StartError(f"mailproxy -t failed:\n{checked.stderr}{checked.stdout}")
        self.log = open(self.workdir / "mailproxy.stderr", "ab")
        self.process = subprocess.Popen([sys.executable, "mailproxy.py", "-c", str(conf)],
                                        cwd=self.checkout, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=self.log, start_new_session=True)
        try:
            self.wait_ready()
        except (TimeoutError, peers.PeerStartError) as exc:
            raise StartError(f"mailproxy did not start: {exc}\n"
                             f"{_tail(self.workdir / 'mailproxy.stderr')}"
                             f"{_tail(self.workdir / 'mailproxy.err')}") from None

    def stop(self):
        super().stop()
        if self.log:
            self.log.close()
            self.log = None


class NginxMail(Proxy):
    name = "nginx"

    def __init__(self, workdir, mail, ports, tls_ports, workers):
        super().__init__(workdir, mail)
        self.ports, self.tls_ports = ports, tls_ports
        self.workers = workers

    def start(self):
        import resource
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        conf = self.workdir / "nginx-mail.conf"
        conf.write_text(NGINX_MAIL_CONF.format(module=NGINX_MAIL_MODULE, workers=self.workers,
                                               nofile=nofile, work=self.workdir,
                                               mail=self.mail))
        self.process = start_nginx(conf, self.workdir, "nginx-mail")
        try:
            self.wait_ready()
        except (TimeoutError, peers.PeerStartError) as exc:
            raise StartError(f"nginx did not start: {exc}\n"
                             f"{_tail(self.workdir / 'nginx-mail.stderr')}"
                             f"{_tail(self.workdir / 'nginx-mail.err')}") from None

    def version(self):
        out = subprocess.run([NGINX, "-v"], capture_output=True, text=True)
        return (out.stderr or out.stdout).strip().replace("nginx version: ", "")


def _tail(path, lines=20):
    try:
        text = pathlib.Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) + "\n"


def make_workdir():
    import tempfile
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="mailproxy-bench-"))
    os.chmod(workdir, 0o755)
    return workdir


def remove_workdir(workdir):
    shutil.rmtree(workdir, ignore_errors=True)


def wait_until(predicate, timeout, interval=0.1):
    """Poll `predicate` until true or `timeout` seconds; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)

