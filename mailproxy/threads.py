"""Threads that are kept for the next session instead of ending.

Every session runs in a thread of its own, and its relay in one more
(server.py, relay.py).  Starting a thread and letting it end costs about
0.1 ms of CPU here: clone(), a stack to map and unmap, and a wait until
the new thread runs (Thread.start() returns only then), each a switch
between threads that the other sessions' threads pay for too.  So a
thread whose job is done parks for a while (`KEEP_SECONDS`) and the next
job is handed to it instead, at the cost of waking it.  Measured with
tests/bench/probe.py (IMAP, 64 clients, 2 workers): 1.42 -> 1.22 ms of CPU
per login, 740 -> 940 logins/s.  At most `MAX_PARKED` threads wait; more
end at once, and parked ones end after KEEP_SECONDS, so a burst of sessions
leaves no crowd behind.

`Threads.start(target, args, name)` runs `target(*args)` on a parked
thread, or on a new one, and returns a `Job` whose `join()` waits for it;
`Threads.run(job)` does the same for a Job made beforehand (so that it can
be registered somewhere before it can possibly end; `on_done(job)` is
called when it has).  A thread takes the job's name while it runs, so
stack dumps and logs name the session as before.
"""

import _thread
import threading

KEEP_SECONDS = 10.0         # how long a finished thread waits for another job
MAX_PARKED = 256            # threads kept waiting at most; more end
PARKED_NAME = "parked"      # a waiting thread's name (it had its last job's)


class Job:
    """One target to run; `join()` returns when it has returned."""

    __slots__ = ("target", "args", "name", "on_done", "finished")

    def __init__(self, target, args=(), name=None, on_done=None):
        self.target, self.args, self.name, self.on_done = target, args, name, on_done
        self.finished = _thread.allocate_lock()     # held until the job is done
        self.finished.acquire()

    def join(self, timeout=None):
        """True once the job is done (False if `timeout` seconds passed)."""
        if self.finished.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self.finished.release()             # others may join too
            return True
        return False

    def done(self):
        return not self.finished.locked()


class _Parked:
    """A thread waiting for a job: `wake` is released to hand it one."""

    __slots__ = ("wake", "job")

    def __init__(self):
        self.wake = _thread.allocate_lock()
        self.wake.acquire()
        self.job = None


class Threads:
    """Runs jobs on reused threads (see the module's docstring)."""

    def __init__(self, keep_seconds=KEEP_SECONDS, max_parked=MAX_PARKED):
        self.keep_seconds, self.max_parked = keep_seconds, max_parked
        self.lock = threading.Lock()        # guards `parked` and `closed`
        self.parked = []                    # most recently parked last: its stack is warm
        self.closed = False

    def start(self, target, args=(), name=None):
        return self.run(Job(target, args, name))

    def run(self, job):
        with self.lock:
            parked = self.parked.pop() if self.parked else None
        if parked is None:
            try:
                threading.Thread(target=self._run, args=(job,), name=job.name).start()
            except BaseException:           # no thread to be had: the job is over
                self._finish(job)
                raise
        else:
            parked.job = job
            parked.wake.release()
        return job

    def close(self):
        """Let every parked thread end now, and no thread park again."""
        with self.lock:
            self.closed = True
            parked, self.parked = self.parked, []
        for thread in parked:
            thread.wake.release()           # with no job: it ends

    def _run(self, job):
        while job is not None:
            threading.current_thread().name = job.name
            try:
                job.target(*job.args)
            finally:
                self._finish(job)
            job = self._park()

    @staticmethod
    def _finish(job):
        if job.on_done:
            job.on_done(job)
        job.finished.release()

    def _park(self):
        """Wait for the next job; None when the thread should end."""
        me = _Parked()
        with self.lock:
            if self.closed or len(self.parked) >= self.max_parked:
                return None
            self.parked.append(me)
        threading.current_thread().name = PARKED_NAME
        if not me.wake.acquire(timeout=self.keep_seconds):
            with self.lock:
                if me in self.parked:       # nobody took us meanwhile
                    self.parked.remove(me)
                    return None
            me.wake.acquire()               # a start() chose us just now: it releases
        return me.job
