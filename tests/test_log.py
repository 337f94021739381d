"""log.py through a running proxy: nginx's line format, levels, per-server
logs, and the rule that no secret ever reaches a log (STYLE habit 9).

A real proxy (tests/harness.py) talks to two small scripted peers written
here: `ScriptedAuth`, an http.server that answers every auth request with
the headers a test chose, and `RefusingBackend`, an IMAP backend that takes
the proxy's LOGIN literals and then says NO.
"""

import base64
import hashlib
import hmac
import http.server
import os
import re
import socket
import threading
import time

import pytest

from harness import RunningProxy
from mailproxy import NGINX_COMPAT, __version__
from mailproxy.auth_http import escape
from mailproxy.imap import CONTINUE_LITERAL, GREETING, INTERNAL_ERROR
from mailproxy.sasl import PASSWORD_CHALLENGE, USERNAME_CHALLENGE

REFUSAL = "Invalid login or password"
POLL = 0.05
LIFETIME = 10.0             # no fake backend connection lives longer than this
STAMP = r"(\d{4})/(\d\d)/(\d\d) (\d\d):(\d\d):(\d\d)"
LOGIN = b"joe"
PASSWORD = b"Sup3r-s3cret pw"               # a space: its escaped form differs too
BACKEND_PASSWORD = b"backend-0nly-pw"       # what the auth service hands out for CRAM-MD5
UNUSED_AUTH = "auth_http 127.0.0.1:9/auth;"  # for tests that never log in


# ------------------------------------------------------------------ peers

class ScriptedAuth:
    """An auth service: `answer(headers)` -> the reply headers (a list of
    (name, value)); every request's headers are kept in `requests`."""

    def __init__(self, answer):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with owner.lock:
                    owner.requests.append(dict(self.headers.items()))
                self.send_response(200)
                for name, value in answer(self.headers):
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.requests = []
        self.lock = threading.Lock()        # requests: one handler thread per request
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = False
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, args=(POLL,),
                                       name="scripted auth")
        self.thread.start()

    @property
    def url(self):
        return f"127.0.0.1:{self.port}/auth"

    def close(self):
        self.http.shutdown()
        self.http.server_close()
        self.thread.join(timeout=5)


class RefusingBackend:
    """An IMAP backend: greets, continues every literal, refuses the login.
    `passwords` collects the password line of each login it saw."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(POLL)
        self.port = self.listener.getsockname()[1]
        self.passwords = []
        self.lock = threading.Lock()        # passwords: one thread per connection
        self.stopping = threading.Event()
        self.threads = []
        self.acceptor = threading.Thread(target=self._accept, name="refusing backend")
        self.acceptor.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="backend conn")
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn):
        conn.settimeout(LIFETIME)
        with conn, conn.makefile("rb") as reader:
            try:
                conn.sendall(b"* OK backend ready\r\n")
                tag = reader.readline().split(b" ", 1)[0]
                conn.sendall(b"+ OK\r\n")               # after "TAG LOGIN {n}"
                reader.readline()                        # "login {m}"
                conn.sendall(b"+ OK\r\n")
                password = reader.readline().rstrip(b"\r\n")
                with self.lock:
                    self.passwords.append(password)
                conn.sendall(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
            except OSError:
                pass

    def close(self):
        self.stopping.set()
        self.listener.close()
        self.acceptor.join(timeout=5)
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def peers():
    """Factory for ScriptedAuth/RefusingBackend/RunningProxy; all closed after."""
    started = []

    class Peers:
        def auth(self, answer):
            started.append(ScriptedAuth(answer))
            return started[-1]

        def backend(self):
            started.append(RefusingBackend())
            return started[-1]

        def proxy(self, directory, **kwargs):
            directory.mkdir(exist_ok=True)
            proxy = RunningProxy(directory, **kwargs)
            started.append(proxy)
            return proxy

    yield Peers()
    for peer in reversed(started):
        if isinstance(peer, RunningProxy):
            if peer.thread.is_alive():
                peer.stop()
        else:
            peer.close()


def refuse(headers):
    return [("Auth-Status", REFUSAL)]


def b64(data):
    return base64.b64encode(data)


def connect(proxy, index=0):
    client = proxy.client(index)
    assert client.line() == GREETING
    return client


# ------------------------------------------------------------------ format

def test_line_format(tmp_path, peers):
    auth = peers.auth(refuse)
    proxy = peers.proxy(tmp_path, mail=f"auth_http {auth.url};", level="info")
    with connect(proxy) as client:
        client_port = client.sock.getsockname()[1]
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == f"a NO {REFUSAL}\r\n".encode()
        assert client.closed()
    proxy.stop()
    lines = proxy.log().splitlines()
    server = f"127.0.0.1:{proxy.port}"
    context = f"client: 127.0.0.1, server: {server}"

    connected = [re.fullmatch(
        STAMP + r" \[info\] (\d+)#(\d+): \*(\d+) client 127\.0\.0\.1:" + str(client_port) +
        " connected to " + re.escape(server) + " while in auth state, " + re.escape(context),
        line) for line in lines]
    connected = [match for match in connected if match]
    assert len(connected) == 1, lines
    failed = [re.fullmatch(
        STAMP + r" \[info\] (\d+)#(\d+): \*(\d+) client login failed: " +
        re.escape(f'"{REFUSAL}" while in http auth state, {context}, login: "joe"'), line)
        for line in lines]
    failed = [match for match in failed if match]
    assert len(failed) == 1, lines

    for match in connected + failed:
        stamp = time.mktime(tuple(int(part) for part in match.groups()[:6]) + (0, 0, -1))
        assert abs(time.time() - stamp) < 120
        assert int(match.group(7)) == os.getpid()
        assert int(match.group(8)) != threading.main_thread().native_id
    # one session: one connection number, one thread
    assert connected[0].group(9) == failed[0].group(9)
    assert connected[0].group(8) == failed[0].group(8)


def test_lines_without_a_connection_have_no_number(tmp_path, peers):
    proxy = peers.proxy(tmp_path, mail=UNUSED_AUTH, level="notice")
    proxy.stop()
    lines = proxy.log().splitlines()
    notice = STAMP + r" \[notice\] (\d+)#(\d+): "
    assert re.fullmatch(notice + re.escape(f"mailproxy/{__version__} ({NGINX_COMPAT})"),
                        lines[0])
    assert all(re.match(notice + r"[^*]", line) for line in lines), lines


def test_connection_numbers_differ_between_sessions(tmp_path, peers):
    proxy = peers.proxy(tmp_path, mail=UNUSED_AUTH, level="info")
    for _ in range(2):
        with connect(proxy) as client:
            client.send(b"a LOGOUT\r\n")
            assert client.lines(2) == [b"* BYE\r\n", b"a OK completed\r\n"]
    proxy.stop()
    numbers = re.findall(r": \*(\d+) client 127\.0\.0\.1:\d+ connected", proxy.log())
    assert len(numbers) == 2 and numbers[0] != numbers[1]


# ------------------------------------------------------------------ levels

def test_error_level_log_has_no_info_lines(tmp_path, peers):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]         # bound, not listening: refused
        proxy = peers.proxy(tmp_path, mail=f"auth_http 127.0.0.1:{dead_port}/auth;",
                            level="error")
        with connect(proxy) as client:
            client.send(b"a LOGIN joe secret\r\n")
            assert client.line() == INTERNAL_ERROR
            assert client.closed()
        proxy.stop()
    lines = proxy.log().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        STAMP + r" \[error\] \d+#\d+: \*\d+ " + re.escape(
            f"auth http server http://127.0.0.1:{dead_port}/auth failed: 111: Connection "
            f'refused while in http auth state, client: 127.0.0.1, server: '
            f'127.0.0.1:{proxy.port}, login: "joe"'), lines[0])


def test_info_level_log_has_no_debug_lines(tmp_path, peers):
    auth = peers.auth(refuse)
    proxy = peers.proxy(tmp_path, mail=f"auth_http {auth.url};", level="info")
    with connect(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == f"a NO {REFUSAL}\r\n".encode()
    proxy.stop()
    levels = set(re.findall(r"^\S+ \S+ \[(\w+)\]", proxy.log(), re.M))
    assert "info" in levels
    assert levels <= {"info", "notice", "warn", "error", "crit", "alert", "emerg"}


def test_server_level_error_log_overrides_mail_level(tmp_path, peers):
    auth = peers.auth(refuse)
    proxy = peers.proxy(tmp_path, level="info",
                        mail=f"auth_http {auth.url};\nerror_log mail.log info;",
                        servers=("protocol imap;\nerror_log server.log info;",
                                 "protocol imap;"))
    for index, login in ((0, b"first"), (1, b"second")):
        with connect(proxy, index) as client:
            client.send(b"a LOGIN " + login + b" secret\r\n")
            assert client.line() == f"a NO {REFUSAL}\r\n".encode()
    proxy.stop()
    server_log = (tmp_path / "server.log").read_text()
    mail_log = (tmp_path / "mail.log").read_text()
    main_log = proxy.log()
    assert 'login: "first"' in server_log and f"server: 127.0.0.1:{proxy.ports[0]}" in server_log
    assert "second" not in server_log
    assert 'login: "second"' in mail_log and f"server: 127.0.0.1:{proxy.ports[1]}" in mail_log
    assert "first" not in mail_log
    assert "client" not in main_log                 # the program's own lines only
    assert f"mailproxy/{__version__}" in main_log


# ----------------------------------------------------------------- secrets

def _cram_digest(challenge_line, password):
    salt = base64.b64decode(challenge_line[2:].strip())
    return hmac.new(password, salt, hashlib.md5).hexdigest().encode()


def _login_quoted(client, tag):
    client.send(tag + b' LOGIN joe "' + PASSWORD + b'"\r\n')
    return []


def _login_literal(client, tag):
    client.send(tag + b" LOGIN joe {%d}\r\n" % len(PASSWORD))
    assert client.line() == CONTINUE_LITERAL
    client.send(PASSWORD + b"\r\n")
    return []


def _plain_initial(client, tag):
    response = b64(b"\0" + LOGIN + b"\0" + PASSWORD)
    client.send(tag + b" AUTHENTICATE PLAIN " + response + b"\r\n")
    return [response]


def _plain_challenge(client, tag):
    response = b64(b"joe\0" + LOGIN + b"\0" + PASSWORD)        # with an authzid
    client.send(tag + b" AUTHENTICATE PLAIN\r\n")
    assert client.line() == b"+ \r\n"
    client.send(response + b"\r\n")
    return [response]


def _login_mechanism(client, tag):
    client.send(tag + b" AUTHENTICATE LOGIN\r\n")
    assert client.line() == b"+ " + USERNAME_CHALLENGE.encode() + b"\r\n"
    client.send(b64(LOGIN) + b"\r\n")
    assert client.line() == b"+ " + PASSWORD_CHALLENGE.encode() + b"\r\n"
    client.send(b64(PASSWORD) + b"\r\n")
    return [b64(PASSWORD)]


def _login_mechanism_initial(client, tag):
    client.send(tag + b" AUTHENTICATE LOGIN " + b64(LOGIN) + b"\r\n")
    assert client.line() == b"+ " + PASSWORD_CHALLENGE.encode() + b"\r\n"
    client.send(b64(PASSWORD) + b"\r\n")
    return [b64(PASSWORD)]


def _cram_md5(client, tag):
    client.send(tag + b" AUTHENTICATE CRAM-MD5\r\n")
    challenge = client.line()
    assert challenge.startswith(b"+ ")
    digest = _cram_digest(challenge, PASSWORD)
    response = b64(LOGIN + b" " + digest)
    client.send(response + b"\r\n")
    return [digest, response]


MECHANISMS = [_login_quoted, _login_literal, _plain_initial, _plain_challenge,
              _login_mechanism, _login_mechanism_initial, _cram_md5]


def _secrets(sent):
    """Every text that would betray a password, as the log (UTF-8) shows it."""
    found = {PASSWORD, escape(PASSWORD).encode("latin-1"), BACKEND_PASSWORD}
    for secret in (PASSWORD, BACKEND_PASSWORD):
        found |= {b64(secret), b64(secret).rstrip(b"=")}
    for item in sent:
        found |= {item, item.rstrip(b"=")}
    return {secret.decode("latin-1") for secret in found}


def _login_everywhere(proxy, expected_reply):
    """Every mechanism, each on its own connection; the secrets sent."""
    sent = []
    for number, mechanism in enumerate(MECHANISMS):
        tag = b"t%d" % number
        with connect(proxy) as client:
            sent += mechanism(client, tag)
            assert client.line() == expected_reply(tag), mechanism.__name__
            assert client.closed()
    return sent


def test_no_secret_reaches_the_log(tmp_path, peers):
    backend = peers.backend()

    def accept(headers):
        reply = [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"),
                 ("Auth-Port", str(backend.port))]
        if headers["Auth-Method"] == "cram-md5":
            reply.append(("Auth-Pass", BACKEND_PASSWORD.decode()))
        return reply

    settings = "imap_auth plain login cram-md5;"
    refusing = peers.auth(refuse)
    accepting = peers.auth(accept)
    proxy = peers.proxy(tmp_path / "refused", level="debug",
                        mail=f"auth_http {refusing.url};\n{settings}")
    sent = _login_everywhere(proxy, lambda tag: tag + f" NO {REFUSAL}\r\n".encode())
    proxy.stop()
    refused_log = proxy.log()

    proxy = peers.proxy(tmp_path / "accepted", level="debug",
                        mail=f"auth_http {accepting.url};\n{settings}")
    sent += _login_everywhere(proxy, lambda tag: INTERNAL_ERROR)
    proxy.stop()
    accepted_log = proxy.log()

    # the secrets did travel: to the auth service (escaped) and to the backend
    escaped = escape(PASSWORD)
    assert [request["Auth-Pass"] == escaped for request in refusing.requests] == \
        [True] * (len(MECHANISMS) - 1) + [False]
    assert len(accepting.requests) == len(MECHANISMS)
    assert backend.passwords == [PASSWORD] * (len(MECHANISMS) - 1) + [BACKEND_PASSWORD]
    # the logs saw every session end, and none of the secrets
    assert refused_log.count("client login failed") == len(MECHANISMS)
    assert accepted_log.count("upstream sent invalid response") == len(MECHANISMS)
    for log in (refused_log, accepted_log):
        leaked = sorted(secret for secret in _secrets(sent) if secret in log)
        assert leaked == [], f"secrets in the log: {leaked}\n{log}"
