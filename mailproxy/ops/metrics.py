"""Counters for the status endpoint, in memory the processes share.

What is counted: sessions open (by protocol and phase), sessions started,
auth service answers and how long they took, backend connections that
failed, bytes relayed, connections turned away by `worker_connections`,
and, per worker, its pid, state, start time and thread count.
`status.py` turns the sums into pages.

Where the counters live.  With `worker_processes N` the sessions run in N
processes and the page is served by yet another (see master.py), so the
counters cannot be Python objects.  The master makes one anonymous shared
mapping (`mmap.mmap(-1, size)`) BEFORE it forks anything, so every child
inherits the same pages:

    header | block 0 | block 1 | ... | block S-1       (64-bit words)

Each worker is given a block (its *slot*) when it is forked and writes only
there.  No two processes ever write the same word, so nothing is locked
across processes; the status process reads every block and adds them up.
Inside one worker, session threads share the block: `words[i] += 1` is a
read and a write that another thread could split, so a worker's `Meter`
takes one small lock (a plain threading.Lock) around each update.  A
session takes it some six to ten times in its life (start, each phase, each
auth service answer, the relay's byte counts, the end), never per relayed
byte, and allocates nothing: the hot path stays a few integer additions.

Counters are never reset.  When a worker exits, the master clears the
block's gauges (open sessions, threads, pid) and keeps its counters; the
next worker given that slot adds to them.  So the totals on the page are
totals since the master started, across reloads and crashed workers.

A reader takes no lock either: each word is aligned and stored whole, so
it never sees half a number, but a scrape can catch a session between two
phases (counted in both, or in neither, for an instant).  That is the
usual bargain of a metrics page.

Slots: a reload runs the new workers while the old ones finish their
sessions, so 2N slots can be busy at once; the table has 2N + SPARE_SLOTS.
A worker that finds none free (many reloads in a row while long sessions
drain, or a reload that raised `worker_processes`) is logged and runs with
a private block nobody reads: it serves, it just is not counted.

In single-process mode (`worker_processes 1`) the one process makes a
table of one slot for itself and serves the page from a thread.
"""

import bisect
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
SPARE_SLOTS = 8             # beyond 2 x worker_processes: room for reloads in a row
WORD = 8                    # bytes per counter: a signed 64-bit integer ("q")

_PROTOCOL = {name: index for index, name in enumerate(PROTOCOLS)}


class _Words:
    """Hands out consecutive word offsets, so the layout reads as a list."""

    def __init__(self):
        self.size = 0

    def take(self, count=1):
        start = self.size
        self.size += count
        return start


# The header: who made the table, and when.
_header = _Words()
MASTER_PID = _header.take()
MASTER_STARTED = _header.take()         # Unix time, milliseconds
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
    """How many worker slots a master with this many workers needs."""
    return 2 * worker_processes + SPARE_SLOTS


def _now_ms():
    return int(time.time() * 1000)


class Table:
    """The shared words.  The master calls `attach`, `set_state` and
    `release` (it alone writes the per-slot gauges PID, STATE, STARTED);
    a worker writes through its `Meter`; the status page calls `totals`
    and `workers`.  Made before any fork, never closed."""

    def __init__(self, slots):
        self.slots = slots
        self.memory = mmap.mmap(-1, (HEADER_WORDS + slots * BLOCK_WORDS) * WORD)
        self.words = memoryview(self.memory).cast("q")
        self.words[MASTER_PID] = os.getpid()
        self.words[MASTER_STARTED] = _now_ms()

    def base(self, slot):
        return HEADER_WORDS + slot * BLOCK_WORDS

    # ------------------------------------------------------- the master

    def free_slot(self, taken):
        """The lowest slot not in `taken`, or None when all are busy."""
        return next((slot for slot in range(self.slots) if slot not in taken), None)

    def attach(self, slot, pid):
        base = self.base(slot)
        self.words[base + STARTED] = _now_ms()
        self.words[base + STATE] = SERVING
        self.words[base + PID] = pid

    def set_state(self, slot, state):
        self.words[self.base(slot) + STATE] = state

    def release(self, slot):
        """The slot's worker has exited: clear its gauges, keep its counters."""
        base = self.base(slot)
        for index in range(base, base + GAUGE_WORDS):
            self.words[index] = 0

    def meter(self, slot):
        return Meter(self.words, self.base(slot))

    # --------------------------------------------------------- the page

    @property
    def master_pid(self):
        return self.words[MASTER_PID]

    @property
    def started(self):
        """When the table was made (the master started), Unix seconds."""
        return self.words[MASTER_STARTED] / 1000

    def totals(self):
        """Every block added up, word by word (a list of BLOCK_WORDS ints)."""
        sums = [0] * BLOCK_WORDS
        for slot in range(self.slots):
            base = self.base(slot)
            for index, value in enumerate(self.words[base:base + BLOCK_WORDS].tolist()):
                sums[index] += value
        return sums

    def workers(self):
        """[WorkerView] of the slots in use, by slot."""
        found = []
        for slot in range(self.slots):
            base = self.base(slot)
            block = self.words[base:base + GAUGE_WORDS].tolist()
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
    module docstring); it is never held across any I/O."""

    __slots__ = ("words", "base", "lock")

    def __init__(self, words, base):
        self.words, self.base = words, base
        self.lock = threading.Lock()

    @classmethod
    def unshared(cls):
        """For a worker without a slot: a private block that nobody reads."""
        return Table(1).meter(0)

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
