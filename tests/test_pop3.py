"""POP3 through the proxy: transcripts of spec 3.2, the backend login of
4.3, and real clients (poplib, curl) against a real Dovecot.

Each test is a conversation on loopback: client lines in, the proxy's lines
out, byte for byte.  Reply texts come from mailproxy.pop3.
"""

import hashlib
import hmac
import poplib
import re
import shutil
import subprocess
import time

import pytest

from fakes import fail, ok, sequence
from harness import free_port
from mailproxy import pop3
from transcript import SERVER_NAME, auth_headers, b64, checking_auth

pytest_plugins = ("proxying",)     # start_proxy, shared_proxy, auth_service, backend

TIMESTAMP = re.compile(rb"<\d+\.\d+@" + re.escape(SERVER_NAME.encode()) + rb">")
DEFAULT_CAPA = (b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n"
                b"SASL PLAIN LOGIN\r\n.\r\n")


def greeted(proxy, index=0):
    """A client past the greeting; returns (client, greeting line)."""
    client = proxy.client(index)
    return client, client.line()


def read_until_dot(client):
    """A multi-line POP3 reply, up to and including the `.` line."""
    lines = []
    for _ in range(64):
        lines.append(client.line())
        if lines[-1] in (b".\r\n", b""):
            return b"".join(lines)
    raise AssertionError(f"no end of multi-line reply: {lines}")


# ------------------------------------------------------------ greeting

def test_greeting_without_timestamp_by_default(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    with proxy.client() as client:
        assert client.line() == pop3.GREETING + b"\r\n" == b"+OK POP3 ready\r\n"


@pytest.mark.parametrize("methods", ["plain apop", "plain cram-md5"])
def test_greeting_carries_the_apop_timestamp_when_a_digest_may_follow(shared_proxy, methods):
    proxy = shared_proxy([f"protocol pop3; pop3_auth {methods};"])
    with proxy.client() as client:
        line = client.line()
    assert re.fullmatch(rb"\+OK POP3 ready <\d+\.\d+@mx\.test>\r\n", line), line


def test_each_session_gets_its_own_timestamp(shared_proxy):
    proxy = shared_proxy(["protocol pop3; pop3_auth apop;"])
    with proxy.client() as one, proxy.client() as two:
        assert one.line() != two.line()


# ---------------------------------------------------------------- CAPA

def test_capa_default(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"CAPA\r\n")
        assert read_until_dot(client) == DEFAULT_CAPA


def test_capa_lists_configured_capabilities_and_every_enabled_sasl_method(shared_proxy):
    proxy = shared_proxy(["protocol pop3; pop3_capabilities TOP UIDL \"SASL-IR\";"
                         " pop3_auth plain apop cram-md5 external;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"CAPA\r\n")
        assert read_until_dot(client) == (pop3.CAPA_HEADER + b"TOP\r\nUIDL\r\nSASL-IR\r\n"
                                          b"SASL PLAIN LOGIN CRAM-MD5 EXTERNAL\r\n.\r\n")


def test_capa_keeps_a_bare_sasl_line_when_no_sasl_method_is_listed(shared_proxy):
    proxy = shared_proxy(["protocol pop3; pop3_capabilities USER; pop3_auth apop;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"CAPA\r\n")
        assert read_until_dot(client) == pop3.CAPA_HEADER + b"USER\r\nSASL\r\n.\r\n"


def test_capa_in_user_state_answers_and_keeps_the_user_state(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"USER joe\r\nCAPA\r\n")
        assert client.line() == pop3.OK
        assert read_until_dot(client) == DEFAULT_CAPA
        client.send(b"NOOP\r\n")            # still USER state: NOOP is legal there
        assert client.line() == pop3.OK


# ------------------------------------------------- AUTH method listing

def test_auth_without_argument_lists_methods_default(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"AUTH\r\n")
        assert read_until_dot(client) == pop3.AUTH_HEADER + b"PLAIN\r\nLOGIN\r\n.\r\n"


def test_auth_method_list_never_shows_apop(shared_proxy):
    proxy = shared_proxy(["protocol pop3; pop3_auth apop cram-md5 external;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"AUTH\r\n")
        assert read_until_dot(client) == (b"+OK methods supported:\r\n"
                                          b"CRAM-MD5\r\nEXTERNAL\r\n.\r\n")


# ------------------------------------------------------ simple commands

def test_noop_in_start_and_user_state(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"NOOP\r\n")
        assert client.line() == pop3.OK
        client.send(b"USER joe\r\nNOOP\r\n")
        assert client.lines(2) == [pop3.OK, pop3.OK]


@pytest.mark.parametrize("before", [b"", b"USER joe\r\n"])
def test_quit_says_ok_and_closes(shared_proxy, before):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(before + b"QUIT\r\n")
        if before:
            assert client.line() == pop3.OK
        assert client.line() == pop3.OK
        assert client.closed()


def test_commands_are_case_insensitive_and_crlf_is_optional(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"noop\nNoOp\r\n")
        assert client.lines(2) == [pop3.OK, pop3.OK]


def test_user_state_any_other_command_is_refused_and_returns_to_start(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"USER joe\r\nUSER ann\r\n")
        assert client.lines(2) == [pop3.OK, pop3.INVALID]
        client.send(b"PASS secret\r\n")      # start state again: PASS is not legal
        assert client.line() == pop3.INVALID
        client.send(b"USER joe\r\nAUTH PLAIN\r\nPASS x\r\n")
        assert client.lines(3) == [pop3.OK, pop3.INVALID, pop3.INVALID]


@pytest.mark.parametrize("line", [b"USER\r\n", b"PASS x\r\n", b"APOP joe\r\n", b"STLS\r\n",
                                  b"APOP joe 0123 extra\r\n", b"AUTH DIGEST-MD5\r\n",
                                  b"AUTH CRAM-MD5\r\n", b"AUTH EXTERNAL\r\n"])
def test_refusals_decided_after_parsing_are_not_counted(shared_proxy, line):
    proxy = shared_proxy(["protocol pop3; max_errors 2;"])
    client, _ = greeted(proxy)
    with client:
        for _ in range(4):
            client.send(line)
            assert client.line() == pop3.INVALID
        client.send(b"NOOP\r\n")
        assert client.line() == pop3.OK


def test_apop_when_not_enabled_is_refused_and_not_counted(shared_proxy):
    proxy = shared_proxy(["protocol pop3; max_errors 1;"])
    client, greeting = greeted(proxy)
    with client:
        assert greeting == b"+OK POP3 ready\r\n"
        client.send(b"APOP joe c4c9334bac560ecc979e58001b3e22fb\r\n")
        assert client.line() == pop3.INVALID
        client.send(b"NOOP\r\n")
        assert client.line() == pop3.OK


@pytest.mark.parametrize("line", [b"STAT\r\n", b"LIST\r\n", b"RETR 1\r\n", b"TOP 1 10\r\n",
                                  b"UIDL\r\n", b"USERS x\r\n", b"NO\rOP\r\n",
                                  b"\r\n", b"NOOP a b c d\r\n"])
def test_parser_level_invalid_commands_count_toward_max_errors(shared_proxy, line):
    proxy = shared_proxy(["protocol pop3; max_errors 3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(line + line)
        assert client.lines(2) == [pop3.INVALID, pop3.INVALID]
        client.send(b"NOOP\r\n")            # a good command does not reset the count
        assert client.line() == pop3.OK
        client.send(line)
        assert client.line() == pop3.INVALID
        assert client.closed()


def test_max_errors_closes_after_sending_the_last_refusal(start_proxy):
    proxy = start_proxy(["protocol pop3; max_errors 2;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"STAT\r\nSTAT\r\nNOOP\r\n")
        assert client.lines(2) == [pop3.INVALID, pop3.INVALID]
        assert client.closed()
    proxy.wait_log("client sent too many invalid commands")


# ------------------------------------------------------ pop3_client_buffer

NGINX_BUFFER = 128          # nginx's fixed POP3 buffer, set with freenginx's directive
SMALL = f"protocol pop3; pop3_client_buffer {NGINX_BUFFER};"


def test_a_command_of_exactly_the_buffer_size_is_accepted(shared_proxy):
    proxy = shared_proxy([SMALL])
    client, _ = greeted(proxy)
    with client:
        line = b"USER " + b"u" * (NGINX_BUFFER - 7) + b"\r\n"
        assert len(line) == NGINX_BUFFER
        client.send(line + b"NOOP\r\n")
        assert client.lines(2) == [pop3.OK, pop3.OK]


def test_a_longer_command_gets_invalid_then_close(start_proxy):
    proxy = start_proxy([SMALL])
    client, _ = greeted(proxy)
    with client:
        client.send(b"USER " + b"u" * NGINX_BUFFER + b"\r\n")
        assert client.line() == pop3.INVALID
        assert client.closed()
    proxy.wait_log("client sent too long command")


def test_the_limit_applies_to_a_sasl_response_line_too(shared_proxy):
    proxy = shared_proxy([SMALL])
    client, _ = greeted(proxy)
    with client:
        client.send(b"AUTH PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        client.send(b"A" * (NGINX_BUFFER + 10) + b"\r\n")
        assert client.line() == pop3.INVALID
        assert client.closed()


def test_the_default_buffer_is_4k(shared_proxy):
    """Room for an XOAUTH2 token (Office 365's exceed 2,500 bytes)."""
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"USER " + b"u" * (4096 - 7) + b"\r\nUSER " + b"u" * 4096 + b"\r\n")
        assert client.lines(2) == [pop3.OK, pop3.INVALID]
        assert client.closed()


# ----------------------------------------------------------- pipelining

def test_pipelined_commands_are_answered_in_order(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"NOOP\r\nCAPA\r\nUSER joe\r\nSTAT\r\nAUTH\r\nQUIT\r\n")
        assert client.line() == pop3.OK
        assert read_until_dot(client) == DEFAULT_CAPA
        assert client.lines(2) == [pop3.OK, pop3.INVALID]
        assert read_until_dot(client) == b"+OK methods supported:\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        assert client.line() == pop3.OK
        assert client.closed()


# ----------------------------------------------- SASL exchanges (no auth)

def test_auth_plain_without_initial_response_sends_an_empty_challenge(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"AUTH PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        client.send(b"not base64!\r\n")     # bad base64: invalid, back to start
        assert client.line() == pop3.INVALID
        client.send(b"NOOP\r\n")
        assert client.line() == pop3.OK


def test_auth_login_challenges(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"AUTH LOGIN\r\n")
        assert client.line() == b"+ VXNlcm5hbWU6\r\n"
        client.send(b64("joe") + b"\r\n")
        assert client.line() == b"+ UGFzc3dvcmQ6\r\n"
        client.send(b"*\r\n")               # no cancel in nginx: just bad base64
        assert client.line() == pop3.INVALID


def test_auth_login_with_initial_response_asks_only_for_the_password(shared_proxy):
    proxy = shared_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"AUTH LOGIN " + b64("joe") + b"\r\n")
        assert client.line() == b"+ UGFzc3dvcmQ6\r\n"


def test_auth_cram_md5_challenge_is_the_greeting_timestamp(shared_proxy):
    proxy = shared_proxy(["protocol pop3; pop3_auth plain cram-md5;"])
    client, greeting = greeted(proxy)
    with client:
        salt = TIMESTAMP.search(greeting).group()
        client.send(b"AUTH CRAM-MD5\r\n")
        assert client.line() == b"+ " + b64(salt) + b"\r\n"
        client.send(b64("joe tooshort") + b"\r\n")
        assert client.line() == pop3.INVALID


def test_auth_cram_md5_refuses_an_initial_response(shared_proxy):
    proxy = shared_proxy(["protocol pop3; pop3_auth plain cram-md5;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"AUTH CRAM-MD5 " + b64("joe 0123") + b"\r\n")
        assert client.line() == pop3.INVALID


def test_auth_external_without_initial_response_asks_for_the_user_name(shared_proxy):
    proxy = shared_proxy(["protocol pop3; pop3_auth plain external;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"AUTH EXTERNAL\r\n")
        assert client.line() == b"+ VXNlcm5hbWU6\r\n"


@pytest.mark.parametrize("mechanism", [b"XOAUTH2", b"GSSAPI", b"SCRAM-SHA-1", b"NTLM"])
def test_mechanisms_nginx_does_not_have_are_invalid(shared_proxy, mechanism):
    proxy = shared_proxy(["protocol pop3; pop3_auth plain cram-md5 external;"])
    client, _ = greeted(proxy)
    with client:
        client.send(b"AUTH " + mechanism + b"\r\n")
        assert client.line() == pop3.INVALID


def test_timeout_closes_an_idle_client_silently(start_proxy):
    proxy = start_proxy(["protocol pop3; timeout 500ms;"])
    client, _ = greeted(proxy)
    with client:
        started = time.monotonic()
        client.send(b"NOOP\r\n")          # traffic does not re-arm the deadline
        assert client.line() == pop3.OK
        assert client.closed()
        assert 0.3 < time.monotonic() - started < 3
    proxy.wait_log("client timed out")


def test_client_eof_closes_without_a_reply(start_proxy):
    proxy = start_proxy(["protocol pop3;"])
    client, _ = greeted(proxy)
    client.send(b"USER joe\r\n")
    assert client.line() == pop3.OK
    client.sock.shutdown(2)
    client.close()
    proxy.wait_log("client closed connection")


# ------------------------------------------- authentication and backend

def pop3_backend(login=b"joe", password=b"secret", final=b"+OK Logged in.\r\n"):
    """A backend script for spec 4.3: greeting, USER, PASS, then echo."""
    return [("send", b"+OK Dovecot ready.\r\n"),
            ("expect", b"USER " + login + b"\r\n"), ("send", b"+OK\r\n"),
            ("expect", b"PASS " + password + b"\r\n"), ("send", final),
            ("echo",)]


def logged_in(proxy, backend_server, lines, replies=()):
    """Send `lines`, expect `replies` and then the backend's +OK; relay one
    echoed line; returns the greeting."""
    client, greeting = greeted(proxy)
    with client:
        client.send(lines)
        assert client.lines(len(replies)) == list(replies)
        assert client.line() == b"+OK Logged in.\r\n"
        client.send(b"STAT\r\n")
        assert client.line() == b"STAT\r\n"
    backend_server.wait_connections(1)
    assert backend_server.errors == []
    return greeting


@pytest.fixture
def pop3_proxy(start_proxy, auth_service):
    def start(settings=""):
        return start_proxy([f"protocol pop3; {settings}"], auth=auth_service.url)
    return start


def test_user_pass_keeps_spaces_and_logs_in_with_user_pass(pop3_proxy, auth_service, backend):
    server = backend(pop3_backend(b"my user", b"pa ss "))
    auth_service.reply = ok("127.0.0.1", server.port)
    logged_in(pop3_proxy(), server, b"USER my user\r\nPASS pa ss \r\n", [pop3.OK])
    (request,) = auth_service.requests
    assert auth_headers(request) == [
        ("Auth-Method", "plain"), ("Auth-User", "my%20user"), ("Auth-Pass", "pa%20ss%20"),
        ("Auth-Protocol", "pop3"), ("Auth-Login-Attempt", "1"), ("Client-IP", "127.0.0.1")]
    assert server.received[0] == b"USER my user\r\nPASS pa ss \r\nSTAT\r\n"


def test_auth_service_overrides_login_and_password_raw(pop3_proxy, auth_service, backend):
    server = backend(pop3_backend(b"be%20joe", b"be pass"))
    auth_service.reply = ok("127.0.0.1", server.port, Auth_User="be%20joe", Auth_Pass="be pass")
    logged_in(pop3_proxy(), server, b"USER joe\r\nPASS secret\r\n", [pop3.OK])


def test_capa_between_user_and_pass_keeps_the_user(pop3_proxy, auth_service, backend):
    server = backend(pop3_backend())
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = pop3_proxy()
    client, _ = greeted(proxy)
    with client:
        client.send(b"USER joe\r\nCAPA\r\n")
        assert client.line() == pop3.OK
        assert read_until_dot(client) == DEFAULT_CAPA
        client.send(b"PASS secret\r\n")
        assert client.line() == b"+OK Logged in.\r\n"
    server.wait_connections(1)
    assert server.errors == []


def test_pipelined_commands_after_pass_reach_the_backend(pop3_proxy, auth_service, backend):
    server = backend(pop3_backend())
    auth_service.reply = ok("127.0.0.1", server.port)
    client, _ = greeted(pop3_proxy())
    with client:
        client.send(b"USER joe\r\nPASS secret\r\nSTAT\r\nLIST\r\n")
        assert client.lines(4) == [pop3.OK, b"+OK Logged in.\r\n", b"STAT\r\n", b"LIST\r\n"]
    server.wait_connections(1)
    assert server.received[0] == b"USER joe\r\nPASS secret\r\nSTAT\r\nLIST\r\n"


def test_apop_sends_digest_and_greeting_salt_then_user_pass(pop3_proxy, auth_service, backend):
    server = backend(pop3_backend())
    auth_service.reply = ok("127.0.0.1", server.port, Auth_Pass="secret")
    digest = b"c4c9334bac560ecc979e58001b3e22fb"
    greeting = logged_in(pop3_proxy("pop3_auth plain apop;"), server,
                         b"APOP joe " + digest + b"\r\n")
    (request,) = auth_service.requests
    salt = TIMESTAMP.search(greeting).group().decode()
    assert auth_headers(request) == [
        ("Auth-Method", "apop"), ("Auth-User", "joe"), ("Auth-Pass", digest.decode()),
        ("Auth-Salt", salt), ("Auth-Protocol", "pop3"), ("Auth-Login-Attempt", "1"),
        ("Client-IP", "127.0.0.1")]


@pytest.mark.parametrize("lines, replies", [
    (b"AUTH PLAIN " + b64(b"admin\0joe\0secret") + b"\r\n", []),   # the authzid is dropped
    (b"AUTH PLAIN\r\n" + b64(b"\0joe\0secret") + b"\r\n", [b"+ \r\n"]),
    (b"AUTH LOGIN " + b64("joe") + b"\r\n" + b64("secret") + b"\r\n",
     [b"+ UGFzc3dvcmQ6\r\n"]),
    (b"auth login\r\n" + b64("joe") + b"\r\n" + b64("secret") + b"\r\n",
     [b"+ VXNlcm5hbWU6\r\n", b"+ UGFzc3dvcmQ6\r\n"]),
], ids=["plain-initial", "plain", "login-initial", "login"])
def test_auth_plain_and_login_with_and_without_initial_response(
        pop3_proxy, auth_service, backend, lines, replies):
    server = backend(pop3_backend())
    auth_service.reply = ok("127.0.0.1", server.port)
    logged_in(pop3_proxy(), server, lines, replies)
    (request,) = auth_service.requests
    assert auth_headers(request)[:3] == [("Auth-Method", "plain"), ("Auth-User", "joe"),
                                         ("Auth-Pass", "secret")]


def test_auth_cram_md5_sends_digest_and_salt(pop3_proxy, auth_service, backend):
    server = backend(pop3_backend())
    auth_service.reply = checking_auth({"joe": "secret"}, server.port)
    proxy = pop3_proxy("pop3_auth plain cram-md5;")
    client, greeting = greeted(proxy)
    salt = TIMESTAMP.search(greeting).group()
    digest = hmac.new(b"secret", salt, "md5").hexdigest().encode()
    with client:
        client.send(b"AUTH CRAM-MD5\r\n")
        assert client.line() == b"+ " + b64(salt) + b"\r\n"
        client.send(b64(b"joe " + digest) + b"\r\n")
        assert client.line() == b"+OK Logged in.\r\n"
    server.wait_connections(1)
    assert server.errors == []
    (request,) = auth_service.requests
    assert auth_headers(request)[:4] == [("Auth-Method", "cram-md5"), ("Auth-User", "joe"),
                                         ("Auth-Pass", digest.decode()),
                                         ("Auth-Salt", salt.decode())]


@pytest.mark.parametrize("initial", [True, False])
def test_auth_external(pop3_proxy, auth_service, backend, initial):
    server = backend(pop3_backend())
    auth_service.reply = ok("127.0.0.1", server.port, Auth_Pass="secret")
    if initial:
        lines, replies = b"AUTH EXTERNAL " + b64("joe") + b"\r\n", []
    else:
        lines, replies = b"AUTH EXTERNAL\r\n" + b64("joe") + b"\r\n", [b"+ VXNlcm5hbWU6\r\n"]
    logged_in(pop3_proxy("pop3_auth plain external;"), server, lines, replies)
    (request,) = auth_service.requests
    assert auth_headers(request)[:3] == [("Auth-Method", "external"), ("Auth-User", "joe"),
                                         ("Auth-Pass", "")]


@pytest.mark.parametrize("settings, lines", [
    ("pop3_auth apop;", b"APOP joe c4c9334bac560ecc979e58001b3e22fb\r\n"),
    ("pop3_auth plain cram-md5;",
     b"AUTH CRAM-MD5\r\n" + b64("joe c4c9334bac560ecc979e58001b3e22fb") + b"\r\n"),
    ("pop3_auth plain external;", b"AUTH EXTERNAL " + b64("joe") + b"\r\n")])
def test_auth_pass_is_required_without_a_clear_text_password(
        pop3_proxy, auth_service, backend, settings, lines):
    server = backend(pop3_backend())
    auth_service.reply = ok("127.0.0.1", server.port)          # no Auth-Pass
    proxy = pop3_proxy(settings)
    client, _ = greeted(proxy)
    with client:
        client.send(lines)
        if lines.startswith(b"AUTH CRAM-MD5"):
            assert client.line().startswith(b"+ ")
        assert client.line() == pop3.INTERNAL_ERROR == b"-ERR internal server error\r\n"
        assert client.closed()
    proxy.wait_log("auth http server did not send password")
    assert server.connections == []


def test_refusal_sends_the_status_text_and_closes(pop3_proxy, auth_service):
    auth_service.reply = fail("Invalid login or password")
    client, _ = greeted(pop3_proxy())
    with client:
        client.send(b"USER joe\r\nPASS wrong\r\n")
        assert client.lines(2) == [pop3.OK, b"-ERR Invalid login or password\r\n"]
        assert client.closed()


def test_refusal_with_auth_wait_returns_to_the_start_state(pop3_proxy, auth_service, backend):
    server = backend(pop3_backend())
    auth_service.reply = sequence(fail("Try again", wait=1), ok("127.0.0.1", server.port))
    client, _ = greeted(pop3_proxy())
    with client:
        client.send(b"USER joe\r\nPASS wrong\r\n")
        assert client.lines(2) == [pop3.OK, b"-ERR Try again\r\n"]
        client.send(b"PASS secret\r\n")         # start state: the USER was forgotten
        assert client.line() == pop3.INVALID
        client.send(b"USER joe\r\nPASS secret\r\n")
        assert client.lines(2) == [pop3.OK, b"+OK Logged in.\r\n"]
    attempts = [r.header("Auth-Login-Attempt") for r in auth_service.requests]
    assert attempts == ["1", "2"]


LOCKED = [("send", b"+OK ready\r\n"), ("expect", b"USER joe\r\n"), ("send", b"+OK\r\n"),
          ("expect", b"PASS secret\r\n"), ("send", b"-ERR [IN-USE] mailbox locked\r\n"),
          ("sleep", 5)]


@pytest.mark.parametrize("flag, seen", [("off", pop3.INTERNAL_ERROR),
                                        ("on", b"-ERR [IN-USE] mailbox locked\r\n")])
def test_proxy_pass_error_message(pop3_proxy, auth_service, backend, flag, seen):
    server = backend(LOCKED)
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = pop3_proxy(f"proxy_pass_error_message {flag};")
    client, _ = greeted(proxy)
    with client:
        client.send(b"USER joe\r\nPASS secret\r\n")
        assert client.lines(2) == [pop3.OK, seen]
        assert client.closed()
    proxy.wait_log("upstream sent invalid response")


@pytest.mark.parametrize("script", [
    [("send", b"-ERR not now\r\n")],                            # bad greeting
    [("send", b"+OK ready\r\n"), ("expect", b"USER joe\r\n"), ("send", b"-ERR who\r\n")],
    [("send", b"+OK ready\r\n"), ("close",)],                   # closed mid-login
], ids=["greeting", "user", "closed"])
def test_backend_errors_give_the_internal_error_line(pop3_proxy, auth_service, backend, script):
    server = backend(script)
    auth_service.reply = ok("127.0.0.1", server.port)
    client, _ = greeted(pop3_proxy())
    with client:
        client.send(b"USER joe\r\nPASS secret\r\n")
        assert client.lines(2) == [pop3.OK, pop3.INTERNAL_ERROR]
        assert client.closed()


def test_a_backend_that_closes_gives_internal_error_even_with_pass_error_message(
        pop3_proxy, auth_service, backend):
    server = backend([("send", b"+OK ready\r\n"), ("expect", b"USER joe\r\n"), ("close",)])
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = pop3_proxy("proxy_pass_error_message on;")
    client, _ = greeted(proxy)
    with client:
        client.send(b"USER joe\r\nPASS secret\r\n")
        assert client.lines(2) == [pop3.OK, pop3.INTERNAL_ERROR]
        assert client.closed()
    proxy.wait_log("upstream prematurely closed connection")


def test_a_backend_line_longer_than_proxy_buffer_is_an_internal_error(
        pop3_proxy, auth_service, backend):
    server = backend([("send", b"+OK " + b"x" * 2000), ("sleep", 5)])
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = pop3_proxy("proxy_buffer 1k; proxy_pass_error_message on;")
    client, _ = greeted(proxy)
    with client:
        client.send(b"USER joe\r\nPASS secret\r\n")
        assert client.lines(2) == [pop3.OK, pop3.INTERNAL_ERROR]
        assert client.closed()
    proxy.wait_log("upstream sent too long response line")


def test_unreachable_backend_gives_the_internal_error_line(pop3_proxy, auth_service):
    auth_service.reply = ok("127.0.0.1", free_port())
    client, _ = greeted(pop3_proxy())
    with client:
        client.send(b"USER joe\r\nPASS secret\r\n")
        assert client.lines(2) == [pop3.OK, pop3.INTERNAL_ERROR]
        assert client.closed()


# ------------------------------------------------------ no secret in logs

def test_no_password_digest_or_sasl_response_reaches_the_debug_log(
        pop3_proxy, auth_service, backend):
    password = "Pw-9f3kQ"
    server = backend(lambda index: pop3_backend(b"joe", password.encode()))
    auth_service.reply = checking_auth({"joe": password}, server.port)
    proxy = pop3_proxy("pop3_auth plain apop cram-md5;")
    secrets = {password}
    for _ in range(2):                      # a success, then a failure
        for flavour in ("user", "apop", "plain", "login", "cram"):
            client, greeting = greeted(proxy)
            salt = TIMESTAMP.search(greeting).group()
            apop = hashlib.md5(salt + password.encode()).hexdigest().encode()
            cram = b64(b"joe " + hmac.new(password.encode(), salt, "md5").hexdigest().encode())
            plain = b64(b"\0joe\0" + password.encode())
            lines = {"user": b"USER joe\r\nPASS " + password.encode() + b"\r\n",
                     "apop": b"APOP joe " + apop + b"\r\n",
                     "plain": b"AUTH PLAIN " + plain + b"\r\n",
                     "login": b"AUTH LOGIN " + b64("joe") + b"\r\n" + b64(password) + b"\r\n",
                     "cram": b"AUTH CRAM-MD5\r\n" + cram + b"\r\n"}[flavour]
            secrets |= {apop.decode(), cram.decode(), plain.decode(), b64(password).decode(),
                        salt.decode() + password}
            with client:
                client.send(lines)
                for _ in range(8):
                    line = client.line()
                    if line.startswith((b"+OK Logged", b"-ERR")) or not line:
                        break
        password = password + "-wrong"
        auth_service.reply = checking_auth({"joe": "something else"}, server.port)
    proxy.wait_log('client login failed')
    log = proxy.log()
    assert "[debug]" in log or "[info]" in log
    assert 'login: "joe"' in log
    for secret in secrets:
        assert secret not in log, secret


# ------------------------------------------ real clients, real Dovecot

DOVECOT_USERS = {"joe": "secret", "ann": "pa ss word"}     # made by conftest's fixture
CURL = shutil.which("curl")


@pytest.fixture
def dovecot_proxy(start_proxy, auth_service, dovecot):
    """The proxy in front of the real Dovecot, with an auth service that
    checks passwords and APOP digests like a real one."""
    auth_service.reply = checking_auth(DOVECOT_USERS, dovecot.pop3_port)
    return start_proxy(["protocol pop3; pop3_auth plain apop;"], auth=auth_service.url)


def test_poplib_user_pass_through_to_dovecot(dovecot_proxy):
    for user, password in DOVECOT_USERS.items():
        client = poplib.POP3("127.0.0.1", dovecot_proxy.port, timeout=10)
        try:
            assert TIMESTAMP.search(client.getwelcome())
            client.user(user)
            assert client.pass_(password).startswith(b"+OK")     # Dovecot's own +OK
            count, _size = client.stat()
            assert count >= 0
        finally:
            client.quit()


def test_poplib_apop_through_to_dovecot(dovecot_proxy, auth_service):
    client = poplib.POP3("127.0.0.1", dovecot_proxy.port, timeout=10)
    try:
        assert client.apop("joe", "secret").startswith(b"+OK")
        client.noop()
    finally:
        client.quit()
    (request,) = auth_service.requests
    assert request.header("Auth-Method") == "apop"
    assert request.header("Auth-Salt").encode() in client.getwelcome()


def test_poplib_wrong_password_is_refused(dovecot_proxy):
    client = poplib.POP3("127.0.0.1", dovecot_proxy.port, timeout=10)
    try:
        client.user("joe")
        with pytest.raises(poplib.error_proto, match="Invalid login or password"):
            client.pass_("wrong")
    finally:
        client.close()


def big_message(marker, size):
    """A message of about `size` bytes, CRLF lines, no line starting with '.'."""
    head = b"From: a@b\r\nSubject: " + marker + b"\r\n\r\n"
    line = hashlib.sha256(marker).hexdigest().encode() + b"\r\n"
    body = b"".join(b"%07d " % number + line for number in range(size // (len(line) + 8)))
    return head + body


def find_message(client, size):
    """The number of the message with this size (LIST), or fail."""
    _, listing, _ = client.list()
    for entry in listing:
        number, octets = entry.split()
        if int(octets) == size:
            return int(number)
    raise AssertionError(f"no message of {size} octets in {listing}")


def test_retr_of_a_multi_megabyte_message_arrives_intact(dovecot_proxy, dovecot):
    raw = big_message(b"pop3 retr %d" % time.time_ns(), 3 * 1024 * 1024)
    dovecot.add_message("joe", raw)
    client = poplib.POP3("127.0.0.1", dovecot_proxy.port, timeout=30)
    try:
        client.user("joe")
        client.pass_("secret")
        number = find_message(client, len(raw))
        _, lines, _ = client.retr(number)
        got = b"\r\n".join(lines) + b"\r\n"
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(raw).hexdigest()
        client.dele(number)                 # leave the mailbox as we found it
    finally:
        client.quit()


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_pop3_retrieves_a_message(dovecot_proxy, dovecot):
    raw = b"From: a@b\r\nSubject: curl %d\r\n\r\nhello from curl\r\n" % time.time_ns()
    dovecot.add_message("joe", raw)
    url = f"pop3://joe:secret@127.0.0.1:{dovecot_proxy.port}/"
    listing = subprocess.run([CURL, "-sS", "--max-time", "20", url], capture_output=True,
                             timeout=30, check=True).stdout
    number = next(int(n) for n, size in (entry.split() for entry in listing.splitlines())
                  if int(size) == len(raw))
    fetched = subprocess.run([CURL, "-sS", "--max-time", "20", f"{url}{number}"],
                             capture_output=True, timeout=30, check=True).stdout
    assert fetched == raw
    client = poplib.POP3("127.0.0.1", dovecot_proxy.port, timeout=10)
    try:
        client.user("joe")
        client.pass_("secret")
        client.dele(find_message(client, len(raw)))
    finally:
        client.quit()
