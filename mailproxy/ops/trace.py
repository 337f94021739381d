"""Redacted protocol traces: every line before login, secrets replaced by ***.

With `trace on` (or `mailproxy --trace`) a session logs, at `info`, each
line of its pre-login dialogue on both of its connections:

    C:  client -> proxy         S:  proxy -> client
    P:  proxy -> backend        B:  backend -> proxy

and, once the relay starts, nothing but the byte counts at its end.  This is
for teaching and debugging, so the lines are the wire's, with one exception:
whatever proves an identity is shown as `***`: LOGIN passwords (quoted,
atom or literal), every SASL response and initial response (base64:
XOAUTH2 and OAUTHBEARER tokens too, and the answer to an Auth-Error-SASL
challenge), the APOP and CRAM-MD5 digests, POP3 PASS, and the same on the
backend side (the LOGIN password literal, PASS, and every initial response
and answer of an AUTH or AUTHENTICATE, such as an XOAUTH2 token:
backend_sasl.py).  The
login itself, challenges and XCLIENT are shown.

Client lines are redacted from what the session's parser made of them,
never by splitting them again here: a line read before login is held
(not shown) until the session says what it was:

    tracer.command(command, secret, known)  # parsed: its verb's words.Secret
    tracer.refused()                        # the parser refused it: ***
    tracer.sasl(True) ... tracer.sasl(False, failed)   # answers: all ***

so a line is shown only when the parser positively knows it, with the
arguments its verb's Secret marks hidden (`client_text`); an unknown verb,
a refused line, a line inside a SASL exchange, or a one-word line right
after a refused SASL start (a pipelined base64 answer) is `***`.  A trace
may say too little, never too much.

The lines the proxy writes to a backend are its own (backend.py); small
pure functions per protocol hide their secrets:

    text, state = imap_to_backend(state, data)     # one write to the backend

`Tracer` holds one session's state and decides whether to log at all:
`trace on` logs every session; a CIDR selects clients by address (decided
at the greeting, so a PROXY protocol address counts); `login:NAME` holds
the lines in memory (at most MAX_HELD) until the login is known, then logs
them if it matches.  The session installs `TracedStream` wrappers only when
its server has `trace` set, so sessions of untraced servers pay nothing.
"""

import collections
import ipaddress
from dataclasses import dataclass

from .. import words

REDACTED = "***"
MAX_SHOWN = 300         # characters of one traced line; the rest becomes "..."
MAX_HELD = 100          # lines held per session while waiting for its login

COMMAND, SASL = "command", "sasl"       # states of the lines to a backend
LOGIN_USER, LOGIN_SECRET = "login-user", "login-secret"


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
    text = words.line_body(bytes(data)).decode("utf-8", "backslashreplace")
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _words(line, count):
    """The first `count` words (words.py) and what is left (bytes)."""
    found, rest = [], words.line_body(line)
    for _ in range(count):
        word, rest = words.first_word(rest)
        found.append(word)
    return found, rest


def _hidden_after(head, rest):
    """`head`, then *** if anything followed it."""
    return shown(head) + (" " + REDACTED if rest.strip() else "")


def _unknown(line):
    """What is shown of a line the session did not parse as a command it
    knows (perhaps a SASL response sent after its command was refused) or
    of a SASL response: *** if it has anything, else no line at all."""
    return REDACTED if line.strip() else None


# ------------------------------------------------------------ client lines

def client_text(command, secret):
    """What a trace shows of a command the session parsed: the line as
    written, or, for a verb with secrets (`secret`, a words.Secret), its
    head and public arguments, then *** for the rest."""
    if command.written is None:             # POP3, SMTP: the whole line
        head, written = words.first_word(command.line)[0], command.args
    else:                                   # IMAP: tag and verb, arguments as written
        head, written = command.line, command.written
    if secret is None:
        return shown(command.line if command.written is None
                     else words.SP.join([head] + written))
    public = secret.shown_arguments(command.args)
    return _hidden_after(words.SP.join([head] + written[:public]),
                         words.SP.join(written[public:]))


# ------------------------------------------------------------------ IMAP

def imap_to_backend(state, data):
    """The proxy's LOGIN to the backend: `TAG LOGIN {n}`, `user {m}` and the
    password as three writes, or all of it in one with non-synchronizing
    literals (`TAG LOGIN {n+}` CRLF user ` {m+}` CRLF password CRLF)."""
    if state == LOGIN_USER:
        user, _, _size = words.line_body(data).rpartition(words.SP)
        return shown(user) + " " + REDACTED, LOGIN_SECRET
    if state == LOGIN_SECRET:
        return REDACTED, COMMAND
    if state == SASL:
        return REDACTED, SASL
    (tag, verb), rest = _words(data, 2)
    if verb.upper() == b"AUTHENTICATE":
        return _sasl_start(tag + b" " + verb, rest)
    if verb.upper() != b"LOGIN":
        return shown(data), COMMAND
    head, _, rest = data.partition(b"\r\n")
    if not rest:
        return shown(data), LOGIN_USER      # synchronizing: the user name comes next
    size = words.ends_with_literal(head)
    user = rest[:int(size.group(1))] if size and size.group(2) else b""
    return f"{shown(head)} {shown(user)} {REDACTED}", COMMAND


# ------------------------------------------------------------------ POP3

def pop3_to_backend(state, data):
    if state == SASL:
        return REDACTED, SASL
    (verb,), rest = _words(data, 1)
    if verb.upper() == b"AUTH":
        return _sasl_start(verb, rest)
    if verb.upper() == b"PASS":
        return _hidden_after(verb, rest), state
    return shown(data), state


# ------------------------------------------------------------------ SMTP

def smtp_server(state, line):
    """`334 ` continues a SASL exchange (RFC 4954 4); any other reply ends it."""
    return state if line.startswith(b"334 ") else COMMAND


def smtp_to_backend(state, data):
    """AUTH's initial response and every answer after it are hidden."""
    if state == SASL:
        return REDACTED, SASL
    (verb,), rest = _words(data, 1)
    if verb.upper() == b"AUTH":
        return _sasl_start(verb, rest)
    return shown(data), COMMAND


def _sasl_start(head, rest):
    """`AUTH`/`tag AUTHENTICATE` and the mechanism shown, an initial
    response hidden; the answers that follow are hidden until the
    backend's final reply (`*_server`)."""
    (mechanism,), initial = _words(rest, 1)
    return _hidden_after(head + b" " + mechanism, initial), SASL


def plus_server(state, line):
    """IMAP and POP3: a `+` line continues a SASL exchange (RFC 3501 7.5,
    RFC 5034 4); any other line (`+OK` too) ends it."""
    if state != SASL or line.startswith(b"+ ") or words.line_body(line) == b"+":
        return state
    return COMMAND


@dataclass(frozen=True)
class Redactor:
    """One protocol's two functions for the backend side: lines to the
    backend, backend replies."""
    to_backend: object
    from_backend: object


REDACTORS = {
    "imap": Redactor(imap_to_backend, plus_server),
    "pop3": Redactor(pop3_to_backend, plus_server),
    "smtp": Redactor(smtp_to_backend, smtp_server),
}


# ---------------------------------------------------------------- tracer

class Tracer:
    """One session's trace.  `selected` is True (log), False (never), or
    None (hold the lines until the login or the address decides)."""

    def __init__(self, rule, protocol, log, client_address):
        self.rule, self.log = rule, log
        self.client_address = client_address     # callable: the address as now known
        self.redactor = REDACTORS[protocol]
        self.backend_state = COMMAND
        self.pending = []           # client bytes of the command being parsed
        self.queued = []            # lines to the client meanwhile (`+ OK` for a literal)
        self.in_sasl = False        # a SASL exchange is reading the client's answers
        self.maybe_answer = False   # a refused SASL start: answers may follow
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
        """Nothing is shown yet: the session's parser decides what it was."""
        if self.in_sasl:
            self.note("C:", _unknown(data))
        else:
            self.pending.append(bytes(data))

    def to_client(self, data):
        if not self.address_checked and self.rule.networks:
            self.decide_by_address()
        for line in _lines(data):
            if self.pending:
                self.queued.append(line)
            else:
                self.note("S:", shown(line))

    # ------------------------------------ what the session tells it

    def command(self, command, secret, known):
        """The parser made `command` of the pending bytes; `secret` is its
        verb's words.Secret (None: nothing secret), `known` False for a verb
        the protocol does not have.  After a refused SASL start, a line of
        one word may be a base64 answer (base64 has no SP): hidden."""
        single = len(words.split_words(words.line_body(b"".join(self.pending[:1])))) < 2
        if not known or (self.maybe_answer and single):
            text = _unknown(b"".join(self.pending))
        else:
            text = client_text(command, secret)
        self.maybe_answer = (self.maybe_answer and single) or \
            bool(secret and secret.mechanism and command.args)
        self.flush(text)

    def refused(self):
        """The parser refused the pending bytes (or gave up on them)."""
        self.flush(_unknown(b"".join(self.pending)))

    def flush(self, text):
        self.pending.clear()
        self.note("C:", text)
        for line in self.queued:
            self.note("S:", shown(line))
        self.queued.clear()

    def sasl(self, running, failed=False):
        """A SASL exchange starts (True) or ends (False): its lines are
        answers, all hidden; one that failed may leave answers behind."""
        self.in_sasl = running
        self.maybe_answer = failed

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
    """The lines of one write (words.py: a line ends at LF)."""
    return words.lines(bytes(data)) or [b""]
