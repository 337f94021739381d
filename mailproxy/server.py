"""Listeners, the worker that owns them, signals and the pid file.

One `Listener` per listening socket is a `socketserver.ThreadingMixIn` +
`TCPServer` (what `socketserver.ThreadingTCPServer` is): its
serve_forever() loop accepts connections and starts one handler thread per
connection, named after the client, in which the server's session class
(`ImapSession`, ...) runs the whole dialogue.  Several `listen` lines may
share a port: as in nginx, a specific address on a port that also has a
wildcard is served by the wildcard's socket (unless it says `bind`), and
the session's address is picked, once, by the local address; several
servers on one address are told apart by the client's TLS server name
(a `Route`, names.py).

`Worker` is the running program: it opens the listeners, counts sessions
against `worker_connections`, keeps the registry of running sessions, and
stops on signals the way nginx does: SIGQUIT stops accepting and lets
sessions finish (for at most `shutdown_timeout`); SIGTERM and SIGINT end
everything at once.
"""

import errno
import functools
import grp
import ipaddress
import os
import pwd
import resource
import signal
import socket
import socketserver
import threading
import time

from . import NGINX_COMPAT, __version__
from . import log as logmod
from . import tls_context
from .auth_http import AuthClient
from .imap import ImapSession
from .listening import open_sockets, remove_socket_file, socket_key, socket_plan
from .names import NameTable, server_names
from .ops import metrics, status
from .pop3 import Pop3Session
from .smtp import SmtpSession

SESSION_CLASSES = {"imap": ImapSession, "pop3": Pop3Session, "smtp": SmtpSession}
POLL_INTERVAL = 0.2         # how often serve_forever looks for shutdown()
ACCEPT_PAUSE = 0.5          # seconds a listener stops accepting when out of fds
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
STOP_GRACE = 0.5            # a fast stop waits this long for the cut sessions to log
                            # their end; one still connecting to the auth service
                            # (its own timeout) ends with the process


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
        self.tls = tls_context.server_context(config) if tls_context.needs_tls(config) \
            else None
        self.backend_tls = tls_context.BackendTls(config) \
            if config.proxy_ssl or config.proxy_starttls else None
        self.warned = set()             # backend addresses warned about; sessions add
        self.warned_lock = threading.Lock()

    def warn_clear_text(self, address, log):
        """Once per backend: passwords leave this machine unencrypted."""
        if _is_loopback(address):
            return
        with self.warned_lock:
            if address in self.warned:
                return
            self.warned.add(address)
        log.warning("passwords go to backend %s in clear text (no proxy_ssl or "
                    "proxy_starttls)", address)


class Route:
    """The server{} blocks on one listening address: `default` (the first)
    serves a client until its TLS server name picks another (names.py).
    `shared` is False for the usual address of one block, whose sessions
    then never look at the name."""

    def __init__(self, services, listen):
        self.default, self.listen = services[0], listen
        self.shared = len(services) > 1
        self.names = NameTable()
        for service in services:
            for name in server_names(service.config):
                self.names.add(name, service)

    def pick(self, name):
        """The Service for a client's TLS server name (None: it sent none)."""
        return self.names.pick(name, self.default)


@functools.lru_cache(maxsize=1024)
def _is_loopback(address):
    """Parsed once per backend address, not once per login."""
    return ipaddress.ip_address(address).is_loopback


class Listener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """One listening socket, opened by listening.open_socket() (in this
    process, or in the master process before it forked us).  `routes` maps
    a local (host, port) to the Route (the services and Listen entry) that
    serves it; `default` serves the rest.

    Handler threads are daemon threads (`daemon_threads`), and
    server_close() does not wait for them (`block_on_close` off): the
    Worker's session registry is what waits for sessions, so that a
    graceful stop can give up after `shutdown_timeout` and a fast stop
    after cutting every session, rather than waiting for ever.  A thread
    left behind then (one waiting on the auth service) ends with the
    process."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock, entry, default, routes, worker):
        socketserver.BaseServer.__init__(self, (entry.host, entry.port), None)
        self.socket = sock
        # Every worker polls the same socket and all wake for one client; the
        # losers' accept() must fail (BlockingIOError, ignored by socketserver)
        # rather than block, or a worker told to stop would wait in accept().
        # Only the listening socket: an accepted one is blocking (accept4()
        # does not pass O_NONBLOCK on).
        sock.setblocking(False)
        self.entry, self.default, self.routes, self.worker = entry, default, routes, worker

    def get_request(self):
        """accept(); a unix-domain peer's address is '' even when it bound
        its socket to a path: it is no client address (logs say "unix:").
        Out of descriptors or memory, the error is logged at `crit` (nginx's
        words) and this listener pauses ACCEPT_PAUSE: socketserver drops the
        OSError and polls again, and the client still waiting in the backlog
        would wake it at once, for ever."""
        try:
            request, client_address = self.socket.accept()
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:
                self.worker.log.critical("accept4() failed (%d: %s)", exc.errno, exc.strerror)
                time.sleep(ACCEPT_PAUSE)
            raise
        return request, "" if self.entry.family == socket.AF_UNIX else client_address

    def process_request(self, request, client_address):
        """In the listener's thread: admit the connection (worker_connections),
        then start its handler thread (ThreadingMixIn)."""
        if not self.worker.admit():
            self.worker.log.warning("%d worker_connections are not enough, closing "
                                    "connection from %s", self.worker.max_sessions,
                                    _peer_host(client_address))
            self.worker.meter.dropped()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:           # no thread to be had: the session is over
            self.worker.release()
            raise

    def process_request_thread(self, request, client_address):
        """The handler thread: the session, then always close and count."""
        threading.current_thread().name = f"session {_peer(client_address)}"
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.worker.release()

    def finish_request(self, request, client_address):
        """Route once, by the local address, and run a session of that
        address's first server (a TLS server name may pick another one of
        the route's servers later, in the session: names.py)."""
        route = self.route(request)
        route.default.session_class(request, client_address, self, route)

    def route(self, sock):
        """The Route for an accepted connection."""
        if not self.routes:
            return self.default
        try:
            local = sock.getsockname()[:2]
        except OSError:
            return self.default
        return self.routes.get(local, self.default)

    def handle_error(self, request, client_address):
        """A session raised past its own funnel (a bug): log it, go on."""
        self.worker.log.exception("session crashed")


class Worker:
    """The listeners and sessions of this process, and how they stop.
    `meter` is this worker's block of the master's metrics table; a single
    process (no master) makes a table of its own and serves the status
    page from a thread."""

    def __init__(self, config, single=True, meter=None):
        self.config = config
        self.single = single            # no master: this process owns the pid file
        self.max_sessions = config.worker_connections
        # Guards `active` and `sessions`, which the listeners' and the
        # sessions' threads change; reentrant: a signal handler may take it too.
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)     # `active` went down
        self.active = 0                 # sessions admitted and not yet ended
        self.sessions = set()           # the running sessions (Session objects)
        self.cutting = False            # a fast stop is under way: abort newcomers too
        self.listeners = []
        self.stopping = threading.Event()
        self.how = "quit"
        self.destinations, self.log, loggers = logmod.setup(config)
        self.services = [Service(server, logger)
                         for server, logger in zip(config.servers, loggers)]
        self.table = self.status = None
        if single:
            self.table = metrics.Table.private()
            self.table.attach(0, os.getpid())
            meter = self.table.meter(0)
        self.meter = meter

    # ------------------------------------------------------- sessions

    def admit(self):
        """Count one more session, if worker_connections allows it."""
        with self.lock:
            if self.active >= self.max_sessions:
                return False
            self.active += 1
            return True

    def release(self):
        """A session's thread is done with it."""
        with self.changed:
            self.active -= 1
            self.changed.notify_all()

    def track(self, session):
        with self.lock:
            self.sessions.add(session)
            cut = self.cutting
        if cut:
            session.abort()

    def untrack(self, session):
        with self.lock:
            self.sessions.discard(session)

    def wait_for_sessions(self, timeout=None):
        """Wait until every admitted session has ended (at most `timeout`
        seconds); False if some still run."""
        with self.changed:
            return self.changed.wait_for(lambda: self.active == 0, timeout)

    # ------------------------------------------------------ life cycle

    def open(self, sockets=None):
        """Serve `sockets` ({socket_key(entry): socket}, from the master), or
        bind every listening socket here (OSError names the address)."""
        plan = socket_plan(self.config)
        if sockets is None:
            sockets = open_sockets(plan)
        for entry, default, routes in plan:
            route = {key: self._route(*value) for key, value in routes.items()}
            self.listeners.append(Listener(sockets[socket_key(entry)], entry,
                                           self._route(*default), route, self))
        if self.single and self.config.status_listen:
            self.status = status.StatusServer(status.open_socket(self.config.status_listen),
                                              self.table)

    def _route(self, indexes, listen):
        return Route([self.services[index] for index in indexes], listen)

    def serve(self):
        """Accept until a signal says stop; returns the exit status."""
        self.log.log(logmod.NOTICE, "mailproxy/%s (%s)", __version__, NGINX_COMPAT)
        if self.single and not write_pid(self.config, self.log):
            return self.give_up()       # before any accept: no client was served
        for listener in self.listeners:
            threading.Thread(target=listener.serve_forever, args=(POLL_INTERVAL,),
                             name=f"listener {listener.entry.name}", daemon=True).start()
            self.log.log(logmod.NOTICE, "listening on %s", listener.entry.name)
        if self.status:
            threading.Thread(target=self.status.serve_forever, args=(POLL_INTERVAL,),
                             name="status", daemon=True).start()
            self.log.log(logmod.NOTICE, "status page on http://%s/",
                         self.config.status_listen.name)
        try:
            self.meter.set_threads(threading.active_count())
            while not self.stopping.wait(POLL_INTERVAL):
                self.meter.set_threads(threading.active_count())
        finally:
            self.shutdown()
        return 0

    def install_signals(self):
        signal.signal(signal.SIGQUIT, lambda *_: self.stop("quit"))
        signal.signal(signal.SIGTERM, lambda *_: self.stop("stop"))
        signal.signal(signal.SIGINT, lambda *_: self.stop("stop"))
        signal.signal(signal.SIGUSR1, lambda *_: self.destinations.reopen())
        signal.signal(signal.SIGHUP, lambda *_: self.log.warning(
            "SIGHUP ignored: reload is done by a master process "
            "(worker_processes 2 or more)"))

    def stop(self, how):
        """Called from a signal handler.  A fast stop that arrives during a
        graceful one cuts the remaining sessions at once."""
        if self.stopping.is_set() and how == "stop":
            self.how = "stop"
            self.abort_sessions()
            return
        self.how = how
        self.stopping.set()

    def abort_sessions(self):
        with self.lock:
            self.cutting = True
            sessions = list(self.sessions)
        for session in sessions:
            session.abort()

    def shutdown(self):
        """Stop accepting; on "stop" also cut every session; then wait for
        the sessions to end: all of them on "quit" (or until
        shutdown_timeout, then cut the rest), and STOP_GRACE after a cut."""
        self.log.log(logmod.NOTICE, "%s: stopping", "gracefully" if self.how == "quit"
                     else "fast")
        for listener in self.listeners:
            listener.shutdown()         # returns once serve_forever has stopped
        self.close_listeners()
        if self.how == "quit" and self.config.shutdown_timeout and \
                not self.wait_for_sessions(self.config.shutdown_timeout):
            self.log.log(logmod.NOTICE, "shutdown timeout: closing %d sessions",
                         self.active)
            self.how = "stop"
        if self.how == "quit":
            self.wait_for_sessions()
        else:
            self.abort_sessions()
            self.wait_for_sessions(STOP_GRACE)
        for service in self.services:
            service.auth.close()
        if self.status:
            self.status.shutdown()
            self.status.server_close()
        self._remove_pid()
        self.log.log(logmod.NOTICE, "exit")
        self.destinations.close()

    def close_listeners(self):
        for listener in self.listeners:
            listener.server_close()
            if self.single:             # under a master, the master owns the socket files
                remove_socket_file(socket_key(listener.entry))
        self.listeners = []

    def give_up(self):
        """Close what open() opened, before serving; exit status 1."""
        self.close_listeners()
        if self.status:
            self.status.server_close()
        self.destinations.close()
        return 1

    def _remove_pid(self):
        if self.config.pid and self.single:
            try:
                os.unlink(self.config.resolve(self.config.pid))
            except OSError:
                pass


def write_pid(config, log):
    """Write this process's pid to `pid`'s file, if there is one.  False,
    after nginx's [emerg] line, if it cannot: -t opened the file, but its
    folder may have gone since."""
    if not config.pid:
        return True
    path = config.resolve(config.pid)
    try:
        with open(path, "w") as file:
            file.write(f"{os.getpid()}\n")
    except OSError as exc:
        log.log(logmod.LEVELS["emerg"], 'open() "%s" failed (%d: %s)', path, exc.errno,
                exc.strerror)
        return False
    return True


def _peer(address):
    """An accept() address as "host:port"; a unix-domain peer has none."""
    return f"{address[0]}:{address[1]}" if address else "unix:"


def _peer_host(address):
    return address[0] if address else "unix:"


def run_worker(config, sockets, meter):
    """A worker process under the master: set up as root (logs, keys,
    limits), then drop privileges, then serve the inherited sockets,
    counting into `meter` (its slot of the master's metrics table)."""
    worker = Worker(config, single=False, meter=meter)
    set_rlimit_nofile(config.rlimit_nofile, worker.log)
    drop_privileges(config.user)
    worker.open(sockets)
    worker.install_signals()
    return worker.serve()


def worker_uid(user):
    """The uid the workers run as (`user`), or None when they keep ours."""
    if user is None or os.geteuid() != 0:
        return None
    return pwd.getpwnam(user[0]).pw_uid


def set_rlimit_nofile(limit, log):
    """`worker_rlimit_nofile N;`: the kernel may refuse N (above the hard
    limit without the rights, or above fs.nr_open); as nginx's worker, log
    it and carry on with the limit there is."""
    if not limit:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (ValueError, OSError, OverflowError) as exc:
        errno = getattr(exc, "errno", None) or 1
        log.log(logmod.LEVELS["alert"], "setrlimit(RLIMIT_NOFILE, %d) failed (%d: %s)", limit,
                errno, os.strerror(errno))


def drop_privileges(user):
    """`user name [group];`: only root can, and must, give its rights away:
    the group, the user's supplementary groups (initgroups, as nginx),
    then the user."""
    if user is None or os.geteuid() != 0:
        return
    name, group = user
    account = pwd.getpwnam(name)
    gid = grp.getgrnam(group).gr_gid if group else account.pw_gid
    os.setgid(gid)
    os.initgroups(name, gid)
    os.setuid(account.pw_uid)


def run(config):
    """Open the listeners and serve until a signal; the process's exit status."""
    worker = Worker(config)
    set_rlimit_nofile(config.rlimit_nofile, worker.log)
    try:
        worker.open()
    except OSError as exc:
        worker.log.log(logmod.LEVELS["emerg"], "%s", exc.strerror)
        worker.destinations.close()
        return 1
    worker.install_signals()
    return worker.serve()

