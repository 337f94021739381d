"""The whole IMAP and POP3 path with real programs at every hop:

    imaplib / poplib / curl  ->  mailproxy  ->  reference auth service
                                     \\------------------------------->  Dovecot

The auth service is mailproxy/reference/authservice.py with a users file
written here: joe's password in clear text (so CRAM-MD5 and APOP can be
checked), ann's as a scrypt hash of a password with spaces.  Nothing is
scripted: a login succeeds only if the auth service verifies it and Dovecot
accepts what the proxy replays.  One auth service and one proxy serve the module.
"""

import hashlib
import imaplib
import poplib
import shutil
import subprocess
import time
import uuid

import pytest

import peers
from conftest import USERS
from harness import RunningProxy, reference_auth_service
from mailproxy.imap import GREETING
from mailproxy.reference.authservice import hash_password, plain_secret

POLL = 0.05                 # seconds: the auth service checks for shutdown this often
TIMEOUT = 30                # seconds any one client operation may take
BIG = 4 * 1024 * 1024 + 7   # bytes: a size no other test's message has


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def auth_service(tmp_path_factory, dovecot):
    path = tmp_path_factory.mktemp("auth") / "users.conf"
    backends = f"imap=127.0.0.1:{dovecot.imap_port} pop3=127.0.0.1:{dovecot.pop3_port}"
    path.write_text(f"# CRAM-MD5 and APOP need joe's clear text\n"
                    f"joe  {plain_secret(USERS['joe'])}  {backends}\n"
                    f"ann  {hash_password(USERS['ann'])}  {backends}\n")
    with reference_auth_service(path, POLL) as service:
        yield service


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, auth_service):
    """IMAP on ports[0], POP3 on ports[1], both asking the auth service."""
    port = auth_service.server_address[1]
    proxy = RunningProxy(tmp_path_factory.mktemp("proxy"),
                         mail=f"server_name mx.test;\nauth_http 127.0.0.1:{port}/auth;",
                         servers=["protocol imap; imap_auth plain login cram-md5;",
                                  "protocol pop3; pop3_auth plain apop cram-md5;"])
    yield proxy
    proxy.stop()


@pytest.fixture
def curl():
    path = shutil.which("curl")
    if path is None:
        if peers.in_ci():
            pytest.fail("curl is not installed under CI", pytrace=False)
        pytest.skip("curl is not installed")
    return path


def imap(proxy):
    return imaplib.IMAP4("127.0.0.1", proxy.ports[0], timeout=TIMEOUT)


def pop3(proxy):
    return poplib.POP3("127.0.0.1", proxy.ports[1], timeout=TIMEOUT)


def message(size=0):
    """A message with a unique Message-ID, padded to `size` bytes when given."""
    name = f"real-dovecot-{uuid.uuid4().hex}"
    head = (f"From: a@example.org\r\nTo: joe@example.test\r\nSubject: {name}\r\n"
            f"Message-ID: <{name}@test>\r\n\r\n").encode()
    line = hashlib.sha256(name.encode()).hexdigest().encode() + b"\r\n"
    if not size:
        return name, head + line
    body = line * ((size - len(head)) // len(line) - 1)
    rest = size - len(head) - len(body)         # one to two lines' worth
    return name, head + body + b"x" * (rest - 2) + b"\r\n"


# ------------------------------------------------------------------ IMAP

@pytest.mark.parametrize("user", ["joe", "ann"], ids=["clear text", "scrypt, spaces"])
def test_imaplib_login(proxy, user):
    client = imap(proxy)
    try:
        assert "AUTH=CRAM-MD5" in client.capabilities
        assert client.login(user, USERS[user])[0] == "OK"
        assert client.select("INBOX", readonly=True)[0] == "OK"
    finally:
        client.logout()


def test_imaplib_login_cram_md5(proxy):
    """The auth service checks the digest, then gives the proxy joe's
    password (Auth-Pass) for its LOGIN to Dovecot."""
    client = imap(proxy)
    try:
        assert client.login_cram_md5("joe", USERS["joe"])[0] == "OK"
        assert client.select("INBOX", readonly=True)[0] == "OK"
    finally:
        client.logout()


def test_wrong_password_gets_the_services_text_after_its_wait(proxy):
    """Attempt 1 fails with Auth-Wait 1: the proxy pauses a second, answers
    with the service's Auth-Status text, and lets the client try again."""
    with proxy.client(0) as client:
        assert client.line() == GREETING
        began = time.monotonic()
        client.send(b"a LOGIN joe wrong\r\n")
        assert client.line() == b"a NO Invalid login or password\r\n"
        assert time.monotonic() - began >= 0.9
        client.send(b"b LOGIN joe secret\r\n")
        answer = client.line()
        assert answer.startswith(b"b OK ") and b"Logged in" in answer, answer   # Dovecot's


def test_curl_imap_fetches_with_cram_md5(proxy, dovecot, curl):
    name, raw = message()
    dovecot.add_message("joe", raw)
    url = f"imap://joe:{USERS['joe']}@127.0.0.1:{proxy.ports[0]}/INBOX"
    search = subprocess.run([curl, "-sSv", "--max-time", "20", url, "-X",
                             f"UID SEARCH HEADER Message-ID <{name}@test>"],
                            capture_output=True, timeout=TIMEOUT)
    assert search.returncode == 0, search.stderr
    assert b"AUTHENTICATE CRAM-MD5" in search.stderr       # curl's first choice
    uid = search.stdout.split()[-1].decode()
    fetch = subprocess.run([curl, "-sS", "--max-time", "20", f"{url};UID={uid}"],
                           capture_output=True, timeout=TIMEOUT)
    assert fetch.returncode == 0, fetch.stderr
    assert fetch.stdout == raw


# ------------------------------------------------------------------ POP3

@pytest.mark.parametrize("user", ["joe", "ann"], ids=["clear text", "scrypt, spaces"])
def test_poplib_user_pass(proxy, user):
    client = pop3(proxy)
    try:
        client.user(user)
        assert client.pass_(USERS[user]).startswith(b"+OK")
        assert client.stat()[0] >= 0
    finally:
        client.quit()


def test_poplib_apop(proxy):
    client = pop3(proxy)
    try:
        assert client.apop("joe", USERS["joe"]).startswith(b"+OK")
        assert client.stat()[0] >= 0
    finally:
        client.quit()


def test_curl_pop3_lists_and_retrieves(proxy, dovecot, curl):
    name, raw = message(64 * 1024 + 3)
    dovecot.add_message("joe", raw)
    url = f"pop3://joe:{USERS['joe']}@127.0.0.1:{proxy.ports[1]}/"
    listing = subprocess.run([curl, "-sSv", "--max-time", "20", url],
                             capture_output=True, timeout=TIMEOUT)
    assert listing.returncode == 0, listing.stderr
    assert b"AUTH CRAM-MD5" in listing.stderr
    number = single_number(listing.stdout.decode().splitlines(), len(raw))
    fetched = subprocess.run([curl, "-sS", "--max-time", "20", f"{url}{number}"],
                             capture_output=True, timeout=TIMEOUT)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == raw
    remove(proxy, len(raw))


# ------------------------------------------------- a big message, two ways

def test_multi_megabyte_message_via_imap_and_pop3(proxy, dovecot):
    name, raw = message(BIG)
    assert len(raw) == BIG
    expected = hashlib.sha256(raw).hexdigest()
    dovecot.add_message("joe", raw)
    client = imap(proxy)
    try:
        client.login("joe", USERS["joe"])
        client.select("INBOX", readonly=True)
        status, found = client.uid("SEARCH", "HEADER", "Message-ID", f"<{name}@test>")
        assert status == "OK" and len(found[0].split()) == 1
        status, data = client.uid("FETCH", found[0], "(BODY.PEEK[])")
        assert status == "OK"
        assert hashlib.sha256(data[0][1]).hexdigest() == expected
    finally:
        client.logout()
    client = pop3(proxy)
    try:
        client.user("joe")
        client.pass_(USERS["joe"])
        number = single_number([entry.decode() for entry in client.list()[1]], BIG)
        lines = client.retr(number)[1]
        assert hashlib.sha256(b"\r\n".join(lines) + b"\r\n").hexdigest() == expected
        client.dele(number)             # leave the mailbox as we found it
    finally:
        client.quit()


def single_number(listing, size):
    """The message number of the one `N SIZE` listing entry of this size."""
    numbers = [int(number) for number, octets in (entry.split() for entry in listing)
               if int(octets) == size]
    assert len(numbers) == 1, listing
    return numbers[0]


def remove(proxy, size):
    client = pop3(proxy)
    try:
        client.user("joe")
        client.pass_(USERS["joe"])
        client.dele(single_number([entry.decode() for entry in client.list()[1]], size))
    finally:
        client.quit()
