"""The protocol-independent session: one client connection, accept to close.

`Session` is the socketserver request handler, as
`http.server.BaseHTTPRequestHandler` is: the listener makes one per accepted
connection, in its own thread, and `handle()` runs the whole dialogue:

    greet -> read a command -> dispatch to do_<VERB> -> ... -> authenticate
          -> ask the auth service -> log in to the backend -> relay -> close

IMAP, POP3 and SMTP subclass it.  A subclass supplies its texts (greeting,
internal-error line), `read_command()` (its parser), the `do_<VERB>` methods
(found by name once, when the class is made), the `STATES` table of which
verbs are legal when, and `backend_login()`.  The shared machinery lives
here: the `timeout` deadline for the pre-login phase, the `max_errors`
budget, SASL exchanges, Auth-Wait and WAIT handling, and the single place
where every exception becomes a log line and, if still possible, a reply.

Handlers raise, they do not write error replies: `Rejected(reply)` for a
refused command, `InternalError` for a failure the client can only be told
about with the internal-error line.
"""

import functools
import itertools
import logging
import socket
import ssl
import socketserver
import threading
import time

from . import backend as backend_mod
from .ops import metrics
from .ops import proxy_protocol
from .ops import trace
from .auth_http import AuthRequest, AuthServiceError
from .backend import BackendError
from .log import SessionLog, session_summary
from .relay import Relay
from .sasl import EXCHANGES, make_salt
from .stream import Closed, Stream, TooLong
from .tls import TlsChannel, certificate_headers

QUIT_VERBS = frozenset({"LOGOUT", "QUIT"})     # the client's own goodbye
RELAY_READ = 65536          # bytes per relay read: see relay_buffers()
MAX_WAIT_RETRIES = 10       # `Auth-Status: WAIT` answers in a row before we give up
                            # (nginx loops for ever; its docs suggest 10-20 attempts)
_connections = itertools.count(1)   # nginx's connection number, "*N" in logs


class Rejected(Exception):
    """A command is refused.  `reply` is sent; `counted` adds to max_errors
    (parser-level errors only, spec 3.0); `close` ends the session after."""

    def __init__(self, reply, counted=False, close=False):
        super().__init__(reply)
        self.reply, self.counted, self.close = reply, counted, close


class InternalError(Exception):
    """The client gets the internal-error line and the session ends."""


class Command:
    """A parsed client command: its tag (IMAP only), verb and arguments."""

    __slots__ = ("tag", "verb", "args", "line")

    def __init__(self, verb, args=(), tag=None, line=b""):
        self.tag, self.verb, self.args, self.line = tag, verb, list(args), line

    def __repr__(self):         # never the arguments: they may be a password
        return f"<Command {self.verb} ({len(self.args)} args)>"


class Session(socketserver.BaseRequestHandler):
    """One client connection.  Subclasses set the class attributes below
    and define `read_command`, `greet`, the `do_<VERB>` handlers,
    `auth_failed_reply` and `backend_login`."""

    protocol = ""
    INTERNAL_ERROR = b""
    NO_CERTIFICATE = b""            # ssl_verify_client on, and none was sent
    BLOCKED_BEFORE_TLS = frozenset()    # verbs `starttls only` refuses in clear text
    STATES = {"start": ()}          # state -> verbs accepted in it
    needs_backend_password = True   # IMAP/POP3 must have a clear-text password
    proxy_header = None             # what a PROXY header said (proxy_protocol.py)
    handlers = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.handlers = {name[3:]: getattr(cls, name) for name in dir(cls)
                        if name.startswith("do_")}

    # ------------------------------------------------------------ frame

    def setup(self):
        self.service, self.listen = self.server.route(self.request)
        self.server_text = self.listen.name
        self.config = self.service.config
        self.conn = next(_connections)
        self.request.setblocking(False)     # for good: stream.py does the waiting
        self.client = Stream(self.request)
        self.backend = None
        self.state = "start"
        self.errors = 0
        self.attempt = 0
        self.quit = False
        self.auth_reply = None
        self.salt = b""
        self.step = "in auth state"
        self.login = None
        self.upstream_text = ""
        self.client_text = self.client_address[0] if self.client_address else "unix:"
        self.log = SessionLog(self.service.logger, self)
        self.started = time.monotonic()
        self.ending = None              # why it ended: one of log.REASONS
        self.stopped = False            # cut by a fast stop
        self.relayed = (0, 0)           # bytes the relay moved from / to the client
        self.tracer = trace.for_session(self)       # None unless `trace` is set
        if self.tracer:
            self.client = self.tracer.client_stream(self.client)
        if self.request.family != socket.AF_UNIX:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.thread_id = threading.get_ident()
        self.server.track(self)
        self.meter = self.server.worker.meter      # the status page's counters
        self.phase = metrics.GREETING
        self.meter.opened(self.protocol)

    def finish(self):
        self.meter.closed(self.protocol, self.phase)
        self.server.untrack(self)
        if self.backend:
            self.backend.sock.close()

    def handle(self):
        """The funnel: every way a session can end is logged here, once,
        then summed up in one line (log.session_summary)."""
        self.log.info("client %s connected to %s", _peer(self.client_address),
                      self.server_text)
        try:
            self.run()
            self.ended("invalid")   # unnamed: a broken PROXY header, an early talker
        except Closed:
            self.ended("client")
            self.log.info("client closed connection")
        except TimeoutError:
            self.ended("timeout")
            self.log.info("client timed out")
        except TooLong as exc:
            self.ended("invalid")
            self.log.info("client sent too long command")
            self._send_quietly(self.too_long_reply(exc.head))
        except ssl.SSLError as exc:
            self.ended("tls")
            self.log.info("SSL error with the client (%s)", exc.reason or exc)
        except (InternalError, AuthServiceError, BackendError) as exc:
            self.ended("backend" if isinstance(exc, BackendError) else "error")
            self.log.error("%s", exc)
            self._send_quietly(self.INTERNAL_ERROR)
        except OSError as exc:
            self.ended("error")
            self.log.info("%s", exc.strerror or exc)
        except Exception:
            self.ended("error")
            self.log.exception("unexpected error")
            self._send_quietly(self.INTERNAL_ERROR)
        if self.log.isEnabledFor(logging.INFO):    # the summary is worth skipping
            self.log.info("session done: %s", self.summary())

    def ended(self, reason):
        """Name why the session ends (log.REASONS); the first name stays."""
        if self.ending is None:
            self.ending = reason

    def summary(self):
        """The closing line's fields; the bytes count both phases."""
        client = _hostport(*self.client_address[:2]) if self.client_address else "unix:"
        tls = self.client.sock.version if self.client.secure else None
        return session_summary(client, self.protocol, self.login_text, self.upstream_text,
                               tls, self.client.received + self.relayed[0],
                               self.client.sent + self.relayed[1],
                               time.monotonic() - self.started,
                               "stop" if self.stopped else self.ending)

    def run(self):
        self.client.set_deadline(self.config.timeout)
        if self.listen.proxy_protocol and not proxy_protocol.receive(self):
            return                  # a broken header: closed without a reply (spec 5.6)
        if self.listen.ssl:
            self.start_tls()
        if not self.quit:
            self.greet()
        while not self.quit:
            self.next_command()

    def next_command(self):
        try:
            command = self.read_command()
            handler = self.handlers.get(command.verb)
            if handler is None:
                raise Rejected(self.invalid_reply(command), counted=True)
            if command.verb not in self.STATES[self.state]:
                raise Rejected(self.invalid_reply(command))
            if command.verb in self.BLOCKED_BEFORE_TLS and self.tls_mode == "only":
                raise Rejected(self.invalid_reply(command))
            handler(self, command)
            if self.quit and command.verb in QUIT_VERBS:
                self.ended("quit")
        except Rejected as exc:
            self.reject(exc)

    def reject(self, exc):
        """Send a refusal; count it if the parser refused (max_errors)."""
        if exc.counted:
            self.errors += 1
        self.state = "start"
        self.send(exc.reply)
        if exc.close:
            self.ended("invalid")
            self.quit = True
        elif exc.counted and self.errors >= self.config.max_errors:
            self.log.info("client sent too many invalid commands")
            self.ended("invalid")
            self.quit = True

    def send(self, data):
        self.client.write(data)

    def _send_quietly(self, data):
        """A last word before closing; the client may already be gone."""
        try:
            self.client.write(data)
        except (OSError, Closed, TimeoutError):
            pass

    def abort(self):
        """Called from another thread (fast stop): end this session now."""
        self.stopped = True
        for sock in (self.request, self.backend.sock if self.backend else None):
            sock = getattr(sock, "sock", sock)      # the socket under a TlsChannel
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.service.auth.abort(self.thread_id)

    # ----------------------------------------------------- for the logs

    @property
    def login_text(self):
        """The login as logs show it: printable, never a control byte."""
        if self.login is None:
            return None
        text = self.login[:256].decode("utf-8", "backslashreplace")
        return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)

    def set_step(self, text):
        self.step = text

    def enter(self, phase):
        """Move to another phase (metrics.PHASES) on the status page."""
        self.meter.moved(self.protocol, self.phase, phase)
        self.phase = phase

    # ------------------------------------------------------------- TLS

    @property
    def tls_mode(self):
        """"tls" once the client connection is encrypted, else the
        `starttls` setting: "off", "on" or "only" (spec 3.0, 5)."""
        return "tls" if self.client.secure else self.config.starttls

    def starttls_allowed(self):
        return self.tls_mode in ("on", "only")

    def start_tls(self):
        """Handshake with the client (implicit TLS, or after STARTTLS) under
        the `timeout` deadline, then check its certificate (spec 5.3).
        The command loop then starts again; there is no new greeting."""
        self.step = "SSL handshaking"
        self.client.start_tls(TlsChannel(self.request, self.service.tls, server_side=True))
        self.step = "in auth state"
        self.state = "start"
        channel = self.client.sock
        self.log.debug("SSL handshake done: %s, %s", channel.version, channel.cipher)
        if self.config.ssl_verify_client == "on" and not channel.peer_certificate():
            self.log.info("client sent no required SSL certificate")
            self.ended("tls")
            self.send(self.NO_CERTIFICATE)
            self.quit = True

    def upgrade(self, command, reply):
        """STARTTLS/STLS: refused (not counted) unless allowed; else the OK
        `reply`, then the handshake (spec 3.0)."""
        if not self.starttls_allowed():
            raise Rejected(self.invalid_reply(command))
        self.send(reply)
        self.start_tls()

    def tls_headers(self):
        """Auth-SSL-* request headers (spec 2.2), for TLS clients only."""
        if not self.client.secure:
            return ()
        return tuple(certificate_headers(self.client.sock, self.config.ssl_verify_client,
                                         self.config.auth_http_pass_client_cert))

    # ---------------------------------------------------------- SASL

    def sasl(self, mechanism, initial, continuation, limit):
        """Run a SASL exchange; `continuation(challenge)` makes the protocol's
        `+ ...` or `334 ...` line.  Returns Credentials; raises SaslError."""
        exchange = EXCHANGES[mechanism](initial, self.salt)
        try:
            challenge = next(exchange)
            while True:
                self.send(continuation(challenge))
                challenge = exchange.send(self.client.readline(limit))
        except StopIteration as done:
            return done.value

    def new_salt(self):
        """The session's one salt (spec 2.2), made on first use."""
        if not self.salt:
            self.salt = make_salt(self.config.server_name)
        return self.salt

    # ------------------------------------------------ authentication

    def authenticate(self, credentials):
        """Ask the auth service; on success log in to the backend and relay.
        On a refusal the client gets the error; with Auth-Wait the session
        goes back to the start state, as nginx does."""
        self.attempt += 1
        self.login = credentials.login
        if self.tracer:
            self.tracer.login(credentials.login)
        self.step = "in http auth state"
        self.enter(metrics.AUTH_SERVICE)
        self.client.set_deadline(None)
        reply = self.auth_reply = self.ask_auth_service(credentials)
        if not reply.ok:
            self.refused(reply)
            return
        self.proxy(credentials, reply)

    def auth_request(self, credentials):
        return AuthRequest(method=credentials.method, login=credentials.login,
                           password=credentials.password, salt=credentials.salt,
                           protocol=self.protocol, attempt=self.attempt,
                           client_ip=self.client_text,
                           extra=proxy_protocol.auth_headers(self.proxy_header,
                                                             self.auth_extra_headers())
                           + self.tls_headers())

    def auth_extra_headers(self):
        """Protocol-specific request headers (SMTP adds Client-Host)."""
        return ()

    def ask_auth_service(self, credentials):
        """The auth service's answer, asking again (same attempt number)
        while it says WAIT, at most MAX_WAIT_RETRIES times."""
        request = self.auth_request(credentials)
        reply = self.ask_once(request)
        for _ in range(MAX_WAIT_RETRIES):
            if not reply.retry:
                return reply
            self.log.info("auth http server asked to wait %ss", reply.wait)
            self.client.wait(reply.wait, self.command_limit())
            reply = self.ask_once(request)
        if reply.retry:
            raise AuthServiceError(f"auth http server answered WAIT {MAX_WAIT_RETRIES + 1} times")
        return reply

    def ask_once(self, request):
        """One auth service round trip, timed and counted for the status page."""
        started = time.monotonic()
        try:
            reply = self.service.auth.ask(request)
        except AuthServiceError:
            self.meter.auth(self.protocol, metrics.ERROR, time.monotonic() - started)
            raise
        self.meter.auth(self.protocol, metrics.auth_result(reply), time.monotonic() - started)
        return reply

    def refused(self, reply):
        self.log.info('client login failed: "%s"', reply.status)
        if not reply.wait:
            self.ended("auth")
            self.send(self.auth_failed_reply(reply))
            self.quit = True
            return
        self.client.wait(reply.wait, self.command_limit())
        self.send(self.auth_failed_reply(reply))
        self.back_to_start()
        self.step = "in auth state"
        self.enter(metrics.GREETING)
        self.client.set_deadline(self.config.timeout)

    def back_to_start(self):
        """After a refused login with Auth-Wait: start over (spec 2.5).
        Subclasses also forget what they collected for the attempt."""
        self.state = "start"

    def proxy(self, credentials, reply):
        """Log in to the backend the auth service chose, then relay."""
        login = reply.user if reply.user is not None else credentials.login
        clear_text = credentials.password if credentials.method == "plain" else b""
        password = reply.password if reply.password is not None else clear_text
        if self.needs_backend_password and not password:
            raise AuthServiceError("auth http server did not send password")
        self.login = login
        self.upstream_text = _hostport(reply.server, reply.port)
        self.step = "connecting to upstream"
        self.enter(metrics.BACKEND_LOGIN)
        tls = self.service.backend_tls
        try:
            self.backend = backend_mod.connect(reply.server, reply.port, self.config.timeout,
                                               tls, proxy_protocol.outgoing(self))
        except BackendError:
            self.meter.backend_error(self.protocol)
            raise
        if self.tracer:
            self.backend = self.tracer.backend_stream(self.backend)
        starttls = None         # proxy_starttls: the backend login upgrades first
        if tls and not tls.implicit:
            starttls = functools.partial(backend_mod.start_tls, self.backend, tls, reply.server)
        elif not tls:
            self.service.warn_clear_text(reply.server, self.log)
        try:
            final = self.backend_login(self.backend, login, password, starttls)
        except BackendError as exc:
            self.backend_failed(exc)
            return
        self.send(final + self.backend.take_buffer())
        self.relay()

    def backend_failed(self, exc):
        """proxy_pass_error_message: show the backend's refusal verbatim."""
        if exc.reply and self.config.proxy_pass_error_message:
            self.log.error("%s", exc)
            self._send_quietly(exc.reply)
            self.ended("backend")
            self.quit = True
            return
        raise exc

    def relay(self):
        self.step = "proxying"
        self.enter(metrics.RELAY)
        self.log.info("client logged in, proxying to %s", self.upstream_text)
        relay = Relay(self.client.sock, self.backend.sock, self.config.proxy_timeout,
                      linger=self.config.timeout, buffers=self.relay_buffers(),
                      name=f"session-{self.conn}", threads=self.server.worker.threads)
        leftover = self.client.take_buffer()        # already counted as received
        outcome = relay.run(leftover)
        self.meter.relayed(self.protocol, outcome.client_bytes, outcome.backend_bytes)
        self.quit = True
        self.relayed = (max(0, outcome.client_bytes - len(leftover)), outcome.backend_bytes)
        self.ended(outcome.closed_by or "error")
        if self.tracer:
            self.tracer.relayed(outcome.client_bytes, outcome.backend_bytes)

    # ------------------------------------------- what subclasses define

    def command_limit(self):
        """The client command buffer size: the longest command accepted."""
        raise NotImplementedError

    def relay_buffers(self):
        """Read sizes for the relay (client->backend, backend->client).
        nginx relays through its command buffer and `proxy_buffer` (4 KB);
        reading up to RELAY_READ at a time instead cuts the system calls per
        megabyte sixteenfold, and costs idle sessions nothing, since relay.py
        keeps no buffer between reads (docs/differences.md)."""
        return (max(self.command_limit(), RELAY_READ), max(self.config.proxy_buffer, RELAY_READ))


def _peer(address):
    return f"{address[0]}:{address[1]}" if address else "unix:"


def _hostport(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
