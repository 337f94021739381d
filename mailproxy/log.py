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

A `syslog:` destination sends the same line, behind an RFC 3164 header, as
one UDP (or unix datagram) message:

    <190>Nov 26 01:10:41 mail1 mailproxy: 2026/11/26 01:10:41 [info] ...

`session_summary()` writes the one line every session ends with (beyond
nginx); its format is documented in docs/operations.md.
"""

import logging
import os
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass

from .addresses import Syslog

# nginx's levels on Python's scale (notice, alert and emerg are added).
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": 25,
          "warn": logging.WARNING, "error": logging.ERROR, "crit": logging.CRITICAL,
          "alert": 55, "emerg": 60}
NOTICE = LEVELS["notice"]
_NAMES = {number: name for name, number in LEVELS.items()}
# Our levels as RFC 3164 4.1.1 severities (emerg 0 ... debug 7).
SYSLOG_SEVERITY = {LEVELS[name]: code for code, name in enumerate(
    ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug"))}
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
          "Dec")                        # RFC 3164 4.1.2: English, whatever the locale
MAX_SYSLOG_TEXT = 2048                  # bytes after the header: nginx's NGX_MAX_ERROR_STR
# Why a session ended, as its summary line says ("closed by ..."):
REASONS = ("client",    # the client closed the connection (or reset it)
           "quit",      # the client said LOGOUT / QUIT before logging in
           "backend",   # the backend closed the relay first, or its login failed
           "timeout",   # `timeout` before login, `proxy_timeout` in the relay
           "auth",      # the auth service refused the login
           "invalid",   # too many invalid commands, a line too long, early talker
           "tls",       # a TLS handshake failed, or a required certificate is missing
           "error",     # an internal error (auth service down, a write failed, ...)
           "stop")      # the proxy stopped fast (SIGTERM) and cut the session

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
               f"{record.getMessage()}{getattr(record, 'context', '')}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _ThreadId(logging.Filter):
    """Adds the kernel thread id, as nginx prints PID#TID."""

    def filter(self, record):
        record.thread_id = threading.get_native_id()
        return True


class SyslogHandler(logging.Handler):
    """RFC 3164 messages over one datagram socket.  The socket does not
    block: a message the kernel cannot take at once is dropped (and
    counted), so a slow or absent syslog daemon never stalls a session."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.hostname = socket.gethostname() if target.hostname else None
        self.dropped = 0
        self.sock = socket.socket(target.family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def emit(self, record):
        try:
            header = syslog_header(self.target.facility, record.levelno, record.created,
                                   self.hostname, self.target.tag)
            text = self.format(record).encode("utf-8", "backslashreplace")
            self.sock.sendto(header.encode() + text[:MAX_SYSLOG_TEXT], self.target.address)
        except OSError:                 # EAGAIN, nobody listening, no /dev/log...
            self.dropped += 1
        except Exception:
            self.handleError(record)

    def close(self):
        self.sock.close()
        super().close()


def syslog_header(facility, levelno, created, hostname, tag):
    """`<PRI>Mmm dd HH:MM:SS hostname TAG: ` (RFC 3164 4.1); PRI is the
    facility times 8 plus the record's own severity."""
    severity = SYSLOG_SEVERITY.get(levelno)
    if severity is None:        # a level between ours: the nearest one below it
        severity = SYSLOG_SEVERITY[max((n for n in SYSLOG_SEVERITY if n <= levelno),
                                       default=logging.DEBUG)]
    moment = time.localtime(created)
    stamp = f"{MONTHS[moment.tm_mon - 1]} {moment.tm_mday:2d} " \
            f"{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}"
    host = f" {hostname}" if hostname else ""
    return f"<{facility * 8 + severity}>{stamp}{host} {tag}: "


class Destinations:
    """The open handlers, shared by every logger that names the same
    destination and level; `reopen()` serves SIGUSR1 and logrotate."""

    def __init__(self, resolve):
        self.resolve = resolve
        self.handlers = {}

    def handler(self, dest, level):
        key = (dest, level)
        if key not in self.handlers:
            if isinstance(dest, Syslog):
                handler = SyslogHandler(dest)
            elif dest == "stderr":
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

    def reopen(self, owner=None):
        """Files only: a syslog socket has nothing to reopen.  A file that
        cannot be opened again (a worker that gave up root may not create
        it) keeps the old one, and says so there: losing the log is better
        than losing the process.  `owner` (the master, for workers that run
        as `user`): each file is given to that uid and made readable and
        writable by it, as nginx's master does, so that the workers can
        open it in turn."""
        for handler in self.handlers.values():
            if not isinstance(handler, logging.FileHandler):
                continue
            handler.acquire()
            try:
                try:
                    stream = open(handler.baseFilename, "a", encoding="utf-8",
                                  errors="backslashreplace")
                except OSError as exc:
                    handler.stream.write(f"reopening {handler.baseFilename} failed "
                                         f"({exc.strerror}), still writing here\n")
                    handler.stream.flush()
                    continue
                handler.setStream(stream).close()
                if owner is not None:
                    _give(handler.baseFilename, owner)
            finally:
                handler.release()

    def close(self):
        for handler in self.handlers.values():
            handler.close()


def _give(path, uid):
    """chown the file to `uid` (its group stays) with owner read and write."""
    try:
        info = os.stat(path)
        if info.st_uid != uid:
            os.chown(path, uid, -1)
        os.chmod(path, info.st_mode | stat.S_IRUSR | stat.S_IWUSR)
    except OSError:
        pass                    # the worker then says so in the file it keeps


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


@dataclass(slots=True)
class LogContext:
    """What a session's log lines say about it, kept up to date by the
    session: its connection number ("*N"), the step it is in (nginx's
    "while ..." text), client and server addresses, the login (printable;
    None until known) and the backend ("" until known)."""
    conn: int
    client: str
    server: str
    step: str = "in auth state"
    login: str = None
    upstream: str = ""


class SessionLog(logging.LoggerAdapter):
    """A session's logger: `*CONN message while <step>, client: ..., ...`.
    `extra` is the session's LogContext."""

    def process(self, msg, kwargs):
        context = self.extra
        parts = [f"client: {context.client}", f"server: {context.server}"]
        if context.login is not None:
            parts.append(f'login: "{context.login}"')
        if context.upstream:
            parts.append(f"upstream: {context.upstream}")
        # The context is added after %-formatting, never to the format string:
        # a login may hold "%", and "%s" there would break (or drop) the line.
        kwargs["extra"] = {"conn": context.conn,
                           "context": f" while {context.step}, {', '.join(parts)}"}
        return msg, kwargs


def hostport(host, port):
    """An address as logs write it: `host:port`, `[v6]:port`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def printable(login):
    """A login as logs show it: at most 256 bytes, never a control byte."""
    text = login[:256].decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


# ----------------------------------------------------------- the summary

def session_summary(client, protocol, login, backend, tls, received, sent, seconds,
                    reason):
    """The fields of the line that ends every session, after its
    "session done: ", in a fixed order with `-` for what is unknown
    (docs/operations.md, "The session summary"):

    client 127.0.0.1:50123, imap, login "joe", backend 127.0.0.1:1143,
    tls TLSv1.3, 2.1 MB in, 45.0 KB out, 00:12:07, closed by client

    `login` is already printable (printable(), as the session stores it);
    a quote in it is escaped too, so the field always ends at the next
    quote."""
    login = '"' + login.replace('"', "\\x22") + '"' if login is not None else "-"
    return (f"client {client or '-'}, {protocol}, login {login}, "
            f"backend {backend or '-'}, tls {tls or '-'}, {human_size(received)} in, "
            f"{human_size(sent)} out, {duration(seconds)}, closed by {reason}")


def human_size(count):
    """Bytes with one decimal and a 1024-based unit (as nginx's `4k`, `1m`):
    `0.0 B`, `512.0 B`, `1.5 KB`, `2.1 MB`, `3.0 GB`."""
    value = float(count)
    for unit in ("B", "KB", "MB"):
        if round(value, 1) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def duration(seconds):
    """HH:MM:SS (whole seconds; the hours may pass 99)."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
