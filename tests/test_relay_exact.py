"""Byte-exact relay (issue 8, item 5): payloads both ways at once across
many concurrent sessions, plaintext and TLS, half-closes in both orders,
SHA-256 compared on both ends.

One in-process proxy (IMAP, a plain and a `listen ... ssl` listener) sits
in front of `HashingBackend`, a thread-per-connection IMAP server written
here.  It answers the LOGIN the proxy sends (two synchronizing literals),
learns the session number from the user name (`u17`), and then at once
sends a pseudo-random payload seeded by that number and reads everything
the client sends until EOF, hashing both as it goes.  The client (one
thread per session, `RelayClient`) does the same from its side, through
the proxy, over a plain socket or its own TLS (an `ssl.SSLObject` between
memory BIOs, on one thread, so a half-close is a close_notify that leaves
the read side working).

The two orders of half-close are made certain by holding back the tail
of a payload:

* "backend-first": the backend sends everything and shuts its write side
  (SHUT_WR) while the client still holds back the last quarter of its
  payload; the client sends that tail only after it has seen EOF, then
  half-closes; the backend reads to the client's EOF and closes.
* "client-first": the client sends everything and half-closes while the
  backend holds back the last quarter of its payload; the backend sends
  the tail only after it has seen the client's EOF, then closes.

So in either order a good part of one direction travels after the other
direction has ended: the proxy must pass the half-close on (FIN, or
close_notify over TLS) and keep relaying the other way.

tests/bench/relay_exact.py runs the same at full size (200 MB each way).
"""

import hashlib
import random
import select
import socket
import ssl
import threading
import time
import traceback
from dataclasses import dataclass

import pytest

pytest.register_assert_rewrite("certs")
from certs import client_context
from fakes import ScriptedAuthService, ok
from harness import RunningProxy, free_port, wait_until

pytest_plugins = ("certs",)

LOOPBACK = "127.0.0.1"
SESSIONS = 50                   # concurrent sessions per case
SIZE = 1024 * 1024              # bytes each way per session: SIZE .. 1.5 * SIZE
HOLDBACK = 4                    # the held-back tail is 1/HOLDBACK of a payload
CHUNK = 65536                   # bytes per generated chunk, send and recv
IO_TIMEOUT = 30                 # seconds any one blocking step may take
SESSION_TIMEOUT = 120           # seconds a whole session may take (a bound, not a goal)
SELECT_STEP = 0.5               # seconds between two deadline checks
THREADS_GONE = 15               # seconds for the proxy's session threads to end
ORDERS = ("backend-first", "client-first")
PASSWORD = b"secret"


# ------------------------------------------------------------ the payloads

@dataclass(frozen=True)
class Plan:
    """What session `index` sends each way, and who half-closes first."""
    index: int
    order: str
    client_size: int
    backend_size: int
    run_seed: int = 0

    def client_seed(self):
        return self.run_seed * 1_000_003 + 2 * self.index

    def backend_seed(self):
        return self.run_seed * 1_000_003 + 2 * self.index + 1


def plans(sessions, size, orders, run_seed=0, spread=True):
    """One Plan per session; sizes vary (odd, not chunk-aligned) when `spread`."""
    rng = random.Random(run_seed)
    result = []
    for index in range(sessions):
        extra = (lambda: rng.randrange(size // 2 + 1)) if spread else (lambda: 0)
        result.append(Plan(index, orders[index % len(orders)], size + extra(), size + extra(),
                           run_seed))
    return result


def payload(seed, size):
    """The deterministic payload as (head, tail) chunk generators: `tail`
    is the last 1/HOLDBACK, the part held back until the other side's EOF."""
    rng = random.Random(seed)
    tail_size = size // HOLDBACK

    def chunks(count):
        while count > 0:
            step = min(CHUNK, count)
            count -= step
            yield rng.randbytes(step)
    return chunks(size - tail_size), chunks(tail_size)


def describe(exc):
    """An exception with where it was raised (file:line in function)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}" \
        if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


@dataclass
class Side:
    """What one end sent and received (lengths and SHA-256 hex digests)."""
    sent: int = 0
    sent_sha: str = ""
    received: int = 0
    received_sha: str = ""
    eof_before_tail: bool = False   # this end saw the peer's EOF before sending its tail
    close_notify: bool = None       # TLS: the peer's EOF was a close_notify
    error: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------ the backend

class HashingBackend:
    """An IMAP backend that logs the proxy in and then hashes both ways."""

    def __init__(self, plans_by_index, io_timeout=IO_TIMEOUT):
        self.plans = plans_by_index
        self.io_timeout = io_timeout
        self.results = {}               # session index -> Side
        self.lock = threading.Lock()
        self.listener = socket.create_server((LOOPBACK, 0), backlog=1024)
        self.port = self.listener.getsockname()[1]
        self.threads = []
        self.closing = False
        self.acceptor = threading.Thread(target=self._accept, name=f"exact-backend-{self.port}",
                                         daemon=True)
        self.acceptor.start()

    def _accept(self):
        self.listener.settimeout(0.1)
        while not self.closing:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True,
                                      name=f"exact-backend-conn-{len(self.threads)}")
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock):
        side, index = Side(), None
        started = time.monotonic()
        try:
            with sock:
                sock.settimeout(self.io_timeout)
                buffer = bytearray()

                def line():
                    while b"\n" not in buffer:
                        data = sock.recv(CHUNK)
                        if not data:
                            raise EOFError(f"EOF in the login, after {bytes(buffer)!r}")
                        buffer.extend(data)
                    end = buffer.index(b"\n") + 1
                    text = bytes(buffer[:end])
                    del buffer[:end]
                    return text

                sock.sendall(b"* OK hashing backend ready\r\n")
                command = line()                         # a LOGIN {3}
                tag, verb, _ = command.split(b" ", 2)
                assert verb == b"LOGIN", command
                sock.sendall(b"+ go ahead\r\n")
                user = line()                            # u17 {6}
                sock.sendall(b"+ go ahead\r\n")
                password = line()                        # secret
                assert password == PASSWORD + b"\r\n", password
                name = user.rsplit(b" ", 1)[0]
                index = int(name[1:])
                plan = self.plans[index]
                sock.sendall(tag + b" OK done\r\n")
                self._relay(sock, plan, bytes(buffer), side)
        except Exception as exc:        # noqa: BLE001 - recorded, asserted by the test
            side.error = describe(exc)
        side.seconds = time.monotonic() - started
        with self.lock:
            self.results[index if index is not None else f"unknown-{id(side)}"] = side

    def _relay(self, sock, plan, leftover, side):
        """Send and receive at once: this thread reads, one more sends."""
        client_eof = threading.Event()
        head, tail = payload(plan.backend_seed(), plan.backend_size)
        sent_digest = hashlib.sha256()
        send_error = []

        def sender():
            try:
                for chunk in head:
                    sock.sendall(chunk)
                    sent_digest.update(chunk)
                    side.sent += len(chunk)
                if plan.order == "client-first":
                    if not client_eof.wait(self.io_timeout * 4):
                        raise TimeoutError("no EOF from the client")
                    side.eof_before_tail = True
                for chunk in tail:
                    sock.sendall(chunk)
                    sent_digest.update(chunk)
                    side.sent += len(chunk)
                sock.shutdown(socket.SHUT_WR)
            except Exception as exc:    # noqa: BLE001
                send_error.append(f"sender {describe(exc)}")

        thread = threading.Thread(target=sender, daemon=True,
                                  name=f"exact-backend-send-{plan.index}")
        thread.start()
        received = hashlib.sha256(leftover)
        side.received = len(leftover)
        try:
            while data := sock.recv(CHUNK):
                received.update(data)
                side.received += len(data)
            client_eof.set()
        finally:
            thread.join(self.io_timeout * 8)
        side.received_sha = received.hexdigest()
        side.sent_sha = sent_digest.hexdigest()
        if send_error:
            raise RuntimeError(send_error[0])

    def close(self):
        self.closing = True
        self.listener.close()
        self.acceptor.join(5)
        for thread in self.threads:
            thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------ the client

class RelayClient:
    """One session through the proxy, on one thread: login, then send
    and receive at once with select(), over plain TCP or TLS."""

    def __init__(self, port, plan, context=None, timeout=SESSION_TIMEOUT):
        self.plan = plan
        self.deadline = time.monotonic() + timeout
        self.sock = socket.create_connection((LOOPBACK, port), timeout=IO_TIMEOUT)
        self.sock.setblocking(False)
        self.out = bytearray()          # raw bytes waiting for the socket
        self.inbox = bytearray()        # received application bytes not yet consumed
        self.eof = False                # the peer's (application) EOF was seen
        self.close_notify = None
        self.tls = None
        if context is not None:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self.incoming, self.outgoing,
                                        server_hostname="localhost")
            self._handshake()

    # ---- raw I/O

    def _check_deadline(self, what):
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"session {self.plan.index}: timed out {what}")

    def _wait(self, write, read=True):
        self._check_deadline("waiting for the socket")
        readable, writable, _ = select.select([self.sock] if read else [],
                                              [self.sock] if write else [], [], SELECT_STEP)
        return bool(readable), bool(writable)

    def _take_outgoing(self):
        if self.tls is not None and self.outgoing.pending:
            self.out += self.outgoing.read()

    def _send_some(self):
        try:
            sent = self.sock.send(self.out[:4 * CHUNK])
        except BlockingIOError:
            return
        del self.out[:sent]

    def _recv_some(self):
        """One raw recv: decrypted bytes land in `inbox`; sets `eof`."""
        try:
            raw = self.sock.recv(4 * CHUNK)
        except BlockingIOError:
            return
        if self.tls is None:
            if raw:
                self.inbox += raw
            else:
                self.eof = True
            return
        if raw:
            self.incoming.write(raw)
        else:
            self.incoming.write_eof()
        self._tls_read()

    def _tls_read(self):
        while not self.eof:
            try:
                data = self.tls.read(4 * CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.eof, self.close_notify = True, True
                break
            except ssl.SSLEOFError:
                self.eof, self.close_notify = True, False
                break
            if not data:
                self.eof, self.close_notify = True, True
                break
            self.inbox += data
        self._take_outgoing()           # tickets, KeyUpdate answers

    def _handshake(self):
        while True:
            try:
                self.tls.do_handshake()
                self._take_outgoing()
                break
            except ssl.SSLWantReadError:
                self._take_outgoing()
            while self.out:
                self._wait(True)
                self._send_some()
            readable, _ = self._wait(False)
            if readable:
                raw = self.sock.recv(4 * CHUNK)
                if not raw:
                    raise EOFError("EOF during the TLS handshake")
                self.incoming.write(raw)
        while self.out:
            self._wait(True)
            self._send_some()

    def _write(self, data):
        if self.tls is None:
            self.out += data
        else:
            try:
                self.tls.write(data)
            except ssl.SSLError as exc:
                raise type(exc)(exc.errno, f"{exc.strerror} [TLS write after EOF={self.eof}, "
                                f"incoming {self.incoming.pending} bytes, eof "
                                f"{self.incoming.eof}, out {len(self.out)}]") from exc
            self._take_outgoing()

    def _flush(self):
        while self.out:
            readable, writable = self._wait(True, read=not self.eof)
            if writable:
                self._send_some()
            if readable:
                self._recv_some()

    def _half_close(self):
        if self.tls is not None:
            # unwrap() calls SSL_shutdown twice and the second call reads the
            # incoming BIO, failing on any application record there: keep
            # what has not been decrypted yet (at most a partial record,
            # `_tls_read` having run) out of its way.
            raw = self.incoming.read()
            try:
                self.tls.unwrap()           # close_notify; we do not wait for theirs
            except ssl.SSLWantReadError:
                pass
            if raw:
                self.incoming.write(raw)
            self._take_outgoing()
        self._flush()
        self.sock.shutdown(socket.SHUT_WR)

    def line(self):
        while b"\n" not in self.inbox:
            if self.eof:
                raise EOFError(f"EOF in the login, after {bytes(self.inbox)!r}")
            readable, _ = self._wait(False)
            if readable:
                self._recv_some()
        end = self.inbox.index(b"\n") + 1
        text = bytes(self.inbox[:end])
        del self.inbox[:end]
        return text

    # ---- the session

    def run(self):
        side = Side()
        started = time.monotonic()
        try:
            greeting = self.line()
            assert greeting.startswith(b"* OK"), greeting
            self._write(b"a LOGIN u%d %s\r\n" % (self.plan.index, PASSWORD))
            self._flush()
            while not (reply := self.line()).startswith(b"a "):
                pass
            assert reply == b"a OK done\r\n", reply
            self._relay(side)
        except Exception as exc:        # noqa: BLE001 - recorded, asserted by the test
            side.error = describe(exc)
        finally:
            self.sock.close()
        side.seconds = time.monotonic() - started
        return side

    def _relay(self, side):
        plan = self.plan
        head, tail = payload(plan.client_seed(), plan.client_size)
        sent, received = hashlib.sha256(), hashlib.sha256()
        parts = [head, tail]
        closed = False

        def consume():
            if self.inbox:
                received.update(self.inbox)
                side.received += len(self.inbox)
                self.inbox.clear()

        consume()           # what came with the login reply
        while not (closed and self.eof):
            # Refill: at most one chunk of raw output queued at a time.
            while not closed and len(self.out) < CHUNK:
                if parts and parts[0] is tail and plan.order == "backend-first" \
                        and not self.eof:
                    break                   # the tail waits for the backend's EOF
                if parts and parts[0] is tail and not side.eof_before_tail:
                    side.eof_before_tail = self.eof
                chunk = next(parts[0], None) if parts else None
                if chunk is None:
                    if parts:
                        parts.pop(0)
                        continue
                    self._half_close()
                    closed = True
                    break
                self._write(chunk)
                sent.update(chunk)
                side.sent += len(chunk)
            if closed and self.eof:
                break
            readable, writable = self._wait(bool(self.out), read=not self.eof)
            if writable:
                self._send_some()
            if readable:
                self._recv_some()
                consume()
        consume()
        side.sent_sha, side.received_sha = sent.hexdigest(), received.hexdigest()
        side.close_notify = self.close_notify


# ------------------------------------------------------------ running a batch

def run_sessions(port, session_plans, backend, context=None, timeout=SESSION_TIMEOUT):
    """All sessions at once; returns {index: client Side}."""
    results = {}
    start = threading.Barrier(len(session_plans))

    def one(plan):
        try:
            start.wait(IO_TIMEOUT)
            results[plan.index] = RelayClient(port, plan, context, timeout).run()
        except Exception as exc:        # noqa: BLE001
            results[plan.index] = Side(error=describe(exc))

    threads = [threading.Thread(target=one, args=(plan,), name=f"exact-client-{plan.index}",
                                daemon=True) for plan in session_plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + IO_TIMEOUT)
    wait_until(lambda: len(backend.results) >= len(session_plans), timeout=IO_TIMEOUT)
    return results


def problems(session_plans, clients, backend_results, tls):
    """Every mismatch, as readable lines (empty: all byte-exact)."""
    found = []
    for plan in session_plans:
        client = clients.get(plan.index)
        server = backend_results.get(plan.index)
        if client is None or server is None:
            found.append(f"session {plan.index}: no result (client {client}, backend {server})")
            continue
        if client.error or server.error:
            found.append(f"session {plan.index} ({plan.order}): client error {client.error!r}, "
                         f"backend error {server.error!r}; client {client}, backend {server}")
            continue
        # Each end hashed the bytes it handed to its socket as it went: the
        # other end's digest of what it read must be that one, and each
        # payload its planned size.
        links = [("client -> backend", client.sent, client.sent_sha, server.received,
                  server.received_sha, plan.client_size),
                 ("backend -> client", server.sent, server.sent_sha, client.received,
                  client.received_sha, plan.backend_size)]
        for what, sent, sent_sha, received, received_sha, size in links:
            if not sent == received == size or received_sha != sent_sha:
                found.append(f"session {plan.index} ({plan.order}): {what}: sent {sent} bytes "
                             f"sha256 {sent_sha[:16]}, received {received} bytes sha256 "
                             f"{received_sha[:16]}, planned {size} bytes")
        waiter = client if plan.order == "backend-first" else server
        if not waiter.eof_before_tail:
            found.append(f"session {plan.index} ({plan.order}): the order was not kept")
        if tls and client.close_notify is not True:
            found.append(f"session {plan.index}: the proxy's half-close was no close_notify")
    return found


def start_proxy(directory, auth_url, certs=None, level="info"):
    """The proxy under test; returns (proxy, plain port, TLS port or None)."""
    mail = f"auth_http {auth_url};\ntimeout 60s;\nproxy_timeout 60s;\n"
    body = "protocol imap;"
    tls_port = None
    if certs is not None:
        tls_port = free_port()
        mail += f"ssl_certificate {certs.rsa.cert};\nssl_certificate_key {certs.rsa.key};\n"
        body += f"\nlisten 127.0.0.1:{tls_port} ssl;"
    proxy = RunningProxy(directory, mail=mail, servers=(body,),
                         top=f"events {{ worker_connections {SESSIONS * 4 + 100}; }}",
                         level=level)
    return proxy, proxy.port, tls_port


# ------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def relay_proxy(tmp_path_factory, certs):
    """One proxy for the module, plain and TLS listeners, behind one auth
    service that sends every login to `backend_port[0]`."""
    target = {"port": None}
    with ScriptedAuthService() as auth:
        auth.reply = lambda request: ok(LOOPBACK, target["port"])
        proxy, plain, tls_port = start_proxy(tmp_path_factory.mktemp("relay-exact"),
                                             auth.url, certs)
        try:
            yield proxy, plain, tls_port, target
        finally:
            proxy.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("order", ORDERS)
def test_fifty_sessions_relay_byte_exact_with_half_close(relay_proxy, certs, tls, order):
    """50 concurrent sessions, 1-1.5 MB each way at once, half-closed in
    `order`: every byte arrives, on both ends (SHA-256), and the proxy's
    session threads all end afterwards."""
    proxy, plain, tls_port, target = relay_proxy
    session_plans = plans(SESSIONS, SIZE, (order,), run_seed=1 + ORDERS.index(order) + 2 * tls)
    with HashingBackend({plan.index: plan for plan in session_plans}) as backend:
        target["port"] = backend.port
        started = time.monotonic()
        clients = run_sessions(tls_port if tls else plain, session_plans, backend,
                               client_context(certs) if tls else None)
        seconds = time.monotonic() - started
        found = problems(session_plans, clients, dict(backend.results), tls)
    total = sum(p.client_size + p.backend_size for p in session_plans)
    print(f"{'tls' if tls else 'plain'} {order}: {len(session_plans)} sessions, "
          f"{total / 1e6:.0f} MB in {seconds:.1f}s ({total / 1e6 / seconds:.0f} MB/s)")
    assert not found, "\n".join(found[:20]) + f"\n({len(found)} problems)"
    assert wait_until(lambda: not proxy.session_threads(), timeout=THREADS_GONE), \
        f"session threads left: {[t.name for t in proxy.session_threads()]}"
