"""`error_log ... debug`: every step of a session is a [debug] line, and no
secret is one of them.

One login per protocol, over real loopback sockets, through a scripted auth
service and backend (tests/fakes.py) to a relay that ends; then the
session's [debug] lines are read back in order.
"""

import base64
import re
import socket

import pytest

from fakes import ScriptedAuthService, ScriptedBackend, ok
from harness import Client, RunningProxy, wait_until

PASSWORD = b"Deb0g-s3cret"
DEBUG = re.compile(r"\[debug\] \d+#\d+: \*\d+ (.*?) while ")


@pytest.fixture
def auth():
    with ScriptedAuthService() as service:
        yield service


def debug_lines(proxy):
    """The sessions' [debug] messages, in order, once the session is done."""
    assert wait_until(lambda: "session done" in proxy.log()), proxy.log()
    return DEBUG.findall(proxy.log())


def start(tmp_path, auth, protocol):
    return RunningProxy(tmp_path, level="debug", servers=(f"protocol {protocol};",),
                        mail=f"auth_http {auth.url};\nserver_name mx.test;")


def run_to_relay_end(tmp_path, auth, protocol, backend_steps, dialogue):
    """Log in through the proxy, relay one line each way, let the backend
    end the relay; the session's debug lines and the backend's port."""
    relayed = [("expect", b"c NOOP\r\n"), ("send", b"bye\r\n")]
    with ScriptedBackend(backend_steps + relayed) as backend:
        auth.reply = ok("127.0.0.1", backend.port)
        proxy = start(tmp_path, auth, protocol)
        with Client(proxy.port) as client:
            dialogue(client)
            client.send(b"c NOOP\r\n")
            assert client.line() == b"bye\r\n"
            assert client.closed()
        lines = debug_lines(proxy)
        log = proxy.log()
        proxy.stop()
    assert PASSWORD.decode() not in log
    assert base64.b64encode(b"\0joe\0" + PASSWORD).decode() not in log
    return lines, backend.port


def test_an_imap_login_is_logged_step_by_step(tmp_path, auth):
    def dialogue(client):
        client.line()
        client.send(b"a CAPABILITY\r\n")
        client.lines(2)
        client.send(b"b LOGIN joe " + PASSWORD + b"\r\n")
        assert client.line() == b"b OK in\r\n"

    steps = [("send", b"* OK ready\r\n"), ("expect", b"b LOGIN {3}\r\n"), ("send", b"+ OK\r\n"),
             ("expect", b"joe {12}\r\n"), ("send", b"+ OK\r\n"),
             ("expect", PASSWORD + b"\r\n"), ("send", b"b OK in\r\n")]
    lines, port = run_to_relay_end(tmp_path, auth, "imap", steps, dialogue)
    assert lines == [
        "client command CAPABILITY in start state",
        "client command LOGIN in start state",
        "in http auth state",
        "auth http request sent: plain, attempt 1",
        f'auth http server answered "OK", backend 127.0.0.1:{port}',
        "connecting to upstream",
        "upstream connected",
        "reading response from upstream",
        "sending login command to upstream",
        "sending user name to upstream",
        "sending password to upstream",
        "reading response from upstream",
        "proxying",
        "relay started (SpliceRelay), 0 pipelined bytes first",
        "relay done: 8 bytes from the client, 5 from the backend, closed by backend",
    ]


def test_a_pop3_sasl_login_is_logged_without_its_answer(tmp_path, auth):
    def dialogue(client):
        client.line()
        client.send(b"AUTH PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        client.send(base64.b64encode(b"\0joe\0" + PASSWORD) + b"\r\n")
        assert client.line() == b"+OK in\r\n"

    steps = [("send", b"+OK ready\r\n"), ("expect", b"USER joe\r\n"), ("send", b"+OK\r\n"),
             ("expect", b"PASS " + PASSWORD + b"\r\n"), ("send", b"+OK in\r\n")]
    lines, _ = run_to_relay_end(tmp_path, auth, "pop3", steps, dialogue)
    assert lines[:3] == ["client command AUTH in start state", "in http auth state",
                         "auth http request sent: plain, attempt 1"]
    assert "sending password to upstream" in lines
    assert lines[-1].startswith("relay done: ")


def test_an_smtp_login_is_logged_step_by_step(tmp_path, auth):
    def dialogue(client):
        client.line()
        client.send(b"EHLO client.test\r\n")
        while client.line()[3:4] == b"-":
            pass
        client.send(b"AUTH PLAIN " + base64.b64encode(b"\0joe\0" + PASSWORD) + b"\r\n")
        assert client.line() == b"235 2.0.0 OK\r\n"

    steps = [("send", b"220 backend\r\n"), ("expect", b"EHLO mx.test\r\n"),
             ("send", b"250 backend\r\n"), ("recv_line",), ("send", b"250 ok\r\n"),
             ("recv_line",), ("send", b"250 ok\r\n")]
    lines, _ = run_to_relay_end(tmp_path, auth, "smtp", steps, dialogue)
    assert lines[:2] == ["client command EHLO in start state",
                         "client command AUTH in start state"]
    assert "sending xclient to upstream" in lines
    assert lines[-2:-1] == ["relay started (SpliceRelay), 0 pipelined bytes first"]


def test_an_info_log_has_none_of_them(tmp_path, auth):
    proxy = RunningProxy(tmp_path, level="info", mail=f"auth_http {auth.url};")
    with Client(proxy.port) as client:
        client.line()
        client.send(b"a NOOP\r\n")
        client.line()
        client.sock.shutdown(socket.SHUT_WR)
        assert client.closed()
    assert wait_until(lambda: "session done" in proxy.log())
    proxy.stop()
    assert "[debug]" not in proxy.log()
