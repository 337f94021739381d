"""The slow-drip suite: every phase of a session, fed a byte at a time.

A peer that sends one byte now and then, each well inside any per-read
timeout, must not hold a session longer than the deadline of the phase it
is in (SECURITY.md, "Deadlines, phase by phase"):

    phase                               who drips       ends at            client hears
    a pre-login command (IMAP/POP3/SMTP) client          timeout            nothing, then the close
    a TLS ClientHello, a TLS record     client          timeout            nothing, then the close
    the STARTTLS handshake              client          timeout            nothing, then the close
    a SASL answer (IMAP/POP3/SMTP)      client          timeout            nothing, then the close
    the PROXY protocol header           balancer        timeout            nothing, then the close
    the auth service's reply            auth service    auth_http_timeout  the internal-error line
    the backend's greeting, and its     backend         timeout            the internal-error line
      login replies (IMAP/POP3/SMTP)
    Auth-Wait                           client          the wait, then a   the refusal, then
                                                        fresh timeout        the close
    the relay                           client, backend never, while bytes move; an idle one at
                                                        proxy_timeout

and a client that stops reading while the proxy writes it a long refusal
(`proxy_pass_error_message`): the write is cut at a fresh `timeout`, as
nginx's ngx_mail_send() arms its timer.

Every phase is one session against one proxy (`trace on`, `debug`); all of
them run at once, so the suite costs about the longest of them.  Each
session checks what its client heard; afterwards its lines in the error
log must hold the line that names the end ("client timed out", "upstream
timed out", ...) and the summary `session done: client 127.0.0.1:PORT, ...
closed by <reason>`.  No assertion is on time: a drip that were not cut
would show as a different end, or no end within the harness's bounds.
Then no session thread and no descriptor may be left, no password and no
start of a SASL answer may be in the log, and nothing may have crashed.

`tests/bench/drips.py` runs the same phases thousands of times, with a
random gap between two bytes.
"""

import base64
import random
import re
import select
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from OpenSSL import SSL

import fakes
from fakes import ScriptedAuthService, ScriptedBackend, Trickle
from harness import RunningProxy, free_port, wait_until
from mailproxy import imap
from test_faults import (BACKEND_LOGIN, CLIENTS, CRASH_MARKS, INTERNAL, SUCCESS, Conn,
                         Unexpected, fds, session_threads)
from test_tls_channel import BioClient

pytest_plugins = ("certs",)

LOOPBACK = "127.0.0.1"
TIMEOUT = 1                 # `timeout`, `auth_http_timeout`, `proxy_timeout`, seconds
GAP = 0.1                   # seconds between two dripped bytes (CI)
RELAY_GAP = 0.25            # between two relayed bytes: far inside proxy_timeout
RELAY_SPAN = 2.5 * TIMEOUT  # a relay drip lasts this long: well past proxy_timeout
RELAY_BYTES = 10            # the backend's relay drip: RELAY_BYTES, RELAY_GAP apart
CLIENT_TIMEOUT = 10         # the longest a client waits for the proxy to act
SETTLE_TIMEOUT = 15
PADDING = b" " + b"." * 60  # makes a dripped line last past any deadline here
HUGE = 1024 * 1024          # proxy_buffer of the server whose backend refuses at length,
SMALL_WINDOW = 4096         # many times what its client (SO_RCVBUF SMALL_WINDOW) and the
SMALL_SEND = 32768          # proxy (listen sndbuf=SMALL_SEND) hold when the client stops reading
SECRET = b"drip-pw-"        # every password starts so; none may reach the log
SASL_START = base64.b64encode(b"\0joe\0dri")    # how every SASL answer here starts

MAIL = f"""
server_name mx.test;
timeout {TIMEOUT}s;
auth_http_timeout {TIMEOUT}s;
proxy_timeout {TIMEOUT}s;
imap_auth plain login;
pop3_auth plain;
smtp_auth plain login;
starttls on;
trace on;
"""
SERVERS = ("imap", "pop3", "smtp", "imap-tls", "imap-proxy-protocol", "imap-long-refusal")


def password(serial):
    return SECRET + b"%06d-" % serial + b"s" * 40


def sasl_plain(serial):
    return base64.b64encode(b"\0joe\0" + password(serial))


# ------------------------------------------------------------ the backends

def padded(line):
    """`line` (CRLF-ended) made long enough to outlast any deadline here."""
    return line[:-2] + PADDING + b"\r\n"


def dripped(data, gap):
    steps = []
    for byte in data:
        steps += [("sleep", gap), ("send", bytes((byte,)))]
    return steps


def backend_scripts(gap):
    """name -> script(index): the good backends, those that drip a line of
    their login, and the relay's dripping and long-refusing ones."""
    scripts = {}
    for protocol, login in BACKEND_LOGIN.items():
        sends = [i for i, step in enumerate(login) if step[0] == "send"]
        scripts[f"good-{protocol}"] = lambda g, login=login: login + [("echo",)]
        for name, at in (("greeting", sends[0]), ("reply", sends[1])):
            scripts[f"{name}-{protocol}"] = \
                lambda g, login=login, at=at: login[:at] + dripped(padded(login[at][1]), g)
    imap_login = BACKEND_LOGIN["imap"]
    scripts["relay-drip"] = lambda g: imap_login + [("sleep", RELAY_GAP), ("send", b".")] \
        * RELAY_BYTES + [("close",)]
    scripts["long-refusal"] = lambda g: imap_login[:-1] + [
        ("send", b"a NO " + b"x" * (HUGE - 64) + b"\r\n")]
    return {name: (lambda index, make=make: make(gap(index))) for name, make in scripts.items()}


# --------------------------------------------------------- client helpers

def address(sock):
    return "%s:%d" % sock.getsockname()[:2]


def hear(sock, seconds, heard, until=None):
    """Read what the proxy sends for `seconds` (or until `heard` holds
    `until` bytes) into `heard`; True once it has closed (EOF or reset)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 and (until is None or len(heard) < until):
        if not select.select([sock], [], [], left)[0]:
            return False
        try:
            data = sock.recv(65536)
        except ConnectionError:
            return True
        if not data:
            return True
        heard += data
    return False


def drip(sock, data, gap):
    """Send `data` a byte at a time, `gap` seconds apart, listening all the
    while; (what the proxy said, whether it closed)."""
    heard = bytearray()
    for byte in data:
        if hear(sock, gap, heard):
            return bytes(heard), True
        try:
            sock.sendall(bytes((byte,)))
        except OSError:
            return bytes(heard), hear(sock, CLIENT_TIMEOUT, heard)
    return bytes(heard), False


def raw_line(sock):
    """One line from a socket without a buffered reader (TLS follows)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def decrypted(client, records):
    """The application bytes in the TLS `records` a BioClient received."""
    if records:
        client.tls.bio_write(records)
    try:
        return client.tls.recv(65536)
    except (SSL.WantReadError, SSL.ZeroReturnError):
        return b""


def expect(condition, problem):
    if not condition:
        raise Unexpected(problem)


def closed_silently(heard, closed):
    """The end of a pre-login drip: nothing said, the connection closed
    (nginx closes a timed-out client without a reply)."""
    expect(closed, f"still open after the whole drip (heard {heard[:80]!r})")
    expect(heard == b"", f"expected nothing before the close, got {heard[:80]!r}")


def small_window_conn(port):
    """A Conn whose receive buffer is SMALL_WINDOW bytes: a client that
    stops reading blocks the proxy's writes soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_WINDOW)
    sock.settimeout(CLIENT_TIMEOUT)
    sock.connect((LOOPBACK, port))
    conn = Conn.__new__(Conn)
    conn.sock, conn.reader = sock, sock.makefile("rb")
    return conn


# -------------------------------------------------------------- the phases

@dataclass(frozen=True)
class Phase:
    """One dripping session: `run(drips, serial, gap)` plays it, checks
    what its client heard and returns the client's address; its log must
    then say `line` and end `closed by <reason>`, and never say `never`."""
    name: str
    run: object
    reason: str
    line: str
    never: str = None


class Runs:
    """The sessions of the phases, one method each (the client's side)."""

    def prelogin_imap(self, serial, gap):
        conn = self.greeted("imap")
        closed_silently(*drip(conn.sock, b"a LOGIN joe " + password(serial) + b"\r\n", gap))
        return self.done(conn)

    def prelogin_pop3(self, serial, gap):
        conn = self.greeted("pop3")
        conn.send(b"USER joe\r\n")
        conn.expect(b"+OK\r\n")
        closed_silently(*drip(conn.sock, b"PASS " + password(serial) + b"\r\n", gap))
        return self.done(conn)

    def prelogin_smtp(self, serial, gap):
        conn = self.greeted("smtp")
        closed_silently(*drip(conn.sock, b"AUTH PLAIN " + sasl_plain(serial) + b"\r\n", gap))
        return self.done(conn)

    def sasl(self, protocol, command, continuation, serial, gap):
        conn = self.greeted(protocol)
        conn.send(command)
        conn.expect(continuation, prefix=True)
        closed_silently(*drip(conn.sock, sasl_plain(serial) + b"\r\n", gap))
        return self.done(conn)

    def sasl_imap(self, serial, gap):
        return self.sasl("imap", b"a AUTHENTICATE PLAIN\r\n", b"+ ", serial, gap)

    def sasl_pop3(self, serial, gap):
        return self.sasl("pop3", b"AUTH PLAIN\r\n", b"+ ", serial, gap)

    def sasl_smtp(self, serial, gap):
        return self.sasl("smtp", b"AUTH PLAIN\r\n", b"334 ", serial, gap)

    def tls_client_hello(self, serial, gap):
        client = BioClient(self.tls_port, self.certs)
        try:
            closed_silently(*drip(client.sock, client.client_hello(), gap))
            return address(client.sock)
        finally:
            client.close()

    def tls_record(self, serial, gap):
        client = BioClient(self.tls_port, self.certs)
        try:
            client.handshake()
            expect(client.line() == imap.GREETING, "no greeting over TLS")
            client.tls.sendall(b"a LOGIN joe " + password(serial) + b"\r\n")
            heard, closed = drip(client.sock, client.take(), gap)
            expect(decrypted(client, heard) == b"", "a reply to a command never completed")
            closed_silently(b"", closed)
            return address(client.sock)
        finally:
            client.close()

    def starttls_handshake(self, serial, gap):
        client = BioClient(self.port["imap"], self.certs)
        try:
            expect(raw_line(client.sock) == imap.GREETING, "no greeting")
            client.sock.sendall(b"a STARTTLS\r\n")
            expect(raw_line(client.sock).startswith(b"a OK "), "STARTTLS refused")
            closed_silently(*drip(client.sock, client.client_hello(), gap))
            return address(client.sock)
        finally:
            client.close()

    def proxy_header(self, serial, gap):
        with socket.create_connection((LOOPBACK, self.proxy_port),
                                      timeout=CLIENT_TIMEOUT) as sock:
            closed_silently(*drip(sock, b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 143\r\n",
                                  gap))
            return address(sock)

    def logged_in(self, protocol, user, serial, port=None):
        conn = self.greeted(protocol, port)
        CLIENTS[protocol].login(conn, user.encode(), password(serial))
        return conn

    def internal_error(self, protocol, user, serial):
        conn = self.logged_in(protocol, user, serial)
        conn.expect(INTERNAL[protocol])
        conn.expect_eof()
        return self.done(conn)

    def auth_trickle(self, serial, gap):
        return self.internal_error("imap", f"auth-trickle.{serial}", serial)

    def backend(self, name, protocol):
        return lambda serial, gap: self.internal_error(protocol, f"b-{name}-{protocol}.{serial}",
                                                       serial)

    def auth_wait(self, serial, gap):
        conn = self.logged_in("imap", f"wait.{serial}", serial)
        heard, closed = drip(conn.sock, b"a NOOP" + PADDING * 4, gap)
        expect(closed, "still open after the whole drip")
        expect(heard == CLIENTS["imap"].refusal(b"Later"), f"expected the refusal, got {heard!r}")
        return self.done(conn)

    def relay_client(self, serial, gap):
        gap = min(2.5 * gap, 2 * RELAY_GAP)
        conn = self.logged_in("imap", f"b-good-imap.{serial}", serial)
        conn.expect(SUCCESS["imap"])
        data = b"." * int(RELAY_SPAN / gap + 1)
        heard, closed = drip(conn.sock, data, gap)
        heard = bytearray(heard)
        closed = closed or hear(conn.sock, CLIENT_TIMEOUT, heard, until=len(data))
        expect(not closed, f"cut after {len(heard)} of {len(data)} bytes while they moved")
        expect(heard == data, f"echoed {bytes(heard)!r}")
        return self.done(conn)

    def relay_to_the_end(self, user, serial, expected, problem):
        """Log in, then only listen: the relay must end, after `expected`."""
        conn = self.logged_in("imap", f"{user}.{serial}", serial)
        conn.expect(SUCCESS["imap"])
        heard = bytearray()
        expect(hear(conn.sock, CLIENT_TIMEOUT, heard), "the relay never ended")
        expect(heard == expected, f"{problem}: heard {bytes(heard)!r}")
        return self.done(conn)

    def relay_backend(self, serial, gap):
        return self.relay_to_the_end("b-relay-drip", serial, b"." * RELAY_BYTES,
                                     "cut while bytes moved")

    def relay_idle(self, serial, gap):
        return self.relay_to_the_end("b-good-imap", serial, b"", "unexpected bytes")

    def stops_reading(self, serial, gap):
        """Reads nothing after its login: the proxy's write of the long
        refusal must end, and its session with it."""
        conn = small_window_conn(self.long_refusal_port)
        try:
            CLIENTS["imap"].greet(conn)
            CLIENTS["imap"].login(conn, f"b-long-refusal.{serial}".encode(), password(serial))
            mine = f"session {address(conn.sock)}"
            gone = wait_until(lambda: all(t.name != mine for t in threading.enumerate()),
                              timeout=CLIENT_TIMEOUT)
            expect(gone, "the session still writes to a client that stopped reading")
            conn.sock.settimeout(CLIENT_TIMEOUT)
            heard = bytearray()
            expect(hear(conn.sock, CLIENT_TIMEOUT, heard), "not closed")
            expect(heard.startswith(b"a NO xxx") and len(heard) < HUGE,
                   f"expected a part of the refusal, got {len(heard)} bytes")
            return address(conn.sock)
        finally:
            conn.close()


PHASES = [
    Phase("prelogin-imap", Runs.prelogin_imap, "timeout", "client timed out"),
    Phase("prelogin-pop3", Runs.prelogin_pop3, "timeout", "client timed out"),
    Phase("prelogin-smtp", Runs.prelogin_smtp, "timeout", "client timed out"),
    Phase("tls-client-hello", Runs.tls_client_hello, "timeout",
          "client timed out while SSL handshaking"),
    Phase("tls-record", Runs.tls_record, "timeout", "client timed out"),
    Phase("starttls-handshake", Runs.starttls_handshake, "timeout",
          "client timed out while SSL handshaking"),
    Phase("sasl-imap", Runs.sasl_imap, "timeout", "client timed out"),
    Phase("sasl-pop3", Runs.sasl_pop3, "timeout", "client timed out"),
    Phase("sasl-smtp", Runs.sasl_smtp, "timeout", "client timed out"),
    Phase("proxy-header", Runs.proxy_header, "timeout",
          "client timed out while reading PROXY protocol"),
    Phase("auth-reply", Runs.auth_trickle, "error", "/auth timed out while in http auth state"),
    *(Phase(f"backend-{name}-{protocol}",
            lambda runs, serial, gap, n=name, p=protocol: runs.backend(n, p)(serial, gap),
            "backend", "upstream timed out")
      for name in ("greeting", "reply") for protocol in ("imap", "pop3", "smtp")),
    Phase("auth-wait", Runs.auth_wait, "timeout", "client timed out"),
    Phase("relay-client-drips", Runs.relay_client, "client", "relay done", never="timed out"),
    Phase("relay-backend-drips", Runs.relay_backend, "backend", "relay done", never="timed out"),
    Phase("relay-idle", Runs.relay_idle, "timeout", "closed by timeout"),
    Phase("client-stops-reading", Runs.stops_reading, "backend",
          "upstream sent invalid response"),
]


# ------------------------------------------------------- the whole setup

@dataclass
class Results:
    """What a drive did, for the assertions and the bench report."""
    sessions: int = 0
    by_phase: Counter = field(default_factory=Counter)
    by_end: Counter = field(default_factory=Counter)     # the summaries' "closed by"
    mismatches: list = field(default_factory=list)
    crashes: list = field(default_factory=list)
    secrets: list = field(default_factory=list)
    leaked_threads: int = 0
    leaked_fds: int = 0
    seconds: float = 0.0


class Drips(Runs):
    """One proxy (six servers: IMAP, POP3, SMTP, implicit TLS, PROXY
    protocol, and one that shows backends' refusals), its auth service,
    its backends, and the dripping sessions driven through them.  `gaps`
    is the range the gap between two dripped bytes is drawn from."""

    def __init__(self, directory, certs, gaps=(GAP, GAP), level="debug"):
        self.certs, self.gaps = certs, gaps
        self.auth = ScriptedAuthService(self.auth_reply)
        self.auth._server.socket.listen(128)     # see test_faults.Campaign
        self.backends = {name: ScriptedBackend(script, io_timeout=CLIENT_TIMEOUT)
                         for name, script in backend_scripts(self.gap).items()}
        self.tls_port, self.proxy_port = free_port(), free_port()
        self.long_refusal_port = free_port()
        servers = ["protocol imap;", "protocol pop3;", "protocol smtp;",
                   f"protocol imap;\nlisten {LOOPBACK}:{self.tls_port} ssl;",
                   f"protocol imap;\nlisten {LOOPBACK}:{self.proxy_port} proxy_protocol;",
                   f"protocol imap;\nlisten {LOOPBACK}:{self.long_refusal_port} "
                   f"sndbuf={SMALL_SEND};\nproxy_pass_error_message on;\nproxy_buffer {HUGE};"]
        mail = (MAIL + f"auth_http {self.auth.url};\nssl_certificate {certs.rsa.cert};\n"
                f"ssl_certificate_key {certs.rsa.key};")
        self.proxy = RunningProxy(directory, mail=mail, servers=servers, level=level)
        self.port = dict(zip(SERVERS, self.proxy.ports))

    def close(self):
        self.proxy.stop()
        for backend in self.backends.values():
            backend.close()
        self.auth.close()

    def gap(self, seed):
        return random.Random(seed).uniform(*self.gaps)

    def auth_reply(self, request):
        """The scenario is the login's first part (`b-<backend>`,
        `auth-trickle`, `wait`), the serial its last."""
        scenario, _, serial = (request.header("Auth-User") or "").rpartition(".")
        if scenario.startswith("b-"):
            return fakes.ok(LOOPBACK, self.backends[scenario[2:]].port)
        if scenario == "wait":
            return fakes.fail("Later", wait=TIMEOUT)
        if scenario == "auth-trickle":
            good = self.backends["good-imap"].port
            reply = (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
                     b"Auth-Port: %d\r\n\r\n" % good)
            return Trickle(reply, self.gap(serial))
        return fakes.fail("unknown scenario")

    def greeted(self, protocol, port=None):
        conn = Conn(port or self.port[protocol])
        CLIENTS[protocol].greet(conn)
        return conn

    def done(self, conn):
        """The client's address; the connection closed."""
        try:
            return address(conn.sock)
        finally:
            conn.close()

    def warm(self):
        """One good login (pools, first imports); the baseline fd count."""
        conn = self.logged_in("imap", "b-good-imap.0", 0)
        conn.expect(SUCCESS["imap"])
        conn.close()
        assert wait_until(lambda: not session_threads())
        return fds(self.auth.port)[0]

    def drive(self, count, seed=0, workers=None, results=None):
        """`count` sessions, every phase in turn (shuffled), `workers` at a
        time (all at once by default); returns Results."""
        results = results or Results()
        rng = random.Random(seed)
        plan = [PHASES[i % len(PHASES)] for i in range(count)]
        rng.shuffle(plan)
        ran = []            # (started, phase, address)
        lock = threading.Lock()     # the client threads share `ran` and `results`

        def one(numbered):
            serial, phase = numbered
            started = time.monotonic()
            try:
                ran_at = phase.run(self, serial, self.gap(serial))
                problem = None
            except (Unexpected, OSError, AssertionError) as exc:
                ran_at, problem = None, f"{phase.name}: {type(exc).__name__}: {exc}"
            with lock:
                results.sessions += 1
                results.by_phase[phase.name] += 1
                if problem:
                    results.mismatches.append(problem)
                else:
                    ran.append((started, phase, ran_at))

        started = time.monotonic()
        with ThreadPoolExecutor(workers or len(plan), thread_name_prefix="drip") as pool:
            list(pool.map(one, enumerate(plan, start=results.sessions + 1)))
        results.seconds += time.monotonic() - started
        wait_until(lambda: not session_threads(), timeout=SETTLE_TIMEOUT, interval=0.1)
        self.check_log(sorted(ran, key=lambda entry: entry[0]), results)
        return results

    def check_log(self, ran, results):
        """Each session's lines: its end named, its summary's reason; no
        crash and no secret anywhere."""
        log = self.proxy.log()
        conns, lines = {}, {}
        for line in log.splitlines():
            found = re.search(r"\*(\d+) client (\S+) connected to ", line)
            if found:
                conns.setdefault(found.group(2), []).append(found.group(1))
            number = re.search(r"\*(\d+) ", line)
            if number:
                lines.setdefault(number.group(1), []).append(line)
        for _, phase, client in ran:       # in order: a port may serve two sessions in turn
            mine = lines.get(conns.get(client, [None]).pop(0), [])
            problem = session_problem(phase, mine)
            if problem:
                results.mismatches.append(f"{phase.name} ({client}): {problem}")
            for line in mine:
                if " session done: " in line:
                    results.by_end[line.split(", closed by ")[1].split()[0]] += 1
        results.crashes = [line for line in log.splitlines()
                           if any(mark in line for mark in CRASH_MARKS)]
        results.secrets = [line for line in log.splitlines()
                           if SECRET.decode() in line or SASL_START.decode() in line]

    def settle(self, baseline, results):
        """Wait (bounded) for threads and fds to return to `baseline`."""
        wait_until(lambda: not session_threads() and fds(self.auth.port)[0] <= baseline,
                   timeout=SETTLE_TIMEOUT, interval=0.1)
        results.leaked_threads = len(session_threads())
        results.leaked_fds = max(0, fds(self.auth.port)[0] - baseline)
        return results


def session_problem(phase, lines):
    """What is wrong with one session's log lines (None: nothing)."""
    summary = [line for line in lines if " session done: " in line]
    if len(summary) != 1:
        return f"{len(summary)} summary lines"
    if f", closed by {phase.reason} while " not in summary[0]:
        return f"ended otherwise: {summary[0]}"
    if not any(phase.line in line for line in lines):
        return f"no line with {phase.line!r}"
    if phase.never and any(phase.never in line for line in lines):
        return f"a line with {phase.never!r}"
    return None


# ------------------------------------------------------------------ tests

@pytest.fixture
def drips(tmp_path, certs):
    drips = Drips(tmp_path, certs)
    yield drips
    drips.close()


def test_every_phase_dripped_ends_at_its_deadline_with_its_line(drips):
    baseline = drips.warm()
    results = drips.drive(len(PHASES))
    drips.settle(baseline, results)
    assert results.mismatches == []
    assert results.by_phase == Counter(phase.name for phase in PHASES)
    assert sum(results.by_end.values()) == len(PHASES)
    assert results.crashes == []
    assert results.secrets == []
    assert results.leaked_threads == 0, session_threads()
    assert results.leaked_fds == 0
