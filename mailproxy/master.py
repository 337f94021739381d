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

`worker_processes 1` needs none of this: server.run() serves in-process.
"""

import os
import signal
import time

from . import NGINX_COMPAT, __version__, log as logmod
from .config import ConfigError
from .server import open_sockets, run_worker, socket_plan

HANDLED = {signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
           signal.SIGCHLD}
TICK = 1.0                  # seconds between looks at the children when no signal comes
RESPAWN_PAUSE = 1.0         # a worker that dies at once is not restarted in a tight loop


class Master:
    """The master process.  `reload_config()` returns a new Config or
    raises ConfigError (it re-reads the same file with the same -p/-g)."""

    def __init__(self, config, reload_config):
        self.config = config
        self.reload_config = reload_config
        self.sockets = {}
        self.workers = {}           # pid -> the Config it serves
        self.stopping = None        # None, "quit" or "stop"
        self.last_spawn = 0.0
        self.destinations, self.log, _ = logmod.setup(config)

    # --------------------------------------------------------------- run

    def run(self):
        """Serve until told to stop; the exit status."""
        try:
            self.sockets = open_sockets(socket_plan(self.config))
        except OSError as exc:
            self.log.log(logmod.LEVELS["emerg"], "%s", exc.strerror)
            return 1
        self.log.log(logmod.NOTICE, "mailproxy/%s (%s)", __version__, NGINX_COMPAT)
        self.log.log(logmod.NOTICE, "master process %d, %d worker processes", os.getpid(),
                     self.config.worker_processes)
        self.original_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        self._write_pid()
        try:
            self.spawn(self.config.worker_processes)
            self.loop()
        finally:
            self._remove_pid()
            for sock in self.sockets.values():
                sock.close()
            self.log.log(logmod.NOTICE, "exit")
            self.destinations.close()
        return 0

    def loop(self):
        while self.workers or not self.stopping:
            info = signal.sigtimedwait(HANDLED, TICK)
            self.reap()
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
            self.destinations.reopen()
            self.signal_workers(signal.SIGUSR1)

    def stop(self, how, signo):
        self.log.log(logmod.NOTICE, "%s: stopping workers", "gracefully" if how == "quit"
                     else "fast")
        self.stopping = how
        self.signal_workers(signo)
        for sock in self.sockets.values():
            sock.close()                # no new connections wait in our backlog
        self.sockets = {}

    # ----------------------------------------------------------- workers

    def spawn(self, count, config=None):
        config = config or self.config
        for _ in range(count):
            pid = os.fork()
            if pid == 0:
                self._become_worker(config)     # never returns
            self.workers[pid] = config
            self.log.log(logmod.NOTICE, "start worker process %d", pid)
        self.last_spawn = time.monotonic()

    def _become_worker(self, config):
        """In the child: the signals back to normal, then serve."""
        status = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.original_mask)
            for signo in HANDLED:
                signal.signal(signo, signal.SIG_DFL)
            self.destinations.close()
            status = run_worker(config, self.sockets)
        except BaseException:           # the child must never return into the master's code
            self.log.exception("worker process failed")
        finally:
            os._exit(status)

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
            config = self.workers.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            if config is self.config and not self.stopping:
                self.log.log(logmod.LEVELS["alert"], "worker process %d exited with code %d, "
                             "starting a new one", pid, code)
                if time.monotonic() - self.last_spawn < RESPAWN_PAUSE:
                    time.sleep(RESPAWN_PAUSE)
                self.spawn(1)
            else:
                self.log.log(logmod.NOTICE, "worker process %d exited with code %d", pid, code)

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
        try:
            config = self.reload_config()
            sockets = open_sockets(socket_plan(config), existing=self.sockets)
        except (ConfigError, OSError) as exc:
            self.log.error("reload failed, keeping the old configuration: %s",
                           exc.strerror if isinstance(exc, OSError) else exc)
            return
        old = self.config
        for key, sock in self.sockets.items():
            if key not in sockets:
                sock.close()            # the old workers keep their own copies
        self.config, self.sockets = config, sockets
        self.destinations.close()
        self.destinations, self.log, _ = logmod.setup(config)
        self.spawn(config.worker_processes)
        self.signal_workers(signal.SIGQUIT, only=old)

    # --------------------------------------------------------- pid file

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
