"""An idle relay holds no read buffer (issue 19).

A `recv(n)` that blocks holds its n-byte result all the while, so a copier
that asked a quiet peer for 64 KB held 64 KB for as long as the peer said
nothing: two such buffers per idle session, and one more inside a TLS
channel.  The relay now waits for bytes first.  Here a relay runs over
real socket pairs (plain, and a TlsChannel facing a TLS client); one line
goes each way, then, once both copiers are blocked waiting again,
tracemalloc must show no block of a read buffer's size allocated by the
relay, the channel or the stream.
"""

import socket
import sys
import threading
import time
import tracemalloc

import pytest
from OpenSSL import SSL

pytest.register_assert_rewrite("certs")
from certs import Peer, client_context
from mailproxy import relay, stream, tls
from mailproxy.relay import Relay
from mailproxy.session import RELAY_READ
from mailproxy.tls import TlsChannel

pytest_plugins = ("certs",)

SMALL = 4096                # any block this big or bigger would be a read buffer
WAITING = {"readable", "read", "_feed"}     # where a copier blocks, old code or new
DEADLINE = 10               # seconds for a step (a bound, not a goal)
OURS = [tracemalloc.Filter(True, module.__file__) for module in (relay, stream, tls)]


def blocked(idents):
    """Are the threads `idents` all blocked where a copier waits for bytes?"""
    frames = sys._current_frames()
    return all(ident in frames and frames[ident].f_code.co_name in WAITING
               for ident in idents)


def largest_block():
    """The largest block now allocated by relay.py, stream.py or tls.py."""
    traces = tracemalloc.take_snapshot().filter_traces(OURS).traces
    return max((trace.size for trace in traces), default=0)


def tls_pair(certs, sock, peer_sock):
    """A server-side TlsChannel on `sock`, and a TLS client Peer on `peer_sock`."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate_chain_file(certs.ecdsa.cert)
    context.use_privatekey_file(certs.ecdsa.key)
    sock.settimeout(DEADLINE)
    channel = TlsChannel(sock, context, server_side=True)
    peer = Peer(peer_sock)
    client = threading.Thread(target=peer.starttls, args=(client_context(certs),))
    client.start()
    channel.handshake()
    client.join(DEADLINE)
    return channel, peer


@pytest.mark.parametrize("tls_client", [False, True], ids=["plain", "tls"])
def test_an_idle_relay_holds_no_read_buffer(certs, tls_client):
    client, client_peer = socket.socketpair()
    backend, backend_peer = socket.socketpair()
    client_peer.settimeout(DEADLINE)
    peer = Peer(client_peer)
    if tls_client:
        client, peer = tls_pair(certs, client, client_peer)
    backend_side = Peer(backend_peer)
    backend_peer.settimeout(DEADLINE)
    tracemalloc.start()
    try:
        copier = Relay(client, backend, idle_timeout=DEADLINE * 6, linger=DEADLINE,
                       buffers=(RELAY_READ, RELAY_READ), name="idle")
        running = threading.Thread(target=copier.run, name="idle client->backend")
        running.start()
        peer.send(b"a NOOP\r\n")
        assert backend_side.line() == b"a NOOP\r\n"
        backend_side.send(b"a OK NOOP done\r\n")
        assert peer.line() == b"a OK NOOP done\r\n"
        other = next(thread for thread in threading.enumerate()
                     if thread.name == "idle backend->client")
        until = time.monotonic() + DEADLINE
        while not blocked({running.ident, other.ident}) and time.monotonic() < until:
            time.sleep(0.01)
        assert blocked({running.ident, other.ident})
        assert largest_block() < SMALL
        peer.close()                # the client's EOF; the backend then closes too
        assert backend_side.line() == b""
        backend_side.close()
        running.join(DEADLINE)
        assert not running.is_alive()
    finally:
        tracemalloc.stop()
        for sock in (client, backend, client_peer, backend_peer):
            sock.close()
