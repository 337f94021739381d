"""Listeners, the worker that owns them, signals and the pid file.

One `Listener` (a socketserver.TCPServer) per listening socket accepts
connections and hands each to a new, named, non-daemon thread, where the
server's session class (`ImapSession`, ...) runs the dialogue.  Several
`listen` lines may share a port: as in nginx, a specific address on a port
that also has a wildcard is served by the wildcard's socket (unless it says
`bind`), and the session's server is picked by the local address.

`Worker` is the running program: it opens the listeners, counts sessions
against `worker_connections`, and stops on signals the way nginx does:
SIGQUIT stops accepting and lets sessions finish; SIGTERM and SIGINT end
everything at once.
"""

import ipaddress
import logging
import os
import signal
import socket
import socketserver
import threading

from . import NGINX_COMPAT, __version__
from . import log as logmod
from . import tls
from .auth_http import AuthClient
from .imap import ImapSession
from .pop3 import Pop3Session
from .smtp import SmtpSession

SESSION_CLASSES = {"imap": ImapSession, "pop3": Pop3Session, "smtp": SmtpSession}
POLL_INTERVAL = 0.2         # how often serve_forever looks for shutdown()


class Service:
    """What every session of one `server {}` shares, read-only: its config,
    prebuilt reply texts, auth service client, logger and TLS contexts."""

    def __init__(self, config, logger):
        self.config = config
        self.logger = logger
        self.session_class = SESSION_CLASSES[config.protocol]
        self.texts = self.session_class.prepare(config)
        self.auth = AuthClient(config.auth_http, config.auth_http_timeout,
                               config.auth_http_header)
        needs_tls = config.starttls != "off" or any(e.ssl for e in config.listens)
        self.tls = tls.server_context(config) if needs_tls else None
        self.backend_tls = tls.BackendTls(config) \
            if config.proxy_ssl or config.proxy_starttls else None
        self.warned = set()             # backend addresses warned about; sessions add
        self.warned_lock = threading.Lock()

    def warn_clear_text(self, address, log):
        """Once per backend: passwords leave this machine unencrypted."""
        if ipaddress.ip_address(address).is_loopback:
            return
        with self.warned_lock:
            if address in self.warned:
                return
            self.warned.add(address)
        log.warning("passwords go to backend %s in clear text (no proxy_ssl or "
                    "proxy_starttls)", address)


class Listener(socketserver.TCPServer):
    """One listening socket.  `routes` maps a local (host, port) to the
    (service, Listen entry) that serves it; `default` serves the rest."""

    allow_reuse_address = True

    def __init__(self, entry, default, routes, worker):
        self.address_family = entry.family
        self.entry, self.default, self.routes, self.worker = entry, default, routes, worker
        self.request_queue_size = entry.backlog
        super().__init__((entry.host, entry.port), None, bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise

    def server_bind(self):
        entry, sock = self.entry, self.socket
        if entry.multipath:
            sock.close()
            self.socket = sock = socket.socket(entry.family, socket.SOCK_STREAM,
                                               socket.IPPROTO_MPTCP)
        if entry.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(entry.ipv6only))
        if entry.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, entry.rcvbuf)
        if entry.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, entry.sndbuf)
        _set_keepalive(sock, entry.so_keepalive)
        super().server_bind()

    def route(self, sock):
        """(service, Listen entry) for an accepted connection."""
        if not self.routes:
            return self.default
        try:
            local = sock.getsockname()[:2]
        except OSError:
            return self.default
        return self.routes.get(local, self.default)

    def process_request(self, request, client_address):
        if not self.worker.admit():
            self.worker.log.warning("%d worker_connections are not enough, closing "
                                    "connection from %s", self.worker.max_sessions,
                                    client_address[0])
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve, args=(request, client_address),
                                  name=f"session {client_address[0]}:{client_address[1]}")
        self.worker.started(thread)
        thread.start()

    def _serve(self, request, client_address):
        """The handler thread: run the session, then always close and count."""
        try:
            service, _ = self.route(request)
            service.session_class(request, client_address, self)
        except Exception:
            self.worker.log.exception("session crashed")
        finally:
            self.shutdown_request(request)
            self.worker.finished(threading.current_thread())

    def track(self, session):
        self.worker.track(session)

    def untrack(self, session):
        self.worker.untrack(session)


class Worker:
    """The listeners and sessions of this process, and how they stop."""

    def __init__(self, config):
        self.config = config
        self.max_sessions = config.worker_connections
        self.lock = threading.Lock()    # guards the two sets below (session threads)
        self.threads = set()
        self.sessions = set()
        self.listeners = []
        self.stopping = threading.Event()
        self.how = "quit"
        self.destinations, self.log, loggers = logmod.setup(config)
        logging.getLogger("urllib3").setLevel(logging.ERROR)   # pool chatter is not ours
        self.services = [Service(server, logger)
                         for server, logger in zip(config.servers, loggers)]

    # ------------------------------------------------------- sessions

    def admit(self):
        with self.lock:
            return len(self.threads) < self.max_sessions

    def started(self, thread):
        with self.lock:
            self.threads.add(thread)

    def finished(self, thread):
        with self.lock:
            self.threads.discard(thread)

    def track(self, session):
        with self.lock:
            self.sessions.add(session)

    def untrack(self, session):
        with self.lock:
            self.sessions.discard(session)

    # ------------------------------------------------------ life cycle

    def open(self):
        """Bind every listening socket (OSError names the address)."""
        for entry, default, routes in plan_sockets(self.services):
            try:
                self.listeners.append(Listener(entry, default, routes, self))
            except OSError as exc:
                self.close_listeners()
                raise OSError(exc.errno, f"bind() to {entry.name} failed "
                                         f"({exc.errno}: {exc.strerror})") from None

    def serve(self):
        """Accept until a signal says stop; returns the exit status."""
        self.log.log(logmod.NOTICE, "mailproxy/%s (%s)", __version__, NGINX_COMPAT)
        for listener in self.listeners:
            threading.Thread(target=listener.serve_forever, args=(POLL_INTERVAL,),
                             name=f"listener {listener.entry.name}", daemon=True).start()
            self.log.log(logmod.NOTICE, "listening on %s", listener.entry.name)
        self._write_pid()
        try:
            while not self.stopping.wait(POLL_INTERVAL):
                pass
        finally:
            self.shutdown()
        return 0

    def install_signals(self):
        signal.signal(signal.SIGQUIT, lambda *_: self.stop("quit"))
        signal.signal(signal.SIGTERM, lambda *_: self.stop("stop"))
        signal.signal(signal.SIGINT, lambda *_: self.stop("stop"))
        signal.signal(signal.SIGUSR1, lambda *_: self.destinations.reopen())
        signal.signal(signal.SIGHUP, lambda *_: self.log.warning(
            "reload is not implemented yet (it arrives with worker processes), "
            "SIGHUP ignored"))

    def stop(self, how):
        self.how = how
        self.stopping.set()

    def shutdown(self):
        """Stop accepting; on "stop" also cut every session; then wait for
        every session thread, so nothing is left running."""
        self.log.log(logmod.NOTICE, "%s: stopping", "gracefully" if self.how == "quit"
                     else "fast")
        for listener in self.listeners:
            listener.shutdown()         # returns once serve_forever has stopped
        self.close_listeners()
        if self.how != "quit":
            with self.lock:
                sessions = list(self.sessions)
            for session in sessions:
                session.abort()
        for thread in list(self.threads):
            thread.join()
        for service in self.services:
            service.auth.close()
        self._remove_pid()
        self.log.log(logmod.NOTICE, "exit")
        self.destinations.close()

    def close_listeners(self):
        for listener in self.listeners:
            listener.server_close()
        self.listeners = []

    def _write_pid(self):
        if self.config.pid:
            with open(self.config.resolve(self.config.pid), "w") as file:
                file.write(f"{os.getpid()}\n")

    def _remove_pid(self):
        if self.config.pid:
            try:
                os.unlink(self.config.resolve(self.config.pid))
            except OSError:
                pass


def plan_sockets(services):
    """[(Listen entry, default route, routes)] for the sockets to open: a
    wildcard socket also serves the same port's specific addresses that do
    not ask for `bind` (nginx's rule, spec 1.2)."""
    entries = [(entry, service) for service in services for entry in service.config.listens]
    wildcards = {(e.family, e.port): (e, s) for e, s in entries if e.wildcard}
    plan = {}
    for entry, service in entries:
        route = (service, entry)
        owner = wildcards.get((entry.family, entry.port))
        if owner and owner[0] is not entry and not entry.bind:
            plan.setdefault(owner[0], [(owner[1], owner[0]), {}])[1][
                (entry.host, entry.port)] = route
        else:
            plan.setdefault(entry, [route, {}])
    return [(entry, default, routes) for entry, (default, routes) in plan.items()]


def _set_keepalive(sock, setting):
    """`so_keepalive=on|off|idle:intvl:cnt` (Linux TCP_KEEP* options)."""
    if setting is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(bool(setting)))
    if isinstance(setting, tuple):
        idle, interval, count = setting
        for option, value in ((socket.TCP_KEEPIDLE, idle), (socket.TCP_KEEPINTVL, interval),
                              (socket.TCP_KEEPCNT, count)):
            if value is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, int(value))


def run(config):
    """Open the listeners and serve until a signal; the process's exit status."""
    worker = Worker(config)
    try:
        worker.open()
    except OSError as exc:
        worker.log.log(logmod.LEVELS["emerg"], "%s", exc.strerror)
        worker.destinations.close()
        return 1
    worker.install_signals()
    return worker.serve()

