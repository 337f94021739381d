"""auth_http.py: escaping, reply parsing, and the client on a real socket.

The first half feeds parse_reply() header lists, as they arrive from the
wire.  The second half points an AuthClient at `RawHTTPServer`, a tiny
loopback server written here so that a test sees the exact request bytes the
auth service receives and can answer with any bytes at all, broken ones
included (spec 2.1-2.5), on TCP or on a unix socket (`auth_http unix:`).
The last part logs in through a running proxy whose auth service listens on
a unix socket: the reference auth service, and none at all (one that
trickles its reply through a proxy: tests/test_drips.py).
"""

import os
import socket
import socketserver
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import IMAP_LOGIN_THEN_ECHO, ScriptedBackend
from harness import Client, RunningProxy, wait_until
from mailproxy.addresses import AuthHttp, auth_http_url
from mailproxy.auth_http import (UNIX_HOST, AuthClient, AuthReply, AuthRequest,
                                 AuthServiceError, escape, parse_reply)
from mailproxy.imap import INTERNAL_ERROR
from mailproxy.reference.authservice import AuthService
from mailproxy.values import BadValue

POLL = 0.05                 # seconds between the fake server's checks for stop
LIFETIME = 10.0             # no fake connection lives longer than this
OK_HEADERS = b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 1143\r\n"


# ------------------------------------------------------------------ escape

def test_escape_spec_examples():
    assert escape(b'p w"x%') == 'p%20w"x%25'
    assert escape("us er+=é".encode()) == "us%20er+=\xc3\xa9"


def test_escape_control_bytes_with_upper_case_hex():
    assert escape(b"a\r\nb") == "a%0D%0Ab"
    assert escape(b"\x00\x01\x1a\x1f") == "%00%01%1A%1F"
    assert escape(bytes(range(0x20))) == "".join(f"%{n:02X}" for n in range(0x20))


def test_escape_del_as_nginx_does():
    assert escape(b"a\x7fb") == "a%7Fb"


def test_escape_leaves_everything_else_raw():
    raw = bytes(range(0x21, 0x25)) + bytes(range(0x26, 0x7F)) + bytes(range(0x80, 0x100))
    assert escape(raw) == raw.decode("latin-1")
    assert escape(b"") == ""


def test_escape_result_is_the_bytes_as_latin1():
    assert escape("é".encode()).encode("latin-1") == "é".encode()


# ------------------------------------------------------------- parse_reply

def ok(*extra):
    return [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", "1143"),
            *extra]


def test_ok_with_server_and_port():
    reply = parse_reply(ok())
    assert reply.ok and not reply.retry
    assert (reply.status, reply.server, reply.port) == ("OK", "127.0.0.1", 1143)
    assert (reply.user, reply.password, reply.wait, reply.error_code) == (None, None, 0, None)


def test_missing_status_is_an_auth_service_error():
    """nginx takes a reply with Auth-Server and Auth-Port but no Auth-Status
    as a yes; here it is invalid (issue 16): a garbled reply admits no one."""
    with pytest.raises(AuthServiceError) as info:
        parse_reply([("Auth-Server", "127.0.0.1"), ("Auth-Port", "1143")])
    assert str(info.value) == "auth http server sent no Auth-Status"


def test_header_names_are_case_insensitive_and_values_trimmed():
    reply = parse_reply([("auth-status", "  OK "), ("AUTH-SERVER", "127.0.0.1 "),
                         ("auth-Port", " 1143")])
    assert (reply.status, reply.server, reply.port) == ("OK", "127.0.0.1", 1143)


def test_error_text_is_the_status():
    reply = parse_reply([("Auth-Status", "Invalid login or password")])
    assert not reply.ok and not reply.retry
    assert reply.status == "Invalid login or password"
    assert (reply.server, reply.port) == (None, None)


def test_status_ok_is_case_sensitive():
    reply = parse_reply([("Auth-Status", "ok"), ("Auth-Server", "127.0.0.1"),
                         ("Auth-Port", "1143")])
    assert not reply.ok
    assert reply.status == "ok"


def test_error_with_wait_and_error_code():
    reply = parse_reply([("Auth-Status", "Temporary problem"), ("Auth-Wait", "3"),
                         ("Auth-Error-Code", "451 4.3.0")])
    assert (reply.status, reply.wait, reply.error_code) == ("Temporary problem", 3, "451 4.3.0")


@pytest.mark.parametrize("headers, expected", [
    (ok(), None), (ok(("Auth-Backend-Auth", "XOAuth2"), ("Auth-Pass", "ya29.t")), "xoauth2"),
    (ok(("Auth-Backend-Auth", "oauthbearer"), ("Auth-Pass", "t")), "oauthbearer"),
    (ok(("Auth-Backend-Auth", "plain")), "plain"), (ok(("Auth-Backend-Auth", "NONE")), "none"),
    ([("Auth-Status", "No"), ("Auth-Backend-Auth", "bogus")], None)])   # read only with OK
def test_auth_backend_auth(headers, expected):
    assert parse_reply(headers).backend_auth == expected


def test_wait_status():
    reply = parse_reply([("Auth-Status", "WAIT"), ("Auth-Wait", "2")])
    assert reply.retry and not reply.ok
    assert reply.wait == 2


@pytest.mark.parametrize("text, seconds", [("3", 3), ("3abc", 0), ("3s", 0), ("x", 0), ("", 0),
                                           ("0", 0), ("12 ", 12), (" 7", 7), ("³", 0)])
def test_auth_wait_is_read_like_atoi(text, seconds):
    """nginx's ngx_atoi takes digits only: "3s" is not a number, so no wait."""
    assert parse_reply([("Auth-Status", "WAIT"), ("Auth-Wait", text)]).wait == seconds


@pytest.mark.parametrize("server", ["localhost", "mail.example.test", "[::1]", "127.1",
                                    "10.0.0.256", ""])
def test_auth_server_must_be_an_ip_literal(server):
    with pytest.raises(AuthServiceError) as info:
        parse_reply([("Auth-Status", "OK"), ("Auth-Server", server), ("Auth-Port", "1143")])
    assert str(info.value) == f'auth http server sent invalid server address:"{server}"'


def test_auth_server_ipv6_without_brackets():
    reply = parse_reply([("Auth-Status", "OK"), ("Auth-Server", "::1"), ("Auth-Port", "1143")])
    assert (reply.server, reply.port) == ("::1", 1143)


@pytest.mark.parametrize("port", ["0", "70000", "65536", "abc", "-1", "+143", "", "14 3"])
def test_auth_port_must_be_1_to_65535(port):
    with pytest.raises(AuthServiceError) as info:
        parse_reply([("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", port)])
    assert str(info.value) == f'auth http server sent invalid server port:"{port.strip()}"'


def test_auth_port_limits():
    ok_to = [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1")]
    assert parse_reply(ok_to + [("Auth-Port", "1")]).port == 1
    assert parse_reply(ok_to + [("Auth-Port", "65535")]).port == 65535


def test_auth_port_with_a_non_ascii_digit_is_an_auth_service_error():
    with pytest.raises(AuthServiceError):
        parse_reply([("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", "14³")])


@pytest.mark.parametrize("headers", [
    [("Auth-Status", "OK")],
    [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1")],
    [("Auth-Status", "OK"), ("Auth-Port", "1143")],
])
def test_ok_without_server_or_port_is_an_error(headers):
    with pytest.raises(AuthServiceError) as info:
        parse_reply(headers)
    assert str(info.value) == "auth http server did not send server or port"


def test_auth_user_and_pass_are_raw_bytes_never_percent_decoded():
    reply = parse_reply(ok(("Auth-User", "jo%20e"), ("Auth-Pass", "p%25w\xe9")))
    assert reply.user == b"jo%20e"
    assert reply.password == b"p%25w\xe9"


def test_empty_auth_pass_is_an_empty_override():
    assert parse_reply(ok(("Auth-Pass", ""))).password == b""


@pytest.mark.parametrize("statuses", [["Invalid login", "OK"], ["OK", "Invalid login"],
                                      ["WAIT", "Invalid login"], ["OK", "OK"],
                                      ["first error", "second error"]])
def test_a_repeated_auth_status_is_invalid(statuses):
    """nginx keeps the last error text; here a repeated Auth-* header makes
    the reply invalid (issue 16): it is what a bare CR or a folded line in
    a reflected value turns into."""
    with pytest.raises(AuthServiceError) as info:
        parse_reply([("Auth-Status", status) for status in statuses])
    assert str(info.value) == 'auth http server sent "Auth-Status" twice'


@pytest.mark.parametrize("name", ["Auth-Port", "Auth-Server", "auth-user", "Auth-Pass"])
def test_any_repeated_auth_header_is_invalid(name):
    with pytest.raises(AuthServiceError) as info:
        parse_reply(ok((name, "1144"), (name, "1145")) if name.lower() in ("auth-user", "auth-pass")
                    else ok((name, "1144")))
    assert str(info.value) == f'auth http server sent "{name}" twice'


@pytest.mark.parametrize("value", ["Invalid\r\na NO", "bad\nline", "nul\x00", "esc\x1b[2J",
                                   "del\x7f", "bell\x07"])
def test_a_control_byte_in_an_auth_value_is_invalid(value):
    with pytest.raises(AuthServiceError) as info:
        parse_reply([("Auth-Status", value)])
    assert str(info.value) == 'auth http server sent a control byte in "Auth-Status"'


def test_a_tab_in_a_status_text_is_kept():
    assert parse_reply([("Auth-Status", "Invalid\tlogin")]).status == "Invalid\tlogin"


@pytest.mark.parametrize("server", ["::1%lo", "fe80::1%eth0", "127.0.0.1%lo"])
def test_auth_server_with_a_zone_is_invalid(server):
    with pytest.raises(AuthServiceError) as info:
        parse_reply([("Auth-Status", "OK"), ("Auth-Server", server), ("Auth-Port", "1143")])
    assert str(info.value) == f'auth http server sent invalid server address:"{server}"'


def test_unknown_headers_are_kept_for_extensions():
    reply = parse_reply(ok(("X-Thing", "1"), ("x-thing", "2")))
    assert reply.header("X-THING") == "2"
    assert reply.header("X-Missing") is None
    assert ("X-Thing", "1") in reply.headers


def test_repr_shows_no_secrets():
    request = AuthRequest("plain", b"joe", b"hunter2", b"", "imap", 1, "127.0.0.1")
    assert "hunter2" not in repr(request)
    assert repr(request) == "AuthRequest(plain, login=b'joe', attempt=1)"
    reply = AuthReply("OK", "127.0.0.1", 1143, b"be_joe", b"hunter2")
    assert "hunter2" not in repr(reply)


# -------------------------------------------------- a raw loopback server

class RawHTTPServer:
    """Accepts on loopback, records each request's raw bytes (up to the
    blank line) and answers with `reply`:

    * bytes: sent after each request; the connection then closes unless
      `keep_alive`;
    * a list: pieces sent one by one, with `gap` seconds between them;
    * None: never answer (the connection stays open until the client goes).

    With `answers` set, a connection answers that many requests; the next
    one is recorded and the connection closed without a reply.  With
    `path`, it listens on that unix socket instead of a loopback port.
    """

    def __init__(self, reply, keep_alive=False, gap=0.0, answers=None, path=None):
        self.reply, self.keep_alive, self.gap = reply, keep_alive, gap
        self.answers = answers
        self.path = path
        if path:
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(path)
            self.listener.listen()
            self.port = None
        else:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.port = self.listener.getsockname()[1]
        self.listener.settimeout(POLL)
        self.requests = []
        self.connections = 0
        self.lock = threading.Lock()        # requests/connections: handler threads
        self.stopping = threading.Event()
        self.threads = []
        self.acceptor = threading.Thread(target=self._accept, name="raw http accept")
        self.acceptor.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), name="raw http conn")
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(POLL)
            buffer, end_of_life = b"", time.monotonic() + LIFETIME
            answered = 0
            while not self.stopping.is_set() and time.monotonic() < end_of_life:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    try:
                        data = conn.recv(4096)
                    except socket.timeout:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                    continue
                request, buffer = buffer[:end + 4], buffer[end + 4:]
                with self.lock:
                    self.requests.append(request)
                if self.reply is None:
                    continue
                if answered == self.answers:
                    return
                answered += 1
                if not self._answer(conn) or not self.keep_alive:
                    return

    def _answer(self, conn):
        pieces = self.reply if isinstance(self.reply, list) else [self.reply]
        try:
            for number, piece in enumerate(pieces):
                if number and self.stopping.wait(self.gap):
                    return False
                conn.sendall(piece)
        except OSError:
            return False
        return True

    def header_lines(self, index=0):
        """The request line and header lines of one request, as text."""
        return self.requests[index].decode("latin-1").split("\r\n")[:-2]

    def close(self):
        self.stopping.set()
        self.listener.close()
        self.acceptor.join(timeout=5)
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def auth_server():
    """Factory: auth_server(reply, ...) -> a RawHTTPServer, closed at teardown."""
    servers = []

    def make(reply, **kwargs):
        servers.append(RawHTTPServer(reply, **kwargs))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


@pytest.fixture
def client_for():
    """Factory: client_for(server, timeout=2, headers=()) -> an AuthClient
    for a RawHTTPServer (TCP or unix) or a port; with host="unix:/path" the
    port is not used."""
    clients = []

    def make(server, timeout=2.0, headers=(), host="127.0.0.1", uri="/auth"):
        if isinstance(server, RawHTTPServer) and server.path:
            host, port = "unix:" + server.path, None
        else:
            port = server if isinstance(server, int) else server.port
        clients.append(AuthClient((host, port, uri), timeout, headers))
        return clients[-1]
    yield make
    for client in clients:
        client.close()


def http(status_line=b"HTTP/1.0 200 OK", headers=OK_HEADERS, body=b""):
    return status_line + b"\r\n" + headers + b"\r\n" + body


def plain_request(login=b"joe", password=b"secret", extra=()):
    return AuthRequest("plain", login, password, b"", "imap", 1, "127.0.0.1", extra)


EXPECTED = ["Host: 127.0.0.1",
            "Auth-Method: plain",
            "Auth-User: joe",
            "Auth-Pass: secret",
            "Auth-Protocol: imap",
            "Auth-Login-Attempt: 1",
            "Client-IP: 127.0.0.1",
            "X-Secret: s3cr3t",
            "X-Other: two words"]


# -------------------------------------------------------- AuthClient: wire

def test_request_headers_in_nginx_order(auth_server, client_for):
    server = auth_server(http())
    client = client_for(server, headers=(("X-Secret", "s3cr3t"), ("X-Other", "two words")))
    reply = client.ask(plain_request())
    assert (reply.ok, reply.server, reply.port) == (True, "127.0.0.1", 1143)
    lines = server.header_lines()
    assert lines[0] == "GET /auth HTTP/1.1"
    assert lines[lines.index("Host: 127.0.0.1"):] == EXPECTED
    names = [line.split(":")[0].lower() for line in lines[1:]]
    assert len(names) == len(set(names))


def test_request_has_no_headers_but_nginx_ones(auth_server, client_for):
    server = auth_server(http())
    client = client_for(server, headers=(("X-Secret", "s3cr3t"), ("X-Other", "two words")))
    client.ask(plain_request())
    assert server.header_lines()[1:] == EXPECTED


def test_host_header_has_no_port(auth_server, client_for):
    server = auth_server(http())
    client_for(server, host="localhost", uri="/a/b?x=1").ask(plain_request())
    lines = server.header_lines()
    assert lines[0] == "GET /a/b?x=1 HTTP/1.1"
    assert "Host: localhost" in lines


def test_salt_goes_between_pass_and_protocol(auth_server, client_for):
    server = auth_server(http(headers=OK_HEADERS + b"Auth-Pass: backend-pw\r\n"))
    salt = b"<1896.697170952@mx.test>"
    request = AuthRequest("cram-md5", b"joe", b"0123456789abcdef0123456789abcdef", salt,
                          "imap", 2, "127.0.0.1")
    reply = client_for(server).ask(request)
    assert reply.password == b"backend-pw"
    lines = server.header_lines()
    start = lines.index("Host: 127.0.0.1")
    assert lines[start:] == ["Host: 127.0.0.1",
                             "Auth-Method: cram-md5",
                             "Auth-User: joe",
                             "Auth-Pass: 0123456789abcdef0123456789abcdef",
                             "Auth-Salt: <1896.697170952@mx.test>",
                             "Auth-Protocol: imap",
                             "Auth-Login-Attempt: 2",
                             "Client-IP: 127.0.0.1"]


def test_protocol_extra_headers_come_before_configured_ones(auth_server, client_for):
    server = auth_server(http())
    client = client_for(server, headers=(("X-Secret", "s3cr3t"),))
    client.ask(plain_request(extra=(("Client-Host", "[UNAVAILABLE]"),)))
    lines = server.header_lines()
    assert lines[-3:] == ["Client-IP: 127.0.0.1", "Client-Host: [UNAVAILABLE]",
                          "X-Secret: s3cr3t"]


def test_escaping_on_the_wire(auth_server, client_for):
    server = auth_server(http())
    client_for(server).ask(plain_request("us er+=é".encode(), b'p w"x%'))
    raw = server.requests[0]
    assert b"\r\nAuth-User: us%20er+=\xc3\xa9\r\n" in raw
    assert b'\r\nAuth-Pass: p%20w"x%25\r\n' in raw


def test_crlf_in_credentials_cannot_inject_headers(auth_server, client_for):
    server = auth_server(http())
    client_for(server).ask(plain_request(b"joe\r\nAuth-Status: OK", b"x\r\n\r\nGET / HTTP/1.0"))
    raw = server.requests[0]
    assert b"\r\nAuth-User: joe%0D%0AAuth-Status:%20OK\r\n" in raw
    assert b"\r\nAuth-Pass: x%0D%0A%0D%0AGET%20/%20HTTP/1.0\r\n" in raw
    assert raw.count(b"\r\n\r\n") == 1


@pytest.mark.parametrize("password", [b"\xa0secret", b"\x85secret"], ids=["nbsp", "nel"])
def test_password_starting_with_a_latin1_space_is_sent_raw(auth_server, client_for, password):
    server = auth_server(http())
    assert client_for(server).ask(plain_request(password=password)).ok
    assert b"\r\nAuth-Pass: " + password + b"\r\n" in server.requests[0]


def test_utf8_configured_header_value(auth_server, client_for):
    server = auth_server(http())
    client_for(server, headers=(("X-Key", "ключ"),)).ask(plain_request())
    assert "\r\nX-Key: ключ\r\n".encode() in server.requests[0]


# ------------------------------------------------------ AuthClient: replies

@pytest.mark.parametrize("status_line", [b"HTTP/1.1 404 Not Found",
                                         b"HTTP/1.0 500 Internal Server Error",
                                         b"HTTP/1.1 302 Found"])
def test_status_code_is_ignored(auth_server, client_for, status_line):
    server = auth_server(http(status_line, OK_HEADERS + b"Location: http://x/\r\n"))
    reply = client_for(server).ask(plain_request())
    assert (reply.ok, reply.server, reply.port) == (True, "127.0.0.1", 1143)


def test_error_reply_on_the_wire(auth_server, client_for):
    server = auth_server(http(headers=b"Auth-Status: Invalid login or password\r\n"
                                      b"Auth-Wait: 3\r\n"))
    reply = client_for(server).ask(plain_request())
    assert (reply.ok, reply.status, reply.wait) == (False, "Invalid login or password", 3)


def test_a_redirect_whose_location_cannot_be_parsed_is_ignored(auth_server, client_for):
    """As nginx: a 3xx's Location is never looked at, a broken one neither."""
    server = auth_server(http(b"HTTP/1.1 302 Found", OK_HEADERS + b"Location: http://[\r\n"
                                                                b"Content-Length: 0\r\n"))
    assert client_for(server).ask(plain_request()).port == 1143


def test_body_is_ignored(auth_server, client_for):
    server = auth_server(http(headers=OK_HEADERS + b"Content-Length: 11\r\n",
                              body=b"hello world"))
    assert client_for(server).ask(plain_request()).ok


def test_bare_lf_line_ends_are_accepted(auth_server, client_for):
    server = auth_server(b"HTTP/1.0 200 OK\nAuth-Status: OK\nAuth-Server: 127.0.0.1\n"
                         b"Auth-Port: 1143\n\n")
    assert client_for(server).ask(plain_request()).port == 1143


def test_keep_alive_reuses_one_connection(auth_server, client_for):
    server = auth_server(http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Content-Length: 0\r\n"),
                         keep_alive=True)
    client = client_for(server)
    assert client.ask(plain_request()).ok
    assert client.ask(plain_request(login=b"ann")).ok
    assert len(server.requests) == 2
    assert server.connections == 1
    assert b"\r\nAuth-User: ann\r\n" in server.requests[1]


CHUNKED = b"Transfer-Encoding: chunked\r\n"


@pytest.mark.parametrize("headers, body, kept", [
    (b"Content-Length: 11\r\n", b"hello world", True),
    (CHUNKED, b"5\r\nhello\r\n0\r\n\r\n", True),
    (b"Content-Length: 70000\r\n", b"x" * 70000, False),
    (CHUNKED, b"11170\r\n" + b"x" * 70000 + b"\r\n0\r\n\r\n", False),
    (CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n", False),
    (CHUNKED, b"-5\r\nhello\r\n0\r\n\r\n", False),
    (CHUNKED, b"5\r\nhello", False),
    (b"Content-Length: 5\r\n", b"hi", False),
], ids=["length", "chunked", "long", "long-chunk", "bad-size", "negative-size",
        "no-last-chunk", "short"])
def test_the_body_is_ignored_and_decides_only_the_connection(auth_server, client_for,
                                                              headers, body, kept):
    """Whatever the body, well formed or not, the answer is the headers';
    the connection is kept for the next login only after a body read
    whole and within MAX_BODY (a body cut short ends at the deadline)."""
    reply = http(b"HTTP/1.1 200 OK", OK_HEADERS + headers, body)
    server = auth_server(reply, keep_alive=True)
    client = client_for(server, timeout=0.5)
    assert client.ask(plain_request()).ok
    assert client.ask(plain_request(login=b"ann")).ok
    assert server.connections == (1 if kept else 2)


def test_a_reply_that_ends_the_connection_is_not_read_past_its_headers():
    """HTTP/1.0 without a length: the connection ends with the reply, so
    the client closes it after the headers rather than wait for a body,
    even from a service that neither sends one nor closes (the login would
    otherwise wait for auth_http_timeout, here an hour)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen = []

    def service():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(LIFETIME)
            while b"\r\n\r\n" not in b"".join(seen):
                seen.append(conn.recv(4096))
            conn.sendall(http(b"HTTP/1.0 200 OK", OK_HEADERS))
            try:
                seen.append(conn.recv(4096))       # b"": the client closed
            except socket.timeout:
                seen.append(None)

    thread = threading.Thread(target=service)
    thread.start()
    client = AuthClient(("127.0.0.1", listener.getsockname()[1], "/auth"), 3600.0)
    try:
        assert client.ask(plain_request()).ok
        thread.join(LIFETIME + 5)
        assert seen[-1] == b""
    finally:
        client.close()
        listener.close()


def test_no_reuse_when_the_service_closes(auth_server, client_for):
    server = auth_server(http(b"HTTP/1.0 200 OK", OK_HEADERS))
    client = client_for(server)
    assert client.ask(plain_request()).ok
    assert client.ask(plain_request()).ok
    assert server.connections == 2


def test_a_kept_connection_the_service_closed_is_replaced_not_resent(auth_server, client_for):
    """HTTP/1.1 lets the client keep the connection, but the service closes
    it after one reply.  The pool sees the close before it reuses the
    connection and opens a new one: the next login is asked once, and gets
    its answer."""
    server = auth_server(http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Content-Length: 0\r\n"))
    client = client_for(server)
    assert client.ask(plain_request()).ok
    assert wait_until(lambda: not server.threads[0].is_alive())    # it has closed
    assert client.ask(plain_request(login=b"ann")).ok
    assert len(server.requests) == 2
    assert server.connections == 2
    assert b"\r\nAuth-User: ann\r\n" in server.requests[1]


def test_a_connection_in_use_when_the_auth_client_closes_is_not_kept(auth_server, client_for):
    """The server stops while a login waits for its answer: the answer
    still comes, and its connection is closed after it rather than kept
    open for a login that will never come."""
    reply = http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Content-Length: 0\r\n")
    server = auth_server([reply[:20], reply[20:]], keep_alive=True, gap=0.3)
    client = client_for(server)
    answers = []
    asking = threading.Thread(target=lambda: answers.append(client.ask(plain_request())))
    asking.start()
    assert wait_until(lambda: server.requests)
    client.close()
    asking.join(timeout=5)
    assert answers and answers[0].ok
    assert wait_until(lambda: not server.threads[0].is_alive())     # it saw our close


def test_a_request_the_service_may_have_seen_is_never_sent_again(auth_server, client_for):
    """The service takes the second request on a kept connection and closes
    without answering, as one that drops idle connections may just as a
    request arrives.  The request may have been acted on, so the login fails
    with an auth service error; it is not sent again on a new connection
    (nginx never sends one twice either)."""
    server = auth_server(http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Content-Length: 0\r\n"),
                         keep_alive=True, answers=1)
    client = client_for(server)
    assert client.ask(plain_request()).ok
    with pytest.raises(AuthServiceError) as info:
        client.ask(plain_request(login=b"ann"))
    assert str(info.value).startswith(f"auth http server http://127.0.0.1:{server.port}/auth "
                                      "failed: ")
    assert len(server.requests) == 2
    assert server.connections == 1


def test_cookies_from_the_service_are_never_sent_back(auth_server, client_for):
    server = auth_server(http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Set-Cookie: id=1; Path=/\r\n"
                                                               b"Content-Length: 0\r\n"),
                         keep_alive=True)
    client = client_for(server, headers=(("X-Secret", "s3cr3t"), ("X-Other", "two words")))
    assert client.ask(plain_request()).ok
    assert client.ask(plain_request()).ok
    assert server.header_lines(1)[1:] == EXPECTED


# ----------------------------------------------------- AuthClient: failures

def test_refused_connection(client_for):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]            # bound, never listening: refused
        with pytest.raises(AuthServiceError) as info:
            client_for(port).ask(plain_request())
    assert str(info.value) == f"auth http server http://127.0.0.1:{port}/auth failed: " \
                              "111: Connection refused"


def test_timeout_when_the_service_never_answers(auth_server, client_for):
    server = auth_server(None)
    started = time.monotonic()
    with pytest.raises(AuthServiceError) as info:
        client_for(server, timeout=0.5).ask(plain_request())
    assert time.monotonic() - started < 3
    assert str(info.value) == f"auth http server http://127.0.0.1:{server.port}/auth timed out"
    assert len(server.requests) == 1


def test_timeout_is_a_total_limit_on_the_reply(auth_server, client_for):
    pieces = [b"HTTP/1.0 200 OK\r\n"] + [b"X-Pad: %d\r\n" % n for n in range(4)] + \
        [OK_HEADERS + b"\r\n"]
    server = auth_server(pieces, gap=0.3)       # 1.5 s in all, each gap < the timeout
    started = time.monotonic()
    with pytest.raises(AuthServiceError) as info:
        client_for(server, timeout=0.5).ask(plain_request())
    assert 0.5 <= time.monotonic() - started < 1.2
    assert str(info.value) == f"auth http server http://127.0.0.1:{server.port}/auth timed out"


def test_a_slow_body_is_cut_at_the_deadline_and_the_reply_stands(auth_server, client_for):
    """The body is read only to reuse the connection, under the same
    deadline: a service that trickles it costs the login no more than
    auth_http_timeout, and the connection is dropped, not kept."""
    head = http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Content-Length: 10\r\n")
    server = auth_server([head] + [b"x"] * 10, gap=0.3, keep_alive=True)
    client = client_for(server, timeout=0.5)
    started = time.monotonic()
    assert client.ask(plain_request()).ok
    assert 0.5 <= time.monotonic() - started < 1.2
    assert wait_until(lambda: not server.threads[0].is_alive())    # we closed it
    server.reply = http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Content-Length: 0\r\n")
    assert client.ask(plain_request()).ok
    assert server.connections == 2


def test_each_request_on_a_kept_connection_has_its_own_deadline(auth_server, client_for):
    server = auth_server(http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Content-Length: 0\r\n"),
                         keep_alive=True)
    client = client_for(server, timeout=0.3)
    assert client.ask(plain_request()).ok
    time.sleep(0.5)                             # longer than the first request's deadline
    assert client.ask(plain_request()).ok
    assert server.connections == 1


@pytest.mark.parametrize("reply", [
    b"hello there\r\n\r\n",
    b"\x00\x01\x02 binary\r\n\r\n",
    b"SMTP 220 ready\r\n\r\n",
], ids=["text", "binary", "other-protocol"])
def test_garbage_that_is_not_http(auth_server, client_for, reply):
    server = auth_server(reply)
    with pytest.raises(AuthServiceError) as info:
        client_for(server).ask(plain_request())
    assert str(info.value).startswith(f"auth http server http://127.0.0.1:{server.port}/auth "
                                      "failed: ")


def test_header_name_with_underscore(auth_server, client_for):
    server = auth_server(http(headers=OK_HEADERS + b"X_Bad: 1\r\n"))
    with pytest.raises(AuthServiceError) as info:
        client_for(server).ask(plain_request())
    assert str(info.value) == "auth http server sent invalid header in response"


def test_headers_over_1024_bytes(auth_server, client_for):
    server = auth_server(http(headers=OK_HEADERS + b"X-Pad: " + b"x" * 1000 + b"\r\n"))
    with pytest.raises(AuthServiceError) as info:
        client_for(server).ask(plain_request())
    assert str(info.value) == "auth http server sent too long response"


def test_headers_just_under_1024_bytes_are_fine(auth_server, client_for):
    server = auth_server(http(headers=OK_HEADERS + b"X-Pad: " + b"x" * 800 + b"\r\n"))
    assert client_for(server).ask(plain_request()).ok


def test_connection_closed_after_the_status_line(auth_server, client_for):
    server = auth_server(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n")
    with pytest.raises(AuthServiceError):
        client_for(server).ask(plain_request())


def test_connection_closed_before_any_byte(auth_server, client_for):
    server = auth_server(b"")
    with pytest.raises(AuthServiceError) as info:
        client_for(server).ask(plain_request())
    assert str(info.value).startswith("auth http server http://127.0.0.1:")


def test_connection_closed_before_the_blank_line(auth_server, client_for):
    server = auth_server(b"HTTP/1.0 200 OK\r\n" + OK_HEADERS)     # no blank line, then EOF
    with pytest.raises(AuthServiceError) as info:
        client_for(server).ask(plain_request())
    assert str(info.value) == f"auth http server http://127.0.0.1:{server.port}/auth " \
                              "failed: sent invalid response (IncompleteHeaders)"


def test_bad_server_address_on_the_wire(auth_server, client_for):
    server = auth_server(http(headers=b"Auth-Status: OK\r\nAuth-Server: backend.test\r\n"
                                      b"Auth-Port: 1143\r\n"))
    with pytest.raises(AuthServiceError) as info:
        client_for(server).ask(plain_request())
    assert str(info.value) == 'auth http server sent invalid server address:"backend.test"'


# ------------------------------------------------ auth_http unix:/path:/uri

@pytest.fixture
def socket_dir():
    """A short private directory for unix sockets (a socket path must fit
    in 108 bytes; pytest's tmp_path can be longer)."""
    with tempfile.TemporaryDirectory(prefix="mp-auth-") as directory:
        yield directory


@pytest.mark.parametrize("text, expected", [
    ("unix:/run/auth.sock", ("unix:/run/auth.sock", None, "/")),
    ("unix:/run/auth.sock:/auth", ("unix:/run/auth.sock", None, "/auth")),
    ("unix:/run/auth.sock:", ("unix:/run/auth.sock", None, "/")),
    ("unix:/run/auth.sock:/a/b?x=1", ("unix:/run/auth.sock", None, "/a/b?x=1")),
    ("http://unix:/run/auth.sock:/auth", ("unix:/run/auth.sock", None, "/auth")),
])
def test_unix_address_forms(text, expected):
    """nginx's syntax: the URI follows the colon after the path."""
    assert auth_http_url([text]) == AuthHttp(*expected)


@pytest.mark.parametrize("text, message", [
    ("unix:", 'no path in the unix domain socket "unix:"'),
    ("unix::/auth", 'no path in the unix domain socket "unix::/auth"'),
    ("unix:/" + "x" * 107, f'too long path in the unix domain socket "unix:/{"x" * 107}"'),
    ("unix:/run/auth.sock:auth", 'invalid URI "auth" in "unix:/run/auth.sock:auth"'),
])
def test_bad_unix_addresses(text, message):
    with pytest.raises(BadValue) as info:
        auth_http_url([text])
    assert str(info.value) == message


def test_unix_request_is_nginx_request_with_host_localhost(auth_server, client_for,
                                                          socket_dir):
    """Byte for byte the TCP request, but `Host: localhost`, as nginx
    sends for a unix: auth service."""
    server = auth_server(http(), path=os.path.join(socket_dir, "auth.sock"))
    client = client_for(server, headers=(("X-Secret", "s3cr3t"), ("X-Other", "two words")))
    reply = client.ask(plain_request())
    assert (reply.ok, reply.server, reply.port) == (True, "127.0.0.1", 1143)
    assert server.header_lines() == ["GET /auth HTTP/1.1", f"Host: {UNIX_HOST}"] + EXPECTED[1:]
    assert UNIX_HOST == "localhost"


def test_unix_keep_alive_reuses_one_connection(auth_server, client_for, socket_dir):
    server = auth_server(http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Content-Length: 0\r\n"),
                         keep_alive=True, path=os.path.join(socket_dir, "auth.sock"))
    client = client_for(server)
    assert client.ask(plain_request()).ok
    assert client.ask(plain_request(login=b"ann")).ok
    assert server.connections == 1
    assert b"\r\nAuth-User: ann\r\n" in server.requests[1]


def test_unix_socket_that_does_not_exist(client_for, socket_dir):
    path = os.path.join(socket_dir, "missing.sock")
    client = client_for(0, host="unix:" + path)
    with pytest.raises(AuthServiceError) as info:
        client.ask(plain_request())
    assert str(info.value) == f"auth http server unix:{path}:/auth failed: " \
                              "2: No such file or directory"


def test_unix_socket_nobody_listens_on(client_for, socket_dir):
    path = os.path.join(socket_dir, "stale.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)                        # the file exists; nothing accepts
        with pytest.raises(AuthServiceError) as info:
            client_for(0, host="unix:" + path).ask(plain_request())
    assert str(info.value) == f"auth http server unix:{path}:/auth failed: " \
                              "111: Connection refused"


def test_unix_service_with_a_full_listen_queue_fails_at_once(client_for, socket_dir):
    """A unix socket under a timeout does not wait for room in a full
    listen queue: connect() fails at once with EAGAIN, as nginx's
    non-blocking connect does.  The login gets its internal error now,
    rather than wait for a service that is not accepting."""
    path = os.path.join(socket_dir, "busy.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(0)                      # never accepts
        fillers = []
        for _ in range(10):                     # queue connections until it is full
            filler = socket.socket(socket.AF_UNIX)
            filler.setblocking(False)
            try:
                filler.connect(path)
            except BlockingIOError:
                filler.close()
                break
            fillers.append(filler)
        started = time.monotonic()
        with pytest.raises(AuthServiceError) as info:
            client_for(0, host="unix:" + path, timeout=5).ask(plain_request())
        assert time.monotonic() - started < 1
        for filler in fillers:
            filler.close()
    assert str(info.value) == f"auth http server unix:{path}:/auth failed: " \
                              "11: Resource temporarily unavailable"


def test_unix_trickle_is_cut_at_the_timeout(auth_server, client_for, socket_dir):
    reply = http()
    server = auth_server([reply[i:i + 1] for i in range(len(reply))], gap=0.2,
                         path=os.path.join(socket_dir, "auth.sock"))
    started = time.monotonic()
    with pytest.raises(AuthServiceError) as info:
        client_for(server, timeout=0.7).ask(plain_request())
    assert 0.7 <= time.monotonic() - started < 1.5
    assert str(info.value) == f"auth http server unix:{server.path}:/auth timed out"


# ----------------------------------- a login through the proxy, unix: auth

class UnixAuthService(AuthService):
    """The reference auth service (`mailproxy auth-service`) on a unix
    socket: the same handler and policy, socketserver's unix family."""

    address_family = socket.AF_UNIX

    def server_bind(self):
        # HTTPServer.server_bind looks up a host name; a unix socket has none.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = UNIX_HOST, 0


@pytest.fixture
def backend():
    server = ScriptedBackend(IMAP_LOGIN_THEN_ECHO)
    yield server
    server.close()


@pytest.fixture
def proxy_with(tmp_path):
    """proxy_with(auth_http_value, extra) -> a RunningProxy serving IMAP."""
    started = []

    def start(auth, extra=""):
        started.append(RunningProxy(tmp_path, mail=f"auth_http {auth};\n{extra}"))
        return started[-1]
    yield start
    for proxy in started:
        proxy.stop()


def test_login_through_the_reference_service_on_a_unix_socket(tmp_path, socket_dir,
                                                              backend, proxy_with):
    users = tmp_path / "users"
    users.write_text(f"joe {{PLAIN}}secret imap=127.0.0.1:{backend.port}\n")
    path = os.path.join(socket_dir, "auth.sock")
    service = UnixAuthService(path, str(users))
    thread = threading.Thread(target=service.serve_forever, args=(POLL,),
                              name="unix auth service")
    thread.start()
    try:
        proxy = proxy_with(f"unix:{path}:/auth")
        with Client(proxy.port) as client:
            assert client.line() == b"* OK IMAP4 ready\r\n"
            client.send(b"a LOGIN joe secret\r\n")
            assert client.line() == b"a OK logged in\r\n"
            client.send(b"b NOOP\r\n")
            assert client.line() == b"b NOOP\r\n"           # the backend echoes
    finally:
        service.shutdown()
        service.server_close()
        thread.join(10)
    assert backend.received[0].startswith(b"a LOGIN {3}\r\njoe {6}\r\nsecret\r\n")


def test_login_with_a_missing_unix_socket(socket_dir, proxy_with):
    path = os.path.join(socket_dir, "nobody.sock")
    proxy = proxy_with(f"unix:{path}:/auth")
    with Client(proxy.port) as client:
        client.line()
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == INTERNAL_ERROR
        assert client.closed()
    proxy.wait_log(f"auth http server unix:{path}:/auth failed: 2: No such file or "
                   "directory while in http auth state")


# ------------------------------------------- AuthClient: a stray response

REFUSED = http(b"HTTP/1.1 200 OK", b"Auth-Status: Invalid login\r\nContent-Length: 0\r\n")
STRAY_OK = http(b"HTTP/1.1 200 OK", OK_HEADERS + b"Content-Length: 0\r\n")


@pytest.mark.parametrize("reply, gap", [(REFUSED + STRAY_OK, 0.0), ([REFUSED, STRAY_OK], 0.3)])
def test_a_stray_response_is_never_the_next_logins_answer(auth_server, client_for, reply, gap):
    """A buggy auth service writes a second, unasked-for response after each
    answer: in the same write, or a moment later.  Each login still gets
    the answer to its own request: stray bytes read with the answer are
    dropped with it, and a kept connection holding unread bytes is not used
    again (the adapter checks it before each request).  The window that stays
    open: a stray written so late that it arrives between that check and
    the next answer (docs/differences.md)."""
    server = auth_server(reply, keep_alive=True, gap=gap)
    client = client_for(server)
    for attempt in range(4):
        assert client.ask(plain_request(password=b"wrong")).status == "Invalid login"
        time.sleep(gap * 2)
    assert len(server.requests) == 4


# ------------------------------------------- AuthClient: strict framing

@pytest.mark.parametrize("headers, message", [
    # a login the service reflects into Auth-User, with a bare CR in it
    (OK_HEADERS + b"Auth-User: joe\rAuth-Port: 25\r\n", '"Auth-Port" twice'),
    (b"Auth-Status: Invalid login\r\n or password\r\n", 'a control byte in "Auth-Status"'),
    (b"Auth-Server: 127.0.0.1\r\nAuth-Port: 1143\r\n", "no Auth-Status"),
    (b"Auth-Status: OK\r\nAuth-Server: ::1%lo\r\nAuth-Port: 1143\r\n",
     'invalid server address:"::1%lo"'),
])
def test_a_reply_framed_loosely_is_refused_on_the_wire(auth_server, client_for, headers, message):
    server = auth_server(http(b"HTTP/1.1 200 OK", headers + b"Content-Length: 0\r\n"))
    with pytest.raises(AuthServiceError) as info:
        client_for(server).ask(plain_request())
    assert str(info.value) == f"auth http server sent {message}"


# ------------------------------------------------ the transport, fuzzed

_STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content",
                 b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK", b"HTTP/1.1 302 Found",
                 b"HTTP/2 200", b"HTTP/1.1 2000 OK", b"ICY 200 OK", b""]
_HEADER_LINES = [b"Auth-Status: Invalid login", b"Auth-Wait: 2", b"Auth-Port: 25",
                 b"Connection: close", b"Connection: keep-alive", b" folded", b"\tfolded",
                 b"No-Colon", b": empty name", b"Auth-Port: 1143\rAuth-Port: 25"]
_FRAMINGS = [None, b"Content-Length: 0", b"Content-Length: 5", b"Content-Length: -1",
             b"Content-Length: x", b"Content-Length: 99999", b"Transfer-Encoding: chunked",
             b"Transfer-Encoding: gzip"]
_BODIES = [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"-5\r\nhello\r\n", b"zz\r\n",
           b"0\r\n\r\n", b"5\r\nhello", b"ffffffffffffffffffff\r\n",
           b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\n\r\n"]


@st.composite
def wire_replies(draw):
    """Reply bytes near what a service might send: a status line, often
    a good answer's headers, other header lines (odd ones, arbitrary
    bytes), a framing header, a line end, the blank line, a body, and
    now and then all of it cut anywhere."""
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"]))
    lines = [draw(st.one_of(st.sampled_from(_STATUS_LINES), st.binary(max_size=20)))]
    if draw(st.booleans()):
        lines += OK_HEADERS.split(b"\r\n")[:3]
    lines += draw(st.lists(st.one_of(st.sampled_from(_HEADER_LINES),
                                     st.binary(max_size=40).filter(lambda b: b"\n" not in b)),
                           max_size=4))
    framing = draw(st.sampled_from(_FRAMINGS))
    if framing:
        lines.append(framing)
    reply = eol.join(lines) + eol + eol
    reply += draw(st.one_of(st.sampled_from(_BODIES), st.binary(max_size=60)))
    if draw(st.integers(0, 2)) == 0:
        reply = reply[:draw(st.integers(0, len(reply)))]
    return reply


@st.composite
def bodies(draw):
    """A good answer's headers with a framing header and a body near
    what that framing expects: chunks whose sizes may be negative, huge,
    not hex or wrong, lengths that lie."""
    chunked = b"Transfer-Encoding: chunked"
    framing = draw(st.one_of(st.just(chunked), st.sampled_from(_FRAMINGS)))
    size = st.one_of(st.sampled_from([b"-5", b"-1", b"0", b"", b"zz", b"5;ext=1", b" 5",
                                      b"ffffffffffffffffffff"]),
                     st.integers(0, 300).map(lambda n: b"%x" % n))
    chunk = st.tuples(size, st.binary(max_size=40)).map(lambda c: c[0] + b"\r\n" + c[1] + b"\r\n")
    body = b"".join(draw(st.lists(chunk, max_size=4)))
    if draw(st.booleans()):
        body += b"0\r\n\r\n"
    if draw(st.booleans()):
        body = draw(st.binary(max_size=60))
    headers = OK_HEADERS + (framing + b"\r\n" if framing else b"")
    return http(b"HTTP/1.1 200 OK", headers, body)


@pytest.fixture(scope="module")
def fuzzed_service():
    server = RawHTTPServer(b"", keep_alive=True)
    client = AuthClient(("127.0.0.1", server.port, "/auth"), 0.25)
    yield server, client
    client.close()
    server.close()


GOOD = http(b"HTTP/1.1 200 OK", b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
            b"Auth-Port: 2525\r\nContent-Length: 0\r\n")


# The header-content fuzzer (one reply per connection) is test_fuzz.py's
# test_an_auth_reply_on_the_wire_is_an_answer_or_an_auth_service_error; this
# one is about framing and bodies on a kept connection, with this module's
# keep-alive server.  MAILPROXY_FUZZ_SCALE multiplies it as it does those.
FUZZ = settings(max_examples=60 * int(os.environ.get("MAILPROXY_FUZZ_SCALE", "1")),
                deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(reply=st.one_of(wire_replies(), bodies()))
def test_any_reply_on_the_wire_is_an_answer_or_an_error_and_the_next_login_gets_its_own(
        fuzzed_service, reply):
    """Whatever bytes come back (within the deadline or cut by it), ask()
    returns an AuthReply or raises AuthServiceError, never anything else;
    and whatever they left on a kept connection, the next login's request
    gets the answer the service gave it.  Half the examples are whole
    replies with odd bodies: the answer stands whatever the body."""
    server, client = fuzzed_service
    server.reply = reply
    try:
        assert isinstance(client.ask(plain_request()), AuthReply)
    except AuthServiceError:
        pass
    server.reply = GOOD
    assert client.ask(plain_request(login=b"ann")).port == 2525
