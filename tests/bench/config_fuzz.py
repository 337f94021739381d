"""The long form of tests/test_config_fuzz.py: many more configurations,
with the outcomes counted.

    python tests/bench/config_fuzz.py [--examples 1000] [--real-every 20]

Each drawn file is loaded as `mailproxy -t` loads it and, if accepted,
served by a real worker that must pass one IMAP login (the check of
tests/test_config_fuzz.py).  Every `--real-every`-th file is also given to
the real command, `python mailproxy.py -t -c FILE`, whose exit status and
[emerg] line must agree with the in-process answer.  Prints the counts:
files tried, refused at a file:line, served a login, real -t runs, and
failures (any failure is printed with its file and ends the run, status 1).
Not collected by pytest (tests/bench has no test_ files).
"""

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]       # this checkout's mailproxy, then tests

from hypothesis import HealthCheck, given, settings  # noqa: E402

from fakes import IMAP_LOGIN_THEN_ECHO, ScriptedAuthService, ScriptedBackend, ok  # noqa: E402
from test_config_fuzz import check, configuration, write_config  # noqa: E402

SCRIPT = TESTS.parent / "mailproxy.py"


def real_test(drawn, auth_url):
    """`mailproxy -t -c FILE` on the file: (exit status, [emerg] text or None)."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_config(folder, drawn, auth_url, 1143)
        done = subprocess.run([sys.executable, str(SCRIPT), "-t", "-c", str(path)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    emerg = [line for line in done.stderr.splitlines() if "[emerg]" in line]
    return done.returncode, emerg[0] if emerg else None


def run(examples, real_every, auth_url):
    counts = collections.Counter()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(drawn=configuration())
    def one(drawn):
        outcome = check(drawn, auth_url)
        counts[outcome] += 1
        if real_every and counts["tried"] % real_every == 0:
            status, emerg = real_test(drawn, auth_url)
            assert status == (1 if outcome == "refused" else 0), (status, emerg, drawn)
            counts["real -t"] += 1
        counts["tried"] += 1

    one()
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--real-every", type=int, default=20)
    args = parser.parse_args()
    started = time.monotonic()
    with ScriptedBackend(IMAP_LOGIN_THEN_ECHO) as backend, ScriptedAuthService() as auth:
        auth.reply = ok(backend.host, backend.port)
        try:
            counts = run(args.examples, args.real_every, auth.url)
        except AssertionError as exc:
            print(f"FAILED: {exc}")
            return 1
    print(f"configs tried {counts['tried']}, refused at file:line {counts['refused']}, "
          f"served a login {counts['served']}, real -t runs {counts['real -t']} (agreeing), "
          f"failures 0, {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
