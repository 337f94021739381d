"""Bulk relay inside the kernel: os.splice() between two plain TCP sockets.

relay.py's copy loop reads every byte into Python and writes it out again.
For a large FETCH, RETR or DATA that is most of the proxy's CPU.  Between
two plain TCP sockets on Linux the kernel can move the bytes itself:
os.splice() from the source socket into a pipe, and from the pipe into the
target socket, with no copy into Python.  `SpliceRelay` is the plain Relay
with one hook filled in: when a read fills the buffer (bulk data is
flowing), the rest of the burst goes through a pipe made for it, which is
closed again BURST_GAP seconds after the burst (the kernel counts pipe
sizes per user, used or not).  So idle and interactive sessions still cost
two fds each, and take exactly the plain copy path.

`relay_class(client, backend)` says which relay fits a pair of sockets:
TLS must pass through OpenSSL, and a `unix:` client copies (older kernels
cannot splice from those).

The relay's sockets have a timeout (proxy_timeout), which Python keeps by
putting their fds in non-blocking mode underneath; os.splice() therefore
returns EAGAIN rather than blocking, and the waits here are poll()s, each
bounded: BURST_GAP for more data, proxy_timeout for room to write.
"""

import fcntl
import functools
import os
import select
import socket

from ..relay import Relay

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


def relay_class(client, backend):
    """SpliceRelay between two plain TCP sockets on Linux, else Relay."""
    plain_tcp = all(isinstance(sock, socket.socket) and sock.family in TCP
                    for sock in (client, backend))
    return SpliceRelay if HAVE_SPLICE and plain_tcp else Relay


class SpliceRelay(Relay):
    """A Relay whose bulk bursts move by os.splice() (see the module)."""

    def bulk(self, source, target, side):
        pipe = open_pipe()
        if pipe is None:
            return True                 # no pipe to be had: go on copying
        try:
            return self.burst(source, target, side, pipe)
        finally:
            for end in pipe:
                os.close(end)

    def burst(self, source, target, side, pipe):
        """Splice from `source` into the pipe and on into `target`, emptying
        the pipe after every read.  While the data flows there is usually
        more waiting, so each splice is tried before poll() is asked.  True
        after BURST_GAP seconds without data (back to copying), False when
        the direction has ended."""
        read_end, write_end = pipe
        while True:
            try:
                count = os.splice(source.fileno(), write_end, PIPE_SIZE, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                if self.more_within(source):
                    continue
                if self.time_left() > 0:
                    return True         # a gap: the burst is over
                self.stop("timeout")
                return False
            except OSError:
                count = 0               # a reset is an end like EOF
            if not count:
                self.end_of(side, target)
                return False
            drain = functools.partial(_drain, read_end, target, count, self.idle_timeout)
            if not self.passed(drain, count, side):
                return False

    def more_within(self, source):
        """Wait up to BURST_GAP (or what is left of the relay's time) for
        more bytes, or the end, from `source`."""
        wait = min(BURST_GAP, max(self.time_left(), 0))
        poller = select.poll()
        poller.register(source, select.POLLIN)
        return bool(poller.poll(wait * 1000))


def open_pipe():
    """A non-blocking pipe of PIPE_SIZE bytes, or None when the process is
    out of file descriptors or the system will not grow the pipe enough
    (fs.pipe-max-size, the per-user page limits): the relay then copies."""
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
    """sendall() for `count` bytes waiting in a pipe: splice them into the
    target socket, each wait for room at most `seconds` (TimeoutError)."""
    poller = select.poll()
    poller.register(target, select.POLLOUT)
    while count:
        try:
            count -= os.splice(pipe, target.fileno(), count, flags=SPLICE_FLAGS)
        except BlockingIOError:
            if not poller.poll(seconds * 1000):
                raise TimeoutError("peer does not read") from None
