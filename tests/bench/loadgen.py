"""The load generator: mail clients run in child processes.

Each function here runs in a process of its own (multiprocessing, fork) and
sends one result dict back through a pipe.  Every result carries the
process's own CPU time and wall time, so the bench can tell whether the
load generator, rather than the server, was the bottleneck.

* `login_cycles`: many clients at once in one process, driven by a
  selector (non-blocking sockets, no threads): connect, greeting, login,
  logout, close, and again, until a stop time.  Cycles under way at the
  stop time are finished and counted; none is started after it.
* `bulk`: one blocking client that logs in, then times one large
  transfer (IMAP FETCH, POP3 RETR, SMTP DATA), optionally over TLS, and
  reads the proxy's CPU just before and after.
* `idle`: opens and logs in many IMAP sessions, holds them, and on command
  checks that each still answers (NOOP) before closing them all.

Every loop here is bounded: by a stop time, a deadline, or a byte count.
"""

import base64
import selectors
import socket
import ssl
import time

import procstat

HOST = "127.0.0.1"
RECV = 65536
TAIL_TIMEOUT = 15.0         # seconds for cycles under way at the stop time
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0           # one blocking read or write in bulk
MAX_ERRORS = 2000           # a login loop that only fails gives up


# ------------------------------------------------------------ the scripts

def plain_token(user, password):
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


def login_script(protocol, user, password):
    """[(bytes to send or None, reply prefix that completes the step,
    reply prefixes that fail it)] for one login cycle."""
    u, p = user.encode(), password.encode()
    if protocol == "imap":
        return [(None, b"* OK", (b"* BYE",)),
                (b"a LOGIN " + u + b" " + p + b"\r\n", b"a OK", (b"a NO", b"a BAD")),
                (b"b LOGOUT\r\n", b"b OK", (b"b NO", b"b BAD"))]
    if protocol == "pop3":
        return [(None, b"+OK", (b"-ERR",)),
                (b"USER " + u + b"\r\n", b"+OK", (b"-ERR",)),
                (b"PASS " + p + b"\r\n", b"+OK", (b"-ERR",)),
                (b"QUIT\r\n", b"+OK", (b"-ERR",))]
    if protocol == "smtp":
        errors = tuple(str(code).encode() for code in range(400, 600))
        return [(None, b"220 ", errors),
                (b"EHLO bench.client\r\n", b"250 ", errors),
                # smtp-sink (direct) answers AUTH with 250, a proxy with 235.
                (b"AUTH PLAIN " + plain_token(user, password) + b"\r\n", (b"235 ", b"250 "),
                 errors),
                (b"QUIT\r\n", b"221 ", errors)]
    raise ValueError(protocol)


def idle_script(user, password):
    return login_script("imap", user, password)[:2]


# ----------------------------------------------------- selector machinery

class Client:
    """One connection walking through a script."""

    __slots__ = ("sock", "step", "buffer", "started", "done")

    def __init__(self, sock, started):
        self.sock, self.step, self.buffer, self.started = sock, 0, b"", started
        self.done = False


def _connect(selector, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.connect((HOST, port))
    except BlockingIOError:
        pass
    client = Client(sock, time.monotonic())
    selector.register(sock, selectors.EVENT_READ, client)
    return client


def _advance(client, script):
    """Read what arrived; returns "more", "done" or "failed".  Non-blocking
    sends of a short command always fit the empty socket buffer."""
    try:
        data = client.sock.recv(RECV)
    except BlockingIOError:
        return "more"
    except OSError:
        return "failed"
    if not data:
        return "failed"
    client.buffer += data
    while True:
        end = client.buffer.find(b"\n")
        if end < 0:
            return "more"
        line, client.buffer = client.buffer[:end + 1], client.buffer[end + 1:]
        _, ok, errors = script[client.step]
        if line.startswith(ok):
            client.step += 1
            client.buffer = b""
            if client.step == len(script):
                return "done"
            try:
                client.sock.send(script[client.step][0])
            except OSError:
                return "failed"
            return "more"
        if line.startswith(errors):
            return "failed"


def _close(selector, client):
    try:
        selector.unregister(client.sock)
    except (KeyError, ValueError):
        pass
    client.sock.close()


def _sleep_until(when):
    left = when - time.monotonic()
    if left > 0:
        time.sleep(left)


# ------------------------------------------------------------ login cycles

def login_cycles(pipe, port, protocol, user, password, clients, start_at, stop_at):
    """Run `clients` concurrent login cycles from start_at until stop_at."""
    script = login_script(protocol, user, password)
    selector = selectors.DefaultSelector()
    latencies, errors, error_samples = [], 0, []
    _sleep_until(start_at)
    cpu0, wall0 = procstat.self_cpu(), time.monotonic()
    active = {_connect(selector, port) for _ in range(clients)}
    last_done = wall0
    deadline = stop_at + TAIL_TIMEOUT
    while active and time.monotonic() < deadline and errors < MAX_ERRORS:
        for key, _ in selector.select(0.5):
            client = key.data
            state = _advance(client, script)
            if state == "more":
                continue
            now = time.monotonic()
            _close(selector, client)
            active.discard(client)
            if state == "done":
                latencies.append(now - client.started)
                last_done = now
            else:
                errors += 1
                if len(error_samples) < 3:
                    error_samples.append(f"step {client.step}: {client.buffer[:120]!r}")
            if now < stop_at:
                active.add(_connect(selector, port))
    unfinished = len(active)
    for client in list(active):
        _close(selector, client)
    pipe.send({"latencies": latencies, "errors": errors, "unfinished": unfinished,
               "error_samples": error_samples, "start": wall0, "last_done": last_done,
               "cpu": procstat.self_cpu() - cpu0, "wall": time.monotonic() - wall0})


# ------------------------------------------------------------------ bulk

class Line:
    """A blocking socket with a small line reader (for the dialogue)."""

    def __init__(self, sock):
        self.sock, self.buffer = sock, b""

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        while b"\n" not in self.buffer:
            data = self.sock.recv(RECV)
            if not data:
                raise ConnectionError(f"closed while waiting for a line ({self.buffer[:200]!r})")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def until(self, prefix, fail=()):
        """Lines until one starts with `prefix`; returns them all."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(prefix):
                return lines
            if fail and line.startswith(fail):
                raise ConnectionError(f"refused: {line!r}")


def _open(port, tls):
    sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock, server_hostname="localhost")
    return sock


def _recv_exact(sock, buffer, size):
    view, got = memoryview(buffer), 0
    while got < size:
        count = sock.recv_into(view[got:size])
        if not count:
            raise ConnectionError(f"closed after {got} of {size} bytes")
        got += count
    return got


def _imap_fetch(conn, sock, size, cpu):
    conn.send(b"a LOGIN %s %s\r\n" % (conn.user, conn.password))
    conn.until(b"a OK", (b"a NO", b"a BAD"))
    conn.send(b"s SELECT INBOX\r\n")
    conn.until(b"s OK", (b"s NO", b"s BAD"))
    conn.send(b"z FETCH 1:* RFC822.SIZE\r\n")
    number = None
    for line in conn.until(b"z OK", (b"z NO", b"z BAD")):
        if line.startswith(b"* ") and b"RFC822.SIZE %d)" % size in line:
            number = int(line.split()[1])
    if number is None:
        raise RuntimeError(f"no message of {size} bytes in INBOX")
    buffer = bytearray(size)
    before = cpu()
    started = time.monotonic()
    conn.send(b"f FETCH %d BODY.PEEK[]\r\n" % number)
    head = conn.line()
    literal = int(head[head.rindex(b"{") + 1:head.rindex(b"}")])
    already = conn.buffer[:literal]
    buffer[:len(already)] = already
    conn.buffer = conn.buffer[len(already):]
    got = len(already) + _recv_exact(sock, memoryview(buffer)[len(already):],
                                     literal - len(already))
    conn.until(b"f OK", (b"f NO", b"f BAD"))
    elapsed = time.monotonic() - started
    used = cpu() - before
    if got != size:
        raise RuntimeError(f"FETCH returned {got} bytes, expected {size}")
    conn.send(b"l LOGOUT\r\n")
    return got, elapsed, used


def _pop3_retr(conn, sock, size, cpu):
    conn.send(b"USER %s\r\n" % conn.user)
    conn.until(b"+OK", (b"-ERR",))
    conn.send(b"PASS %s\r\n" % conn.password)
    conn.until(b"+OK", (b"-ERR",))
    conn.send(b"LIST\r\n")
    number = None
    for line in conn.until(b".\r\n", (b"-ERR",)):
        fields = line.split()
        if len(fields) == 2 and fields[1] == b"%d" % size:
            number = int(fields[0])
    if number is None:
        raise RuntimeError(f"no message of {size} bytes in the POP3 drop")
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    before = cpu()
    started = time.monotonic()
    conn.send(b"RETR %d\r\n" % number)
    status = conn.line()
    if not status.startswith(b"+OK"):
        raise RuntimeError(f"RETR refused: {status!r}")
    got = len(conn.buffer)
    tail = conn.buffer[-5:]
    conn.buffer = b""
    limit = size + 1024 * 1024          # a bound, should the terminator never come
    while tail != b"\r\n.\r\n" and got < limit:
        count = sock.recv_into(view)
        if not count:
            raise ConnectionError("closed during RETR")
        got += count
        tail = (tail + bytes(view[max(0, count - 5):count]))[-5:]
    elapsed = time.monotonic() - started
    used = cpu() - before
    body = got - 3                      # the ".\r\n" line
    if body != size:
        raise RuntimeError(f"RETR returned {body} bytes, expected {size}")
    conn.send(b"QUIT\r\n")
    return body, elapsed, used


def _smtp_data(conn, sock, size, cpu, body):
    errors = tuple(str(code).encode() for code in range(400, 600))
    conn.until(b"220 ", errors)
    conn.send(b"EHLO bench.client\r\n")
    conn.until(b"250 ", errors)
    conn.send(b"AUTH PLAIN %s\r\n" % plain_token(conn.user.decode(), conn.password.decode()))
    conn.until((b"235 ", b"250 "), errors)
    conn.send(b"MAIL FROM:<bench@bench.test>\r\n")
    conn.until(b"250 ", errors)
    conn.send(b"RCPT TO:<sink@bench.test>\r\n")
    conn.until(b"250 ", errors)
    conn.send(b"DATA\r\n")
    conn.until(b"354 ", errors)
    before = cpu()
    started = time.monotonic()
    sock.sendall(body)
    sock.sendall(b".\r\n")
    conn.until(b"250 ", errors)
    elapsed = time.monotonic() - started
    used = cpu() - before
    conn.send(b"QUIT\r\n")
    return len(body), elapsed, used


def bulk(pipe, port, protocol, tls, size, user, password, proxy_pid, body=None):
    """One timed transfer; the proxy's CPU (its whole tree) is read just
    before and after the transfer."""
    if proxy_pid:
        pids = procstat.tree(proxy_pid)
        cpu = lambda: procstat.tree_cpu(proxy_pid, pids)    # noqa: E731
    else:
        cpu = lambda: 0.0                                   # noqa: E731
    cpu0, wall0 = procstat.self_cpu(), time.monotonic()
    result = {}
    try:
        sock = _open(port, tls)
        conn = Line(sock)
        conn.user, conn.password = user.encode(), password.encode()
        if protocol == "imap":
            conn.until(b"* OK")
            done = _imap_fetch(conn, sock, size, cpu)
        elif protocol == "pop3":
            conn.until(b"+OK")
            done = _pop3_retr(conn, sock, size, cpu)
        else:
            done = _smtp_data(conn, sock, size, cpu, body)
        result["bytes"], result["seconds"], result["proxy_cpu"] = done
        client_cpu = procstat.self_cpu() - cpu0
        result["client_cpu"] = client_cpu
        sock.close()
    except Exception as exc:            # reported, the bench carries on
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["wall"] = time.monotonic() - wall0
    pipe.send(result)


# ------------------------------------------------------------------ idle

def idle(pipe, port, count, window, user, password, login_timeout):
    """Open `count` IMAP sessions (at most `window` logging in at once),
    report, then on "check" NOOP each, on "close" close all."""
    script = idle_script(user, password)
    selector = selectors.DefaultSelector()
    cpu0 = procstat.self_cpu()
    started = time.monotonic()
    deadline = started + login_timeout
    ready, failed, pending, opened = [], 0, set(), 0
    samples = []
    while (opened < count or pending) and time.monotonic() < deadline:
        while opened < count and len(pending) < window:
            try:
                pending.add(_connect(selector, port))
            except OSError as exc:
                failed += 1
                if len(samples) < 3:
                    samples.append(f"connect: {exc}")
            opened += 1
        for key, _ in selector.select(0.5):
            client = key.data
            state = _advance(client, script)
            if state == "more":
                continue
            pending.discard(client)
            if state == "done":
                # Out of the selector until the check: whatever a held
                # session receives meanwhile is read then.
                selector.unregister(client.sock)
                ready.append(client)
            else:
                failed += 1
                if len(samples) < 3:
                    samples.append(f"step {client.step}: {client.buffer[:120]!r}")
                _close(selector, client)
    for client in pending:
        _close(selector, client)
    failed += len(pending) + (count - opened)
    pipe.send({"ready": len(ready), "failed": failed, "samples": samples,
               "seconds": time.monotonic() - started, "cpu": procstat.self_cpu() - cpu0})
    command = pipe.recv()
    alive = 0
    if command == "check":
        alive = _check_alive(selector, ready, login_timeout)
        pipe.send({"alive": alive})
        command = pipe.recv()
    for client in ready:
        _close(selector, client)
    pipe.send({"closed": len(ready)})


def _check_alive(selector, clients, timeout):
    """NOOP on every session; count the tagged OKs that come back."""
    waiting = {}
    for client in clients:
        client.buffer = b""
        try:
            selector.register(client.sock, selectors.EVENT_READ, client)
            client.sock.send(b"n NOOP\r\n")
            waiting[client.sock] = client
        except (OSError, ValueError, KeyError):
            pass
    alive = 0
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            client = key.data
            if client.sock not in waiting:
                continue
            try:
                data = client.sock.recv(RECV)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                del waiting[client.sock]
                continue
            client.buffer += data
            if b"\nn OK" in b"\n" + client.buffer:
                alive += 1
                del waiting[client.sock]
            elif b"\nn NO" in b"\n" + client.buffer or b"\nn BAD" in b"\n" + client.buffer:
                del waiting[client.sock]
    return alive

