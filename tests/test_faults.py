"""Fault campaign: the proxy among misbehaving auth services, backends and clients.

One proxy (IMAP, POP3 and SMTP, each twice: once behind the scripted auth
service, once behind an auth address nobody listens on) serves a few
hundred sessions, sixteen at a time, while in turn the auth service is silent,
closes, answers garbage, answers too much, answers slowly or keeps saying
WAIT; the backend refuses, is silent, or closes, resets or talks garbage at
every step of the login; and clients vanish at every step of theirs.  Each
session checks what its client hears: the login's success, the protocol's
internal-error line, the refusal, or nothing at all.

The login name says which fault a session meets: the scripted auth service
reads `Auth-User` ("b-close@3.17": send it to the backend that closes
before step 3) and answers accordingly, so sessions of every kind can run
concurrently.

Afterwards the proxy must still serve a good login, its log must hold no
"unexpected error" or traceback, and its session threads and open file
descriptors must be back to where they were (bounded wait).  The proxy runs
in this process, so /proc/self/fd counts its descriptors together with the
fakes' and the clients'; the only ones left out are the auth service's
keep-alive connections (both ends), which the proxy keeps on purpose in a
pool of at most `auth_transport.POOL_SIZE` per server; their number is checked
against that bound instead.

`tests/bench/faults.py` runs the same campaign with thousands of sessions.
"""

import base64
import os
import random
import resource
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

import fakes
from fakes import Hang, ScriptedAuthService, ScriptedBackend
from harness import RunningProxy, free_port, wait_until
from mailproxy import imap, pop3, smtp
from mailproxy.auth_transport import POOL_SIZE

LOOPBACK = "127.0.0.1"
TIMEOUT = 1                 # `timeout` and `auth_http_timeout`, seconds
PROXY_TIMEOUT = 2           # `proxy_timeout`, seconds
CLIENT_TIMEOUT = 10         # the longest any campaign client read may block
SETTLE_TIMEOUT = 15         # how long threads and fds may take to return to the baseline
MAX_REPLY_LINE = 65536
WORKERS = 16                # sessions in flight at once
AUTH_BACKLOG = 128          # the scripted auth service's listen queue (see Campaign)
PASSWORD = b"campaign-secret"
GARBAGE = b"\x00\xff\xfe garbage \x1b[31m\r\n"
LONG_LINE = b"x" * 5000     # no line end, longer than proxy_buffer (4k)
CRASH_MARKS = ("unexpected error", "session crashed", "Traceback")

MAIL = f"""
server_name mx.test;
timeout {TIMEOUT}s;
auth_http_timeout {TIMEOUT}s;
proxy_timeout {PROXY_TIMEOUT}s;
imap_auth plain login cram-md5;
pop3_auth plain apop cram-md5;
smtp_auth plain login cram-md5;
"""


# ------------------------------------------------------------ the backends

# The backend's half of a good login, step by step; a fault replaces or cuts
# one step.  The proxy sends nothing before the greeting, then one line per
# `recv_line`.
BACKEND_LOGIN = {
    "imap": [("send", b"* OK backend ready\r\n"), ("recv_line",),     # a LOGIN {n}
             ("send", b"+ go ahead\r\n"), ("recv_line",),             # user {m}
             ("send", b"+ go ahead\r\n"), ("recv_line",),             # password
             ("send", b"a OK done\r\n")],
    "pop3": [("send", b"+OK backend ready\r\n"), ("recv_line",),      # USER
             ("send", b"+OK\r\n"), ("recv_line",),                    # PASS
             ("send", b"+OK logged in\r\n")],
    "smtp": [("send", b"220 backend ESMTP\r\n"), ("recv_line",),      # EHLO mx.test
             ("send", b"250-backend\r\n250 XCLIENT ADDR NAME LOGIN\r\n"),
             ("recv_line",),                                          # XCLIENT
             ("send", b"220 backend ESMTP\r\n"), ("recv_line",),      # EHLO client.test
             ("send", b"250-backend\r\n250 8BITMIME\r\n")],
}
SUCCESS = {"imap": b"a OK done\r\n", "pop3": b"+OK logged in\r\n", "smtp": smtp.AUTH_OK}
INTERNAL = {"imap": imap.INTERNAL_ERROR, "pop3": pop3.INTERNAL_ERROR,
            "smtp": smtp.INTERNAL_ERROR}


def backend_scripts(protocol):
    """name -> (script, what the client hears): every way the backend
    half of the login can go wrong, plus the good and the slow backend."""
    login = BACKEND_LOGIN[protocol]
    sends = [i for i, step in enumerate(login) if step[0] == "send"]
    scripts = {"good": (login + [("echo",)], "success"),
               "slow": (login[:-1] + [("sleep", 0.5), login[-1], ("echo",)], "success"),
               "silent": ([("sleep", TIMEOUT + 1)], "internal"),
               "silent-mid-login": (login[:2] + [("sleep", TIMEOUT + 1)], "internal")}
    for i in range(len(login)):
        scripts[f"close@{i}"] = (login[:i] + [("close",)], "internal")
    for i in sends:
        scripts[f"reset@{i}"] = (login[:i] + [("reset",)], "internal")
        scripts[f"garbage@{i}"] = (login[:i] + [("send", GARBAGE)] + login[i + 1:]
                                   + [("echo",)], "internal")
        scripts[f"long@{i}"] = (login[:i] + [("send", LONG_LINE), ("recv_line",)], "internal")
        scripts[f"no-line-end@{i}"] = (login[:i] + [("send", login[i][1][:-2])], "internal")
    return scripts


# ------------------------------------------------------- the auth service

def _good(campaign, request):
    return fakes.ok(LOOPBACK, campaign.backend_port(request, "good"))


def _slow(campaign, request):
    time.sleep(0.3)
    return _good(campaign, request)


def _retry(campaign, request):
    """Refused with Auth-Wait the first time, accepted the second."""
    if request.header("Auth-Login-Attempt") == "1":
        return fakes.fail("Try again", wait=1)
    return _good(campaign, request)


def _long_body(campaign, request):
    ok = fakes.ok(LOOPBACK, campaign.backend_port(request, "good"))
    head = "".join(f"{name}: {value}\r\n" for name, value in ok.items())
    return (f"HTTP/1.0 200 OK\r\n{head}Content-Length: 200000\r\n\r\n".encode()
            + b"x" * 200000)


# fault name -> (reply or reply(campaign, request), what the client hears)
AUTH_FAULTS = {
    "good": (_good, "success"),
    "auth-slow": (_slow, "success"),
    "auth-retry": (_retry, "retry"),
    "auth-long-body": (_long_body, "success"),
    "auth-refuse": (fakes.fail("Go away"), "refused"),
    "auth-silent": (Hang(TIMEOUT + 0.5), "internal"),
    "auth-close": (b"", "internal"),
    "auth-garbage": (b"\x00\xffNOT HTTP AT ALL\r\n\r\n", "internal"),
    "auth-half-headers": (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Ser", "internal"),
    "auth-bad-header": (b"HTTP/1.0 200 OK\r\nAuth Status: OK\r\n\r\n", "internal"),
    "auth-oversized": (fakes.ok(LOOPBACK, 9, X_Padding="p" * 1100), "internal"),
    "auth-no-server": ({"Auth-Status": "OK"}, "internal"),
    "auth-bad-server": (fakes.ok("backend.example", 143), "internal"),
    "auth-bad-port": (fakes.ok(LOOPBACK, 70000), "internal"),
    "auth-wait-loop": ({"Auth-Status": "WAIT", "Auth-Wait": "0"}, "internal"),
    "auth-absurd-wait": (fakes.fail("Later", wait=10 ** 11), "vanish"),
    "auth-wait-2s": (fakes.fail("Later", wait=2), "vanish"),
}


# ------------------------------------------------------------ the clients

class Unexpected(Exception):
    """The client heard something other than what the scenario expects."""


class Conn:
    """A campaign client: a socket, a reader, a deadline on every read."""

    def __init__(self, port):
        self.sock = socket.create_connection((LOOPBACK, port), timeout=CLIENT_TIMEOUT)
        self.reader = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        return self.reader.readline(MAX_REPLY_LINE)

    def expect(self, wanted, prefix=False):
        line = self.line()
        if line != wanted and not (prefix and line.startswith(wanted)):
            raise Unexpected(f"expected {wanted!r}, got {line!r}")
        return line

    def expect_eof(self):
        try:
            rest = self.reader.read(MAX_REPLY_LINE)
        except ConnectionResetError:
            return
        if rest:
            raise Unexpected(f"expected the end, got {rest[:200]!r}")

    def close(self, reset=False):
        if reset:       # SO_LINGER 0: close() sends RST, as a crashed client does
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.reader.close()
        self.sock.close()


def b64(data):
    return base64.b64encode(data)


class ImapClient:
    name = "imap"

    def greet(self, conn):
        conn.expect(imap.GREETING)

    def login(self, conn, user, password=PASSWORD):
        conn.send(b"a LOGIN {%d}\r\n" % len(user))
        conn.expect(imap.CONTINUE_LITERAL)
        conn.send(user + b" {%d}\r\n" % len(password))
        conn.expect(imap.CONTINUE_LITERAL)
        conn.send(password + b"\r\n")

    def refusal(self, status):
        return b"a NO " + status + b"\r\n"

    # where a client may vanish: (what it says and hears) before it goes
    cuts = {
        "mid-command": [(b"a LOG", None)],
        "mid-literal": [(b"a LOGIN {8}\r\n", imap.CONTINUE_LITERAL), (b"joe", None)],
        "between-literals": [(b"a LOGIN {3}\r\n", imap.CONTINUE_LITERAL),
                             (b"joe {8}\r\n", imap.CONTINUE_LITERAL)],
        "non-sync-literal": [(b"a LOGIN {8+}\r\njo", None)],
        "mid-sasl": [(b"a AUTHENTICATE LOGIN\r\n", b"+ "), (b64(b"joe") + b"\r\n", b"+ ")],
        "mid-cram-md5": [(b"a AUTHENTICATE CRAM-MD5\r\n", b"+ ")],
        "after-capability": [(b"a CAPABILITY\r\n", b"* CAPABILITY")],
    }


class Pop3Client:
    name = "pop3"

    def greet(self, conn):
        conn.expect(pop3.GREETING, prefix=True)

    def login(self, conn, user, password=PASSWORD):
        conn.send(b"USER " + user + b"\r\n")
        conn.expect(pop3.OK)
        conn.send(b"PASS " + password + b"\r\n")

    def refusal(self, status):
        return b"-ERR " + status + b"\r\n"

    cuts = {
        "mid-command": [(b"USE", None)],
        "after-user": [(b"USER joe\r\n", pop3.OK)],
        "mid-pass": [(b"USER joe\r\n", pop3.OK), (b"PASS sec", None)],
        "mid-sasl": [(b"AUTH LOGIN\r\n", b"+ "), (b64(b"joe") + b"\r\n", b"+ ")],
        "mid-plain": [(b"AUTH PLAIN\r\n", b"+ ")],
        "mid-cram-md5": [(b"AUTH CRAM-MD5\r\n", b"+ ")],
        "after-capa": [(b"CAPA\r\n", pop3.CAPA_HEADER)],
    }


class SmtpClient:
    name = "smtp"

    def greet(self, conn):
        conn.expect(b"220 mx.test ESMTP ready\r\n")
        conn.send(b"EHLO client.test\r\n")
        while conn.expect(b"250", prefix=True)[3:4] == b"-":
            pass

    def login(self, conn, user, password=PASSWORD):
        conn.send(b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + password) + b"\r\n")

    def refusal(self, status):
        return smtp.DEFAULT_ERROR_CODE.encode() + b" " + status + b"\r\n"

    cuts = {
        "mid-command": [(b"AUTH PLA", None)],
        "mid-sasl": [(b"AUTH LOGIN\r\n", b"334 "), (b64(b"joe") + b"\r\n", b"334 ")],
        "mid-plain": [(b"AUTH PLAIN\r\n", b"334 ")],
        "mid-cram-md5": [(b"AUTH CRAM-MD5\r\n", b"334 ")],
        "mid-data-line": [(b"MAIL FROM:<a@b", None)],
    }


CLIENTS = {client.name: client for client in (ImapClient(), Pop3Client(), SmtpClient())}


# ------------------------------------------------------------ scenarios

@dataclass(frozen=True)
class Scenario:
    """One kind of session: `run(campaign, serial)` plays it; `fault` is
    False only for the plain good login."""
    protocol: str
    name: str
    run: object
    fault: bool = True


def scenarios(protocol):
    """Every kind of session the campaign drives for one protocol."""
    found = []

    def add(name, run, fault=True):
        found.append(Scenario(protocol, name, run, fault))

    add("good", lambda c, n: c.login_session(protocol, f"good.{n}", "success"), fault=False)
    for fault, (_, outcome) in AUTH_FAULTS.items():
        if fault != "good" and outcome != "vanish":
            add(fault, lambda c, n, f=fault, o=outcome: c.login_session(protocol, f"{f}.{n}", o))
    add("auth-refused-connection",
        lambda c, n: c.login_session(protocol, f"good.{n}", "internal", server=1))
    for name, (_, outcome) in backend_scripts(protocol).items():
        add(f"backend-{name}",
            lambda c, n, b=name, o=outcome: c.login_session(protocol, f"b-{b}.{n}", o))
    add("backend-refused-connection",
        lambda c, n: c.login_session(protocol, f"b-refused.{n}", "internal"))
    # clients that vanish, at every step
    add("vanish-before-greeting", lambda c, n: c.vanish_early(protocol, n))
    for cut in CLIENTS[protocol].cuts:
        add(f"vanish-{cut}", lambda c, n, cut=cut: c.vanish_at_cut(protocol, cut, n))
    add("vanish-during-auth", lambda c, n: c.vanish_after_login(protocol, f"auth-slow.{n}", 0))
    add("vanish-during-auth-wait",
        lambda c, n: c.vanish_after_login(protocol, f"auth-wait-2s.{n}", 0.3))
    add("vanish-during-absurd-auth-wait",
        lambda c, n: c.vanish_after_login(protocol, f"auth-absurd-wait.{n}", 0.3))
    add("vanish-during-backend-login",
        lambda c, n: c.vanish_after_login(protocol, f"b-slow.{n}", 0.2))
    add("vanish-mid-relay", lambda c, n: c.vanish_mid_relay(protocol, n))
    add("silent-client", lambda c, n: c.silent_client(protocol))
    add("garbage-client", lambda c, n: c.garbage_client(protocol, n))
    return found


@dataclass
class Results:
    """What a campaign did, for the assertions and the bench report."""
    sessions: int = 0
    faults: int = 0
    by_scenario: Counter = field(default_factory=Counter)
    mismatches: list = field(default_factory=list)
    crashes: list = field(default_factory=list)
    leaked_threads: int = 0
    leaked_fds: int = 0
    pooled_auth_sockets: int = 0
    seconds: float = 0.0

    def summary(self):
        return (f"{self.sessions} sessions, {self.faults} faults injected, "
                f"{len(self.mismatches)} unexpected replies, {len(self.crashes)} crashes, "
                f"{self.leaked_threads} leaked threads, {self.leaked_fds} leaked fds "
                f"({self.pooled_auth_sockets} pooled auth connections), {self.seconds:.1f}s")


class Campaign:
    """The proxy, its fakes, and the sessions driven through them."""

    def __init__(self, directory, level="info"):
        self.auth = ScriptedAuthService(self.auth_reply)
        # The fake is a socketserver, whose listen backlog is 5: a burst of
        # logins would overflow it, and the kernel retries a dropped
        # handshake only after 1 s, as long as auth_http_timeout.  A real
        # auth service listens with a longer queue; so does this one now.
        self.auth._server.socket.listen(AUTH_BACKLOG)
        self.backends = {}
        for protocol in CLIENTS:
            for name, (script, _) in backend_scripts(protocol).items():
                self.backends[protocol, name] = ScriptedBackend(script, io_timeout=5)
        self.dead_port = free_port()        # nobody listens there: refused
        servers = [f"protocol {p};\nauth_http {self.auth.url};" for p in CLIENTS] + \
                  [f"protocol {p};\nauth_http {LOOPBACK}:{self.dead_port}/auth;"
                   for p in CLIENTS]
        self.proxy = RunningProxy(directory, mail=MAIL, servers=servers, level=level)
        self.ports = {p: (self.proxy.ports[i], self.proxy.ports[i + 3])
                      for i, p in enumerate(CLIENTS)}

    def close(self):
        self.proxy.stop()
        for backend in self.backends.values():
            backend.close()
        self.auth.close()

    # ------------------------------------------ the auth service's side

    def auth_reply(self, request):
        fault = (request.header("Auth-User") or "").rsplit(".", 1)[0]
        if fault.startswith("b-"):
            return fakes.ok(LOOPBACK, self.backend_port(request, fault[2:]))
        reply, _ = AUTH_FAULTS.get(fault, (fakes.fail("unknown scenario"), None))
        return reply(self, request) if callable(reply) else reply

    def backend_port(self, request, name):
        if name == "refused":
            return self.dead_port
        return self.backends[request.header("Auth-Protocol"), name].port

    # -------------------------------------------------------- sessions

    def login_session(self, protocol, user, outcome, server=0):
        client = CLIENTS[protocol]
        conn = Conn(self.ports[protocol][server])
        try:
            client.greet(conn)
            client.login(conn, user.encode())
            if outcome == "retry":
                conn.expect(client.refusal(b"Try again"))
                client.login(conn, user.encode())
                outcome = "success"
            if outcome == "success":
                conn.expect(SUCCESS[protocol])
                conn.send(b"ping %s\r\n" % user.encode())
                conn.expect(b"ping %s\r\n" % user.encode())
                return
            if outcome == "refused":
                conn.expect(client.refusal(b"Go away"))
            else:
                conn.expect(INTERNAL[protocol])
            conn.expect_eof()
        finally:
            conn.close()

    def vanish_early(self, protocol, serial):
        conn = Conn(self.ports[protocol][0])
        conn.close(reset=serial % 2 == 0)

    def vanish_at_cut(self, protocol, cut, serial):
        client = CLIENTS[protocol]
        conn = Conn(self.ports[protocol][0])
        try:
            client.greet(conn)
            for said, heard in client.cuts[cut]:
                conn.send(said)
                if heard is not None:
                    conn.expect(heard, prefix=True)
        finally:
            conn.close(reset=serial % 2 == 0)

    def vanish_after_login(self, protocol, user, pause):
        client = CLIENTS[protocol]
        conn = Conn(self.ports[protocol][0])
        try:
            client.greet(conn)
            client.login(conn, user.encode())
            time.sleep(pause)
        finally:
            conn.close()

    def vanish_mid_relay(self, protocol, serial):
        client = CLIENTS[protocol]
        conn = Conn(self.ports[protocol][0])
        try:
            client.greet(conn)
            client.login(conn, f"good.{serial}".encode())
            conn.expect(SUCCESS[protocol])
            conn.send(b"half a line and then noth")
        finally:
            conn.close(reset=serial % 2 == 0)

    def silent_client(self, protocol):
        """Says nothing: closed silently when `timeout` runs out."""
        conn = Conn(self.ports[protocol][0])
        try:
            started = time.monotonic()
            conn.line()         # the greeting
            conn.expect_eof()
            took = time.monotonic() - started
            if not TIMEOUT - 0.2 <= took <= TIMEOUT + 3:
                raise Unexpected(f"closed after {took:.2f}s, timeout is {TIMEOUT}s")
        finally:
            conn.close()

    def garbage_client(self, protocol, serial):
        """Random bytes, then end of input: any replies, then a clean close."""
        rng = random.Random(serial)
        conn = Conn(self.ports[protocol][0])
        try:
            conn.line()
            try:
                conn.send(garbage(rng))
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:         # the proxy may hang up first (max_errors)
                return
            for _ in range(1000):
                try:
                    if not conn.line():
                        return
                except ConnectionResetError:
                    return
            raise Unexpected("more than 1000 reply lines to one garbage burst")
        finally:
            conn.close()

    # --------------------------------------------------------- campaign

    def drive(self, count, seed=0, workers=WORKERS, results=None):
        """Drive `count` sessions, every scenario of every protocol in
        turn (shuffled), `workers` at a time; returns Results."""
        results = results or Results()
        kinds = [s for protocol in CLIENTS for s in scenarios(protocol)]
        rng = random.Random(seed)
        plan = [kinds[i % len(kinds)] for i in range(count)]
        rng.shuffle(plan)
        lock = threading.Lock()     # the worker threads share `results`

        def one(numbered):
            serial, scenario = numbered
            try:
                scenario.run(self, serial)
                problem = None
            except (Unexpected, OSError) as exc:
                problem = f"{scenario.protocol} {scenario.name}: {type(exc).__name__}: {exc}"
            with lock:
                results.sessions += 1
                results.faults += scenario.fault
                results.by_scenario[scenario.protocol, scenario.name] += 1
                if problem:
                    results.mismatches.append(problem)

        started = time.monotonic()
        with ThreadPoolExecutor(workers, thread_name_prefix="campaign") as pool:
            list(pool.map(one, enumerate(plan, start=results.sessions)))
        results.seconds += time.monotonic() - started
        return results

    def burst(self, count, results):
        """`count` logins at once against the slow auth service."""
        kinds = [s for protocol in CLIENTS for s in scenarios(protocol) if s.name == "auth-slow"]
        started = time.monotonic()
        with ThreadPoolExecutor(count, thread_name_prefix="burst") as pool:
            outcomes = list(pool.map(lambda i: _attempt(kinds[i % 3], self, 10 ** 6 + i),
                                     range(count)))
        results.seconds += time.monotonic() - started
        results.sessions += count
        results.faults += count
        results.by_scenario["all", "auth-slow-burst"] += count
        results.mismatches += [problem for problem in outcomes if problem]

    def settle(self, baseline, results):
        """Wait (bounded) for threads and fds to return to `baseline`."""
        wait_until(lambda: not session_threads() and fds(self.auth.port)[0] <= baseline,
                   timeout=SETTLE_TIMEOUT, interval=0.1)
        results.leaked_threads = len(session_threads())
        count, pooled = fds(self.auth.port)
        results.leaked_fds = max(0, count - baseline)
        results.pooled_auth_sockets = pooled
        results.crashes = [line for line in self.proxy.log().splitlines()
                           if any(mark in line for mark in CRASH_MARKS)]
        return results

    def good_logins_work(self):
        for protocol in CLIENTS:
            self.login_session(protocol, f"good.after-{protocol}", "success")


def _attempt(scenario, campaign, serial):
    try:
        scenario.run(campaign, serial)
    except (Unexpected, OSError) as exc:
        return f"{scenario.protocol} {scenario.name}: {type(exc).__name__}: {exc}"
    return None


def garbage(rng):
    """A burst of hostile client input: bad tags, bare CR, NUL, literals,
    overlong lines, bad base64, the start of SASL exchanges."""
    pieces = [b"a ", b"* ", b"{5}\r\n", b"{3+}\r\n", b"{99999999999}\r\n", b"{0}\r\n",
              b"\r", b"\n", b"\r\n", b"\0", b"\xff\xfe", b'"', b"\\", b" ", b"LOGIN ",
              b"AUTHENTICATE PLAIN\r\n", b"AUTH LOGIN\r\n", b"USER x\r\n", b"PASS\r\n",
              b"EHLO x\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n", b"=====\r\n",
              b"*\r\n", b"x" * 300, b"CAPABILITY\r\n", b"NOOP\r\n", b"STARTTLS\r\n"]
    return b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))


# ---------------------------------------------------- counting resources

def session_threads():
    """The proxy's session threads ("session 127.0.0.1:N") and relay
    threads ("session-N backend->client")."""
    return [t for t in threading.enumerate() if t.name.startswith("session")]


def _tcp_ports():
    """socket inode -> (local port, remote port), for every TCP socket."""
    table = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as file:
                next(file)
                for line in file:
                    fields = line.split()
                    table[fields[9]] = (int(fields[1].rsplit(":", 1)[1], 16),
                                        int(fields[2].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return table


def fds(auth_port):
    """(open fds of this process, of which not counted: sockets of the auth
    service's keep-alive connections, both ends)."""
    ports = _tcp_ports()
    count = pooled = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue        # the fd listdir itself used, or one just closed
        if target.startswith("socket:[") and auth_port in ports.get(target[8:-1], ()):
            pooled += 1
            continue
        count += 1
    return count, pooled


# ------------------------------------------------------------------ tests

@pytest.fixture
def campaign(tmp_path):
    campaign = Campaign(tmp_path)
    yield campaign
    campaign.close()


def test_fault_campaign_leaves_no_crash_no_leak_and_a_working_proxy(campaign):
    """A few hundred sessions, every fault in turn, 16 at a time, then 48
    logins at once against a slow auth service."""
    campaign.good_logins_work()             # warm: pools, first-use imports
    assert wait_until(lambda: not session_threads())
    baseline = fds(campaign.auth.port)[0]
    kinds = sum(len(scenarios(protocol)) for protocol in CLIENTS)
    results = campaign.drive(2 * kinds)
    campaign.burst(48, results)
    campaign.settle(baseline, results)
    print(results.summary())
    assert results.mismatches == []
    assert results.crashes == []
    assert results.leaked_threads == 0, session_threads()
    assert results.leaked_fds == 0
    assert results.pooled_auth_sockets <= 2 * POOL_SIZE * 3
    assert results.sessions >= 300
    campaign.good_logins_work()


# ---------------------------------------------------------- many clients

def _raise_fd_limit(wanted):
    """Raise RLIMIT_NOFILE toward `wanted`; returns what we may use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


SLOWLORIS = 2000
SLOWLORIS_TIMEOUT = 8          # long enough for all to be open at once on a busy machine


def test_two_thousand_idle_clients_do_not_stop_a_login_and_all_close_at_timeout(tmp_path):
    """Slowloris: idle pre-login connections cost a thread each but block
    nobody, and `timeout` closes every one of them."""
    limit = _raise_fd_limit(2 * SLOWLORIS + 1000)
    count = min(SLOWLORIS, (limit - 500) // 2)     # both ends live in this process
    if count < SLOWLORIS:
        print(f"RLIMIT_NOFILE {limit}: {count} idle clients instead of {SLOWLORIS}")
    with ScriptedAuthService() as auth, \
            ScriptedBackend(BACKEND_LOGIN["imap"] + [("echo",)]) as backend:
        auth.reply = fakes.ok(LOOPBACK, backend.port)
        proxy = RunningProxy(tmp_path, servers=("protocol imap;",),
                             top=f"events {{ worker_connections {count + 100}; }}",
                             mail=f"auth_http {auth.url};\ntimeout {SLOWLORIS_TIMEOUT}s;",
                             level="info")
        idle = {}           # socket -> when it connected
        try:
            for _ in range(count):
                idle[socket.create_connection((LOOPBACK, proxy.port), timeout=10)] = \
                    time.monotonic()
            connected = time.monotonic()
            wait_until(lambda: len(session_threads()) >= count, timeout=SLOWLORIS_TIMEOUT / 2)
            busy = len(session_threads())
            conn = Conn(proxy.port)
            try:
                CLIENTS["imap"].greet(conn)
                CLIENTS["imap"].login(conn, b"joe")
                conn.expect(SUCCESS["imap"])
            finally:
                conn.close()
            # The idle clients that connected last were all still open then.
            assert time.monotonic() - connected < SLOWLORIS_TIMEOUT, "login came too late"
            print(f"{count} idle clients, {busy} session threads at the login")
            closed_at = _wait_all_closed(idle, SLOWLORIS_TIMEOUT + 10)
            assert len(closed_at) == count, f"{count - len(closed_at)} idle clients still open"
            lived = [closed_at[sock] - idle[sock] for sock in idle]
            assert SLOWLORIS_TIMEOUT - 0.5 <= min(lived) <= max(lived) <= SLOWLORIS_TIMEOUT + 5
            assert wait_until(lambda: not session_threads(), timeout=10)
        finally:
            for sock in idle:
                sock.close()
            proxy.stop()


def _wait_all_closed(socks, timeout):
    """Read every socket to its end (greeting, then EOF); returns
    {socket: when its EOF came}.  Uses epoll: there are more than 1024 fds."""
    closed_at = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        while len(closed_at) < len(socks) and time.monotonic() < end:
            for key, _ in selector.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed_at[key.fileobj] = time.monotonic()
                    selector.unregister(key.fileobj)
    return closed_at


def test_worker_connections_is_enforced_and_logged(tmp_path):
    """worker_connections N: the N+1th connection is closed at once and
    logged; when one session ends, a new one is served again."""
    limit = 4
    proxy = RunningProxy(tmp_path, servers=("protocol imap;",),
                         top=f"events {{ worker_connections {limit}; }}",
                         mail=f"auth_http {LOOPBACK}:{free_port()}/auth;\ntimeout 10s;")
    clients = []
    try:
        for _ in range(limit):
            clients.append(Conn(proxy.port))
            clients[-1].expect(imap.GREETING)
        extra = Conn(proxy.port)
        try:
            extra.expect_eof()
        finally:
            extra.close()
        proxy.wait_log(f"{limit} worker_connections are not enough")
        clients.pop().close()
        assert wait_until(lambda: len(session_threads()) < limit)
        again = Conn(proxy.port)
        clients.append(again)
        again.expect(imap.GREETING)
    finally:
        for conn in clients:
            conn.close()
        proxy.stop()


def test_a_client_that_never_reads_does_not_pin_its_session(tmp_path):
    """The backend sends far more than the socket buffers hold while the
    client reads nothing: `proxy_timeout` bounds the blocked send, and
    the session ends instead of waiting for ever."""
    flood = b"x" * (64 * 1024 * 1024)
    stall = 1                       # `proxy_timeout`, seconds
    with ScriptedAuthService() as auth, \
            ScriptedBackend(BACKEND_LOGIN["imap"] + [("send", flood)], io_timeout=30) as backend:
        auth.reply = fakes.ok(LOOPBACK, backend.port)
        proxy = RunningProxy(tmp_path, servers=("protocol imap;",),
                             mail=f"auth_http {auth.url};\nproxy_timeout {stall}s;",
                             level="info")
        conn = Conn(proxy.port)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            CLIENTS["imap"].greet(conn)
            CLIENTS["imap"].login(conn, b"joe")
            conn.expect(SUCCESS["imap"])
            stalled = time.monotonic()
            assert wait_until(lambda: not session_threads(), timeout=stall + 10), \
                "the session is still blocked on a client that does not read"
            assert time.monotonic() - stalled < stall + 8
            proxy.wait_log("session done:")
        finally:
            conn.close()
            proxy.stop()


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_auth_wait_works_with_more_than_1024_fds_open(tmp_path, protocol):
    """select() cannot watch an fd above 1023; a busy proxy has such fds,
    and Auth-Wait (waiting while watching the client) must still work."""
    _raise_fd_limit(4096)
    pipes = [os.pipe() for _ in range(600)]         # 1200 fds: the session's is above
    try:
        with ScriptedAuthService() as auth, \
                ScriptedBackend(BACKEND_LOGIN[protocol] + [("echo",)]) as backend:
            auth.reply = fakes.sequence(fakes.fail("Try again", wait=1),
                                        fakes.ok(LOOPBACK, backend.port))
            proxy = RunningProxy(tmp_path, servers=(f"protocol {protocol};",),
                                 mail=f"auth_http {auth.url};\nserver_name mx.test;")
            client = CLIENTS[protocol]
            conn = Conn(proxy.port)
            try:
                client.greet(conn)
                client.login(conn, b"joe")
                conn.expect(client.refusal(b"Try again"))
                client.login(conn, b"joe")
                conn.expect(SUCCESS[protocol])
            finally:
                conn.close()
                proxy.stop()
            assert not [line for line in proxy.log().splitlines()
                        if any(mark in line for mark in CRASH_MARKS)]
    finally:
        for read, write in pipes:
            os.close(read)
            os.close(write)
