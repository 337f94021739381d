"""IMAP past the credentials: the auth service, the backend login, the relay.

The auth service and misbehaving backends are the scripted fakes of
fakes.py (they record every byte they get); well-behaved peers are the real
ones: Python's imaplib and curl as clients, Dovecot as the backend.  Spec
sections 2.2-2.5 (auth_http), 4.2 and 4.5 (IMAP backend login) and 4.6
(relay) are the reference; reply texts come from mailproxy.imap.
"""

import base64
import hashlib
import hmac
import imaplib
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

import fakes
import peers
from conftest import USERS
from fakes import Hang, ScriptedAuthService, ScriptedBackend
from harness import RunningProxy, free_port, open_fds, wait_until
from imap_client import assert_serving, greeted, ok
from mailproxy.backend import imap_login
from mailproxy.imap import INTERNAL_ERROR, INVALID
from mailproxy.ops.splice import BURST_GAP
from mailproxy.login import MAX_WAIT_RETRIES
from mailproxy.stream import Stream
from transcript import b64

BACKEND_OK = b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
BIG = 4 * 1024 * 1024           # bytes each way in the relay tests


def login_steps(tag=b"a", login=b"joe", password=b"secret", greeting=b"* OK Dovecot ready\r\n",
                result=None):
    """A backend that checks the LOGIN the proxy replays (spec 4.2)."""
    return [("send", greeting),
            ("expect", tag + b" LOGIN {%d}\r\n" % len(login)),
            ("send", b"+ OK\r\n"),
            ("expect", login + b" {%d}\r\n" % len(password)),
            ("send", b"+ OK\r\n"),
            ("expect", password + b"\r\n"),
            ("send", result if result is not None else tag + BACKEND_OK[1:])]


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def start(tmp_path):
    """start(settings, auth=URL) -> a RunningProxy serving IMAP with those
    `mail {}` settings; every proxy started is stopped after the test."""
    started = []

    def start(settings="", auth=None):
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        auth = auth or f"127.0.0.1:{free_port()}/auth"
        mail = f"server_name mx.test;\nauth_http {auth};\n{settings}"
        proxy = RunningProxy(directory, mail=mail)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def auth():
    with ScriptedAuthService(fakes.fail("Invalid login or password")) as service:
        yield service


@pytest.fixture
def backend():
    """backend(steps) -> a ScriptedBackend, closed after the test."""
    started = []

    def backend(script):
        started.append(ScriptedBackend(script))
        return started[-1]

    yield backend
    for fake in started:
        fake.close()


@pytest.fixture
def through(start, auth, backend):
    """through(steps, settings) -> (proxy, backend): the auth service sends
    every login to a scripted backend playing `steps`."""
    def through(steps, settings="", **reply):
        fake = backend(steps)
        auth.reply = fakes.ok(fake.host, fake.port, **reply)
        return start(settings, auth=auth.url), fake
    return through


def header_lines(request):
    """The request's header lines, as text, without the request line."""
    return request.raw.decode("latin-1").split("\r\n")[1:-2]


# ------------------------------------------------- the auth service's view

def test_login_request_carries_nginx_headers_in_order(start, auth):
    proxy = start('auth_http_header X-Secret "s3 cr3t";', auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a NO Invalid login or password\r\n"
        client_port = client.sock.getsockname()[1]
    [request] = auth.requests
    assert request.raw.startswith(b"GET /auth HTTP/1.1\r\n")     # keep-alive: beyond nginx
    assert header_lines(request) == ["Host: 127.0.0.1",
                                     "Auth-Method: plain",
                                     "Auth-User: joe",
                                     "Auth-Pass: secret",
                                     "Auth-Protocol: imap",
                                     "Auth-Login-Attempt: 1",
                                     "Client-IP: 127.0.0.1",
                                     f"Client-Port: {client_port}",     # beyond nginx:
                                     "Server-IP: 127.0.0.1",            # the three after
                                     f"Server-Port: {proxy.port}",      # nginx's own
                                     "X-Secret: s3 cr3t"]


def test_user_and_password_are_escaped(start, auth):
    """Control bytes, space and % become %XX; '"', '+' and UTF-8 go raw."""
    with greeted(start(auth=auth.url)) as client:
        client.send(b'a LOGIN "us er+=\xc3\xa9" {9}\r\n')
        assert client.line() == b"+ OK\r\n"
        client.send(b'p w"%\rx\tz\r\n')
        assert client.line() == b"a NO Invalid login or password\r\n"
    raw = auth.requests[0].raw
    assert b"\r\nAuth-User: us%20er+=\xc3\xa9\r\n" in raw
    assert b'\r\nAuth-Pass: p%20w"%25%0Dx%09z\r\n' in raw


def test_cram_md5_request_has_salt_and_digest(start, auth):
    proxy = start("imap_auth cram-md5;", auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"a AUTHENTICATE CRAM-MD5\r\n")
        challenge = client.line()
        salt = base64.b64decode(challenge[2:-2])
        digest = hmac.new(b"secret", salt, hashlib.md5).hexdigest()
        client.send(b64(b"joe " + digest.encode()) + b"\r\n")
        assert client.line() == b"a NO Invalid login or password\r\n"
        client_port = client.sock.getsockname()[1]
    assert header_lines(auth.requests[0]) == ["Host: 127.0.0.1",
                                              "Auth-Method: cram-md5",
                                              "Auth-User: joe",
                                              f"Auth-Pass: {digest}",
                                              f"Auth-Salt: {salt.decode()}",
                                              "Auth-Protocol: imap",
                                              "Auth-Login-Attempt: 1",
                                              "Client-IP: 127.0.0.1",
                                              f"Client-Port: {client_port}",
                                              "Server-IP: 127.0.0.1",
                                              f"Server-Port: {proxy.port}"]


def test_refusal_is_a_tagged_no_then_close(start, auth):
    auth.reply = fakes.fail("Temporary problem, try later")
    proxy = start(auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"x7 LOGIN joe secret\r\n")
        assert client.line() == b"x7 NO Temporary problem, try later\r\n"
        assert client.closed()
    assert_serving(proxy)


def test_refusal_with_auth_wait_delays_then_lets_the_client_retry(through, auth):
    proxy, fake = through(login_steps(tag=b"b"))
    auth.reply = fakes.sequence(fakes.fail("Invalid login or password", wait=1),
                                fakes.ok(fake.host, fake.port))
    with greeted(proxy) as client:
        began = time.monotonic()
        client.send(b"a LOGIN joe wrong\r\n")
        assert client.line() == b"a NO Invalid login or password\r\n"
        assert time.monotonic() - began >= 0.9
        client.send(b"b LOGIN joe secret\r\n")
        assert client.line() == b"b" + BACKEND_OK[1:]
    attempts = [r.header("Auth-Login-Attempt") for r in auth.wait_requests(2)]
    assert attempts == ["1", "2"]
    fake.wait_connections(1)
    assert not fake.errors


def test_commands_sent_during_auth_wait_are_answered_after_it(start, auth):
    auth.reply = fakes.fail("Invalid login or password", wait=1)
    with greeted(start(auth=auth.url)) as client:
        client.send(b"a LOGIN joe wrong\r\nb NOOP\r\n")
        assert client.lines(2) == [b"a NO Invalid login or password\r\n", ok(b"b")]


def test_timeout_is_rearmed_after_auth_wait(start, auth):
    """Spec 2.5: after the delayed refusal the client has a new `timeout`."""
    auth.reply = fakes.fail("Invalid login or password", wait=1)
    with greeted(start("timeout 500ms;", auth=auth.url)) as client:
        time.sleep(0.3)
        client.send(b"a LOGIN joe wrong\r\n")
        assert client.line() == b"a NO Invalid login or password\r\n"   # 1.3 s in
        client.send(b"b NOOP\r\n")
        assert client.line() == ok(b"b")
        assert client.closed()


def test_wait_then_ok_keeps_the_attempt_number(through, auth):
    proxy, fake = through(login_steps())
    auth.reply = fakes.sequence({"Auth-Status": "WAIT", "Auth-Wait": "0"},
                                {"Auth-Status": "WAIT"},
                                fakes.ok(fake.host, fake.port))
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
    assert [r.header("Auth-Login-Attempt") for r in auth.requests] == ["1", "1", "1"]


def test_wait_for_ever_ends_in_internal_error(start, auth):
    auth.reply = {"Auth-Status": "WAIT", "Auth-Wait": "0"}
    proxy = start(auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == INTERNAL_ERROR
        assert client.closed()
    assert len(auth.requests) == MAX_WAIT_RETRIES + 1
    assert_serving(proxy)


def test_client_leaving_during_wait_stops_the_questions(start, auth):
    auth.reply = {"Auth-Status": "WAIT", "Auth-Wait": "1"}
    proxy = start(auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        auth.wait_requests(1)
    proxy.wait_log("client closed connection")
    time.sleep(1.2)
    assert len(auth.requests) == 1


def test_client_leaving_with_a_full_buffer_during_auth_wait_is_noticed(start, auth):
    """A client that pipelines a whole command buffer and leaves during the
    Auth-Wait: the session ends when it leaves, not when the wait does."""
    auth.reply = fakes.fail("Invalid login or password", wait=30)
    proxy = start(auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe wrong\r\n")
        auth.wait_requests(1)
        client.send(b"b NOOP " + b"x" * 5000 + b"\r\n")       # more than imap_client_buffer
        time.sleep(0.3)
    began = time.monotonic()
    proxy.wait_log("client closed connection", timeout=5)
    assert time.monotonic() - began < 5
    assert wait_until(lambda: not proxy.session_threads(), timeout=2)


AUTH_SERVICE_FAILURES = {
    "silent": Hang(3),                                      # auth_http_timeout 1s
    "not http": b"garbage\r\n\r\n",
    "no blank line": b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n",
    "header with _": {"Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": "143",
                      "X_Bad": "1"},
    "server hostname": fakes.ok("localhost", 143),
    "port 0": fakes.ok("127.0.0.1", 0),
    "port 65536": fakes.ok("127.0.0.1", 65536),
    "port text": fakes.ok("127.0.0.1", "imap"),
    "no server": {"Auth-Status": "OK", "Auth-Port": "143"},
    "no port": {"Auth-Status": "OK", "Auth-Server": "127.0.0.1"},
    "headers over 1024 bytes": fakes.ok("127.0.0.1", 143, X_Pad="x" * 1100),
}


@pytest.mark.parametrize("reply", AUTH_SERVICE_FAILURES.values(), ids=AUTH_SERVICE_FAILURES)
def test_auth_service_failure_is_an_internal_error(start, auth, reply):
    auth.reply = reply
    proxy = start("auth_http_timeout 1s;", auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == INTERNAL_ERROR
        assert client.closed()
    assert_serving(proxy)


@pytest.mark.parametrize("settings, dialogue", [
    ("imap_auth cram-md5;", "cram-md5"),
    ("imap_auth external;", b"a AUTHENTICATE EXTERNAL " + b64(b"joe") + b"\r\n"),
    ("", b'a LOGIN joe ""\r\n'),
])
def test_no_password_for_the_backend_is_an_internal_error(start, auth, settings, dialogue):
    """CRAM-MD5, EXTERNAL or an empty password: the auth service must send
    Auth-Pass (spec 2.4)."""
    auth.reply = fakes.ok("127.0.0.1", free_port())
    proxy = start(settings, auth=auth.url)
    with greeted(proxy) as client:
        if dialogue == "cram-md5":
            client.send(b"a AUTHENTICATE CRAM-MD5\r\n")
            salt = base64.b64decode(client.line()[2:-2])
            dialogue = b64(b"joe " + hmac.new(b"secret", salt, hashlib.md5).hexdigest()
                           .encode()) + b"\r\n"
        client.send(dialogue)
        assert client.line() == INTERNAL_ERROR
        assert client.closed()
    proxy.wait_log("did not send password")


def test_auth_user_and_pass_overrides_reach_the_backend(through, auth):
    proxy, fake = through(login_steps(login=b"be_joe", password=b"be pw%20"),
                          Auth_User="be_joe", Auth_Pass="be pw%20")
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
    fake.wait_connections(1)
    assert not fake.errors


def test_cram_md5_logs_in_with_the_auth_service_password(through, auth):
    proxy, fake = through(login_steps(), "imap_auth cram-md5;", Auth_Pass="secret")
    with greeted(proxy) as client:
        client.send(b"a AUTHENTICATE CRAM-MD5\r\n")
        salt = base64.b64decode(client.line()[2:-2])
        digest = hmac.new(b"secret", salt, hashlib.md5).hexdigest().encode()
        client.send(b64(b"joe " + digest) + b"\r\n")
        assert client.line() == BACKEND_OK
    fake.wait_connections(1)
    assert not fake.errors


# ------------------------------------------------------- backend login

def test_backend_receives_login_as_synchronizing_literals(through):
    proxy, fake = through(login_steps(tag=b"A1.x") + [("expect", b"A2 SELECT INBOX\r\n")])
    with greeted(proxy) as client:
        client.send(b"A1.x LOGIN joe secret\r\n")
        assert client.line() == b"A1.x" + BACKEND_OK[1:]
        client.send(b"A2 SELECT INBOX\r\n")
    fake.wait_connections(1)
    assert not fake.errors
    assert fake.received[0] == (b"A1.x LOGIN {3}\r\njoe {6}\r\nsecret\r\n"
                                b"A2 SELECT INBOX\r\n")


CAPABLE_GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR %s ID] Dovecot ready.\r\n"


@pytest.mark.parametrize("capability", [b"LITERAL+", b"literal+", b"LITERAL-"])
def test_backend_announcing_non_synchronizing_literals_gets_the_login_in_one_write(
        through, capability):
    """Beyond nginx: RFC 7888 lets the whole LOGIN go at once, one round
    trip instead of three."""
    proxy, fake = through([("send", CAPABLE_GREETING % capability),
                           ("expect", b"a LOGIN {3+}\r\n"), ("expect", b"joe {6+}\r\n"),
                           ("expect", b"secret\r\n"), ("send", BACKEND_OK),
                           ("expect", b"b NOOP\r\n")])
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        client.send(b"b NOOP\r\n")
    fake.wait_connections(1)
    assert not fake.errors
    assert fake.received[0] == b"a LOGIN {3+}\r\njoe {6+}\r\nsecret\r\nb NOOP\r\n"


def test_literal_minus_over_4096_bytes_falls_back_to_synchronizing_literals(through):
    password = b"p" * 4097
    proxy, fake = through(login_steps(password=password, greeting=CAPABLE_GREETING % b"LITERAL-"),
                          "imap_client_buffer 8k;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe {4097}\r\n")
        assert client.line() == b"+ OK\r\n"
        client.send(password + b"\r\n")
        assert client.line() == BACKEND_OK
    fake.wait_connections(1)
    assert not fake.errors


@pytest.mark.parametrize("greeting", [
    b"* OK Dovecot ready LITERAL+\r\n",                  # not a CAPABILITY code
    b"* OK [CAPABILITY IMAP4rev1 LITERAL+X] ready\r\n",   # not the capability
    b"* OK [CAPABILITY IMAP4rev1\r\n",                   # unterminated
])
def test_other_greetings_get_synchronizing_literals(through, greeting):
    proxy, fake = through(login_steps(greeting=greeting))
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
    fake.wait_connections(1)
    assert not fake.errors


def test_a_greeting_before_starttls_is_not_trusted_for_non_synchronizing_literals():
    """proxy_starttls: what the clear-text greeting claimed may have been
    forged, so the login after STARTTLS uses synchronizing literals."""
    ours, backend = socket.socketpair()
    with ours, backend:
        ours.setblocking(False)
        backend.sendall(CAPABLE_GREETING % b"LITERAL+" + b"a OK begin TLS\r\n")
        stream = Stream(ours)
        stream.set_deadline(5)
        result = imap_login(stream, b"a", b"joe", b"secret", 4096,
                            starttls=lambda: backend.sendall(b"+ OK\r\n+ OK\r\na OK in\r\n"))
        assert result == b"a OK in\r\n"
        backend.settimeout(5)
        received = b""
        while not received.endswith(b"secret\r\n"):
            received += backend.recv(4096)
        assert received == b"a STARTTLS\r\na LOGIN {3}\r\njoe {6}\r\nsecret\r\n"


def test_one_untagged_line_before_the_tagged_ok_is_forwarded(through):
    untagged = b"* CAPABILITY IMAP4rev1 IDLE MOVE\r\n"
    proxy, fake = through(login_steps(result=untagged + b"a OK Logged in\r\n"))
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.lines(2) == [untagged, b"a OK Logged in\r\n"]


def test_backend_bytes_after_the_ok_are_forwarded(through):
    proxy, fake = through(login_steps(result=BACKEND_OK + b"* 3 EXISTS\r\n"))
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.lines(2) == [BACKEND_OK, b"* 3 EXISTS\r\n"]


BACKEND_FAILURES = {
    "preauth greeting": [("send", b"* PREAUTH ready\r\n"), ("sleep", 2)],
    "bye greeting": [("send", b"* BYE go away\r\n")],
    "garbage greeting": [("send", b"HTTP/1.0 400 Bad Request\r\n"), ("sleep", 2)],
    "closes at once": [("close",)],
    "reset at once": [("reset",)],
    "no continuation": login_steps()[:2] + [("send", b"a NO LOGIN not allowed\r\n"),
                                            ("sleep", 2)],
    "closes mid-login": login_steps()[:4] + [("close",)],
    "refuses the password": login_steps(result=b"a NO [AUTHENTICATIONFAILED] failed\r\n")
    + [("sleep", 2)],
    "two untagged lines": login_steps(result=b"* CAPABILITY X\r\n* OK more\r\na OK\r\n")
    + [("sleep", 2)],
    "wrong tag": login_steps(result=b"b OK Logged in\r\n") + [("sleep", 2)],
    "silent": [("sleep", 3)],                               # timeout 1s
    "overlong line": [("send", b"* OK " + b"x" * 5000 + b"\r\n"), ("sleep", 2)],
}


@pytest.mark.parametrize("steps", BACKEND_FAILURES.values(), ids=BACKEND_FAILURES)
def test_backend_failure_is_an_internal_error(through, steps):
    proxy, fake = through(steps, "timeout 1s;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == INTERNAL_ERROR
        assert client.closed()
    assert_serving(proxy)


def test_backend_refused_connection_is_an_internal_error(start, auth):
    auth.reply = fakes.ok("127.0.0.1", free_port())
    proxy = start(auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == INTERNAL_ERROR
        assert client.closed()
    assert_serving(proxy)


@pytest.mark.parametrize("steps, shown", [
    (login_steps(result=b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
     b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
    ([("send", b"* PREAUTH ready\r\n")], b"* PREAUTH ready\r\n"),
    ([("send", b"* BYE [UNAVAILABLE] maintenance\r\n")],
     b"* BYE [UNAVAILABLE] maintenance\r\n"),
])
def test_proxy_pass_error_message_shows_the_backend_reply(through, steps, shown):
    proxy, fake = through(steps + [("sleep", 2)], "proxy_pass_error_message on;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == shown
        assert client.closed()


def test_proxy_pass_error_message_shows_the_untagged_line_too(through):
    """Spec 4.5: the whole reply from the start of the buffer, as nginx
    1.27.3+ has it once an untagged line may come first."""
    refusal = b"* CAPABILITY IMAP4rev1\r\na NO [AUTHENTICATIONFAILED] failed\r\n"
    proxy, fake = through(login_steps(result=refusal) + [("sleep", 2)],
                          "proxy_pass_error_message on;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.lines(2) == refusal.splitlines(keepends=True)
        assert client.closed()


def test_proxy_pass_error_message_does_not_apply_to_a_close(through):
    proxy, fake = through(login_steps()[:4] + [("close",)], "proxy_pass_error_message on;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == INTERNAL_ERROR
        assert client.closed()


# ----------------------------------------------------------------- relay

def test_pipelined_command_reaches_the_backend_after_login(through):
    """Spec 3.0 [live]: `a LOGIN ...\\r\\nc NOOP\\r\\n` in one send."""
    proxy, fake = through(login_steps() + [("expect", b"c NOOP\r\n"),
                                           ("send", b"c OK NOOP completed\r\n")])
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\nc NOOP\r\n")
        assert client.lines(2) == [BACKEND_OK, b"c OK NOOP completed\r\n"]
    fake.wait_connections(1)
    assert not fake.errors


def test_relay_upload_is_byte_exact(through):
    data = os.urandom(BIG)
    proxy, fake = through(login_steps() + [("sink",)])
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        client.send(data)
        client.sock.shutdown(socket.SHUT_WR)
        assert client.file.read() == b""        # the backend's end follows ours
    [record] = fake.wait_connections(1)
    assert (record.sink_size, record.sink_sha256) == (BIG, hashlib.sha256(data).hexdigest())


def test_relay_download_is_byte_exact(through):
    data = os.urandom(BIG)
    proxy, fake = through(login_steps() + [("send", data), ("close",)])
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        received = client.file.read()
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()
    proxy.wait_log("closed by backend")


def test_relay_both_ways_at_once_is_byte_exact(through):
    data = os.urandom(BIG)
    proxy, fake = through(login_steps() + [("echo",)])
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK

        def upload():
            client.sock.sendall(data)
            client.sock.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=upload, name="test upload")
        sender.start()
        received = client.file.read()
        sender.join(10)
    assert len(received) == BIG
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()


def test_half_close_still_delivers_the_backend_reply(through):
    """Deliberately unlike nginx (spec 4.6): the client's EOF is passed on
    and what the backend still sends arrives."""
    proxy, fake = through(login_steps() + [("expect", b"c LOGOUT\r\n"), ("sink",),
                                           ("send", b"* BYE\r\nc OK LOGOUT completed\r\n")])
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        client.send(b"c LOGOUT\r\n")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.lines(2) == [b"* BYE\r\n", b"c OK LOGOUT completed\r\n"]
        assert client.closed()
    [record] = fake.wait_connections(1)
    assert record.sink_size == 0 and not fake.errors


def test_backend_closing_ends_the_session(through):
    proxy, fake = through(login_steps() + [("send", b"* BYE shutting down\r\n"), ("close",)])
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.lines(2) == [BACKEND_OK, b"* BYE shutting down\r\n"]
        assert client.closed()
    proxy.wait_log("closed by backend")
    assert wait_until(lambda: not _session_threads())


def test_proxy_timeout_ends_an_idle_relay(through):
    proxy, fake = through(login_steps() + [("sleep", 5)], "proxy_timeout 500ms;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        began = time.monotonic()
        assert client.closed()
        assert 0.4 < time.monotonic() - began < 3
    proxy.wait_log("closed by timeout")


def test_relay_traffic_keeps_the_session_alive(through):
    proxy, fake = through(login_steps() + [("echo",)], "proxy_timeout 1s;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        for number in range(4):             # 1.2 s in all, past proxy_timeout
            time.sleep(0.3)
            client.send(b"t%d NOOP\r\n" % number)
            assert client.line() == b"t%d NOOP\r\n" % number


# ------------------------------------------------ real clients and Dovecot

@pytest.fixture
def to_dovecot(start, auth, dovecot):
    """to_dovecot(settings, **reply) -> a proxy whose auth service sends
    every login to the real Dovecot (`reply` adds Auth-* headers)."""
    def to_dovecot(settings="", **reply):
        auth.reply = fakes.ok("127.0.0.1", dovecot.imap_port, **reply)
        return start(settings, auth=auth.url)
    return to_dovecot


def imap_client(proxy):
    return imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)


def test_imaplib_login_select_logout(to_dovecot):
    client = imap_client(to_dovecot())
    assert client.capabilities == ("IMAP4", "IMAP4REV1", "UIDPLUS", "AUTH=PLAIN")
    assert client.login("joe", USERS["joe"])[0] == "OK"
    assert client.select("INBOX", readonly=True)[0] == "OK"
    assert client.logout()[0] == "BYE"


def test_imaplib_login_quotes_a_password_with_spaces(to_dovecot, auth):
    client = imap_client(to_dovecot())
    assert client.login("ann", USERS["ann"])[0] == "OK"
    client.logout()
    assert auth.requests[0].header("Auth-Pass") == USERS["ann"].replace(" ", "%20")


def test_imaplib_authenticate_plain(to_dovecot):
    client = imap_client(to_dovecot())
    typ, _ = client.authenticate("PLAIN", lambda _: f"\0joe\0{USERS['joe']}".encode())
    assert typ == "OK"
    assert client.select("INBOX", readonly=True)[0] == "OK"
    client.logout()


def test_imaplib_login_cram_md5(to_dovecot, auth):
    client = imap_client(to_dovecot("imap_auth plain cram-md5;", Auth_Pass=USERS["joe"]))
    assert "AUTH=CRAM-MD5" in client.capabilities
    assert client.login_cram_md5("joe", "cram-secret")[0] == "OK"
    client.logout()
    [request] = auth.requests
    salt = request.header("Auth-Salt").encode()
    assert request.header("Auth-Pass") == hmac.new(b"cram-secret", salt, "md5").hexdigest()


def test_dovecot_refusal_is_an_internal_error_by_default(to_dovecot):
    """The auth service says yes, Dovecot says no."""
    with greeted(to_dovecot()) as client:
        client.send(b"a LOGIN joe wrong\r\n")
        assert client.line() == INTERNAL_ERROR
        assert client.closed()


def test_dovecot_refusal_reaches_imaplib_with_proxy_pass_error_message(to_dovecot):
    client = imap_client(to_dovecot("proxy_pass_error_message on;"))
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login("joe", "wrong")
    client.shutdown()


def test_multi_megabyte_message_fetched_byte_exact(to_dovecot, dovecot):
    message = make_message(3 * 1024 * 1024, "imap-proxy-3mb")
    dovecot.add_message("joe", message)
    client = imap_client(to_dovecot())
    try:
        assert client.login("joe", USERS["joe"])[0] == "OK"
        client.select("INBOX", readonly=True)
        status, found = client.uid("SEARCH", "HEADER", "Message-ID", "<imap-proxy-3mb@test>")
        assert status == "OK" and len(found[0].split()) == 1
        status, data = client.uid("FETCH", found[0], "(BODY.PEEK[])")
        assert status == "OK"
        assert hashlib.sha256(data[0][1]).hexdigest() == hashlib.sha256(message).hexdigest()
    finally:
        client.logout()


@pytest.fixture
def curl():
    path = shutil.which("curl")
    if path is None:
        if peers.in_ci():
            pytest.fail("curl is not installed under CI", pytrace=False)
        pytest.skip("curl is not installed")
    return path


def test_curl_examine_and_fetch_by_uid(to_dovecot, dovecot, curl):
    message = make_message(64 * 1024, "imap-proxy-curl")
    dovecot.add_message("joe", message)
    proxy = to_dovecot()
    url = f"imap://joe:{USERS['joe']}@127.0.0.1:{proxy.port}/INBOX"
    examine = subprocess.run([curl, "-sS", "--max-time", "20", url, "-X", "EXAMINE INBOX"],
                             capture_output=True, timeout=30)
    assert examine.returncode == 0, examine.stderr
    assert b"EXISTS" in examine.stdout
    search = subprocess.run([curl, "-sS", "--max-time", "20", url, "-X",
                             "UID SEARCH HEADER Message-ID <imap-proxy-curl@test>"],
                            capture_output=True, timeout=30)
    assert search.returncode == 0, search.stderr
    uid = search.stdout.split()[-1].decode()
    fetch = subprocess.run([curl, "-sS", "--max-time", "20", f"{url};UID={uid}"],
                           capture_output=True, timeout=30)
    assert fetch.returncode == 0, fetch.stderr
    assert fetch.stdout == message


def make_message(size, name):
    """A message of about `size` bytes with CRLF lines and a unique Message-ID."""
    head = (f"From: a@test\r\nTo: joe@test\r\nSubject: {name}\r\n"
            f"Message-ID: <{name}@test>\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-=+!\r\n"
    return head + line * (size // len(line))


# ------------------------------------------------ nothing is left behind

def test_fast_stop_cuts_a_request_to_a_silent_auth_service(start, auth):
    """The request watches the client's socket, which a fast stop shuts:
    the session ends at once and says so (`auth_http_timeout` is 60 s)."""
    auth.reply = Hang(60)
    proxy = start("auth_http_timeout 60s;", auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        auth.wait_requests(1)
        proxy.stop()                        # harness: the proxy must be gone within 15 s
        assert client.closed()
    assert "closed by stop" in proxy.log()


def test_fast_stop_cuts_a_backend_connect_in_progress(start, auth):
    """A backend whose accept queue is full never answers the SYN, so the
    proxy's connect() waits (here `timeout 60s`).  The session holds that
    socket before connecting, and a fast stop's shutdown() ends the connect:
    the stop is over long before the timeout, and the session says so."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
        port = full.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        auth.reply = fakes.ok("127.0.0.1", port)
        proxy = start("timeout 60s;", auth=auth.url)
        with greeted(proxy) as client:
            client.send(b"a LOGIN joe secret\r\n")
            proxy.wait_log("connecting to upstream")
            proxy.stop()                    # harness: the proxy must be gone within 15 s
            assert client.closed()
        for filler in fillers:
            filler.close()
    assert "closed by stop" in proxy.log()


def test_fast_stop_cuts_an_auth_wait(start, auth):
    """A refusal with `Auth-Wait: 60`: the session sleeps, watching the
    client; a fast stop shuts the client's socket, which ends the wait."""
    auth.reply = fakes.fail("Invalid login or password", wait=60)
    proxy = start(auth=auth.url)
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe wrong\r\n")
        proxy.wait_log("client login failed")
        proxy.stop()                        # harness: the proxy must be gone within 15 s
        assert client.closed()
    assert "closed by stop" in proxy.log()


def test_fast_stop_cuts_a_relayed_session(through):
    proxy, fake = through(login_steps() + [("sleep", 5)])
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        began = time.monotonic()
        proxy.stop()
        assert time.monotonic() - began < 1
        assert client.closed()


def _pipes():
    """Pipe fds this process holds (the in-process proxy's splice pipes)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except FileNotFoundError:
            pass
    return count


def test_bulk_bursts_go_through_a_pipe_that_is_freed_between_bursts(through):
    """Plain-text bulk data moves by os.splice() through a pipe made for the
    burst (relay.py); the pipe is closed BURST_GAP after the burst, and the
    next burst gets a new one.  Every byte arrives, in order."""
    first, second = os.urandom(3 * BIG // 4), os.urandom(BIG // 2)
    proxy, fake = through(login_steps() + [("send", first), ("expect", b"c NOOP\r\n"),
                                           ("send", second), ("expect", b"d LOGOUT\r\n")])
    baseline = _pipes()
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        assert client.read(1) == first[:1]
        # The client reads no more for now: the copier waits with its pipe.
        assert wait_until(lambda: _pipes() == baseline + 2), (_pipes(), baseline)
        assert client.read(len(first) - 1) == first[1:]
        assert wait_until(lambda: _pipes() == baseline, timeout=BURST_GAP + 5)
        client.send(b"c NOOP\r\n")
        assert client.read(len(second)) == second
        client.send(b"d LOGOUT\r\n")
        assert client.closed()
    fake.wait_connections(1)
    assert not fake.errors
    assert wait_until(lambda: _pipes() == baseline, timeout=BURST_GAP + 5)


def _session_threads():
    return [t for t in threading.enumerate() if t.name.startswith("session")]


def test_burst_of_mixed_sessions_leaves_no_thread_or_descriptor(start, auth, backend):
    """50 sessions at once: logged in and relayed, refused, broken off.
    Afterwards every session thread is gone and every descriptor closed."""
    fake = backend(login_steps() + [("echo",)])
    auth.reply = (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
                  b"Auth-Port: %d\r\n\r\n" % fake.port)     # and close: no keep-alive pool
    proxy = start("max_errors 2;", auth=auth.url)
    assert_serving(proxy)
    baseline = open_fds()
    kinds = [_good_session, _bad_session, _abandoned_session, _dropped_in_relay]
    outcomes = []

    def run(kind):
        try:
            kind(proxy)
            outcomes.append(kind.__name__)
        except Exception as exc:            # reported below, with the kind
            outcomes.append(f"{kind.__name__}: {exc!r}")
    threads = [threading.Thread(target=run, args=(kinds[i % len(kinds)],),
                                name=f"test burst {i}") for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == sorted(kind.__name__ for kind in
                                      (kinds[i % len(kinds)] for i in range(50)))
    assert wait_until(lambda: not _session_threads(), timeout=10), _session_threads()
    assert wait_until(lambda: open_fds() <= baseline, timeout=10), (open_fds(), baseline)
    assert_serving(proxy)


def _good_session(proxy):
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        client.send(b"b LOGOUT\r\n")
        assert client.line() == b"b LOGOUT\r\n"     # the echo backend
        client.sock.shutdown(socket.SHUT_WR)
        assert client.closed()


def _bad_session(proxy):
    with greeted(proxy) as client:
        client.send(b"a SELECT INBOX\r\nb FETCH 1\r\n")
        assert client.lines(2) == [b"a " + INVALID + b"\r\n", b"b " + INVALID + b"\r\n"]
        assert client.closed()


def _abandoned_session(proxy):
    with greeted(proxy) as client:
        client.send(b"a LOGIN {10}\r\n")
        assert client.line() == b"+ OK\r\n"
        client.send(b"abc")


def _dropped_in_relay(proxy):
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == BACKEND_OK
        client.send(b"b IDLE\r\n")
        assert client.line() == b"b IDLE\r\n"

