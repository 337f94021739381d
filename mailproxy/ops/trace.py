"""Redacted protocol traces: every line before login, secrets replaced by ***.

With `trace on` (or `mailproxy --trace`) a session logs, at `info`, each
line of its pre-login dialogue on both of its connections:

    C:  client -> proxy         S:  proxy -> client
    P:  proxy -> backend        B:  backend -> proxy

and, once the relay starts, nothing but the byte counts at its end.  This is
for teaching and debugging, so the lines are the wire's, with one exception:
whatever proves an identity is shown as `***`: LOGIN passwords (quoted,
atom or literal), every SASL response and initial response (base64), the
APOP and CRAM-MD5 digests, POP3 PASS, and the same on the backend side (the
LOGIN password literal, PASS, AUTH PLAIN and the AUTH LOGIN answers).  The
login itself, challenges and XCLIENT are shown.

Redaction is a set of small pure functions per protocol, with no I/O:

    text, state = imap_client(state, kind, data)   # a client line or literal
    state = imap_server(state, line)               # a line the proxy sent

(`text` is None for nothing worth a line: the bare line end after a literal.)

The state is a short string that says what the next client bytes are: a
command, a SASL response, a password literal...  A line the proxy sends back
ends a SASL exchange unless it is a continuation (`+ `, `334 `).  When the
state does not expect what arrives, the bytes are hidden: a trace may say
too little, never too much.

`Tracer` holds one session's state and decides whether to log at all:
`trace on` logs every session; a CIDR selects clients by address (decided
at the greeting, so a PROXY protocol address counts); `login:NAME` holds
the lines in memory (at most MAX_HELD) until the login is known, then logs
them if it matches.  The session installs `TracedStream` wrappers only when
its server has `trace` set, so sessions of untraced servers pay nothing.
"""

import collections
import ipaddress
import re
from dataclasses import dataclass

REDACTED = "***"
MAX_SHOWN = 300         # characters of one traced line; the rest becomes "..."
MAX_HELD = 100          # lines held per session while waiting for its login

COMMAND, SASL = "command", "sasl"
LOGIN_USER, LOGIN_REST, LOGIN_SECRET = "login-user", "login-rest", "login-secret"
LITERAL, REST = "literal", "rest"
_LITERAL_AT_END = re.compile(rb"\{\d+\+?\}$")
_NON_SYNC_AT_END = re.compile(rb"\{(\d+)\+\}$")


@dataclass(frozen=True)
class Rule:
    """What the `trace` directive selects (None stands for `trace off`)."""
    everyone: bool = False
    networks: tuple = ()        # ipaddress networks
    logins: tuple = ()          # logins as bytes, compared exactly

    def selects_address(self, address):
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False            # unix: sockets have no address
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped     # a dual-stack listener's IPv4 client
        return any(ip.version == net.version and ip in net for net in self.networks)


# ------------------------------------------------------------- helpers

def shown(data):
    """Bytes as a log shows them: no line end, control bytes escaped, bounded."""
    text = bytes(data).rstrip(b"\r\n").decode("utf-8", "backslashreplace")
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _words(line, count):
    """The first `count` space-separated words and what is left (bytes)."""
    parts = line.rstrip(b"\r\n").split(b" ", count)
    return parts[:count] + [b""] * (count - len(parts)), \
        parts[count] if len(parts) > count else b""


def _hidden_after(head, rest):
    """`head`, then *** if anything followed it."""
    return shown(head) + (" " + REDACTED if rest.strip() else "")


def _ends_with_literal(line):
    return bool(_LITERAL_AT_END.search(line.rstrip(b"\r\n")))


def _unknown(line):
    """What is shown of a line that is not a command (perhaps a SASL
    response sent after its command was refused) or is a SASL response:
    *** if it has anything, else no line at all."""
    return REDACTED if line.strip() else None


# ------------------------------------------------------------------ IMAP

def imap_client(state, kind, data):
    """A client line ("line") or literal ("data") -> (text, next state)."""
    if state == SASL and kind == "line":
        return _unknown(data), SASL
    if state == LOGIN_USER and kind == "data":
        return shown(data), LOGIN_REST
    if state == LOGIN_REST and kind == "line":          # after the user: all secret
        hidden = REDACTED if data.strip() else None
        return hidden, LOGIN_SECRET if _ends_with_literal(data) else COMMAND
    if state == LITERAL and kind == "data":
        return shown(data), REST
    if state == REST and kind == "line":
        text = shown(data) if data.strip() else None
        return text, LITERAL if _ends_with_literal(data) else COMMAND
    if state == LOGIN_SECRET and kind == "data":
        return REDACTED, LOGIN_REST
    if state == COMMAND and kind == "line":
        return _imap_command(data)
    return REDACTED, state                  # unexpected: say nothing


def _imap_command(line):
    (tag, verb), rest = _words(line, 2)
    if not (tag and verb.isalpha()):
        return _unknown(line), COMMAND
    if verb.upper() == b"LOGIN":
        user, after = _imap_first_argument(rest)
        if not after and _ends_with_literal(user):
            return shown(line), LOGIN_USER          # the user name comes as a literal
        text = _hidden_after(tag + b" " + verb + b" " + user, after)
        return text, LOGIN_SECRET if _ends_with_literal(after) else COMMAND
    if verb.upper() == b"AUTHENTICATE":
        (mechanism,), initial = _words(rest, 1)
        return _hidden_after(tag + b" " + verb + b" " + mechanism, initial), SASL
    return shown(line), LITERAL if _ends_with_literal(line) else COMMAND


def _imap_first_argument(rest):
    """(the first argument as written, what follows it) of an IMAP line."""
    if rest.startswith(b'"'):
        position = 1
        while position < len(rest) and rest[position:position + 1] != b'"':
            position += 2 if rest[position:position + 1] == b"\\" else 1
        return rest[:position + 1], rest[position + 1:]
    head, _, tail = rest.partition(b" ")
    return head, tail


def imap_server(state, line):
    """A line the proxy sent the client: all but a continuation ends SASL."""
    return state if line.startswith(b"+") else COMMAND


def imap_to_backend(state, data):
    """The proxy's LOGIN to the backend: `TAG LOGIN {n}`, `user {m}` and the
    password as three writes, or all of it in one with non-synchronizing
    literals (`TAG LOGIN {n+}` CRLF user ` {m+}` CRLF password CRLF)."""
    if state == LOGIN_USER:
        user, _, _size = data.rstrip(b"\r\n").rpartition(b" ")
        return shown(user) + " " + REDACTED, LOGIN_SECRET
    if state == LOGIN_SECRET:
        return REDACTED, COMMAND
    (_tag, verb), _ = _words(data, 2)
    if verb.upper() != b"LOGIN":
        return shown(data), COMMAND
    head, _, rest = data.partition(b"\r\n")
    if not rest:
        return shown(data), LOGIN_USER      # synchronizing: the user name comes next
    size = _NON_SYNC_AT_END.search(head)
    user = rest[:int(size.group(1))] if size else b""
    return f"{shown(head)} {shown(user)} {REDACTED}", COMMAND


# ------------------------------------------------------------------ POP3

def pop3_client(state, kind, data):
    if state == SASL or kind != "line":
        return _unknown(data), state
    (verb,), rest = _words(data, 1)
    if not verb.isalpha():
        return _unknown(data), COMMAND
    if verb.upper() == b"PASS":
        return _hidden_after(verb, rest), COMMAND
    if verb.upper() == b"APOP":
        (user,), digest = _words(rest, 1)
        return _hidden_after(verb + b" " + user, digest), COMMAND
    if verb.upper() == b"AUTH" and rest.strip():
        (mechanism,), initial = _words(rest, 1)
        return _hidden_after(verb + b" " + mechanism, initial), SASL
    return shown(data), COMMAND


def pop3_server(state, line):
    """`+ ` continues a SASL exchange; `+OK` and `-ERR` end it."""
    return state if line.startswith(b"+ ") else COMMAND


def pop3_to_backend(state, data):
    (verb,), rest = _words(data, 1)
    if verb.upper() == b"PASS":
        return _hidden_after(verb, rest), state
    return shown(data), state


# ------------------------------------------------------------------ SMTP

def smtp_client(state, kind, data):
    if state == SASL or kind != "line":
        return _unknown(data), state
    (verb,), rest = _words(data, 1)
    if not verb.isalpha():
        return _unknown(data), COMMAND
    if verb.upper() == b"AUTH" and rest.strip():
        (mechanism,), initial = _words(rest, 1)
        return _hidden_after(verb + b" " + mechanism, initial), SASL
    return shown(data), COMMAND


def smtp_server(state, line):
    """`334 ` continues a SASL exchange (RFC 4954 4); any other reply ends it."""
    return state if line.startswith(b"334 ") else COMMAND


def smtp_to_backend(state, data):
    """AUTH PLAIN's token and AUTH LOGIN's two answers are hidden."""
    if state == SASL:
        return REDACTED, SASL
    (verb,), rest = _words(data, 1)
    if verb.upper() == b"AUTH":
        (mechanism,), initial = _words(rest, 1)
        return _hidden_after(verb + b" " + mechanism, initial), \
            COMMAND if initial.strip() else SASL
    return shown(data), COMMAND


def unchanged(state, line):
    return state


@dataclass(frozen=True)
class Redactor:
    """One protocol's four functions: client lines, proxy replies, lines to
    the backend, backend replies."""
    client: object
    server: object
    to_backend: object
    from_backend: object


REDACTORS = {
    "imap": Redactor(imap_client, imap_server, imap_to_backend, unchanged),
    "pop3": Redactor(pop3_client, pop3_server, pop3_to_backend, unchanged),
    "smtp": Redactor(smtp_client, smtp_server, smtp_to_backend, smtp_server),
}


# ---------------------------------------------------------------- tracer

class Tracer:
    """One session's trace.  `selected` is True (log), False (never), or
    None (hold the lines until the login or the address decides)."""

    def __init__(self, rule, protocol, log, client_address):
        self.rule, self.log = rule, log
        self.client_address = client_address     # callable: the address as now known
        self.redactor = REDACTORS[protocol]
        self.client_state = self.backend_state = COMMAND
        self.selected = True if rule.everyone else None
        self.address_checked = False
        self.held = collections.deque(maxlen=MAX_HELD)
        self.dropped = 0

    # ------------------------------------------------------- streams

    def client_stream(self, stream):
        return TracedStream(stream, self.from_client, self.to_client)

    def backend_stream(self, stream):
        return TracedStream(stream, self.from_backend, self.to_backend)

    def from_client(self, kind, data):
        text, self.client_state = self.redactor.client(self.client_state, kind, data)
        self.note("C:", text)

    def to_client(self, data):
        if not self.address_checked and self.rule.networks:
            self.decide_by_address()
        for line in _lines(data):
            self.client_state = self.redactor.server(self.client_state, line)
            self.note("S:", shown(line))

    def to_backend(self, data):
        """One write is one command (backend.py writes them so); it is not
        split, so a login with a line break cannot shift the redaction."""
        text, self.backend_state = self.redactor.to_backend(self.backend_state, bytes(data))
        self.note("P:", text)

    def from_backend(self, kind, data):
        if kind != "line":
            self.note("B:", REDACTED)
            return
        self.backend_state = self.redactor.from_backend(self.backend_state, data)
        self.note("B:", shown(data))

    # ------------------------------------------------------ selection

    def decide_by_address(self):
        """At the first line to the client (after any PROXY header)."""
        self.address_checked = True
        if self.selected is not None:
            return
        if self.rule.selects_address(self.client_address()):
            self.select()
        elif not self.rule.logins:
            self.selected = False
            self.held.clear()

    def login(self, login):
        """The client named its login (each attempt): a listed one starts
        the trace with the held lines; another drops them."""
        if self.selected is not None:
            return
        if login in self.rule.logins:
            self.select()
        else:
            self.held.clear()
            self.dropped = 0

    def select(self):
        self.selected = True
        if self.dropped:
            self.log.info("trace: %d earlier lines not kept", self.dropped)
        while self.held:
            self.log.info("%s %s", *self.held.popleft())

    def note(self, direction, text):
        if text is None:
            return
        if self.selected:
            self.log.info("%s %s", direction, text)
        elif self.selected is None:
            if len(self.held) == MAX_HELD:
                self.dropped += 1
            self.held.append((direction, text))

    def relayed(self, from_client, from_backend):
        if self.selected:
            self.log.info("trace: relay done, %d bytes from the client, %d bytes from the "
                          "backend", from_client, from_backend)


class TracedStream:
    """A stream.Stream that shows every line it reads or writes to the
    tracer; everything else is the wrapped stream's."""

    def __init__(self, stream, on_read, on_write):
        self.stream, self.on_read, self.on_write = stream, on_read, on_write

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def readline(self, limit):
        line = self.stream.readline(limit)
        self.on_read("line", line)
        return line

    def read_exact(self, size):
        data = self.stream.read_exact(size)
        self.on_read("data", data)
        return data

    def write(self, data):
        self.stream.write(data)
        self.on_write(data)


def _lines(data):
    return bytes(data).splitlines(keepends=True) or [b""]
