"""The session summary: exactly one `session done:` line per session, whatever
ended it, in a fixed and parseable format, with no secret in it.

Each test plays one way a session can end, over real loopback sockets, with
a scripted auth service and backend (tests/fakes.py), then reads the line:

    session done: client 127.0.0.1:50123, imap, login "joe", backend
    127.0.0.1:1143, tls TLSv1.3, 2.1 MB in, 45.0 KB out, 00:12:07, closed by client
"""

import re
import socket
import pytest

from fakes import ScriptedAuthService, ScriptedBackend, fail, ok
from harness import RunningProxy, free_port, wait_until
from mailproxy import imap, pop3, smtp
from mailproxy.log import REASONS, duration, human_size, session_summary

pytest_plugins = ["certs"]

PASSWORD = b"Sup3r-s3cret_pw"
UNIT = r"\d+\.\d (?:B|KB|MB|GB)"
SUMMARY = re.compile(
    r"\[info\] \d+#\d+: \*(?P<conn>\d+) session done: client (?P<client>\S+), "
    r"(?P<protocol>imap|pop3|smtp), login (?P<login>\"[^\"]*\"|-), backend (?P<backend>\S+), "
    rf"tls (?P<tls>\S+), (?P<received>{UNIT}) in, (?P<sent>{UNIT}) out, "
    r"(?P<duration>\d{2,}:\d\d:\d\d), closed by (?P<reason>" + "|".join(REASONS) + r") while ")
BACKEND_LOGIN = [("send", b"* OK backend ready\r\n"), ("recv_line",),
                 ("send", b"+ go ahead\r\n"), ("recv_line",),
                 ("send", b"+ go ahead\r\n"), ("recv_line",),
                 ("send", b"t OK done\r\n")]


class Counted:
    """A client socket that counts what it sends and receives."""

    def __init__(self, port, context=None):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(sock, server_hostname="localhost") if context else sock
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.file = self.sock.makefile("rb")
        self.sent = self.received = 0

    def send(self, data):
        self.sock.sendall(data)
        self.sent += len(data)

    def line(self):
        data = self.file.readline()
        self.received += len(data)
        return data

    def read(self, size):
        data = self.file.read(size)
        self.received += len(data)
        return data

    def rest(self):
        """Read to EOF."""
        data = self.file.read()
        self.received += len(data)
        return data

    def close(self):
        self.file.close()
        self.sock.close()


def summaries(log):
    return [match.groupdict() for match in SUMMARY.finditer(log)]


def the_summary(proxy, count=1):
    """Wait for `count` summary lines; the last one (and each is alone in its
    session: one per connection number)."""
    assert wait_until(lambda: len(summaries(proxy.log())) >= count), proxy.log()
    found = summaries(proxy.log())
    assert len(found) == count, proxy.log()
    assert len({item["conn"] for item in found}) == count
    assert PASSWORD.decode() not in proxy.log()
    return found[-1]


def size(count):
    """The expected size text, computed here from the documented rule."""
    for unit, scale in (("B", 1), ("KB", 1024), ("MB", 1024 ** 2)):
        if round(count / scale, 1) < 1024:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1024 ** 3:.1f} GB"


@pytest.fixture
def auth():
    with ScriptedAuthService() as service:
        yield service


def start(tmp_path, auth_url="127.0.0.1:9/auth", protocol="imap", mail=""):
    return RunningProxy(tmp_path, level="info", servers=(f"protocol {protocol};",),
                        mail=f"auth_http {auth_url};\nserver_name mx.test;\n{mail}")


def login(client):
    assert client.line() == imap.GREETING
    client.send(b"t LOGIN joe " + PASSWORD + b"\r\n")


# ------------------------------------------------------------------ endings

def test_relay_closed_by_client_counts_every_byte(tmp_path, auth):
    payload = b"x" * 3000 + b"\r\n"
    with ScriptedBackend(BACKEND_LOGIN + [("echo",)]) as backend:
        auth.reply = ok("127.0.0.1", backend.port)
        proxy = start(tmp_path, auth.url)
        client = Counted(proxy.port)
        login(client)
        assert client.line() == b"t OK done\r\n"
        client.send(payload)
        assert client.read(len(payload)) == payload
        client.sock.shutdown(socket.SHUT_WR)
        assert client.rest() == b""
        client.close()
        summary = the_summary(proxy)
        proxy.stop()
    assert summary == dict(summary, client=client.address, protocol="imap", login='"joe"',
                           backend=f"127.0.0.1:{backend.port}", tls="-",
                           received=size(client.sent), sent=size(client.received),
                           duration="00:00:00", reason="client")
    assert summary["received"].endswith(" KB") and summary["sent"].endswith(" KB")


def test_relay_closed_by_backend(tmp_path, auth):
    with ScriptedBackend(BACKEND_LOGIN + [("send", b"* BYE going away\r\n")]) as backend:
        auth.reply = ok("127.0.0.1", backend.port)
        proxy = start(tmp_path, auth.url)
        client = Counted(proxy.port)
        login(client)
        assert client.line() == b"t OK done\r\n"
        assert client.line() == b"* BYE going away\r\n"
        assert client.rest() == b""
        client.close()
        summary = the_summary(proxy)
        proxy.stop()
    assert (summary["reason"], summary["backend"]) == ("backend", f"127.0.0.1:{backend.port}")
    assert (summary["received"], summary["sent"]) == (size(client.sent), size(client.received))


def test_relay_timeout(tmp_path, auth):
    with ScriptedBackend(BACKEND_LOGIN + [("echo",)]) as backend:
        auth.reply = ok("127.0.0.1", backend.port)
        proxy = start(tmp_path, auth.url, mail="proxy_timeout 1s;")
        client = Counted(proxy.port)
        login(client)
        assert client.line() == b"t OK done\r\n"
        summary = the_summary(proxy)
        client.close()
        proxy.stop()
    assert summary["reason"] == "timeout" and summary["duration"] in ("00:00:01", "00:00:02")


def test_fast_stop_during_the_relay(tmp_path, auth):
    with ScriptedBackend(BACKEND_LOGIN + [("echo",)]) as backend:
        auth.reply = ok("127.0.0.1", backend.port)
        proxy = start(tmp_path, auth.url)
        client = Counted(proxy.port)
        login(client)
        assert client.line() == b"t OK done\r\n"
        proxy.stop("stop")
        client.close()
    assert the_summary(proxy)["reason"] == "stop"


def test_refused_by_the_auth_service(tmp_path, auth):
    auth.reply = fail("Invalid login or password")
    proxy = start(tmp_path, auth.url)
    client = Counted(proxy.port)
    login(client)
    assert client.line() == b"t NO Invalid login or password\r\n"
    assert client.rest() == b""
    client.close()
    summary = the_summary(proxy)
    proxy.stop()
    assert summary == dict(summary, login='"joe"', backend="-", reason="auth",
                           received=size(client.sent), sent=size(client.received))


def test_client_quits(tmp_path):
    proxy = start(tmp_path)
    client = Counted(proxy.port)
    assert client.line() == imap.GREETING
    client.send(b"a LOGOUT\r\n")
    assert client.rest() == b"* BYE\r\na OK completed\r\n"
    client.close()
    summary = the_summary(proxy)
    proxy.stop()
    assert summary == dict(summary, client=client.address, login="-", backend="-", tls="-",
                           received="10.0 B", sent=size(len(imap.GREETING) + 23),
                           reason="quit")


def test_client_closes_before_login(tmp_path):
    proxy = start(tmp_path)
    client = Counted(proxy.port)
    assert client.line() == imap.GREETING
    client.send(b"a NOOP\r\n")
    client.line()
    client.close()
    assert the_summary(proxy)["reason"] == "client"
    proxy.stop()


def test_client_times_out(tmp_path):
    proxy = start(tmp_path, mail="timeout 500ms;")
    client = Counted(proxy.port)
    assert client.line() == imap.GREETING
    assert client.rest() == b""
    client.close()
    summary = the_summary(proxy)
    proxy.stop()
    assert summary["reason"] == "timeout" and summary["login"] == "-"


def test_auth_service_down_is_an_error(tmp_path):
    proxy = start(tmp_path, auth_url=f"127.0.0.1:{free_port()}/auth")
    client = Counted(proxy.port)
    login(client)
    assert client.line() == imap.INTERNAL_ERROR
    client.close()
    summary = the_summary(proxy)
    proxy.stop()
    assert (summary["reason"], summary["login"], summary["backend"]) == ("error", '"joe"', "-")


def test_backend_refuses_the_login(tmp_path, auth):
    script = [("send", b"* OK backend ready\r\n"), ("recv_line",),
              ("send", b"t NO no such user\r\n")]
    with ScriptedBackend(script) as backend:
        auth.reply = ok("127.0.0.1", backend.port)
        proxy = start(tmp_path, auth.url)
        client = Counted(proxy.port)
        login(client)
        assert client.line() == imap.INTERNAL_ERROR
        client.close()
        summary = the_summary(proxy)
        proxy.stop()
    assert (summary["reason"], summary["backend"]) == ("backend", f"127.0.0.1:{backend.port}")


def test_too_many_invalid_commands(tmp_path):
    proxy = start(tmp_path, mail="max_errors 2;")
    client = Counted(proxy.port)
    assert client.line() == imap.GREETING
    client.send(b"bad\r\nworse\r\n")
    assert client.rest() == b"* BAD invalid command\r\n" * 2
    client.close()
    assert the_summary(proxy)["reason"] == "invalid"
    proxy.stop()


def test_tls_version_and_a_failed_handshake(tmp_path, certs):
    from certs import client_context        # the plugin's module (pytest_plugins)
    proxy = RunningProxy(tmp_path, level="info", servers=(
        "protocol imap;\nlisten 127.0.0.1:%d ssl;" % free_port(),),
        mail=f"auth_http 127.0.0.1:9/auth;\nssl_certificate {certs.ecdsa.cert};\n"
             f"ssl_certificate_key {certs.ecdsa.key};")
    tls_port = proxy.config.servers[0].listens[1].port
    client = Counted(tls_port, client_context(certs))
    assert client.line() == imap.GREETING
    client.send(b"a LOGOUT\r\n")
    client.line(), client.line()
    version = client.sock.version()
    client.close()
    summary = the_summary(proxy)
    assert (summary["tls"], summary["reason"]) == (version, "quit")
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as plain:
        plain.sendall(b"a LOGOUT\r\n")              # clear text to a TLS port
        plain.recv(100)
    assert the_summary(proxy, 2)["reason"] == "tls"
    proxy.stop()


@pytest.mark.parametrize("protocol, greeting, goodbye, reply", [
    ("pop3", pop3.GREETING + b"\r\n", b"QUIT\r\n", pop3.OK),
    ("smtp", b"220 mx.test ESMTP ready\r\n", b"QUIT\r\n", smtp.BYE),
])
def test_pop3_and_smtp_sessions_have_their_line_too(tmp_path, protocol, greeting, goodbye,
                                                     reply):
    proxy = start(tmp_path, protocol=protocol)
    client = Counted(proxy.port)
    assert client.line() == greeting
    client.send(goodbye)
    assert client.line() == reply
    client.close()
    summary = the_summary(proxy)
    proxy.stop()
    assert (summary["protocol"], summary["reason"]) == (protocol, "quit")


def test_a_strange_login_cannot_break_the_format(tmp_path, auth):
    """Quotes and control bytes in a login are escaped: the field still ends
    at its closing quote."""
    auth.reply = fail("Invalid login or password")
    proxy = start(tmp_path, auth.url)
    client = Counted(proxy.port)
    assert client.line() == imap.GREETING
    client.send(b't LOGIN {15}\r\n')
    assert client.line() == imap.CONTINUE_LITERAL
    client.send(b'jo"e, backend x' + b" " + PASSWORD + b"\r\n")
    assert client.line().startswith(b"t NO")
    client.close()
    summary = the_summary(proxy)
    proxy.stop()
    assert summary["login"] == '"jo\\x22e, backend x"' and summary["reason"] == "auth"


# ---------------------------------------------------------------- the parts

@pytest.mark.parametrize("count, text", [
    (0, "0.0 B"), (1, "1.0 B"), (1023, "1023.0 B"), (1024, "1.0 KB"), (1536, "1.5 KB"),
    (1024 * 1024 - 1, "1.0 MB"), (45 * 1024, "45.0 KB"), (int(2.1 * 1024 ** 2), "2.1 MB"),
    (3 * 1024 ** 3, "3.0 GB"), (5 * 1024 ** 4, "5120.0 GB"),
])
def test_human_size(count, text):
    assert human_size(count) == text


@pytest.mark.parametrize("seconds, text", [
    (0, "00:00:00"), (0.99, "00:00:00"), (59, "00:00:59"), (727, "00:12:07"),
    (86399, "23:59:59"), (100 * 3600 + 1, "100:00:01"),
])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_summary_fields():
    assert session_summary("127.0.0.1:50123", "imap", "joe", "127.0.0.1:1143", "TLSv1.3",
                           int(2.1 * 1024 ** 2), 45 * 1024, 727, "client") == \
        'client 127.0.0.1:50123, imap, login "joe", backend 127.0.0.1:1143, tls TLSv1.3, ' \
        '2.1 MB in, 45.0 KB out, 00:12:07, closed by client'
    assert session_summary("[::1]:2", "smtp", None, "", None, 0, 0, 0, "quit") == \
        "client [::1]:2, smtp, login -, backend -, tls -, 0.0 B in, 0.0 B out, 00:00:00, " \
        "closed by quit"
    assert REASONS == ("client", "quit", "backend", "timeout", "auth", "invalid", "tls",
                       "error", "stop")
