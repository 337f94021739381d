"""The relay: bytes both ways, untouched, until one side is done.

After login a pair of copy threads moves the bytes: the session's own
thread copies client -> backend, and one more named thread copies
backend -> client.  Each reads what has arrived (at most its buffer), writes
all of it on, and on end-of-file half-closes the other side with
shutdown(SHUT_WR), so bytes already in flight the other way still arrive.
That is a deliberate difference from nginx, which closes both sockets as
soon as one side reaches EOF and drops what is in flight.

Both sockets are blocking with a timeout of `proxy_timeout`, so every
write waits at most that long; a read first waits (poll()) for bytes to
read, no longer than that, and only then asks for them, so that a copier
blocked on a quiet peer holds no buffer (a TlsChannel's recv() waits the
same way for its raw bytes).  Two limits keep a relay from
living for ever:
* `proxy_timeout`: no byte in either direction for this long ends the
  session (nginx re-arms on client traffic only; any traffic is friendlier
  to IDLE sessions fed by the backend).  A read that times out while the
  other direction has moved bytes since simply reads again;
* once one side has closed, the other has `linger` seconds (the `timeout`
  directive) without traffic to finish: the copier that is done watches
  the other one.
A failed write, or either limit, shuts both sockets down at once, which
wakes the other copier.

Either side may be a tls.TlsChannel rather than a socket; it has the same
blocking face.  `Relay.bulk()` is where a subclass may move a burst of bulk
data another way: ops/splice.py's SpliceRelay does so inside the kernel.
"""

import socket
import ssl
import threading
import time
from dataclasses import dataclass

from .stream import readable


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
        self.done = 0                               # directions that have ended
        self.changed = threading.Condition()        # guards `done`; a copier waits on it

    def run(self, leftover=b""):
        """Relay until both directions end; `leftover` (pipelined client
        bytes) goes to the backend first."""
        for sock in (self.client, self.backend):
            sock.settimeout(self.idle_timeout)
        other = threading.Thread(target=self.direction,
                                 args=(self.backend, self.client, self.backend_buffer, "backend"),
                                 name=f"{self.name} backend->client", daemon=True)
        other.start()
        try:
            if not leftover or self.deliver(self.backend, leftover, "client"):
                self.copy(self.client, self.backend, self.client_buffer, "client")
            self.finished()
        finally:
            other.join()
        return self.outcome

    def direction(self, source, target, size, side):
        """The second copy thread: one direction, then the wait for the other."""
        self.copy(source, target, size, side)
        self.finished()

    def copy(self, source, target, size, side):
        """One direction: `side` names who is reading from `source`.  Each
        read takes what has arrived, up to `size`, as a new bytes object
        once it has arrived: an idle session holds no buffer at all."""
        while True:
            data = self.read(source, size)
            if data is None:
                return                  # the relay was stopped
            if not data:
                self.end_of(side, target)
                return
            if not self.deliver(target, data, side):
                return
            if len(data) == size and not self.bulk(source, target, side):
                return

    def bulk(self, source, target, side):
        """A read filled the buffer: bulk data is flowing.  The plain relay
        goes on copying; a subclass may move the burst another way.  False
        when the direction has ended."""
        return True

    def read(self, source, size):
        """The next bytes from `source` (b"" at its end), or None when the
        relay has been stopped (by a time limit or a broken TLS stream).
        It waits for bytes before it asks for them: a recv(size) that
        blocks holds its `size`-byte buffer all the while, and an idle
        session would hold two.  A TlsChannel's recv() waits that way
        itself, so a channel is asked at once."""
        while True:
            left = self.time_left()
            if left <= 0:
                self.stop("timeout")
                return None
            try:
                if not isinstance(source, socket.socket) or readable(source, left):
                    return source.recv(size)
            except TimeoutError:
                pass                    # a TLS record's tail that did not come
            except (ssl.SSLError, MemoryError):
                # a broken TLS stream is not an end of file; a buffer the
                # machine cannot give must end the relay, not its thread
                self.stop("error")
                return None
            except OSError:
                return b""              # a reset is an end like EOF

    def deliver(self, target, data, side):
        """Write `data` from `side` on, and count it; False if the write
        failed, or the peer stopped reading for proxy_timeout: the relay is
        then stopped."""
        return self.passed(lambda: target.sendall(data), len(data), side)

    def passed(self, write, count, side):
        """Run `write`, which passes `count` bytes from `side` on, and count
        them; False (and the relay stopped) if it failed or timed out."""
        try:
            write()
        except TimeoutError:
            self.stop("timeout")
            return False
        except OSError:
            self.stop("error")
            return False
        self.last_traffic = time.monotonic()
        if side == "client":
            self.outcome.client_bytes += count
        else:
            self.outcome.backend_bytes += count
        return True

    def finished(self):
        """This direction is over.  Wait for the other one, for at most
        `linger` seconds without traffic once one side has closed; then
        stop it."""
        with self.changed:
            self.done += 1
            self.changed.notify_all()
            while self.done < 2:
                left = self.time_left()
                if left <= 0:
                    break
                self.changed.wait(left)
        if self.done < 2:
            self.stop("timeout")

    def time_left(self):
        limit = min(self.idle_timeout, self.linger) if self.one_side_closed else self.idle_timeout
        return limit - (time.monotonic() - self.last_traffic)

    def end_of(self, side, target):
        """`side` sent EOF: pass the half-close on, keep the other way open."""
        if not self.outcome.closed_by:
            self.outcome.closed_by = side
        self.one_side_closed = True
        self.last_traffic = time.monotonic()
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self, reason):
        """End both directions now: the other copier's read wakes on the shutdown."""
        if not self.outcome.closed_by:
            self.outcome.closed_by = reason
        for sock in (self.client, self.backend):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
