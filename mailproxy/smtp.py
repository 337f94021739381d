"""SMTP before authentication (RFC 5321, RFC 4954 AUTH), as nginx.

Two kinds of client meet the proxy on SMTP:
* a mail user agent submitting mail, which authenticates with AUTH
  (PLAIN, LOGIN, CRAM-MD5, EXTERNAL, XOAUTH2, OAUTHBEARER) before MAIL FROM;
* with `smtp_auth none`, an MTA delivering mail (MX mode): it never
  authenticates, so its first RCPT TO starts the auth request (method
  `none`), carrying the HELO name, MAIL FROM and RCPT TO lines so the auth
  service can choose the backend per recipient.

Words are separated by SP only (words.py), as nginx's parser.
Before the greeting the client's host name is looked up (ops/resolver.py) and,
with `smtp_greeting_delay`, a client that talks first is turned away.
"""

from . import backend, backend_sasl, words
from .auth_http import AuthServiceError
from .ops.resolver import TEMPUNAVAIL, UNAVAILABLE, HostResolver
from .sasl import GATED_METHODS, Credentials, SaslError
from .session import Command, Rejected, Session

INTERNAL_ERROR = b"451 4.3.2 Internal server error\r\n"
NO_CERTIFICATE = b"421 4.7.1 No required SSL certificate\r\n"
CERTIFICATE_ERROR = b"421 4.7.1 SSL certificate error\r\n"
START_TLS = b"220 2.0.0 Start TLS\r\n"
INVALID = b"500 5.5.1 Invalid command\r\n"
INVALID_ARGUMENT = b"501 5.5.4 Invalid argument\r\n"
BAD_BASE64 = b"501 5.5.2 Cannot decode response\r\n"    # RFC 4954 4
BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
AUTH_REQUIRED = b"530 5.7.1 Authentication required\r\n"
STARTTLS_FIRST = b"530 5.7.0 Must issue a STARTTLS command first\r\n"   # RFC 3207 4
TOO_MANY = b"554 5.7.0 Too many commands\r\n"     # past max_commands; the connection closes
PIPELINING_REJECT = b"503 5.5.0 Improper use of SMTP command pipelining\r\n"
OK = b"250 2.0.0 OK\r\n"
BYE = b"221 2.0.0 Bye\r\n"
AUTH_OK = b"235 2.0.0 OK\r\n"           # what the client sees when the relay starts
DEFAULT_ERROR_CODE = "535 5.7.0"
MAX_ARGUMENTS = 11                      # nginx's SMTP parser limit
# What a trace hides (ops/trace.py): everything after the mechanism.
SECRETS = {"AUTH": words.Secret(public=1, counts=(1, 2), mechanism=True)}
SASL_ORDER = (("plain", b"PLAIN"), ("login", b"LOGIN"),
              ("cram-md5", b"CRAM-MD5"), ("external", b"EXTERNAL"),
              ("xoauth2", b"XOAUTH2"), ("oauthbearer", b"OAUTHBEARER"))
ALWAYS_ACCEPTED = {"PLAIN", "LOGIN"}


class Texts:
    """What depends only on the config, built once per server: the EHLO
    block, HELO reply, greeting, accepted mechanisms and the resolver."""

    def __init__(self, config):
        name = config.server_name.encode()
        self.greeting = b"220 " + name + b" ESMTP ready\r\n"
        self.helo = b"250 " + name + b"\r\n"
        caps = [cap.encode() for cap in config.smtp_capabilities]
        lines = [name] + caps
        methods = [token for method, token in SASL_ORDER if method in config.smtp_auth]
        if methods:
            lines.append(b"AUTH " + b" ".join(methods))
        normal = multiline(b"250", lines)
        # By TLS state (spec 3.3.3): STARTTLS last, or the only offer.
        self.ehlo = {"off": normal, "tls": normal,
                     "on": multiline(b"250", lines + [b"STARTTLS"]),
                     "only": multiline(b"250", [name] + caps + [b"STARTTLS"])}
        self.mechanisms = ALWAYS_ACCEPTED | {m.upper() for m in config.smtp_auth
                                             if m in GATED_METHODS}
        self.mx_mode = "none" in config.smtp_auth
        self.resolver = HostResolver(config.resolver, config.resolver_timeout) \
            if config.resolver else None


class SmtpSession(Session):
    """The SMTP dialogue up to AUTH, or up to the first RCPT in MX mode."""

    protocol = "smtp"
    INTERNAL_ERROR = INTERNAL_ERROR
    NO_CERTIFICATE = NO_CERTIFICATE
    CERTIFICATE_ERROR = CERTIFICATE_ERROR
    SECRETS = SECRETS
    BLOCKED_BEFORE_TLS = frozenset({"AUTH"})   # MX mode's MAIL/RCPT/DATA: mx_clear_text()
    STATES = {"start": {"HELO", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP",
                        "QUIT", "VRFY", "EXPN", "HELP", "STARTTLS"}}
    prepare = Texts
    needs_backend_password = False      # XCLIENT needs none; AUTH to the backend checks
    helo_verb = b""                     # HELO or EHLO, as the client last said it
    helo = b""
    esmtp = False                       # once EHLO, always EHLO (spec 7.11)
    mail_from = b""
    rcpt_to = b""
    host = UNAVAILABLE

    def greet(self):
        self.host = self.find_host()
        delay = self.config.smtp_greeting_delay
        talked = bool(delay) and self.client.talked_within(delay)
        # `timeout` starts with the greeting, after the lookups and the delay
        # (spec 3.0, 3.3.2).
        self.client.set_deadline(self.config.timeout)
        if talked:
            self.log.info("client was rejected before greeting")
            self.send(PIPELINING_REJECT)
            self.quit = True
            return
        self.send(self.service.texts.greeting)

    def find_host(self):
        resolver = self.service.texts.resolver
        if resolver is None:
            return UNAVAILABLE
        if not self.client_address:
            return TEMPUNAVAIL
        self.set_step("in resolving")
        host, problem = resolver.lookup(self.client_text)
        if problem:
            self.log.error("%s", problem)
        self.set_step("in auth state")
        return host

    def read_command(self):
        body = words.line_body(self.client.readline(self.command_limit()))
        verb, rest = words.first_word(body)
        if words.has_control(body) or not verb.isalpha():
            raise Rejected(INVALID, counted=True)
        args = words.split_words(rest)
        if len(args) > MAX_ARGUMENTS:
            raise Rejected(INVALID, counted=True)
        return Command(verb.upper().decode(), args, line=body.rstrip(b" "))

    # --------------------------------------------------------- commands

    def do_HELO(self, command):
        self.hello(command, b"HELO", self.service.texts.helo)

    def do_EHLO(self, command):
        self.esmtp = True
        self.hello(command, b"EHLO", self.service.texts.ehlo[self.tls_mode])

    def hello(self, command, verb, reply):
        if len(command.args) != 1:
            raise Rejected(INVALID_ARGUMENT)
        self.helo_verb, self.helo = verb, command.args[0]
        self.mail_from = self.rcpt_to = b""
        self.send(reply)

    def do_AUTH(self, command):
        if not command.args:
            raise Rejected(INVALID_ARGUMENT)
        mechanism = command.args[0].upper().decode("latin-1")
        initial = command.args[1] if len(command.args) == 2 else None
        if len(command.args) > 2 or mechanism not in self.service.texts.mechanisms \
                or (mechanism == "CRAM-MD5" and initial is not None):
            raise Rejected(INVALID)
        if mechanism == "CRAM-MD5":
            self.new_salt()
        try:
            credentials = self.sasl(mechanism, initial, self.command_limit())
        except SaslError:
            raise Rejected(INVALID) from None
        return credentials

    def do_MAIL(self, command):
        self.mx_clear_text()
        if not self.service.texts.mx_mode:
            self.log.info("client was rejected: authentication required")
            raise Rejected(AUTH_REQUIRED)
        if not command.args:
            raise Rejected(INVALID_ARGUMENT)
        if self.mail_from:
            raise Rejected(BAD_SEQUENCE)
        self.mail_from = command.line
        self.set_login(None)        # no stale credentials reach the auth service
        self.send(OK)               # (CVE-2025-53859)

    def do_RCPT(self, command):
        self.mx_clear_text()
        if not self.mail_from:
            raise Rejected(BAD_SEQUENCE)
        if not command.args:
            raise Rejected(INVALID_ARGUMENT)
        self.rcpt_to = command.line
        return Credentials("none", b"")

    def do_DATA(self, command):
        """DATA never comes before the relay: an invalid command (counted,
        as any unknown verb in nginx), or with `starttls only` in MX mode
        the request to start TLS first."""
        self.mx_clear_text()
        raise Rejected(INVALID, counted=True)

    def mx_clear_text(self):
        """`starttls only` in MX mode (beyond nginx, which accepts mail in
        clear text there): MAIL, RCPT and DATA wait for STARTTLS (RFC 3207
        4; `mailproxy -t` warns that a public MX must not require it)."""
        if self.service.texts.mx_mode and self.tls_mode == "only":
            self.log.info("client was rejected: STARTTLS required")
            raise Rejected(STARTTLS_FIRST)

    def do_RSET(self, command):
        self.mail_from = self.rcpt_to = b""
        self.send(OK)

    def do_NOOP(self, command):
        self.send(OK)

    def do_QUIT(self, command):
        self.send(BYE)
        self.quit = True

    def do_VRFY(self, command):
        raise Rejected(INVALID)     # parsed, so not counted (spec 7.12)

    do_EXPN = do_HELP = do_VRFY

    def do_STARTTLS(self, command):
        """RFC 3207 4.2: after TLS the client starts over; HELO, MAIL and
        RCPT are forgotten (the ESMTP mark is not, as in nginx)."""
        self.upgrade(command, START_TLS)
        self.helo_verb = self.helo = self.mail_from = self.rcpt_to = b""

    # ------------------------------------------- shared-frame hooks

    def command_limit(self):
        return self.config.smtp_client_buffer

    def invalid_reply(self, command):
        return INVALID

    def too_many_reply(self, command):
        return TOO_MANY

    def too_long_reply(self, head):
        return INVALID

    def auth_failed_reply(self, reply):
        code = reply.error_code or DEFAULT_ERROR_CODE
        return code.encode("latin-1") + b" " + reply.status.encode("latin-1") + b"\r\n"

    def continuation(self, challenge):
        return b"334 " + challenge.encode() + b"\r\n"

    def sasl_syntax_reply(self):
        return BAD_BASE64

    def back_to_start(self):
        """HELO and MAIL are kept (spec 2.5); the refused RCPT is not, so a
        later AUTH is an ordinary login, not another `none` attempt."""
        self.rcpt_to = b""
        super().back_to_start()

    def auth_extra_headers(self):
        headers = [("Client-Host", self.host)]
        if self.rcpt_to:
            headers += [("Auth-SMTP-Helo", self.helo.decode("latin-1")),
                        ("Auth-SMTP-From", self.mail_from.decode("latin-1")),
                        ("Auth-SMTP-To", self.rcpt_to.decode("latin-1"))]
        return tuple(headers)

    def backend_login(self, stream, login, password, starttls=None, origin=None):
        """`origin` (proxy_client_address) is IMAP's and POP3's: an SMTP
        backend learns the client's address from XCLIENT."""
        plan = backend.SmtpPlan(
            server_name=self.config.server_name.encode(),
            ehlo=self.esmtp or self.config.xclient,
            xclient=self.config.xclient,
            client_ip=self.client_text, client_host=self.host.encode(),
            login=login, password=password,
            helo=(self.helo_verb, self.helo) if self.helo_verb else None,
            auth=self.backend_auth(), backend=(self.auth_reply.server, self.auth_reply.port),
            mail_from=self.mail_from if self.rcpt_to else b"", rcpt_to=self.rcpt_to)
        reply = backend.smtp_login(stream, plan, self.config.proxy_buffer, self.set_step,
                                   starttls)
        return reply if self.rcpt_to else AUTH_OK

    def backend_auth(self):
        """How to authenticate to the backend: a backend_sasl.MECHANISMS
        name or None.  The auth service may choose per session (beyond
        nginx): Auth-Backend-Auth, else the older Auth-SMTP-Auth, else
        `proxy_smtp_auth` decides."""
        reply = self.auth_reply
        choice = reply.backend_auth or reply.header("Auth-SMTP-Auth") or \
            self.config.proxy_smtp_auth
        choice = {"on": "plain", "off": None, "none": None}.get(choice.lower(), choice.lower())
        if choice is not None and choice not in backend_sasl.MECHANISMS:
            raise AuthServiceError(f'auth http server sent invalid Auth-SMTP-Auth "{choice}"')
        return choice


def multiline(code, lines):
    """An SMTP multi-line reply: `250-a`, `250-b`, `250 c` (RFC 5321 4.2.1)."""
    return b"".join(code + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n"
                    for i, line in enumerate(lines))
