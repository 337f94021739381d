"""The whole SMTP path with real programs at every hop:

    smtplib / swaks / curl  ->  mailproxy  ->  reference auth service
                                    \\------------------------------->  Postfix

The auth service is mailproxy/reference/authservice.py with a users file
written here; Postfix trusts XCLIENT from loopback, so a login shows in its
maillog as `sasl_method=XCLIENT, sasl_username=...`.  Two listeners share one
proxy: submission (AUTH PLAIN, LOGIN, CRAM-MD5) and MX (`smtp_auth none`,
where the recipient's local part picks the user, hence the backend).
"""

import re
import shutil
import smtplib
import subprocess
import time
import uuid

import pytest

import peers
from harness import RunningProxy, reference_auth_service, wait_until
from mailproxy.reference.authservice import hash_password, plain_secret

POLL = 0.05                 # seconds: the auth service checks for shutdown this often
TIMEOUT = 30                # seconds any one client operation or delivery may take
PASSWORDS = {"joe": "secret", "ann": "pa ss word"}
JOE = "joe@example.test"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def auth_service(tmp_path_factory, postfix):
    """joe in clear text (CRAM-MD5 needs it); ann hashed, and known to the
    backend under another name."""
    path = tmp_path_factory.mktemp("auth") / "users.conf"
    backend = f"smtp=127.0.0.1:{postfix.port}"
    path.write_text(f"joe  {plain_secret(PASSWORDS['joe'])}  {backend}\n"
                    f"ann  {hash_password(PASSWORDS['ann'])}  {backend}"
                    f"  auth-user=ann@example.org\n")
    with reference_auth_service(path, POLL) as service:
        yield service


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, auth_service):
    """Submission on ports[0], MX on ports[1]."""
    port = auth_service.server_address[1]
    proxy = RunningProxy(tmp_path_factory.mktemp("proxy"),
                         mail=f"server_name mx.test;\nauth_http 127.0.0.1:{port}/auth;",
                         servers=["protocol smtp; smtp_auth plain login cram-md5;",
                                  "protocol smtp; smtp_auth none;"])
    yield proxy
    proxy.stop()


def program(name):
    path = shutil.which(name)
    if path is None:
        if peers.in_ci():
            pytest.fail(f"{name} is not installed under CI", pytrace=False)
        pytest.skip(f"{name} is not installed")
    return path


def message(sender=JOE, recipient=JOE):
    """(subject, bytes): a message whose Subject is unique, and its body."""
    subject = f"real-postfix-{uuid.uuid4().hex}"
    return subject, (f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
                     f"Message-ID: <{subject}@test>\r\n\r\n{BODY}").encode()


BODY = "hello through the proxy\r\nand the reference auth service\r\n"


def delivered(postfix, subject):
    """The Delivery holding `subject` (bounded poll)."""
    found = wait_until(lambda: [d for d in postfix.deliveries() if subject.encode() in d.data],
                       timeout=TIMEOUT, interval=0.05)
    assert found, f"{subject} not delivered:\n{postfix.maillog_text()[-3000:]}"
    return found[0]


def client_line(postfix, subject):
    """What Postfix logged as `client=...` for the message (XCLIENT's view)."""
    log = postfix.maillog_text()
    queue_id = re.search(r"(\w+): message-id=<" + subject, log).group(1)
    return re.search(rf"{queue_id}: (client=.*)", log).group(1)


# ------------------------------------------------------------ submission

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_smtplib_authenticates_and_sends(proxy, postfix, mechanism):
    subject, data = message()
    with smtplib.SMTP("127.0.0.1", proxy.ports[0], timeout=TIMEOUT) as client:
        client.ehlo("client.example")
        client.user, client.password = "joe", PASSWORDS["joe"]
        method = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
        assert client.auth(mechanism, method)[0] == 235
        assert client.sendmail(JOE, [JOE], data) == {}
    delivery = delivered(postfix, subject)
    assert (delivery.sender, delivery.recipients) == (JOE, [JOE])
    assert delivery.body == BODY.encode()
    assert client_line(postfix, subject) == \
        "client=unknown[127.0.0.1], sasl_method=XCLIENT, sasl_username=joe"


def test_auth_user_renames_the_login_toward_postfix(proxy, postfix):
    """ann's scrypt password is checked; Postfix sees her backend name."""
    subject, data = message(sender="ann@example.org")
    with smtplib.SMTP("127.0.0.1", proxy.ports[0], timeout=TIMEOUT) as client:
        client.ehlo("client.example")
        client.user, client.password = "ann", PASSWORDS["ann"]
        # not login(): it would try CRAM-MD5 first, which a hash cannot check
        assert client.auth("PLAIN", client.auth_plain)[0] == 235
        client.sendmail("ann@example.org", [JOE], data)
    assert delivered(postfix, subject).body == BODY.encode()
    assert client_line(postfix, subject).endswith("sasl_username=ann@example.org")


def test_wrong_password_is_refused(proxy):
    """535 with the service's text, after its Auth-Wait of a second."""
    with smtplib.SMTP("127.0.0.1", proxy.ports[0], timeout=TIMEOUT) as client:
        client.ehlo("client.example")
        client.user, client.password = "joe", "wrong"
        began = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.auth("PLAIN", client.auth_plain)     # one attempt (login() tries three)
        assert time.monotonic() - began >= 0.9
    assert (info.value.smtp_code, info.value.smtp_error) == \
        (535, b"5.7.0 Invalid login or password")


def test_swaks_auth_plain(proxy, postfix):
    swaks = program("swaks")
    subject = f"real-postfix-{uuid.uuid4().hex}"
    run = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{proxy.ports[0]}", "--auth", "PLAIN",
         "--auth-user", "joe", "--auth-password", PASSWORDS["joe"],
         "--from", JOE, "--to", JOE, "--header", f"Subject: {subject}",
         "--header", f"Message-Id: <{subject}@test>", "--timeout", "20"],
        capture_output=True, timeout=TIMEOUT * 2)
    assert run.returncode == 0, run.stdout.decode(errors="replace")
    assert b"<-  235 2.0.0 OK\n" in run.stdout
    assert delivered(postfix, subject).recipients == [JOE]
    assert client_line(postfix, subject).endswith("sasl_username=joe")


def test_curl_smtp_with_user(proxy, postfix, tmp_path):
    curl = program("curl")
    subject, data = message()
    mail = tmp_path / "mail.eml"
    mail.write_bytes(data)
    run = subprocess.run([curl, "-sSv", "--max-time", "20",
                          f"smtp://127.0.0.1:{proxy.ports[0]}", "--mail-from", JOE,
                          "--mail-rcpt", JOE, "--user", f"joe:{PASSWORDS['joe']}",
                          "-T", str(mail)], capture_output=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert b"> AUTH CRAM-MD5" in run.stderr          # curl's first choice
    assert delivered(postfix, subject).body == BODY.encode()
    assert client_line(postfix, subject).endswith("sasl_username=joe")


# --------------------------------------------------------------- MX mode

def test_mx_mode_delivers_to_a_known_local_part_without_auth(proxy, postfix):
    subject, data = message(sender="a@example.org")
    with smtplib.SMTP("127.0.0.1", proxy.ports[1], timeout=TIMEOUT) as client:
        client.ehlo("sender.example")
        assert "auth" not in client.esmtp_features
        assert client.sendmail("a@example.org", [JOE], data) == {}
    delivery = delivered(postfix, subject)
    assert (delivery.sender, delivery.recipients) == ("a@example.org", [JOE])
    assert delivery.body == BODY.encode()
    assert "sasl_username" not in client_line(postfix, subject)


def test_mx_mode_refuses_an_unknown_recipient(proxy):
    _, data = message(sender="a@example.org", recipient="nobody@example.test")
    with smtplib.SMTP("127.0.0.1", proxy.ports[1], timeout=TIMEOUT) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            client.sendmail("a@example.org", ["nobody@example.test"], data)
    assert info.value.recipients == {"nobody@example.test": (550, b"5.1.1 User unknown")}
