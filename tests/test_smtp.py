"""SMTP through the proxy: transcripts of spec 3.3, the backend login of
4.4, and real clients (smtplib, swaks, curl) against a real Postfix.

Each test is a conversation on loopback: client lines in, the proxy's lines
out, byte for byte.  Reply texts come from mailproxy.smtp.
"""

import base64
import hashlib
import hmac
import re
import shutil
import smtplib
import subprocess
import time
import uuid

import pytest

from fakes import fail, ok, sequence
from harness import wait_until
from mailproxy import smtp
from mailproxy.backend import SmtpPlan, connect, new_socket, smtp_login
from transcript import SERVER_NAME, auth_headers, b64, checking_auth

pytest_plugins = ("proxying",)     # start_proxy, shared_proxy, auth_service, backend

GREETING = b"220 mx.test ESMTP ready\r\n"
CAPABILITIES = 'smtp_capabilities PIPELINING "SIZE 1000" 8BITMIME;'
EHLO_BLOCK = [b"250-mx.test\r\n", b"250-PIPELINING\r\n", b"250-SIZE 1000\r\n",
              b"250-8BITMIME\r\n", b"250 AUTH PLAIN LOGIN CRAM-MD5\r\n"]
MX = "protocol smtp; smtp_auth none;"


def greeted(proxy, index=0):
    client = proxy.client(index)
    assert client.line() == GREETING
    return client


def reply(client):
    """One SMTP reply, multi-line included."""
    lines = []
    for _ in range(64):
        lines.append(client.line())
        if lines[-1][3:4] != b"-":
            return lines
    raise AssertionError(f"no end of multi-line reply: {lines}")


# ------------------------------------------------------------ greeting

def test_greeting(shared_proxy):
    proxy = shared_proxy(["protocol smtp;"])
    with proxy.client() as client:
        assert client.line() == GREETING == b"220 " + SERVER_NAME.encode() + b" ESMTP ready\r\n"


def test_greeting_delay_rejects_a_client_that_talks_first(start_proxy):
    proxy = start_proxy(["protocol smtp; smtp_greeting_delay 1s;"])
    with proxy.client() as client:
        client.send(b"EHLO eager.example\r\n")
        assert client.line() == smtp.PIPELINING_REJECT \
            == b"503 5.5.0 Improper use of SMTP command pipelining\r\n"
        assert client.closed()
    proxy.wait_log("client was rejected before greeting")


def test_greeting_delay_greets_a_patient_client_after_the_delay(start_proxy):
    proxy = start_proxy(["protocol smtp; smtp_greeting_delay 500ms;"])
    started = time.monotonic()
    with proxy.client() as client:
        assert client.line() == GREETING
        assert time.monotonic() - started >= 0.45
        client.send(b"HELO patient.example\r\n")
        assert client.line() == b"250 mx.test\r\n"


def test_timeout_starts_when_the_delayed_greeting_is_sent(start_proxy):
    """Spec 3.3.2: after the delay the normal `timeout` starts."""
    proxy = start_proxy(["protocol smtp; smtp_greeting_delay 500ms; timeout 500ms;"])
    with proxy.client() as client:
        assert client.line() == GREETING
        greeted_at = time.monotonic()
        time.sleep(0.25)
        client.send(b"NOOP\r\n")
        assert client.line() == smtp.OK
        assert client.closed()
        assert 0.4 < time.monotonic() - greeted_at < 3
    proxy.wait_log("client timed out")


# ------------------------------------------------------------ HELO/EHLO

def test_helo_replies_with_the_server_name(shared_proxy):
    proxy = shared_proxy(["protocol smtp;"])
    with greeted(proxy) as client:
        client.send(b"HELO client.example\r\n")
        assert client.line() == b"250 mx.test\r\n"


def test_ehlo_block_with_capabilities_and_sasl_methods(shared_proxy):
    proxy = shared_proxy([f"protocol smtp; {CAPABILITIES} smtp_auth plain login cram-md5;"])
    with greeted(proxy) as client:
        client.send(b"EHLO client.example\r\n")
        assert reply(client) == EHLO_BLOCK


def test_ehlo_block_default(shared_proxy):
    proxy = shared_proxy(["protocol smtp;"])
    with greeted(proxy) as client:
        client.send(b"EHLO client.example\r\n")
        assert reply(client) == [b"250-mx.test\r\n", b"250 AUTH PLAIN LOGIN\r\n"]


def test_ehlo_block_lists_external_and_never_none(shared_proxy):
    proxy = shared_proxy(["protocol smtp; smtp_auth none external plain;"])
    with greeted(proxy) as client:
        client.send(b"EHLO client.example\r\n")
        assert reply(client) == [b"250-mx.test\r\n", b"250 AUTH PLAIN EXTERNAL\r\n"]


def test_ehlo_with_only_none_has_no_auth_line(shared_proxy):
    proxy = shared_proxy([MX])
    with greeted(proxy) as client:
        client.send(b"EHLO client.example\r\n")
        assert reply(client) == [b"250 mx.test\r\n"]


def test_ehlo_with_only_none_and_capabilities_ends_on_the_last_capability(shared_proxy):
    proxy = shared_proxy([f"{MX} {CAPABILITIES}"])
    with greeted(proxy) as client:
        client.send(b"EHLO client.example\r\n")
        assert reply(client) == [b"250-mx.test\r\n", b"250-PIPELINING\r\n",
                                 b"250-SIZE 1000\r\n", b"250 8BITMIME\r\n"]


@pytest.mark.parametrize("line", [b"HELO\r\n", b"HELO a b\r\n", b"EHLO\r\n", b"EHLO a b\r\n"])
def test_helo_and_ehlo_need_exactly_one_argument_not_counted(shared_proxy, line):
    proxy = shared_proxy(["protocol smtp; max_errors 1;"])
    with greeted(proxy) as client:
        client.send(line + line)
        assert client.lines(2) == [smtp.INVALID_ARGUMENT, smtp.INVALID_ARGUMENT]
        client.send(b"NOOP\r\n")
        assert client.line() == smtp.OK


# ----------------------------------------------------------------- AUTH

def test_auth_without_arguments_is_an_invalid_argument(shared_proxy):
    proxy = shared_proxy(["protocol smtp; max_errors 1;"])
    with greeted(proxy) as client:
        client.send(b"AUTH\r\nAUTH\r\nNOOP\r\n")
        assert client.lines(3) == [smtp.INVALID_ARGUMENT, smtp.INVALID_ARGUMENT, smtp.OK]


def test_auth_plain_challenge_is_empty(shared_proxy):
    proxy = shared_proxy(["protocol smtp;"])
    with greeted(proxy) as client:
        client.send(b"AUTH PLAIN\r\n")
        assert client.line() == b"334 \r\n"
        client.send(b64(b"only-one-part") + b"\r\n")   # no NUL: invalid, back to start
        assert client.line() == smtp.INVALID
        client.send(b"NOOP\r\n")
        assert client.line() == smtp.OK


def test_auth_login_challenges(shared_proxy):
    proxy = shared_proxy(["protocol smtp;"])
    with greeted(proxy) as client:
        client.send(b"AUTH LOGIN\r\n")
        assert client.line() == b"334 VXNlcm5hbWU6\r\n"
        client.send(b64("joe") + b"\r\n")
        assert client.line() == b"334 UGFzc3dvcmQ6\r\n"
        client.send(b"*\r\n")
        assert client.line() == smtp.INVALID


def test_auth_login_with_initial_response(shared_proxy):
    proxy = shared_proxy(["protocol smtp;"])
    with greeted(proxy) as client:
        client.send(b"AUTH LOGIN " + b64("joe") + b"\r\n")
        assert client.line() == b"334 UGFzc3dvcmQ6\r\n"


def test_auth_cram_md5_challenge_is_a_salt(shared_proxy):
    proxy = shared_proxy(["protocol smtp; smtp_auth plain login cram-md5;"])
    with greeted(proxy) as client:
        client.send(b"AUTH CRAM-MD5\r\n")
        line = client.line()
        assert line.startswith(b"334 ") and line.endswith(b"\r\n")
        salt = base64.b64decode(line[4:-2])
        assert re.fullmatch(rb"<\d+\.\d+@mx\.test>", salt), salt


def test_auth_cram_md5_reuses_the_session_salt(shared_proxy):
    proxy = shared_proxy(["protocol smtp; smtp_auth plain login cram-md5;"])
    with greeted(proxy) as client:
        client.send(b"AUTH CRAM-MD5\r\n")
        first = client.line()
        client.send(b"*\r\nAUTH CRAM-MD5\r\n")
        assert client.lines(2) == [smtp.INVALID, first]


def test_auth_external_challenge(shared_proxy):
    proxy = shared_proxy(["protocol smtp; smtp_auth plain external;"])
    with greeted(proxy) as client:
        client.send(b"AUTH EXTERNAL\r\n")
        assert client.line() == b"334 VXNlcm5hbWU6\r\n"


@pytest.mark.parametrize("line", [b"AUTH XOAUTH2\r\n", b"AUTH CRAM-MD5\r\n",
                                  b"AUTH EXTERNAL\r\n", b"AUTH GSSAPI\r\n",
                                  b"AUTH PLAIN a b\r\n"])
def test_unknown_or_disabled_mechanisms_are_invalid_not_counted(shared_proxy, line):
    proxy = shared_proxy(["protocol smtp; max_errors 1;"])
    with greeted(proxy) as client:
        client.send(line + line + b"NOOP\r\n")
        assert client.lines(3) == [smtp.INVALID, smtp.INVALID, smtp.OK]


# ------------------------------------------------------- MAIL and RCPT

def test_mail_without_none_requires_authentication_not_counted(start_proxy):
    proxy = start_proxy(["protocol smtp; max_errors 1;"])
    with greeted(proxy) as client:
        client.send(b"MAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nNOOP\r\n")
        assert client.lines(3) == [smtp.AUTH_REQUIRED, smtp.AUTH_REQUIRED, smtp.OK]
        assert smtp.AUTH_REQUIRED == b"530 5.7.1 Authentication required\r\n"
    proxy.wait_log("client was rejected")


def test_rcpt_without_mail_is_a_bad_sequence(shared_proxy):
    proxy = shared_proxy([MX])
    with greeted(proxy) as client:
        client.send(b"RCPT TO:<c@d>\r\n")
        assert client.line() == smtp.BAD_SEQUENCE == b"503 5.5.1 Bad sequence of commands\r\n"


def test_mail_in_mx_mode(shared_proxy):
    proxy = shared_proxy([MX + " max_errors 1;"])
    with greeted(proxy) as client:
        client.send(b"MAIL\r\n")
        assert client.line() == smtp.INVALID_ARGUMENT
        client.send(b"MAIL FROM:<a@b> SIZE=100\r\n")
        assert client.line() == smtp.OK == b"250 2.0.0 OK\r\n"
        client.send(b"MAIL FROM:<other@b>\r\n")
        assert client.line() == smtp.BAD_SEQUENCE
        client.send(b"RCPT\r\n")
        assert client.line() == smtp.INVALID_ARGUMENT


@pytest.mark.parametrize("reset", [b"RSET\r\n", b"HELO again.example\r\n",
                                   b"EHLO again.example\r\n"])
def test_rset_helo_and_ehlo_forget_mail_from(shared_proxy, reset):
    proxy = shared_proxy([MX])
    with greeted(proxy) as client:
        client.send(b"MAIL FROM:<a@b>\r\n" + reset)
        assert client.line() == smtp.OK
        reply(client)
        client.send(b"RCPT TO:<c@d>\r\n")
        assert client.line() == smtp.BAD_SEQUENCE
        client.send(b"MAIL FROM:<a@b>\r\n")     # a new MAIL is fine again
        assert client.line() == smtp.OK


def test_rset_and_noop(shared_proxy):
    proxy = shared_proxy(["protocol smtp;"])
    with greeted(proxy) as client:
        client.send(b"RSET\r\nNOOP\r\nrset\r\n")
        assert client.lines(3) == [smtp.OK, smtp.OK, smtp.OK]


def test_quit(shared_proxy):
    proxy = shared_proxy(["protocol smtp;"])
    with greeted(proxy) as client:
        client.send(b"QUIT\r\n")
        assert client.line() == smtp.BYE == b"221 2.0.0 Bye\r\n"
        assert client.closed()


# ------------------------------------------------------- invalid input

@pytest.mark.parametrize("verb", [b"VRFY joe", b"EXPN list", b"HELP", b"vrfy"])
def test_vrfy_expn_help_are_refused_and_not_counted(shared_proxy, verb):
    proxy = shared_proxy(["protocol smtp; max_errors 1;"])
    with greeted(proxy) as client:
        client.send(verb + b"\r\n" + verb + b"\r\nNOOP\r\n")
        assert client.lines(3) == [smtp.INVALID, smtp.INVALID, smtp.OK]


def test_starttls_when_not_enabled_is_refused_and_not_counted(shared_proxy):
    proxy = shared_proxy(["protocol smtp; max_errors 1;"])
    with greeted(proxy) as client:
        client.send(b"STARTTLS\r\nSTARTTLS\r\nNOOP\r\n")
        assert client.lines(3) == [smtp.INVALID, smtp.INVALID, smtp.OK]


@pytest.mark.parametrize("line", [b"DATA", b"BDAT 10 LAST", b"X-FOO",
                                  b"HE1O x", b"NO\rOP", b"MAIL " + b"a " * 12])
def test_parser_level_invalid_commands_count_toward_max_errors(shared_proxy, line):
    proxy = shared_proxy(["protocol smtp; max_errors 3;"])
    with greeted(proxy) as client:
        client.send(line + b"\r\n" + line + b"\r\nNOOP\r\n")
        assert client.lines(3) == [smtp.INVALID, smtp.INVALID, smtp.OK]
        client.send(line + b"\r\n")
        assert client.line() == smtp.INVALID
        assert client.closed()


def test_data_before_auth_is_invalid(shared_proxy):
    proxy = shared_proxy(["protocol smtp;"])
    with greeted(proxy) as client:
        client.send(b"DATA\r\n")
        assert client.line() == smtp.INVALID == b"500 5.5.1 Invalid command\r\n"


def test_max_errors_closes_after_the_last_refusal(start_proxy):
    proxy = start_proxy(["protocol smtp; max_errors 2;"])
    with greeted(proxy) as client:
        client.send(b"DATA\r\nDATA\r\nNOOP\r\n")
        assert client.lines(2) == [smtp.INVALID, smtp.INVALID]
        assert client.closed()
    proxy.wait_log("client sent too many invalid commands")


def test_smtp_client_buffer_bounds_a_command(start_proxy):
    proxy = start_proxy(["protocol smtp; smtp_client_buffer 64;"])
    with greeted(proxy) as client:
        client.send(b"HELO " + b"h" * 57 + b"\r\n")    # 64 bytes: fits
        assert client.line() == b"250 mx.test\r\n"
        client.send(b"HELO " + b"h" * 64 + b"\r\n")
        assert client.line() == smtp.INVALID
        assert client.closed()
    proxy.wait_log("client sent too long command")


def test_pipelined_commands_are_answered_in_order(shared_proxy):
    proxy = shared_proxy([f"protocol smtp; {CAPABILITIES} smtp_auth plain login cram-md5;"])
    with greeted(proxy) as client:
        client.send(b"EHLO a.example\r\nNOOP\r\nVRFY x\r\nHELO b.example\r\nRSET\r\nQUIT\r\n")
        assert reply(client) == EHLO_BLOCK
        assert client.lines(5) == [smtp.OK, smtp.INVALID, b"250 mx.test\r\n", smtp.OK,
                                   smtp.BYE]
        assert client.closed()


# ------------------------------------------- authentication and backend

PLAIN_JOE = b"AUTH PLAIN " + b64(b"\0joe\0secret") + b"\r\n"
XCLIENT_JOE = b"XCLIENT ADDR=127.0.0.1 LOGIN=joe NAME=[UNAVAILABLE]\r\n"


def smtp_backend(*steps, ehlo=b"EHLO mx.test\r\n"):
    """A backend script for spec 4.4: greeting, the server-name EHLO/HELO,
    then `steps` (pairs of expected line and reply), then echo."""
    script = [("send", b"220 backend.test ESMTP\r\n"), ("expect", ehlo),
              ("send", b"250-backend.test\r\n250-XCLIENT ADDR LOGIN NAME\r\n250 8BITMIME\r\n")]
    for expected, answer in steps:
        script += [("expect", expected), ("send", answer)]
    return script + [("echo",)]


@pytest.fixture
def smtp_proxy(start_proxy, auth_service):
    def start(settings=""):
        return start_proxy([f"protocol smtp; {settings}"], auth=auth_service.url)
    return start


def converse(proxy, lines, expect):
    """Greet, send `lines`, check the replies, then relay one echoed line."""
    with greeted(proxy) as client:
        client.send(lines)
        for line in expect:
            assert reply(client) == [line]
        client.send(b"NOOP relayed\r\n")
        assert client.line() == b"NOOP relayed\r\n"


def finished(server):
    """The bytes the backend received, once its connection has ended."""
    server.wait_connections(1)
    assert server.errors == []
    return server.received[0]


def test_auth_plain_logs_in_with_xclient(smtp_proxy, auth_service, backend):
    server = backend(smtp_backend((XCLIENT_JOE, b"220 backend.test ESMTP\r\n")))
    auth_service.reply = ok("127.0.0.1", server.port)
    converse(smtp_proxy(), PLAIN_JOE, [smtp.AUTH_OK])
    (request,) = auth_service.requests
    assert auth_headers(request) == [
        ("Auth-Method", "plain"), ("Auth-User", "joe"), ("Auth-Pass", "secret"),
        ("Auth-Protocol", "smtp"), ("Auth-Login-Attempt", "1"), ("Client-IP", "127.0.0.1"),
        ("Client-Host", "[UNAVAILABLE]")]
    assert finished(server) == b"EHLO mx.test\r\n" + XCLIENT_JOE + b"NOOP relayed\r\n"


def test_xclient_login_is_xtext_encoded(smtp_proxy, auth_service, backend):
    login = "us er+x=y\u00e9".encode()
    server = backend(smtp_backend(
        (b"XCLIENT ADDR=127.0.0.1 LOGIN=us+20er+2Bx+3Dy+C3+A9 NAME=[UNAVAILABLE]\r\n",
         b"250 ok\r\n")))
    auth_service.reply = ok("127.0.0.1", server.port)
    converse(smtp_proxy(), b"AUTH PLAIN " + b64(b"\0" + login + b"\0pw") + b"\r\n",
             [smtp.AUTH_OK])
    assert auth_service.requests[0].header("Auth-User") == "us%20er+x=y\xc3\xa9"
    finished(server)


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
def test_the_clients_own_helo_is_replayed_after_xclient(smtp_proxy, auth_service, backend, verb):
    server = backend(smtp_backend((XCLIENT_JOE, b"220 backend.test ESMTP\r\n"),
                                  (verb + b" client.example\r\n", b"250 backend.test\r\n")))
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = smtp_proxy()
    with greeted(proxy) as client:
        client.send(verb + b" client.example\r\n")
        reply(client)
        client.send(PLAIN_JOE)
        assert client.line() == smtp.AUTH_OK
    assert finished(server).startswith(b"EHLO mx.test\r\n" + XCLIENT_JOE + verb)


@pytest.mark.parametrize("before, first", [(b"", b"HELO mx.test\r\n"),
                                           (b"HELO client.example\r\n", b"HELO mx.test\r\n"),
                                           (b"EHLO client.example\r\n", b"EHLO mx.test\r\n"),
                                           (b"EHLO a.example\r\nHELO b.example\r\n",
                                            b"EHLO mx.test\r\n")])
def test_without_xclient_helo_or_ehlo_follows_the_client(smtp_proxy, auth_service, backend,
                                                         before, first):
    server = backend(smtp_backend(ehlo=first))
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = smtp_proxy("xclient off;")
    with greeted(proxy) as client:
        client.send(before)
        for _ in range(before.count(b"\n")):
            reply(client)
        client.send(PLAIN_JOE)
        assert client.line() == smtp.AUTH_OK
        client.send(b"MAIL FROM:<a@b>\r\n")
        assert client.line() == b"MAIL FROM:<a@b>\r\n"
    assert finished(server) == first + b"MAIL FROM:<a@b>\r\n"


def test_proxy_smtp_auth_on_sends_auth_plain_and_no_xclient_login(
        smtp_proxy, auth_service, backend):
    server = backend(smtp_backend(
        (b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n", b"220 backend.test\r\n"),
        (b"AUTH PLAIN AGpvZQBzZWNyZXQ=\r\n", b"235 2.7.0 Authentication successful\r\n")))
    auth_service.reply = ok("127.0.0.1", server.port)
    converse(smtp_proxy("proxy_smtp_auth on;"), PLAIN_JOE, [smtp.AUTH_OK])
    finished(server)


def test_proxy_smtp_auth_login_runs_the_login_exchange(smtp_proxy, auth_service, backend):
    server = backend(smtp_backend(
        (b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
        (b64("be_joe") + b"\r\n", b"334 UGFzc3dvcmQ6\r\n"),
        (b64("be pw") + b"\r\n", b"235 2.7.0 Authentication successful\r\n"),
        ehlo=b"HELO mx.test\r\n"))          # xclient off and no client EHLO: HELO
    auth_service.reply = ok("127.0.0.1", server.port, Auth_User="be_joe", Auth_Pass="be pw")
    converse(smtp_proxy("proxy_smtp_auth login; xclient off;"), PLAIN_JOE, [smtp.AUTH_OK])
    finished(server)


@pytest.mark.parametrize("setting, header, steps", [
    ("off", "login", [(b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n", b"250 ok\r\n"),
                      (b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
                      (b"am9l\r\n", b"334 UGFzc3dvcmQ6\r\n"),
                      (b"c2VjcmV0\r\n", b"235 ok\r\n")]),
    ("on", "none", [(XCLIENT_JOE, b"250 ok\r\n")]),
    ("login", "plain", [(b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n", b"250 ok\r\n"),
                        (b"AUTH PLAIN AGpvZQBzZWNyZXQ=\r\n", b"235 ok\r\n")]),
])
def test_auth_smtp_auth_reply_header_chooses_per_session(
        smtp_proxy, auth_service, backend, setting, header, steps):
    server = backend(smtp_backend(*steps))
    auth_service.reply = ok("127.0.0.1", server.port, Auth_SMTP_Auth=header)
    converse(smtp_proxy(f"proxy_smtp_auth {setting};"), PLAIN_JOE, [smtp.AUTH_OK])
    finished(server)


def test_an_invalid_auth_smtp_auth_header_is_an_internal_error(smtp_proxy, auth_service, backend):
    server = backend(smtp_backend())
    auth_service.reply = ok("127.0.0.1", server.port, Auth_SMTP_Auth="cram-md5")
    proxy = smtp_proxy()
    with greeted(proxy) as client:
        client.send(PLAIN_JOE)
        assert client.line() == smtp.INTERNAL_ERROR
        assert client.closed()
    proxy.wait_log("invalid Auth-SMTP-Auth")


def test_proxy_smtp_auth_without_a_password_is_an_internal_error(
        smtp_proxy, auth_service, backend):
    server = backend(smtp_backend((b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n",
                                   b"250 ok\r\n")))
    auth_service.reply = ok("127.0.0.1", server.port)         # EXTERNAL: no password
    proxy = smtp_proxy("proxy_smtp_auth on; smtp_auth plain external;")
    with greeted(proxy) as client:
        client.send(b"AUTH EXTERNAL " + b64("joe") + b"\r\n")
        assert client.line() == smtp.INTERNAL_ERROR
        assert client.closed()
    proxy.wait_log("no password available")


@pytest.mark.parametrize("mechanism", ["LOGIN", "CRAM-MD5", "EXTERNAL"])
def test_sasl_exchanges_reach_the_auth_service(smtp_proxy, auth_service, backend, mechanism):
    server = backend(smtp_backend((XCLIENT_JOE, b"250 ok\r\n")))
    auth_service.reply = checking_auth({"joe": "secret"}, server.port) \
        if mechanism != "EXTERNAL" else ok("127.0.0.1", server.port)
    proxy = smtp_proxy("smtp_auth login plain cram-md5 external;")
    with greeted(proxy) as client:
        client.send(b"AUTH " + mechanism.encode() + b"\r\n")
        challenge = client.line()
        if mechanism == "LOGIN":
            assert challenge == b"334 VXNlcm5hbWU6\r\n"
            client.send(b64("joe") + b"\r\n")
            assert client.line() == b"334 UGFzc3dvcmQ6\r\n"
            client.send(b64("secret") + b"\r\n")
        elif mechanism == "CRAM-MD5":
            salt = base64.b64decode(challenge[4:-2])
            digest = hmac.new(b"secret", salt, "md5").hexdigest()
            client.send(b64("joe " + digest) + b"\r\n")
        else:
            assert challenge == b"334 VXNlcm5hbWU6\r\n"
            client.send(b64("joe") + b"\r\n")
        assert client.line() == smtp.AUTH_OK
    finished(server)
    (request,) = auth_service.requests
    method = {"LOGIN": "plain", "CRAM-MD5": "cram-md5", "EXTERNAL": "external"}[mechanism]
    assert request.header("Auth-Method") == method
    if mechanism == "CRAM-MD5":
        assert request.header("Auth-Salt") == salt.decode()


def test_pipelined_commands_after_auth_reach_the_backend(smtp_proxy, auth_service, backend):
    server = backend(smtp_backend((XCLIENT_JOE, b"250 ok\r\n")))
    auth_service.reply = ok("127.0.0.1", server.port)
    with greeted(smtp_proxy()) as client:
        client.send(PLAIN_JOE + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
        assert client.lines(3) == [smtp.AUTH_OK, b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"]
    assert finished(server).endswith(XCLIENT_JOE + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")


def test_multi_line_backend_replies_are_read_whole(smtp_proxy, auth_service, backend):
    server = backend([("send", b"220-backend.test first\r\n220-second\r\n220 third\r\n"),
                      ("expect", b"EHLO mx.test\r\n"),
                      ("send", b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n"),
                      ("expect", XCLIENT_JOE), ("send", b"220-x\r\n220 y\r\n"),
                      ("echo",)])
    auth_service.reply = ok("127.0.0.1", server.port)
    converse(smtp_proxy(), PLAIN_JOE, [smtp.AUTH_OK])
    finished(server)


@pytest.mark.parametrize("flag, seen", [("off", smtp.INTERNAL_ERROR),
                                        ("on", b"550-5.7.0 not\r\n550 5.7.0 authorized\r\n")])
def test_backend_refusing_xclient(smtp_proxy, auth_service, backend, flag, seen):
    server = backend(smtp_backend((XCLIENT_JOE, b"550-5.7.0 not\r\n550 5.7.0 authorized\r\n")))
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = smtp_proxy(f"proxy_pass_error_message {flag};")
    with greeted(proxy) as client:
        client.send(PLAIN_JOE)
        assert client.read(len(seen)) == seen
        assert client.closed()
    proxy.wait_log("upstream sent invalid response")


@pytest.mark.parametrize("script", [
    [("send", b"554 go away\r\n")],
    [("send", b"220 hi\r\n"), ("expect", b"EHLO mx.test\r\n"), ("send", b"502 what\r\n")],
    [("send", b"220 hi\r\n"), ("close",)],
], ids=["greeting", "ehlo", "closed"])
def test_backend_errors_give_451(smtp_proxy, auth_service, backend, script):
    server = backend(script)
    auth_service.reply = ok("127.0.0.1", server.port)
    with greeted(smtp_proxy()) as client:
        client.send(PLAIN_JOE)
        assert client.line() == smtp.INTERNAL_ERROR == b"451 4.3.2 Internal server error\r\n"
        assert client.closed()


def test_a_silent_backend_times_out_under_the_timeout_directive(smtp_proxy, auth_service,
                                                               backend):
    server = backend([("send", b"220 hi\r\n"), ("expect", b"EHLO mx.test\r\n"),
                      ("sleep", 5)])
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = smtp_proxy("timeout 500ms;")
    with greeted(proxy) as client:
        started = time.monotonic()
        client.send(PLAIN_JOE)
        assert client.line() == smtp.INTERNAL_ERROR
        assert client.closed()
        assert time.monotonic() - started < 3
    proxy.wait_log("upstream timed out")


# --------------------------------------------------- refusals by the service

def test_refusal_uses_the_default_error_code(smtp_proxy, auth_service):
    auth_service.reply = fail("Invalid login or password")
    with greeted(smtp_proxy()) as client:
        client.send(PLAIN_JOE)
        assert client.line() == b"535 5.7.0 Invalid login or password\r\n"
        assert client.closed()


def test_refusal_uses_auth_error_code(smtp_proxy, auth_service):
    auth_service.reply = fail("Temporary problem", Auth_Error_Code="451 4.3.0")
    with greeted(smtp_proxy()) as client:
        client.send(PLAIN_JOE)
        assert client.line() == b"451 4.3.0 Temporary problem\r\n"
        assert client.closed()


# ------------------------------------------------------------- MX mode

def test_mx_mode_rcpt_starts_auth_none_and_replays_mail_and_rcpt(
        smtp_proxy, auth_service, backend):
    server = backend(smtp_backend(
        (b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n", b"220 backend.test\r\n"),
        (b"EHLO client.example\r\n", b"250 backend.test\r\n"),
        (b"MAIL FROM:<a@b> SIZE=100\r\n", b"250 2.1.0 Ok\r\n"),
        (b"RCPT TO:<x@y> NOTIFY=NEVER\r\n", b"550 5.1.1 <x@y>: no such user\r\n")))
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = smtp_proxy("smtp_auth none;")
    with greeted(proxy) as client:
        client.send(b"EHLO client.example\r\nMAIL FROM:<a@b> SIZE=100\r\n"
                    b"RCPT TO:<x@y> NOTIFY=NEVER\r\n")
        assert client.lines(3) == [b"250 mx.test\r\n", smtp.OK,
                                   b"550 5.1.1 <x@y>: no such user\r\n"]
        client.send(b"RCPT TO:<z@y>\r\n")          # relaying goes on after a 550
        assert client.line() == b"RCPT TO:<z@y>\r\n"
    (request,) = auth_service.requests
    assert auth_headers(request) == [
        ("Auth-Method", "none"), ("Auth-User", ""), ("Auth-Pass", ""),
        ("Auth-Protocol", "smtp"), ("Auth-Login-Attempt", "1"), ("Client-IP", "127.0.0.1"),
        ("Client-Host", "[UNAVAILABLE]"), ("Auth-SMTP-Helo", "client.example"),
        ("Auth-SMTP-From", "MAIL FROM:<a@b> SIZE=100"),
        ("Auth-SMTP-To", "RCPT TO:<x@y> NOTIFY=NEVER")]
    assert finished(server).endswith(b"RCPT TO:<x@y> NOTIFY=NEVER\r\nRCPT TO:<z@y>\r\n")


@pytest.mark.parametrize("line", [b"HELO client\x00.example\r\n", b"MAIL FROM:<a\x1b@b>\r\n",
                                  b"RCPT TO:<c@d>\x08\r\n", b"MAIL FROM:<a@b>\x7f\r\n"])
def test_mx_mode_control_bytes_never_reach_the_auth_service(smtp_proxy, auth_service, line):
    """HELO, MAIL and RCPT go to the auth service as header values, where
    RFC 9110 forbids control bytes: a command holding one (TAB aside) is an
    invalid command (issue 16)."""
    proxy = smtp_proxy("smtp_auth none;")
    with greeted(proxy) as client:
        client.send(b"HELO client.example\r\n")
        assert client.line() == b"250 mx.test\r\n"
        if not line.startswith(b"HELO"):
            client.send(b"MAIL FROM:<a@b>\r\n" if line.startswith(b"RCPT") else b"")
            if line.startswith(b"RCPT"):
                assert client.line() == smtp.OK
        client.send(line)
        assert client.line() == smtp.INVALID
        client.send(b"QUIT\r\n")
        assert client.line() == smtp.BYE
    assert auth_service.requests == []


def test_mx_mode_without_xclient_replays_mail_and_rcpt_after_helo(
        smtp_proxy, auth_service, backend):
    server = backend(smtp_backend((b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"),
                                  (b"RCPT TO:<c@d>\r\n", b"250 2.1.5 Ok\r\n"),
                                  ehlo=b"HELO mx.test\r\n"))
    auth_service.reply = ok("127.0.0.1", server.port)
    converse(smtp_proxy("smtp_auth none; xclient off;"),
             b"HELO client.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n",
             [b"250 mx.test\r\n", smtp.OK, b"250 2.1.5 Ok\r\n"])
    finished(server)


def test_mx_mode_mail_clears_a_stale_login(smtp_proxy, auth_service, backend):
    """CVE-2025-53859: a refused AUTH before MAIL must not leak into the
    `none` request's Auth-User/Auth-Pass."""
    server = backend(smtp_backend(
        (b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n", b"250 ok\r\n"),
        (b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"), (b"RCPT TO:<c@d>\r\n", b"250 ok\r\n")))
    auth_service.reply = sequence(fail("Try later", wait=1), ok("127.0.0.1", server.port))
    converse(smtp_proxy("smtp_auth none plain;"),
             PLAIN_JOE + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n",
             [b"535 5.7.0 Try later\r\n", smtp.OK, b"250 ok\r\n"])
    first, second = auth_service.requests
    assert first.header("Auth-User") == "joe" and first.header("Auth-Pass") == "secret"
    assert auth_headers(second)[:5] == [
        ("Auth-Method", "none"), ("Auth-User", ""), ("Auth-Pass", ""),
        ("Auth-Protocol", "smtp"), ("Auth-Login-Attempt", "2")]
    assert b"LOGIN=" not in finished(server)


def test_auth_after_a_refused_mx_attempt_is_an_ordinary_login(smtp_proxy, auth_service, backend):
    """After RCPT is refused with Auth-Wait, a later AUTH is method `plain`:
    no Auth-SMTP-* headers, and no MAIL/RCPT replay to the backend
    (nginx decides both by the auth method)."""
    server = backend(smtp_backend((XCLIENT_JOE, b"250 ok\r\n")))
    auth_service.reply = sequence(fail("Try later", wait=1), ok("127.0.0.1", server.port))
    converse(smtp_proxy("smtp_auth none plain;"),
             b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n" + PLAIN_JOE,
             [smtp.OK, b"535 5.7.0 Try later\r\n", smtp.AUTH_OK])
    first, second = auth_service.requests
    assert first.header("Auth-SMTP-To") == "RCPT TO:<c@d>"
    assert [name for name, _ in auth_headers(second)] == [
        "Auth-Method", "Auth-User", "Auth-Pass", "Auth-Protocol", "Auth-Login-Attempt",
        "Client-IP", "Client-Host"]
    assert finished(server) == b"EHLO mx.test\r\n" + XCLIENT_JOE + b"NOOP relayed\r\n"


def test_xclient_addr_of_an_ipv6_client_has_the_ipv6_prefix(backend):
    """backend.smtp_login on its own, over loopback to a scripted backend."""
    server = backend(smtp_backend(
        (b"XCLIENT ADDR=IPV6:2001:db8::7 LOGIN=joe NAME=host.example\r\n", b"250 ok\r\n")))
    plan = SmtpPlan(server_name=b"mx.test", ehlo=True, xclient=True, client_ip="2001:db8::7",
                    client_host=b"host.example", login=b"joe", password=b"")
    stream = connect(new_socket("127.0.0.1"), "127.0.0.1", server.port, 5)
    try:
        assert smtp_login(stream, plan, 4096) == b"250 ok\r\n"
    finally:
        stream.sock.close()
    assert finished(server) == b"EHLO mx.test\r\n" \
        b"XCLIENT ADDR=IPV6:2001:db8::7 LOGIN=joe NAME=host.example\r\n"


# ------------------------------------------------------ no secret in logs

def test_no_password_or_sasl_response_reaches_the_debug_log(smtp_proxy, auth_service, backend):
    password = "Pw-7x2mR"
    server = backend(lambda index: smtp_backend(
        (b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n", b"250 ok\r\n"),
        (b"AUTH PLAIN " + b64(b"\0joe\0" + password.encode()) + b"\r\n", b"235 ok\r\n")))
    auth_service.reply = checking_auth({"joe": password}, server.port)
    proxy = smtp_proxy("smtp_auth plain login cram-md5; proxy_smtp_auth on;")
    secrets = {password, b64(password).decode(), b64(b"\0joe\0" + password.encode()).decode()}
    for attempt in range(2):                # a success, then a failure
        for flavour in ("plain", "login", "cram"):
            with greeted(proxy) as client:
                if flavour == "plain":
                    client.send(b"AUTH PLAIN " + b64(b"\0joe\0" + password.encode()) + b"\r\n")
                elif flavour == "login":
                    client.send(b"AUTH LOGIN\r\n" + b64("joe") + b"\r\n" + b64(password)
                                + b"\r\n")
                    client.lines(2)
                else:
                    client.send(b"AUTH CRAM-MD5\r\n")
                    salt = base64.b64decode(client.line()[4:-2])
                    response = b64(b"joe " + hmac.new(password.encode(), salt, "md5")
                                   .hexdigest().encode())
                    secrets.add(response.decode())
                    client.send(response + b"\r\n")
                assert client.line().startswith((b"235", b"535"))
        secrets |= {b64(b"\0joe\0" + password.encode()).decode(), b64(password).decode()}
        password += "-wrong"
        secrets.add(password)
    proxy.wait_log("client login failed")
    log = proxy.log()
    assert 'login: "joe"' in log
    for secret in secrets:
        assert secret not in log, secret


# ------------------------------------------- real clients, real Postfix

SWAKS = shutil.which("swaks")
CURL = shutil.which("curl")
POSTFIX_USERS = {"joe": "secret"}


@pytest.fixture
def postfix_proxy(start_proxy, auth_service, postfix):
    """The proxy in front of the real Postfix (XCLIENT trusted from
    loopback), with an auth service that checks passwords and digests."""
    auth_service.reply = checking_auth(POSTFIX_USERS, postfix.port)
    return start_proxy(["protocol smtp; smtp_auth plain login cram-md5;"],
                       auth=auth_service.url)


def marker():
    return f"mailproxy-{uuid.uuid4().hex}"


def message(subject, body=b"hello through the proxy\r\n"):
    return (b"From: a@example.org\r\nTo: c@example.org\r\nSubject: " + subject.encode()
            + b"\r\nMessage-ID: <" + subject.encode() + b"@test>\r\n\r\n" + body)


def delivered(postfix, subject, timeout=30):
    """The Delivery whose data holds `subject` (bounded poll)."""
    needle = subject.encode()
    found = wait_until(lambda: [d for d in postfix.deliveries() if needle in d.data],
                       timeout=timeout, interval=0.05)
    assert found, f"{subject} not delivered:\n{postfix.maillog_text()[-3000:]}"
    return found[0]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_smtplib_authenticates_and_sends_through_xclient(postfix_proxy, postfix, auth_service,
                                                         mechanism):
    subject = marker()
    with smtplib.SMTP("127.0.0.1", postfix_proxy.port, timeout=30) as client:
        client.ehlo("client.example")
        client.user, client.password = "joe", "secret"
        method = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
        code, _ = client.auth(mechanism, method)
        assert code == 235
        client.sendmail("a@example.org", ["c@example.org"], message(subject))
    delivery = delivered(postfix, subject)
    assert delivery.sender == "a@example.org"
    assert delivery.recipients == ["c@example.org"]
    queue_id = re.search(r"(\w+): message-id=<" + subject, postfix.maillog_text()).group(1)
    assert f"{queue_id}: client=unknown[127.0.0.1], sasl_method=XCLIENT, sasl_username=joe" \
        in postfix.maillog_text()
    (request,) = auth_service.requests
    assert request.header("Auth-Method") == {"CRAM-MD5": "cram-md5"}.get(mechanism, "plain")


def test_a_20_megabyte_message_arrives_intact(postfix_proxy, postfix):
    subject = marker()
    line = hashlib.sha256(subject.encode()).hexdigest().encode() + b"\r\n"
    body = b"".join(b"%08d " % n + line for n in range(20 * 1024 * 1024 // (len(line) + 9)))
    assert len(body) > 19 * 1024 * 1024
    with smtplib.SMTP("127.0.0.1", postfix_proxy.port, timeout=60) as client:
        client.login("joe", "secret")
        client.sendmail("a@example.org", ["c@example.org"], message(subject, body))
    got = delivered(postfix, subject, timeout=60).body
    assert len(got) == len(body)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(body).hexdigest()


def test_mx_mode_delivers_without_authentication(start_proxy, auth_service, postfix):
    """smtp_auth none: RCPT starts auth (method none) and the backend gets
    XCLIENT, the client's EHLO, MAIL and RCPT; the rest is relayed."""
    auth_service.reply = ok("127.0.0.1", postfix.port)
    proxy = start_proxy(["protocol smtp; smtp_auth none;"], auth=auth_service.url)
    subject = marker()
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as client:
        client.ehlo("sender.example")
        client.sendmail("a@example.org", ["c@example.org"], message(subject))
    assert delivered(postfix, subject).recipients == ["c@example.org"]
    (request,) = auth_service.requests
    assert request.header("Auth-SMTP-Helo") == "sender.example"
    # the whole command lines, as smtplib wrote them (lower-case verbs)
    assert request.header("Auth-SMTP-From") == "mail FROM:<a@example.org>"
    assert request.header("Auth-SMTP-To") == "rcpt TO:<c@example.org>"


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_auth_plain_through_to_postfix(postfix_proxy, postfix):
    subject = marker()
    run = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{postfix_proxy.port}", "--auth", "PLAIN",
         "--auth-user", "joe", "--auth-password", "secret", "--from", "a@example.org",
         "--to", "c@d", "--header", f"Subject: {subject}", "--timeout", "20"],
        capture_output=True, timeout=60)
    assert run.returncode == 0, run.stdout.decode(errors="replace")
    assert b"<-  235 2.0.0 OK\n" in run.stdout
    assert delivered(postfix, subject).recipients == ["c@d"]
    assert "sasl_method=XCLIENT, sasl_username=joe" in postfix.maillog_text()


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_smtp_through_to_postfix(postfix_proxy, postfix, tmp_path):
    subject = marker()
    mail = tmp_path / "mail.eml"
    mail.write_bytes(message(subject))
    subprocess.run([CURL, "-sS", "--max-time", "20", f"smtp://127.0.0.1:{postfix_proxy.port}",
                    "--mail-from", "a@example.org", "--mail-rcpt", "c@example.org",
                    "--user", "joe:secret", "-T", str(mail)],
                   capture_output=True, timeout=30, check=True)
    assert delivered(postfix, subject).body == b"hello through the proxy\r\n"
