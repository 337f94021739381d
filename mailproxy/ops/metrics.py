"""Counters for the status endpoint, in memory the processes share.

What is counted: sessions open (by protocol and phase), sessions started,
auth service answers and how long they took, backend connections that
failed, bytes relayed, connections turned away by `worker_connections`,
and, per worker, its pid, state, start time and thread count.
`status.py` turns the sums into pages.  The same memory holds the
connection number of the logs (`*N`), one counter for every process.

Where the counters live.  With `worker_processes N` the sessions run in N
processes and the page is served by yet another (see master.py), so the
counters cannot be Python objects.  The master makes one shared memory
file (`os.memfd_create`) and maps it BEFORE it forks anything, so every
child inherits the same pages:

    header | block 0 | block 1 | ... | block S-1       (64-bit words)

Each worker is given a block (its *slot*) when it is forked and writes only
there.  No two processes ever write the same counter, so counting takes no
lock across processes; the status process reads every block and adds them
up.  Inside one worker, session threads share the block: `words[i] += 1`
is a read and a write that another thread could split, so a worker's
`Meter` takes one small lock (a plain threading.Lock) around each update.
A session takes it some six to ten times in its life (start, each phase,
each auth service answer, the relay's byte counts, the end), never per
relayed byte, and allocates nothing: the hot path stays a few integer
additions.

Counters are never reset.  When a worker has exited (the master has
reaped it, so nobody writes the block any more), the master clears the
block's gauges (open sessions, threads, pid) and keeps its counters; the
next worker given that slot adds to them.  So the totals on the page are
totals since the master started, across reloads and crashed workers.

The table grows.  A reload runs the new workers while the old ones finish
their sessions, and an IMAP IDLE session can keep an old worker for hours,
so any number of workers may be alive at once.  When every slot is taken,
the master doubles the table: it extends the file (`os.ftruncate`), maps
it again, and only then writes the new slot count into the header.  The
workers already running keep their old, shorter mapping, which still holds
their own block; a worker forked later inherits the longer one; the status
process, forked long before, compares the header's count with its mapping
before each page and maps the file again when the master has grown it
(`Table.current()`).  The file never shrinks, so every mapping stays valid.

A reader takes no lock either: each word is aligned and stored whole, so
it never sees half a number, but a scrape can catch a session between two
phases (counted in both, or in neither, for an instant).  That is the
usual bargain of a metrics page.

The connection number is the one word every worker writes, so it is the
one word under a lock shared by processes: a POSIX record lock
(`fcntl.lockf`) on that word of the file, held by one process for a read
and a store, and by one thread of it (the Meter's lock).  The kernel drops
the lock of a process that dies, even one killed holding it.  A worker
takes CONNECTION_BLOCK numbers at a time and hands them out one by one:
a thread that holds the file lock must then get the GIL back to store,
and while it waits every new connection of every worker waits behind it;
taken for each connection, that more than doubled the login p99 at 64 clients in
tests/bench/bench.py (docs/benchmark.md).  So the numbers are unique
across workers and reloads, and rise within a worker, but two workers'
numbers interleave by blocks rather than by the time of each connection.

In single-process mode (`worker_processes 1`) the one process makes a
private table of one slot for itself (`Table.private()`), which never grows
and needs no lock between processes, and serves the page from a thread.
"""

import bisect
import fcntl
import mmap
import os
import threading
import time

PROTOCOLS = ("imap", "pop3", "smtp")
PHASES = ("greeting", "auth-service", "backend-login", "relay")
GREETING, AUTH_SERVICE, BACKEND_LOGIN, RELAY = range(len(PHASES))
AUTH_RESULTS = ("ok", "fail", "wait", "error")
OK, FAIL, WAIT, ERROR = range(len(AUTH_RESULTS))
# Upper bounds (seconds) of the auth service latency histogram; the last
# bucket, +Inf, is implied.  From 5 ms (a local service) to 10 s (a stuck one).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATES = ("free", "serving", "draining")
FREE, SERVING, DRAINING = range(len(STATES))
WORD = 8                    # bytes per counter: a signed 64-bit integer ("q")
CONNECTION_BLOCK = 1000     # connection numbers a worker takes from the shared word at once

_PROTOCOL = {name: index for index, name in enumerate(PROTOCOLS)}


class _Words:
    """Hands out consecutive word offsets, so the layout reads as a list."""

    def __init__(self):
        self.size = 0

    def take(self, count=1):
        start = self.size
        self.size += count
        return start


# The header: who made the table and when, its size now, and the connection counter.
_header = _Words()
MASTER_PID = _header.take()
MASTER_STARTED = _header.take()         # Unix time, milliseconds
SLOTS = _header.take()                  # blocks in the file now (the master grows it)
CONNECTIONS = _header.take()            # the last connection number given out
HEADER_WORDS = _header.size

# One block per worker slot.  Gauges first (cleared when the worker exits),
# then counters (kept for ever).
_block = _Words()
PID = _block.take()                     # 0: nobody uses the slot now
STATE = _block.take()                   # an index into STATES
STARTED = _block.take()                 # Unix time, milliseconds
THREADS = _block.take()
OPEN = _block.take(len(PROTOCOLS) * len(PHASES))         # [protocol][phase]
GAUGE_WORDS = _block.size
TOTAL = _block.take(len(PROTOCOLS))                      # [protocol]
AUTH = _block.take(len(PROTOCOLS) * len(AUTH_RESULTS))   # [protocol][result]
LATENCY = _block.take(len(LATENCY_BUCKETS) + 1)          # [bucket], not cumulative
LATENCY_SUM = _block.take()                              # microseconds
BACKEND_ERRORS = _block.take(len(PROTOCOLS))             # [protocol]
FROM_CLIENT = _block.take(len(PROTOCOLS))                # bytes, [protocol]
FROM_BACKEND = _block.take(len(PROTOCOLS))               # bytes, [protocol]
DROPPED = _block.take()                 # over worker_connections
BLOCK_WORDS = _block.size


def slots_for(worker_processes):
    """How many slots a master's table starts with: the workers, and as
    many again for the old ones still finishing after a reload (it grows
    when more are alive at once)."""
    return 2 * worker_processes


def _now_ms():
    return int(time.time() * 1000)


def _size(slots):
    return (HEADER_WORDS + slots * BLOCK_WORDS) * WORD


def _words(memory):
    """The 64-bit words of a mapping, as a list-like view."""
    return memoryview(memory).cast("q")


class Table:
    """The shared words.  The master calls `take`, `attach`, `set_state`
    and `release` (it alone writes the per-slot gauges PID, STATE,
    STARTED, and it alone grows the table); a worker writes through its
    `Meter`; the status page calls `totals` and `workers`.  Made before
    any fork, never closed.  `_view` is the pair (slots, words) of this
    process's mapping, replaced whole (one assignment) when it is remapped,
    so a thread never sees a slot count with the wrong mapping."""

    def __init__(self, slots, fd=None):
        self.fd = fd                    # the shared file; None: private to this process
        memory = mmap.mmap(-1 if fd is None else fd, _size(slots))
        self._view = (slots, _words(memory))
        words = self._view[1]
        words[MASTER_PID] = os.getpid()
        words[MASTER_STARTED] = _now_ms()
        words[SLOTS] = slots

    @classmethod
    def shared(cls, slots):
        """The master's table, in a file its children inherit and can map again."""
        fd = os.memfd_create("mailproxy-metrics")
        os.ftruncate(fd, _size(slots))
        return cls(slots, fd)

    @classmethod
    def private(cls):
        """A single process's table: one slot, never grown, never shared."""
        return cls(1)

    def current(self):
        """(slots, words), mapped again first if the master has grown the
        table since this process mapped it (a status process's case)."""
        slots, words = self._view
        if words[SLOTS] != slots:
            slots = words[SLOTS]
            words = _words(mmap.mmap(self.fd, _size(slots)))
            self._view = (slots, words)     # two threads may both remap: either is right
        return slots, words

    @property
    def slots(self):
        return self.current()[0]

    @staticmethod
    def base(slot):
        return HEADER_WORDS + slot * BLOCK_WORDS

    # ------------------------------------------------------- the master

    def take(self, taken):
        """The lowest slot not in `taken`, doubling the table when every
        slot is taken (the master's own mapping then covers the new slots
        before any reader learns of them from the header)."""
        slots, words = self._view
        free = next((slot for slot in range(slots) if slot not in taken), None)
        if free is not None:
            return free
        os.ftruncate(self.fd, _size(2 * slots))
        words = _words(mmap.mmap(self.fd, _size(2 * slots)))
        self._view = (2 * slots, words)
        words[SLOTS] = 2 * slots
        return slots

    def attach(self, slot, pid):
        words, base = self._view[1], self.base(slot)
        words[base + STARTED] = _now_ms()
        words[base + STATE] = SERVING
        words[base + PID] = pid

    def set_state(self, slot, state):
        self._view[1][self.base(slot) + STATE] = state

    def release(self, slot):
        """The slot's worker has exited: clear its gauges, keep its counters."""
        words, base = self._view[1], self.base(slot)
        for index in range(base, base + GAUGE_WORDS):
            words[index] = 0

    def meter(self, slot):
        return Meter(self._view[1], self.base(slot), self.fd)

    # --------------------------------------------------------- the page

    @property
    def master_pid(self):
        return self._view[1][MASTER_PID]

    @property
    def started(self):
        """When the table was made (the master started), Unix seconds."""
        return self._view[1][MASTER_STARTED] / 1000

    def totals(self):
        """Every block added up, word by word (a list of BLOCK_WORDS ints)."""
        slots, words = self.current()
        sums = [0] * BLOCK_WORDS
        for slot in range(slots):
            base = self.base(slot)
            for index, value in enumerate(words[base:base + BLOCK_WORDS].tolist()):
                sums[index] += value
        return sums

    def workers(self):
        """[WorkerView] of the slots in use, by slot."""
        slots, words = self.current()
        found = []
        for slot in range(slots):
            base = self.base(slot)
            block = words[base:base + GAUGE_WORDS].tolist()
            if block[PID]:
                found.append(WorkerView(slot, block[PID], STATES[block[STATE]],
                                        block[STARTED] / 1000, block[THREADS],
                                        sum(block[OPEN:GAUGE_WORDS])))
        return found


class WorkerView:
    """One worker as the page shows it."""

    __slots__ = ("slot", "pid", "state", "started", "threads", "sessions")

    def __init__(self, slot, pid, state, started, threads, sessions):
        self.slot, self.pid, self.state, self.started = slot, pid, state, started
        self.threads, self.sessions = threads, sessions


class Meter:
    """A worker's own block: what sessions call as things happen.  One
    lock per process keeps two threads from losing an addition (see the
    module docstring); it is never held across any I/O.  `fd` is the
    shared table's file (None for a private table), locked around the
    connection number."""

    __slots__ = ("words", "base", "fd", "lock", "numbers")

    def __init__(self, words, base, fd=None):
        self.words, self.base, self.fd = words, base, fd
        self.lock = threading.Lock()
        self.numbers = iter(())     # what is left of the block of connection numbers

    def connection(self):
        """The next connection number (`*N` in the logs), unique among
        every worker of this master, across reloads: from this worker's
        block, and when that is used up, from a new one."""
        with self.lock:
            number = next(self.numbers, None)
            if number is None:
                first = self._take_block()
                self.numbers = iter(range(first + 1, first + CONNECTION_BLOCK))
                number = first
        return number

    def _take_block(self):
        """The first of CONNECTION_BLOCK numbers no other worker will use."""
        if self.fd is not None:     # held for a read and a store: no deadline needed
            fcntl.lockf(self.fd, fcntl.LOCK_EX, WORD, CONNECTIONS * WORD)
        try:
            first = self.words[CONNECTIONS] + 1
            self.words[CONNECTIONS] = first + CONNECTION_BLOCK - 1
        finally:
            if self.fd is not None:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, WORD, CONNECTIONS * WORD)
        return first

    def opened(self, protocol):
        """A session starts, in the greeting phase."""
        index = _PROTOCOL[protocol]
        with self.lock:
            self.words[self.base + TOTAL + index] += 1
            self.words[self.base + OPEN + index * len(PHASES) + GREETING] += 1

    def moved(self, protocol, old, new):
        """A session goes from phase `old` to phase `new`."""
        row = self.base + OPEN + _PROTOCOL[protocol] * len(PHASES)
        with self.lock:
            self.words[row + old] -= 1
            self.words[row + new] += 1

    def closed(self, protocol, phase):
        with self.lock:
            self.words[self.base + OPEN + _PROTOCOL[protocol] * len(PHASES) + phase] -= 1

    def auth(self, protocol, result, seconds):
        """One auth service round trip: its result (OK, FAIL, WAIT, ERROR)
        and how long it took."""
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)   # le="bound" holds <= bound
        base = self.base
        with self.lock:
            self.words[base + AUTH + _PROTOCOL[protocol] * len(AUTH_RESULTS) + result] += 1
            self.words[base + LATENCY + bucket] += 1
            self.words[base + LATENCY_SUM] += int(seconds * 1_000_000)

    def backend_error(self, protocol):
        with self.lock:
            self.words[self.base + BACKEND_ERRORS + _PROTOCOL[protocol]] += 1

    def relayed(self, protocol, from_client, from_backend):
        """A relay ended: its byte counts (added once, not per read)."""
        index = self.base + _PROTOCOL[protocol]
        with self.lock:
            self.words[index + FROM_CLIENT] += from_client
            self.words[index + FROM_BACKEND] += from_backend

    def dropped(self):
        """A connection closed at once: worker_connections were all in use."""
        with self.lock:
            self.words[self.base + DROPPED] += 1

    def set_threads(self, count):
        self.words[self.base + THREADS] = count     # one store: no lock needed


def auth_result(reply):
    """The result index of an auth service reply (an auth_http.AuthReply)."""
    if reply.ok:
        return OK
    return WAIT if reply.retry else FAIL
