"""Injection and smuggling: each test names the attack class or the CVE.

A mail proxy copies client bytes into three other languages: HTTP headers
(the auth request), the backend's protocol (the replayed login) and its own
log.  Each test sends bytes that would break out of one of them, CR, LF,
NUL, spaces, `%`, `+`, `=`, and shows where they land: escaped in the
auth request, exact inside an IMAP literal, xtext in XCLIENT, base64 in
AUTH PLAIN, refused as a bare CR, absent from the log.

Covered elsewhere, and not repeated here:
* STARTTLS command injection, CVE-2014-3556, in all three protocols:
  tests/test_tls.py ("CVE-2014-3556" section);
* PTR names with forbidden characters, CVE-2026-28753:
  tests/test_resolver.py::test_a_ptr_name_with_header_injection_is_refused_and_logged
  (a real DNS answer with CR LF in the name) and
  test_an_empty_ptr_name_or_one_with_forbidden_characters_is_tempunavail.
"""

import base64
import hashlib
import hmac

import pytest

from fakes import fail, ok, sequence
from harness import wait_until
from mailproxy import imap, pop3, smtp
from mailproxy.auth_http import escape
from mailproxy.sasl import PASSWORD_CHALLENGE
from transcript import auth_headers, b64

pytest_plugins = ("proxying",)     # start_proxy, auth_service, backend

EVIL_LOGIN = b"joe\r\nAuth-Status: OK\r\n\0 %41"
EVIL_PASSWORD = b"pw\r\nAuth-Server: 10.0.0.1\r\n\0 %"
# PLAIN separates its fields with NUL, so the SASL variants carry none.
SASL_LOGIN = EVIL_LOGIN.replace(b"\0", b"")
SASL_PASSWORD = EVIL_PASSWORD.replace(b"\0", b"")
SMTP_GREETING = b"220 mx.test ESMTP ready\r\n"
IMAP_LOGIN_SCRIPT_END = [("send", b"a OK done\r\n"), ("echo",)]


def literal_login(login, password, tag=b"a"):
    """An IMAP LOGIN with both values as non-synchronizing literals."""
    return (b"%s LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n"
            % (tag, len(login), login, len(password), password))


def wire_headers(request):
    """The header names of the raw request, in order, as the auth service
    split them: an injected header would show up here."""
    lines = request.raw.split(b"\r\n")[1:]
    return [line.split(b":", 1)[0] for line in lines if line]


# ---------------------------------------------- auth request (HTTP headers)

def test_crlf_and_nul_in_an_imap_login_are_escaped_in_the_auth_request(
        start_proxy, auth_service):
    """Auth header injection (nginx 0.3.38 and 0.6.8): CR, LF, NUL, space
    and "%" in Auth-User and Auth-Pass become %XX, so no header can be
    smuggled into the request."""
    auth_service.reply = fail("Go away")
    proxy = start_proxy(["protocol imap;"], auth=auth_service.url)
    with proxy.client() as client:
        assert client.line() == imap.GREETING
        client.send(literal_login(EVIL_LOGIN, EVIL_PASSWORD))
        assert client.line() == b"a NO Go away\r\n"
    (request,) = auth_service.requests
    assert request.header("Auth-User") == "joe%0D%0AAuth-Status:%20OK%0D%0A%00%20%2541"
    assert request.header("Auth-Pass") == "pw%0D%0AAuth-Server:%2010.0.0.1%0D%0A%00%20%25"
    assert wire_headers(request) == [b"Host", b"Auth-Method", b"Auth-User", b"Auth-Pass",
                                     b"Auth-Protocol", b"Auth-Login-Attempt", b"Client-IP",
                                     b"Client-Port", b"Server-IP", b"Server-Port"]
    assert b"\0" not in request.raw


@pytest.mark.parametrize("protocol, send, login, password", [
    ("pop3", b"AUTH PLAIN\r\n" + b64(b"\0" + SASL_LOGIN + b"\0" + SASL_PASSWORD) + b"\r\n",
     SASL_LOGIN, SASL_PASSWORD),
    ("smtp", b"AUTH PLAIN " + b64(b"\0" + SASL_LOGIN + b"\0" + SASL_PASSWORD) + b"\r\n",
     SASL_LOGIN, SASL_PASSWORD),
    ("smtp", b"AUTH LOGIN " + b64(EVIL_LOGIN) + b"\r\n" + b64(EVIL_PASSWORD) + b"\r\n",
     EVIL_LOGIN, EVIL_PASSWORD),
], ids=["pop3-plain", "smtp-plain", "smtp-login"])
def test_crlf_and_nul_from_sasl_are_escaped_in_the_auth_request(
        start_proxy, auth_service, protocol, send, login, password):
    """Auth header injection through SASL: base64 can carry any byte,
    and the decoded CR LF (and NUL, in LOGIN) are escaped like a LOGIN's."""
    auth_service.reply = fail("Go away")
    proxy = start_proxy([f"protocol {protocol};"], auth=auth_service.url)
    with proxy.client() as client:
        client.line()
        client.send(send)
        auth_service.wait_requests(1)
    (request,) = auth_service.requests
    assert request.header("Auth-User") == escape(login)
    assert request.header("Auth-Pass") == escape(password)
    assert b"Auth-Status: OK" not in request.raw and b"\0" not in request.raw
    assert [name for name in wire_headers(request) if name == b"Auth-Server"] == []


# ---------------------------------------------------- the backend's protocol

def test_imap_literal_login_reaches_the_backend_byte_exact(start_proxy, auth_service, backend):
    """IMAP command injection toward the backend: the proxy replays the
    login as synchronizing literals, so CR LF inside a login or password is
    data, never the end of a command; the bytes arrive exactly."""
    login_part = EVIL_LOGIN + b" {%d}\r\n" % len(EVIL_PASSWORD)
    server = backend([("send", b"* OK backend\r\n"),
                      ("expect", b"a LOGIN {%d}\r\n" % len(EVIL_LOGIN)),
                      ("send", b"+ go\r\n"), ("recv", len(login_part)),
                      ("send", b"+ go\r\n"), ("recv", len(EVIL_PASSWORD) + 2)]
                     + IMAP_LOGIN_SCRIPT_END)
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = start_proxy(["protocol imap;"], auth=auth_service.url)
    with proxy.client() as client:
        assert client.line() == imap.GREETING
        client.send(literal_login(EVIL_LOGIN, EVIL_PASSWORD))
        assert client.line() == b"a OK done\r\n"
    server.wait_connections(1)
    assert server.errors == []
    assert server.received[0] == (b"a LOGIN {%d}\r\n" % len(EVIL_LOGIN) + login_part
                                  + EVIL_PASSWORD + b"\r\n")


def test_pop3_user_and_pass_cannot_carry_a_line_break(start_proxy, auth_service):
    """POP3 command injection toward the backend: USER and PASS are
    replayed as lines, so a login must not hold CR or LF.  LF ends the
    command at once, and a bare CR makes it invalid: `USER joe\\rPASS x`
    is refused, never replayed as two commands."""
    proxy = start_proxy(["protocol pop3;"], auth=auth_service.url)
    with proxy.client() as client:
        client.line()
        client.send(b"USER joe\rPASS x\r\n")
        assert client.line() == pop3.INVALID
        client.send(b"USER joe\r\n")
        assert client.line() == pop3.OK
        client.send(b"PASS se\rcret\r\n")
        assert client.line() == pop3.INVALID
    assert auth_service.requests == []


def test_a_pop3_password_from_sasl_with_crlf_is_not_replayed_as_commands(
        start_proxy, auth_service, backend):
    """SASL can smuggle CR LF past the POP3 line parser; the backend login
    must then refuse to write it into USER/PASS rather than let it run
    as a second command (`PASS x` CRLF `DELE 1`)."""
    server = backend([("send", b"+OK backend\r\n"), ("recv_line",), ("send", b"+OK\r\n"),
                      ("recv_line",), ("send", b"+OK in\r\n"), ("echo",)])
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = start_proxy(["protocol pop3;"], auth=auth_service.url)
    with proxy.client() as client:
        client.line()
        client.send(b"AUTH PLAIN " + b64(b"\0joe\0x\r\nDELE 1") + b"\r\n")
        reply = client.line()
    assert reply == pop3.INTERNAL_ERROR
    assert all(b"DELE" not in received for received in server.received)
    proxy.wait_log("login or password holds CR or LF")


def test_an_smtp_login_from_sasl_with_crlf_is_not_replayed_in_auth_login(
        start_proxy, auth_service, backend):
    """SMTP command injection toward the backend: AUTH LOGIN sends the
    login and password base64-encoded, so CR LF in them cannot end a line."""
    server = backend([("send", b"220 backend\r\n"), ("expect", b"HELO mx.test\r\n"),
                      ("send", b"250 backend\r\n"), ("expect", b"AUTH LOGIN\r\n"),
                      ("send", b"334 VXNlcm5hbWU6\r\n"),
                      ("expect", b64(SASL_LOGIN) + b"\r\n"), ("send", b"334 UGFzc3dvcmQ6\r\n"),
                      ("expect", b64(SASL_PASSWORD) + b"\r\n"), ("send", b"235 ok\r\n"),
                      ("echo",)])
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = start_proxy(["protocol smtp; xclient off; proxy_smtp_auth login;"],
                        auth=auth_service.url)
    with proxy.client() as client:
        assert client.line() == SMTP_GREETING
        client.send(b"AUTH PLAIN " + b64(b"\0" + SASL_LOGIN + b"\0" + SASL_PASSWORD) + b"\r\n")
        assert client.line() == smtp.AUTH_OK
    server.wait_connections(1)
    assert server.errors == []


def test_auth_plain_to_the_backend_is_one_base64_line(start_proxy, auth_service, backend):
    """SMTP command injection toward the backend: AUTH PLAIN carries
    NUL login NUL password as one base64 token, whatever bytes they hold."""
    token = base64.b64encode(b"\0" + SASL_LOGIN + b"\0" + SASL_PASSWORD)
    server = backend([("send", b"220 backend\r\n"), ("expect", b"EHLO mx.test\r\n"),
                      ("send", b"250-backend\r\n250 XCLIENT ADDR NAME\r\n"),
                      ("expect", b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n"),
                      ("send", b"220 backend\r\n"),
                      ("expect", b"AUTH PLAIN " + token + b"\r\n"), ("send", b"235 ok\r\n"),
                      ("echo",)])
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = start_proxy(["protocol smtp; proxy_smtp_auth on;"], auth=auth_service.url)
    with proxy.client() as client:
        assert client.line() == SMTP_GREETING
        client.send(b"AUTH PLAIN " + token + b"\r\n")
        assert client.line() == smtp.AUTH_OK
    server.wait_connections(1)
    assert server.errors == []


def test_xclient_login_with_crlf_nul_and_space_is_one_xtext_attribute(
        start_proxy, auth_service, backend):
    """XCLIENT LOGIN injection (fixed in nginx 1.29.2): the login is xtext,
    so CR LF cannot start a new command and a space or "=" cannot add an
    attribute (`LOGIN=joe ADDR=10.0.0.1`)."""
    login = b"joe ADDR=10.0.0.1\r\nRCPT TO:<x@y>\0\x7f+"
    xclient = (b"XCLIENT ADDR=127.0.0.1 LOGIN=joe+20ADDR+3D10.0.0.1+0D+0ARCPT+20TO:<x@y>"
               b"+00+7F+2B NAME=[UNAVAILABLE]\r\n")
    server = backend([("send", b"220 backend\r\n"), ("expect", b"EHLO mx.test\r\n"),
                      ("send", b"250-backend\r\n250 XCLIENT ADDR NAME LOGIN\r\n"),
                      ("expect", xclient), ("send", b"220 backend\r\n"), ("echo",)])
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = start_proxy(["protocol smtp;"], auth=auth_service.url)
    with proxy.client() as client:
        assert client.line() == SMTP_GREETING
        client.send(b"AUTH LOGIN " + b64(login) + b"\r\n" + b64(b"pw") + b"\r\n")
        assert client.line() == b"334 " + PASSWORD_CHALLENGE.encode() + b"\r\n"
        assert client.line() == smtp.AUTH_OK
    server.wait_connections(1)
    assert server.errors == []


# ------------------------------------------------------------ IMAP literals

def test_an_invalid_imap_line_with_a_non_sync_literal_closes(start_proxy, auth_service):
    """IMAP literal smuggling (nginx 1.21.0): after an invalid command that
    ends in `{N+}` the next N bytes are data the proxy cannot skip safely;
    had it read on, `b LOGIN ...` hidden in them would run as a command.
    It answers BAD and closes (see also test_imap.py)."""
    proxy = start_proxy(["protocol imap;"], auth=auth_service.url)
    hidden = b"b LOGIN joe secret\r\n"
    with proxy.client() as client:
        assert client.line() == imap.GREETING
        client.send(b"a FOO {%d+}\r\n" % len(hidden) + hidden)
        assert client.line() == b"a BAD invalid command\r\n"
        assert client.closed()
    assert auth_service.requests == []


def test_a_bare_cr_after_an_imap_literal_is_refused(start_proxy, auth_service):
    """Bare CR smuggling: the rule that a CR not followed by LF makes a
    command invalid (spec 3.0) holds for the part of a line after a
    literal too, not only for its first line."""
    proxy = start_proxy(["protocol imap;"], auth=auth_service.url)
    with proxy.client() as client:
        assert client.line() == imap.GREETING
        client.send(b"a LOGIN {3+}\r\njoe pass\rword\r\n")
        assert client.line() == b"a BAD invalid command\r\n"
        client.send(b"b NOOP\r\n")
        assert client.line() == b"b OK completed\r\n"
    assert auth_service.requests == []


# ------------------------------------------------------- bare LF, bare CR

@pytest.mark.parametrize("protocol, command, answer, invalid", [
    ("imap", b"a NOOP", b"a OK completed\r\n", b"a BAD invalid command\r\n"),
    ("pop3", b"NOOP", pop3.OK, pop3.INVALID),
    ("smtp", b"NOOP", smtp.OK, smtp.INVALID),
])
def test_bare_lf_ends_a_command_and_bare_cr_makes_it_invalid(
        start_proxy, auth_service, protocol, command, answer, invalid):
    """Line-end smuggling (spec 3.0): LF alone ends a command, as in nginx;
    a CR not followed by LF is no line end and makes the command invalid,
    so `NOOP\\rQUIT` is one invalid command, not two; so is `NOOP\\r\\r\\n`."""
    proxy = start_proxy([f"protocol {protocol};"], auth=auth_service.url)
    with proxy.client() as client:
        client.line()
        client.send(command + b"\n")
        assert client.line() == answer
        client.send(command + b"\r" + command + b"\r\n")
        assert client.line() == invalid
        client.send(command + b"\r\r\n")
        assert client.line() == invalid
        client.send(command + b"\r\n")
        assert client.line() == answer


@pytest.mark.parametrize("protocol, start, challenge, invalid", [
    ("imap", b"a AUTHENTICATE PLAIN\r\n", b"+ \r\n", b"a BAD invalid command\r\n"),
    ("pop3", b"AUTH PLAIN\r\n", b"+ \r\n", pop3.INVALID),
    ("smtp", b"AUTH PLAIN\r\n", b"334 \r\n", smtp.INVALID),
])
def test_a_bare_cr_in_a_sasl_response_makes_it_invalid(
        start_proxy, auth_service, protocol, start, challenge, invalid):
    """Bare CR smuggling in a SASL response: `<base64>=\\rMAIL FROM:...`
    is not a response followed by a command, and not a response whose
    tail is quietly ignored: it is invalid, as any line with a bare CR."""
    proxy = start_proxy([f"protocol {protocol};"], auth=auth_service.url)
    with proxy.client() as client:
        client.line()
        client.send(start)
        assert client.line() == challenge
        client.send(b64(b"\0joe\0secret") + b"\rMAIL FROM:<a@b>\r\n")
        assert client.line() == invalid
    assert auth_service.requests == []


# ------------------------------------------ stale credentials and salts

def test_smtp_none_mode_sends_no_stale_credentials_or_salt(start_proxy, auth_service, backend):
    """CVE-2025-53859 (memory disclosure to the auth service with
    `smtp_auth none`): after a refused CRAM-MD5 login, MAIL FROM clears the
    credentials, so the `none` request carries an empty Auth-User and
    Auth-Pass and no Auth-Salt."""
    server = backend([("send", b"220 backend\r\n"), ("recv_line",),
                      ("send", b"250 backend\r\n"),
                      ("recv_line",), ("send", b"250 ok\r\n"),      # XCLIENT
                      ("recv_line",), ("send", b"250 ok\r\n"),      # EHLO client.test
                      ("recv_line",), ("send", b"250 ok\r\n"),      # MAIL FROM
                      ("recv_line",), ("send", b"250 rcpt ok\r\n"), ("echo",)])
    auth_service.reply = sequence(fail("Try again", wait=1), ok("127.0.0.1", server.port))
    proxy = start_proxy(["protocol smtp; smtp_auth cram-md5 none;"], auth=auth_service.url)
    with proxy.client() as client:
        assert client.line() == SMTP_GREETING
        client.send(b"EHLO client.test\r\n")
        while client.line()[3:4] == b"-":
            pass
        client.send(b"AUTH CRAM-MD5\r\n")
        salt = base64.b64decode(client.line()[4:])
        client.send(b64(b"joe " + b"d" * 32) + b"\r\n")
        assert client.line() == b"535 5.7.0 Try again\r\n"
        client.send(b"MAIL FROM:<a@b.example>\r\n")
        assert client.line() == smtp.OK
        client.send(b"RCPT TO:<c@d.example>\r\n")
        assert client.line() == b"250 rcpt ok\r\n"
    first, second = auth_service.requests
    assert first.header("Auth-Salt") == salt.decode()
    assert [(n, v) for n, v in auth_headers(second) if n in
            ("Auth-Method", "Auth-User", "Auth-Pass", "Auth-Salt")] == [
        ("Auth-Method", "none"), ("Auth-User", ""), ("Auth-Pass", "")]


def _cram(login, password, salt):
    return b64(login + b" " + hmac.new(password, salt, "md5").hexdigest().encode())


@pytest.mark.parametrize("protocol, start, challenge", [
    ("imap", b"a AUTHENTICATE CRAM-MD5\r\n", b"+ "),
    ("pop3", b"AUTH CRAM-MD5\r\n", b"+ "),
    ("smtp", b"AUTH CRAM-MD5\r\n", b"334 "),
])
def test_cram_md5_retry_after_auth_wait_sends_only_the_new_digest(
        start_proxy, auth_service, protocol, start, challenge):
    """CVE-2026-27651 (a crash with CRAM-MD5 and Auth-Wait retries, from a
    password length left over from the salted attempt): the second
    attempt's Auth-Pass is exactly its own digest, and a plain attempt
    after it carries its own short password and no Auth-Salt."""
    auth_service.reply = sequence(fail("Try again", wait=1), fail("Try again", wait=1),
                                  fail("Go away"))
    methods = {"imap": "imap_auth", "pop3": "pop3_auth", "smtp": "smtp_auth"}[protocol]
    proxy = start_proxy([f"protocol {protocol}; {methods} plain cram-md5;"],
                        auth=auth_service.url)
    refusal = {"imap": b"a NO Try again\r\n", "pop3": b"-ERR Try again\r\n",
               "smtp": b"535 5.7.0 Try again\r\n"}[protocol]
    plain = {"imap": b"a LOGIN joe pw\r\n", "pop3": b"USER joe\r\nPASS pw\r\n",
             "smtp": b"AUTH PLAIN " + b64(b"\0joe\0pw") + b"\r\n"}[protocol]
    with proxy.client() as client:
        client.line()
        digests = []
        for password in (b"first secret", b"2nd"):
            client.send(start)
            line = client.line()
            assert line.startswith(challenge)
            salt = base64.b64decode(line[len(challenge):])
            response = _cram(b"joe", password, salt)
            digests.append(base64.b64decode(response).split(b" ")[1].decode())
            client.send(response + b"\r\n")
            assert client.line() == refusal
        client.send(plain)
        if protocol == "pop3":
            assert client.line() == pop3.OK
        client.line()
    first, second, third = auth_service.requests
    assert first.header("Auth-Pass") == digests[0] and second.header("Auth-Pass") == digests[1]
    assert first.header("Auth-Salt") == second.header("Auth-Salt") == salt.decode()
    assert second.header("Auth-Login-Attempt") == "2"
    assert (third.header("Auth-Method"), third.header("Auth-Pass")) == ("plain", "pw")
    assert third.header("Auth-Salt") is None


def test_apop_retry_after_auth_wait_sends_only_the_new_digest(start_proxy, auth_service):
    """CVE-2026-27651 with APOP: a long digest refused with Auth-Wait, then
    a short one: the second Auth-Pass is the short digest alone, nothing
    left over from the first; then USER/PASS carries no salt."""
    auth_service.reply = sequence(fail("Try again", wait=1), fail("Try again", wait=1),
                                  fail("Go away"))
    proxy = start_proxy(["protocol pop3; pop3_auth plain apop;"], auth=auth_service.url)
    long_digest = hashlib.sha256(b"x").hexdigest()      # 64 characters: APOP does not check
    with proxy.client() as client:
        salt = client.line().split(b" ")[-1].strip()
        client.send(b"APOP joe " + long_digest.encode() + b"\r\n")
        assert client.line() == b"-ERR Try again\r\n"
        client.send(b"APOP joe d\r\n")
        assert client.line() == b"-ERR Try again\r\n"
        client.send(b"USER joe\r\nPASS pw\r\n")
        assert client.line() == pop3.OK
        assert client.line() == b"-ERR Go away\r\n"
    first, second, third = auth_service.requests
    assert [r.header("Auth-Pass") for r in (first, second, third)] == [long_digest, "d", "pw"]
    assert first.header("Auth-Salt") == second.header("Auth-Salt") == salt.decode()
    assert third.header("Auth-Salt") is None


# ------------------------------------------------------- secrets and logs

def test_a_percent_sign_in_a_login_cannot_break_or_drop_log_lines(start_proxy, auth_service):
    """Log injection and evasion: the login is shown in every session log
    line, so it must be text, never part of a format string.  A login like
    `joe%s%(x)s%` once made the logging call fail and the line vanish,
    among them "client login failed", the line fail2ban counts."""
    auth_service.reply = fail("Go away")
    proxy = start_proxy(["protocol imap;"], auth=auth_service.url)
    login = b"joe%s%d%(x)s%"
    with proxy.client() as client:
        client.line()
        client.send(b"a LOGIN {%d+}\r\n%s pw\r\n" % (len(login), login))
        assert client.line() == b"a NO Go away\r\n"
    proxy.wait_log('client login failed: "Go away" while in http auth state, '
                   'client: 127.0.0.1, server: 127.0.0.1:%d, login: "joe%%s%%d%%(x)s%%"'
                   % proxy.port)


SECRET = b"Tr0ub4dor&3 horse"
CRAM_KEY = b"cram key 42"


def _secret_forms(salts):
    """Every form of the secret that must stay out of the log."""
    forms = {SECRET, b64(SECRET), b64(b"\0joe\0" + SECRET), b64(b"joe\0joe\0" + SECRET),
             escape(SECRET).encode(), SECRET.replace(b" ", b"\\x20"), *SECRET.split(b" ")}
    for salt in salts:
        digest = hmac.new(CRAM_KEY, salt, "md5").hexdigest().encode()
        forms |= {digest, b64(b"joe " + digest),
                  hashlib.md5(salt + SECRET).hexdigest().encode()}
    return {form for form in forms if form}


def _logins(protocol):
    """(what to send, how many lines answer) for every way to log in,
    plus malformed variants that still carry the secret."""
    s = SECRET
    return {
        "imap": [b'a LOGIN joe "%s"\r\n' % s, b"a LOGIN joe {%d}\r\n%s\r\n" % (len(s), s),
                 b"a LOGIN joe {%d+}\r\n%s\r\n" % (len(s), s),
                 b"a AUTHENTICATE PLAIN " + b64(b"\0joe\0" + s) + b"\r\n",
                 b"a AUTHENTICATE PLAIN\r\n" + b64(b"joe\0joe\0" + s) + b"\r\n",
                 b"a AUTHENTICATE LOGIN " + b64(b"joe") + b"\r\n" + b64(s) + b"\r\n",
                 b'a LOGIN joe "%s" extra\r\n' % s, b"a LOGIN joe %s\r\n" % s,
                 b"a AUTHENTICATE PLAIN " + b64(b"\0joe\0" + s) + b"!\r\n"],
        "pop3": [b"USER joe\r\nPASS %s\r\n" % s,
                 b"AUTH PLAIN " + b64(b"\0joe\0" + s) + b"\r\n",
                 b"AUTH LOGIN\r\n" + b64(b"joe") + b"\r\n" + b64(s) + b"\r\n",
                 b"USER joe\r\nPASS %s\rx\r\n" % s],
        "smtp": [b"AUTH PLAIN " + b64(b"\0joe\0" + s) + b"\r\n",
                 b"AUTH PLAIN\r\n" + b64(b"\0joe\0" + s) + b"\r\n",
                 b"AUTH LOGIN " + b64(b"joe") + b"\r\n" + b64(s) + b"\r\n",
                 b"AUTH PLAIN " + b64(b"\0joe\0" + s) + b" extra junk\r\n"],
    }[protocol]


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_no_secret_reaches_the_log_at_debug_level_with_trace_on(
        start_proxy, auth_service, protocol):
    """Secrets in logs (STYLE.md habit 9): every mechanism, and malformed
    logins that still carry the password, at `debug` with `trace on`;
    neither the password, its base64 and %-escaped forms, nor the APOP and
    CRAM-MD5 digests appear in the log."""
    auth_service.reply = fail("Go away")
    methods = {"imap": "imap_auth plain login cram-md5;",
               "pop3": "pop3_auth plain apop cram-md5;",
               "smtp": "smtp_auth plain login cram-md5;"}[protocol]
    proxy = start_proxy([f"protocol {protocol}; {methods} trace on;"], auth=auth_service.url)
    salts = []
    bye = b"z LOGOUT\r\n" if protocol == "imap" else b"QUIT\r\n"
    for send in _logins(protocol):
        with proxy.client() as client:
            client.line()
            client.send(send + bye)        # the malformed ones leave the session open
            for _ in range(20):
                if client.closed():
                    break
    cram = {"imap": b"a AUTHENTICATE CRAM-MD5\r\n", "pop3": b"AUTH CRAM-MD5\r\n",
            "smtp": b"AUTH CRAM-MD5\r\n"}[protocol]
    with proxy.client() as client:
        client.line()
        client.send(cram)
        salt = base64.b64decode(client.line().split(b" ", 1)[1])
        salts.append(salt)
        digest = hmac.new(CRAM_KEY, salt, "md5").hexdigest().encode()
        client.send(b64(b"joe " + digest) + b"\r\n")
        assert client.line().endswith(b"Go away\r\n") and client.closed()
    if protocol == "pop3":
        with proxy.client() as client:
            salt = client.line().split(b" ")[-1].strip()
            salts.append(salt)
            client.send(b"APOP joe %s\r\n" % hashlib.md5(salt + SECRET).hexdigest().encode())
            assert client.line() == b"-ERR Go away\r\n" and client.closed()
    assert wait_until(lambda: not proxy.session_threads())
    log = proxy.log().encode("utf-8", "replace")
    assert b"] " in log and b" C: " in log, "trace lines expected in the log"
    leaked = sorted(form for form in _secret_forms(salts) if form in log)
    assert leaked == [], f"secrets in the log: {leaked}"
