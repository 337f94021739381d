"""The TLS channel under an adversarial client (issue 15, item 7).

A client here drives its own TLS over memory BIOs on one thread, so the
test decides exactly what reaches the wire and when: close_notify then FIN
while megabytes flow both ways, or a bare FIN with no close_notify.  The
proxy must treat each as it treats clear text: a half-close loses no byte
of what the backend still sends.  (`BioClient` also drips a ClientHello or
a record a byte at a time in tests/test_drips.py: `timeout` is one
deadline for the pre-login dialogue however the bytes trickle.)
"""

import hashlib
import os
import select
import socket
import time

import pytest

pytest.register_assert_rewrite("certs")
from OpenSSL import SSL

from certs import Peer
from fakes import ScriptedBackend, ok
from harness import free_port
from mailproxy import imap

pytest_plugins = ("proxying", "certs")

MEGABYTES = 3 * 1024 * 1024
DEADLINE = 60           # seconds for a whole exchange (a bound, not a goal)
LOGIN = [("send", b"* OK backend ready\r\n"), ("expect", b"a LOGIN {3}\r\n"),
         ("send", b"+ OK\r\n"), ("expect", b"joe {6}\r\n"), ("send", b"+ OK\r\n"),
         ("expect", b"secret\r\n"), ("send", b"a OK Logged in\r\n")]


class BioClient:
    """A TLS client (pyOpenSSL, memory BIOs) over a plain socket."""

    def __init__(self, port, certs, version=None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if version:
            context.set_max_proto_version(version)
        context.load_verify_locations(certs.ca.cert)
        context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        self.tls = SSL.Connection(context, None)
        self.tls.set_connect_state()
        self.buffer = b""

    def client_hello(self):
        """The bytes of our ClientHello, made but not sent."""
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            pass
        return self.take()

    def take(self):
        out = b""
        while True:
            try:
                out += self.tls.bio_read(65536)
            except SSL.WantReadError:
                return out

    def handshake(self):
        while True:
            try:
                self.tls.do_handshake()
                self.sock.sendall(self.take())
                return
            except SSL.WantReadError:
                self.sock.sendall(self.take())
                self.tls.bio_write(self.sock.recv(65536))

    def send(self, data):
        self.tls.sendall(data)
        self.sock.sendall(self.take())

    def line(self):
        while b"\n" not in self.buffer:
            try:
                self.buffer += self.tls.recv(65536)
            except SSL.WantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return b""
                self.tls.bio_write(data)
            except SSL.ZeroReturnError:
                return b""
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def login(self):
        self.handshake()
        assert self.line() == imap.GREETING
        self.send(b"a LOGIN joe secret\r\n")
        assert self.line() == b"a OK Logged in\r\n"

    def close(self):
        self.sock.close()


# ------------------------------------------------------------ half-closes

@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION],
                         ids=["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("backend_sends", ["an echo", "its own 3 MB"])
def test_close_notify_and_fin_while_megabytes_flow_both_ways_lose_no_byte(
        start_proxy, auth_service, certs, backend_sends, version):
    """The client sends 3 MB, then close_notify and FIN, while the backend
    echoes all of it back, or sends 3 MB of its own first and then reads:
    every byte arrives both ways, then the end of the stream."""
    data, own = os.urandom(MEGABYTES), os.urandom(MEGABYTES)
    steps = [("echo",)] if backend_sends == "an echo" else [("send", own), ("sink",)]
    expected = data if backend_sends == "an echo" else own
    with ScriptedBackend([*LOGIN, *steps]) as backend:
        auth_service.reply = ok(backend.host, backend.port)
        port = free_port()
        start_proxy([f"protocol imap; listen 127.0.0.1:{port} ssl;"], auth=auth_service.url,
                    mail=f"ssl_certificate {certs.rsa.cert};\n"
                         f"ssl_certificate_key {certs.rsa.key};")
        client = BioClient(port, certs, version)
        client.login()
        received, ended = both_ways(client, data)
        client.close()
        [record] = backend.wait_connections(1)
    assert ended
    assert len(received) == len(expected)
    assert hashlib.sha256(received).digest() == hashlib.sha256(expected).digest()
    if backend_sends != "an echo":
        assert record.sink_sha256 == hashlib.sha256(data).hexdigest()


def both_ways(client, data):
    """Send `data` then close_notify + FIN, reading all the while, on one
    thread; (what came back, whether the stream ended properly)."""
    sock, tls = client.sock, client.tls
    sock.setblocking(False)
    out, sent, received, closing = bytearray(), 0, bytearray(client.buffer), False
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if sent < len(data) and len(out) < 262144:
            tls.sendall(data[sent:sent + 16384])
            sent += 16384
            out += client.take()
        elif sent >= len(data) and not closing:
            tls.shutdown()                      # close_notify, once
            out += client.take()
            closing = True
        readable, writable, _ = select.select([sock], [sock] if out else [], [], 1)
        if writable:
            del out[:sock.send(out)]
            if closing and not out:
                sock.shutdown(socket.SHUT_WR)   # then the FIN
        if readable:
            raw = sock.recv(262144)
            if not raw:
                return bytes(received), False
            tls.bio_write(raw)
            while True:
                try:
                    received += tls.recv(65536)
                except SSL.WantReadError:
                    break
                except SSL.ZeroReturnError:
                    return bytes(received), True
    raise TimeoutError(f"sent {sent}, received {len(received)} of {len(data)}")


@pytest.mark.parametrize("secure", [False, True])
def test_a_half_close_with_a_bare_fin_still_gets_the_backends_reply(start_proxy, auth_service,
                                                                    certs, secure):
    """LOGOUT, then FIN with no close_notify: the backend still answers,
    and the client gets the answer, as a clear-text client does."""
    script = [*LOGIN, ("expect", b"b LOGOUT\r\n"), ("sleep", 0.5),
              ("send", b"* BYE\r\nb OK Logout completed\r\n"), ("close",)]
    with ScriptedBackend(script) as backend:
        auth_service.reply = ok(backend.host, backend.port)
        port = free_port()
        listen = f"listen 127.0.0.1:{port} ssl;" if secure else f"listen 127.0.0.1:{port};"
        start_proxy([f"protocol imap; {listen}"], auth=auth_service.url,
                    mail=f"ssl_certificate {certs.rsa.cert};\n"
                         f"ssl_certificate_key {certs.rsa.key};")
        if secure:
            client = BioClient(port, certs)
            client.login()
            client.send(b"b LOGOUT\r\n")
        else:
            client = Peer.connect(port)
            assert client.line() == imap.GREETING
            client.send(b"a LOGIN joe secret\r\nb LOGOUT\r\n")
            assert client.line() == b"a OK Logged in\r\n"
        client.sock.shutdown(socket.SHUT_WR)    # a bare FIN
        assert client.line() == b"* BYE\r\n"
        assert client.line() == b"b OK Logout completed\r\n"
        assert client.line() == b""
        client.close()
