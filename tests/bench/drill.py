"""The operations fault drill: a real master under load, and what an operator does to it.

    python tests/bench/drill.py [--phase 8] [--loops 8] [--idle 40] [--nofile 160]

`python mailproxy.py -c CONF` runs with `worker_processes 2`, a low
`worker_rlimit_nofile`, `error_log ... info` and a status page, in front of
the scripted IMAP backend of tests/fakes.py (LOGIN, then an echo) and the
scripted auth service.  Through the whole drill `--loops` client threads log
in over and over (greeting, LOGIN, PAYLOAD bytes that must come back
byte for byte, close), and batches of `--idle` long-lived sessions stay
logged in (as IMAP IDLE clients do) and answer a ping every few seconds.
Meanwhile the drill runs its phases, each `--phase` seconds long:

    warm-up, reload, reload with a typo (must fail), reload to an error_log
    that cannot be opened (must fail), log rotation (mv + SIGUSR1), kill -9
    of a worker, out of descriptors (hundreds of idle connections against
    worker_rlimit_nofile), reload, log rotation, cool-down

Each failed login and each cut idle session is counted under the phase it
happened in.  At the end every client closes, and the drill prints: logins
and failures per phase, relay bytes lost (sent by a client that got its
login but not echoed back), the status page's counters beside the clients'
own counts, the log's lines for each fault, and leaks: descriptors of the
master (start vs end), connections still established to the proxy or the
backend, and old workers still alive.  Not collected by pytest.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(HERE.parent)]     # the checkout, tests/

from fakes import IMAP_LOGIN_THEN_ECHO, ScriptedAuthService, ScriptedBackend, ok  # noqa: E402
from harness import free_port  # noqa: E402
from test_faults import _raise_fd_limit  # noqa: E402
from test_status import CONFIG  # noqa: E402  (worker_processes, status_listen, info log)

HOST = "127.0.0.1"
PAYLOAD = 2048              # bytes each login sends through the relay and reads back
IO_TIMEOUT = 15.0           # one client read; a stalled session counts as failed
PING_EVERY = 3.0            # seconds between an idle session's pings
SQUEEZE = 400               # connections opened at once in the out-of-descriptors phase
SETTLE = 60.0               # seconds for every session and old worker to be gone at the end


class Tally:
    """The clients' counts, by phase; one lock for every client thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.phase = "start"
        self.connects = 0           # TCP connections the clients made
        self.ok_logins = 0          # logins answered OK (before the relay check)
        self.logins = Counter()     # phase -> logins that relayed PAYLOAD back exactly
        self.failed = Counter()     # (phase, why) -> count
        self.sent = 0               # relay bytes sent after an OK login
        self.echoed = 0             # of those, bytes that came back

    def add(self, **counts):
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def fail(self, why):
        with self.lock:
            self.failed[(self.phase, why)] += 1


def read_exact(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def log_in(port, tally):
    """One connection that logs in; the socket, or None (counted as failed)."""
    try:
        sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    except OSError as exc:
        tally.fail(f"connect: {exc.strerror or exc}")
        return None
    tally.add(connects=1)
    try:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        if not greeting.startswith(b"* OK"):
            raise ConnectionError(f"greeting {greeting[:40]!r}")
        sock.sendall(b"a LOGIN joe secret\r\n")
        reply = reader.readline()
        if reply != b"a OK logged in\r\n":
            raise ConnectionError(f"login {reply[:40]!r}")
        tally.add(ok_logins=1)
        return sock
    except OSError as exc:
        tally.fail(str(exc) if isinstance(exc, ConnectionError) and exc.args
                   else type(exc).__name__)
        sock.close()
        return None


def echo(sock, size, tally):
    """Send `size` bytes through the relay; True if they all came back."""
    payload = os.urandom(size)
    tally.add(sent=size)
    try:
        sock.sendall(payload)
        back = read_exact(sock, size)
    except OSError as exc:
        tally.fail(f"relay: {type(exc).__name__}")
        return False
    tally.add(echoed=sum(1 for a, b in zip(back, payload) if a == b))
    if back != payload:
        tally.fail("relay: short or wrong echo")
        return False
    return True


def login_loop(port, tally, stop):
    while not stop.is_set():
        sock = log_in(port, tally)
        if sock is None:
            time.sleep(0.05)
            continue
        with sock:
            if echo(sock, PAYLOAD, tally):
                with tally.lock:
                    tally.logins[tally.phase] += 1


class IdleSessions:
    """Logged-in sessions that stay, pinged every PING_EVERY by one thread."""

    def __init__(self, port, tally):
        self.port, self.tally = port, tally
        self.sessions = []
        self.lock = threading.Lock()
        self.cut = Counter()        # phase -> idle sessions found cut

    def open(self, count):
        for _ in range(count):
            sock = log_in(self.port, self.tally)
            if sock is not None:
                with self.lock:
                    self.sessions.append(sock)

    def ping(self, stop):
        while not stop.wait(PING_EVERY):
            with self.lock:
                sessions = list(self.sessions)
            for sock in sessions:
                if not self.alive(sock, b"n NOOP\r\n"):
                    with self.tally.lock:
                        self.cut[self.tally.phase] += 1
                    with self.lock:
                        self.sessions.remove(sock)
                    sock.close()

    def alive(self, sock, line):
        self.tally.add(sent=len(line))
        try:
            sock.sendall(line)
            back = read_exact(sock, len(line))
        except OSError:
            return False
        self.tally.add(echoed=len(back) if back == line else 0)
        return back == line

    def close(self):
        """A last echo through each, then close; the number that answered."""
        answered = sum(echo(sock, PAYLOAD, self.tally) for sock in self.sessions)
        for sock in self.sessions:
            sock.close()
        return answered, len(self.sessions)


class Proxy:
    """The master under test, its configuration and its files."""

    def __init__(self, folder, auth_url, nofile):
        self.folder, self.auth, self.nofile = folder, auth_url, nofile
        self.port, self.status = free_port(), free_port()
        self.log = folder / "error.log"
        self.conf = folder / "mail.conf"
        self.write()
        self.process = subprocess.Popen([sys.executable, "mailproxy.py", "-c", str(self.conf)],
                                        cwd=ROOT, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while len(self.children()) < 3 or not self.page():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the proxy did not start:\n{self.log_text()}")
            time.sleep(0.1)

    def write(self, caps="IMAP4rev1", log=None, typo=False):
        text = CONFIG.format(workers=2, nofile=self.nofile, log=log or self.log,
                             pid=self.folder / "pid", status=self.status, auth=self.auth,
                             port=self.port, caps=caps)
        self.conf.write_text(text.replace("protocol imap;", "protocol imap") if typo else text)

    def signal(self, signo):
        os.kill(self.process.pid, signo)

    def children(self):
        try:
            with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as file:
                return [int(pid) for pid in file.read().split()]
        except OSError:
            return []

    def page(self):
        """{(name, labels): value} of /metrics, or None."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.status}/metrics",
                                        timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def workers(self, state=None):
        page = self.page() or {}
        return [int(re.search(r'pid="(\d+)"', name).group(1)) for name in page
                if name.startswith("mailproxy_worker_info")
                and (state is None or f'state="{state}"' in name)]

    def log_text(self):
        return "".join(path.read_text() for path in sorted(self.folder.glob("error.log*")))

    def stop(self):
        if self.process.poll() is None:
            self.signal(signal.SIGQUIT)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def established(port):
    """TCP connections established to or from `port` (either end), per /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as file:
            next(file)
            for line in file:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                ports = {int(local.split(":")[1], 16), int(remote.split(":")[1], 16)}
                count += state == "01" and port in ports
    return count


# ------------------------------------------------------------------ the phases

def rotate(proxy, number):
    """mv error.log error.log.N; SIGUSR1; did the workers write the new file?"""
    os.rename(proxy.log, proxy.folder / f"error.log.{number}")
    proxy.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proxy.log.exists() and "client logged in" in proxy.log.read_text():
            return "the workers write the new file"
        time.sleep(0.2)
    return "NO session line in the new file"


def kill_a_worker(proxy):
    victim = proxy.workers("serving")[0]
    os.kill(victim, signal.SIGKILL)
    return f"killed worker {victim}"


def squeeze(proxy, phase_seconds, tally):
    """Idle connections beyond worker_rlimit_nofile, held for the phase
    (each one a session the status page counts once a worker accepts it)."""
    held = []
    for _ in range(SQUEEZE):
        try:
            held.append(socket.create_connection((HOST, proxy.port), timeout=2))
        except OSError:
            break
    tally.add(connects=len(held))
    time.sleep(phase_seconds)
    for sock in held:
        sock.close()
    return f"{len(held)} idle connections held"


def run(options):
    _raise_fd_limit(8192)
    folder = Path(tempfile.mkdtemp(prefix="mailproxy-drill-"))
    backend = ScriptedBackend(IMAP_LOGIN_THEN_ECHO, io_timeout=120)
    auth = ScriptedAuthService(ok(HOST, backend.port))
    proxy = Proxy(folder, auth.url[len("http://"):], options.nofile)
    tally, stop = Tally(), threading.Event()
    idle = IdleSessions(proxy.port, tally)
    master_fds = fds(proxy.process.pid)
    threads = [threading.Thread(target=login_loop, args=(proxy.port, tally, stop), daemon=True)
               for _ in range(options.loops)]
    threads.append(threading.Thread(target=idle.ping, args=(stop,), daemon=True))
    for thread in threads:
        thread.start()
    rotations = []

    def reload(**changes):
        proxy.write(**changes)
        proxy.signal(signal.SIGHUP)
        return "SIGHUP"

    phases = [
        ("warm-up", lambda: idle.open(options.idle)),
        ("reload", lambda: (reload(caps="IMAP4rev1 SECOND"), idle.open(options.idle))[0]),
        ("reload with a typo", lambda: reload(typo=True)),
        ("reload to an unopenable error_log",
         lambda: reload(log=folder / "missing" / "error.log")),
        ("log rotation", lambda: rotations.append(rotate(proxy, 1)) or rotations[-1]),
        ("kill -9 of a worker", lambda: kill_a_worker(proxy)),
        ("out of descriptors", lambda: squeeze(proxy, options.phase, tally)),
        ("reload again", lambda: reload(caps="IMAP4rev1 THIRD")),
        ("log rotation again", lambda: rotations.append(rotate(proxy, 2)) or rotations[-1]),
        ("cool-down", lambda: "")]
    started = time.monotonic()
    notes = []
    for name, action in phases:
        with tally.lock:
            tally.phase = name
        begun = time.monotonic()
        notes.append((name, action() or ""))
        time.sleep(max(0.0, options.phase - (time.monotonic() - begun)))
    stop.set()
    for thread in threads:
        thread.join(IO_TIMEOUT + PING_EVERY)
    idle_answered, idle_left = idle.close()
    driven = time.monotonic() - started
    settle_deadline = time.monotonic() + SETTLE
    while time.monotonic() < settle_deadline:
        page = proxy.page()
        if page and len(proxy.workers()) == 2 and not established(proxy.port) and \
                sum(v for k, v in page.items() if k.startswith("mailproxy_sessions_open")) == 0:
            break
        time.sleep(0.5)
    page = proxy.page() or {}
    summary = {
        "master fds": (master_fds, fds(proxy.process.pid)),
        "established to the proxy": established(proxy.port),
        "established to the backend": established(backend.port),
        "workers listed": len(proxy.workers()),
        "children": len(proxy.children()),
    }
    log = proxy.log_text()
    status = proxy.stop()
    auth.close()
    backend.close()
    report(options, tally, idle, (idle_answered, idle_left), notes, page, summary, log,
           driven, status)


def report(options, tally, idle, idle_end, notes, page, summary, log, driven, status):
    def metric(name):
        return int(sum(v for k, v in page.items() if k.startswith(name)))
    logins = sum(tally.logins.values())
    failed = sum(tally.failed.values())
    print(f"drill: {driven:.0f} s, {len(notes)} phases of {options.phase} s, "
          f"{options.loops} login loops, {options.idle} idle sessions per batch, "
          f"worker_rlimit_nofile {options.nofile}")
    print(f"{'phase':36} {'logins':>7} {'failed':>7} {'idle cut':>8}  note")
    for name, note in notes:
        lost = sum(n for (phase, _), n in tally.failed.items() if phase == name)
        print(f"{name:36} {tally.logins[name]:7} {lost:7} {idle.cut[name]:8}  {note}")
    print(f"{'total':36} {logins:7} {failed:7} {sum(idle.cut.values()):8}")
    for (phase, why), count in sorted(tally.failed.items()):
        print(f"  failed in {phase}: {count} x {why}")
    print(f"idle sessions at the end: {idle_end[0]} of {idle_end[1]} still relayed exactly")
    print(f"relay bytes: {tally.sent} sent after an OK login, {tally.echoed} echoed, "
          f"{tally.sent - tally.echoed} lost")
    auth_ok = metric('mailproxy_auth_results_total{protocol="imap",result="ok"}')
    from_client = metric('mailproxy_relayed_bytes_total{protocol="imap",direction="from_client"}')
    print(f"status page: sessions_total {metric('mailproxy_sessions_total')} (clients "
          f"connected {tally.connects}), auth ok {auth_ok} (clients logged in "
          f"{tally.ok_logins}), relayed from_client {from_client} (clients sent "
          f"{tally.sent}), sessions open {metric('mailproxy_sessions_open')}")
    for needle in ("reload failed", "[crit]", "[alert]", "exited with code -9",
                   "reopening logs", "Traceback", "unexpected error"):
        print(f"log lines with {needle!r}: {log.count(needle)}")
    numbers = [int(n) for n in re.findall(r" \*(\d+) client \S+ connected to ", log)]
    print(f"connection numbers: {len(numbers)} sessions, {len(set(numbers))} distinct")
    for name, value in summary.items():
        print(f"{name}: {value}")
    print(f"master exit status: {status}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", type=float, default=8.0, help="seconds per phase")
    parser.add_argument("--loops", type=int, default=8, help="client threads logging in")
    parser.add_argument("--idle", type=int, default=40, help="idle sessions per batch")
    parser.add_argument("--nofile", type=int, default=160, help="worker_rlimit_nofile")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
