"""TLS toward the backend (beyond nginx): proxy_ssl, proxy_starttls and
the checks on the backend's certificate.

The real backend is a second, private Dovecot with `ssl = required`.  It
listens on 127.0.0.2 as well: Dovecot counts a connection whose local and
remote addresses are equal (127.0.0.1 to 127.0.0.1) as secure and would
accept a clear-text login there, but from 127.0.0.1 to 127.0.0.2 it
refuses one (`[PRIVACYREQUIRED]`), so a login that works proves TLS was
used, and Dovecot's log says `TLS` besides.

`TlsBackend` is a scripted backend that can speak TLS (implicit, or after
its STARTTLS reply) for what Dovecot cannot do on purpose: a certificate
from a CA the proxy does not trust, a wrong name, an SMTP backend that
wants EHLO and XCLIENT over TLS, a client certificate check, SNI, large
payloads both ways.  Certificates come from certs.py.
"""

import hashlib
import imaplib
import os
import poplib
import socket
import ssl
import threading
from dataclasses import dataclass, field

import pytest

pytest.register_assert_rewrite("certs")     # a plugin below, imported before pytest loads it
import peers
from certs import Peer, issue_chain, pump, server_context
from fakes import ScriptedBackend, ok
from harness import wait_until
from mailproxy import imap, smtp
from transcript import b64

pytest_plugins = ("proxying", "certs")     # start_proxy, auth_service; certs

USERS = {"joe": "secret"}
REMOTE = "127.0.0.2"            # a loopback address Dovecot does not count as secure
ACCEPT_POLL = 0.05              # seconds between two checks for close() while accepting
JOIN_TIMEOUT = 10               # seconds close() waits for each thread
BIG = 32 * 1024 * 1024          # bytes each way in the relay test
RELAY_TIMEOUT = 120             # seconds for the whole exchange (a bound, not a goal)


# ------------------------------------------------------ a TLS-capable backend

@dataclass
class Record:
    """What one connection to a TlsBackend saw: each line read, with whether
    it came inside TLS; the client certificate; errors."""
    lines: list = field(default_factory=list)
    client_cert: bytes = None
    digest: str = None
    error: str = None
    done: threading.Event = field(default_factory=threading.Event)


class TlsBackend:
    """A backend on `host` that plays `steps` on each connection:

    ("tls",)                 handshake as the TLS server (first step:
                             implicit TLS; after a STARTTLS reply: STARTTLS)
    ("send", bytes)          write
    ("expect", line)         read one line, stop with an error unless equal
    ("line",)                read one line, whatever it is
    ("pump", payload, size)  send `payload` while receiving `size` bytes
    ("raw", bytes)           write bytes on the socket under TLS (garbage)

    `records[i]` tells what connection i saw, `server_names` the SNI names
    received; `close()` joins every thread.
    """

    def __init__(self, steps, context=None, host="127.0.0.1"):
        self.steps, self.context = steps, context
        if context is not None:
            context.sni_callback = self._remember_name
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(ACCEPT_POLL)
        self.host, self.port = host, self.listener.getsockname()[1]
        self.lock = threading.Lock()    # guards records and the connection list
        self.records, self.connections, self.server_names = [], [], []
        self.closing = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, name=f"tls-backend-{self.port}")
        self.acceptor.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait(self, count=1, timeout=10):
        """The first `count` records, once those connections have ended."""
        def done():
            with self.lock:
                return len(self.records) >= count and all(r.done.is_set()
                                                          for r in self.records[:count])
        assert wait_until(done, timeout=timeout), "backend connections did not end"
        with self.lock:
            return self.records[:count]

    def close(self):
        self.closing.set()
        self.acceptor.join(JOIN_TIMEOUT)
        self.listener.close()
        with self.lock:
            connections = list(self.connections)
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in connections:
            thread.join(JOIN_TIMEOUT)

    def _accept(self):
        while not self.closing.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            record = Record()
            thread = threading.Thread(target=self._serve, args=(sock, record),
                                      name=f"tls-backend-{self.port}-conn")
            with self.lock:
                self.records.append(record)
                self.connections.append((sock, thread))
            thread.start()

    def _serve(self, sock, record):
        sock.settimeout(10)
        peer = Peer(sock)
        try:
            for step in self.steps:
                getattr(self, "step_" + step[0])(peer, record, *step[1:])
        except (OSError, EOFError, AssertionError, TimeoutError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            peer.close()
            record.done.set()

    def _remember_name(self, sslobj, name, context):
        with self.lock:
            self.server_names.append(name)

    def step_tls(self, peer, record):
        sock = peer.starttls(self.context, server_side=True)   # nothing pipelined before it
        record.client_cert = sock.getpeercert(binary_form=True)

    def step_send(self, peer, record, data):
        peer.send(data)

    def step_expect(self, peer, record, line):
        got = self.step_line(peer, record)
        assert got == line, f"expected {line!r}, got {got!r}"

    def step_line(self, peer, record):
        line = peer.line()
        record.lines.append((isinstance(peer.sock, ssl.SSLSocket), line))
        return line

    def step_raw(self, peer, record, data):
        os.write(peer.sock.fileno(), data)

    def step_pump(self, peer, record, payload, size):
        record.digest = pump(peer.sock, payload, size, RELAY_TIMEOUT, peer.take_buffer())


def imap_login(tag=b"a"):
    """The LOGIN for joe/secret as the proxy replays it (spec 4.2)."""
    return [("expect", tag + b" LOGIN {3}\r\n"), ("send", b"+ OK\r\n"),
            ("expect", b"joe {6}\r\n"), ("send", b"+ OK\r\n"),
            ("expect", b"secret\r\n"), ("send", tag + b" OK Logged in\r\n")]


IMPLICIT_IMAP = [("tls",), ("send", b"* OK TLS backend ready\r\n"), *imap_login()]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tls_dovecot(certs):
    """A private Dovecot with `ssl = required`: imaps/pop3s and plain
    imap/pop3 (STARTTLS) listeners on REMOTE, ports in `.remote`."""
    remote = dict(zip(("imap", "imaps", "pop3", "pop3s"), sorted(
        {peers.free_port(REMOTE) for _ in range(8)})[:4]))
    listeners = "\n".join(
        f"service {protocol}-login {{\n"
        f"  inet_listener {protocol}_remote {{\n    address = {REMOTE}\n"
        f"    port = {remote[protocol]}\n  }}\n"
        f"  inet_listener {protocol}s {{\n    address = {REMOTE}\n"
        f"    port = {remote[protocol + 's']}\n  }}\n}}" for protocol in ("imap", "pop3"))
    dovecot = peers.Dovecot(None, users=USERS, extra_config=(
        f"ssl = required\nssl_cert = <{certs.rsa.cert}\nssl_key = <{certs.rsa.key}\n"
        f"{listeners}\n"))
    try:
        dovecot.start()
    except peers.PeerUnavailable as exc:
        if peers.in_ci():
            pytest.fail(f"Dovecot unavailable under CI: {exc}", pytrace=False)
        pytest.skip(f"Dovecot unavailable: {exc}")
    try:
        for port in remote.values():
            peers.wait_port(REMOTE, port)
        dovecot.remote = remote
        yield dovecot
    finally:
        dovecot.stop()


@pytest.fixture
def backends():
    """backends(steps, context=None, host=...) -> a TlsBackend, closed after the test."""
    started = []

    def start(steps, context=None, host="127.0.0.1"):
        started.append(TlsBackend(steps, context, host))
        return started[-1]

    yield start
    for backend in started:
        backend.close()


def verified(certs, name="localhost"):
    return (f"proxy_ssl_verify on;\nproxy_ssl_trusted_certificate {certs.ca.cert};\n"
            f"proxy_ssl_name {name};\n")


def logins_in(dovecot, user="joe"):
    """Dovecot's login lines for `user` (they end in TLS or secured)."""
    return [line for line in dovecot.log_text().splitlines()
            if f"Login: user=<{user}>" in line and f"lip={REMOTE}" in line]


def imap_client_login(proxy):
    with imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10) as client:
        result = client.login("joe", "secret")[0]
        if result == "OK":
            assert client.select("INBOX")[0] == "OK"
        return result


# ------------------------------------------------------ Dovecot, ssl=required

def test_proxy_ssl_to_dovecot_imaps_verified(start_proxy, auth_service, tls_dovecot, certs):
    auth_service.reply = ok(REMOTE, tls_dovecot.remote["imaps"])
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=verified(certs))
    assert imap_client_login(proxy) == "OK"
    assert ", TLS, " in wait_until(lambda: logins_in(tls_dovecot))[-1]
    assert "in clear text" not in proxy.log()


def test_proxy_ssl_to_dovecot_pop3s(start_proxy, auth_service, tls_dovecot, certs):
    auth_service.reply = ok(REMOTE, tls_dovecot.remote["pop3s"])
    proxy = start_proxy(["protocol pop3; proxy_ssl on;"], auth=auth_service.url,
                        mail=verified(certs))
    client = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
    try:
        client.user("joe")
        assert client.pass_("secret").startswith(b"+OK")
        assert client.stat()[0] >= 0
    finally:
        client.quit()
    assert ", TLS, " in wait_until(lambda: logins_in(tls_dovecot))[-1]


def test_dovecot_refuses_a_clear_text_login_on_the_remote_address(start_proxy, auth_service,
                                                                  tls_dovecot):
    """The control: without proxy_starttls the same backend says no."""
    auth_service.reply = ok(REMOTE, tls_dovecot.remote["imap"])
    proxy = start_proxy(["protocol imap;"], auth=auth_service.url)
    refused(proxy)
    proxy.wait_log('upstream sent invalid response: "a NO [PRIVACYREQUIRED] Plaintext '
                   'authentication disallowed on non-secure (SSL/TLS) connections."')


def test_proxy_starttls_to_dovecot_imap(start_proxy, auth_service, tls_dovecot, certs):
    auth_service.reply = ok(REMOTE, tls_dovecot.remote["imap"])
    proxy = start_proxy(["protocol imap; proxy_starttls on;"], auth=auth_service.url,
                        mail=verified(certs))
    assert imap_client_login(proxy) == "OK"
    assert ", TLS, " in wait_until(lambda: logins_in(tls_dovecot))[-1]


def test_proxy_starttls_to_dovecot_pop3(start_proxy, auth_service, tls_dovecot, certs):
    auth_service.reply = ok(REMOTE, tls_dovecot.remote["pop3"])
    proxy = start_proxy(["protocol pop3; proxy_starttls on;"], auth=auth_service.url,
                        mail=verified(certs))
    client = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
    try:
        client.user("joe")
        assert client.pass_("secret").startswith(b"+OK")
    finally:
        client.quit()
    assert ", TLS, " in wait_until(lambda: logins_in(tls_dovecot))[-1]


# ------------------------------------------------------- scripted backends

def test_proxy_ssl_to_a_test_server_sends_the_login_inside_tls(start_proxy, auth_service,
                                                               backends, certs):
    backend = backends(IMPLICIT_IMAP + [("expect", b"b LOGOUT\r\n"),
                                        ("send", b"* BYE\r\nb OK bye\r\n")],
                       server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=verified(certs, "127.0.0.1"))
    with Peer.connect(proxy.port) as client:
        assert client.line() == imap.GREETING
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK Logged in\r\n"
        client.send(b"b LOGOUT\r\n")
        assert client.lines(2) == [b"* BYE\r\n", b"b OK bye\r\n"]
    [record] = backend.wait()
    assert record.error is None
    assert record.lines and all(secure for secure, _ in record.lines)
    assert backend.server_names == [None]       # proxy_ssl_server_name is off


def test_proxy_ssl_server_name_sends_sni(start_proxy, auth_service, backends, certs):
    backend = backends(IMPLICIT_IMAP, server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on; proxy_ssl_server_name on;"],
                        auth=auth_service.url, mail=verified(certs))
    with Peer.connect(proxy.port) as client:
        client.line()
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK Logged in\r\n"
    backend.wait()
    assert backend.server_names == ["localhost"]


def test_proxy_ssl_verify_checks_the_name_without_sni_when_server_name_off(
        start_proxy, auth_service, backends, certs):
    """As nginx's http proxy (issue 15: on pyOpenSSL the name to verify and
    the SNI name are apart): `proxy_ssl_server_name off` sends no SNI even
    while the name is verified."""
    backend = backends(IMPLICIT_IMAP, server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on; proxy_ssl_server_name off;"],
                        auth=auth_service.url, mail=verified(certs))
    with Peer.connect(proxy.port) as client:
        client.line()
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK Logged in\r\n"
    backend.wait()
    assert backend.server_names == [None]


def test_proxy_ssl_certificate_is_offered_to_the_backend(start_proxy, auth_service, backends,
                                                         certs):
    backend = backends(IMPLICIT_IMAP, server_context(certs.rsa, client_ca=certs.ca))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=verified(certs) + f"proxy_ssl_certificate {certs.client.cert};\n"
                                               f"proxy_ssl_certificate_key {certs.client.key};")
    with Peer.connect(proxy.port) as client:
        client.line()
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK Logged in\r\n"
    [record] = backend.wait()
    assert record.client_cert == certs.client.der


def test_smtp_proxy_starttls_sends_ehlo_and_xclient_inside_tls(start_proxy, auth_service,
                                                               backends, certs):
    """RFC 3207: EHLO, STARTTLS, then EHLO again over TLS; XCLIENT and the
    client's own EHLO only inside TLS; the relay goes on inside TLS."""
    backend = backends([("send", b"220 backend.test ESMTP\r\n"),
                        ("expect", b"EHLO mx.test\r\n"),
                        ("send", b"250-backend.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"),
                        ("expect", b"STARTTLS\r\n"), ("send", b"220 2.0.0 Ready to start TLS\r\n"),
                        ("tls",),
                        ("expect", b"EHLO mx.test\r\n"),
                        ("send", b"250-backend.test\r\n250 XCLIENT ADDR LOGIN NAME\r\n"),
                        ("expect", b"XCLIENT ADDR=127.0.0.1 LOGIN=joe NAME=[UNAVAILABLE]\r\n"),
                        ("send", b"220 backend.test ESMTP\r\n"),
                        ("expect", b"EHLO client.example\r\n"),
                        ("send", b"250 backend.test\r\n"),
                        ("expect", b"MAIL FROM:<a@example.org>\r\n"),
                        ("send", b"250 2.1.0 Ok\r\n")], server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol smtp; proxy_starttls on;"], auth=auth_service.url,
                        mail=verified(certs, "127.0.0.1"))
    with Peer.connect(proxy.port) as client:
        assert client.line() == b"220 mx.test ESMTP ready\r\n"
        client.send(b"EHLO client.example\r\n")
        while client.line().startswith(b"250-"):
            pass
        client.send(b"AUTH PLAIN " + b64(b"\0joe\0secret") + b"\r\n")
        assert client.line() == smtp.AUTH_OK
        client.send(b"MAIL FROM:<a@example.org>\r\n")
        assert client.line() == b"250 2.1.0 Ok\r\n"
    [record] = backend.wait()
    assert record.error is None
    secure = [line for inside, line in record.lines if inside]
    assert [line for inside, line in record.lines if not inside] == [b"EHLO mx.test\r\n",
                                                                      b"STARTTLS\r\n"]
    assert secure[1].startswith(b"XCLIENT ") and secure[-1].startswith(b"MAIL FROM:")


XOAUTH2_JOE = b64(b"user=joe@example.org\1auth=Bearer ya29.token\1\1")
SASL_IR_GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n"


@pytest.mark.parametrize("mode, steps", [
    ("proxy_ssl", [("tls",), ("send", SASL_IR_GREETING),
                   ("expect", b"a AUTHENTICATE XOAUTH2 " + XOAUTH2_JOE + b"\r\n")]),
    # RFC 3501 6.2.1: the SASL-IR seen before STARTTLS is not trusted after it
    ("proxy_starttls", [("send", SASL_IR_GREETING), ("expect", b"a STARTTLS\r\n"),
                        ("send", b"a OK begin TLS\r\n"), ("tls",),
                        ("expect", b"a AUTHENTICATE XOAUTH2\r\n"), ("send", b"+ \r\n"),
                        ("expect", XOAUTH2_JOE + b"\r\n")])])
def test_the_oauth_bridge_sends_the_token_inside_tls(start_proxy, auth_service, backends, certs,
                                                     mode, steps):
    """Auth-Backend-Auth: xoauth2 over TLS, as Gmail and Office 365 require."""
    backend = backends(steps + [("send", b"a OK Success\r\n")], server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port, Auth_User="joe@example.org",
                            Auth_Pass="ya29.token", Auth_Backend_Auth="xoauth2")
    proxy = start_proxy([f"protocol imap; {mode} on;"], auth=auth_service.url,
                        mail=verified(certs, "127.0.0.1"))
    with Peer.connect(proxy.port) as client:
        assert client.line() == imap.GREETING
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK Success\r\n"
    [record] = backend.wait()
    assert record.error is None
    assert [inside for inside, line in record.lines if XOAUTH2_JOE in line] == [True]


CLIENT_ADDRESS_AFTER_STARTTLS = {
    "imap": [("send", b"* OK [CAPABILITY IMAP4rev1 ID STARTTLS] ready\r\n"),
             ("expect", b"a STARTTLS\r\n"), ("send", b"a OK go\r\n"), ("tls",),
             ("expect", b"a CAPABILITY\r\n"),
             ("send", b"* CAPABILITY IMAP4rev1 ID\r\na OK done\r\n"),
             ("line",), ("send", b"a OK ID completed\r\n"), *imap_login()],
    "pop3": [("send", b"+OK [XCLIENT] ready\r\n"),
             ("expect", b"STLS\r\n"), ("send", b"+OK go\r\n"), ("tls",),
             ("expect", b"CAPA\r\n"), ("send", b"+OK\r\nUSER\r\nXCLIENT\r\n.\r\n"),
             ("line",), ("send", b"+OK\r\n"),
             ("expect", b"USER joe\r\n"), ("send", b"+OK\r\n"),
             ("expect", b"PASS secret\r\n"), ("send", b"+OK Logged in\r\n")],
}


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_proxy_client_address_asks_the_capabilities_again_inside_tls(
        start_proxy, auth_service, backends, certs, protocol):
    """RFC 3501 6.2.1, RFC 2595 4: what the greeting announced in clear
    text is forgotten; CAPABILITY (CAPA) and then ID (XCLIENT) go inside TLS."""
    backend = backends(CLIENT_ADDRESS_AFTER_STARTTLS[protocol], server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy([f"protocol {protocol}; proxy_starttls on;"], auth=auth_service.url,
                        mail=verified(certs, "127.0.0.1") + "proxy_client_address on;")
    with Peer.connect(proxy.port) as client:
        client.line()
        client.send(b"a LOGIN joe secret\r\n" if protocol == "imap"
                    else b"USER joe\r\nPASS secret\r\n")
        if protocol == "pop3":
            assert client.line() == b"+OK\r\n"
        assert client.line() in (b"a OK Logged in\r\n", b"+OK Logged in\r\n")
        port = client.sock.getsockname()[1]
    [record] = backend.wait()
    assert record.error is None
    told = next(line for inside, line in record.lines if inside and b"127.0.0.1" in line)
    assert told.startswith(
        b'a ID ("x-originating-ip" "127.0.0.1" "x-originating-port" "%d" "x-connected-ip" '
        b'"127.0.0.1" "x-connected-port" "%d" "x-session-id" "' % (port, proxy.port)
        if protocol == "imap" else b"XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=" % port)
    assert [line for inside, line in record.lines if not inside] == \
        [b"a STARTTLS\r\n" if protocol == "imap" else b"STLS\r\n"]


def test_large_payloads_both_ways_at_once_over_backend_tls(start_proxy, auth_service,
                                                           backends, certs):
    """The relay's two threads share the backend's TLS connection too:
    32 MB each way at once, different data each way, SHA-256 on both ends."""
    to_client, to_backend = os.urandom(BIG), os.urandom(BIG)
    backend = backends(IMPLICIT_IMAP + [("pump", to_client, BIG)], server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=verified(certs, "127.0.0.1"))
    with Peer.connect(proxy.port) as client:
        assert client.line() == imap.GREETING
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK Logged in\r\n"
        digest = pump(client.sock, to_backend, BIG, RELAY_TIMEOUT, client.take_buffer())
    assert digest == hashlib.sha256(to_client).hexdigest()
    [record] = backend.wait(timeout=RELAY_TIMEOUT)
    assert record.error is None
    assert record.digest == hashlib.sha256(to_backend).hexdigest()


# --------------------------------------- a backend that fails the checks

def refused(proxy, line=imap.INTERNAL_ERROR):
    """The client's login ends in the internal-error line."""
    with Peer.connect(proxy.port) as client:
        assert client.line() == imap.GREETING
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == line
        assert client.closed()


def test_a_backend_certificate_from_an_unknown_ca_is_refused(start_proxy, auth_service,
                                                             backends, certs):
    backend = backends(IMPLICIT_IMAP, server_context(certs.other_server))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=verified(certs, "localhost"))
    refused(proxy)
    proxy.wait_log("upstream SSL certificate verify error: (unable to get local issuer "
                   "certificate)")
    assert "certificate verify" in proxy.log()


def test_a_backend_certificate_for_another_name_is_refused(start_proxy, auth_service,
                                                           backends, certs):
    backend = backends(IMPLICIT_IMAP, server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=verified(certs, "imap.example.org"))
    refused(proxy)
    proxy.wait_log("upstream SSL certificate verify error: (Hostname mismatch")


@pytest.mark.parametrize("depth", [1, 2])
def test_proxy_ssl_verify_depth_limits_the_backends_chain(start_proxy, auth_service, backends,
                                                          certs, tmp_path, depth):
    """localhost's certificate two intermediate CAs below the trusted CA:
    the default depth 1 refuses it (issue 15: honoured on pyOpenSSL)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*issue_chain(certs, tmp_path, server=True))
    backend = backends(IMPLICIT_IMAP, context)
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=verified(certs) + f"proxy_ssl_verify_depth {depth};")
    if depth == 1:
        refused(proxy)
        proxy.wait_log("upstream SSL certificate verify error: (certificate chain too long)")
        return
    with Peer.connect(proxy.port) as client:
        client.line()
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK Logged in\r\n"


def test_proxy_ssl_pin_accepts_the_pinned_self_signed_key(start_proxy, auth_service, backends,
                                                          certs):
    """No verification (its CA is unknown), but the public key is pinned."""
    backend = backends(IMPLICIT_IMAP, server_context(certs.other_server))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=f"proxy_ssl_pin {certs.other_server.spki_sha256()};")
    with Peer.connect(proxy.port) as client:
        client.line()
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK Logged in\r\n"


def test_a_wrong_pin_is_refused_and_the_log_says_why(start_proxy, auth_service, backends,
                                                     certs):
    backend = backends(IMPLICIT_IMAP, server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=f"proxy_ssl_pin {certs.other_server.spki_sha256()};")
    refused(proxy)
    proxy.wait_log("upstream SSL certificate does not match proxy_ssl_pin (key "
                   f"{certs.rsa.spki_sha256()})")
    [record] = backend.wait()
    assert not any(b"secret" in line for _, line in record.lines)   # no password sent


@pytest.mark.parametrize("setting", ["proxy_ssl on;", "proxy_starttls on;"])
def test_a_backend_speaking_clear_text_when_tls_was_expected(start_proxy, auth_service,
                                                             certs, setting):
    """proxy_ssl: the greeting arrives where a ServerHello should; proxy_starttls:
    the backend has no STARTTLS.  Either way no password leaves, the client
    gets the internal-error line, and the log says what happened."""
    with ScriptedBackend([("send", b"* OK plain backend\r\n"), ("recv_line",),
                          ("send", b"a BAD unknown command\r\n"), ("recv_line",)]) as backend:
        auth_service.reply = ok(backend.host, backend.port)
        proxy = start_proxy([f"protocol imap; {setting}"], auth=auth_service.url,
                            mail=verified(certs))
        refused(proxy)
        expected = "upstream SSL handshake failed (" if setting.startswith("proxy_ssl") \
            else 'upstream sent invalid response: "a BAD unknown command"'
        proxy.wait_log(expected)
        backend.wait_connections(1)
        assert b"secret" not in backend.received[0]


@pytest.mark.parametrize("when", ["greeting", "login"])
def test_a_backend_that_breaks_tls_after_the_handshake(start_proxy, auth_service, backends,
                                                       certs, when):
    """Bytes that are not TLS records where the backend's reply should be:
    the client gets the internal-error line and the log blames the backend,
    not the client."""
    steps = [("tls",), ("raw", b"* OK not inside TLS\r\n")] if when == "greeting" else \
        [("tls",), ("send", b"* OK ready\r\n"), ("expect", b"a LOGIN {3}\r\n"),
         ("raw", b"+ OK\r\n")]
    backend = backends(steps, server_context(certs.rsa))
    auth_service.reply = ok(backend.host, backend.port)
    proxy = start_proxy(["protocol imap; proxy_ssl on;"], auth=auth_service.url,
                        mail=verified(certs, "127.0.0.1"))
    refused(proxy)
    proxy.wait_log("upstream SSL error (")
    assert "SSL error with the client" not in proxy.log()


def test_no_clear_text_warning_for_a_loopback_backend(start_proxy, auth_service):
    with ScriptedBackend([("send", b"* OK ready\r\n"), *imap_login()]) as backend:
        auth_service.reply = ok(backend.host, backend.port)
        proxy = start_proxy(["protocol imap;"], auth=auth_service.url)
        with Peer.connect(proxy.port) as client:
            client.line()
            client.send(b"a LOGIN joe secret\r\n")
            assert client.line() == b"a OK Logged in\r\n"
        proxy.wait_log("client logged in")
    assert "in clear text" not in proxy.log()
