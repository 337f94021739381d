#!/usr/bin/env python3
"""Byte-exact relay at full size (issue 8, item 5): the long form of
tests/test_relay_exact.py.

N concurrent sessions through one in-process proxy (IMAP, plain or
`listen ... ssl`), each sending a seeded pseudo-random payload both ways
at once with a half-close in both orders (half the sessions each), and
SHA-256 compared on both ends.  Prints MB/s (aggregate, both directions
counted) and whether every session was byte-exact; exits 1 if not.

    python tests/bench/relay_exact.py --sessions 50 --size 200MB --tls
    python tests/bench/relay_exact.py --sessions 50 --size 20MB          # plaintext
    python tests/bench/relay_exact.py --size 20MB --tls --plain          # both, in turn
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]     # the checkout, tests/

import certs as certsmod  # noqa: E402  (needs the path above)
import test_relay_exact as exact  # noqa: E402
from fakes import ScriptedAuthService, ok  # noqa: E402
from harness import wait_until  # noqa: E402

UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2,
         "G": 1024 ** 3, "GB": 1024 ** 3}


def size(text):
    number = text.rstrip("KMGBkmgb")
    return int(float(number) * UNITS[text[len(number):].upper()])


def run(args, tls, directory, test_certs):
    orders = exact.ORDERS if args.order == "both" else (args.order,)
    plans = exact.plans(args.sessions, args.size, orders, run_seed=args.seed,
                        spread=not args.exact_size)
    exact.SESSIONS = max(exact.SESSIONS, args.sessions)     # worker_connections
    with ScriptedAuthService() as auth, \
            exact.HashingBackend({p.index: p for p in plans},
                                 io_timeout=args.timeout) as backend:
        auth.reply = ok(exact.LOOPBACK, backend.port)
        proxy, plain, tls_port = exact.start_proxy(directory, auth.url,
                                                   test_certs if tls else None, level="warn")
        try:
            started = time.monotonic()
            clients = exact.run_sessions(tls_port if tls else plain, plans, backend,
                                         certsmod.client_context(test_certs) if tls else None,
                                         timeout=args.timeout)
            seconds = time.monotonic() - started
            found = exact.problems(plans, clients, dict(backend.results), tls)
            threads_gone = wait_until(lambda: not proxy.session_threads(),
                                      timeout=exact.THREADS_GONE)
        finally:
            proxy.stop()
    total = sum(p.client_size + p.backend_size for p in plans)
    exact_count = args.sessions - len({line.split(" ")[1] for line in found})
    print(f"{'tls  ' if tls else 'plain'} {args.sessions} sessions x "
          f"{args.size / 2 ** 20:.0f} MiB each way ({'/'.join(orders)}): "
          f"{total / 2 ** 20:.0f} MiB in {seconds:.1f}s = {total / 2 ** 20 / seconds:.1f} MiB/s "
          f"aggregate; byte-exact {exact_count}/{args.sessions}; "
          f"session threads back to 0: {bool(threads_gone)}", flush=True)
    for line in found[:args.show]:
        print("   ", line)
    return not found and threads_gone


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=size, default=size("200MB"),
                        help="bytes each way per session, e.g. 200MB (default)")
    parser.add_argument("--exact-size", action="store_true",
                        help="every payload exactly --size (default: up to 1.5x, varied)")
    parser.add_argument("--tls", action="store_true", help="implicit TLS to the proxy")
    parser.add_argument("--plain", action="store_true",
                        help="plaintext too (the default when --tls is not given)")
    parser.add_argument("--order", choices=("both",) + exact.ORDERS, default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds a session may take (a bound)")
    parser.add_argument("--show", type=int, default=10, help="problems printed per run")
    args = parser.parse_args()
    modes = ([False] if args.plain or not args.tls else []) + ([True] if args.tls else [])
    good = True
    with tempfile.TemporaryDirectory(prefix="relay-exact-") as directory:
        test_certs = certsmod.make_certs(Path(directory)) if args.tls else None
        for number, tls in enumerate(modes):
            run_dir = Path(directory) / f"run{number}"
            run_dir.mkdir()
            good = run(args, tls, run_dir, test_certs) and good
    print("ALL EXACT" if good else "FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
