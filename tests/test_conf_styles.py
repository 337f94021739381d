"""Whole nginx configurations, written as people deploy them, run on mailproxy.

Two styles, each a folder of fixtures under tests/configs/ beside its
example in examples/:

- admin-guide: the nginx admin guide's mail proxy (TLS settings at `mail {}`
  level, an auth service named `localhost`, one server per protocol);
- mailu: a Mailu-style front end (one nginx.conf with `user`,
  `worker_processes auto`, `pcre_jit`, `load_module`, an `http {}` block
  beside `mail {}`, the TLS settings in an included file, nine listeners).

Each is copied to a fresh folder with certificates from certs.py, its
listen ports and its auth service port moved to free ones, and nothing
else changed.  Then `python mailproxy.py -t` from `/` and from the file's
folder gives the same answer with nginx's [warn] lines, and real clients
(imaplib, poplib, smtplib, with STARTTLS or implicit TLS where the server
has them) log in through every listener, against the reference auth
service and the reference backends, with the proxy in this process
(harness.py) and as a process started from `/`.

The examples themselves, verbatim, pass `-t` too.
"""

import imaplib
import poplib
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from certs import client_context
from harness import RunningProxy, free_port
from mailproxy.reference.authservice import AuthService, plain_secret
from mailproxy.reference.demo_backends import start_backends
from mailproxy.reference.mailstore import Mailstore

pytest_plugins = ("certs",)     # certs: a small PKI, made once per run

ROOT = Path(__file__).resolve().parent.parent
MAILPROXY = ROOT / "mailproxy.py"
FIXTURES = Path(__file__).resolve().parent / "configs"
EXAMPLES = ROOT / "examples"
TIMEOUT = 10                    # seconds for any one client step or process start
USER, PASSWORD = "alice", "wonderland"
LISTEN = re.compile(r"^(\s*listen\s+)(\d+)\b", re.MULTILINE)
AUTH_PORT = re.compile(r"^(\s*auth_http\s+(?:http://)?[^:/\s]+:)(\d+)", re.MULTILINE)


class Style:
    """One configuration style: its folders, main file, certificate names,
    and how a client logs in on each of its (original) listen ports."""

    def __init__(self, name, example, main, cert_names, logins, warnings=()):
        self.name, self.fixture, self.example = name, FIXTURES / name, EXAMPLES / example
        self.main, self.cert_names, self.logins = main, cert_names, logins
        self.warnings = warnings    # (directive or block, its [warn] text)

    def __repr__(self):
        return self.name


# ---------------------------------------------------------------- clients

def imap(port, tls, context):
    if tls == "ssl":
        client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=TIMEOUT)
    else:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT)
        if tls == "starttls":
            client.starttls(ssl_context=context)
    client.login(USER, PASSWORD)
    status, count = client.select("INBOX")
    client.logout()
    assert status == "OK" and int(count[0]) >= 1


def pop3(port, tls, context):
    if tls == "ssl":
        client = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=TIMEOUT)
    else:
        client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        if tls == "starttls":
            client.stls(context=context)
    client.user(USER)
    client.pass_(PASSWORD)
    assert client.stat()[0] >= 1
    client.quit()


def smtp(port, tls, context, login=True):
    """Submit one message to alice (with AUTH unless `login` is False, as
    another mail server delivers); its Subject names the port."""
    make = smtplib.SMTP_SSL if tls == "ssl" else smtplib.SMTP
    options = {"context": context} if tls == "ssl" else {}
    with make("127.0.0.1", port, timeout=TIMEOUT, **options) as client:
        client.ehlo("client.example.net")
        if tls == "starttls":
            client.starttls(context=context)
            client.ehlo("client.example.net")
        if login:
            client.login(USER, PASSWORD)
        client.sendmail("bob@example.net", [f"{USER}@example.org"],
                        f"Subject: through {port}\r\n\r\nhello\r\n")
    return f"Subject: through {port}".encode()


def mx(port, tls, context):
    return smtp(port, tls, context, login=False)


STYLES = [
    Style("admin-guide", "nginx-admin-guide", "mail.conf", ("server.crt", "server.key"),
          {25: (smtp, "starttls"), 110: (pop3, "starttls"), 143: (imap, "starttls")}),
    Style("mailu", "mailu", "nginx.conf", ("cert.pem", "key.pem"),
          {10025: (smtp, None), 10143: (imap, None), 25: (mx, "starttls"),
           465: (smtp, "ssl"), 587: (smtp, "starttls"), 110: (pop3, "starttls"),
           995: (pop3, "ssl"), 143: (imap, "starttls"), 993: (imap, "ssl")},
          warnings=(("pcre_jit", 'the "pcre_jit" directive is ignored: mailproxy matches '
                                 "no regular expressions"),
                    ("load_module", 'the "load_module" directive is ignored: the mail '
                                    "modules are built into mailproxy"),
                    ("http {", 'the "http" block is skipped: mailproxy serves only '
                               '"mail {}"'))),
]


# ---------------------------------------------------------------- placing

class Placed:
    """A style copied into `folder` with free ports: `ports` maps each
    listen port of the file to the free one, `conf` is the main file."""

    def __init__(self, style, folder, ports):
        self.style, self.folder, self.ports = style, folder, ports
        self.conf = folder / style.main

    def line_of(self, text):
        lines = self.conf.read_text().splitlines()
        return next(n for n, line in enumerate(lines, 1) if line.strip().startswith(text))


def place(style, source, folder, auth_port, certs):
    """Copy `source` (a style's fixture or example folder) into `folder`:
    free listen ports, the auth service's port, certificates, and the
    guide's /etc/ssl/certs/ made the folder."""
    ports = {}

    def listen(match):
        return f"{match[1]}127.0.0.1:{ports.setdefault(int(match[2]), free_port())}"
    folder.mkdir(exist_ok=True)
    for path in sorted(source.iterdir()):
        text = path.read_text()
        if path.suffix == ".conf":       # the listens of mail {}, not those of http {}
            head, mail, tail = text.partition("\nmail {")
            text = head + mail + LISTEN.sub(listen, tail)
            text = AUTH_PORT.sub(lambda m: f"{m[1]}{auth_port}", text)
            text = text.replace("/etc/ssl/certs/", f"{folder}/")
        (folder / path.name).write_text(text)
    cert, key = style.cert_names
    (folder / cert).write_bytes(Path(certs.rsa.cert).read_bytes())
    (folder / key).write_bytes(Path(certs.rsa.key).read_bytes())
    (folder / "dhparam.pem").write_bytes((FIXTURES / "mailu" / "dhparam.pem").read_bytes())
    return Placed(style, folder, ports)


def minus_t(conf, cwd="/"):
    return subprocess.run([sys.executable, str(MAILPROXY), "-t", "-c", str(conf)], cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT * 3)


# ----------------------------------------------------------- the services

class Services:
    """The reference backends (in memory) and the reference auth service,
    which sends alice to them; alice has one message."""

    def __init__(self, folder):
        self.store = Mailstore({USER: PASSWORD})
        self.store.seed(USER, 1)
        self.backends = start_backends(self.store)
        users = folder / "users.conf"
        users.write_text(f"{USER} {plain_secret(PASSWORD)} "
                         f"imap=127.0.0.1:{self.backends.imap_port} "
                         f"pop3=127.0.0.1:{self.backends.pop3_port} "
                         f"smtp=127.0.0.1:{self.backends.smtp_port}\n")
        self.auth = AuthService(("127.0.0.1", 0), str(users))
        self.thread = threading.Thread(target=self.auth.serve_forever, args=(0.01,),
                                       name="auth service")     # close() waits one poll
        self.thread.start()

    @property
    def auth_port(self):
        return self.auth.server_address[1]

    def close(self):
        self.auth.shutdown()
        self.auth.server_close()
        self.thread.join()
        self.backends.close()


@pytest.fixture
def services(tmp_path):
    running = Services(tmp_path)
    yield running
    running.close()


def log_in_everywhere(placed, services, certs):
    """One login (and for SMTP one message to alice) through each listener."""
    context = client_context(certs)
    for port, (login, tls) in placed.style.logins.items():
        subject = login(placed.ports[port], tls, context)
        if subject:
            assert any(subject in message.data for message in services.store.messages(USER))
    assert set(placed.ports) == set(placed.style.logins), "a listener without a login"


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("style", STYLES, ids=repr)
def test_minus_t_gives_the_same_answer_from_any_directory(style, tmp_path, certs):
    placed = place(style, style.fixture, tmp_path / "conf", free_port(), certs)
    from_root, from_folder = minus_t(placed.conf, "/"), minus_t(placed.conf, placed.folder)
    assert from_root.returncode == 0, from_root.stderr
    assert from_root.stderr == from_folder.stderr
    lines = from_root.stderr.splitlines()
    for start, text in style.warnings:
        warning = f"mailproxy: [warn] {text} in {placed.conf}:{placed.line_of(start)}"
        assert lines.count(warning) == 1, from_root.stderr
    assert lines[-2:] == [f"mailproxy: the configuration file {placed.conf} syntax is ok",
                          f"mailproxy: configuration file {placed.conf} test is successful"]


@pytest.mark.parametrize("style", STYLES, ids=repr)
def test_a_login_through_every_listener_in_process(style, tmp_path, services, certs):
    placed = place(style, style.fixture, tmp_path / "conf", services.auth_port, certs)
    proxy = RunningProxy.from_file(placed.conf, log_path=placed.folder / "mail.log")
    try:
        log_in_everywhere(placed, services, certs)
    finally:
        proxy.stop()
    if style.name == "mailu":       # error_log mail.log in mail {}: the prefix is the folder
        assert 'login "alice"' in proxy.log()


@pytest.mark.parametrize("style", STYLES, ids=repr)
def test_a_login_through_every_listener_of_the_process_started_from_root(
        style, tmp_path, services, certs):
    placed = place(style, style.fixture, tmp_path / "conf", services.auth_port, certs)
    stderr = placed.folder / "stderr.txt"
    with open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, str(MAILPROXY), "-c", str(placed.conf)],
                                   cwd="/", stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_listening(placed.ports.values(), process, stderr)
        log_in_everywhere(placed, services, certs)
        if style.name == "mailu":       # `pid nginx.pid;`: the prefix is the folder
            assert (placed.folder / "nginx.pid").read_text() == f"{process.pid}\n"
        process.send_signal(signal.SIGQUIT)
        assert process.wait(timeout=TIMEOUT * 2) == 0, stderr.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT)
    for start, text in style.warnings:      # printed once at start, as -t prints them
        warning = f"mailproxy: [warn] {text} in {placed.conf}:{placed.line_of(start)}"
        assert stderr.read_text().splitlines().count(warning) == 1, stderr.read_text()


@pytest.mark.parametrize("style", STYLES, ids=repr)
def test_the_examples_verbatim_pass_minus_t(style, tmp_path, certs):
    placed = place(style, style.example, tmp_path / "conf", free_port(), certs)
    result = minus_t(placed.conf)
    assert result.returncode == 0, result.stderr


def _wait_listening(ports, process, stderr):
    end = time.monotonic() + TIMEOUT * 2
    waiting = set(ports)
    while waiting and time.monotonic() < end:
        assert process.poll() is None, stderr.read_text()
        for port in list(waiting):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                waiting.discard(port)
            except OSError:
                time.sleep(0.05)
    assert not waiting, stderr.read_text()
