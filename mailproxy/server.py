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

import functools
import grp
import ipaddress
import logging
import os
import pwd
import resource
import signal
import socket
import socketserver
import stat
import threading
import time

from . import NGINX_COMPAT, __version__
from . import log as logmod
from . import threads, tls
from .ops import metrics, status
from .auth_http import AuthClient
from .imap import ImapSession
from .pop3 import Pop3Session
from .smtp import SmtpSession

SESSION_CLASSES = {"imap": ImapSession, "pop3": Pop3Session, "smtp": SmtpSession}
POLL_INTERVAL = 0.2         # how often serve_forever looks for shutdown()
UNIX_SOCKET_MODE = 0o666    # nginx's: the directory, not the socket, says who may connect
STALE_PROBE_TIMEOUT = 1.0   # a live unix: listener accepts a probe at once


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
        if _is_loopback(address):
            return
        with self.warned_lock:
            if address in self.warned:
                return
            self.warned.add(address)
        log.warning("passwords go to backend %s in clear text (no proxy_ssl or "
                    "proxy_starttls)", address)


@functools.lru_cache(maxsize=1024)
def _is_loopback(address):
    """Parsed once per backend address, not once per login."""
    return ipaddress.ip_address(address).is_loopback


class Listener(socketserver.TCPServer):
    """One listening socket, opened by `open_socket` (here, or in the master
    process before it forked us).  `routes` maps a local (host, port) to the
    (service, Listen entry) that serves it; `default` serves the rest."""

    def __init__(self, sock, entry, default, routes, worker):
        socketserver.BaseServer.__init__(self, (entry.host, entry.port), None)
        self.socket = sock
        # Every worker polls the same socket and all wake for one client; the
        # losers' accept() must fail (BlockingIOError, ignored by socketserver)
        # rather than block, or a worker told to stop would wait in accept().
        sock.setblocking(False)
        self.entry, self.default, self.routes, self.worker = entry, default, routes, worker

    def get_request(self):
        """accept(); a unix-domain peer's address is '' even when it bound
        its socket to a path: it is no client address (logs say "unix:")."""
        request, client_address = self.socket.accept()
        return request, "" if self.entry.family == socket.AF_UNIX else client_address

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
                                    _peer_host(client_address))
            self.worker.meter.dropped()
            self.shutdown_request(request)
            return
        job = threads.Job(self._serve, (request, client_address),
                          f"session {_peer(client_address)}", on_done=self.worker.finished)
        self.worker.started(job)
        self.worker.threads.run(job)

    def _serve(self, request, client_address):
        """The handler thread: run the session, then always close and count."""
        try:
            service, _ = self.route(request)
            service.session_class(request, client_address, self)
        except Exception:
            self.worker.log.exception("session crashed")
        finally:
            self.shutdown_request(request)

    def shutdown_request(self, request):
        """Close the client's socket.  socketserver shuts its sending side
        first, a system call per session that does nothing here: the FIN
        goes out with close() all the same, as nothing else holds the
        socket (no makefile(), no fork after accept), and a relay has
        already half-closed it."""
        self.close_request(request)

    def track(self, session):
        self.worker.track(session)

    def untrack(self, session):
        self.worker.untrack(session)


class Worker:
    """The listeners and sessions of this process, and how they stop.
    `meter` is this worker's block of the master's metrics table; a single
    process (no master) makes a table of its own and serves the status
    page from a thread."""

    def __init__(self, config, single=True, meter=None):
        self.config = config
        self.single = single            # no master: this process owns the pid file
        self.max_sessions = config.worker_connections
        self.lock = threading.RLock()   # guards the two sets below (session threads;
                                        # reentrant: a signal handler may take it too)
        self.jobs = set()               # the sessions running (threads.Job)
        self.threads = threads.Threads()    # reused for sessions and their relays
        self.sessions = set()
        self.listeners = []
        self.stopping = threading.Event()
        self.how = "quit"
        self.destinations, self.log, loggers = logmod.setup(config)
        logging.getLogger("urllib3").setLevel(logging.ERROR)   # pool chatter is not ours
        self.services = [Service(server, logger)
                         for server, logger in zip(config.servers, loggers)]
        self.table = self.status = None
        if single:
            self.table = metrics.Table(1)
            self.table.attach(0, os.getpid())
            meter = self.table.meter(0)
        self.meter = meter or metrics.Meter.unshared()

    # ------------------------------------------------------- sessions

    def admit(self):
        with self.lock:
            return len(self.jobs) < self.max_sessions

    def started(self, job):
        with self.lock:
            self.jobs.add(job)

    def finished(self, job):
        with self.lock:
            self.jobs.discard(job)

    def track(self, session):
        with self.lock:
            self.sessions.add(session)

    def untrack(self, session):
        with self.lock:
            self.sessions.discard(session)

    # ------------------------------------------------------ life cycle

    def open(self, sockets=None):
        """Serve `sockets` ({socket_key(entry): socket}, from the master), or
        bind every listening socket here (OSError names the address)."""
        plan = socket_plan(self.config)
        if sockets is None:
            sockets = open_sockets(plan)
        for entry, default, routes in plan:
            route = {key: (self.services[index], listen) for key, (index, listen) in
                     routes.items()}
            default = (self.services[default[0]], default[1])
            self.listeners.append(Listener(sockets[socket_key(entry)], entry, default,
                                           route, self))
        if self.single and self.config.status_listen:
            self.status = status.StatusServer(status.open_socket(self.config.status_listen),
                                              self.table)

    def serve(self):
        """Accept until a signal says stop; returns the exit status."""
        self.log.log(logmod.NOTICE, "mailproxy/%s (%s)", __version__, NGINX_COMPAT)
        for listener in self.listeners:
            threading.Thread(target=listener.serve_forever, args=(POLL_INTERVAL,),
                             name=f"listener {listener.entry.name}", daemon=True).start()
            self.log.log(logmod.NOTICE, "listening on %s", listener.entry.name)
        if self.status:
            threading.Thread(target=self.status.serve_forever, args=(POLL_INTERVAL,),
                             name="status", daemon=True).start()
            self.log.log(logmod.NOTICE, "status page on http://%s/",
                         self.config.status_listen.name)
        self._write_pid()
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
            sessions = list(self.sessions)
        for session in sessions:
            session.abort()

    def shutdown(self):
        """Stop accepting; on "stop" also cut every session; then wait for
        every session thread, so nothing is left running."""
        self.log.log(logmod.NOTICE, "%s: stopping", "gracefully" if self.how == "quit"
                     else "fast")
        for listener in self.listeners:
            listener.shutdown()         # returns once serve_forever has stopped
        self.close_listeners()
        if self.how == "quit" and self.config.shutdown_timeout:
            deadline = time.monotonic() + self.config.shutdown_timeout
            for job in list(self.jobs):
                job.join(max(0.0, deadline - time.monotonic()))
            if self.jobs:
                self.log.log(logmod.NOTICE, "shutdown timeout: closing %d sessions",
                             len(self.jobs))
                self.how = "stop"
        if self.how != "quit":
            self.abort_sessions()
        for job in list(self.jobs):
            job.join()
        self.threads.close()
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

    def _write_pid(self):
        if self.config.pid and self.single:
            with open(self.config.resolve(self.config.pid), "w") as file:
                file.write(f"{os.getpid()}\n")

    def _remove_pid(self):
        if self.config.pid and self.single:
            try:
                os.unlink(self.config.resolve(self.config.pid))
            except OSError:
                pass


def socket_plan(config):
    """[(Listen entry, default route, routes)] for the sockets to open, a
    route being (server index, Listen entry): a wildcard socket also serves
    the same port's specific addresses that do not ask for `bind` (nginx's
    rule, spec 1.2)."""
    entries = [(entry, index) for index, server in enumerate(config.servers)
               for entry in server.listens]
    wildcards = {(e.family, e.port): (e, i) for e, i in entries if e.wildcard}
    plan = {}
    for entry, index in entries:
        owner = wildcards.get((entry.family, entry.port))
        if owner and owner[0] is not entry and not entry.bind:
            plan.setdefault(owner[0], [(owner[1], owner[0]), {}])[1][
                (entry.host, entry.port)] = (index, entry)
        else:
            plan.setdefault(entry, [(index, entry), {}])
    return [(entry, default, routes) for entry, (default, routes) in plan.items()]


def socket_key(entry):
    """What makes two listening sockets the same one (reload reuses it)."""
    return (entry.family, entry.host, entry.port)


def open_sockets(plan, existing=None):
    """{socket_key: listening socket} for a plan, reusing `existing` ones
    (a reload keeps its ports open); OSError names the failing address."""
    sockets = {}
    for entry, _, _ in plan:
        key = socket_key(entry)
        if existing and key in existing:
            sockets[key] = existing[key]
            continue
        try:
            sockets[key] = open_socket(entry)
        except OSError as exc:
            for sock in sockets.values():
                if not existing or sock not in existing.values():
                    sock.close()
            raise OSError(exc.errno, f"bind() to {entry.name} failed "
                                     f"({exc.errno}: {exc.strerror})") from None
    return sockets


def open_socket(entry):
    """A listening socket with the `listen` parameters applied."""
    if entry.family == socket.AF_UNIX:
        _remove_stale_socket(entry.host)
    proto = socket.IPPROTO_MPTCP if entry.multipath else 0
    sock = socket.socket(entry.family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if entry.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(entry.ipv6only))
        if entry.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, entry.rcvbuf)
        if entry.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, entry.sndbuf)
        _set_keepalive(sock, entry.so_keepalive)
        if entry.family == socket.AF_UNIX:
            sock.bind(entry.host)
            os.chmod(entry.host, UNIX_SOCKET_MODE)
        else:
            sock.bind((entry.host, entry.port))
        sock.listen(entry.backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path):
    """A `listen unix:` path left behind by a process that died is removed,
    as nginx does.  Unlike nginx, a socket that still accepts (another
    running proxy) and a file that is not a socket are left alone, so
    bind() fails with "Address already in use", as on a busy port."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(STALE_PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        except OSError:
            pass


def remove_socket_file(key):
    """After a clean stop: a unix: listener's socket file goes (socket_key)."""
    family, path, _ = key
    if family != socket.AF_UNIX:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def close_sockets(sockets):
    """Close listening sockets ({socket_key: socket}) for good, their
    unix: socket files removed."""
    for key, sock in sockets.items():
        sock.close()
        remove_socket_file(key)


def _peer(address):
    """An accept() address as "host:port"; a unix-domain peer has none."""
    return f"{address[0]}:{address[1]}" if address else "unix:"


def _peer_host(address):
    return address[0] if address else "unix:"


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


def run_worker(config, sockets, meter=None):
    """A worker process under the master: set up as root (logs, keys,
    limits), then drop privileges, then serve the inherited sockets,
    counting into `meter` (its slot of the master's metrics table)."""
    if config.rlimit_nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (config.rlimit_nofile,) * 2)
    worker = Worker(config, single=False, meter=meter)
    drop_privileges(config.user)
    worker.open(sockets)
    worker.install_signals()
    return worker.serve()


def drop_privileges(user):
    """`user name [group];`: only root can, and must, give its rights away."""
    if user is None or os.geteuid() != 0:
        return
    name, group = user
    account = pwd.getpwnam(name)
    os.setgroups([])
    os.setgid(grp.getgrnam(group).gr_gid if group else account.pw_gid)
    os.setuid(account.pw_uid)


def run(config):
    """Open the listeners and serve until a signal; the process's exit status."""
    if config.rlimit_nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (config.rlimit_nofile,) * 2)
    worker = Worker(config)
    try:
        worker.open()
    except OSError as exc:
        worker.log.log(logmod.LEVELS["emerg"], "%s", exc.strerror)
        worker.destinations.close()
        return 1
    worker.install_signals()
    return worker.serve()

