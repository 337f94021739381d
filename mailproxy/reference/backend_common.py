"""What the three demo backends share: the limits, the exceptions a handler
raises, a bounded line reader, and `Conversation`, the base of every
backend's handler class (see demo_backends.py for the whole shape).
"""

import select
import socket
import socketserver
import threading
from typing import NamedTuple

LINE_LIMIT = 8192           # a command or message line: RFC 5321 4.5.3.1 asks 512/1000,
                            # but IMAP clients send long UID sets
READ_TIMEOUT = 300          # seconds a client may stay silent (RFC 5321 4.5.3.2.7: 5 minutes)
MAX_ERRORS = 10             # refused commands before a conversation is ended (as aiosmtpd)
GOODBYE_TIMEOUT = 1         # seconds to spend on a last line to a client we drop
CHUNK = 4096
CRLF = b"\r\n"
CLOSED = "closed"
HOSTNAME = "demo.backend"


class Closed(Exception):
    """The client went away."""


class TooLong(Exception):
    """No end of line (or of an IMAP command) within its limit."""


class Refused(Exception):
    """A command turned down: `reply` is the protocol's answer, without
    CRLF (and, for IMAP, without the tag, which `tag` may supply)."""

    def __init__(self, reply, tag=None):
        super().__init__(reply)
        self.reply = reply
        self.tag = tag


class Command(NamedTuple):
    verb: str
    args: object            # the rest of the line (POP3, SMTP) or parsed tokens (IMAP)
    tag: bytes = b""


class LineReader:
    """A socket's incoming bytes, a line at a time, each read bounded."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()

    def readline(self, limit=LINE_LIMIT):
        """One line, LF included, of at most `limit` bytes."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start, limit)
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                return line
            if len(self.buffer) >= limit:
                raise TooLong()
            start = len(self.buffer)
            self._fill()

    def read_exact(self, size):
        """Exactly `size` bytes (an IMAP literal); the caller bounds `size`."""
        while len(self.buffer) < size:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def ready(self, seconds):
        """Is there something to read within `seconds`?  (IDLE's wait.)"""
        return bool(self.buffer) or bool(select.select([self.sock], [], [], seconds)[0])

    def _fill(self):
        try:
            data = self.sock.recv(CHUNK)
        except ConnectionError:
            raise Closed() from None
        if not data:
            raise Closed()
        self.buffer += data


class Conversation(socketserver.BaseRequestHandler):
    """One client connection to a demo backend.

    Subclasses set `protocol`, the texts (GREETING, UNKNOWN, NOT_NOW,
    TOO_LONG, TIMED_OUT, TOO_MANY_ERRORS), `STATES` (state -> verbs legal
    in it) and the starting `state`, and define `do_VERB(command)` methods.
    `read_command()` and `refusal()` suit line protocols (POP3, SMTP);
    IMAP overrides both for tags and literals.
    """

    protocol = ""
    GREETING = TOO_LONG = TIMED_OUT = TOO_MANY_ERRORS = b""
    UNKNOWN = NOT_NOW = b""
    STATES = {}
    state = ""
    handlers = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.handlers = {name[3:]: getattr(cls, name) for name in dir(cls) if name.startswith("do_")}

    @property
    def store(self):
        return self.server.store

    def setup(self):
        host, port = self.client_address[:2]
        threading.current_thread().name = f"demo {self.protocol} {host}:{port}"
        self.request.settimeout(READ_TIMEOUT)
        # Replies go out in several writes (untagged lines, then the tagged
        # one); without this, Nagle and delayed ACKs stall each by ~40 ms.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = LineReader(self.request)
        self.errors = 0

    def handle(self):
        """The funnel: greet, serve commands until the conversation ends or
        the client goes quiet, sends too much, or goes away."""
        try:
            self.send(self.GREETING)
            while self.state != CLOSED:
                self.serve_one()
        except TooLong:
            self.say_goodbye(self.TOO_LONG)
        except TimeoutError:
            self.say_goodbye(self.TIMED_OUT)
        except (Closed, ConnectionError):
            pass

    def serve_one(self):
        command = None
        try:
            command = self.read_command()
            self.check_state(command.verb)
            self.handlers[command.verb](self, command)
        except Refused as refusal:
            self.send(self.refusal(refusal, command))
            self.count_error()

    def check_state(self, verb):
        if verb not in self.handlers:
            raise Refused(self.UNKNOWN)
        if verb not in self.STATES[self.state]:
            raise Refused(self.NOT_NOW)

    def count_error(self):
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.say_goodbye(self.TOO_MANY_ERRORS)
            self.state = CLOSED

    def read_command(self):
        line = self.reader.readline().rstrip(b"\r\n")
        verb, _, rest = line.partition(b" ")
        return Command(verb.decode("ascii", "replace").upper(), rest)

    def refusal(self, refusal, command):
        return refusal.reply + CRLF

    def send(self, data):
        self.request.sendall(data)

    def say_goodbye(self, line):
        """A last line to a client being dropped, if it still listens."""
        try:
            self.request.settimeout(GOODBYE_TIMEOUT)
            self.request.sendall(line)
        except OSError:
            pass
