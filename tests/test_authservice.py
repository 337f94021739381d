"""The reference auth service (mailproxy/reference/authservice.py), over real HTTP.

Each test runs the service on a loopback port, in a thread, and asks it what
the proxy would ask: one GET whose headers carry the credentials (nginx's
auth_http protocol, docs/auth-protocol.md).  The answers are compared header
by header, in order.  The users file, `set_password` and the `mailproxy
auth-service` command (in-process and as a real process) come last.

Time-based policy (lockout, reload) is tested by shortening the module's own
constants with monkeypatch: that is configuration, not mocking.
"""

import base64
import hashlib
import hmac
import http.client
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import free_port, reference_auth_service, wait_until
from mailproxy.cli import main
from mailproxy.reference import authservice
from mailproxy.reference.authservice import (INVALID, LOCKED, UsersFileError, hash_password,
                                             parse_users, plain_secret, set_password)

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 15          # seconds for `mailproxy auth-service` to listen or exit
STOP_TIMEOUT = 10           # seconds for it to exit after a signal
POLL = 0.05                 # seconds: serve_forever checks for shutdown this often
SALT = "<1896.697170952@postoffice.example.net>"     # RFC 1939 7's APOP timestamp

# joe and jörg keep clear text (they may use CRAM-MD5 and APOP).  The
# fixture writes ann's scrypt hash of "pa ss word" in place of ANN, and
# pct's "100% sure" in place of PCT ({PLAIN-B64}: it holds a space).
USERS = """\
# login  password  backends
joe   {PLAIN}secret  imap=127.0.0.1:1143 pop3=127.0.0.1:1110 smtp=127.0.0.1:1025
ann   ANN  imap=127.0.0.1:2143  smtp=127.0.0.1:2025  auth-user=ann@example.org  # renamed

pct   PCT  imap=127.0.0.1:3143
jörg  {PLAIN}pässwörd  imap=127.0.0.1:4143
"""
ANN_PASSWORD = "pa ss word"
OK_JOE_IMAP = [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", "1143")]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ann_secret():
    """One scrypt hash for the module (each costs ~60 ms)."""
    return hash_password(ANN_PASSWORD)


@pytest.fixture
def users_path(tmp_path, ann_secret):
    path = tmp_path / "users.conf"
    text = USERS.replace("ANN", ann_secret, 1).replace("PCT", plain_secret("100% sure"), 1)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def service(users_path):
    with reference_auth_service(users_path, POLL) as service:
        yield service


# ------------------------------------------------------------ the client

def ask(address, **headers):
    """GET /auth with `headers` (Auth_User -> Auth-User, values str or raw
    bytes, or a list of them for a header sent once per item), as the proxy
    sends it; the reply's Auth-* headers, in order."""
    connection = http.client.HTTPConnection(*address[:2], timeout=10)
    try:
        connection.putrequest("GET", "/auth", skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", "127.0.0.1")
        for name, values in headers.items():
            for value in values if isinstance(values, list) else [values]:
                connection.putheader(name.replace("_", "-"), value)
        connection.endheaders()
        response = connection.getresponse()
        assert response.read() == b""
        assert response.status == 200
        return [(name, value) for name, value in response.getheaders()
                if name.startswith("Auth-")]
    finally:
        connection.close()


def login(service, user="joe", password="secret", method="plain", protocol="imap",
          attempt=1, client="127.0.0.1", salt=None, failed=()):
    """The request of a client login, in nginx's header order.  `user` and
    `password` are given as on the wire (%XX-escaped)."""
    headers = {"Auth_Method": method, "Auth_User": user, "Auth_Pass": password}
    if salt is not None:
        headers["Auth_Salt"] = salt
    headers.update(Auth_Protocol=protocol, Auth_Login_Attempt=str(attempt), Client_IP=client)
    if failed:
        headers["Auth_Backend_Failed"] = list(failed)
    return ask(service.server_address, **headers)


def cram_md5(password, salt=SALT):
    """RFC 2195: the hex HMAC-MD5 of the challenge, keyed with the password."""
    return hmac.new(password.encode(), salt.encode(), hashlib.md5).hexdigest()


def apop(password, salt=SALT):
    """RFC 1939 7: the hex MD5 of the timestamp and the password."""
    return hashlib.md5((salt + password).encode()).hexdigest()


def refused(wait="1"):
    return [("Auth-Status", INVALID), ("Auth-Wait", wait)]


# -------------------------------------------------------------- admitted

def test_plain_login_gets_the_backend_and_no_password(service):
    """The proxy already has the password the client typed."""
    assert login(service) == OK_JOE_IMAP


def test_a_failed_backend_makes_way_for_the_next_of_the_users_list(tmp_path):
    """proxy_backend_tries: the proxy asks again with Auth-Backend-Failed
    (IPv6 as [addr]:port); with none left, a temporary failure."""
    path = tmp_path / "users.conf"
    path.write_text("joe {PLAIN}secret smtp=127.0.0.1:1025,[::1]:2025,127.0.0.1:3025\n")
    with reference_auth_service(path, POLL) as service:
        def backend(*failed):
            return login(service, protocol="smtp", failed=failed)[1:3]
        assert backend() == [("Auth-Server", "127.0.0.1"), ("Auth-Port", "1025")]
        assert backend("127.0.0.1:1025") == [("Auth-Server", "::1"), ("Auth-Port", "2025")]
        assert backend("127.0.0.1:1025", "[::1]:2025") == \
            [("Auth-Server", "127.0.0.1"), ("Auth-Port", "3025")]
        assert login(service, protocol="smtp", failed=(
            "127.0.0.1:1025", "[::1]:2025", "127.0.0.1:3025")) == \
            [("Auth-Status", authservice.UNAVAILABLE), ("Auth-Error-Code", "454 4.7.0")]
        assert ask(service.server_address, Auth_Method="none", Auth_User="", Auth_Pass="",
                   Auth_Protocol="smtp", Auth_SMTP_To="RCPT TO:<joe@example.org>",
                   Auth_Backend_Failed=["127.0.0.1:1025"])[1:3] == \
            [("Auth-Server", "::1"), ("Auth-Port", "2025")]       # MX mode too


@pytest.mark.parametrize("protocol, port", [("pop3", "1110"), ("smtp", "1025")])
def test_each_protocol_goes_to_its_own_backend(service, protocol, port):
    assert login(service, protocol=protocol) == [
        ("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", port)]


def test_scrypt_user_with_escaped_spaces_and_auth_user(service):
    assert login(service, "ann", "pa%20ss%20word") == [
        ("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", "2143"),
        ("Auth-User", "ann@example.org")]


def test_escaped_percent_and_raw_utf8_are_decoded(service):
    """The proxy escapes control bytes, space and "%", and sends UTF-8 raw."""
    assert login(service, "pct", "100%25%20sure")[0] == ("Auth-Status", "OK")
    assert login(service, "j%C3%B6rg", "p%C3%A4ssw%C3%B6rd")[0] == ("Auth-Status", "OK")
    assert login(service, "jörg".encode(), "pässwörd".encode())[0] == ("Auth-Status", "OK")


def test_cram_md5_is_checked_and_answered_with_the_password(service):
    assert login(service, "joe", cram_md5("secret"), method="cram-md5", salt=SALT) == \
        OK_JOE_IMAP + [("Auth-Pass", "secret")]


def test_cram_md5_digest_in_upper_case_is_accepted(service):
    digest = cram_md5("secret").upper()
    assert login(service, "joe", digest, method="cram-md5", salt=SALT)[0] == ("Auth-Status", "OK")


def test_apop_is_checked_and_answered_with_the_password(service):
    assert login(service, "joe", apop("secret"), method="apop", protocol="pop3", salt=SALT) == [
        ("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", "1110"),
        ("Auth-Pass", "secret")]


def test_a_password_sent_back_is_utf8_on_the_wire(service):
    """The proxy uses Auth-Pass raw: it must get the UTF-8 bytes."""
    answer = login(service, "jörg".encode(), cram_md5("pässwörd"), method="cram-md5", salt=SALT)
    assert answer[0] == ("Auth-Status", "OK")
    assert answer[-1][0] == "Auth-Pass"
    assert answer[-1][1].encode("latin-1") == "pässwörd".encode()     # http.client reads latin-1


# --------------------------------------------------------------- refused

def test_wrong_password_is_refused_with_a_wait(service):
    assert login(service, password="wrong") == refused() \
        == [("Auth-Status", "Invalid login or password"), ("Auth-Wait", "1")]


@pytest.mark.parametrize("request_", [
    dict(user="nobody", password="secret"),
    dict(user="ann", password="pa%20ss%20word", protocol="pop3"),     # no pop3= backend
    dict(user="joe", password="Secret"),
    dict(user="joe", password=cram_md5("wrong"), method="cram-md5", salt=SALT),
    dict(user="joe", password=cram_md5("secret"), method="cram-md5",
         salt="<1.2@other.example>"),
    dict(user="joe", password=apop("wrong"), method="apop", protocol="pop3", salt=SALT),
    dict(user="ann", password=cram_md5(ANN_PASSWORD), method="cram-md5", salt=SALT),
    dict(user="ann", password=apop(ANN_PASSWORD), method="apop", salt=SALT),
    dict(user="joe", password="", method="external"),
], ids=["unknown user", "no backend for the protocol", "wrong case", "wrong cram-md5",
        "cram-md5 of another salt", "wrong apop", "cram-md5 needs clear text",
        "apop needs clear text", "external"])
def test_refusals(service, request_):
    assert login(service, **request_) == refused()


def test_auth_wait_doubles_with_the_attempt_up_to_max_wait_then_stops(service):
    """Attempts 1..11, each from its own address (no lockout): no Auth-Wait
    from MAX_ATTEMPTS on, so the proxy closes the session."""
    waits = [dict(login(service, password="wrong", attempt=n, client=f"10.0.0.{n}"))
             .get("Auth-Wait") for n in range(1, 12)]
    assert waits == ["1", "2", "4", "8", "8", "8", "8", "8", "8", None, None]
    assert (authservice.MAX_WAIT, authservice.MAX_ATTEMPTS) == (8, 10)


@pytest.mark.parametrize("attempt", ["0", "x", "\N{SUPERSCRIPT TWO}", ""])
def test_a_strange_attempt_number_counts_as_the_first(service, attempt):
    assert ask(service.server_address, Auth_Method="plain", Auth_User="joe",
               Auth_Pass="wrong", Auth_Protocol="imap",
               Auth_Login_Attempt=attempt.encode("latin-1"), Client_IP="10.1.1.1") == refused()


def test_smtp_refusal_leaves_the_error_code_to_the_proxy(service):
    """No Auth-Error-Code: the proxy answers `535 5.7.0` (nginx's default)."""
    assert login(service, password="wrong", protocol="smtp") == refused()


# --------------------------------------------------------------- lockout

def test_lockout_after_failures_and_other_addresses_unaffected(service, monkeypatch):
    monkeypatch.setattr(authservice, "FAILURES_BEFORE_LOCKOUT", 3)
    for attempt, wait in [(1, "1"), (2, "2"), (3, "4")]:
        assert login(service, password="wrong", attempt=attempt, client="10.9.9.9") \
            == refused(wait)
    # the right password no longer helps, over any protocol
    assert login(service, client="10.9.9.9") == [("Auth-Status", LOCKED)]
    assert login(service, protocol="smtp", client="10.9.9.9") == [
        ("Auth-Status", "Too many failures, try again later"),
        ("Auth-Error-Code", "454 4.7.0")]
    assert login(service, client="10.9.9.10") == OK_JOE_IMAP


def test_lockout_ends_after_lockout_time(service, monkeypatch):
    monkeypatch.setattr(authservice, "FAILURES_BEFORE_LOCKOUT", 2)
    monkeypatch.setattr(authservice, "LOCKOUT_TIME", 0.3)
    for _ in range(2):
        login(service, password="wrong", client="10.8.8.8")
    assert login(service, client="10.8.8.8") == [("Auth-Status", LOCKED)]
    assert wait_until(lambda: login(service, client="10.8.8.8") == OK_JOE_IMAP, timeout=3)


def test_successes_do_not_count_toward_the_lockout(service, monkeypatch):
    monkeypatch.setattr(authservice, "FAILURES_BEFORE_LOCKOUT", 2)
    for _ in range(4):
        assert login(service, client="10.7.7.7") == OK_JOE_IMAP


# ---------------------------------------------------------------- MX mode

def mx(service, rcpt):
    """What the proxy asks when RCPT TO comes in with `smtp_auth none`."""
    return ask(service.server_address, Auth_Method="none", Auth_User="", Auth_Pass="",
               Auth_Protocol="smtp", Auth_Login_Attempt="1", Client_IP="192.0.2.1",
               Client_Host="[UNAVAILABLE]", Auth_SMTP_Helo="sender.example",
               Auth_SMTP_From="MAIL FROM:<a@example.org>", Auth_SMTP_To=rcpt)


@pytest.mark.parametrize("rcpt, port", [("RCPT TO:<joe@example.test>", "1025"),
                                        ("rcpt TO:<ann@anywhere.example> NOTIFY=NEVER", "2025"),
                                        ("RCPT TO:joe@example.test", "1025")])
def test_mx_mode_routes_by_the_recipients_local_part(service, rcpt, port):
    assert mx(service, rcpt) == [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"),
                                 ("Auth-Port", port)]


@pytest.mark.parametrize("rcpt", ["RCPT TO:<bob@example.test>", "RCPT TO:<pct@example.test>",
                                  "RCPT TO:<>"])
def test_mx_mode_unknown_recipient_is_550(service, rcpt):
    """pct exists but has no smtp= backend."""
    assert mx(service, rcpt) == [("Auth-Status", "User unknown"),
                                 ("Auth-Error-Code", "550 5.1.1")]


# ------------------------------------------------------------ users file

def test_users_file_comments_backends_and_auth_user(users_path, ann_secret):
    users = parse_users(users_path)
    assert sorted(users) == ["ann", "joe", "jörg", "pct"]
    assert users["joe"].secret == "{PLAIN}secret"
    assert users["joe"].clear_text == "secret"
    assert users["joe"].backends == {"imap": [("127.0.0.1", 1143)],
                                     "pop3": [("127.0.0.1", 1110)], "smtp": [("127.0.0.1", 1025)]}
    assert users["joe"].backend_login is None
    assert users["ann"].secret == ann_secret and users["ann"].clear_text is None
    assert users["ann"].backend_login == "ann@example.org"
    assert users["pct"].clear_text == "100% sure"


def test_ipv6_backend_and_a_user_without_backends(tmp_path):
    path = tmp_path / "users.conf"
    path.write_text("v6 {PLAIN}x imap=[::1]:143,127.0.0.1:143 pop3=::1:110\nidle {PLAIN}y\n")
    users = parse_users(path)
    assert users["v6"].backends == {"imap": [("::1", 143), ("127.0.0.1", 143)],
                                    "pop3": [("::1", 110)]}
    assert users["idle"].backends == {}


@pytest.mark.parametrize("line, message", [
    ("joe", "expected 'login password [backends]'"),
    ("joe {PLAIN}s3cr3t imap", "expected key=value, got 'imap'"),
    ("joe {PLAIN}s3cr3t imap=127.0.0.1", "bad backend '127.0.0.1': expected IP:PORT"),
    ("joe {PLAIN}s3cr3t imap=127.0.0.1:", "bad backend '127.0.0.1:'"),
    ("joe {PLAIN}s3cr3t imap=127.0.0.1:65536", "bad backend '127.0.0.1:65536'"),
    ("joe {PLAIN}s3cr3t imap=127.0.0.1:\N{SUPERSCRIPT TWO}", "bad backend"),
    ("joe {PLAIN}s3cr3t imap=127.0.0.1:143, ", "bad backend ''"),
    ("joe {PLAIN}s3cr3t token-url=https://t.test client-id=c refresh-token=r",
     "OAuth account without client-secret"),
    ("joe {PLAIN}s3cr3t token-url=ftp://t.test client-id=c client-secret=s refresh-token=r",
     "token-url is not an http(s) URL: 'ftp://t.test'"),
    ("joe {PLAIN}s3cr3t token-url=https://t.test client-id=c client-secret=s refresh-token=r "
     "backend-auth=plain", "backend-auth must be one of xoauth2, oauthbearer"),
    ("joe {PLAIN}s3cr3t imap=localhost:143", "bad backend 'localhost:143': expected IP:PORT"),
    ("joe {PLAIN}s3cr3t ldap=127.0.0.1:389", "unknown key 'ldap'"),
    ("joe s3cr3t imap=127.0.0.1:143", "unknown password scheme"),
    ("joe {MD5}s3cr3t", "unknown password scheme"),
    ("joe {PLAIN-B64}s3cr3t*", "bad {PLAIN-B64} password"),
    ("joe " + plain_secret("s3cr3t\r\nAuth-Status: OK"), "control characters"),
])
def test_users_file_errors_name_the_file_and_line(tmp_path, line, message):
    """...and never quote a password."""
    path = tmp_path / "users.conf"
    path.write_text(f"# users\nann {{PLAIN}}x imap=127.0.0.1:143\n{line}\n", encoding="utf-8")
    with pytest.raises(UsersFileError) as info:
        parse_users(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)
    assert "s3cr3t" not in str(info.value)


def test_plain_secret_forms(tmp_path):
    assert plain_secret("secret") == "{PLAIN}secret"
    assert plain_secret("pa ss") == "{PLAIN-B64}" + base64.b64encode(b"pa ss").decode()
    assert plain_secret("a#b") == "{PLAIN-B64}" + base64.b64encode(b"a#b").decode()
    path = tmp_path / "users.conf"
    odd = "no\N{NO-BREAK SPACE}break"
    path.write_text(f"u {plain_secret('pa ss#wörd')}\nv {plain_secret(odd)}\n", encoding="utf-8")
    assert parse_users(path)["u"].clear_text == "pa ss#wörd"
    assert parse_users(path)["v"].clear_text == odd


def test_hash_password_is_salted_scrypt_that_a_login_verifies(tmp_path, ann_secret):
    assert re.fullmatch(r"\{SCRYPT\}16384\$8\$1\$[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{88}",
                        ann_secret)
    assert hash_password(ANN_PASSWORD) != ann_secret
    path = tmp_path / "users.conf"
    path.write_text(f"ann {ann_secret} imap=127.0.0.1:2143\n")
    with reference_auth_service(path, POLL) as service:
        assert login(service, "ann", "pa%20ss%20word")[0] == ("Auth-Status", "OK")
        assert login(service, "ann", "pa%20ss%20word%20") == refused()


# ---------------------------------------------------------------- reload

@pytest.fixture
def fast_reload(monkeypatch):
    monkeypatch.setattr(authservice, "RELOAD_CHECK", 0.05)
    return 0.2                      # seconds to wait: well over RELOAD_CHECK


def test_an_edited_file_is_reloaded(service, users_path, fast_reload):
    assert login(service, "bob", "pw", client="10.2.0.1") == refused()
    set_password(users_path, "bob", "pw", plain=True)
    with open(users_path, "a") as file:
        file.write("carl {PLAIN}pw imap=127.0.0.1:5143\n")
    time.sleep(fast_reload)
    assert login(service, "carl", "pw")[0] == ("Auth-Status", "OK")
    assert login(service, "bob", "pw", client="10.2.0.2") == refused()     # no imap= backend
    set_password(users_path, "joe", "changed")
    time.sleep(fast_reload)
    assert login(service, "joe", "changed") == OK_JOE_IMAP
    assert login(service, "joe", "secret", client="10.2.0.3") == refused()


def test_a_broken_file_on_reload_keeps_the_old_users(service, users_path, fast_reload):
    users_path.write_text("joe {PLAIN}other imap=127.0.0.1:1143\nbroken\n")
    time.sleep(fast_reload)
    assert login(service) == OK_JOE_IMAP
    assert login(service, "ann", "pa%20ss%20word")[0] == ("Auth-Status", "OK")
    users_path.write_text("joe {PLAIN}other imap=127.0.0.1:1143\n")
    time.sleep(fast_reload)
    assert login(service, "joe", "other") == OK_JOE_IMAP
    assert login(service, "ann", "pa%20ss%20word", client="10.3.0.1") == refused()


# ---------------------------------------------------------- set_password

def test_set_password_replaces_one_password_and_keeps_every_other_line(users_path):
    users_path.chmod(0o640)
    before = users_path.read_text(encoding="utf-8").splitlines()
    inode = users_path.stat().st_ino
    set_password(users_path, "joe", "new pw")
    after = users_path.read_text(encoding="utf-8").splitlines()
    changed = [index for index, (old, new) in enumerate(zip(before, after)) if old != new]
    assert len(after) == len(before) and changed == [1]
    assert re.fullmatch(r"joe \{SCRYPT\}\S+ imap=127\.0\.0\.1:1143 pop3=127\.0\.0\.1:1110 "
                        r"smtp=127\.0\.0\.1:1025", after[1])
    joe = parse_users(users_path)["joe"]
    assert authservice.check_password(joe, b"new pw")
    assert not authservice.check_password(joe, b"secret")
    # written beside and renamed over: a reader sees the old file or the new
    assert users_path.stat().st_ino != inode
    assert [p.name for p in users_path.parent.iterdir()] == ["users.conf"]
    assert stat.S_IMODE(users_path.stat().st_mode) == 0o640


def test_set_password_keeps_a_trailing_comment(users_path):
    set_password(users_path, "ann", "x y", plain=True)
    line = users_path.read_text(encoding="utf-8").splitlines()[2]
    assert line == ("ann {PLAIN-B64}eCB5 imap=127.0.0.1:2143 smtp=127.0.0.1:2025 "
                    "auth-user=ann@example.org # renamed")


def test_set_password_adds_a_user_and_creates_the_file(tmp_path):
    path = tmp_path / "new.conf"
    set_password(path, "joe", "secret", plain=True)
    set_password(path, "ann", "pa ss word", plain=True)
    assert path.read_text() == "joe {PLAIN}secret\nann {PLAIN-B64}cGEgc3Mgd29yZA==\n"


@pytest.mark.parametrize("bad", ["", "jo e", "jo#e", "joe\n"])
def test_set_password_refuses_a_login_the_file_cannot_hold(tmp_path, bad):
    path = tmp_path / "users.conf"
    with pytest.raises(ValueError):
        set_password(path, bad, "x")
    assert not path.exists()


# ------------------------------------------------------------------- CLI

def cli(*args):
    return CliRunner().invoke(main, ["auth-service", *map(str, args)], catch_exceptions=False)


def test_cli_passwd_writes_a_scrypt_hash(users_path):
    result = cli("-u", users_path, "passwd", "joe", "--password", "n3w")
    assert result.exit_code == 0
    assert result.stderr == f'mailproxy: password for "joe" written to {users_path}\n'
    joe = parse_users(users_path)["joe"]
    assert joe.secret.startswith("{SCRYPT}16384$8$1$")
    assert authservice.check_password(joe, b"n3w")
    assert joe.backends["pop3"] == [("127.0.0.1", 1110)]


def test_cli_passwd_plain_for_digest_users(tmp_path):
    path = tmp_path / "users.conf"
    assert cli("-u", path, "passwd", "bob", "--plain", "--password", "a b").exit_code == 0
    assert path.read_text() == "bob {PLAIN-B64}YSBi\n"


def test_cli_users_file_error_exits_1_naming_file_and_line(tmp_path):
    path = tmp_path / "users.conf"
    path.write_text("joe {PLAIN}x\nann {PLAIN}y pop=127.0.0.1:110\n")
    result = cli("-u", path, "--listen", f"127.0.0.1:{free_port()}")
    assert result.exit_code == 1
    assert result.stderr == f"mailproxy: [emerg] {path}:2: unknown key 'pop'\n"


def test_cli_missing_users_file_exits_1(tmp_path):
    result = cli("-u", tmp_path / "none.conf", "--listen", f"127.0.0.1:{free_port()}")
    assert result.exit_code == 1
    assert "No such file or directory" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_serves_until_a_signal(users_path, signum):
    """`python mailproxy.py auth-service` as a real process: it answers a
    login over HTTP, then a signal stops it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "mailproxy.py", "auth-service", "-u", str(users_path),
         "--listen", f"127.0.0.1:{port}"], cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: process.poll() is not None or _listening(port),
                          timeout=START_TIMEOUT, interval=0.05)
        assert process.poll() is None, process.communicate()
        assert ask(("127.0.0.1", port), Auth_Method="plain", Auth_User="joe",
                   Auth_Pass="secret", Auth_Protocol="imap", Auth_Login_Attempt="1",
                   Client_IP="127.0.0.1") == OK_JOE_IMAP
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=STOP_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=STOP_TIMEOUT)
    # Ctrl-C and SIGTERM (systemd's stop) both end it cleanly.
    assert process.returncode == 0
    assert stderr.decode().startswith(
        f"mailproxy: auth service for {users_path} listening on 127.0.0.1:{port}\n")
    assert b"Traceback" not in stderr


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# ----------------------------------------------------- what an attacker sees

def _cpu_of_decide(service, **headers):
    """The median CPU time of three decisions on the same request."""
    times = []
    for _ in range(3):
        started = time.process_time()
        service.decide(headers)
        times.append(time.process_time() - started)
    return sorted(times)[1]


def test_an_unknown_login_costs_as_much_as_a_known_ones_check(service):
    """An unknown login is checked against a decoy scrypt hash, so the time
    to refuse it names no account (it was 100 times faster)."""
    known = _cpu_of_decide(service, **{"Auth-Method": "plain", "Auth-User": "ann",
                                       "Auth-Pass": "wrong", "Auth-Protocol": "imap",
                                       "Client-IP": "10.1.1.1"})
    unknown = _cpu_of_decide(service, **{"Auth-Method": "plain", "Auth-User": "nobody",
                                         "Auth-Pass": "wrong", "Auth-Protocol": "imap",
                                         "Client-IP": "10.1.1.2"})
    assert unknown >= known / 2, (unknown, known)


def test_the_failure_table_forgets_the_oldest_addresses(service, monkeypatch):
    """One-off addresses (a scan) cannot grow the table without bound."""
    monkeypatch.setattr(authservice, "MAX_TRACKED", 100)
    for number in range(500):
        service.failures.add(f"10.2.{number // 250}.{number % 250}")
    assert len(service.failures.recent) <= 100
    assert "10.2.1.249" in service.failures.recent        # the newest are kept


# ------------------------------------------- bearer tokens (XOAUTH2, OAUTHBEARER)

BEARER_USERS = """\
tom  {PLAIN}backend-pw  imap=127.0.0.1:5143 smtp=127.0.0.1:5025 bearer=ya29.tom-token
sue  {PLAIN}pw  imap=127.0.0.1:6143
"""


@pytest.fixture
def bearer_service(tmp_path):
    path = tmp_path / "users.conf"
    path.write_text(BEARER_USERS)
    with reference_auth_service(path, POLL) as service:
        yield service


@pytest.mark.parametrize("method", ["xoauth2", "oauthbearer"])
def test_a_bearer_token_from_the_users_file_admits_with_the_backend_password(bearer_service,
                                                                           method):
    assert login(bearer_service, "tom", "ya29.tom-token", method=method) == [
        ("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", "5143"),
        ("Auth-Pass", "backend-pw")]


@pytest.mark.parametrize("user, token, method", [
    ("tom", "ya29.wrong", "xoauth2"), ("tom", "backend-pw", "oauthbearer"),
    ("sue", "pw", "xoauth2"), ("nobody", "ya29.tom-token", "oauthbearer")],
    ids=["wrong token", "the password is no token", "no bearer= key", "unknown user"])
def test_a_refused_token_gets_an_auth_error_sasl_challenge(bearer_service, user, token, method):
    assert login(bearer_service, user, token, method=method) == refused() + [
        ("Auth-Error-SASL", authservice.BEARER_ERROR)]
    assert base64.b64decode(authservice.BEARER_ERROR) == \
        b'{"status":"invalid_token","schemes":"bearer"}'


def test_a_bearer_token_is_no_password(bearer_service):
    assert login(bearer_service, "tom", "ya29.tom-token") == refused()
