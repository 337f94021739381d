"""The client's close ends the session while it waits on someone else.

While the auth service is asked (up to `auth_http_timeout`) and while the
backend logs in (up to `timeout`), the session watches the client's raw
socket for its close (stream.wait_readable; SECURITY.md, "Deadlines, phase
by phase").  Here both deadlines are 30 s and the peers hold their answers,
so a session that did not watch would still be waiting when each test has
long given up (its reads are bounded at 10 s): a close (FIN or reset, in
clear text or under TLS) must end the session with "client closed
connection" and `closed by client`, and close the connection to the auth
service or the backend, which sees the proxy's end.  Bytes the client
pipelines meanwhile are no close, and a cut auth request is never reused.

The auth service here is a bare listening socket the test answers by hand,
so the test knows when a request is in and sees the proxy close it.
"""

import re
import socket
import ssl
import struct

import pytest

from fakes import ScriptedBackend
from harness import Client, RunningProxy, free_port, wait_until
from test_faults import BACKEND_LOGIN

pytest_plugins = ("certs",)

LOOPBACK = "127.0.0.1"
HELD = 30                   # `timeout` and `auth_http_timeout`: never reached here
READ_LIMIT = 10             # the longest any read of this test waits
LOGIN = b"a LOGIN joe secret\r\n"
HALF_REPLY = b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\n"     # no blank line: not done
HOLD_GREETING = [("recv", 1)]                               # says nothing, reads on
HOLD_REPLY = BACKEND_LOGIN["imap"][:2] + [("recv", 1)]      # the greeting, then silence
LOGIN_THEN_ECHO = BACKEND_LOGIN["imap"] + [("echo",)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, certs):
    """The proxy (a clear-text and a TLS listener), its auth listener."""
    auth = socket.create_server((LOOPBACK, 0))
    auth.settimeout(READ_LIMIT)
    tls_port = free_port()
    proxy = RunningProxy(
        tmp_path_factory.mktemp("gone"),
        mail=f"timeout {HELD}s;\nauth_http_timeout {HELD}s;\n"
             f"auth_http http://{LOOPBACK}:{auth.getsockname()[1]}/auth;\n"
             f"ssl_certificate {certs.rsa.cert};\nssl_certificate_key {certs.rsa.key};",
        servers=(f"protocol imap;\nlisten {LOOPBACK}:{tls_port} ssl;",))
    yield proxy, auth, tls_port, certs
    try:
        assert wait_until(lambda: not proxy.session_threads()), "a session thread is left"
    finally:
        proxy.stop()
        auth.close()


def take_request(auth):
    """Accept the proxy's connection and read one auth request from it."""
    conn, _ = auth.accept()
    conn.settimeout(READ_LIMIT)
    request = b""
    while b"\r\n\r\n" not in request:
        data = conn.recv(4096)
        assert data, f"the proxy closed inside its request: {request!r}"
        request += data
    return conn


def answer(conn, **headers):
    """A whole reply, then the close (no keep-alive: every request here
    comes on a connection of its own)."""
    fields = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    conn.sendall(f"HTTP/1.1 200 OK\r\n{fields}Content-Length: 0\r\nConnection: close\r\n\r\n"
                 .encode())
    conn.close()


def closed_by_proxy(conn):
    """True once the proxy closed `conn` (FIN or reset), within READ_LIMIT."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        conn.close()


def connect(setup, tls):
    """A client greeted by the proxy, in clear text or over TLS; the raw
    socket under TLS too (to close it)."""
    proxy, _, tls_port, certs = setup
    if not tls:
        client = Client(proxy.port, timeout=READ_LIMIT)
        assert client.line().startswith(b"* OK")
        return client
    sock = socket.create_connection((LOOPBACK, tls_port), timeout=READ_LIMIT)
    context = ssl.create_default_context(cafile=certs.ca.cert)
    client = Client.__new__(Client)
    client.sock = context.wrap_socket(sock, server_hostname="localhost")
    client.file = client.sock.makefile("rb")
    assert client.line().startswith(b"* OK")
    return client


def hang_up(client, how):
    """The client goes: a FIN, or a reset (SO_LINGER 0)."""
    if how == "reset":
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def summary_of(proxy, port):
    """The session's summary line (its client port names it)."""
    pattern = re.compile(rf"session done: client {LOOPBACK}:{port},.*")
    found = wait_until(lambda: pattern.search(proxy.log()), timeout=READ_LIMIT)
    assert found, proxy.log()
    return found.group(0)


def assert_ended_by_client(proxy, port):
    summary = summary_of(proxy, port)
    assert ", closed by client while " in summary, summary
    conn = re.search(r"\*(\d+) [^\n]*session done: client " + re.escape(f"{LOOPBACK}:{port},"),
                     proxy.log()).group(1)
    assert re.search(rf"\*{conn} client closed connection", proxy.log()), proxy.log()
    return summary


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
@pytest.mark.parametrize("how", ["fin", "reset"])
def test_a_close_during_the_auth_request_ends_the_session(setup, tls, how):
    """The auth service has sent half its headers and holds the rest."""
    proxy, auth, _, _ = setup
    client = connect(setup, tls)
    port = client.sock.getsockname()[1]
    client.send(LOGIN)
    conn = take_request(auth)
    conn.sendall(HALF_REPLY)
    hang_up(client, how)
    assert closed_by_proxy(conn), "the auth connection is still open"
    summary = assert_ended_by_client(proxy, port)
    assert "while in http auth state" in summary, summary


def test_the_next_login_after_a_cut_auth_request_gets_its_own_answer(setup):
    proxy, auth, _, _ = setup
    client = connect(setup, False)
    client.send(LOGIN)
    held = take_request(auth)
    held.sendall(HALF_REPLY)
    hang_up(client, "fin")
    assert closed_by_proxy(held)
    with ScriptedBackend(LOGIN_THEN_ECHO) as backend:
        client = connect(setup, False)
        client.send(LOGIN)
        answer(take_request(auth), Auth_Status="OK", Auth_Server=LOOPBACK,
               Auth_Port=backend.port)
        assert client.line() == b"a OK done\r\n"
        client.send(b"b NOOP\r\n")
        assert client.line() == b"b NOOP\r\n"       # through the relay, echoed
        client.close()
        assert not backend.errors


@pytest.mark.parametrize("script", [HOLD_GREETING, HOLD_REPLY], ids=["greeting", "reply"])
@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_close_during_the_backend_login_ends_the_session(setup, script, tls):
    """The backend holds its greeting, or its answer to the LOGIN."""
    proxy, auth, _, _ = setup
    with ScriptedBackend(script, io_timeout=2 * HELD) as backend:
        client = connect(setup, tls)
        port = client.sock.getsockname()[1]
        client.send(LOGIN)
        answer(take_request(auth), Auth_Status="OK", Auth_Server=LOOPBACK,
               Auth_Port=backend.port)
        if script is HOLD_REPLY:      # the proxy is at the login: it has sent "a LOGIN {3}"
            assert wait_until(lambda: b"\n" in b"".join(backend.received),
                              timeout=READ_LIMIT)
        else:
            backend.wait_connections(1, timeout=READ_LIMIT, finished=False)
        hang_up(client, "fin")
        [record] = backend.wait_connections(1, timeout=READ_LIMIT)
        assert record.error.startswith("EOFError: 1 bytes expected"), record.error
    summary = assert_ended_by_client(proxy, port)
    assert f"backend {LOOPBACK}:{backend.port}" in summary, summary


def test_pipelined_bytes_during_the_waits_are_no_close(setup):
    """A client that sends its next command while the auth service is
    asked is kept; the command reaches the backend after the login."""
    proxy, auth, _, _ = setup
    with ScriptedBackend(LOGIN_THEN_ECHO) as backend:
        client = connect(setup, False)
        client.send(LOGIN)
        conn = take_request(auth)
        client.send(b"b NOOP\r\n")
        answer(conn, Auth_Status="OK", Auth_Server=LOOPBACK, Auth_Port=backend.port)
        assert client.line() == b"a OK done\r\n"
        assert client.line() == b"b NOOP\r\n"
        client.close()
        assert not backend.errors
