"""The slow-drip suite of tests/test_drips.py, long: thousands of dripping sessions.

    python tests/bench/drips.py [--sessions 2000] [--workers 32] [--seed 0]
                                [--min-gap 0.05] [--max-gap 0.3]

    MAILPROXY_FUZZ_SCALE=N multiplies the default --sessions (2000 x N), as
    it scales the other fuzzers' long forms.

One proxy serves every session: each phase of test_drips.PHASES in turn
(shuffled), `--workers` at a time, the gap between two dripped bytes drawn
for each session (and each dripping backend or auth reply) from
[--min-gap, --max-gap] seconds.  Every session checks what its client
heard and its log lines (the end named, the summary's "closed by"); at
the end the script waits (bounded) for the proxy's session threads and
file descriptors to return to their baseline, and prints:

    sessions driven (per phase), how they ended (the summaries' reasons),
    unexpected ends, crashes, secrets in the log, leaked threads and fds.

The exit status is 0 only when all of those but the first two are zero.
Not collected by pytest (pytest.ini skips tests/bench).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]     # the checkout, tests/

import certs  # noqa: E402  (needs the path above)
import test_drips  # noqa: E402
import test_faults  # noqa: E402

SESSIONS = 2000


def main():
    scale = int(os.environ.get("MAILPROXY_FUZZ_SCALE", "1"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=SESSIONS * scale)
    parser.add_argument("--workers", type=int, default=32, help="sessions in flight at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-gap", type=float, default=0.05)
    parser.add_argument("--max-gap", type=float, default=0.3)
    parser.add_argument("--log-level", default="debug")
    options = parser.parse_args()
    test_faults._raise_fd_limit(8192)

    with tempfile.TemporaryDirectory(prefix="mailproxy-drips-") as directory:
        folder = Path(directory)
        (folder / "certs").mkdir()
        drips = test_drips.Drips(folder, certs.make_certs(folder / "certs"),
                                 gaps=(options.min_gap, options.max_gap),
                                 level=options.log_level)
        try:
            baseline = drips.warm()
            results = drips.drive(options.sessions, seed=options.seed,
                                  workers=options.workers)
            settle_started = time.monotonic()
            drips.settle(baseline, results)
            settled = time.monotonic() - settle_started
            log_size = os.path.getsize(drips.proxy.log_path)
        finally:
            drips.close()

    report(results, options, settled, log_size)
    failed = results.mismatches or results.crashes or results.secrets \
        or results.leaked_threads or results.leaked_fds
    return 1 if failed else 0


def report(results, options, settled, log_size):
    print(f"sessions driven     {results.sessions}  ({len(results.by_phase)} phases, "
          f"{options.workers} at a time, gaps {options.min_gap}-{options.max_gap}s)")
    print("ended               " + ", ".join(f"{count} closed by {reason}" for reason, count
                                            in results.by_end.most_common()))
    print(f"unexpected ends     {len(results.mismatches)}")
    print(f"crashes             {len(results.crashes)}")
    print(f"secrets in the log  {len(results.secrets)}")
    print(f"leaked threads      {results.leaked_threads}")
    print(f"leaked fds          {results.leaked_fds}")
    print(f"time                {results.seconds:.1f}s driving, {settled:.1f}s to settle, "
          f"log {log_size // 1024} KiB")
    for problem in results.mismatches[:20]:
        print("  unexpected:", problem)
    for line in (results.crashes + results.secrets)[:20]:
        print("  in the log:", line)


if __name__ == "__main__":
    sys.exit(main())
