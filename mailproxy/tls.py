"""TLS: a connection object two threads may share, and the ssl contexts.

Why not `ssl.SSLSocket`?  After login the relay runs two threads over the
client connection, one reading and one writing.  OpenSSL forbids using one
SSL object from two threads at once, and an SSLSocket gives no way to
serialise the two without also serialising the blocking socket calls (a
reader waiting for the client would stall the writer).  So `TlsChannel`
keeps the SSL state machine in memory (`ssl.SSLObject` between two
`MemoryBIO`s), touches it only under `lock`, and does the socket I/O
outside the lock:

    reader: raw recv (no lock) -> [lock] feed incoming BIO, SSL_read [unlock]
    writer: [send_lock [lock] SSL_write, take outgoing BIO [unlock] raw send]

`send_lock` makes TLS records leave in the order OpenSSL made them, even
when the reader produced some (a TLS 1.3 KeyUpdate answer, session
tickets); the reader never blocks on it (see `_flush`).  The channel looks like a socket to stream.py and relay.py:
recv, recv_into, sendall, settimeout, fileno, shutdown, close, plus
`pending()` for decrypted bytes that poll() cannot see.
"""

import socket
import ssl
import threading

CHUNK = 65536           # raw bytes per recv: up to four full TLS records


class TlsChannel:
    """TLS over a connected blocking socket (server or client side)."""

    def __init__(self, sock, context, server_side, server_hostname=None):
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.lock = threading.Lock()        # the SSLObject: one thread at a time
        self.send_lock = threading.Lock()   # outgoing records keep their order

    # ------------------------------------------------------------ socket-like

    def settimeout(self, seconds):
        self.sock.settimeout(seconds)

    def gettimeout(self):
        return self.sock.gettimeout()

    def fileno(self):
        return self.sock.fileno()

    def getsockname(self):
        return self.sock.getsockname()

    def setsockopt(self, *args):
        self.sock.setsockopt(*args)

    def close(self):
        self.sock.close()

    def handshake(self):
        """Run the handshake to the end (under the socket's timeout)."""
        while True:
            with self.lock:
                try:
                    self.tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
            self._flush()
            if done:
                return
            if not self._feed():
                raise ConnectionResetError("peer closed the connection during the TLS handshake")

    def recv(self, size):
        """Up to `size` decrypted bytes; b"" at the end of the stream."""
        while True:
            with self.lock:
                try:
                    data = self.tls.read(size)
                except ssl.SSLWantReadError:
                    data = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""          # close_notify, or EOF without one
            self._flush()               # a read may have produced records to send
            if data is not None:
                return data
            if not self._feed():
                with self.lock:
                    self.incoming.write_eof()

    def recv_into(self, buffer):
        data = self.recv(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def sendall(self, data):
        with self.send_lock:
            with self.lock:
                self.tls.write(data)    # a memory BIO never asks to wait
                out = self.outgoing.read()
            self.sock.sendall(out)
        self._flush()                   # what a reader queued meanwhile

    def pending(self):
        """Bytes already received that a poll() on the socket would miss."""
        with self.lock:
            return self.tls.pending() + self.incoming.pending

    def shutdown(self, how):
        """Send close_notify before a write-side shutdown (RFC 8446 6.1)."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            with self.lock:
                try:
                    self.tls.unwrap()
                except (ssl.SSLError, ValueError):
                    pass                # want-read: the peer's reply is not awaited
            try:
                self._flush()
            except OSError:
                pass
        self.sock.shutdown(how)

    # ---------------------------------------------------------- the pumps

    def _feed(self):
        """One raw recv into the incoming BIO; False at EOF."""
        data = self.sock.recv(CHUNK)
        with self.lock:
            if data:
                self.incoming.write(data)
        return bool(data)

    def _flush(self):
        """Send what OpenSSL has queued, unless another thread is sending:
        that thread flushes again after letting go of `send_lock`, so a
        reader never waits behind a writer blocked on a full socket (two
        such waits, one per peer, would be a deadlock)."""
        while self._queued():
            if not self.send_lock.acquire(blocking=False):
                return
            try:
                with self.lock:
                    out = self.outgoing.read()
                self.sock.sendall(out)
            finally:
                self.send_lock.release()

    def _queued(self):
        with self.lock:
            return self.outgoing.pending

    # ------------------------------------------------------- for the logs

    @property
    def version(self):
        return self.tls.version()

    @property
    def cipher(self):
        cipher = self.tls.cipher()
        return cipher[0] if cipher else None

    def peer_certificate(self, binary=True):
        return self.tls.getpeercert(binary_form=binary)
