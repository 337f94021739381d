"""The demo SMTP backend: ESMTP (RFC 5321) delivering to the mailstore,
with Postfix's XCLIENT.
"""

import email.utils
import re

from .backend_common import CLOSED, CRLF, HOSTNAME, Conversation, Refused

MAX_MESSAGE = 10 * 1024 * 1024  # the SMTP SIZE we advertise (RFC 1870)
MAX_RECIPIENTS = 100        # RFC 5321 4.5.3.1.8: the fewest a server must accept

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

MAIL_FROM = re.compile(rb"FROM:\s*<([^<>]*)>(.*)", re.I | re.S)
RCPT_TO = re.compile(rb"TO:\s*<([^<>]*)>.*", re.I | re.S)


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
