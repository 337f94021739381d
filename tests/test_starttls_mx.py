"""`starttls only` on an MX listener (`smtp_auth none`), beyond nginx.

nginx accepts MAIL and RCPT in clear text on such a listener (its PR #705 is
still open); mailproxy holds the operator to `only`: MAIL, RCPT and DATA
before STARTTLS get `530 5.7.0 Must issue a STARTTLS command first` (RFC
3207 section 4), not counted as errors, and after STARTTLS the MTA delivers
as usual.  Because RFC 3207 section 4 also says a publicly referenced MX
must not require STARTTLS, `mailproxy -t` warns about such a listener.

A raw transcript, then the real clients: smtplib and swaks.
"""

import shutil
import smtplib
import subprocess

import pytest

pytest.register_assert_rewrite("certs")
from certs import Peer, client_context
from fakes import fail, ok
from mailproxy import smtp
from mailproxy.config import load

pytest_plugins = ("proxying", "certs")     # start_proxy, auth_service, backend; certs

SWAKS = shutil.which("swaks")
GREETING = b"220 mx.test ESMTP ready\r\n"
MX_ONLY = "protocol smtp; smtp_auth none; starttls only; max_errors 1;"
DENIED = fail("Relay access denied", Auth_Error_Code="554 5.7.1")


def certificate(certs):
    return f"ssl_certificate {certs.rsa.cert};\nssl_certificate_key {certs.rsa.key};\n"


def reply(peer):
    lines = [peer.line()]
    while lines[-1][3:4] == b"-" and len(lines) < 64:
        lines.append(peer.line())
    return lines


def test_mail_rcpt_and_data_wait_for_starttls_then_the_mta_delivers(start_proxy,
                                                                    auth_service, certs):
    """Refused in clear text, not counted (max_errors 1 would close), then
    accepted over TLS, where the first RCPT asks the auth service."""
    auth_service.reply = DENIED
    proxy = start_proxy([MX_ONLY], auth=auth_service.url, mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == GREETING
        peer.send(b"EHLO mta.example\r\n")
        assert reply(peer) == [b"250-mx.test\r\n", b"250 STARTTLS\r\n"]
        peer.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
                  b"NOOP\r\n")
        assert peer.lines(4) == [smtp.STARTTLS_FIRST] * 3 + [smtp.OK]
        assert smtp.STARTTLS_FIRST == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        peer.send(b"STARTTLS\r\n")
        assert peer.line() == smtp.START_TLS
        peer.starttls(client_context(certs))
        peer.send(b"EHLO mta.example\r\nMAIL FROM:<a@example.org>\r\n")
        assert peer.lines(2) == [b"250 mx.test\r\n", smtp.OK]
        peer.send(b"RCPT TO:<c@example.org>\r\n")
        assert peer.line() == b"554 5.7.1 Relay access denied\r\n"
    [request] = auth_service.requests
    assert (request.header("Auth-Method"), request.header("Auth-SSL")) == ("none", "on")
    assert "client was rejected: STARTTLS required" in proxy.log()


def test_starttls_on_still_accepts_mail_in_clear_text(start_proxy, auth_service, certs):
    """Only `only` refuses: `starttls on` lets an MTA deliver in clear text
    (RFC 3207 section 4), and DATA there is an invalid command, counted."""
    auth_service.reply = DENIED
    proxy = start_proxy(["protocol smtp; smtp_auth none; starttls on;"],
                        auth=auth_service.url, mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == GREETING
        peer.send(b"HELO mta.example\r\nDATA\r\nMAIL FROM:<a@example.org>\r\n"
                  b"RCPT TO:<c@example.org>\r\n")
        assert peer.lines(4) == [b"250 mx.test\r\n", smtp.INVALID, smtp.OK,
                                 b"554 5.7.1 Relay access denied\r\n"]


def test_smtplib_is_refused_in_clear_text_and_delivers_after_starttls(
        start_proxy, auth_service, backend, certs):
    # smtplib writes mail, rcpt and data in lower case; the proxy replays MAIL and RCPT as sent
    server = backend([
        ("send", b"220 backend.test ESMTP\r\n"), ("expect", b"EHLO mx.test\r\n"),
        ("send", b"250 backend.test\r\n"),
        ("expect", b"mail FROM:<a@example.org>\r\n"), ("send", b"250 2.1.0 Ok\r\n"),
        ("expect", b"rcpt TO:<c@example.org>\r\n"), ("send", b"250 2.1.5 Ok\r\n"),
        ("expect", b"data\r\n"), ("send", b"354 go on\r\n"),
        ("expect", b"Subject: mx\r\n"), ("expect", b"\r\n"), ("expect", b"over TLS\r\n"),
        ("expect", b".\r\n"), ("send", b"250 2.0.0 queued\r\n"),
        ("expect", b"QUIT\r\n"), ("send", b"221 bye\r\n")])
    auth_service.reply = ok("127.0.0.1", server.port)
    proxy = start_proxy([MX_ONLY + " xclient off;"], auth=auth_service.url,
                        mail=certificate(certs))
    message = b"Subject: mx\r\n\r\nover TLS\r\n"
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@example.org", ["c@example.org"], message)
        assert (refused.value.smtp_code, refused.value.smtp_error) == \
            (530, b"5.7.0 Must issue a STARTTLS command first")
        assert client.starttls(context=client_context(certs))[0] == 220
        assert client.sendmail("a@example.org", ["c@example.org"], message) == {}
    server.wait_connections(1)
    assert server.errors == []


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
@pytest.mark.parametrize("tls, expected", [
    ([], b"<** 530 5.7.0 Must issue a STARTTLS command first"),
    (["--tls"], b"<~* 554 5.7.1 Relay access denied")])
def test_swaks_without_and_with_starttls(start_proxy, auth_service, certs, tls, expected):
    auth_service.reply = DENIED
    proxy = start_proxy([MX_ONLY], auth=auth_service.url, mail=certificate(certs))
    result = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{proxy.port}", "--from", "a@example.org",
         "--to", "c@example.org", "--helo", "mta.example", "--quit-after", "RCPT", *tls],
        capture_output=True, timeout=30)
    assert expected in result.stdout, result.stdout.decode(errors="replace")
    assert len(auth_service.requests) == (1 if tls else 0)


@pytest.mark.parametrize("settings, warned", [
    ("smtp_auth none; starttls only;", True), ("smtp_auth none plain; starttls only;", True),
    ("smtp_auth none; starttls on;", False), ("smtp_auth plain; starttls only;", False)])
def test_dash_t_warns_about_an_mx_that_requires_starttls(tmp_path, certs, settings, warned):
    conf = tmp_path / "mail.conf"
    conf.write_text(f"mail {{\n  auth_http 127.0.0.1:9/auth;\n  {certificate(certs)}"
                    f"  server {{\n    listen 127.0.0.1:2525;\n    protocol smtp;\n"
                    f"    {settings}\n  }}\n}}\n")
    expected = ('"starttls only" with "smtp_auth none" refuses mail in clear text; '
                "RFC 3207 section 4: a publicly referenced MX must not require STARTTLS "
                f"in {conf}:8")
    assert (expected in load(str(conf)).warnings) == warned
