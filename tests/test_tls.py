"""TLS toward clients, as a client hears it (spec 1.9, 2.2, 3.0-3.3 and 5).

Conversations over loopback, byte for byte, in clear text and then inside
TLS: implicit TLS (`listen ... ssl`) and STARTTLS/STLS for IMAP, POP3 and
SMTP; what each `starttls` mode advertises and refuses; the CVE-2014-3556
rule that nothing pipelined after STARTTLS is ever run; certificates and
protocol settings; client certificates and the Auth-SSL-* headers the auth
service receives; misbehaving TLS clients; and the relay's two threads
sharing one TLS connection under load.

Real clients wherever they exist (imaplib, poplib, smtplib, curl,
`openssl s_client`), the real Dovecot and Postfix as backends; the test PKI
comes from certs.py.  Reply texts are imported from the protocol modules.
"""

import fcntl
import hashlib
import imaplib
import os
import poplib
import re
import shutil
import smtplib
import ssl
import struct
import subprocess
import termios
import threading
import time
import urllib.parse
import uuid

import pytest

pytest.register_assert_rewrite("certs")     # a plugin below, imported before pytest loads it
import peers
from certs import CLIENT_SERIAL, PASSPHRASE, UNUSUAL_SUBJECT, Peer, client_context, pump
from fakes import ScriptedBackend, fail, ok, sequence
from harness import free_port, wait_until
from mailproxy import directives, imap, pop3, smtp
from mailproxy.config import ConfigError, load
from transcript import b64, checking_auth

pytest_plugins = ("proxying", "certs")     # start_proxy, shared_proxy, auth_service; certs

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
USERS = {"joe": "secret"}

IMAP_CAPS = b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n"
IMAP_CAPS_BY_MODE = {
    "off": IMAP_CAPS,
    "on": b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN STARTTLS\r\n",
    "only": b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS STARTTLS LOGINDISABLED\r\n"}
POP3_CAPA = [b"+OK Capability list follows\r\n", b"TOP\r\n", b"USER\r\n", b"UIDL\r\n",
             b"SASL PLAIN LOGIN\r\n", b".\r\n"]
POP3_CAPA_BY_MODE = {
    "off": POP3_CAPA,
    "on": POP3_CAPA[:-1] + [b"STLS\r\n", b".\r\n"],
    "only": [b"+OK Capability list follows\r\n", b"TOP\r\n", b"UIDL\r\n", b"STLS\r\n",
             b".\r\n"]}
SMTP_CAPS = "smtp_capabilities PIPELINING 8BITMIME;"
SMTP_EHLO = [b"250-mx.test\r\n", b"250-PIPELINING\r\n", b"250-8BITMIME\r\n",
             b"250 AUTH PLAIN LOGIN\r\n"]
SMTP_EHLO_BY_MODE = {
    "off": SMTP_EHLO,
    "on": SMTP_EHLO[:-1] + [b"250-AUTH PLAIN LOGIN\r\n", b"250 STARTTLS\r\n"],
    "only": SMTP_EHLO[:-1] + [b"250 STARTTLS\r\n"]}
SMTP_GREETING = b"220 mx.test ESMTP ready\r\n"

IMAP_STARTTLS_OK = b"a OK completed\r\n"
BIG = 32 * 1024 * 1024          # bytes each way in the relay-under-TLS test
RELAY_TIMEOUT = 120             # seconds for that whole exchange (a bound, not a goal)


# ---------------------------------------------------------------- helpers

def certificate(certs, pair=None):
    """The server-certificate directives for `pair` (default: RSA)."""
    pair = pair or certs.rsa
    return f"ssl_certificate {pair.cert};\nssl_certificate_key {pair.key};\n"


def implicit(start_proxy, body, certs, settings="", **kwargs):
    """A proxy whose server has a plain listener (proxy.port) and a
    `listen ... ssl` one; returns (proxy, the TLS port)."""
    port = free_port()
    proxy = start_proxy([f"{body}\nlisten 127.0.0.1:{port} ssl;"],
                        mail=certificate(certs) + settings, **kwargs)
    return proxy, port


def tls_peer(port, context):
    """A Peer that connected to an implicit-TLS listener and handshook."""
    peer = Peer.connect(port)
    try:
        peer.starttls(context)
    except BaseException:
        peer.close()
        raise
    return peer


def reply(peer):
    """One SMTP reply, multi-line included (bounded)."""
    lines = []
    for _ in range(32):
        lines.append(peer.line())
        if lines[-1][3:4] != b"-":
            return lines
    raise AssertionError(f"no end of the multi-line reply: {lines}")


def ssl_headers(request):
    """The Auth-SSL* headers of an auth request, in order."""
    return [(name, value) for name, value in request.headers if name.startswith("Auth-SSL")]


def after_client_ip(request):
    """Every header after Client-IP, in order (what TLS adds, and extras),
    but the connection's Client-Port, Server-IP and Server-Port (checked in
    test_client_address.py)."""
    names = [name for name, _ in request.headers]
    return [(name, value) for name, value in request.headers[names.index("Client-IP") + 1:]
            if name not in ("Client-Port", "Server-IP", "Server-Port")]


def client_cert_headers(certs):
    """The certificate headers nginx sends for `certs.client` (spec 2.2, 5.3):
    DNs as OpenSSL prints them in RFC 2253 form, the serial as OpenSSL's hex
    (two digits per byte: CLIENT_SERIAL is 0xC0FFEE123), SHA-1 of the DER."""
    return [("Auth-SSL-Subject", "CN=joe,O=Mailproxy Tests,C=DE"),
            ("Auth-SSL-Issuer", "CN=Mailproxy Test CA,O=Mailproxy Tests,C=DE"),
            ("Auth-SSL-Serial", "0C0FFEE123"),
            ("Auth-SSL-Fingerprint", hashlib.sha1(certs.client.der).hexdigest())]


def marker():
    return f"mailproxy-tls-{uuid.uuid4().hex}"


def imap_backend(then=()):
    """A scripted IMAP backend that takes the LOGIN the proxy replays for
    joe/secret (spec 4.2), then plays `then`."""
    return ScriptedBackend([("send", b"* OK backend ready\r\n"),
                            ("expect", b"a LOGIN {3}\r\n"), ("send", b"+ OK\r\n"),
                            ("expect", b"joe {6}\r\n"), ("send", b"+ OK\r\n"),
                            ("expect", b"secret\r\n"), ("send", b"a OK Logged in\r\n"),
                            *then])


def require(tool, name):
    if tool is None:
        if peers.in_ci():
            pytest.fail(f"{name} is not installed (required under CI)")
        pytest.skip(f"{name} is not installed")


# ------------------------------------------------ implicit TLS, real clients

def test_imaplib_logs_in_over_implicit_tls_to_dovecot(start_proxy, auth_service, dovecot,
                                                      certs):
    auth_service.reply = ok("127.0.0.1", dovecot.imap_port)
    _, port = implicit(start_proxy, "protocol imap;", certs, auth=auth_service.url)
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_context(certs),
                           timeout=10) as client:
        assert client.capabilities == ("IMAP4", "IMAP4REV1", "UIDPLUS", "AUTH=PLAIN")
        assert client.login("joe", "secret")[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        version, cipher = client.sock.version(), client.sock.cipher()[0]
    [request] = auth_service.requests
    assert ssl_headers(request) == [("Auth-SSL", "on"), ("Auth-SSL-Protocol", version),
                                    ("Auth-SSL-Cipher", cipher)]
    assert version == "TLSv1.3"


def test_poplib_logs_in_over_implicit_tls_to_dovecot(start_proxy, auth_service, dovecot,
                                                     certs):
    auth_service.reply = ok("127.0.0.1", dovecot.pop3_port)
    _, port = implicit(start_proxy, "protocol pop3;", certs, auth=auth_service.url)
    client = poplib.POP3_SSL("127.0.0.1", port, context=client_context(certs), timeout=10)
    try:
        assert client.getwelcome() == pop3.GREETING
        assert "STLS" not in client.capa()
        client.user("joe")
        assert client.pass_("secret").startswith(b"+OK")
        assert client.stat()[0] >= 0
    finally:
        client.quit()
    [request] = auth_service.requests
    assert request.header("Auth-SSL") == "on"


def test_smtplib_sends_over_implicit_tls_to_postfix(start_proxy, auth_service, postfix, certs):
    auth_service.reply = checking_auth(USERS, postfix.port)
    _, port = implicit(start_proxy, "protocol smtp;", certs, auth=auth_service.url)
    subject = marker()
    with smtplib.SMTP_SSL("127.0.0.1", port, context=client_context(certs),
                          timeout=30) as client:
        client.ehlo("client.example")
        assert not client.has_extn("starttls")
        assert client.login("joe", "secret")[0] == 235
        client.sendmail("a@example.org", ["c@example.org"],
                        b"Subject: " + subject.encode() + b"\r\n\r\nover TLS\r\n")
    found = wait_until(lambda: [d for d in postfix.deliveries() if subject.encode() in d.data],
                       timeout=30, interval=0.05)
    assert found, postfix.maillog_text()[-2000:]
    [request] = auth_service.requests
    assert request.header("Auth-SSL") == "on"


# --------------------------------------------------- STARTTLS, real clients

def test_imaplib_starttls_then_login_to_dovecot(start_proxy, auth_service, dovecot, certs):
    auth_service.reply = ok("127.0.0.1", dovecot.imap_port)
    proxy = start_proxy(["protocol imap; starttls only;"], auth=auth_service.url,
                        mail=certificate(certs))
    with imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10) as client:
        assert "LOGINDISABLED" in client.capabilities
        assert client.starttls(ssl_context=client_context(certs))[0] == "OK"
        assert client.capabilities == ("IMAP4", "IMAP4REV1", "UIDPLUS", "AUTH=PLAIN")
        assert client.login("joe", "secret")[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
    [request] = auth_service.requests
    assert request.header("Auth-SSL") == "on"
    assert request.header("Auth-SSL-Protocol") == "TLSv1.3"


def test_poplib_stls_then_login_to_dovecot(start_proxy, auth_service, dovecot, certs):
    auth_service.reply = ok("127.0.0.1", dovecot.pop3_port)
    proxy = start_proxy(["protocol pop3; starttls on;"], auth=auth_service.url,
                        mail=certificate(certs))
    client = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
    try:
        assert "STLS" in client.capa()
        assert client.stls(context=client_context(certs)) == b"+OK"
        assert "STLS" not in client.capa()
        client.user("joe")
        assert client.pass_("secret").startswith(b"+OK")
    finally:
        client.quit()
    [request] = auth_service.requests
    assert request.header("Auth-SSL") == "on"


def test_smtplib_starttls_then_login_and_send_to_postfix(start_proxy, auth_service, postfix,
                                                         certs):
    auth_service.reply = checking_auth(USERS, postfix.port)
    proxy = start_proxy(["protocol smtp; starttls only;"], auth=auth_service.url,
                        mail=certificate(certs))
    subject = marker()
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        assert client.starttls(context=client_context(certs))[0] == 220
        client.ehlo("client.example")
        assert not client.has_extn("starttls") and client.has_extn("auth")
        assert client.login("joe", "secret")[0] == 235
        client.sendmail("a@example.org", ["c@example.org"],
                        b"Subject: " + subject.encode() + b"\r\n\r\nafter STARTTLS\r\n")
    found = wait_until(lambda: [d for d in postfix.deliveries() if subject.encode() in d.data],
                       timeout=30, interval=0.05)
    assert found, postfix.maillog_text()[-2000:]
    [request] = auth_service.requests
    assert request.header("Auth-SSL") == "on"


# ------------------------------------ what each starttls mode advertises

@pytest.mark.parametrize("mode", ["off", "on", "only"])
def test_imap_capability_by_starttls_mode_before_and_after_tls(shared_proxy, certs, mode):
    proxy = shared_proxy([f"protocol imap; starttls {mode};"], mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a CAPABILITY\r\n")
        assert peer.lines(2) == [IMAP_CAPS_BY_MODE[mode], b"a OK completed\r\n"]
        if mode == "off":
            return
        peer.send(b"b STARTTLS\r\n")
        assert peer.line() == b"b OK completed\r\n"
        peer.starttls(client_context(certs))
        peer.send(b"c CAPABILITY\r\n")          # no new greeting comes first
        assert peer.lines(2) == [IMAP_CAPS, b"c OK completed\r\n"]


@pytest.mark.parametrize("mode", ["off", "on", "only"])
def test_pop3_capa_by_starttls_mode_before_and_after_tls(shared_proxy, certs, mode):
    proxy = shared_proxy([f"protocol pop3; starttls {mode};"], mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == pop3.GREETING + b"\r\n"
        peer.send(b"CAPA\r\n")
        assert peer.lines(len(POP3_CAPA_BY_MODE[mode])) == POP3_CAPA_BY_MODE[mode]
        if mode == "off":
            return
        peer.send(b"STLS\r\n")
        assert peer.line() == b"+OK\r\n"
        peer.starttls(client_context(certs))
        peer.send(b"CAPA\r\n")
        assert peer.lines(len(POP3_CAPA)) == POP3_CAPA


@pytest.mark.parametrize("mode", ["off", "on", "only"])
def test_smtp_ehlo_by_starttls_mode_before_and_after_tls(shared_proxy, certs, mode):
    proxy = shared_proxy([f"protocol smtp; starttls {mode}; {SMTP_CAPS}"],
                         mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == SMTP_GREETING
        peer.send(b"EHLO client.example\r\n")
        assert reply(peer) == SMTP_EHLO_BY_MODE[mode]
        if mode == "off":
            return
        peer.send(b"STARTTLS\r\n")
        assert peer.line() == smtp.START_TLS == b"220 2.0.0 Start TLS\r\n"
        peer.starttls(client_context(certs))
        peer.send(b"EHLO client.example\r\n")
        assert reply(peer) == SMTP_EHLO


def test_an_implicit_tls_listener_offers_and_accepts_no_starttls(start_proxy, certs):
    """STARTTLS on a connection that is TLS already is an invalid command,
    not counted (spec 5.1); CAPABILITY/CAPA/EHLO leave it out."""
    ports = [free_port() for _ in range(3)]
    start_proxy([f"protocol imap; listen 127.0.0.1:{ports[0]} ssl;",
                 f"protocol pop3; listen 127.0.0.1:{ports[1]} ssl;",
                 f"protocol smtp; listen 127.0.0.1:{ports[2]} ssl; {SMTP_CAPS}"],
                mail=certificate(certs) + "starttls on; max_errors 2;")
    context = client_context(certs)
    with tls_peer(ports[0], context) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a CAPABILITY\r\nb STARTTLS\r\nc STARTTLS\r\nd NOOP\r\n")
        assert peer.lines(5) == [IMAP_CAPS, b"a OK completed\r\n", b"b BAD invalid command\r\n",
                                 b"c BAD invalid command\r\n", b"d OK completed\r\n"]
    with tls_peer(ports[1], context) as peer:
        assert peer.line() == pop3.GREETING + b"\r\n"
        peer.send(b"CAPA\r\nSTLS\r\nSTLS\r\nNOOP\r\n")
        assert peer.lines(len(POP3_CAPA) + 3) == POP3_CAPA + [pop3.INVALID, pop3.INVALID,
                                                                pop3.OK]
    with tls_peer(ports[2], context) as peer:
        assert peer.line() == SMTP_GREETING
        peer.send(b"EHLO x\r\n")
        assert reply(peer) == SMTP_EHLO
        peer.send(b"STARTTLS\r\nSTARTTLS\r\nNOOP\r\n")
        assert peer.lines(3) == [smtp.INVALID, smtp.INVALID, smtp.OK]


# --------------------------------------- refusals: starttls off and only

@pytest.mark.parametrize("protocol, greeting, lines, refusal, final", [
    ("imap", imap.GREETING, b"a STARTTLS\r\nb STARTTLS\r\nc STARTTLS\r\nd NOOP\r\n",
     [b"a BAD invalid command\r\n", b"b BAD invalid command\r\n",
      b"c BAD invalid command\r\n"], b"d OK completed\r\n"),
    ("pop3", pop3.GREETING + b"\r\n", b"STLS\r\nSTLS\r\nSTLS\r\nNOOP\r\n",
     [pop3.INVALID] * 3, pop3.OK),
    ("smtp", SMTP_GREETING, b"STARTTLS\r\nSTARTTLS\r\nSTARTTLS\r\nNOOP\r\n",
     [smtp.INVALID] * 3, smtp.OK),
])
def test_starttls_off_makes_starttls_an_invalid_command_not_counted(
        shared_proxy, protocol, greeting, lines, refusal, final):
    proxy = shared_proxy([f"protocol {protocol}; starttls off; max_errors 2;"])
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == greeting
        peer.send(lines)
        assert peer.lines(4) == refusal + [final]


def test_starttls_only_blocks_imap_login_and_authenticate_not_counted(shared_proxy, certs):
    proxy = shared_proxy(["protocol imap; starttls only; max_errors 2;"],
                         mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a LOGIN joe secret\r\nb AUTHENTICATE PLAIN " + b64(b"\0joe\0secret")
                  + b"\r\nc AUTHENTICATE LOGIN\r\nd NOOP\r\n")
        assert peer.lines(4) == [b"a BAD invalid command\r\n", b"b BAD invalid command\r\n",
                                 b"c BAD invalid command\r\n", b"d OK completed\r\n"]


def test_starttls_only_blocks_pop3_user_apop_and_auth_not_counted(shared_proxy, certs):
    proxy = shared_proxy(["protocol pop3; starttls only; max_errors 2; pop3_auth plain apop;"],
                         mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line().startswith(pop3.GREETING + b" <")
        peer.send(b"USER joe\r\nAPOP joe 0123456789abcdef0123456789abcdef\r\n"
                  b"AUTH PLAIN " + b64(b"\0joe\0secret") + b"\r\nAUTH\r\nNOOP\r\n")
        assert peer.lines(5) == [pop3.INVALID] * 4 + [pop3.OK]


def test_starttls_only_blocks_smtp_auth_not_counted(shared_proxy, certs):
    proxy = shared_proxy([f"protocol smtp; starttls only; max_errors 2; {SMTP_CAPS}"],
                         mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == SMTP_GREETING
        peer.send(b"AUTH PLAIN " + b64(b"\0joe\0secret") + b"\r\nAUTH LOGIN\r\n"
                  b"AUTH PLAIN\r\nNOOP\r\n")
        assert peer.lines(4) == [smtp.INVALID] * 3 + [smtp.OK]


def test_smtp_forgets_helo_mail_and_rcpt_after_starttls(start_proxy, auth_service, certs):
    """RFC 3207 4.2, spec 3.0: after the handshake a RCPT needs a new MAIL,
    and the auth request shows no HELO name; Auth-SSL-* follow the
    Auth-SMTP-* headers and come before auth_http_header extras."""
    auth_service.reply = fail("Relay access denied", Auth_Error_Code="554 5.7.1")
    proxy = start_proxy(["protocol smtp; smtp_auth none; starttls on;"],
                        auth=auth_service.url,
                        mail=certificate(certs) + "auth_http_header X-Secret s3cr3t;")
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == SMTP_GREETING
        peer.send(b"EHLO mta.example\r\n")
        reply(peer)
        peer.send(b"MAIL FROM:<a@example.org>\r\n")
        assert peer.line() == smtp.OK
        peer.send(b"STARTTLS\r\n")
        assert peer.line() == smtp.START_TLS
        sock = peer.starttls(client_context(certs))
        peer.send(b"RCPT TO:<c@example.org>\r\n")
        assert peer.line() == smtp.BAD_SEQUENCE
        peer.send(b"MAIL FROM:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n")
        assert peer.lines(2) == [smtp.OK, b"554 5.7.1 Relay access denied\r\n"]
        version, cipher = sock.version(), sock.cipher()[0]
    [request] = auth_service.requests
    assert after_client_ip(request) == [
        ("Client-Host", "[UNAVAILABLE]"), ("Auth-SMTP-Helo", ""),
        ("Auth-SMTP-From", "MAIL FROM:<b@example.org>"),
        ("Auth-SMTP-To", "RCPT TO:<c@example.org>"),
        ("Auth-SSL", "on"), ("Auth-SSL-Protocol", version), ("Auth-SSL-Cipher", cipher),
        ("X-Secret", "s3cr3t")]


# ------------------------------------------------------- CVE-2014-3556

def test_imap_command_pipelined_after_starttls_is_never_run(start_proxy, auth_service, certs):
    """CVE-2014-3556: `a STARTTLS` and `b LOGIN` in one send; the LOGIN sent
    in clear text must be dropped, not run inside the TLS session."""
    proxy = start_proxy(["protocol imap; starttls on;"], auth=auth_service.url,
                        mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a STARTTLS\r\nb LOGIN joe secret\r\n")
        assert peer.line() == IMAP_STARTTLS_OK
        peer.starttls(client_context(certs))            # nothing else came in clear text
        peer.send(b"c NOOP\r\n")
        assert peer.line() == b"c OK completed\r\n"     # not a reply to b LOGIN
    assert auth_service.requests == []


def test_pop3_command_pipelined_after_stls_is_never_run(start_proxy, auth_service, certs):
    """CVE-2014-3556: `STLS` and `USER joe` in one send; had USER run, the
    PASS after the handshake would start a login instead of being refused."""
    proxy = start_proxy(["protocol pop3; starttls on;"], auth=auth_service.url,
                        mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == pop3.GREETING + b"\r\n"
        peer.send(b"STLS\r\nUSER joe\r\n")
        assert peer.line() == pop3.OK
        peer.starttls(client_context(certs))
        peer.send(b"PASS secret\r\n")
        assert peer.line() == pop3.INVALID
    assert auth_service.requests == []


def test_smtp_command_pipelined_after_starttls_is_never_run(start_proxy, auth_service, certs):
    """CVE-2014-3556: `STARTTLS` and `AUTH PLAIN ...` in one send; the AUTH
    never reaches the auth service, the next reply answers our NOOP."""
    proxy = start_proxy(["protocol smtp; starttls on;"], auth=auth_service.url,
                        mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == SMTP_GREETING
        peer.send(b"STARTTLS\r\nAUTH PLAIN " + b64(b"\0joe\0secret") + b"\r\n")
        assert peer.line() == smtp.START_TLS
        peer.starttls(client_context(certs))
        peer.send(b"NOOP\r\n")
        assert peer.line() == smtp.OK
    assert auth_service.requests == []


# ------------------------------------------------------------ certificates

def test_rsa_and_ecdsa_certificates_are_both_served(start_proxy, certs):
    """ssl_certificate is repeatable: a TLS 1.2 client that only takes
    ECDSA suites gets the ECDSA certificate, an RSA-only one the RSA one."""
    _, port = implicit(start_proxy, "protocol imap;", certs,
                       certificate(certs, certs.ecdsa))
    for suite, pair in (("ECDHE-ECDSA-AES128-GCM-SHA256", certs.ecdsa),
                        ("ECDHE-RSA-AES128-GCM-SHA256", certs.rsa)):
        context = client_context(certs, maximum=ssl.TLSVersion.TLSv1_2, ciphers=suite)
        with tls_peer(port, context) as peer:
            assert peer.line() == imap.GREETING
            assert peer.sock.cipher()[0] == suite
            assert peer.sock.getpeercert(binary_form=True) == pair.der


def test_server_level_certificate_replaces_the_mail_level_list(start_proxy, certs):
    ports = [free_port(), free_port()]
    start_proxy([f"protocol imap; listen 127.0.0.1:{ports[0]} ssl;",
                 f"protocol imap; listen 127.0.0.1:{ports[1]} ssl;\n"
                 + certificate(certs, certs.ecdsa)], mail=certificate(certs))
    for port, pair in zip(ports, (certs.rsa, certs.ecdsa)):
        with tls_peer(port, client_context(certs)) as peer:
            assert peer.line() == imap.GREETING
            assert peer.sock.getpeercert(binary_form=True) == pair.der


def test_encrypted_key_with_ssl_password_file_tries_each_line(start_proxy, certs, tmp_path):
    passwords = tmp_path / "passwords"
    passwords.write_text(f"not this one\n{PASSPHRASE}\n")
    port = free_port()
    start_proxy([f"protocol imap; listen 127.0.0.1:{port} ssl;"],
                mail=f"ssl_certificate {certs.rsa.cert}; ssl_certificate_key "
                     f"{certs.rsa_encrypted}; ssl_password_file {passwords};")
    with tls_peer(port, client_context(certs)) as peer:
        assert peer.line() == imap.GREETING
        assert peer.sock.getpeercert(binary_form=True) == certs.rsa.der


def test_ssl_protocols_tlsv13_only_refuses_a_tlsv12_client(start_proxy, certs):
    proxy, port = implicit(start_proxy, "protocol imap;", certs, "ssl_protocols TLSv1.3;")
    with pytest.raises(ssl.SSLError):
        tls_peer(port, client_context(certs, maximum=ssl.TLSVersion.TLSv1_2)).close()
    proxy.wait_log("SSL error with the client (")
    with tls_peer(port, client_context(certs)) as peer:     # the proxy carries on
        assert peer.line() == imap.GREETING
        assert peer.sock.version() == "TLSv1.3"


def test_ssl_ciphers_limits_the_tls12_suites(start_proxy, certs):
    _, port = implicit(start_proxy, "protocol imap;", certs,
                       "ssl_protocols TLSv1.2; ssl_ciphers ECDHE-RSA-AES256-GCM-SHA384;")
    with tls_peer(port, client_context(certs)) as peer:
        assert peer.line() == imap.GREETING
        assert peer.sock.cipher()[0] == "ECDHE-RSA-AES256-GCM-SHA384"
    with pytest.raises(ssl.SSLError):
        tls_peer(port, client_context(certs, ciphers="ECDHE-RSA-AES128-GCM-SHA256")).close()


@pytest.mark.parametrize("prefer, chosen", [("off", "ECDHE-RSA-AES256-GCM-SHA384"),
                                            ("on", "ECDHE-RSA-AES128-GCM-SHA256")])
def test_ssl_prefer_server_ciphers(start_proxy, certs, prefer, chosen):
    """The client lists AES256 first, the server AES128: whose order wins."""
    _, port = implicit(start_proxy, "protocol imap;", certs,
                       "ssl_protocols TLSv1.2; ssl_ciphers "
                       "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384; "
                       f"ssl_prefer_server_ciphers {prefer};")
    context = client_context(certs, ciphers="ECDHE-RSA-AES256-GCM-SHA384:"
                                            "ECDHE-RSA-AES128-GCM-SHA256")
    with tls_peer(port, context) as peer:
        assert peer.line() == imap.GREETING
        assert peer.sock.cipher()[0] == chosen


@pytest.mark.parametrize("protocol, greeting", [("imap", imap.GREETING),
                                                ("pop3", pop3.GREETING + b"\r\n"),
                                                ("smtp", SMTP_GREETING)])
def test_alpn_selects_the_mail_protocol_name(start_proxy, certs, protocol, greeting):
    _, port = implicit(start_proxy, f"protocol {protocol};", certs)
    with tls_peer(port, client_context(certs, alpn=["h2", protocol])) as peer:
        assert peer.sock.selected_alpn_protocol() == protocol
        assert peer.line() == greeting


def test_alpn_without_overlap_ends_the_connection(start_proxy, certs):
    """As nginx (spec 5.4; issue 15), no session for a client whose ALPN
    list has no overlap: the connection ends right after the handshake
    (nginx's fatal alert: see docs/differences.md); a client without ALPN
    proceeds."""
    proxy, port = implicit(start_proxy, "protocol imap;", certs)
    with tls_peer(port, client_context(certs, alpn=["pop3"])) as peer:
        assert peer.closed()
    proxy.wait_log("SSL error with the client (no application protocol)")
    with tls_peer(port, client_context(certs)) as peer:
        assert peer.sock.selected_alpn_protocol() is None
        assert peer.line() == imap.GREETING


# --------------------------------------------------------- config errors

def write_conf(tmp_path, server_lines, mail_lines=()):
    """A mail.conf with one IMAP server; returns (path, lines)."""
    lines = ["mail {", "    auth_http 127.0.0.1:9/auth;", *("    " + l for l in mail_lines),
             "    server {", "        protocol imap;", "        listen 127.0.0.1:1143;",
             *("        " + l for l in server_lines), "    }", "}"]
    path = tmp_path / "mail.conf"
    path.write_text("\n".join(lines) + "\n")
    return str(path), lines


def config_error(tmp_path, server_lines, mail_lines=()):
    path, lines = write_conf(tmp_path, server_lines, mail_lines)
    with pytest.raises(ConfigError) as caught:
        load(path, prefix=str(tmp_path))
    return str(caught.value), path, lines


def line_of(lines, text):
    return next(number for number, line in enumerate(lines, 1) if text in line)


def test_listen_ssl_without_a_certificate_names_the_listen_line(tmp_path):
    message, path, lines = config_error(tmp_path, ["listen 127.0.0.1:1993 ssl;"])
    assert message == 'no "ssl_certificate" is defined for the "listen ... ssl" directive ' \
                      f'in {path}:{line_of(lines, "ssl;")}'


def test_starttls_without_a_certificate_names_the_starttls_line(tmp_path):
    message, path, lines = config_error(tmp_path, ["starttls on;"])
    assert message == 'no "ssl_certificate" is defined for the "starttls" directive ' \
                      f'in {path}:{line_of(lines, "starttls")}'


def test_a_missing_certificate_file_names_the_directive_and_line(tmp_path, certs):
    missing = tmp_path / "missing.crt"
    message, path, lines = config_error(
        tmp_path, ["starttls on;", f"ssl_certificate {missing};",
                   f"ssl_certificate_key {certs.rsa.key};"])
    assert message == f'cannot load certificate "{missing}" or key "{certs.rsa.key}": ' \
                      f'No such file or directory in "ssl_certificate" directive in ' \
                      f'{path}:{line_of(lines, "ssl_certificate ")}'


def test_an_encrypted_key_without_password_file_is_an_error_not_a_prompt(tmp_path, certs):
    """nginx never asks on the terminal; OpenSSL would, without a password."""
    message, path, lines = config_error(
        tmp_path, ["starttls on;", f"ssl_certificate {certs.rsa.cert};",
                   f"ssl_certificate_key {certs.rsa_encrypted};"])
    assert message.startswith(f'cannot load certificate "{certs.rsa.cert}" with key '
                              f'"{certs.rsa_encrypted}": ')
    assert message.endswith(f' in "ssl_certificate_key" directive in '
                            f'{path}:{line_of(lines, "ssl_certificate_key")}')


def test_ssl_verify_client_needs_a_ca_file(tmp_path, certs):
    message, path, lines = config_error(tmp_path, ["starttls on;", *certificate(certs).split("\n"),
                                                   "ssl_verify_client on;"])
    assert message == "no ssl_client_certificate or ssl_trusted_certificate for " \
                      f'ssl_verify_client in {path}:{line_of(lines, "ssl_verify_client")}'


@pytest.mark.parametrize("text", ["ssl_session_timeout 10m;", "ssl_verify_depth 2;",
                                  "ssl_session_cache shared:SSL:10m;",
                                  "ssl_conf_command Options -SessionTicket;",
                                  "ssl_verify_client optional_no_ca;",
                                  "ssl_ecdh_curve X25519:prime256v1;"])
def test_what_python_ssl_could_not_do_is_honoured_on_pyopenssl(tmp_path, certs, text):
    """Issue 15: these were refused while the TLS layer was Python's ssl;
    on pyOpenSSL they are honoured, with no [warn] (test_tls_directives.py
    shows each one at work)."""
    name = text.split()[0]
    assert directives.TABLE[name].status == directives.READY
    path, _ = write_conf(tmp_path, ["starttls on;", *certificate(certs).split("\n"), text])
    assert load(path, prefix=str(tmp_path)).warnings == ()


@pytest.mark.parametrize("text", ["ssl_session_timeout 5m;", "ssl_verify_depth 1;",
                                  "ssl_session_cache none;", "ssl_ecdh_curve auto;",
                                  "ssl_verify_client off;"])
def test_the_defaults_of_those_directives_are_accepted(tmp_path, text):
    path, _ = write_conf(tmp_path, [text])
    assert load(path, prefix=str(tmp_path)).servers[0].protocol == "imap"


@pytest.mark.parametrize("directive", ["ssl_protocols", "proxy_ssl_protocols"])
def test_protocol_versions_with_a_gap_are_refused_not_widened(tmp_path, certs, directive):
    """`TLSv1.1 TLSv1.3` would silently allow TLSv1.2 as well."""
    message, path, lines = config_error(
        tmp_path, ["starttls on;", "proxy_ssl on;", *certificate(certs).split("\n"),
                   f"{directive} TLSv1.1 TLSv1.3;"])
    assert message == "versions with a gap between them are not supported (OpenSSL would " \
                      f'ignore every version above the gap) in "{directive}" ' \
                      f"directive in {path}:{line_of(lines, directive + ' ')}"


def test_proxy_ssl_and_proxy_starttls_together_are_refused(tmp_path):
    message, path, lines = config_error(tmp_path, ["proxy_ssl on;", "proxy_starttls on;"])
    assert message == '"proxy_ssl" and "proxy_starttls" cannot both be on in ' \
                      f'{path}:{line_of(lines, "proxy_starttls")}'


# ---------------------------------------------------- client certificates

def verifying(certs, mode="on", extra=""):
    return f"ssl_verify_client {mode};\nssl_client_certificate {certs.ca.cert};\n{extra}"


def test_a_verified_client_certificate_reaches_the_auth_service(start_proxy, auth_service,
                                                                certs):
    """spec 2.2: Auth-SSL, -Protocol, -Cipher, -Verify, -Subject, -Issuer,
    -Serial, -Fingerprint right after Client-IP, before the extra headers."""
    proxy, port = implicit(start_proxy, "protocol imap;", certs,
                           verifying(certs, extra="auth_http_header X-Secret s3cr3t;"),
                           auth=auth_service.url)
    with tls_peer(port, client_context(certs, cert=certs.client)) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a LOGIN joe secret\r\n")
        assert peer.line() == b"a NO no reply scripted\r\n"
        version, cipher = peer.sock.version(), peer.sock.cipher()[0]
    [request] = auth_service.requests
    assert after_client_ip(request) == [
        ("Auth-SSL", "on"), ("Auth-SSL-Protocol", version), ("Auth-SSL-Cipher", cipher),
        ("Auth-SSL-Verify", "SUCCESS"), *client_cert_headers(certs), ("X-Secret", "s3cr3t")]
    assert certs.client.x509.serial_number == CLIENT_SERIAL == 0xC0FFEE123


def test_smtp_puts_the_certificate_headers_after_client_host(start_proxy, auth_service,
                                                             certs):
    _, port = implicit(start_proxy, "protocol smtp;", certs,
                       verifying(certs, extra="auth_http_header X-Secret s3cr3t;"),
                       auth=auth_service.url)
    with tls_peer(port, client_context(certs, cert=certs.client)) as peer:
        assert peer.line() == SMTP_GREETING
        peer.send(b"AUTH PLAIN " + b64(b"\0joe\0secret") + b"\r\n")
        assert peer.line() == b"535 5.7.0 no reply scripted\r\n"
    [request] = auth_service.requests
    names = [name for name, _ in after_client_ip(request)]
    assert names == ["Client-Host", "Auth-SSL", "Auth-SSL-Protocol", "Auth-SSL-Cipher",
                     "Auth-SSL-Verify", "Auth-SSL-Subject", "Auth-SSL-Issuer",
                     "Auth-SSL-Serial", "Auth-SSL-Fingerprint", "X-Secret"]
    assert after_client_ip(request)[5:9] == client_cert_headers(certs)


def test_a_subject_is_printed_as_openssl_prints_it(start_proxy, auth_service, certs):
    """nginx prints DNs with OpenSSL's RFC 2253 flags: OpenSSL's short
    names (emailAddress) and every byte above 0x7F as \\XX, so the header
    stays ASCII whatever the certificate says."""
    _, port = implicit(start_proxy, "protocol imap;", certs, verifying(certs),
                       auth=auth_service.url)
    with tls_peer(port, client_context(certs, cert=certs.named_client)) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a LOGIN joe secret\r\n")
        assert peer.line() == b"a NO no reply scripted\r\n"
    [request] = auth_service.requests
    assert request.header("Auth-SSL-Subject") == UNUSUAL_SUBJECT
    if OPENSSL:             # the oracle: OpenSSL's own RFC 2253 printing
        printed = subprocess.run([OPENSSL, "x509", "-noout", "-subject", "-nameopt", "RFC2253",
                                  "-in", certs.named_client.cert], capture_output=True,
                                 text=True, timeout=10).stdout
        assert printed == f"subject={UNUSUAL_SUBJECT}\n"
    assert request.header("Auth-SSL-Issuer") == "CN=Mailproxy Test CA,O=Mailproxy Tests,C=DE"


def test_auth_http_pass_client_cert_sends_the_escaped_pem(start_proxy, auth_service, certs):
    _, port = implicit(start_proxy, "protocol imap;", certs,
                       verifying(certs, extra="auth_http_pass_client_cert on;"),
                       auth=auth_service.url)
    with tls_peer(port, client_context(certs, cert=certs.client)) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a LOGIN joe secret\r\n")
        peer.line()
    [request] = auth_service.requests
    assert [name for name, _ in ssl_headers(request)][-1] == "Auth-SSL-Cert"
    expected = urllib.parse.quote(certs.client.pem.decode(), safe="")    # issue 15, item 8
    assert request.header("Auth-SSL-Cert") == expected
    assert not set(expected) & set("+/= \n")
    assert expected.startswith("-----BEGIN%20CERTIFICATE-----%0AMII")
    assert expected.endswith("-----END%20CERTIFICATE-----%0A")


@pytest.mark.parametrize("protocol, line", [("imap", imap.NO_CERTIFICATE),
                                            ("pop3", pop3.NO_CERTIFICATE),
                                            ("smtp", smtp.NO_CERTIFICATE)])
def test_verify_on_without_a_client_certificate_says_so_and_closes(start_proxy, certs,
                                                                   protocol, line):
    _, port = implicit(start_proxy, f"protocol {protocol};", certs, verifying(certs))
    with tls_peer(port, client_context(certs)) as peer:
        assert peer.line() == line              # instead of the greeting
        assert peer.closed()
    assert line in (b"* BYE No required SSL certificate\r\n",
                    b"-ERR No required SSL certificate\r\n",
                    b"421 4.7.1 No required SSL certificate\r\n")


def test_verify_on_checks_after_starttls_too(start_proxy, certs):
    proxy = start_proxy(["protocol imap; starttls on;"],
                        mail=certificate(certs) + verifying(certs))
    with Peer.connect(proxy.port) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a STARTTLS\r\n")
        assert peer.line() == IMAP_STARTTLS_OK
        peer.starttls(client_context(certs))
        assert peer.line() == b"* BYE No required SSL certificate\r\n"
        assert peer.closed()


def test_verify_optional_without_a_certificate_says_none_and_goes_on(start_proxy, auth_service,
                                                                     certs):
    _, port = implicit(start_proxy, "protocol pop3;", certs, verifying(certs, "optional"),
                       auth=auth_service.url)
    with tls_peer(port, client_context(certs)) as peer:
        assert peer.line() == pop3.GREETING + b"\r\n"
        peer.send(b"USER joe\r\nPASS secret\r\n")
        assert peer.lines(2) == [pop3.OK, b"-ERR no reply scripted\r\n"]
        version, cipher = peer.sock.version(), peer.sock.cipher()[0]
    [request] = auth_service.requests
    assert ssl_headers(request) == [("Auth-SSL", "on"), ("Auth-SSL-Protocol", version),
                                    ("Auth-SSL-Cipher", cipher), ("Auth-SSL-Verify", "NONE")]


def test_verify_optional_with_a_good_certificate_sends_it(start_proxy, auth_service, certs):
    _, port = implicit(start_proxy, "protocol imap;", certs, verifying(certs, "optional"),
                       auth=auth_service.url)
    with tls_peer(port, client_context(certs, cert=certs.client)) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a LOGIN joe secret\r\n")
        peer.line()
    [request] = auth_service.requests
    assert request.header("Auth-SSL-Verify") == "SUCCESS"
    assert ssl_headers(request)[4:] == client_cert_headers(certs)


@pytest.mark.parametrize("mode", ["on", "optional"])
@pytest.mark.parametrize("which", ["expired_client", "stranger_client"])
def test_a_bad_client_certificate_gets_the_certificate_error(start_proxy, auth_service, certs,
                                                             mode, which):
    """As nginx (spec 5.3; issue 15): the handshake completes, then
    `* BYE SSL certificate error` (with `optional` too) and the close; the
    log names OpenSSL's verify error, and the proxy carries on."""
    proxy, port = implicit(start_proxy, "protocol imap;", certs, verifying(certs, mode),
                           auth=auth_service.url)
    with tls_peer(port, client_context(certs, cert=getattr(certs, which))) as peer:
        assert peer.line() == imap.CERTIFICATE_ERROR
        assert peer.closed()
    proxy.wait_log("client SSL certificate verify error: (")
    with tls_peer(port, client_context(certs, cert=certs.client)) as peer:
        assert peer.line() == imap.GREETING
    assert auth_service.requests == []


def test_the_certificate_request_names_the_client_certificate_cas(start_proxy, certs):
    """As nginx (issue 15): the ssl_client_certificate CAs are listed in
    the CertificateRequest, so a client with several certificates can
    choose; ssl_trusted_certificate's are trusted but not listed."""
    require(OPENSSL, "openssl")
    _, port = implicit(start_proxy, "protocol imap;", certs, verifying(
        certs, "optional", f"ssl_trusted_certificate {certs.other_ca.cert};"))
    done = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}",
                           "-CAfile", certs.ca.cert], input=b"", capture_output=True,
                          timeout=30)
    names = done.stdout.split(b"Acceptable client certificate CA names")[1].split(b"---")[0]
    assert b"Mailproxy Test CA" in names and b"Some Other CA" not in names, done.stdout[-2000:]


def test_ssl_crl_refuses_a_revoked_client_certificate(start_proxy, auth_service, certs):
    proxy, port = implicit(start_proxy, "protocol imap;", certs,
                           verifying(certs, extra=f"ssl_crl {certs.crl};"),
                           auth=auth_service.url)
    with tls_peer(port, client_context(certs, cert=certs.revoked_client)) as peer:
        assert peer.line() == imap.CERTIFICATE_ERROR    # issue 15: as nginx, not an alert
    proxy.wait_log("client SSL certificate verify error: (23:certificate revoked)")
    with tls_peer(port, client_context(certs, cert=certs.client)) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a LOGIN joe secret\r\n")
        peer.line()
    [request] = auth_service.requests
    assert request.header("Auth-SSL-Verify") == "SUCCESS"


def test_authenticate_external_uses_the_certificate(start_proxy, auth_service, certs):
    _, port = implicit(start_proxy, "protocol imap; imap_auth plain external;", certs,
                       verifying(certs), auth=auth_service.url)
    with tls_peer(port, client_context(certs, cert=certs.client)) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a CAPABILITY\r\n")
        assert peer.line() == b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN " \
                              b"AUTH=EXTERNAL\r\n"
        peer.line()
        peer.send(b"b AUTHENTICATE EXTERNAL " + b64(b"joe") + b"\r\n")
        assert peer.line() == b"b NO no reply scripted\r\n"
    [request] = auth_service.requests
    assert [request.header(name) for name in ("Auth-Method", "Auth-User", "Auth-Pass")] \
        == ["external", "joe", ""]
    assert request.header("Auth-SSL-Verify") == "SUCCESS"
    assert ssl_headers(request)[4:] == client_cert_headers(certs)


# ----------------------------------------------------- misbehaving clients

def test_garbage_instead_of_a_client_hello_is_logged_and_closed(start_proxy, certs):
    proxy, port = implicit(start_proxy, "protocol imap;", certs)
    with Peer.connect(port) as peer:
        peer.send(b"a LOGIN joe secret\r\n")
        assert peer.closed()
    proxy.wait_log("SSL error with the client (")
    with tls_peer(port, client_context(certs)) as peer:
        assert peer.line() == imap.GREETING


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"])  # nothing, half a hello
def test_a_client_that_never_finishes_the_handshake_is_closed_at_timeout(start_proxy, certs,
                                                                         sent):
    proxy, port = implicit(start_proxy, "protocol imap;", certs, "timeout 500ms;")
    with Peer.connect(port) as peer:
        started = time.monotonic()
        peer.send(sent)
        assert peer.closed()
        assert 0.4 <= time.monotonic() - started < 10
    proxy.wait_log("client timed out")


@pytest.mark.parametrize("pause", [0, 0.2])     # with the Finished, or a moment after
def test_smtp_greeting_delay_over_implicit_tls_turns_away_a_client_that_talks_first(
        start_proxy, certs, pause):
    _, port = implicit(start_proxy, "protocol smtp;", certs, "smtp_greeting_delay 1s;")
    with Peer.connect(port) as peer:
        peer.sock = client_context(certs).wrap_socket(peer.sock, server_hostname="localhost",
                                                      do_handshake_on_connect=False)
        peer.sock.do_handshake()
        time.sleep(pause)
        peer.send(b"EHLO early.example\r\n")
        assert peer.line() == smtp.PIPELINING_REJECT
        assert peer.closed()


def test_a_client_that_stalls_after_starttls_is_closed_at_timeout(start_proxy, certs):
    """The `timeout` deadline covers the STARTTLS handshake too."""
    proxy = start_proxy(["protocol pop3; starttls on; timeout 500ms;"], mail=certificate(certs))
    with Peer.connect(proxy.port) as peer:
        started = time.monotonic()
        assert peer.line() == pop3.GREETING + b"\r\n"
        peer.send(b"STLS\r\n")
        assert peer.line() == pop3.OK
        assert peer.closed()
        assert 0.4 <= time.monotonic() - started < 10
    proxy.wait_log("client timed out")


def test_auth_wait_over_tls_keeps_what_the_client_pipelined(start_proxy, auth_service, certs):
    """Auth-Wait: the session waits (reading nothing from inside TLS but
    keeping it), answers NO, then runs the command that came meanwhile."""
    auth_service.reply = sequence(fail("Try again later", wait=1), fail("Still no"))
    _, port = implicit(start_proxy, "protocol imap;", certs, auth=auth_service.url)
    with tls_peer(port, client_context(certs)) as peer:
        assert peer.line() == imap.GREETING
        peer.send(b"a LOGIN joe secret\r\n")
        auth_service.wait_requests(1)
        peer.send(b"b NOOP\r\n")
        assert peer.lines(2) == [b"a NO Try again later\r\n", b"b OK completed\r\n"]
        peer.send(b"c LOGIN joe secret\r\n")
        assert peer.line() == b"c NO Still no\r\n"
    assert [r.header("Auth-Login-Attempt") for r in auth_service.requests] == ["1", "2"]


def test_a_backend_that_sends_and_closes_loses_no_byte_over_tls(start_proxy, auth_service,
                                                                certs):
    """The backend half-closes with data in flight: the client gets every
    byte inside TLS, then the end of the stream."""
    data = os.urandom(4 * 1024 * 1024)
    fake = imap_backend([("send", data), ("close",)])
    try:
        auth_service.reply = ok(fake.host, fake.port)
        _, port = implicit(start_proxy, "protocol imap;", certs, auth=auth_service.url)
        with tls_peer(port, client_context(certs)) as peer:
            assert peer.line() == imap.GREETING
            peer.send(b"a LOGIN joe secret\r\n")
            assert peer.line() == b"a OK Logged in\r\n"
            received = [peer.take_buffer()]
            for _ in range(len(data)):          # bounded: at least one byte per read
                chunk = peer.sock.recv(65536)
                if not chunk:
                    break
                received.append(chunk)
        assert hashlib.sha256(b"".join(received)).digest() == hashlib.sha256(data).digest()
    finally:
        fake.close()


def test_fast_stop_ends_tls_sessions_at_once(start_proxy, auth_service, certs):
    fake = imap_backend([("echo",)])
    try:
        auth_service.reply = ok(fake.host, fake.port)
        proxy, port = implicit(start_proxy, "protocol imap;", certs, auth=auth_service.url)
        context = client_context(certs)
        with tls_peer(port, context) as waiting, tls_peer(port, context) as relayed:
            assert waiting.line() == relayed.line() == imap.GREETING
            relayed.send(b"a LOGIN joe secret\r\n")
            assert relayed.line() == b"a OK Logged in\r\n"
            relayed.send(b"x\r\n")
            assert relayed.line() == b"x\r\n"       # the relay runs
            started = time.monotonic()
            proxy.stop("stop")
            assert time.monotonic() - started < 10
            assert waiting.closed() and relayed.closed()
        assert proxy.session_threads() == []
    finally:
        fake.close()


# ----------------------------------------- the relay's two threads over TLS

def test_large_payloads_both_ways_at_once_over_tls13(start_proxy, auth_service, certs):
    """The design constraint of TlsChannel: the relay reads the client's
    TLS connection on one thread while it writes to it on another.  32 MB
    each way at the same time through an echoing backend must arrive
    byte-exact (SHA-256)."""
    fake = imap_backend([("echo",)])
    try:
        auth_service.reply = ok(fake.host, fake.port)
        _, port = implicit(start_proxy, "protocol imap;", certs, auth=auth_service.url)
        payload = os.urandom(BIG)
        with tls_peer(port, client_context(certs)) as peer:
            assert peer.sock.version() == "TLSv1.3"
            assert peer.line() == imap.GREETING
            peer.send(b"a LOGIN joe secret\r\n")
            assert peer.line() == b"a OK Logged in\r\n"
            digest = pump(peer.sock, payload, BIG, RELAY_TIMEOUT, peer.take_buffer())
        assert digest == hashlib.sha256(payload).hexdigest()
        [record] = fake.wait_connections(1)
        assert hashlib.sha256(record.received[-BIG:]).hexdigest() == digest
    finally:
        fake.close()


def test_tls13_key_updates_during_a_two_way_relay(start_proxy, auth_service, certs, tmp_path):
    """`openssl s_client` sends TLS 1.3 KeyUpdates (`K`: update, and ask the
    proxy to update too) while the backend's echo of its data is still
    flowing back: the proxy's answering KeyUpdate is made by its reader
    thread and must leave in order with what its writer thread encrypts
    (out of order, s_client could not decrypt what follows)."""
    require(OPENSSL, "openssl")
    fake = imap_backend([("echo",)])
    try:
        auth_service.reply = ok(fake.host, fake.port)
        _, port = implicit(start_proxy, "protocol imap;", certs, auth=auth_service.url)
        echoed = s_client_with_key_updates(port, certs, KEY_UPDATE_ROUNDS,
                                           tmp_path / "s_client.msg")
    finally:
        fake.close()
    assert echoed["lines"] == [data_line(r, i) for r in range(KEY_UPDATE_ROUNDS)
                               for i in range(LINES_PER_ROUND)]
    assert echoed["key_updates"] == KEY_UPDATE_ROUNDS
    messages = (tmp_path / "s_client.msg").read_text(errors="replace").splitlines()
    sent = [line for line in messages if line.startswith(">>>") and "KeyUpdate" in line]
    answered = [line for line in messages if line.startswith("<<<") and "KeyUpdate" in line]
    assert len(sent) == len(answered) == KEY_UPDATE_ROUNDS      # the proxy updated too


KEY_UPDATE_ROUNDS = 6
LINES_PER_ROUND = 2000          # about 400 kB: still echoing when the K goes out


DATA_LINE = re.compile(rb"x\d{7}y{200}")     # not to be confused with s_client's own output


def data_line(round_number, index):
    return f"x{round_number:02d}{index:05d}".encode() + b"y" * 200


def s_client_with_key_updates(port, certs, rounds, messages):
    """Log in through s_client, then rounds of data lines each followed by
    `K`.  s_client takes a command only at the start of one read from
    stdin (and drops the rest of that read), so each K is written when the
    pipe is empty, and the next round once the K has been read."""
    process = subprocess.Popen(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-crlf",
         "-CAfile", certs.ca.cert, "-verify_return_error", "-msg", "-msgfile", str(messages)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output, errors, lock = [], [], threading.Lock()   # filled by the reader threads

    def read(stream, lines):
        for line in stream:
            with lock:
                lines.append(line.rstrip(b"\r\n"))
    readers = [threading.Thread(target=read, args=(process.stdout, output),
                                name="s_client stdout"),
               threading.Thread(target=read, args=(process.stderr, errors),   # KEYUPDATE
                                name="s_client stderr")]
    for reader in readers:
        reader.start()

    def seen(predicate, count=1, lines=output):
        def check():
            with lock:
                return sum(1 for line in lines if predicate(line)) >= count
        assert wait_until(check, timeout=20), summary(output, errors)

    def write(data):
        process.stdin.write(data)
        process.stdin.flush()
        assert wait_until(lambda: _unread(process.stdin) == 0, timeout=20, interval=0.001)
    try:
        seen(lambda line: line == imap.GREETING.rstrip())
        write(b"a LOGIN joe secret\n")
        seen(lambda line: line == b"a OK Logged in")
        for r in range(rounds):
            write(b"".join(data_line(r, i) + b"\n" for i in range(LINES_PER_ROUND)))
            write(b"K\n")
        write(b"z\n")      # the answer to a KeyUpdate goes before the next data (RFC 8446 4.6.3)
        seen(lambda line: line == b"z")
        seen(lambda line: DATA_LINE.fullmatch(line), rounds * LINES_PER_ROUND)
        seen(lambda line: line == b"KEYUPDATE", rounds, errors)
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for reader in readers:
            reader.join(timeout=10)
    with lock:
        return {"lines": [line for line in output if DATA_LINE.fullmatch(line)],
                "key_updates": errors.count(b"KEYUPDATE")}


def summary(output, errors):
    """What s_client said, without its hex dumps (for a failure message)."""
    data = [line for line in output if DATA_LINE.fullmatch(line)]
    other = [line for line in output
             if not DATA_LINE.fullmatch(line) and not line.startswith(b" ")]
    return f"{len(data)} data lines, last {data[-1:]}; other: {other[-10:]}; " \
           f"stderr: {errors[-10:]}"


def _unread(pipe):
    """Bytes written to a pipe that the reader has not taken yet."""
    return struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0" * 4))[0]


# ------------------------------------------------------ curl and s_client

def test_curl_imap_starttls_with_ssl_reqd(start_proxy, auth_service, dovecot, certs):
    require(CURL, "curl")
    auth_service.reply = ok("127.0.0.1", dovecot.imap_port)
    proxy = start_proxy(["protocol imap; starttls only;"], auth=auth_service.url,
                        mail=certificate(certs))
    done = subprocess.run([CURL, "-sS", "--ssl-reqd", "--cacert", certs.ca.cert,
                           "--max-time", "20", "-u", "joe:secret",
                           f"imap://127.0.0.1:{proxy.port}/"],
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert b"INBOX" in done.stdout
    [request] = auth_service.requests
    assert request.header("Auth-SSL") == "on"


def test_curl_imaps(start_proxy, auth_service, dovecot, certs):
    require(CURL, "curl")
    auth_service.reply = ok("127.0.0.1", dovecot.imap_port)
    _, port = implicit(start_proxy, "protocol imap;", certs, auth=auth_service.url)
    done = subprocess.run([CURL, "-sS", "--cacert", certs.ca.cert, "--max-time", "20",
                           "-u", "joe:secret", f"imaps://127.0.0.1:{port}/"],
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert b"INBOX" in done.stdout


@pytest.mark.parametrize("protocol, commands, expected", [
    ("imap", b"a CAPABILITY\r\na LOGOUT\r\n", IMAP_CAPS + b"a OK completed\r\n"),
    ("pop3", b"CAPA\r\nQUIT\r\n", b"".join(POP3_CAPA)),
    ("smtp", b"EHLO client.example\r\nQUIT\r\n", b"".join(SMTP_EHLO)),
])
def test_openssl_s_client_starttls_reaches_the_capabilities_after_tls(shared_proxy, certs,
                                                                      protocol, commands,
                                                                      expected):
    require(OPENSSL, "openssl")
    caps = SMTP_CAPS if protocol == "smtp" else ""
    proxy = shared_proxy([f"protocol {protocol}; starttls on; {caps}"],
                         mail=certificate(certs))
    done = subprocess.run([OPENSSL, "s_client", "-quiet", "-starttls", protocol,
                           "-connect", f"127.0.0.1:{proxy.port}", "-CAfile", certs.ca.cert,
                           "-verify_return_error"],
                          input=commands, capture_output=True, timeout=30)
    assert expected in done.stdout, (done.stdout, done.stderr)
    assert b"STARTTLS" not in done.stdout and b"STLS" not in done.stdout
