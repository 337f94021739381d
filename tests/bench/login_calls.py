"""Python function calls per login inside the proxy (not a test).

    python tests/bench/login_calls.py imap [COUNT]      # default 200 logins
    python tests/bench/login_calls.py smtp 200 --top 15 # and by file

CPU time on a shared machine moves from run to run; the number of Python
function calls a login makes does not.  This runs mailproxy in-process
(tests/harness.py's RunningProxy, `error_log` at `error` as bench.py has
it) in front of a scripted backend that answers as Dovecot or smtp-sink
would and a scripted auth service, logs in COUNT times, one login at a
time, after a warm-up, with a profile function on every thread started
from then on, and prints the calls (C functions included) that the
session threads made per login (the handler thread once server.py has
named it, and the relay's copy thread), then by file.  The cycles are bench.py's:
IMAP LOGIN and LOGOUT, POP3 USER, PASS and QUIT, SMTP EHLO, AUTH PLAIN and
QUIT.
"""

import argparse
import collections
import pathlib
import socket
import sys
import tempfile
import threading

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

from fakes import ScriptedAuthService, ScriptedBackend  # noqa: E402  (after the path)
from harness import RunningProxy  # noqa: E402

WARM_UP = 20                # logins before the counted ones
BACKENDS = {
    "imap": [("send", b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n"),
             ("recv_line",), ("recv_line",), ("recv_line",),      # LOGIN, two literals
             ("send", b"a OK logged in\r\n"),
             ("expect", b"b LOGOUT\r\n"), ("send", b"* BYE\r\nb OK bye\r\n")],
    "pop3": [("send", b"+OK ready\r\n"), ("recv_line",), ("send", b"+OK\r\n"),
             ("recv_line",), ("send", b"+OK logged in\r\n"),
             ("expect", b"QUIT\r\n"), ("send", b"+OK bye\r\n")],
    "smtp": [("send", b"220 sink ESMTP\r\n"), ("recv_line",),      # EHLO
             ("send", b"250-sink\r\n250-PIPELINING\r\n250-XCLIENT NAME ADDR\r\n250 8BITMIME\r\n"),
             ("recv_line",), ("send", b"220 sink ESMTP\r\n"),     # XCLIENT
             ("recv_line",), ("send", b"250-sink\r\n250 8BITMIME\r\n"),   # the client's EHLO
             ("expect", b"QUIT\r\n"), ("send", b"221 bye\r\n")],
}
CLIENT = {
    "imap": [b"a LOGIN bench secret\r\n", b"b LOGOUT\r\n"],
    "pop3": [b"USER bench\r\n", b"PASS secret\r\n", b"QUIT\r\n"],
    "smtp": [b"EHLO client\r\n", b"AUTH PLAIN AGJlbmNoAHNlY3JldA==\r\n", b"QUIT\r\n"],
}
SESSION_THREADS = "session"     # server.py's and relay.py's names start so


def last_reply_line(reader, protocol):
    """The line that ends a reply: past SMTP's `250-` and IMAP's `* ` lines."""
    while True:
        line = reader.readline()
        if not line:
            raise ConnectionError("the proxy closed the connection")
        if not (protocol == "smtp" and line[3:4] == b"-" or
                protocol == "imap" and line.startswith(b"* ")):
            return line


def log_in(port, protocol):
    """One cycle: greeting, the client's lines, each answered, then the close."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        for line in CLIENT[protocol]:
            sock.sendall(line)
            last_reply_line(reader, protocol)
        reader.read()


class CallCounter:
    """A profile function counting calls, by file, in session threads."""

    def __init__(self):
        self.by_file = collections.Counter()

    def __call__(self, frame, event, arg):
        if event not in ("call", "c_call"):
            return
        if threading.current_thread().name.startswith(SESSION_THREADS):
            self.by_file[frame.f_code.co_filename if event == "call" else "(C functions)"] += 1


def short(path):
    for marker in ("site-packages/", "python3.11/", str(HERE.parent.parent) + "/"):
        path = path.split(marker)[-1]
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=sorted(BACKENDS))
    parser.add_argument("count", type=int, nargs="?", default=200)
    parser.add_argument("--top", type=int, default=0, help="files to list")
    args = parser.parse_args()
    backend = ScriptedBackend(BACKENDS[args.protocol])
    auth = ScriptedAuthService({"Auth-Status": "OK", "Auth-Server": "127.0.0.1",
                                "Auth-Port": str(backend.port)})
    proxy = RunningProxy(pathlib.Path(tempfile.mkdtemp(prefix="login-calls-")),
                         mail=f"auth_http {auth.url};", servers=(f"protocol {args.protocol};",),
                         level="error")
    port = proxy.ports[0]
    for _ in range(WARM_UP):
        log_in(port, args.protocol)
    counter = CallCounter()
    threading.setprofile(counter)       # the threads started from now on: each session's
    for _ in range(args.count):
        log_in(port, args.protocol)
    threading.setprofile(None)
    total = sum(counter.by_file.values())
    print(f"{args.protocol}: {total / args.count:.0f} Python function calls per login "
          f"in session threads ({args.count} logins)")
    by_file = collections.Counter()
    for path, calls in counter.by_file.items():
        by_file[short(path)] += calls
    for path, calls in by_file.most_common(args.top):
        print(f"  {calls / args.count:7.1f}  {path}")
    proxy.stop()
    auth.close()
    backend.close()


if __name__ == "__main__":
    main()
