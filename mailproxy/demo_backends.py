"""Small in-memory IMAP, POP3 and SMTP backends for `mailproxy demo`.

These are teaching aids, not mail servers.  They keep mail in memory and
lose it at exit, have one folder (INBOX), no TLS, no quotas and no locking
of a mailbox between sessions, trust XCLIENT from whoever connects, and
speak only the part of each protocol that curl, Python's imaplib, poplib
and smtplib, and a mail client's first steps need.  They exist so that
`mailproxy demo` can show a proxied login on a machine with nothing
installed; a real site puts Dovecot and Postfix behind the proxy.

The shape is the proxy's own, in miniature:

- A `Mailstore` holds every user's mailbox.  The three backends share one,
  so a message sent through SMTP can be read through IMAP or POP3.
- Each backend is a `socketserver.ThreadingTCPServer` whose handler class
  is one conversation with one client: `ImapBackend`, `Pop3Backend`,
  `SmtpBackend`.
- `Conversation`, their common base, owns what every line protocol needs:
  the greeting, a bounded line reader under a read timeout, a `do_VERB`
  table built when the class is made, the verbs legal in each state (one
  table per protocol, checked in one place), and one try/except funnel per
  connection.  A handler refuses a command by raising `Refused` with the
  reply; the funnel sends it.
- `start_backends()` serves the three on loopback from named threads and
  returns a `DemoBackends` whose `close()` ends listeners and connections.

The backends check the password the proxy replays at login (IMAP LOGIN,
POP3 USER/PASS), as a real backend would; the SMTP backend, like Postfix
behind the proxy, takes the login the proxy names in XCLIENT.
"""

import datetime
import email.utils
import hmac
import logging
import re
import select
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import NamedTuple

log = logging.getLogger("mailproxy.demo")

LINE_LIMIT = 8192           # a command or message line: RFC 5321 4.5.3.1 asks 512/1000,
                            # but IMAP clients send long UID sets
COMMAND_LIMIT = 65536       # one IMAP command with its literals (only LOGIN sends literals here)
READ_TIMEOUT = 300          # seconds a client may stay silent (RFC 5321 4.5.3.2.7: 5 minutes)
IDLE_LIMIT = 30 * 60        # RFC 2177 3: clients re-issue IDLE at least every 29 minutes
IDLE_POLL = 0.25            # seconds between two looks for new mail during IDLE
MAX_MESSAGE = 10 * 1024 * 1024  # the SMTP SIZE we advertise (RFC 1870)
MAX_RECIPIENTS = 100        # RFC 5321 4.5.3.1.8: the fewest a server must accept
MAX_ERRORS = 10             # refused commands before a conversation is ended (as aiosmtpd)
GOODBYE_TIMEOUT = 1         # seconds to spend on a last line to a client we drop
POLL_INTERVAL = 0.1         # serve_forever's shutdown check: close() waits at most this per server
CHUNK = 4096
CRLF = b"\r\n"
CLOSED = "closed"
HOSTNAME = "demo.backend"
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")   # RFC 3501 2.3.2

IMAP_CAPABILITIES = b"IMAP4rev1 IDLE LITERAL+ UIDPLUS"
IMAP_GREETING = b"* OK [CAPABILITY " + IMAP_CAPABILITIES + b"] demo IMAP ready\r\n"
IMAP_CAPABILITY = b"* CAPABILITY " + IMAP_CAPABILITIES + CRLF
IMAP_CONTINUE = b"+ Ready for literal data\r\n"
IMAP_IDLING = b"+ idling\r\n"
IMAP_BYE = b"* BYE demo IMAP signing off\r\n"
IMAP_TOO_LONG = b"* BYE command too long\r\n"
IMAP_TIMED_OUT = b"* BYE autologout: idle for too long\r\n"
IMAP_TOO_MANY_ERRORS = b"* BYE too many errors\r\n"
IMAP_UNKNOWN = b"BAD unknown command"
IMAP_NOT_NOW = b"BAD command not allowed now"
IMAP_SYNTAX = b"BAD syntax error"
IMAP_LOGIN_FAILED = b"NO [AUTHENTICATIONFAILED] invalid credentials"   # RFC 5530
IMAP_NO_MAILBOX = b"NO [NONEXISTENT] no such mailbox, only INBOX"
IMAP_READ_ONLY = b"NO [READ-ONLY] mailbox is read-only"
IMAP_NO_MESSAGE = b"BAD no such message"

POP3_GREETING = b"+OK demo POP3 ready\r\n"
POP3_CAPA = (b"+OK capability list follows\r\nUSER\r\nUIDL\r\nTOP\r\nRESP-CODES\r\n"
             b"PIPELINING\r\nIMPLEMENTATION mailproxy-demo\r\n.\r\n")
POP3_BYE = b"+OK demo POP3 signing off\r\n"
POP3_TOO_LONG = b"-ERR line too long\r\n"
POP3_TIMED_OUT = b"-ERR timed out\r\n"
POP3_TOO_MANY_ERRORS = b"-ERR too many errors\r\n"
POP3_UNKNOWN = b"-ERR unknown command"
POP3_NOT_NOW = b"-ERR command not valid in this state"
POP3_LOGIN_FAILED = b"-ERR [AUTH] invalid user name or password"      # RFC 3206
POP3_NO_MESSAGE = b"-ERR no such message"

SMTP_GREETING = b"220 " + HOSTNAME.encode() + b" ESMTP\r\n"
SMTP_EHLO = (b"250-" + HOSTNAME.encode() + b"\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
             b"250-SIZE %d\r\n250 XCLIENT ADDR NAME LOGIN\r\n" % MAX_MESSAGE)
SMTP_HELO = b"250 " + HOSTNAME.encode() + CRLF
SMTP_OK = b"250 2.0.0 Ok\r\n"
SMTP_SENDER_OK = b"250 2.1.0 Ok\r\n"
SMTP_RECIPIENT_OK = b"250 2.1.5 Ok\r\n"
SMTP_GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
SMTP_QUEUED = b"250 2.0.0 Ok: queued\r\n"
SMTP_BYE = b"221 2.0.0 Bye\r\n"
SMTP_TOO_LONG = b"500 5.5.0 Line too long\r\n"
SMTP_TIMED_OUT = b"421 4.4.2 " + HOSTNAME.encode() + b" Error: timeout exceeded\r\n"
SMTP_TOO_MANY_ERRORS = b"421 4.7.0 " + HOSTNAME.encode() + b" Error: too many errors\r\n"
SMTP_UNKNOWN = b"502 5.5.2 Error: command not recognized"
SMTP_NOT_NOW = b"503 5.5.1 Error: bad sequence of commands"
SMTP_NO_USER = b"550 5.1.1 Recipient address rejected: User unknown in local recipient table"
SMTP_TOO_BIG = b"552 5.3.4 Message size exceeds fixed limit"
SMTP_TOO_MANY_RECIPIENTS = b"452 4.5.3 Error: too many recipients"
XCLIENT_ATTRIBUTES = {"ADDR", "NAME", "LOGIN"}       # what SMTP_EHLO advertises
XCLIENT_UNKNOWN = {"[UNAVAILABLE]", "[TEMPUNAVAIL]"}  # Postfix XCLIENT_README

LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}$")   # RFC 3501 4.3, RFC 7888 (LITERAL+)
TAG = re.compile(rb'[^\x00-\x20\x7f(){%*"\\+\]]{1,64}')  # RFC 3501 9: astring-chars but "+"
TOKEN = re.compile(rb"""\s*(?:
      (?P<paren>[()])
    | "(?P<quoted>(?:[^"\\\r\n]|\\["\\])*)"
    | (?P<atom>(?:[^\s()"\[\]]|\[[^\]\r\n]*\])+)   # BODY[HEADER.FIELDS (A B)] is one atom
    )""", re.X)
SET_PART = re.compile(rb"(\d+|\*)(?::(\d+|\*))?")          # RFC 3501 9: sequence-set
BODY_ITEM = re.compile(r"(BODY|BODY\.PEEK)\[([^\]]*)\](?:<(\d+)\.(\d+)>)?")
SECTION = re.compile(r"|HEADER|TEXT|HEADER\.FIELDS(\.NOT)? \(([^()]*)\)")
STORE_MODE = re.compile(r"([+-]?)FLAGS(\.SILENT)?")
MAIL_FROM = re.compile(rb"FROM:\s*<([^<>]*)>(.*)", re.I | re.S)
RCPT_TO = re.compile(rb"TO:\s*<([^<>]*)>.*", re.I | re.S)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# ================================================================ the store

@dataclass
class Message:
    """One stored message: UID, IMAP flags, and the bytes (CRLF line ends)."""
    uid: int
    flags: set
    data: bytes
    arrived: float = field(default_factory=time.time)     # IMAP INTERNALDATE


class Mailstore:
    """Every user's mailbox, in memory.

    `users` maps a login to its clear-text password (set it up before
    serving).  Readers get copies (`messages()`), so nothing outside holds
    a reference into a mailbox.  UIDs only grow, and `uidvalidity` is fixed
    for the store's life, so clients may cache by UID (RFC 3501 2.3.1.1).
    """

    def __init__(self, users=None):
        self.users = dict(users or {})
        self.uidvalidity = int(time.time())
        # One lock for all mailboxes: handler threads of all three backends
        # deliver, read, flag and delete at once, and each operation is a few
        # list steps, so finer locks would buy nothing but deadlock risks.
        self._lock = threading.Lock()
        self._boxes = {}
        self._next_uid = {}

    def check_password(self, user, password):
        expected = self.users.get(user)
        return expected is not None and hmac.compare_digest(expected.encode(), password.encode())

    def deliver(self, user, message_bytes):
        """Append a message (line ends made CRLF) to `user`'s mailbox; its UID."""
        if user not in self.users:
            raise KeyError(f"no such user: {user}")
        data = re.sub(rb"\r?\n", CRLF, message_bytes)
        with self._lock:
            uid = self._next_uid.get(user, 1)
            self._next_uid[user] = uid + 1
            self._boxes.setdefault(user, []).append(Message(uid, set(), data))
        return uid

    def messages(self, user):
        """A snapshot of `user`'s mailbox, oldest first."""
        with self._lock:
            return [replace(m, flags=set(m.flags)) for m in self._boxes.get(user, ())]

    def uids(self, user):
        with self._lock:
            return [m.uid for m in self._boxes.get(user, ())]

    def uidnext(self, user):
        with self._lock:
            return self._next_uid.get(user, 1)

    def change_flags(self, user, uids, flags, how="+"):
        """Add ("+"), remove ("-") or set ("=") flags; {uid: flags after}."""
        wanted, after = set(uids), {}
        with self._lock:
            for message in self._boxes.get(user, ()):
                if message.uid in wanted:
                    message.flags = _apply_flags(message.flags, set(flags), how)
                    after[message.uid] = set(message.flags)
        return after

    def delete(self, user, uids):
        """Remove messages by UID; the UIDs that were there."""
        doomed = set(uids)
        with self._lock:
            box = self._boxes.get(user, [])
            self._boxes[user] = [m for m in box if m.uid not in doomed]
            return [m.uid for m in box if m.uid in doomed]

    def seed(self, user, count):
        """Deliver `count` small demo messages to `user`; their UIDs."""
        return [self.deliver(user, demo_message(user, n, count)) for n in range(1, count + 1)]


def _apply_flags(current, flags, how):
    if how == "+":
        return current | flags
    if how == "-":
        return current - flags
    return flags


def demo_message(user, number, count):
    """A small RFC 5322 message; its dotted line shows POP3/SMTP dot-stuffing."""
    return (f"From: Mailproxy Demo <demo@{HOSTNAME}>\r\n"
            f"To: {user}@{HOSTNAME}\r\n"
            f"Subject: Demo message {number} of {count}\r\n"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: {email.utils.make_msgid('demo', HOSTNAME)}\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n"
            f"\r\n"
            f"Hello {user}, this is demo message {number}.\r\n"
            f".This line starts with a dot.\r\n").encode()


# ========================================================= the conversation

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


# ===================================================================== IMAP

class ImapBackend(Conversation):
    """An IMAP4rev1 subset (RFC 3501) over one mailbox, INBOX.

    `view` is the list of UIDs in sequence-number order as this client
    knows them; it changes only when the client is told (EXISTS, EXPUNGE).
    """

    protocol = "imap"
    GREETING, TOO_LONG, TIMED_OUT = IMAP_GREETING, IMAP_TOO_LONG, IMAP_TIMED_OUT
    TOO_MANY_ERRORS, UNKNOWN, NOT_NOW = IMAP_TOO_MANY_ERRORS, IMAP_UNKNOWN, IMAP_NOT_NOW
    ANY_STATE = {"CAPABILITY", "NOOP", "LOGOUT"}
    AUTHENTICATED = ANY_STATE | {"LIST", "LSUB", "SELECT", "EXAMINE", "STATUS", "IDLE"}
    STATES = {"not authenticated": ANY_STATE | {"LOGIN"},       # RFC 3501 3
              "authenticated": AUTHENTICATED,
              "selected": AUTHENTICATED | {"CHECK", "CLOSE", "EXPUNGE", "FETCH",
                                           "STORE", "SEARCH", "UID"}}
    UID_COMMANDS = {"FETCH": "fetch", "STORE": "store_flags", "SEARCH": "search",
                    "EXPUNGE": "expunge"}                        # RFC 3501 6.4.8, RFC 4315
    state = "not authenticated"
    user = None
    readonly = False
    view = ()

    # ----------------------------------------------------------- reading

    def read_command(self):
        """Tag, verb and tokens; literals {N} (after `+`) and {N+} are read
        into the token list as the strings they stand for."""
        line = self.reader.readline()
        total, tag, tokens = len(line), line.split(b" ", 1)[0], []
        while True:
            text = line.rstrip(b"\r\n")
            literal = LITERAL_AT_END.search(text)
            tokens += tokenize(text[:literal.start()] if literal else text, tag)
            if not literal:
                return command_from(tokens, tag)
            total += int(literal[1])
            if total > COMMAND_LIMIT:
                if literal[2]:
                    raise TooLong()             # {N+}: its bytes come anyway
                raise Refused(b"BAD literal too large", _valid_tag(tag))
            if not literal[2]:
                self.send(IMAP_CONTINUE)
            tokens.append(self.reader.read_exact(int(literal[1])))
            line = self.reader.readline()
            total += len(line)

    def refusal(self, refusal, command):
        tag = refusal.tag or (command.tag if command else b"*")
        return tag + b" " + refusal.reply + CRLF

    def ok(self, command, text):
        self.send(command.tag + b" OK " + text + CRLF)

    def untagged(self, text):
        self.send(b"* " + text + CRLF)

    # --------------------------------------------------- any state, login

    def do_CAPABILITY(self, command):
        self.send(IMAP_CAPABILITY)
        self.ok(command, b"CAPABILITY completed")

    def do_NOOP(self, command):
        self.report_changes()
        self.ok(command, b"NOOP completed")

    def do_CHECK(self, command):
        self.report_changes()
        self.ok(command, b"CHECK completed")

    def do_LOGOUT(self, command):
        self.send(IMAP_BYE)
        self.ok(command, b"LOGOUT completed")
        self.state = CLOSED

    def do_LOGIN(self, command):
        user, password = strings(command.args, 2)
        if not self.store.check_password(user, password):
            raise Refused(IMAP_LOGIN_FAILED)
        self.user, self.state = user, "authenticated"
        self.ok(command, b"[CAPABILITY " + IMAP_CAPABILITIES + b"] LOGIN completed")

    # ------------------------------------------------------ authenticated

    def do_LIST(self, command):
        self.list_inbox(command, b"LIST")

    def do_LSUB(self, command):
        self.list_inbox(command, b"LSUB")

    def list_inbox(self, command, verb):
        reference, pattern = strings(command.args, 2)
        if not pattern:             # RFC 3501 6.3.8: asks for the delimiter
            self.untagged(verb + b' (\\Noselect) "/" ""')
        elif mailbox_matches(reference + pattern):
            self.untagged(verb + b' (\\HasNoChildren) "/" INBOX')
        self.ok(command, verb + b" completed")

    def do_SELECT(self, command):
        self.select(command, readonly=False)

    def do_EXAMINE(self, command):
        self.select(command, readonly=True)

    def select(self, command, readonly):
        (name,) = strings(command.args, 1)
        self.state, self.view = "authenticated", []     # RFC 3501 6.3.1: even if it fails
        if name.upper() != "INBOX":
            raise Refused(IMAP_NO_MAILBOX)
        self.view, self.readonly = self.store.uids(self.user), readonly
        flags = b"()" if readonly else flag_list(SYSTEM_FLAGS)
        self.untagged(b"FLAGS " + flag_list(SYSTEM_FLAGS))
        self.untagged(b"OK [PERMANENTFLAGS " + flags + b"] flags permitted")
        self.untagged(b"%d EXISTS" % len(self.view))
        self.untagged(b"0 RECENT")
        self.untagged(b"OK [UIDVALIDITY %d] UIDs valid" % self.store.uidvalidity)
        self.untagged(b"OK [UIDNEXT %d] predicted next UID" % self.store.uidnext(self.user))
        self.state = "selected"
        self.ok(command, b"[READ-ONLY] EXAMINE completed" if readonly
                else b"[READ-WRITE] SELECT completed")

    def do_STATUS(self, command):
        if len(command.args) != 2 or not isinstance(command.args[1], list):
            raise Refused(IMAP_SYNTAX)
        (name,) = strings(command.args[:1], 1)
        if name.upper() != "INBOX":
            raise Refused(IMAP_NO_MAILBOX)
        messages = self.store.messages(self.user)
        values = []
        for item in command.args[1]:
            name = item.upper().decode("ascii", "replace") if isinstance(item, bytes) else ""
            if name not in STATUS_ITEMS:
                raise Refused(b"BAD unsupported status item")
            count = STATUS_ITEMS[name](self.store, self.user, messages)
            values.append(b"%s %d" % (name.encode(), count))
        self.untagged(b"STATUS INBOX (" + b" ".join(values) + b")")
        self.ok(command, b"STATUS completed")

    def do_IDLE(self, command):
        """RFC 2177: report new mail until the client says DONE."""
        self.send(IMAP_IDLING)
        deadline = time.monotonic() + IDLE_LIMIT
        while time.monotonic() < deadline:
            if self.reader.ready(IDLE_POLL):
                if self.reader.readline().rstrip(b"\r\n").upper() != b"DONE":
                    raise Refused(b"BAD expected DONE")
                self.ok(command, b"IDLE terminated")
                return
            self.report_changes()
        self.say_goodbye(IMAP_TIMED_OUT)
        self.state = CLOSED

    def report_changes(self):
        """Tell the client of messages gone (by other sessions) and new."""
        if self.state != "selected":
            return
        current = self.store.uids(self.user)
        self.forget(set(self.view) - set(current))
        known = set(self.view)
        new = [uid for uid in current if uid not in known]
        if new:
            self.view += new
            self.untagged(b"%d EXISTS" % len(self.view))

    def forget(self, uids):
        """Drop `uids` from the view with one EXPUNGE each, highest sequence
        number first, so every number sent is still valid (RFC 3501 7.4.1)."""
        for seq in range(len(self.view), 0, -1):
            if self.view[seq - 1] in uids:
                del self.view[seq - 1]
                self.untagged(b"%d EXPUNGE" % seq)

    # ----------------------------------------------------------- selected

    def do_FETCH(self, command):
        self.fetch(command.args, by_uid=False)
        self.ok(command, b"FETCH completed")

    def do_STORE(self, command):
        self.store_flags(command.args, by_uid=False)
        self.ok(command, b"STORE completed")

    def do_SEARCH(self, command):
        self.search(command.args, by_uid=False)
        self.ok(command, b"SEARCH completed")

    def do_EXPUNGE(self, command):
        self.expunge(command.args, by_uid=False)
        self.ok(command, b"EXPUNGE completed")

    def do_UID(self, command):
        if not command.args or not isinstance(command.args[0], bytes):
            raise Refused(IMAP_SYNTAX)
        name = command.args[0].upper()
        action = self.UID_COMMANDS.get(name.decode("ascii", "replace"))
        if action is None:
            raise Refused(IMAP_UNKNOWN)
        getattr(self, action)(command.args[1:], by_uid=True)
        self.ok(command, b"UID " + name + b" completed")

    def do_CLOSE(self, command):
        """RFC 3501 6.4.2: expunge silently (unless read-only), deselect."""
        if not self.readonly:
            deleted = [m.uid for m in self.store.messages(self.user) if "\\Deleted" in m.flags]
            self.store.delete(self.user, deleted)
        self.state, self.view = "authenticated", []
        self.ok(command, b"CLOSE completed")

    def fetch(self, args, by_uid):
        if len(args) != 2 or not isinstance(args[0], bytes):
            raise Refused(IMAP_SYNTAX)
        items = fetch_items(args[1])
        if by_uid and not any(item.label == b"UID" for item in items):
            items.insert(0, fetch_item("UID"))          # RFC 3501 6.4.8
        for seq, message in self.matching(args[0], by_uid):
            self.send(self.fetch_response(seq, message, items))

    def fetch_response(self, seq, message, items):
        """`* SEQ FETCH (...)`; reading a body sets \\Seen (RFC 3501 6.4.5),
        and then the new FLAGS go along with it."""
        if any(item.sets_seen for item in items) and not self.readonly \
                and "\\Seen" not in message.flags:
            after = self.store.change_flags(self.user, [message.uid], {"\\Seen"})
            message.flags = after.get(message.uid, message.flags)
            if not any(item.label == b"FLAGS" for item in items):
                items = [fetch_item("FLAGS")] + items
        parts = [item.label + b" " + item.render(message) for item in items]
        return b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts))

    def store_flags(self, args, by_uid):
        if self.readonly:
            raise Refused(IMAP_READ_ONLY)
        if len(args) < 3 or not all(isinstance(arg, bytes) for arg in args[:2]):
            raise Refused(IMAP_SYNTAX)
        mode = STORE_MODE.fullmatch(args[1].decode("ascii", "replace").upper())
        if not mode:
            raise Refused(IMAP_SYNTAX)
        targets = self.matching(args[0], by_uid)
        after = self.store.change_flags(self.user, [m.uid for _, m in targets],
                                        parse_flags(args[2:]), mode[1] or "=")
        if mode[2]:
            return                                      # .SILENT
        for seq, message in targets:
            if message.uid in after:
                uid = b"UID %d " % message.uid if by_uid else b""
                self.untagged(b"%d FETCH (%sFLAGS %s)" % (seq, uid, flag_list(after[message.uid])))

    def search(self, args, by_uid):
        keys = [arg.upper().decode("ascii", "replace") for arg in args if isinstance(arg, bytes)]
        if not keys or len(keys) != len(args) or not all(key in SEARCH_KEYS for key in keys):
            raise Refused(b"BAD unsupported search (ALL and flag keys only)")
        messages = {m.uid: m for m in self.store.messages(self.user)}
        hits = [uid if by_uid else seq for seq, uid in enumerate(self.view, 1)
                if uid in messages and all(SEARCH_KEYS[key](messages[uid]) for key in keys)]
        self.untagged(b"SEARCH" + b"".join(b" %d" % hit for hit in hits))

    def expunge(self, args, by_uid):
        if self.readonly:
            raise Refused(IMAP_READ_ONLY)
        if len(args) != (1 if by_uid else 0):
            raise Refused(IMAP_SYNTAX)
        candidates = [m for _, m in self.matching(args[0], True)] if by_uid \
            else self.store.messages(self.user)
        deleted = [m.uid for m in candidates if "\\Deleted" in m.flags]
        self.forget(set(self.store.delete(self.user, deleted)))

    def matching(self, text, by_uid):
        """[(seq, message)] named by a sequence set of numbers or UIDs."""
        if not isinstance(text, bytes):
            raise Refused(IMAP_SYNTAX)
        largest = (self.view[-1] if self.view else 0) if by_uid else len(self.view)
        ranges = parse_sequence_set(text, largest)
        if not by_uid and any(low > largest for low, _ in ranges):
            raise Refused(IMAP_NO_MESSAGE)      # wholly past the end; 2:9 means 2:*
        messages = {m.uid: m for m in self.store.messages(self.user)}
        return [(seq, messages[uid]) for seq, uid in enumerate(self.view, 1)
                if uid in messages and _in_ranges(uid if by_uid else seq, ranges)]


class FetchItem(NamedTuple):
    label: bytes                # the item's name in the reply, e.g. b"BODY[HEADER]"
    render: object              # message -> the value's bytes
    sets_seen: bool = False


SIMPLE_ITEMS = {
    "UID": lambda m: b"%d" % m.uid,
    "FLAGS": lambda m: flag_list(m.flags),
    "RFC822.SIZE": lambda m: b"%d" % len(m.data),
    "INTERNALDATE": lambda m: b'"%s"' % internaldate(m.arrived).encode(),
}
RFC822_ITEMS = {"RFC822": ("", True), "RFC822.HEADER": ("HEADER", False),
                "RFC822.TEXT": ("TEXT", True)}      # section, sets \Seen
FETCH_MACROS = {"FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]}


def _flag_test(flag, present):
    return lambda message: (flag in message.flags) == present


SEARCH_FLAGS = ("ANSWERED", "DELETED", "DRAFT", "FLAGGED", "SEEN")      # RFC 3501 6.4.4
SEARCH_KEYS = {"ALL": lambda message: True,
               **{word: _flag_test("\\" + word.title(), True) for word in SEARCH_FLAGS},
               **{"UN" + word: _flag_test("\\" + word.title(), False) for word in SEARCH_FLAGS}}
STATUS_ITEMS = {"MESSAGES": lambda store, user, msgs: len(msgs),
                "RECENT": lambda store, user, msgs: 0,
                "UIDNEXT": lambda store, user, msgs: store.uidnext(user),
                "UIDVALIDITY": lambda store, user, msgs: store.uidvalidity,
                "UNSEEN": lambda store, user, msgs: sum("\\Seen" not in m.flags for m in msgs)}


def fetch_items(arg):
    """The FETCH item list (or single item or macro) as FetchItems."""
    names = arg if isinstance(arg, list) else [arg]
    if not all(isinstance(name, bytes) for name in names):
        raise Refused(IMAP_SYNTAX)
    names = [name.decode("ascii", "replace").upper() for name in names]
    names = [word for name in names for word in FETCH_MACROS.get(name, [name])]
    items = [fetch_item(name) for name in names]
    if None in items:
        raise Refused(b"BAD unsupported fetch item " + names[items.index(None)].encode())
    return items


def fetch_item(name):
    """One FETCH item by name, or None if the demo does not do it."""
    if name in SIMPLE_ITEMS:
        return FetchItem(name.encode(), SIMPLE_ITEMS[name])
    if name in RFC822_ITEMS:
        section, sets_seen = RFC822_ITEMS[name]
        return FetchItem(name.encode(), partial(body_section, section=section), sets_seen)
    match = BODY_ITEM.fullmatch(name)
    if not match or not SECTION.fullmatch(match[2]):
        return None
    start, length = (int(match[3]), int(match[4])) if match[3] else (0, None)
    label = f"BODY[{match[2]}]" + (f"<{start}>" if match[3] else "")     # RFC 3501 7.4.2
    return FetchItem(label.encode(), partial(body_section, section=match[2], start=start,
                                             length=length), match[1] == "BODY")


def body_section(message, section, start=0, length=None):
    """A part of the message as an IMAP literal: `{N}` CRLF and the bytes."""
    header, text = split_message(message.data)
    if section == "":
        data = message.data
    elif section == "HEADER":
        data = header
    elif section == "TEXT":
        data = text
    else:
        data = header_fields(header, section)
    data = data[start:] if length is None else data[start:start + length]
    return b"{%d}\r\n%s" % (len(data), data)


def split_message(data):
    """(header with its blank line, body) of a CRLF message."""
    end = data.find(b"\r\n\r\n")
    return (data, b"") if end < 0 else (data[:end + 4], data[end + 4:])


def header_fields(header, section):
    """HEADER.FIELDS (A B): those fields, folded lines kept; .NOT: the others."""
    match = SECTION.fullmatch(section)
    names = {name.encode() for name in match[2].split()}
    fields = re.findall(rb"[^\r\n]+\r\n(?:[ \t][^\r\n]*\r\n)*", header)
    kept = [f for f in fields if (f.split(b":", 1)[0].strip().upper() in names) != bool(match[1])]
    return b"".join(kept) + CRLF


def tokenize(text, tag):
    """Atoms, quoted strings and parentheses ("(" and ")" as str) of one
    stretch of a command line between literals."""
    tokens, position = [], 0
    while position < len(text):
        match = TOKEN.match(text, position)
        if not match:
            if not text[position:].strip():
                break
            raise Refused(IMAP_SYNTAX, _valid_tag(tag))
        position = match.end()
        if match["paren"]:
            tokens.append(match["paren"].decode())
        elif match["quoted"] is not None:
            tokens.append(re.sub(rb'\\(["\\])', rb"\1", match["quoted"]))
        else:
            tokens.append(match["atom"])
    return tokens


def command_from(tokens, tag):
    """Nest the parenthesized lists; check tag and verb."""
    stack = [[]]
    for token in tokens:
        if token == "(":
            stack.append([])
        elif token == ")" and len(stack) > 1:
            inner = stack.pop()
            stack[-1].append(inner)
        elif token == ")":
            raise Refused(IMAP_SYNTAX, _valid_tag(tag))
        else:
            stack[-1].append(token)
    words = stack[0]
    if len(stack) > 1 or len(words) < 2 or not all(isinstance(w, bytes) for w in words[:2]) \
            or not TAG.fullmatch(words[0]):
        raise Refused(b"BAD missing tag or command", _valid_tag(tag))
    return Command(words[1].decode("ascii", "replace").upper(), words[2:], words[0])


def _valid_tag(tag):
    return tag if TAG.fullmatch(tag) else b"*"


def strings(args, count):
    """Exactly `count` string arguments (atom, quoted or literal), as text."""
    if len(args) != count or not all(isinstance(arg, bytes) for arg in args):
        raise Refused(IMAP_SYNTAX)
    return [arg.decode("utf-8", "replace") for arg in args]


def mailbox_matches(pattern):
    """Does the LIST pattern name INBOX?  (`*` and `%` are wildcards.)"""
    regex = "".join(".*" if ch in "*%" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, "INBOX", re.IGNORECASE) is not None


def parse_sequence_set(text, largest):
    """[(low, high)] from `1`, `2:3`, `4:*`, `1,3`; `*` is `largest`."""
    ranges = []
    for part in text.split(b","):
        match = SET_PART.fullmatch(part)
        if not match:
            raise Refused(b"BAD invalid message set")
        ends = [None if end == b"*" else int(end) for end in (match[1], match[2] or match[1])]
        if 0 in ends:
            raise Refused(b"BAD invalid message set")
        ends = [largest if end is None else end for end in ends]
        ranges.append((min(ends), max(ends)))
    return ranges


def _in_ranges(number, ranges):
    return any(low <= number <= high for low, high in ranges)


def parse_flags(args):
    """STORE's flags, a list or bare atoms, as the canonical system flags."""
    words = [word for arg in args for word in (arg if isinstance(arg, list) else [arg])]
    canonical = {flag.lower(): flag for flag in SYSTEM_FLAGS}
    flags = {canonical.get(word.decode("ascii", "replace").lower()) if isinstance(word, bytes)
             else None for word in words}
    if None in flags:
        raise Refused(b"BAD only system flags can be stored")
    return flags


def flag_list(flags):
    return b"(" + " ".join(sorted(flags)).encode() + b")"


def internaldate(seconds):
    """RFC 3501 9 date-time, in UTC: "17-Jul-1996 02:44:25 +0000"."""
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{when.day:02d}-{MONTHS[when.month - 1]}-{when:%Y %H:%M:%S} +0000"


# ===================================================================== POP3

class Pop3Backend(Conversation):
    """POP3 (RFC 1939) with CAPA (RFC 2449).  The maildrop is the mailbox
    as it was at PASS; DELE marks, QUIT removes, RSET unmarks."""

    protocol = "pop3"
    GREETING, TOO_LONG, TIMED_OUT = POP3_GREETING, POP3_TOO_LONG, POP3_TIMED_OUT
    TOO_MANY_ERRORS, UNKNOWN, NOT_NOW = POP3_TOO_MANY_ERRORS, POP3_UNKNOWN, POP3_NOT_NOW
    STATES = {"authorization": {"USER", "PASS", "CAPA", "QUIT"},
              "transaction": {"STAT", "LIST", "RETR", "UIDL", "TOP", "DELE", "RSET",
                              "NOOP", "CAPA", "QUIT"}}
    state = "authorization"

    def setup(self):
        super().setup()
        self.login = self.user = None
        self.maildrop, self.deleted = [], set()

    def do_CAPA(self, command):
        self.send(POP3_CAPA)

    def do_USER(self, command):
        self.login = command.args.decode("utf-8", "replace")
        self.send(b"+OK send PASS\r\n")

    def do_PASS(self, command):
        login, self.login = self.login, None
        if login is None:
            raise Refused(b"-ERR send USER first")
        if not self.store.check_password(login, command.args.decode("utf-8", "replace")):
            raise Refused(POP3_LOGIN_FAILED)
        self.user, self.state = login, "transaction"
        self.maildrop = self.store.messages(login)
        self.send(b"+OK %d messages\r\n" % len(self.maildrop))

    def do_STAT(self, command):
        live = self.live()
        self.send(b"+OK %d %d\r\n" % (len(live), sum(len(m.data) for _, m in live)))

    def do_LIST(self, command):
        self.listing(command, lambda m: b"%d" % len(m.data))

    def do_UIDL(self, command):
        # RFC 1939 7: a unique-id stays the same across sessions.
        self.listing(command, lambda m: b"%d.%d" % (self.store.uidvalidity, m.uid))

    def listing(self, command, value):
        """LIST and UIDL: one message's line, or all as a multi-line reply."""
        if command.args:
            number, message = self.message(command.args)
            self.send(b"+OK %d %s\r\n" % (number, value(message)))
            return
        lines = [b"%d %s\r\n" % (number, value(m)) for number, m in self.live()]
        self.send(b"+OK %d messages\r\n" % len(lines) + b"".join(lines) + b".\r\n")

    def do_RETR(self, command):
        _, message = self.message(command.args)
        self.send(b"+OK %d octets\r\n" % len(message.data) + dot_stuff(message.data) + b".\r\n")

    def do_TOP(self, command):
        number, _, count = command.args.partition(b" ")
        _, message = self.message(number)
        if not count.strip().isdigit():
            raise Refused(b"-ERR usage: TOP message lines")
        header, text = split_message(message.data)
        lines = text.split(CRLF)[:-1] if text.endswith(CRLF) else text.split(CRLF)
        top = header + b"".join(line + CRLF for line in lines[:int(count)])
        self.send(b"+OK top of message follows\r\n" + dot_stuff(top) + b".\r\n")

    def do_DELE(self, command):
        number, _ = self.message(command.args)
        self.deleted.add(number)
        self.send(b"+OK message %d deleted\r\n" % number)

    def do_RSET(self, command):
        self.deleted.clear()
        self.send(b"+OK\r\n")

    def do_NOOP(self, command):
        self.send(b"+OK\r\n")

    def do_QUIT(self, command):
        """RFC 1939 6: QUIT in the transaction state removes the marked."""
        if self.state == "transaction":
            self.store.delete(self.user, [self.maildrop[n - 1].uid for n in self.deleted])
        self.send(POP3_BYE)
        self.state = CLOSED

    def live(self):
        return [(n, m) for n, m in enumerate(self.maildrop, 1) if n not in self.deleted]

    def message(self, argument):
        """(number, message) for a message-number argument not deleted."""
        text = argument.strip()
        number = int(text) if text.isdigit() else 0
        if not 1 <= number <= len(self.maildrop) or number in self.deleted:
            raise Refused(POP3_NO_MESSAGE)
        return number, self.maildrop[number - 1]


def dot_stuff(data):
    """RFC 1939 3: a line starting with "." gets another; ends with CRLF."""
    if data and not data.endswith(CRLF):
        data += CRLF
    return re.sub(rb"(?m)^\.", b"..", data)


# ===================================================================== SMTP

class SmtpBackend(Conversation):
    """ESMTP (RFC 5321) that delivers to local users, with Postfix's XCLIENT.

    The proxy sends XCLIENT with the client's address, name and login;
    those go into the Received: line of every message, so a reader sees
    who really sent it.  (A real server allows XCLIENT only from the
    proxy's address; the demo trusts everyone on loopback.)
    """

    protocol = "smtp"
    GREETING, TOO_LONG, TIMED_OUT = SMTP_GREETING, SMTP_TOO_LONG, SMTP_TIMED_OUT
    TOO_MANY_ERRORS, UNKNOWN, NOT_NOW = SMTP_TOO_MANY_ERRORS, SMTP_UNKNOWN, SMTP_NOT_NOW
    # No HELO needed before MAIL: after XCLIENT the proxy relays the
    # client's MAIL FROM without a new EHLO (Postfix's default too).
    COMMON = {"EHLO", "HELO", "RSET", "NOOP", "QUIT"}
    STATES = {"ready": COMMON | {"XCLIENT", "MAIL"},
              "mail": COMMON | {"RCPT"},
              "rcpt": COMMON | {"RCPT", "DATA"}}
    state = "ready"

    def setup(self):
        super().setup()
        self.helo = None
        self.xclient = {}
        self.reset()

    def reset(self):
        """Forget the envelope (RSET, EHLO, after DATA; RFC 5321 4.1.4)."""
        self.sender, self.recipients = None, []
        self.state = "ready"

    def do_EHLO(self, command):
        if not command.args.strip():
            raise Refused(b"501 5.5.4 Syntax: EHLO hostname")
        self.helo = command.args.strip().decode("utf-8", "replace")
        self.reset()
        self.send(SMTP_EHLO)

    def do_HELO(self, command):
        if not command.args.strip():
            raise Refused(b"501 5.5.4 Syntax: HELO hostname")
        self.helo = command.args.strip().decode("utf-8", "replace")
        self.reset()
        self.send(SMTP_HELO)

    def do_XCLIENT(self, command):
        """Postfix XCLIENT: NAME=VALUE pairs, xtext-encoded; answered with a
        fresh greeting, as the session starts anew (XCLIENT_README)."""
        attributes = {}
        for pair in command.args.split():
            name, equals, value = pair.partition(b"=")
            name = name.decode("ascii", "replace").upper()
            if not equals or name not in XCLIENT_ATTRIBUTES:
                raise Refused(b"501 5.5.4 Bad XCLIENT attribute name: " + name.encode())
            value = xtext_decode(value).decode("utf-8", "replace")
            attributes[name] = None if value.upper() in XCLIENT_UNKNOWN else value
        if not attributes:
            raise Refused(b"501 5.5.4 Syntax: XCLIENT attribute=value...")
        self.xclient.update(attributes)
        self.helo = None
        self.reset()
        self.send(SMTP_GREETING)

    def do_MAIL(self, command):
        match = MAIL_FROM.fullmatch(command.args)
        if not match:
            raise Refused(b"501 5.5.4 Syntax: MAIL FROM:<address>")
        check_mail_parameters(match[2].split())
        self.sender, self.state = match[1], "mail"
        self.send(SMTP_SENDER_OK)

    def do_RCPT(self, command):
        match = RCPT_TO.fullmatch(command.args)
        if not match:
            raise Refused(b"501 5.5.4 Syntax: RCPT TO:<address>")
        address = match[1].decode("utf-8", "replace")
        user = self.local_user(address)
        if user is None:
            raise Refused(SMTP_NO_USER)
        if len(self.recipients) >= MAX_RECIPIENTS:
            raise Refused(SMTP_TOO_MANY_RECIPIENTS)
        self.recipients.append((address, user))
        self.state = "rcpt"
        self.send(SMTP_RECIPIENT_OK)

    def do_DATA(self, command):
        if command.args.strip():
            raise Refused(b"501 5.5.4 Syntax: DATA")
        self.send(SMTP_GO_AHEAD)
        message = self.read_message()
        if message is None:
            self.say_goodbye(SMTP_TOO_BIG + CRLF)    # the rest is unread: hang up
            self.state = CLOSED
            return
        for address, user in self.recipients:
            self.store.deliver(user, self.received_line(address) + message)
        self.reset()
        self.send(SMTP_QUEUED)

    def do_RSET(self, command):
        self.reset()
        self.send(SMTP_OK)

    def do_NOOP(self, command):
        self.send(SMTP_OK)

    def do_QUIT(self, command):
        self.send(SMTP_BYE)
        self.state = CLOSED

    def read_message(self):
        """DATA's lines up to "." alone, dot-unstuffed (RFC 5321 4.5.2);
        None once the message passes MAX_MESSAGE."""
        lines, size = [], 0
        while True:
            line = self.reader.readline()
            if line in (b".\r\n", b".\n"):
                return b"".join(lines)
            line = line[1:] if line.startswith(b".") else line
            size += len(line)
            if size > MAX_MESSAGE:
                return None
            lines.append(line)

    def local_user(self, address):
        """The user an address delivers to: the whole address, or its local part."""
        local, at, _ = address.rpartition("@")
        for candidate in (address, local if at else None):
            if candidate in self.store.users:
                return candidate
        return None

    def received_line(self, address):
        """RFC 5321 4.4 trace line naming the client as XCLIENT described it."""
        addr = self.xclient.get("ADDR") or self.client_address[0]
        addr = addr[5:] if addr.upper().startswith("IPV6:") else addr
        login = self.xclient.get("LOGIN")
        via = f"ESMTPA (Authenticated sender: {_printable(login)})" if login else "ESMTP"
        return (f"Received: from {_printable(self.helo or 'unknown')}"
                f" ({_printable(self.xclient.get('NAME') or 'unknown')} [{_printable(addr)}])\r\n"
                f"\tby {HOSTNAME} (mailproxy demo backend) with {via}\r\n"        # RFC 3848
                f"\tfor <{_printable(address)}>; {email.utils.formatdate(localtime=True)}\r\n"
                ).encode("utf-8")


def _printable(value):
    """A value from the network, made safe inside a header: a decoded CR or
    LF (xtext "+0D+0A") must not end the Received: line early."""
    return "".join(ch if ch.isprintable() else "?" for ch in value)


def check_mail_parameters(parameters):
    """MAIL FROM's ESMTP parameters: SIZE (RFC 1870) and BODY (RFC 6152)."""
    for parameter in parameters:
        key, _, value = parameter.partition(b"=")
        key = key.upper()
        if key == b"SIZE" and value.isdigit() and int(value) > MAX_MESSAGE:
            raise Refused(SMTP_TOO_BIG)
        if key not in (b"SIZE", b"BODY"):
            raise Refused(b"555 5.5.4 Unsupported option: " + parameter)


def xtext_decode(value):
    """RFC 3461 4: "+XX" is the byte with hex value XX."""
    return re.sub(rb"\+([0-9A-Fa-f]{2})", lambda m: bytes((int(m[1], 16),)), value)


# ================================================================= serving

class BackendServer(socketserver.ThreadingTCPServer):
    """One demo backend's listener.  It knows the store, and the open
    connections, so that `end_connections()` can end them at close."""

    allow_reuse_address = True

    def __init__(self, address, handler, store):
        self.store = store
        # The accept thread adds connections, handler threads remove them,
        # and close() ends them all from yet another thread.
        self._connections_lock = threading.Lock()
        self._connections = set()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def end_connections(self):
        """Shut every open connection, so its handler thread sees EOF."""
        with self._connections_lock:
            live = list(self._connections)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.exception("demo %s backend: unexpected error with %s:%s",
                      self.RequestHandlerClass.protocol, *client_address[:2])


class DemoBackends:
    """The three backends, serving; `close()` stops them (also on `with` exit)."""

    def __init__(self, store, servers):
        self.store = store
        self.servers = servers          # {"imap": BackendServer, "pop3": ..., "smtp": ...}
        self.threads = [threading.Thread(target=server.serve_forever, name=f"demo {name} backend",
                                         kwargs={"poll_interval": POLL_INTERVAL})
                        for name, server in servers.items()]
        for thread in self.threads:
            thread.start()

    @property
    def imap_port(self):
        return self.servers["imap"].server_address[1]

    @property
    def pop3_port(self):
        return self.servers["pop3"].server_address[1]

    @property
    def smtp_port(self):
        return self.servers["smtp"].server_address[1]

    def close(self):
        """Stop accepting, end open conversations, join every thread."""
        for server in self.servers.values():
            server.shutdown()
        for server in self.servers.values():
            server.end_connections()
            server.server_close()       # joins the handler threads (block_on_close)
        for thread in self.threads:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_backends(store, host="127.0.0.1", ports=(0, 0, 0)):
    """Serve IMAP, POP3 and SMTP from `store` on (imap, pop3, smtp) `ports`
    (0: any free port); a DemoBackends with the ports and `close()`."""
    servers = {}
    try:
        for (name, handler), port in zip((("imap", ImapBackend), ("pop3", Pop3Backend),
                                          ("smtp", SmtpBackend)), ports):
            servers[name] = BackendServer((host, port), handler, store)
    except OSError:
        for server in servers.values():
            server.server_close()
        raise
    return DemoBackends(store, servers)
