"""Scripted peers for the misbehaviour tests: an auth service and a backend.

Real servers (see peers.py) behave well; these fakes misbehave on purpose,
one scripted reply or one scripted step at a time, so a test can show what
the proxy does with garbage, silence, a closed connection or a slow answer.
They are real TCP servers on 127.0.0.1, so the proxy talks to them exactly as
it talks to production peers.

* `ScriptedAuthService` is the HTTP auth service (nginx's auth_http
  protocol).  A test sets its reply and reads back every request it got,
  byte for byte.
* `ScriptedBackend` is an IMAP/POP3/SMTP backend that runs a script of
  steps on each connection (``send``, ``expect``, ``echo``, ``sink``...) and
  records every byte the proxy sent it.

Every connection runs in its own named thread, every read has a timeout and
every loop a bound, and ``close()`` (or leaving the ``with`` block) unblocks
and joins all threads, so a test that fails never leaves one behind.
"""

import hashlib
import http.server
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field

LOOPBACK = '127.0.0.1'

IO_TIMEOUT = 10.0           # seconds one backend read or write may block
KEEPALIVE_TIMEOUT = 60.0    # seconds the auth service keeps an idle connection
JOIN_TIMEOUT = 10.0         # seconds close() waits for each thread
ACCEPT_POLL = 0.05          # seconds between two checks for close() while accepting
WAIT_STEP = 0.01            # seconds between two checks of a wait_* helper
MAX_LINE = 65536            # longest request/header/script line read
MAX_HEADERS = 200           # header lines per HTTP request
MAX_BODY = 1024 * 1024      # request body bytes accepted (auth requests have none)
MAX_REQUESTS_PER_CONNECTION = 10000   # keep-alive requests on one connection
CHUNK = 65536               # bytes per read when echoing or sinking


class Hang:
    """Auth reply: say nothing for *seconds*, then close the connection."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __repr__(self):
        return f'Hang({self.seconds})'


class Trickle:
    """Auth reply: write *data* a byte at a time, *gap* seconds apart,
    then close (or stop when the proxy has gone)."""

    def __init__(self, data, gap):
        self.data, self.gap = data, gap

    def __repr__(self):
        return f'Trickle({len(self.data)} bytes, {self.gap}s apart)'


@dataclass
class AuthRequest:
    """One request as the auth service received it.

    ``raw`` holds the request line and header lines exactly as sent (CRLFs,
    order, case and spacing kept) up to and including the blank line;
    ``headers`` the same lines split into (name, value) pairs, in order.
    """
    raw: bytes
    method: str
    target: str
    version: str
    headers: list
    body: bytes = b''
    connection: int = 0         # serial number of the TCP connection

    def header(self, name, default=None):
        """The value of the first header called *name* (case-insensitive)."""
        wanted = name.lower()
        return next((v for n, v in self.headers if n.lower() == wanted), default)


def ok(server, port, **extra):
    """Success reply: send the client to *server*:*port*.

    Extra keyword arguments become headers, ``_`` turning into ``-``:
    ``ok('127.0.0.1', 143, Auth_Pass='x')`` adds ``Auth-Pass: x``.
    """
    return {'Auth-Status': 'OK', 'Auth-Server': server, 'Auth-Port': str(port),
            **_header_names(extra)}


def fail(message='Invalid login or password', wait=None, **extra):
    """Failure reply with *message*; *wait* adds ``Auth-Wait`` (seconds)."""
    reply = {'Auth-Status': message}
    if wait is not None:
        reply['Auth-Wait'] = str(wait)
    reply.update(_header_names(extra))
    return reply


def sequence(*replies):
    """A reply callable giving *replies* in turn, then repeating the last."""
    lock = threading.Lock()        # handler threads call it concurrently
    remaining = list(replies)

    def next_reply(request):
        with lock:
            return remaining.pop(0) if len(remaining) > 1 else remaining[0]
    return next_reply


class ScriptedAuthService:
    """An HTTP auth service whose reply each test chooses.

    ``reply`` may be:

    * a dict (or list of pairs) of headers: sent as ``200 OK``;
    * a tuple ``(status, headers)``, e.g. ``('503 Busy', {})``;
    * bytes: written verbatim, then the connection is closed (garbage,
      oversized or malformed headers, a reply without its blank line);
    * ``Hang(seconds)``: no reply at all, then close;
    * ``Trickle(data, gap)``: the bytes one at a time, then close;
    * a callable ``f(request) -> reply`` for sequences (see `sequence`).

    Header replies use the request's HTTP version and carry
    ``Content-Length: 0``: an HTTP/1.1 client (a requests.Session) keeps
    the connection and sends its next request on it; an HTTP/1.0 one
    (like nginx) gets ``HTTP/1.0`` and a close.  ``requests`` lists every
    request received, ``url`` is what the proxy's configuration needs.
    """

    def __init__(self, reply=None):
        self._lock = threading.Lock()     # guards reply and the records
        self._reply = reply if reply is not None else fail('no reply scripted')
        self._requests = []
        self._connections = 0
        self._closing = threading.Event()
        self._server = _AuthHTTPServer((LOOPBACK, 0), _AuthHandler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(ACCEPT_POLL,),
            name=f'fake-auth-{self.port}', daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def url(self):
        return f'http://{LOOPBACK}:{self.port}/auth'

    @property
    def reply(self):
        with self._lock:
            return self._reply

    @reply.setter
    def reply(self, reply):
        with self._lock:
            self._reply = reply

    @property
    def requests(self):
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def connections(self):
        """How many TCP connections were accepted (keep-alive shows here)."""
        with self._lock:
            return self._connections

    def wait_requests(self, count, timeout=5.0):
        """Wait until *count* requests arrived; return them all."""
        return _wait_for(lambda: len(self.requests) >= count, timeout,
                         f'{count} auth requests', lambda: self.requests)

    def close(self):
        """Stop serving, cut open connections, join every thread."""
        self._closing.set()
        _wake(self._server.socket)        # serve_forever's wait ends now, not at ACCEPT_POLL
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(JOIN_TIMEOUT)

    def _next_connection(self):
        with self._lock:
            self._connections += 1
            return self._connections

    def _record(self, request):
        with self._lock:
            self._requests.append(request)
            reply = self._reply
        return reply(request) if callable(reply) else reply


class _AuthHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with named, tracked, interruptible handler threads."""

    daemon_threads = True
    block_on_close = False           # close() joins the threads itself

    def __init__(self, address, handler, service):
        self.service = service
        self._handlers = _ConnectionThreads()
        super().__init__(address, handler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name; a fake needs none.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        self._handlers.start(request, f'fake-auth-conn-{client_address[1]}',
                             self.process_request_thread, (request, client_address))

    def server_close(self):
        super().server_close()
        self._handlers.close_all()


class _AuthHandler(socketserver.StreamRequestHandler):
    """Reads HTTP requests itself so that the raw bytes can be kept."""

    timeout = KEEPALIVE_TIMEOUT

    def handle(self):
        service = self.server.service
        connection = service._next_connection()
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            request = self._read_request(connection)
            if request is None:
                return
            if not self._send(service._record(request), request):
                return

    def _read_request(self, connection):
        try:
            request_line = self.rfile.readline(MAX_LINE)
            if not request_line.strip():
                return None
            lines = [request_line]
            for _ in range(MAX_HEADERS):
                line = self.rfile.readline(MAX_LINE)
                lines.append(line)
                if line in (b'\r\n', b'\n', b''):
                    break
            headers = [_split_header(line) for line in lines[1:] if line.strip()]
            request = _parse_request(b''.join(lines), request_line, headers, connection)
            length = min(int(request.header('Content-Length', '0') or 0), MAX_BODY)
            request.body = self.rfile.read(length) if length else b''
            return request
        except (OSError, ValueError):
            return None

    def _send(self, reply, request):
        """Write *reply*; True when the connection may carry another request."""
        closing = self.server.service._closing
        if isinstance(reply, Hang):
            closing.wait(reply.seconds)
            return False
        if isinstance(reply, Trickle):
            for byte in reply.data:
                if closing.wait(reply.gap):
                    return False
                try:
                    self.wfile.write(bytes((byte,)))
                except OSError:         # the proxy gave up on us
                    return False
            return False
        if isinstance(reply, bytes):
            self.wfile.write(reply)
            return False
        status, headers = reply if isinstance(reply, tuple) else ('200 OK', reply)
        keep_alive = (request.version == 'HTTP/1.1'
                      and (request.header('Connection') or '').lower() != 'close')
        self.wfile.write(_format_reply(request.version, status, headers, keep_alive))
        return keep_alive


# A backend that takes the LOGIN the proxy replays for joe/secret (spec
# 4.2, synchronizing literals: no LITERAL+ in the greeting), then echoes.
IMAP_LOGIN_THEN_ECHO = [
    ("send", b"* OK backend ready\r\n"), ("expect", b"a LOGIN {3}\r\n"),
    ("send", b"+ go\r\n"), ("expect", b"joe {6}\r\n"), ("send", b"+ go\r\n"),
    ("expect", b"secret\r\n"), ("send", b"a OK logged in\r\n"), ("echo",)]


@dataclass
class BackendConnection:
    """What one connection to a `ScriptedBackend` did.

    ``received`` is every byte the proxy sent, in order; ``reads`` what each
    ``expect``/``recv_line``/``recv`` step read; ``sink_size`` and
    ``sink_sha256`` what the ``sink`` step swallowed; ``error`` why the
    script stopped early (an ``expect`` mismatch, a timeout, EOF), or None.
    """
    index: int
    received: bytearray = field(default_factory=bytearray)
    reads: list = field(default_factory=list)
    sink_size: int = 0
    sink_sha256: str = None
    error: str = None
    done: threading.Event = field(default_factory=threading.Event)


class ScriptedBackend:
    """A TCP backend that plays a script on every connection.

    *script* is a list of steps, or a callable ``f(index) -> steps`` giving
    each connection (numbered from 0) its own.  Steps:

    ``('send', bytes)``      write the bytes;
    ``('expect', bytes)``    read a line (if the bytes end in LF) or as many
                             bytes as given, and stop with an error unless
                             they are equal;
    ``('expect_tagged', bytes)``  read an IMAP command line whose tag the
                             client chose (imaplib's are random): the rest
                             of the line must equal the bytes, the tag is
                             kept for ``send_tagged``;
    ``('send_tagged', bytes)``  write the kept tag, a space and the bytes;
    ``('recv_line',)``       read one line;
    ``('recv', n)``          read exactly n bytes;
    ``('sleep', seconds)``   wait (cut short by close());
    ``('echo',)``            send back everything read until EOF, then
                             half-close (relay tests);
    ``('sink',)``            read until EOF, keeping size and SHA-256;
    ``('close',)``           close the connection now (FIN);
    ``('reset',)``           close it with a TCP reset (RST).

    The connection is closed when the script ends.  ``connections[i]`` is
    the `BackendConnection` record of the i-th connection, ``received[i]``
    its bytes, ``errors`` every script error (tests assert it is empty).
    """

    def __init__(self, script, io_timeout=IO_TIMEOUT):
        self._script = script if callable(script) else (lambda index: script)
        if not callable(script):
            _check_script(script)
        self.io_timeout = io_timeout
        self._lock = threading.Lock()      # guards the connection records
        self._records = []
        self._closing = threading.Event()
        self._threads = _ConnectionThreads()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(ACCEPT_POLL)
        self.host, self.port = LOOPBACK, self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop,
                                          name=f'fake-backend-{self.port}', daemon=True)
        self._acceptor.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def connections(self):
        with self._lock:
            return list(self._records)

    @property
    def received(self):
        """The bytes received on each connection, in connection order."""
        return [bytes(record.received) for record in self.connections]

    @property
    def errors(self):
        return [f'connection {r.index}: {r.error}' for r in self.connections if r.error]

    def wait_connections(self, count, timeout=5.0, finished=True):
        """Wait until *count* connections came (and, if *finished*, ended).

        Returns the connection records; raises TimeoutError otherwise.
        """
        def ready():
            records = self.connections
            done = [r for r in records if r.done.is_set()] if finished else records
            return len(done) >= count
        return _wait_for(ready, timeout, f'{count} backend connections',
                         lambda: self.connections)

    def close(self):
        """Stop accepting, cut open connections, join every thread."""
        self._closing.set()
        _wake(self._listener)             # accept() fails now, not at ACCEPT_POLL
        self._acceptor.join(JOIN_TIMEOUT)
        self._listener.close()
        self._threads.close_all()

    def _accept_loop(self):
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                record = BackendConnection(len(self._records))
                self._records.append(record)
            self._threads.start(sock, f'fake-backend-{self.port}-conn-{record.index}',
                                self._serve, (sock, record))

    def _serve(self, sock, record):
        sock.settimeout(self.io_timeout)
        try:
            with sock, sock.makefile('rb') as reader:
                _ScriptRun(sock, reader, record, self._closing).run(self._script(record.index))
        finally:
            record.done.set()


class _ScriptRun:
    """Plays one script on one connection; a method per step, found by name."""

    def __init__(self, sock, reader, record, closing):
        self.sock, self.reader, self.record, self.closing = sock, reader, record, closing
        self.tag = b'*'             # the last expect_tagged's

    def run(self, steps):
        try:
            _check_script(steps)
            for step in steps:
                if STEPS[step[0]](self, *step[1:]) is False:
                    return
        except (OSError, ValueError, TypeError, EOFError) as exc:
            self.record.error = f'{type(exc).__name__}: {exc}'

    def step_send(self, data):
        self.sock.sendall(data)

    def step_expect(self, expected):
        got = self._read_line() if expected.endswith(b'\n') else self._read_exact(len(expected))
        if got != expected:
            self.record.error = f'expected {expected!r}, got {got!r}'
            return False

    def step_expect_tagged(self, expected):
        tag, _, rest = self._read_line().partition(b' ')
        self.tag = tag
        if rest != expected:
            self.record.error = f'expected {expected!r} after a tag, got {rest!r}'
            return False

    def step_send_tagged(self, data):
        self.sock.sendall(self.tag + b' ' + data)

    def step_recv_line(self):
        self._read_line()

    def step_recv(self, count):
        self._read_exact(count)

    def step_sleep(self, seconds):
        self.closing.wait(seconds)

    def step_echo(self):
        while data := self.reader.read1(CHUNK):
            self.record.received += data
            self.sock.sendall(data)
        self.sock.shutdown(socket.SHUT_WR)

    def step_sink(self):
        digest = hashlib.sha256()
        while data := self.reader.read1(CHUNK):
            self.record.received += data
            self.record.sink_size += len(data)
            digest.update(data)
        self.record.sink_sha256 = digest.hexdigest()

    def step_close(self):
        return False

    def step_reset(self):
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        return False

    def _read_line(self):
        line = self.reader.readline(MAX_LINE)
        self._keep(line)
        if not line.endswith(b'\n'):
            raise EOFError(f'connection ended inside a line: {line!r}')
        return line

    def _read_exact(self, count):
        data = self.reader.read(count)
        self._keep(data)
        if len(data) < count:
            raise EOFError(f'{count} bytes expected, connection ended after {data!r}')
        return data

    def _keep(self, data):
        self.record.received += data
        self.record.reads.append(data)


# Script verbs, built once: the name in a step selects the method.
STEPS = {name[len('step_'):]: method for name, method in vars(_ScriptRun).items()
         if name.startswith('step_')}


class _ConnectionThreads:
    """Named per-connection threads whose sockets close() can cut."""

    def __init__(self):
        self._lock = threading.Lock()      # accept thread adds, close() reads
        self._running = []

    def start(self, sock, name, target, args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._running = [(t, s) for t, s in self._running if t.is_alive()]
            self._running.append((thread, sock))
        thread.start()

    def close_all(self):
        """Shut every socket down (unblocking reads), then join its thread."""
        with self._lock:
            running = list(self._running)
        for _, sock in running:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread, _ in running:
            thread.join(JOIN_TIMEOUT)


def _check_script(steps):
    for step in steps:
        if step[0] not in STEPS:
            raise ValueError(f'unknown script step {step!r}; known: {sorted(STEPS)}')


def _header_names(extra):
    return {name.replace('_', '-'): str(value) for name, value in extra.items()}


def _split_header(line):
    name, _, value = line.decode('latin-1').rstrip('\r\n').partition(':')
    return name, value.strip(' \t')


def _parse_request(raw, request_line, headers, connection):
    parts = request_line.decode('latin-1').rstrip('\r\n').split(' ')
    method, target, version = (parts + ['', '', ''])[:3]
    return AuthRequest(raw, method, target, version, headers, b'', connection)


def _format_reply(version, status, headers, keep_alive):
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    names = {name.lower() for name, _ in pairs}
    if 'content-length' not in names:
        pairs.append(('Content-Length', '0'))
    if not keep_alive and 'connection' not in names:
        pairs.append(('Connection', 'close'))
    reply_version = 'HTTP/1.1' if version == 'HTTP/1.1' else 'HTTP/1.0'
    lines = [f'{reply_version} {status}'] + [f'{n}: {v}' for n, v in pairs]
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')


def _wake(listener):
    """Shut a listening socket down: on Linux a thread waiting in accept()
    or select() on it wakes at once (accept fails with EINVAL)."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _wait_for(condition, timeout, what, result):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return result()
        time.sleep(WAIT_STEP)
    raise TimeoutError(f'no {what} within {timeout}s')
