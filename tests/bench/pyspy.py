"""py-spy against the running mailproxy: where the CPU of a login goes.

`start()` runs `py-spy record --format raw` (collapsed stacks) on
mailproxy's process tree for a few seconds while the bench drives login
cycles; `summarize()` turns the stacks into the top functions by self and
by inclusive samples.

Two py-spy options matter here, both measured on this machine:
* `--nonblocking`: py-spy reads the target's memory without stopping it.
  The default (ptrace-stopping every thread at every sample) cut the login
  rate by two thirds; non-blocking costs about a fifth.
* `--gil`: only the thread holding the GIL is sampled, so a sample is
  Python (or C under the GIL) actually running.  Without it, py-spy's idle
  detection did not work here: threads blocked in poll()/recv() were
  reported as busy and drowned everything else.
So the profile shows where the GIL-holding time goes; kernel time spent
with the GIL released (socket syscalls) is not in it.  One sample is
1/rate seconds of GIL time, so samples / rate / sessions is the time per
login a frame costs.
"""

import collections
import re
import shutil
import subprocess

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def available():
    return shutil.which("py-spy") is not None


RATE = 250               # samples per second per process
AUTH_REQUEST = "mailproxy/auth_http.py:AuthClient.ask"     # one auth_http request (requests)


def start(pid, seconds, output, rate=RATE):
    """Start py-spy in the background; returns the Popen."""
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--gil",
         "--rate", str(rate), "--duration", str(int(seconds)), "--format", "raw",
         "--output", str(output)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _short(frame):
    """`function (path/to/file.py:123)` -> `file.py:function`."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("/mailproxy/", "/lib/python3", "site-packages/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = path.split("/", 1)[1] if "/" in path else path
            if marker == "/mailproxy/":
                path = "mailproxy/" + path
            break
    return f"{path}:{match.group('func')}"


def summarize(raw_path, top=15):
    """{"samples": N, "self": [(frame, share)], "inclusive": [(frame, share)]}."""
    self_counts, inclusive = collections.Counter(), collections.Counter()
    total = 0
    with open(raw_path) as raw:
        for line in raw:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            count = int(count)
            frames = [_short(f) for f in stack.split(";")]
            # py-spy puts "process NNN:..." and "thread (0x...)" roots first.
            frames = [f for f in frames if not f.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += count
            self_counts[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    return {"samples": total, "rate": RATE, "auth_request": inclusive[AUTH_REQUEST],
            "self": self_counts.most_common(top),
            "inclusive": [(f, c) for f, c in inclusive.most_common(top + 20)
                          if not f.startswith("threading.py:Thread.")][:top]}
