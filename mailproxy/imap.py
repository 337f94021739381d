"""IMAP before login (RFC 3501, as nginx's mail module speaks it).

The proxy answers CAPABILITY, NOOP, LOGOUT and (beyond nginx) ID itself,
and takes credentials from LOGIN or AUTHENTICATE: those handlers return
them to the session's command loop, which hands them to login.py.  The
parser follows nginx 1.29 (spec 3.1): a tag of 1-32 characters from
[A-Za-z0-9._-], a keyword of letters, then at most three arguments, each
an atom, a "quoted string" or a literal {N} / {N+}.  A whole command,
literals included, must fit in `imap_client_buffer`.
"""

import re

from . import backend, words
from .sasl import GATED_METHODS, Credentials, SaslError
from .session import Command, Rejected, Session
from .stream import TooLong

GREETING = b"* OK IMAP4 ready\r\n"
INTERNAL_ERROR = b"* BAD internal server error\r\n"
NO_CERTIFICATE = b"* BYE No required SSL certificate\r\n"
CERTIFICATE_ERROR = b"* BYE SSL certificate error\r\n"
BYE = b"* BYE\r\n"
ID_REPLY = b"* ID NIL\r\n"              # RFC 2971: the proxy has nothing to tell
CONTINUE_LITERAL = b"+ OK\r\n"
OK = b"OK completed"
INVALID = b"BAD invalid command"
TOO_MANY = b"BAD too many commands"     # past max_commands; the connection closes
MAX_ARGUMENTS = 3                       # nginx rejects a fourth at parse time
TAG = re.compile(rb"[A-Za-z0-9._-]{1,32}")
# What a trace hides (ops/trace.py): LOGIN's password, AUTHENTICATE's
# initial response.
SECRETS = {"LOGIN": words.Secret(public=1, counts=(2,)),
           "AUTHENTICATE": words.Secret(public=1, counts=(1, 2), mechanism=True)}
AUTH_ORDER = (("plain", b"AUTH=PLAIN"), ("login", b"AUTH=LOGIN"),
              ("cram-md5", b"AUTH=CRAM-MD5"), ("external", b"AUTH=EXTERNAL"),
              ("xoauth2", b"AUTH=XOAUTH2"), ("oauthbearer", b"AUTH=OAUTHBEARER"))
ALWAYS_ACCEPTED = {"PLAIN", "LOGIN"}    # even when imap_auth does not list them


class Texts:
    """Reply lines that depend only on the config, built once per server."""

    def __init__(self, config):
        caps = [cap.encode() for cap in config.imap_capabilities]
        auth = [token for method, token in AUTH_ORDER if method in config.imap_auth]
        normal = _capability(caps + auth)
        # By TLS state (spec 3.1): STARTTLS offered, or required first.
        self.capability = {"off": normal, "tls": normal,
                           "on": _capability(caps + auth + [b"STARTTLS"]),
                           "only": _capability(caps + [b"STARTTLS", b"LOGINDISABLED"])}
        self.mechanisms = ALWAYS_ACCEPTED | {m.upper() for m in config.imap_auth
                                             if m in GATED_METHODS}


class ImapSession(Session):
    """The IMAP dialogue up to a successful LOGIN or AUTHENTICATE."""

    protocol = "imap"
    INTERNAL_ERROR = INTERNAL_ERROR
    NO_CERTIFICATE = NO_CERTIFICATE
    CERTIFICATE_ERROR = CERTIFICATE_ERROR
    SECRETS = SECRETS
    BLOCKED_BEFORE_TLS = frozenset({"LOGIN", "AUTHENTICATE"})
    STATES = {"start": {"CAPABILITY", "NOOP", "LOGOUT", "ID", "LOGIN", "AUTHENTICATE",
                        "STARTTLS"}}
    prepare = Texts
    tag = b"*"

    def greet(self):
        self.send(GREETING)

    # ----------------------------------------------------------- parser

    def read_command(self):
        limit = self.command_limit()
        line = self.client.readline(limit)
        body = words.line_body(line)
        tag, space, rest = body.partition(words.SP)
        if not space or not TAG.fullmatch(tag):
            raise _invalid(b"*", body)
        verb, rest = words.first_word(rest)
        if words.has_bare_cr(body) or not verb.isalpha() \
                or verb.upper().decode() not in self.handlers:
            raise _invalid(tag, body)
        if verb.upper() == b"ID":
            return self.id_command(tag, body)
        written = []
        args = self.read_arguments(tag, rest, limit - len(line), written)
        return Command(verb.upper().decode(), args, tag, line=tag + words.SP + verb,
                       written=written)

    def id_command(self, tag, body):
        """ID's argument is a parenthesized list (RFC 2971), which nginx's
        parser does not know; the proxy ignores it, so it is not parsed.
        A literal in it cannot be skipped safely: refuse that line."""
        if words.ends_with_literal(body):
            raise _invalid(tag, body)
        return Command("ID", (), tag, line=body)

    def read_arguments(self, tag, rest, room, written):
        """Atoms, quoted strings and literals; `room` is what is left of
        the command buffer.  Literals read their bytes and the line after.
        `written` gets each argument as the client wrote it (a literal as
        `{N}`), for the trace."""
        args = []
        while rest:
            if len(args) == MAX_ARGUMENTS:
                raise _invalid(tag, rest)
            if rest.startswith(b'"'):
                value, after = _quoted(tag, rest)
            elif rest.startswith(b"{"):
                value, after, room = self.read_literal(tag, rest, room)
            else:
                value = rest.split(words.SP, 1)[0]     # an atom: anything up to SP
                after = rest[len(value):]
            written.append(rest if rest.startswith(b"{") else rest[:len(rest) - len(after)])
            if after and not after.startswith(words.SP):
                raise _invalid(tag, after)
            args.append(value)
            rest = after.lstrip(words.SP)
        return args

    def read_literal(self, tag, rest, room):
        match = words.LITERAL.fullmatch(rest)
        if not match:
            raise _invalid(tag, rest)
        size, non_sync = int(match.group(1)), match.group(2)
        if size >= room:
            raise TooLong(tag + b" ")
        if not non_sync:
            self.send(CONTINUE_LITERAL)
        value = self.client.read_exact(size)
        try:
            line = self.client.readline(room - size)
        except TooLong:         # what follows a literal is data, not a tag to echo
            raise TooLong(tag + b" ") from None
        rest = words.line_body(line)
        if words.has_bare_cr(rest):       # a bare CR, refused here as on the first line (spec 3.0)
            raise _invalid(tag, rest)
        # After the literal only SP or the line end may follow (nginx 1.29.6).
        return value, rest, room - size - len(line)

    # --------------------------------------------------------- commands

    def do_CAPABILITY(self, command):
        self.send(self.service.texts.capability[self.tls_mode] + _tagged(command.tag, OK))

    def do_NOOP(self, command):
        self.send(_tagged(command.tag, OK))

    def do_LOGOUT(self, command):
        self.send(BYE + _tagged(command.tag, OK))
        self.quit = True

    def do_ID(self, command):
        """Beyond nginx: clients such as OfflineIMAP send ID before login."""
        self.send(ID_REPLY + _tagged(command.tag, OK))

    def do_STARTTLS(self, command):
        self.upgrade(command, _tagged(command.tag, OK))

    def do_LOGIN(self, command):
        if len(command.args) != 2 or not command.args[0]:
            raise Rejected(self.invalid_reply(command))
        self.tag = command.tag
        return Credentials("plain", *command.args)

    def do_AUTHENTICATE(self, command):
        if not 1 <= len(command.args) <= 2:
            raise Rejected(self.invalid_reply(command))
        mechanism = command.args[0].upper().decode("latin-1")
        initial = command.args[1] if len(command.args) == 2 else None
        if mechanism not in self.service.texts.mechanisms:
            raise Rejected(self.invalid_reply(command))
        if mechanism == "CRAM-MD5":
            if initial is not None:
                raise Rejected(self.invalid_reply(command))
            self.new_salt()
        try:
            credentials = self.sasl(mechanism, initial, self.command_limit())
        except SaslError:
            raise Rejected(self.invalid_reply(command)) from None
        except TooLong:         # a SASL line is a credential, not a tag to echo
            raise TooLong(command.tag + b" ") from None
        self.tag = command.tag
        return credentials

    # ------------------------------------------- shared-frame hooks

    def command_limit(self):
        return self.config.imap_client_buffer

    def invalid_reply(self, command):
        return _tagged(command.tag, INVALID)

    def too_many_reply(self, command):
        return _tagged(command.tag, TOO_MANY)

    def too_long_reply(self, head):
        tag, space, _ = head.partition(b" ")
        return _tagged(tag if space and TAG.fullmatch(tag) else b"*", INVALID)

    def auth_failed_reply(self, reply):
        return _tagged(self.tag, b"NO " + reply.status.encode("latin-1"))

    def continuation(self, challenge):
        return b"+ " + challenge.encode() + b"\r\n"

    def sasl_syntax_reply(self):
        return _tagged(self.tag, INVALID)

    def backend_login(self, stream, login, password, starttls=None, origin=None):
        reply = self.auth_reply
        return backend.imap_login(stream, self.tag, login, password,
                                  self.config.proxy_buffer, self.set_step, starttls,
                                  origin, self.log, sasl=reply.backend_auth,
                                  address=(reply.server, reply.port))


def _capability(items):
    return b"* CAPABILITY " + b" ".join(items) + b"\r\n"


def _tagged(tag, text):
    return tag + b" " + text + b"\r\n"


def _invalid(tag, body):
    """A parser-level error: counted, and fatal after a non-synchronizing
    literal, whose bytes would otherwise run as commands (spec 3.1)."""
    return Rejected(_tagged(tag, INVALID), counted=True, close=body.endswith(b"+}"))


def _quoted(tag, rest):
    """A "quoted string" with backslash escapes -> (value, what follows)."""
    value = bytearray()
    position = 1
    while position < len(rest):
        byte = rest[position]
        if byte == 0x5C:            # backslash: the next byte stands for itself
            position += 1
            if position == len(rest):
                break
            value.append(rest[position])
        elif byte == 0x22:
            return bytes(value), rest[position + 1:]
        else:
            value.append(byte)
        position += 1
    raise _invalid(tag, rest)
