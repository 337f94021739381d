"""The master process: worker processes, reload, and nginx's signals.

With `worker_processes N` (N > 1) the program is a master and N workers, as
nginx is.  The master opens the listening sockets (so ports below 1024 need
privilege only here), forks the workers, and never serves a connection:

    master:  open sockets -> fork N workers -> wait for signals
    worker:  drop privileges -> threaded listeners on the inherited sockets

Each worker is a whole `server.Worker` (threads, sessions, auth client),
and all of them accept on the same sockets, so the GIL is spread across
cores.  The master answers signals one at a time, synchronously
(`sigtimedwait`; nothing runs inside a signal handler):

    SIGHUP   reload: read the config again; if it is broken, log why and
             keep the old workers; else fork new workers with it (reusing
             the open sockets) and tell the old ones to quit gracefully, so
             a session in relay keeps flowing until it ends
    SIGQUIT  graceful stop: workers stop accepting and finish their sessions
    SIGTERM, SIGINT  fast stop
    SIGUSR1  reopen log files (here and in every worker)
    SIGCHLD  a worker died: log it, and start another in its place

With `status_listen`, the master also forks a status process that serves
the status page (status.py), restarted like a worker if it dies.  The
counters it shows live in memory the master maps before its first fork;
each worker is given one block of it, its *slot* (metrics.py).

`worker_processes 1` needs none of this: server.run() serves in-process,
unless the process was started as root with `user` (`needed()`): then, as
nginx always does, a master and one worker, so that sessions never run as
root while the master keeps the rights to reopen logs for the worker user,
remove the pid file and reload.
"""

import os
import signal
import time

from .. import NGINX_COMPAT, __version__, log as logmod
from ..config import ConfigError
from ..listening import close_sockets, open_sockets, socket_plan
from ..server import drop_privileges, run_worker, worker_uid, write_pid
from ..tls_context import prepare as prepare_tls
from . import metrics
from .status import open_socket as open_status_socket, serve_process as serve_status

HANDLED = {signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
           signal.SIGCHLD}
# The status process ignores what the master passes on to workers: an
# operator's `kill -HUP` to every process leaves the page up.  SIGTERM and
# SIGINT end it (the master sends SIGTERM when the page moves or stops).
STATUS_IGNORES = (signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT)
TICK = 1.0                  # seconds between looks at the children when no signal comes
RESPAWN_PAUSE = 1.0         # a worker that dies at once is not restarted in a tight loop


def needed(config):
    """Does this configuration run as a master and workers?  With more
    than one worker; and with one, if it must give up root for `user`."""
    return config.worker_processes > 1 or bool(worker_uid(config.user))


class Master:
    """The master process.  `reload_config()` returns a new Config or
    raises ConfigError (it re-reads the same file with the same -p/-g)."""

    def __init__(self, config, reload_config):
        self.config = config
        self.reload_config = reload_config
        self.sockets = {}
        self.workers = {}           # pid -> the Config it serves
        self.table = None           # metrics.Table, mapped before the first fork
        self.slots = {}             # worker pid -> its slot in the table
        self.status_socket = None   # status_listen's socket, while it is on
        self.status_pid = None      # the status process serving it
        self.status_leaving = set()     # status processes told to stop, not yet reaped
        self.last_status_spawn = 0.0
        self.stopping = None        # None, "quit" or "stop"
        self.last_spawn = 0.0
        self.destinations, self.log, _ = logmod.setup(config)

    # --------------------------------------------------------------- run

    def run(self):
        """Serve until told to stop; the exit status."""
        try:
            self.sockets = open_sockets(socket_plan(self.config))
            if self.config.status_listen:
                self.status_socket = open_status_socket(self.config.status_listen)
        except OSError as exc:
            self.log.log(logmod.LEVELS["emerg"], "%s", exc.strerror)
            return self.give_up()
        if not write_pid(self.config, self.log):
            return self.give_up()
        self.log.log(logmod.NOTICE, "mailproxy/%s (%s)", __version__, NGINX_COMPAT)
        self.log.log(logmod.NOTICE, "master process %d, %d worker processes", os.getpid(),
                     self.config.worker_processes)
        self.original_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        self.table = metrics.Table.shared(metrics.slots_for(self.config.worker_processes))
        try:
            self.spawn(self.config.worker_processes)
            if self.status_socket:
                self.start_status()
            self.loop()
        finally:
            self._remove_pid()
            close_sockets(self.sockets)
            self.stop_status()
            self.log.log(logmod.NOTICE, "exit")
            self.destinations.close()
        return 0

    def give_up(self):
        """Close what run() opened before it failed to start; exit status 1."""
        close_sockets(self.sockets)
        if self.status_socket:
            self.status_socket.close()
        self.destinations.close()
        return 1

    def loop(self):
        while self.workers or self.status_pid or self.status_leaving or not self.stopping:
            info = signal.sigtimedwait(HANDLED, TICK)
            self.reap()
            if self.stopping and not self.workers:
                self.stop_status()      # it showed the workers draining; now it goes too
            if info is not None and info.si_signo != signal.SIGCHLD:
                self.on_signal(info.si_signo)

    def on_signal(self, signo):
        if signo == signal.SIGHUP and not self.stopping:
            self.reload()
        elif signo == signal.SIGQUIT:
            self.stop("quit", signal.SIGQUIT)
        elif signo in (signal.SIGTERM, signal.SIGINT):
            self.stop("stop", signal.SIGTERM)
        elif signo == signal.SIGUSR1:
            self.log.log(logmod.NOTICE, "reopening logs")
            self.destinations.reopen(owner=worker_uid(self.config.user))
            self.signal_workers(signal.SIGUSR1)

    def stop(self, how, signo):
        self.log.log(logmod.NOTICE, "%s: stopping workers", "gracefully" if how == "quit"
                     else "fast")
        self.stopping = how
        self.mark_draining()
        self.signal_workers(signo)
        close_sockets(self.sockets)     # no new connections wait in our backlog
        self.sockets = {}

    # ----------------------------------------------------------- workers

    def spawn(self, count, config=None):
        config = config or self.config
        prepare_tls(config)     # here, before fork: the workers share one ticket key
        for _ in range(count):
            slot = self.table.take(self.slots.values())     # grows the table if need be
            pid = os.fork()
            if pid == 0:
                self._become_worker(config, slot)   # never returns
            self.workers[pid] = config
            self.slots[pid] = slot
            self.table.attach(slot, pid)
            self.log.log(logmod.NOTICE, "start worker process %d", pid)
        self.last_spawn = time.monotonic()

    def _become_worker(self, config, slot):
        """In the child: the signals back to normal, then serve."""
        status = 1
        try:
            self._leave_master()
            if self.status_socket:
                self.status_socket.close()      # the status process's, not ours
            status = run_worker(config, self.sockets, self.table.meter(slot))
        except BaseException:           # the child must never return into the master's code
            self.log.exception("worker process failed")
        finally:
            os._exit(status)

    def _leave_master(self, ignore=()):
        """In a new child: the master's logs closed, the signals as they
        were, but those in `ignore` ignored.  The dispositions are set
        before the mask is lifted, so a signal that comes in between finds
        the child's own."""
        self.destinations.close()
        for signo in HANDLED:
            signal.signal(signo, signal.SIG_IGN if signo in ignore else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.original_mask)

    def reap(self):
        """Collect dead children; start another for a current worker that
        died while we were not stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.status_exited(pid, code):
                continue
            config = self.workers.pop(pid, None)
            if pid in self.slots:
                self.table.release(self.slots.pop(pid))     # counters stay, gauges go
            if config is self.config and not self.stopping:
                self.log.log(logmod.LEVELS["alert"], "worker process %d exited with code %d, "
                             "starting a new one", pid, code)
                if time.monotonic() - self.last_spawn < RESPAWN_PAUSE:
                    time.sleep(RESPAWN_PAUSE)
                self.spawn(1)
            else:
                self.log.log(logmod.NOTICE, "worker process %d exited with code %d", pid, code)

    def mark_draining(self, only=None):
        """The status page shows these workers as finishing their sessions."""
        for pid, config in self.workers.items():
            if pid in self.slots and (only is None or config is only):
                self.table.set_state(self.slots[pid], metrics.DRAINING)

    def signal_workers(self, signo, only=None):
        for pid, config in list(self.workers.items()):
            if only is None or config is only:
                try:
                    os.kill(pid, signo)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------ reload

    def reload(self):
        """SIGHUP: new workers with the new config, old ones quit gracefully."""
        self.log.log(logmod.NOTICE, "reconfiguring")
        status_socket, destinations, sockets = self.status_socket, None, {}
        try:
            config = self.reload_config()
            if config.status_listen != self.config.status_listen and config.status_listen:
                status_socket = open_status_socket(config.status_listen)
            destinations, log, _ = logmod.setup(config)     # every log file opens, or no reload
            sockets = open_sockets(socket_plan(config), existing=self.sockets)
            old_pid_file = self._move_pid_file(config)
        except (ConfigError, OSError) as exc:
            if destinations:
                destinations.close()
            if status_socket is not self.status_socket:
                status_socket.close()
            close_sockets({key: sock for key, sock in sockets.items()
                           if key not in self.sockets})
            self.log.error("reload failed, keeping the old configuration: %s", _why(exc))
            return
        old = self.config
        close_sockets({key: sock for key, sock in self.sockets.items()
                       if key not in sockets})      # the old workers keep their own copies
        self.config, self.sockets = config, sockets
        self.destinations.close()
        self.destinations, self.log = destinations, log
        for warning in config.warnings:     # the [warn] lines -t prints
            self.log.warning("%s", warning)
        if config.status_listen != old.status_listen:
            self.stop_status()
            self.status_socket = status_socket if config.status_listen else None
            if self.status_socket:
                self.start_status()
        if old_pid_file:
            _unlink(old_pid_file)
        self.spawn(config.worker_processes)
        self.mark_draining(only=old)
        self.signal_workers(signal.SIGQUIT, only=old)

    # --------------------------------------------------- status process

    def start_status(self):
        """Fork the process that serves `status_listen`.  Not a thread of
        ours: the master forks, and a process that forks must stay
        single-threaded."""
        pid = os.fork()
        if pid == 0:
            self._become_status()       # never returns
        self.status_pid = pid
        self.last_status_spawn = time.monotonic()
        self.log.log(logmod.NOTICE, "start status process %d on http://%s/", pid,
                     self.config.status_listen.name)

    def _become_status(self):
        """In the child: keep only the status socket and the table, then serve."""
        code = 1
        try:
            self._leave_master(ignore=STATUS_IGNORES)   # the master decides when it goes
            for sock in self.sockets.values():
                sock.close()            # else a port the master let go would stay bound
            drop_privileges(self.config.user)
            serve_status(self.status_socket, self.table)
            code = 0
        except BaseException:
            self.log.exception("status process failed")
        finally:
            os._exit(code)

    def stop_status(self):
        """Tell the status process to go (it is reaped later); close its socket."""
        if self.status_pid:
            try:
                os.kill(self.status_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.status_leaving.add(self.status_pid)
            self.status_pid = None
        if self.status_socket:
            self.status_socket.close()
            self.status_socket = None

    def status_exited(self, pid, code):
        """After a reap: True if `pid` was a status process.  The current
        one is started again, as a dead worker would be."""
        if pid in self.status_leaving:
            self.status_leaving.discard(pid)
            self.log.log(logmod.NOTICE, "status process %d exited with code %d", pid, code)
            return True
        if pid != self.status_pid:
            return False
        self.status_pid = None
        if self.stopping or not self.status_socket:
            self.log.log(logmod.NOTICE, "status process %d exited with code %d", pid, code)
            return True
        self.log.log(logmod.LEVELS["alert"], "status process %d exited with code %d, "
                     "starting a new one", pid, code)
        if time.monotonic() - self.last_status_spawn < RESPAWN_PAUSE:
            time.sleep(RESPAWN_PAUSE)
        self.start_status()
        return True

    # --------------------------------------------------------- pid file

    def _move_pid_file(self, config):
        """A reload that names another `pid` file writes it (an OSError
        fails the reload, which keeps the old configuration, as nginx's
        does); the old file's path is returned, to be removed once the
        reload is done.  None when the pid file stays where it was."""
        old = self.config.resolve(self.config.pid) if self.config.pid else None
        new = config.resolve(config.pid) if config.pid else None
        if new == old:
            return None
        if new:
            with open(new, "w") as file:
                file.write(f"{os.getpid()}\n")
        return old

    def _remove_pid(self):
        if self.config.pid:
            try:
                os.unlink(self.config.resolve(self.config.pid))
            except OSError:
                pass


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _why(exc):
    """A failed reload's reason, in nginx's words for a file it could not open."""
    if isinstance(exc, OSError) and exc.filename:
        return f'open() "{exc.filename}" failed ({exc.errno}: {exc.strerror})'
    return exc.strerror if isinstance(exc, OSError) else str(exc)
