"""The protocol-independent session: one client connection, accept to close.

`Session` is the socketserver request handler, as
`http.server.BaseHTTPRequestHandler` is: the listener makes one per accepted
connection, in its own handler thread, and `handle()` runs the whole
dialogue:

    greet -> read a command -> dispatch to do_<VERB> -> ...
          -> credentials -> login.py: auth service, backend, relay -> close

IMAP, POP3 and SMTP subclass it.  A subclass supplies its texts (greeting,
internal-error line), `read_command()` (its parser), the `do_<VERB>`
methods (found by name once, when the class is made), the `STATES` table of
which verbs are legal when, the `SECRETS` table of which arguments a trace
hides (words.Secret), and the hooks at the end of the class.  A
handler that has taken credentials returns them (sasl.Credentials); the
command loop then hands them to login.log_in(), and once that has logged
in to the backend, runs login.relay(); the handler itself never talks to
the auth service or the backend.

The shared machinery lives here: the `timeout` deadline for the pre-login
phase (set on the client Stream, which re-arms the socket's timeout with
what is left of it before every read and write, so a client that drips its
bytes gains no time; SECURITY.md lists the deadline of every phase), the
`max_errors` budget, the `max_commands` limit, SASL exchanges, STARTTLS,
and the single place where every exception becomes a log line and, if
still possible, a reply.

Handlers raise, they do not write error replies: `Rejected(reply)` for a
refused command, `InternalError` for a failure the client can only be told
about with the internal-error line.
"""

import logging
import socket
import socketserver
import ssl
import time

from . import login as login_step
from .auth_http import AuthServiceError
from .backend import BackendError
from .hello import read_client_hello
from .log import LogContext, SessionLog, hostport, printable, session_summary
from .ops import metrics, proxy_protocol, trace
from .sasl import EXCHANGES, make_salt
from .stream import ClientGone, Closed, Stream, TooLong
from .tls import TlsChannel
from .tls_certs import certificate_headers
from .tls_context import verify_outcome

QUIT_VERBS = frozenset({"LOGOUT", "QUIT"})     # the client's own goodbye
RELAY_READ = 65536          # bytes per relay read: see relay_buffers()


class Rejected(Exception):
    """A command is refused.  `reply` is sent; `counted` adds to max_errors
    (parser-level errors only, spec 3.0); `close` ends the session after."""

    def __init__(self, reply, counted=False, close=False):
        super().__init__(reply)
        self.reply, self.counted, self.close = reply, counted, close


class InternalError(Exception):
    """The client gets the internal-error line and the session ends."""


class Command:
    """A parsed client command: its tag (IMAP only), verb and arguments.
    `line` is the command as written up to its arguments or, with no
    `written`, the whole line; `written` holds the arguments as written
    (IMAP: quotes kept, a literal as `{N}`), for the trace."""

    __slots__ = ("tag", "verb", "args", "line", "written")

    def __init__(self, verb, args=(), tag=None, line=b"", written=None):
        self.tag, self.verb, self.args, self.line = tag, verb, list(args), line
        self.written = written

    def __repr__(self):         # never the arguments: they may be a password
        return f"<Command {self.verb} ({len(self.args)} args)>"


class Session(socketserver.BaseRequestHandler):
    """One client connection.  Subclasses set the class attributes below
    and define `read_command`, `greet`, the `do_<VERB>` handlers and the
    hooks (command_limit, invalid_reply, too_long_reply, too_many_reply,
    auth_failed_reply, continuation, sasl_syntax_reply, backend_login;
    back_to_start, auth_extra_headers and relay_buffers have defaults).
    `route` (server.Route) is the address the client came in on: its
    `listen` entry and its server{} blocks; `service` is the block's
    shared, read-only part (server.Service) that serves the session: the
    address's first, or the one the client's TLS server name picks
    (serve_as)."""

    protocol = ""
    INTERNAL_ERROR = b""
    NO_CERTIFICATE = b""            # ssl_verify_client on, and none was sent
    CERTIFICATE_ERROR = b""         # on or optional, and the certificate failed
    BLOCKED_BEFORE_TLS = frozenset()    # verbs `starttls only` refuses in clear text
    SECRETS = {}                    # verb -> words.Secret: what a trace hides
    STATES = {"start": ()}          # state -> verbs accepted in it
    needs_backend_password = True   # IMAP/POP3 must have a clear-text password
    handlers = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.handlers = {name[3:]: getattr(cls, name) for name in dir(cls)
                        if name.startswith("do_")}

    def __init__(self, request, client_address, listener, route):
        self.route, self.service, self.listen = route, route.default, route.listen
        super().__init__(request, client_address, listener)

    # ------------------------------------------------------------ frame

    def setup(self):
        self.config = self.service.config
        self.client = Stream(self.request)
        self.backend = None             # a Stream, once connected
        self.backend_socket = None      # held from before connect(), for abort()
        self.state = "start"
        self.errors = 0
        self.commands = 0               # command lines read before login (max_commands)
        self.attempt = 0                # logins asked about so far (Auth-Login-Attempt)
        self.quit = False
        self.auth_reply = None
        self.salt = b""
        self.proxy_header = None        # what a PROXY header said (ops/proxy_protocol.py)
        self.connected_to = None        # a trusted PROXY header's destination (server_address)
        client = self.client_address[0] if self.client_address else "unix:"
        self.meter = self.server.worker.meter      # the status page's counters
        self.context = LogContext(self.meter.connection(), client, self.listen.name)
        self.log = SessionLog(self.service.logger, self.context)
        self.started = time.monotonic()
        self.ending = None              # why it ended: one of log.REASONS
        self.stopped = False            # cut by a fast stop
        self.relayed = (0, 0)           # bytes the relay moved from / to the client
        self.tracer = trace.Tracer(self.config.trace, self.protocol, self.log,
                                   lambda: self.context.client) if self.config.trace else None
        if self.tracer:
            self.client = self.tracer.client_stream(self.client)
        if self.request.family != socket.AF_UNIX:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.phase = metrics.GREETING
        self.meter.opened(self.protocol)
        self.server.worker.track(self)

    def finish(self):
        self.meter.closed(self.protocol, self.phase)
        self.server.worker.untrack(self)
        if self.backend_socket:
            self.backend_socket.close()
        if self.client.secure:
            self.client.sock.close()    # marks the TLS session resumable, then closes

    def handle(self):
        """The funnel: every way a session can end is logged here, once,
        then summed up in one line (log.session_summary)."""
        self.log.info("client %s connected to %s", _peer(self.client_address),
                      self.context.server)
        try:
            self.run()
            self.ended("invalid")   # unnamed: a broken PROXY header, an early talker
        except (Closed, ClientGone):
            self.ended("client")
            self.log.info("client closed connection")
        except TimeoutError:
            self.ended("timeout")
            self.log.info("client timed out")
        except TooLong as exc:
            self.ended("invalid")
            self.log.info("client sent too long command")
            self.send_quietly(self.too_long_reply(exc.head))
        except ssl.SSLError as exc:
            self.ended("tls")
            self.log.info("SSL error with the client (%s)", exc.reason or exc)
        except (InternalError, AuthServiceError, BackendError) as exc:
            self.ended("backend" if isinstance(exc, BackendError) else "error")
            self.log.log(getattr(exc, "level", logging.ERROR), "%s", exc)
            self.send_quietly(self.INTERNAL_ERROR)
        except OSError as exc:
            self.ended("error")
            self.log.info("%s", exc.strerror or exc)
        except Exception:
            self.ended("error")
            self.log.exception("unexpected error")
            self.send_quietly(self.INTERNAL_ERROR)
        if self.tracer:     # a command left half read is ***; the replies after it
            self.tracer.refused()
        if self.log.isEnabledFor(logging.INFO):    # the summary is worth skipping
            self.log.info("session done: %s", self.summary())

    def ended(self, reason):
        """Name why the session ends (log.REASONS); the first name stays."""
        if self.ending is None:
            self.ending = reason

    def summary(self):
        """The closing line's fields; the bytes count both phases."""
        client = hostport(*self.client_address[:2]) if self.client_address else "unix:"
        tls = self.client.sock.version if self.client.secure else None
        return session_summary(client, self.protocol, self.context.login,
                               self.context.upstream, tls,
                               self.client.received + self.relayed[0],
                               self.client.sent + self.relayed[1],
                               time.monotonic() - self.started,
                               "stop" if self.stopped else self.ending)

    def run(self):
        self.client.set_deadline(self.config.timeout)
        if self.listen.proxy_protocol and not self.read_proxy_header():
            return                  # a broken header: closed without a reply (spec 5.6)
        if self.listen.ssl:
            self.start_tls()
        if not self.quit:
            self.greet()
        if self.logged_in():
            self.auth_reply = None      # the relay needs nothing of the login
            login_step.relay(self)

    def logged_in(self):
        """Commands until a login succeeds (True) or the session ends.  A
        method of its own, so that the credentials, and the auth service's
        question and answer, go with its frame before the relay blocks for
        the session's life (memory, and no password kept that long)."""
        while not self.quit:
            credentials = self.next_command()
            if credentials is not None and login_step.log_in(self, credentials):
                return True
        return False

    def next_command(self):
        """Read and run one command; the credentials it took, if any."""
        self.commands += 1
        try:
            command = self.read_command()
            self.log.debug("client command %s in %s state", command.verb, self.state)
            handler = self.handlers.get(command.verb)
            if self.tracer:
                self.tracer.command(command, self.SECRETS.get(command.verb), bool(handler))
            if self.commands > self.config.max_commands:
                raise Rejected(self.too_many_reply(command), close=True)
            if handler is None:
                raise Rejected(self.invalid_reply(command), counted=True)
            if command.verb not in self.STATES[self.state]:
                raise Rejected(self.invalid_reply(command))
            if command.verb in self.BLOCKED_BEFORE_TLS and self.tls_mode == "only":
                raise Rejected(self.invalid_reply(command))
            credentials = handler(self, command)
            if self.quit and command.verb in QUIT_VERBS:
                self.ended("quit")
            return credentials
        except Rejected as exc:
            if self.tracer:
                self.tracer.refused()   # the parser's: nothing is pending after a handler's
            self.reject(exc)
            return None

    def reject(self, exc):
        """Send a refusal; count it if the parser refused (max_errors).
        Past `max_commands` (freenginx) every refusal ends the session, the
        parser's own included."""
        if exc.counted:
            self.errors += 1
        self.state = "start"
        self.send(exc.reply)
        if self.commands > self.config.max_commands:
            self.log.info("client sent too many commands")
            self.ended("invalid")
            self.quit = True
        elif exc.close:
            self.ended("invalid")
            self.quit = True
        elif exc.counted and self.errors >= self.config.max_errors:
            self.log.info("client sent too many invalid commands")
            self.ended("invalid")
            self.quit = True

    def send(self, data):
        self.client.write(data)

    def send_quietly(self, data):
        """A last word before closing; the client may already be gone, or
        have stopped reading.  After the auth step the client has no
        deadline: the word gets a fresh `timeout`, as nginx's
        ngx_mail_send() arms one for a blocked write."""
        if self.client.deadline is None:
            self.client.set_deadline(self.config.timeout)
        try:
            self.client.write(data)
        except (OSError, Closed, TimeoutError):
            pass

    def abort(self):
        """Called from another thread (fast stop): end this session now.
        Shutting the sockets down wakes any read, write or connect in
        progress; a request to the auth service, which watches the client
        socket, sees it closed (stream.ClientGone)."""
        self.stopped = True
        for sock in (self.request, self.backend_socket):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def read_proxy_header(self):
        """`listen ... proxy_protocol`: the balancer's header comes before
        anything else.  False after a broken one (logged)."""
        self.set_step("reading PROXY protocol")
        try:
            header = proxy_protocol.receive(self.request, self.client.deadline)
        except proxy_protocol.BrokenHeader as exc:
            self.log.error("broken header: %s", exc)
            return False
        if header is not None:
            self.log.debug("PROXY protocol src: %s %d, dst: %s %d", header.source,
                           header.source_port, header.destination, header.destination_port)
        self.set_step("in auth state")
        self.proxy_header = header
        self.connected_to = proxy_protocol.real_server(header, self.client_address,
                                                       self.config.set_real_ip_from)
        self.client_address = proxy_protocol.real_client(header, self.client_address,
                                                         self.config.set_real_ip_from)
        if self.client_address:
            self.context.client = self.client_address[0]
        return True

    # ----------------------------------------------------- for the logs

    @property
    def client_text(self):
        """The client's address as logs and the auth service see it."""
        return self.context.client

    @property
    def server_address(self):
        """The (address, port) the client connected to, for the auth
        service (Server-IP) and proxy_client_address: a trusted PROXY
        header's destination, as Client-IP is its source; else the
        listening socket's; None on a unix-domain listener."""
        if self.connected_to:
            return self.connected_to
        local = self.request.getsockname()
        return local[:2] if isinstance(local, tuple) else None

    def set_login(self, login):
        """The login the logs name (bytes; None: none yet)."""
        self.context.login = None if login is None else printable(login)

    def set_step(self, text):
        """What the session does now ("while <step>" in its log lines)."""
        if text != self.context.step:
            self.log.debug("%s", text)
        self.context.step = text

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
        self.set_step("SSL handshaking")
        service, hello = self.service, b""
        if self.route.shared:
            hello, name = read_client_hello(self.request, self.client.deadline)
            service = self.route.pick(name)
        self.client.start_tls(TlsChannel(self.request, service.tls, server_side=True,
                                         received=hello))
        if service is not self.service:
            self.serve_as(service)
        self.set_step("in auth state")
        self.state = "start"
        channel = self.client.sock
        self.log.debug("SSL handshake done: %s, %s", channel.version, channel.cipher)
        verdict, problem, _ = verify_outcome(channel, self.config.ssl_verify_client)
        if verdict is None:
            return
        self.log.info("%s", problem or "client sent no required SSL certificate")
        if problem:
            channel.keep_session = False    # as nginx: a refused session is not resumed
        self.ended("tls")
        self.send(self.CERTIFICATE_ERROR if problem else self.NO_CERTIFICATE)
        self.quit = True

    def serve_as(self, service):
        """The client's TLS server name picked another server{} of the
        address: its whole configuration serves the session from now on,
        with its `timeout` counted from the connection's start.  (After
        STARTTLS the client has seen the first server's greeting only; it
        must ask for the capabilities again, RFC 3501 6.2.1, RFC 2595 4,
        RFC 3207 4.2.)"""
        self.service, self.config = service, service.config
        self.log = SessionLog(service.logger, self.context)
        if self.tracer:
            self.tracer.log = self.log
        self.log.debug("the TLS server name picks the server at %s", self.config.where)
        self.client.set_deadline(max(0.0, self.config.timeout -
                                     (time.monotonic() - self.started)))

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

    def sasl(self, mechanism, initial, limit):
        """Run a SASL exchange; the `continuation(challenge)` hook makes the
        protocol's `+ ...` or `334 ...` line.  Returns Credentials; raises
        SaslError."""
        exchange = EXCHANGES[mechanism](initial, self.salt)
        failed = True
        if self.tracer:
            self.tracer.sasl(True)
        try:
            challenge = next(exchange)
            while True:
                self.send(self.continuation(challenge))
                challenge = exchange.send(self.client.readline(limit))
        except StopIteration as done:
            failed = False
            return done.value
        finally:
            if self.tracer:
                self.tracer.sasl(False, failed)

    def new_salt(self):
        """The session's one salt (spec 2.2), made on first use."""
        if not self.salt:
            self.salt = make_salt(self.config.server_name)
        return self.salt

    # ------------------------------------------- what subclasses define

    def command_limit(self):
        """The client command buffer size: the longest command accepted."""
        raise NotImplementedError

    def continuation(self, challenge):
        """The line that sends a SASL challenge (base64 text) to the client."""
        raise NotImplementedError

    def sasl_syntax_reply(self):
        """The reply to a SASL answer that is not base64, after the auth
        service's Auth-Error-SASL challenge (login.py)."""
        raise NotImplementedError

    def back_to_start(self):
        """After a refused login with Auth-Wait: start over (spec 2.5).
        Subclasses also forget what they collected for the attempt."""
        self.state = "start"

    def auth_extra_headers(self):
        """Protocol-specific request headers (SMTP adds Client-Host)."""
        return ()

    def relay_buffers(self):
        """Read sizes for the relay (client->backend, backend->client).
        nginx relays through its command buffer and `proxy_buffer` (4 KB);
        reading up to RELAY_READ at a time instead cuts the system calls per
        megabyte sixteenfold, and costs idle sessions nothing, since relay.py
        keeps no buffer between reads, nor while it waits for the next
        (docs/differences.md)."""
        return (max(self.command_limit(), RELAY_READ), max(self.config.proxy_buffer, RELAY_READ))


def _peer(address):
    return f"{address[0]}:{address[1]}" if address else "unix:"
