"""The fault campaign of tests/test_faults.py, long: thousands of sessions.

    python tests/bench/faults.py [--sessions 5000] [--workers 32] [--rounds 1]
                                 [--burst 100] [--seed 0]

One proxy serves every session (IMAP, POP3 and SMTP; faults from the auth
service, the backend and the clients in turn, see test_faults.py); each
round drives `--sessions` of them `--workers` at a time, then `--burst`
logins at once against the slow auth service.  At the end the script
waits (bounded) for the proxy's session threads and file descriptors to
return to their baseline, checks a good login still works, and prints:

    sessions driven, faults injected, unexpected replies, crashes (log
    lines with "unexpected error" or a traceback), leaked threads and fds.

The exit status is 0 only when unexpected replies, crashes and leaks are
all zero.  Not collected by pytest (pytest.ini skips tests/bench).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]     # the checkout, tests/

import test_faults  # noqa: E402  (needs the path above)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5000, help="sessions per round")
    parser.add_argument("--workers", type=int, default=32, help="sessions in flight at once")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--burst", type=int, default=100,
                        help="logins at once against the slow auth service, per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="info")
    options = parser.parse_args()
    test_faults._raise_fd_limit(8192)

    with tempfile.TemporaryDirectory(prefix="mailproxy-faults-") as directory:
        campaign = test_faults.Campaign(Path(directory), level=options.log_level)
        try:
            campaign.good_logins_work()
            baseline = test_faults.fds(campaign.auth.port)[0]
            results = test_faults.Results()
            for round_number in range(options.rounds):
                campaign.drive(options.sessions, seed=options.seed + round_number,
                               workers=options.workers, results=results)
                if options.burst:
                    campaign.burst(options.burst, results)
                print(f"round {round_number + 1}: {results.sessions} sessions so far, "
                      f"{len(results.mismatches)} unexpected", flush=True)
            settle_started = time.monotonic()
            campaign.settle(baseline, results)
            settled = time.monotonic() - settle_started
            campaign.good_logins_work()
            log_size = os.path.getsize(campaign.proxy.log_path)
        finally:
            campaign.close()

    report(results, options, settled, log_size)
    failed = results.mismatches or results.crashes or results.leaked_threads \
        or results.leaked_fds
    return 1 if failed else 0


def report(results, options, settled, log_size):
    kinds = len(results.by_scenario)
    print()
    print(f"sessions driven     {results.sessions}  ({kinds} kinds, "
          f"{options.workers} at a time, burst {options.burst})")
    print(f"faults injected     {results.faults}")
    print(f"unexpected replies  {len(results.mismatches)}")
    print(f"crashes             {len(results.crashes)}")
    print(f"leaked threads      {results.leaked_threads}")
    print(f"leaked fds          {results.leaked_fds}  "
          f"(pooled auth keep-alive sockets, not counted: {results.pooled_auth_sockets})")
    print(f"time                {results.seconds:.1f}s driving, {settled:.1f}s to settle, "
          f"log {log_size // 1024} KiB")
    for problem in results.mismatches[:20]:
        print("  unexpected:", problem)
    for line in results.crashes[:20]:
        print("  crash:", line)


if __name__ == "__main__":
    sys.exit(main())
