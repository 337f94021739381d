"""nginx-style logging: `error_log` destinations, levels and line format.

A line looks like nginx's:

    2026/11/26 01:10:41 [info] 4242#4243: *7 client login failed: "bad" while
    in http auth state, client: 127.0.0.1, server: 127.0.0.1:1143, login: "joe"

`setup()` turns the `error_log` directives into handlers: one logger for the
program (`mailproxy`) and one per server (`mailproxy.server.N`), each writing
only to its own destinations, as a server with its own `error_log` does in
nginx.  Sessions log through `SessionLog`, which adds the connection number
and the "while <step>, client: ..." context.  Nothing here ever sees a
password: sessions pass the login, never the secret.
"""

import logging
import sys
import threading
import time

# nginx's levels on Python's scale (notice, alert and emerg are added).
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": 25,
          "warn": logging.WARNING, "error": logging.ERROR, "crit": logging.CRITICAL,
          "alert": 55, "emerg": 60}
NOTICE = LEVELS["notice"]
_NAMES = {number: name for name, number in LEVELS.items()}

for _name, _number in LEVELS.items():
    logging.addLevelName(_number, _name)


class Formatter(logging.Formatter):
    """`YYYY/MM/DD HH:MM:SS [level] PID#TID: *CONN message`."""

    def format(self, record):
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(record.created))
        conn = getattr(record, "conn", None)
        prefix = f"*{conn} " if conn is not None else ""
        level = _NAMES.get(record.levelno, record.levelname.lower())
        text = f"{stamp} [{level}] {record.process}#{record.thread_id}: {prefix}" \
               f"{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _ThreadId(logging.Filter):
    """Adds the kernel thread id, as nginx prints PID#TID."""

    def filter(self, record):
        record.thread_id = threading.get_native_id()
        return True


class Destinations:
    """The open handlers, shared by every logger that names the same
    destination and level; `reopen()` serves SIGUSR1 and logrotate."""

    def __init__(self, resolve):
        self.resolve = resolve
        self.handlers = {}

    def handler(self, dest, level):
        key = (dest, level)
        if key not in self.handlers:
            if dest == "stderr":
                handler = logging.StreamHandler(sys.stderr)
            else:
                handler = logging.FileHandler(self.resolve(dest), encoding="utf-8",
                                              errors="backslashreplace")
            handler.setLevel(LEVELS[level])
            handler.setFormatter(Formatter())
            handler.addFilter(_ThreadId())
            self.handlers[key] = handler
        return self.handlers[key]

    def attach(self, logger, error_logs):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for dest, level in error_logs:
            logger.addHandler(self.handler(dest, level))
        logger.setLevel(min(LEVELS[level] for _, level in error_logs))
        logger.propagate = False

    def reopen(self):
        for handler in self.handlers.values():
            if isinstance(handler, logging.FileHandler):
                handler.acquire()
                try:
                    handler.close()
                    handler.stream = handler._open()
                finally:
                    handler.release()

    def close(self):
        for handler in self.handlers.values():
            handler.close()


def setup(config):
    """Attach the config's `error_log` destinations; return (Destinations,
    the program logger, one logger per server in config order)."""
    destinations = Destinations(config.resolve)
    main = logging.Logger("mailproxy")      # not in logging's registry: each running
    destinations.attach(main, config.error_logs)     # proxy (tests run several) has its own
    servers = []
    for number, server in enumerate(config.servers):
        logger = logging.Logger(f"mailproxy.server.{number}")
        destinations.attach(logger, server.error_log)
        servers.append(logger)
    return destinations, main, servers


class SessionLog(logging.LoggerAdapter):
    """A session's logger: `*CONN message while <step>, client: ..., ...`.

    `extra` is the session itself; it must offer `conn`, `step`,
    `client_text`, `server_text`, `login_text` and `upstream_text`.
    """

    def process(self, msg, kwargs):
        session = self.extra
        parts = [f"client: {session.client_text}", f"server: {session.server_text}"]
        if session.login_text is not None:
            parts.append(f'login: "{session.login_text}"')
        if session.upstream_text:
            parts.append(f"upstream: {session.upstream_text}")
        kwargs["extra"] = {"conn": session.conn}
        return f"{msg} while {session.step}, {', '.join(parts)}", kwargs
