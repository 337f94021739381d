"""A line-oriented wrapper around a socket, read under a deadline.

Mail protocols are read a line at a time, and a proxy must never trust the
peer to end its lines: every read here is bounded by a byte limit, and every
read and write by a deadline.  The deadline is one point in time for a
whole phase (nginx's `timeout` covers the entire pre-login dialogue, not
each command), so before each read or write the socket's timeout is set to
what is left of it (`settimeout()`), and the socket call itself waits.  A
call that runs out of time raises TimeoutError; the session catches it in
one place.  As with nginx's timers, a timeout that ends less than
LAZY_TIMER past the deadline is not set again (`lazy_settimeout()`):
settimeout() is a system call that lets go of the GIL, and a login made a
dozen of them.

The socket may be a plain socket or a tls.TlsChannel: both are blocking
with a timeout, and this module does not ask which one it holds.

Bytes read past the end of a line stay in `buffer`: a client may pipeline
several commands, and whatever is left when the relay starts is sent on to
the backend first.

While the session waits on someone else, the client's close must still end
it at once (SECURITY.md, "Deadlines, phase by phase").  A Stream to the
backend is given the client's raw socket to `watch` (login.py), and the
auth transport does the same with `wait_readable()`: before each blocking
read, one poll() waits for our peer's bytes and for the watched socket's
close (POLLRDHUP: a FIN or a reset, not bytes the client pipelines), and
a close raises ClientGone.  Only reads are watched: a blocking connect()
cannot be polled without a non-blocking socket, and the writes of a login
are a few short lines.
"""

import select
import socket
import time

CHUNK = 4096            # one recv(); commands are short, literals arrive in pieces
POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)     # the peer closed; Linux's value
LAZY_TIMER = 0.3        # nginx's NGX_TIMER_LAZY_DELAY: a timer that would fire within
                        # 300 ms of the one wanted is not re-armed (ours: only later)
WAIT_STEP = 3600        # longest single poll() of a wait: an Auth-Wait of 10**11
                        # seconds would overflow poll()'s timeout, so it is waited in steps


class Closed(Exception):
    """The peer closed the connection (or reset it)."""


class ClientGone(Exception):
    """The client closed (or reset) its connection while the session was
    waiting on the auth service or the backend.  Not a Closed: that one,
    raised by a backend Stream, is the backend's close."""


class TooLong(Exception):
    """No end of line within the limit.  `head` is what was read, so the
    caller can still find a tag to answer with."""

    def __init__(self, head):
        super().__init__("line too long")
        self.head = bytes(head)


class Stream:
    """A socket plus a read buffer, a byte limit per read, and a deadline.
    Once given a raw socket to `watch` (login.py gives a Stream to the
    backend the client's), each read first waits with wait_readable(), so
    the watched socket's close raises ClientGone."""

    def __init__(self, sock):
        self.sock = sock
        self.watch = None
        self.buffer = bytearray()
        self.deadline = None
        self.received = self.sent = 0   # bytes, for the session's summary line

    def set_deadline(self, seconds):
        """Let the next reads and writes together take at most `seconds`
        (None: wait for ever)."""
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def _left(self):
        """Seconds left before the deadline (None: no deadline)."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def _fill(self):
        if self.watch is not None:
            wait_readable(self.sock, self._left(), self.watch)
        lazy_settimeout(self.sock, self._left())
        self._receive(CHUNK)

    def _receive(self, size):
        """One recv() of at most `size` bytes into the buffer; Closed at
        the end of the stream."""
        try:
            data = self.sock.recv(size)
        except ConnectionError:
            raise Closed() from None
        if not data:
            raise Closed()
        self.received += len(data)
        self.buffer += data

    def readline(self, limit):
        """One line, LF included, of at most `limit` bytes."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start, limit)
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                return line
            if len(self.buffer) >= limit:
                raise TooLong(self.buffer[:limit])
            start = len(self.buffer)
            self._fill()

    def read_exact(self, size):
        """Exactly `size` bytes (an IMAP literal); the caller bounds `size`."""
        while len(self.buffer) < size:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def write(self, data):
        lazy_settimeout(self.sock, self._left())
        try:
            self.sock.sendall(data)
        except ConnectionError:
            raise Closed() from None
        self.sent += len(data)

    def start_tls(self, channel):
        """Switch to TLS (a tls.TlsChannel over our socket), handshaking
        under the deadline.  Bytes the peer sent after its STARTTLS are
        dropped, never run as commands: CVE-2014-3556."""
        self.buffer.clear()
        channel.settimeout(self._left())
        channel.handshake()
        self.sock = channel

    @property
    def secure(self):
        return hasattr(self.sock, "tls")

    def take_buffer(self):
        """Hand over the bytes read but not yet used (pipelined commands)."""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def wait(self, seconds, limit):
        """Sleep `seconds`, but notice if the peer goes away meanwhile.

        Bytes that arrive are kept (up to `limit` buffered), since a client
        may already have sent its next command.  Raises Closed on EOF, also
        once `limit` bytes are buffered (POLLRDHUP still says so).
        """
        end = time.monotonic() + seconds
        while True:
            left = min(end - time.monotonic(), WAIT_STEP)
            if left <= 0:
                return
            if len(self.buffer) >= limit:       # no room: watch for the close only
                if _hung_up_within(self.sock, left):
                    raise Closed()
                continue
            if not readable(self.sock, left):
                continue
            self.sock.settimeout(left)  # a TLS record may still be on its way
            try:
                self._receive(limit - len(self.buffer))
            except TimeoutError:
                continue

    def talked_within(self, seconds):
        """Did the peer send anything in the next `seconds`?  (SMTP's
        greeting delay; the bytes stay unread.)  Raises Closed on EOF."""
        if self.buffer or getattr(self.sock, "pending", lambda: 0)():
            return True
        if not readable(self.sock, seconds):
            return False
        raw = getattr(self.sock, "sock", self.sock)     # under a TlsChannel: any byte counts
        try:
            if not raw.recv(1, socket.MSG_PEEK):
                raise Closed()
        except ConnectionError:
            raise Closed() from None
        return True


def lazy_settimeout(sock, seconds):
    """Let the socket's next call wait `seconds` (None: for ever).  A
    timeout already set that ends that wait less than LAZY_TIMER later is
    left as it is: never earlier, as a wait must not end before its time."""
    current = sock.gettimeout()
    if current == seconds:
        return
    if current is not None and seconds is not None and 0 < current - seconds < LAZY_TIMER:
        return
    sock.settimeout(seconds)


def wait_readable(sock, seconds, watch):
    """Wait until `sock` is readable (bytes or its end), for at most
    `seconds` (None: no limit, in WAIT_STEP polls), while watching the raw
    socket `watch` for its peer's close.  Returns when `sock` is readable;
    raises ClientGone when `watch` closes or is reset first (also when both
    happen at once), TimeoutError when the time runs out.  Bytes arriving on
    `watch` do not wake it (only POLLRDHUP, and POLLHUP/POLLERR, which
    poll() always reports).  A TLS channel (`sock`) with decrypted bytes
    is readable at once; one whose next record is still on its way may
    then block in its read, for what is left of the caller's deadline."""
    if getattr(sock, "pending", lambda: 0)():
        return
    end = None if seconds is None else time.monotonic() + seconds
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(watch, POLLRDHUP)
    watched = watch.fileno()
    while True:
        step = WAIT_STEP if end is None else min(end - time.monotonic(), WAIT_STEP)
        if step <= 0:
            raise TimeoutError("deadline passed")
        ready = dict(poller.poll(step * 1000))
        if watched in ready:
            raise ClientGone()
        if ready:
            return


def readable(sock, seconds):
    """Wait up to `seconds` (None: no limit) for `sock` to become readable
    (or reach EOF); a TLS channel that holds decrypted bytes already is.
    A wait with poll() on a blocking socket, not a read, so it holds no
    buffer: a recv(n) that blocks holds its n bytes all the while.  poll(),
    not select(), as a busy proxy has fds above select()'s 1023."""
    if getattr(sock, "pending", lambda: 0)():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(None if seconds is None else seconds * 1000))


def _hung_up_within(sock, seconds):
    """Did the peer close (or reset) within `seconds`?  Only the close
    wakes this wait, not bytes that arrive: Linux's POLLRDHUP."""
    poller = select.poll()
    poller.register(sock, POLLRDHUP)
    return bool(poller.poll(seconds * 1000))
