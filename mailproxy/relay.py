"""The relay: bytes both ways, untouched, until one side is done.

After login the session's own thread copies client -> backend and one more
named thread copies backend -> client.  Each copier reads what has arrived
(at most its buffer), writes all of it on, and on end-of-file half-closes
the other side with shutdown(SHUT_WR), so bytes already in flight the other
way still arrive.  That is a deliberate difference from nginx, which closes
both sockets as soon as one side reaches EOF and drops what is in flight.

Two limits keep a relay from living for ever:
* `proxy_timeout`: no byte in either direction for this long ends the
  session (nginx re-arms on client traffic only; any traffic is friendlier
  to IDLE sessions fed by the backend);
* once one side has closed, the other has `linger` seconds (the `timeout`
  directive) without traffic to finish.
A failed write, or either limit, shuts both sockets down at once.

Both sockets are non-blocking (stream.py) and the copiers do their own
waiting: one poll() per read, and one per write only when the peer's window
is full.  Either side may be a tls.TlsChannel rather than a socket; it
behaves like one with a timeout, except that it may hold decrypted bytes the
kernel no longer shows to poll(), so those are looked at first.
"""

import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from .stream import send_all


@dataclass
class Outcome:
    """What the relay did, for the session's closing log line."""
    client_bytes: int = 0       # client -> backend
    backend_bytes: int = 0      # backend -> client
    closed_by: str = ""         # "client", "backend", "timeout" or "error"


class Relay:
    """Copies between two connected sockets; `run()` returns an Outcome."""

    def __init__(self, client, backend, idle_timeout, linger, buffers=(4096, 4096), name=""):
        self.client, self.backend = client, backend
        self.idle_timeout, self.linger = idle_timeout, linger
        self.client_buffer, self.backend_buffer = buffers
        self.name = name
        self.outcome = Outcome()
        self.last_traffic = time.monotonic()
        self.one_side_closed = False
        for sock in (client, backend):
            if not isinstance(sock, socket.socket):
                sock.settimeout(idle_timeout)   # a TlsChannel waits, at most this long

    def run(self, leftover=b""):
        """Relay until both directions end; `leftover` (pipelined client
        bytes) goes to the backend first."""
        other = threading.Thread(target=self._copy,
                                 args=(self.backend, self.client, self.backend_buffer, "backend"),
                                 name=f"{self.name} backend->client")
        other.start()
        try:
            if leftover:
                self._send(self.backend, leftover, "client")
            self._copy(self.client, self.backend, self.client_buffer, "client")
        finally:
            other.join()
        return self.outcome

    def _copy(self, source, target, size, side):
        """One direction: `side` names who is reading from `source`.
        Each read takes what has arrived, up to `size`, as a new bytes
        object: an idle session holds no buffer at all."""
        poller = select.poll()
        poller.register(source, select.POLLIN)
        while True:
            wait = self._time_left()
            if wait <= 0:
                self._stop("timeout")
                return
            if not _buffered(source) and not poller.poll(wait * 1000):
                continue
            try:
                data = source.recv(size)
            except (BlockingIOError, InterruptedError):
                continue                # woken without data (a racing reader)
            except ssl.SSLError:
                self._stop("error")     # a broken TLS stream is not an end of file
                return
            except OSError:
                data = b""              # a reset is an end like EOF
            if not data:
                self._end_of(side, target)
                return
            if not self._send(target, data, side):
                return

    def _send(self, target, data, side):
        try:
            if isinstance(target, socket.socket):
                send_all(target, data, self.idle_timeout)
            else:
                target.sendall(data)
        except TimeoutError:
            self._stop("timeout")       # the peer stopped reading for proxy_timeout
            return False
        except OSError:
            self._stop("error")
            return False
        self.last_traffic = time.monotonic()
        if side == "client":
            self.outcome.client_bytes += len(data)
        else:
            self.outcome.backend_bytes += len(data)
        return True

    def _time_left(self):
        limit = min(self.idle_timeout, self.linger) if self.one_side_closed else self.idle_timeout
        return limit - (time.monotonic() - self.last_traffic)

    def _end_of(self, side, target):
        """`side` sent EOF: pass the half-close on, keep the other way open."""
        if not self.outcome.closed_by:
            self.outcome.closed_by = side
        self.one_side_closed = True
        self.last_traffic = time.monotonic()
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _stop(self, reason):
        """End both directions now: the other copier's poll wakes on the shutdown."""
        if not self.outcome.closed_by:
            self.outcome.closed_by = reason
        for sock in (self.client, self.backend):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _buffered(sock):
    """Bytes a TLS connection has already received: poll() cannot see them."""
    pending = getattr(sock, "pending", None)
    return pending() if pending else 0
