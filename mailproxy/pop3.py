"""POP3 before login (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH), as nginx.

The proxy answers CAPA, AUTH (the method list), NOOP and QUIT itself and
takes credentials from USER/PASS, APOP or AUTH.  The parser follows nginx
(spec 3.2): a four-letter keyword, at most three arguments separated by
SP (words.py), and for USER and PASS everything after the keyword is one
argument, spaces included.
"""

from . import backend, words
from .sasl import GATED_METHODS, Credentials, SaslError, apop
from .session import Command, Rejected, Session

GREETING = b"+OK POP3 ready"
INTERNAL_ERROR = b"-ERR internal server error\r\n"
NO_CERTIFICATE = b"-ERR No required SSL certificate\r\n"
CERTIFICATE_ERROR = b"-ERR SSL certificate error\r\n"
INVALID = b"-ERR invalid command\r\n"
TOO_MANY = b"-ERR too many commands\r\n"      # past max_commands; the connection closes
OK = b"+OK\r\n"
CAPA_HEADER = b"+OK Capability list follows\r\n"
AUTH_HEADER = b"+OK methods supported:\r\n"
END = b".\r\n"
MAX_ARGUMENTS = 3
WHOLE_LINE_ARGUMENT = {"USER", "PASS"}  # "USER my user" logs in as "my user"
SECRETS = {"PASS": words.Secret(),      # what a trace hides (ops/trace.py)
           "APOP": words.Secret(public=1, counts=(2,)),
           "AUTH": words.Secret(public=1, counts=(1, 2), mechanism=True)}
SASL_ORDER = (("plain", b"PLAIN"), ("plain", b"LOGIN"),   # `plain` enables LOGIN too
              ("cram-md5", b"CRAM-MD5"), ("external", b"EXTERNAL"),
              ("xoauth2", b"XOAUTH2"), ("oauthbearer", b"OAUTHBEARER"))
ALWAYS_ACCEPTED = {"PLAIN", "LOGIN"}


class Texts:
    """Reply lines that depend only on the config, built once per server."""

    def __init__(self, config):
        names = [name for method, name in SASL_ORDER if method in config.pop3_auth]
        caps = b"".join(cap.encode() + b"\r\n" for cap in config.pop3_capabilities)
        sasl = b" ".join([b"SASL"] + names) + b"\r\n"
        normal = CAPA_HEADER + caps + sasl + END
        no_user = b"".join(cap.encode() + b"\r\n" for cap in config.pop3_capabilities
                           if cap.upper() != "USER")
        # By TLS state (spec 3.2); in the USER state always `normal` (a quirk).
        self.capa = {"off": normal, "tls": normal,
                     "on": CAPA_HEADER + caps + sasl + b"STLS\r\n" + END,
                     "only": CAPA_HEADER + no_user + b"STLS\r\n" + END}
        self.auth_methods = AUTH_HEADER + b"".join(n + b"\r\n" for n in names) + END
        self.mechanisms = ALWAYS_ACCEPTED | {m.upper() for m in config.pop3_auth
                                             if m in GATED_METHODS}
        self.salted = bool({"apop", "cram-md5"} & config.pop3_auth)
        self.apop = "apop" in config.pop3_auth


class Pop3Session(Session):
    """The POP3 dialogue up to a successful PASS, APOP or AUTH."""

    protocol = "pop3"
    INTERNAL_ERROR = INTERNAL_ERROR
    NO_CERTIFICATE = NO_CERTIFICATE
    CERTIFICATE_ERROR = CERTIFICATE_ERROR
    BLOCKED_BEFORE_TLS = frozenset({"USER", "APOP", "AUTH"})
    STATES = {"start": {"USER", "APOP", "AUTH", "CAPA", "NOOP", "QUIT", "STLS"},
              "user": {"PASS", "CAPA", "NOOP", "QUIT"}}
    SECRETS = SECRETS
    prepare = Texts
    user = b""

    def greet(self):
        """`+OK POP3 ready`, with the APOP timestamp when a digest may follow."""
        if self.service.texts.salted:
            self.send(GREETING + b" " + self.new_salt() + b"\r\n")
        else:
            self.send(GREETING + b"\r\n")

    def read_command(self):
        body = words.line_body(self.client.readline(self.command_limit()))
        verb, rest = words.first_word(body)
        if words.has_bare_cr(body) or len(verb) != 4 or not verb.isalpha():
            raise Rejected(INVALID, counted=True)
        verb = verb.upper().decode()
        if verb in WHOLE_LINE_ARGUMENT:
            return Command(verb, [rest] if rest else [], line=body)
        args = words.split_words(rest)
        if len(args) > MAX_ARGUMENTS:
            raise Rejected(INVALID, counted=True)
        return Command(verb, args, line=body)

    # --------------------------------------------------------- commands

    def do_USER(self, command):
        if len(command.args) != 1:
            raise Rejected(INVALID)
        self.user = command.args[0]
        self.state = "user"
        self.send(OK)

    def do_PASS(self, command):
        if len(command.args) != 1:
            raise Rejected(INVALID)
        return Credentials("plain", self.user, command.args[0])

    def do_APOP(self, command):
        if len(command.args) != 2 or not self.service.texts.apop:
            raise Rejected(INVALID)
        return apop(command.args[0], command.args[1], self.salt)

    def do_AUTH(self, command):
        if not command.args:
            self.send(self.service.texts.auth_methods)
            return
        mechanism = command.args[0].upper().decode("latin-1")
        initial = command.args[1] if len(command.args) == 2 else None
        if len(command.args) > 2 or mechanism not in self.service.texts.mechanisms \
                or (mechanism == "CRAM-MD5" and initial is not None):
            raise Rejected(INVALID)
        try:
            credentials = self.sasl(mechanism, initial, self.command_limit())
        except SaslError:
            raise Rejected(INVALID) from None
        return credentials

    def do_STLS(self, command):
        self.upgrade(command, OK)

    def do_CAPA(self, command):
        mode = "off" if self.state == "user" else self.tls_mode
        self.send(self.service.texts.capa[mode])

    def do_NOOP(self, command):
        self.send(OK)

    def do_QUIT(self, command):
        self.send(OK)
        self.quit = True

    # ------------------------------------------- shared-frame hooks

    def command_limit(self):
        """`pop3_client_buffer` (freenginx): nginx's POP3 buffer is a fixed
        128 bytes, too small for an XOAUTH2 token (Office 365's exceed 2,500)."""
        return self.config.pop3_client_buffer

    def invalid_reply(self, command):
        return INVALID

    def too_many_reply(self, command):
        return TOO_MANY

    def too_long_reply(self, head):
        return INVALID

    def auth_failed_reply(self, reply):
        return b"-ERR " + reply.status.encode("latin-1") + b"\r\n"

    def continuation(self, challenge):
        return b"+ " + challenge.encode() + b"\r\n"

    def sasl_syntax_reply(self):
        return INVALID

    def back_to_start(self):
        self.user = b""
        super().back_to_start()

    def backend_login(self, stream, login, password, starttls=None, origin=None):
        reply = self.auth_reply
        return backend.pop3_login(stream, login, password, self.config.proxy_buffer,
                                  self.set_step, starttls, origin, self.log,
                                  sasl=reply.backend_auth, address=(reply.server, reply.port))
