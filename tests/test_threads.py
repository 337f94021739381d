"""threads.py: session threads kept for reuse.  Real threads throughout."""

import threading

import pytest

from harness import wait_until
from mailproxy.threads import PARKED_NAME, Job, Threads


def running_threads():
    return {thread.ident: thread.name for thread in threading.enumerate()}


def test_a_finished_thread_runs_the_next_job_under_its_name():
    pool = Threads(keep_seconds=5)
    seen = []

    def note():
        seen.append((threading.get_ident(), threading.current_thread().name))
    try:
        assert pool.start(note, name="session one").join(5)
        assert wait_until(lambda: len(pool.parked) == 1)
        assert running_threads()[seen[0][0]] == PARKED_NAME
        assert pool.start(note, name="session two").join(5)
        assert seen[0][1] == "session one" and seen[1] == (seen[0][0], "session two")
    finally:
        pool.close()


def test_on_done_runs_before_join_returns_and_gets_the_job():
    pool = Threads()
    done = []
    try:
        job = Job(lambda: None, name="x", on_done=done.append)
        pool.run(job)
        assert job.join(5) and done == [job] and job.done()
    finally:
        pool.close()


def test_a_parked_thread_ends_after_keep_seconds():
    pool = Threads(keep_seconds=0.1)
    ident = []
    pool.start(lambda: ident.append(threading.get_ident())).join(5)
    assert wait_until(lambda: ident[0] not in running_threads(), timeout=5)
    assert pool.parked == []


def test_no_more_than_max_parked_threads_wait():
    pool = Threads(keep_seconds=30, max_parked=2)
    release = threading.Event()
    try:
        jobs = [pool.start(release.wait, (5,), name=f"job {i}") for i in range(5)]
        release.set()
        assert all(job.join(5) for job in jobs)
        assert wait_until(lambda: len(pool.parked) == 2)
        assert wait_until(lambda: sum(name == PARKED_NAME
                                      for name in running_threads().values()) == 2)
    finally:
        pool.close()


def test_close_ends_every_parked_thread_and_parks_no_more():
    pool = Threads(keep_seconds=30)
    before = threading.active_count()
    jobs = [pool.start(lambda: None) for _ in range(4)]
    assert all(job.join(5) for job in jobs)
    pool.close()
    assert wait_until(lambda: threading.active_count() <= before, timeout=5)
    assert pool.start(lambda: None).join(5)
    assert wait_until(lambda: threading.active_count() <= before, timeout=5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_job_that_raises_is_still_finished_and_its_thread_ends():
    """The exception goes to threading.excepthook, as a plain thread's
    does; the thread is not kept."""
    pool = Threads()
    ident = []

    def fail():
        ident.append(threading.get_ident())
        raise ValueError("boom")
    done = []
    try:
        job = Job(fail, on_done=done.append)
        pool.run(job)
        assert job.join(5) and done == [job]
        assert wait_until(lambda: ident[0] not in running_threads())
        assert pool.parked == []
    finally:
        pool.close()


def test_join_with_a_timeout_on_a_running_job():
    pool = Threads()
    release = threading.Event()
    try:
        job = pool.start(release.wait, (5,))
        assert not job.join(0.05) and not job.done()
        release.set()
        assert job.join(5) and job.join(0)      # joining twice is fine
    finally:
        pool.close()
