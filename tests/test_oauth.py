"""XOAUTH2 and OAUTHBEARER from clients, decided by the auth service
(issue 18 item 1; freenginx 1.27.1 behaviour).

One proxy serves IMAP, POP3 and SMTP with both mechanisms enabled, in
front of a scripted auth service (each test sets its reply) and the demo
backends.  The transcripts check the capability lists, the token string
parsed into Auth-User and Auth-Pass with an initial response and after an
empty challenge, malformed tokens, a 2,600-byte token, and the
Auth-Error-SASL exchange; then imaplib, smtplib, poplib and curl
(`--oauth2-bearer`) log in with a bearer token for real.  (swaks has no
XOAUTH2.)  No token reaches the log.
"""

import base64
import imaplib
import poplib
import shutil
import smtplib
import subprocess

import pytest

from fakes import ScriptedAuthService, fail, ok
from harness import Client, RunningProxy
from mailproxy import imap, pop3, smtp
from mailproxy.reference.demo_backends import start_backends
from mailproxy.reference.mailstore import Mailstore
from transcript import SERVER_NAME, b64, unescape

PROTOCOLS = ("imap", "pop3", "smtp")
USER, PASSWORD = "joe@example.com", "backend-secret"
TOKEN = "ya29.a0-Valid_Token~+/="       # RFC 6750 b64token characters
# The base64 of RFC 7628's JSON error, as the auth service sends it.
SASL_ERROR = base64.b64encode(b'{"status":"invalid_token","scheme":"bearer"}').decode()
TIMEOUT = 10
CRLF = b"\r\n"
CURL = shutil.which("curl")

CHALLENGE = {"imap": b"+ ", "pop3": b"+ ", "smtp": b"334 "}
FAILED = {"imap": b"a NO Invalid token\r\n", "pop3": b"-ERR Invalid token\r\n",
          "smtp": b"535 5.7.0 Invalid token\r\n"}
INVALID = {"imap": b"a " + imap.INVALID + CRLF, "pop3": pop3.INVALID, "smtp": smtp.INVALID}
SASL_SYNTAX = {"imap": b"a " + imap.INVALID + CRLF, "pop3": pop3.INVALID,
               "smtp": smtp.BAD_BASE64}
NOOP = {"imap": (b"b NOOP\r\n", b"b OK completed\r\n"), "pop3": (b"NOOP\r\n", pop3.OK),
        "smtp": (b"NOOP\r\n", smtp.OK)}


def xoauth2(user=USER, token=TOKEN):
    return b64(f"user={user}\x01auth=Bearer {token}\x01\x01")


def oauthbearer(user=USER, token=TOKEN):
    name = user.replace("=", "=3D").replace(",", "=2C")     # RFC 5801 4
    return b64(f"n,a={name},\x01host={SERVER_NAME}\x01port=143\x01auth=Bearer {token}\x01\x01")


TOKEN_STRINGS = {b"XOAUTH2": xoauth2, b"OAUTHBEARER": oauthbearer}


def auth_command(protocol, mechanism, initial=None):
    """The client's AUTHENTICATE (tag `a`) or AUTH line."""
    verb = b"a AUTHENTICATE " if protocol == "imap" else b"AUTH "
    return verb + mechanism + (b" " + initial if initial is not None else b"") + CRLF


class Site:
    """The proxy, its auth service and backends; `greeted(protocol)` is a
    Client past the greeting."""

    def __init__(self, proxy, auth, backends, store):
        self.proxy, self.auth, self.backends, self.store = proxy, auth, backends, store

    def port(self, protocol):
        return self.proxy.ports[PROTOCOLS.index(protocol)]

    def greeted(self, protocol):
        client = Client(self.port(protocol))
        assert client.line()
        return client

    def backend_port(self, protocol):
        return getattr(self.backends, f"{protocol}_port")

    def checking(self, request):
        """An auth service that knows one bearer token: the backend login
        then uses the user's password, which the auth service holds."""
        method = request.header("Auth-Method")
        user = unescape(request.header("Auth-User", "")).decode()
        token = unescape(request.header("Auth-Pass", "")).decode()
        if method in ("xoauth2", "oauthbearer") and (user, token) == (USER, TOKEN):
            return ok("127.0.0.1", self.backend_port(request.header("Auth-Protocol")),
                      Auth_Pass=PASSWORD)
        return fail("Invalid token", Auth_Error_SASL=SASL_ERROR)

    def assert_secret(self, *secrets):
        log = self.proxy.log()
        assert "session done" in log
        for secret in secrets:
            assert secret not in log


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    store = Mailstore({USER: PASSWORD})
    store.seed(USER, 2)
    servers = ["protocol imap; imap_auth plain xoauth2 oauthbearer;",
               "protocol pop3; pop3_auth plain xoauth2 oauthbearer;",
               "protocol smtp; smtp_auth plain login xoauth2 oauthbearer;"]
    with ScriptedAuthService() as auth, start_backends(store) as backends:
        proxy = RunningProxy(tmp_path_factory.mktemp("oauth"), servers=servers,
                             mail=f"auth_http {auth.url};\nserver_name {SERVER_NAME};")
        try:
            yield Site(proxy, auth, backends, store)
        finally:
            proxy.stop()


# ------------------------------------------------------------ capabilities

def test_the_capability_lists_announce_both_mechanisms(site):
    with site.greeted("imap") as client:
        client.send(b"a CAPABILITY\r\n")
        assert client.line() == (b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN "
                                 b"AUTH=XOAUTH2 AUTH=OAUTHBEARER\r\n")
    with site.greeted("pop3") as client:
        client.send(b"CAPA\r\n")
        assert client.lines(6)[4] == b"SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n"
    with site.greeted("smtp") as client:
        client.send(b"EHLO client.test\r\n")
        assert client.lines(2)[1] == b"250 AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n"


# ------------------------------------------------ what the auth service hears

@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("mechanism, user", [(b"XOAUTH2", USER),
                                             (b"OAUTHBEARER", "jo,e=x@example.com")])
@pytest.mark.parametrize("initial", [True, False], ids=["initial", "challenge"])
def test_the_auth_service_hears_the_user_and_the_bearer_token(site, protocol, mechanism,
                                                              user, initial):
    """Auth-Method names the mechanism; Auth-User is the token's user,
    Auth-Pass the token alone.  Without Auth-Error-SASL the failure comes
    at once and, without Auth-Wait, the connection closes."""
    site.auth.reply = fail("Invalid token")
    before = len(site.auth.requests)
    token = TOKEN_STRINGS[mechanism](user)
    with site.greeted(protocol) as client:
        if initial:
            client.send(auth_command(protocol, mechanism, token))
        else:
            client.send(auth_command(protocol, mechanism))
            assert client.line() == CHALLENGE[protocol] + CRLF
            client.send(token + CRLF)
        assert client.line() == FAILED[protocol]
        assert client.closed()
    request = site.auth.requests[before]
    assert request.header("Auth-Method") == mechanism.decode().lower()
    assert unescape(request.header("Auth-User")) == user.encode()
    assert request.header("Auth-Pass") == TOKEN


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("mechanism, initial", [
    (b"XOAUTH2", b"!!!!"),                                          # not base64
    (b"XOAUTH2", b64(f"auth=Bearer {TOKEN}\x01\x01")),              # no user
    (b"XOAUTH2", b64(f"user={USER}\x01auth=Basic {TOKEN}\x01\x01")),   # not Bearer
    (b"XOAUTH2", b64(f"user={USER}\x02auth=Bearer {TOKEN}\x02\x02")),  # not ^A
    (b"XOAUTH2", b64(f"user={USER}\x01auth=Bearer {TOKEN}\x01")),      # one ^A at the end
    (b"OAUTHBEARER", b64(f"n,,\x01auth=Bearer {TOKEN}\x01\x01")),      # no user
    (b"OAUTHBEARER", b64(f"n,a={USER},\x01host=mx\x01\x01")),          # no auth=
], ids=["base64", "no-user", "basic", "separator", "end", "no-authzid", "no-auth"])
def test_a_malformed_token_gets_the_syntax_error(site, protocol, mechanism, initial):
    """The auth service is not asked; the session goes on."""
    before = len(site.auth.requests)
    with site.greeted(protocol) as client:
        client.send(auth_command(protocol, mechanism, initial) + NOOP[protocol][0])
        assert client.lines(2) == [INVALID[protocol], NOOP[protocol][1]]
    assert len(site.auth.requests) == before


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_2600_byte_token_fits_the_default_buffers(site, protocol):
    """Office 365 tokens exceed 2,500 bytes: 3.5 KB of base64 on one line."""
    site.auth.reply = fail("Invalid token")
    before = len(site.auth.requests)
    token = "T" * 2600
    with site.greeted(protocol) as client:
        client.send(auth_command(protocol, b"XOAUTH2", xoauth2(token=token)))
        assert client.line() == FAILED[protocol]
    assert site.auth.requests[before].header("Auth-Pass") == token
    site.assert_secret(token)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_token_longer_than_the_buffer_is_refused_and_the_connection_closed(site, protocol):
    with site.greeted(protocol) as client:
        client.send(auth_command(protocol, b"XOAUTH2", xoauth2(token="T" * 3100)))
        assert client.line() == INVALID[protocol]
        assert client.closed()


# --------------------------------------------------- the SASL error exchange

@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("answer", [b"AQ==", b""])
def test_auth_error_sasl_is_a_challenge_answered_before_the_failure(site, protocol, answer):
    site.auth.reply = fail("Invalid token", Auth_Error_SASL=SASL_ERROR)
    with site.greeted(protocol) as client:
        client.send(auth_command(protocol, b"OAUTHBEARER", oauthbearer(token="expired")))
        assert client.line() == CHALLENGE[protocol] + SASL_ERROR.encode() + CRLF
        client.send(answer + CRLF)
        assert client.line() == FAILED[protocol]
        assert client.closed()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_answer_that_is_not_base64_gets_the_syntax_error(site, protocol):
    site.auth.reply = fail("Invalid token", Auth_Error_SASL=SASL_ERROR)
    with site.greeted(protocol) as client:
        client.send(auth_command(protocol, b"XOAUTH2", xoauth2(token="expired")))
        assert client.line() == CHALLENGE[protocol] + SASL_ERROR.encode() + CRLF
        client.send(b"*\r\n")
        assert client.line() == SASL_SYNTAX[protocol]
        assert client.closed()


def test_with_auth_wait_the_challenge_follows_the_wait_and_the_session_goes_on(site):
    site.auth.reply = fail("Invalid token", wait=1, Auth_Error_SASL=SASL_ERROR)
    with site.greeted("imap") as client:
        client.send(b"a AUTHENTICATE XOAUTH2\r\n")
        assert client.line() == b"+ \r\n"
        client.send(xoauth2(token="expired") + CRLF)
        assert client.line() == b"+ " + SASL_ERROR.encode() + CRLF
        client.send(b"\r\nb NOOP\r\n")      # the empty answer, and the next command
        assert client.lines(2) == [FAILED["imap"], b"b OK completed\r\n"]


def test_auth_error_sasl_after_plain_is_ignored(site):
    site.auth.reply = fail("Invalid token", Auth_Error_SASL=SASL_ERROR)
    with site.greeted("smtp") as client:
        client.send(b"AUTH PLAIN " + b64("\0joe\0secret") + CRLF)
        assert client.line() == FAILED["smtp"]


def test_an_auth_error_sasl_that_is_not_base64_is_an_auth_service_error(site):
    site.auth.reply = fail("Invalid token", Auth_Error_SASL="not base64!")
    with site.greeted("pop3") as client:
        client.send(auth_command("pop3", b"XOAUTH2", xoauth2()))
        assert client.line() == pop3.INTERNAL_ERROR
    site.proxy.wait_log("auth http server sent invalid Auth-Error-SASL")


# ----------------------------------------------------------- real clients

def test_imaplib_logs_in_with_xoauth2_and_oauthbearer(site):
    site.auth.reply = site.checking
    for mechanism, token in (("XOAUTH2", xoauth2()), ("OAUTHBEARER", oauthbearer())):
        client = imaplib.IMAP4("127.0.0.1", site.port("imap"), timeout=TIMEOUT)
        try:
            typ, _ = client.authenticate(mechanism, lambda _challenge: base64.b64decode(token))
            assert typ == "OK"
            assert client.select("INBOX") == ("OK", [b"2"])
        finally:
            client.logout()
    site.assert_secret(TOKEN, xoauth2().decode(), oauthbearer().decode(), PASSWORD)


def test_imaplib_answers_the_sasl_error_and_gets_no(site):
    site.auth.reply = site.checking
    answers = iter([base64.b64decode(xoauth2(token="expired")), b""])
    client = imaplib.IMAP4("127.0.0.1", site.port("imap"), timeout=TIMEOUT)
    with pytest.raises(imaplib.IMAP4.error, match="Invalid token"):
        client.authenticate("XOAUTH2", lambda _challenge: next(answers))
    client.shutdown()


def test_smtplib_logs_in_with_xoauth2_and_sends_mail(site):
    site.auth.reply = site.checking
    with smtplib.SMTP("127.0.0.1", site.port("smtp"), timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        code, _ = client.auth("XOAUTH2", lambda challenge=None: base64.b64decode(xoauth2())
                              .decode())
        assert code == 235
        assert client.sendmail("a@example.net", [USER], b"Subject: hi\r\n\r\nhello\r\n") == {}
    site.assert_secret(TOKEN, xoauth2().decode())


def test_smtplib_answers_the_sasl_error_and_gets_535(site):
    site.auth.reply = site.checking
    expired = base64.b64decode(xoauth2(token="expired")).decode()
    with smtplib.SMTP("127.0.0.1", site.port("smtp"), timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("XOAUTH2", lambda challenge=None: "" if challenge else expired)
    assert refused.value.smtp_code == 535


def test_poplib_logs_in_with_oauthbearer(site):
    site.auth.reply = site.checking
    client = poplib.POP3("127.0.0.1", site.port("pop3"), timeout=TIMEOUT)
    try:
        assert client._shortcmd("AUTH OAUTHBEARER " + oauthbearer().decode()).startswith(b"+OK")
        assert client.stat()[0] == len(site.store.messages(USER))
    finally:
        client.quit()
    site.assert_secret(TOKEN, oauthbearer().decode())


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_curl_logs_in_with_its_oauth2_bearer_option(site, protocol):
    """curl picks OAUTHBEARER when offered, with its host and port pairs."""
    site.auth.reply = site.checking
    before = len(site.auth.requests)
    url = f"{protocol}://127.0.0.1:{site.port(protocol)}/" + ("INBOX" if protocol == "imap" else "")
    extra = ["--mail-from", "a@example.net", "--mail-rcpt", USER, "-T", "-"] \
        if protocol == "smtp" else []
    done = subprocess.run([CURL, "-sS", "--max-time", "20", "--user", USER, "--oauth2-bearer",
                           TOKEN, *extra, url], input=b"Subject: curl\r\n\r\nhi\r\n",
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert site.auth.requests[before].header("Auth-Method") == "oauthbearer"
    site.assert_secret(TOKEN)
