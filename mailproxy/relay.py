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

Between two plain sockets, a direction that starts carrying bulk data (a
read that fills the buffer: a big FETCH, RETR or DATA) moves the rest of
its bytes with os.splice() through a pipe of its own, inside the kernel.
The pipe's two fds exist only from then until the relay ends, so idle and
interactive sessions still cost two fds each.
"""

import fcntl
import os
import select
import socket
import ssl
import time
from dataclasses import dataclass

from .stream import send_all, wait_for
from .threads import Threads

HAVE_SPLICE = hasattr(os, "splice")
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
PIPE_SIZE = 262144          # bytes per splice: a stream arrives in many small pieces
                            # and a pipe holds 16 of them by default.  In-process,
                            # loopback: 1.2 GB/s with 64 KB pipes, 1.5 GB/s with 256 KB
MIN_PIPE_SIZE = 65536       # a smaller pipe is not worth it: copy instead
TCP = (socket.AF_INET, socket.AF_INET6)
BURST_GAP = 1.0             # seconds without data that end a burst and free its pipe


@dataclass
class Outcome:
    """What the relay did, for the session's closing log line."""
    client_bytes: int = 0       # client -> backend
    backend_bytes: int = 0      # backend -> client
    closed_by: str = ""         # "client", "backend", "timeout" or "error"


class Relay:
    """Copies between two connected sockets; `run()` returns an Outcome."""

    def __init__(self, client, backend, idle_timeout, linger, buffers=(4096, 4096), name="",
                 threads=None):
        self.client, self.backend = client, backend
        self.threads = threads or Threads(max_parked=0)     # threads.py
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
        other = self.threads.start(self._copy,
                                   (self.backend, self.client, self.backend_buffer, "backend"),
                                   f"{self.name} backend->client")
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
        object: an idle session holds no buffer at all.  A read that fills
        `size` means bulk data is flowing; between two plain sockets it then
        goes through a pipe (_splice) until the burst is over."""
        poller = select.poll()
        poller.register(source, select.POLLIN)
        while True:
            if not self._wait_readable(source, poller):
                return
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
            if len(data) == size and _splice_pair(source, target):
                pipe = _open_pipe()
                if pipe:
                    try:
                        if self._splice(source, target, side, poller, pipe):
                            return
                    finally:
                        for end in pipe:
                            os.close(end)

    def _splice(self, source, target, side, poller, pipe):
        """A burst of plain-text bulk data, moved by the kernel: os.splice()
        from the source socket into the pipe, and from the pipe into the
        target socket.  No byte is copied into Python, which halves the CPU
        of a large FETCH or RETR.  While the data flows there is usually more
        waiting, so each read is tried before poll() is asked.  The pipe is
        emptied after every read.  True when the direction has ended, False
        after BURST_GAP seconds without data (the pipe is then closed: the
        kernel counts pipe sizes per user, used or not)."""
        read_end, write_end = pipe
        while True:
            try:
                count = os.splice(source.fileno(), write_end, PIPE_SIZE, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                if not poller.poll(min(BURST_GAP, max(self._time_left(), 0)) * 1000):
                    return False
                continue
            except OSError:
                count = 0               # a reset is an end like EOF
            if not count:
                self._end_of(side, target)
                return True
            if not self._deliver(lambda: _drain(read_end, target, count, self.idle_timeout),
                                 count, side):
                return True

    def _wait_readable(self, source, poller):
        """Wait for bytes (or EOF) from `source`, up to the relay's time
        limits; False when they ran out (the relay is then stopped)."""
        while True:
            wait = self._time_left()
            if wait <= 0:
                self._stop("timeout")
                return False
            if _buffered(source) or poller.poll(wait * 1000):
                return True

    def _send(self, target, data, side):
        if isinstance(target, socket.socket):
            return self._deliver(lambda: send_all(target, data, self.idle_timeout),
                                 len(data), side)
        return self._deliver(lambda: target.sendall(data), len(data), side)

    def _deliver(self, write, count, side):
        """Run `write`, which passes `count` bytes from `side` on, and count
        them; False if it failed, or the peer stopped reading for
        proxy_timeout: the relay is then stopped."""
        try:
            write()
        except TimeoutError:
            self._stop("timeout")
            return False
        except OSError:
            self._stop("error")
            return False
        self.last_traffic = time.monotonic()
        if side == "client":
            self.outcome.client_bytes += count
        else:
            self.outcome.backend_bytes += count
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


def _splice_pair(source, target):
    """Can bytes go from `source` to `target` by os.splice()?  Only between
    two plain TCP sockets (TLS must pass through OpenSSL; a `unix:` client
    copies, as older kernels cannot splice from those), and only on Linux."""
    return HAVE_SPLICE and all(isinstance(sock, socket.socket) and sock.family in TCP
                               for sock in (source, target))


def _open_pipe():
    """A non-blocking pipe for _splice, or None when the process is out of
    file descriptors: the relay then goes on copying.  Pipes are made only
    for directions that carry bulk data, so idle sessions cost two fds.
    The pipe is grown to PIPE_SIZE if the system allows it (fs.pipe-max-size,
    and the per-user page limits)."""
    try:
        pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass                    # over fs.pipe-max-size: the default size will do
    if fcntl.fcntl(pipe[1], F_GETPIPE_SZ) < MIN_PIPE_SIZE:
        for end in pipe:        # a user over fs.pipe-user-pages-soft gets two-page
            os.close(end)       # pipes: slower than copying 64 KB at a time
        return None
    return pipe


def _drain(pipe, target, count, seconds):
    """send_all() for `count` bytes waiting in a pipe: splice them into the
    target socket, each wait for room at most `seconds` (TimeoutError)."""
    while count:
        try:
            count -= os.splice(pipe, target.fileno(), count, flags=SPLICE_FLAGS)
        except BlockingIOError:
            if not wait_for(target, select.POLLOUT, seconds):
                raise TimeoutError("peer does not read") from None


def _buffered(sock):
    """Bytes a TLS connection has already received: poll() cannot see them."""
    pending = getattr(sock, "pending", None)
    return pending() if pending else 0
