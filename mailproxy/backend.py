"""Connecting to the backend and logging in on the client's behalf.

The auth service has named a backend (`Auth-Server`:`Auth-Port`) and the
login and password to use there.  `new_socket()` makes the socket (the
session holds it from then on, so a fast stop can cut a connect in
progress) and `connect()` connects it under the `timeout` deadline, which
then covers the whole login dialogue (spec 4.1); the protocol's login
function (`imap_login`, ...) replays the login and returns the backend's
final reply, which the session forwards to the client.

Every backend reply is one bounded line (`proxy_buffer`, spec 4.5).  A reply
that is not the expected one raises BackendError carrying the backend's
bytes, which the client sees verbatim only with `proxy_pass_error_message
on`; a close, a timeout or an overlong line always gives the client the
protocol's internal-error line.  A failure before the backend has greeted
(refused, unreachable, timed out, closed, a TLS handshake that failed, a
greeting that is not one) raises Unreachable, its subclass, which
`proxy_backend_tries` may answer by asking the auth service for another
backend (login.py).

With `proxy_client_address on`, an IMAP or POP3 backend is told who the
client is before the login (`Origin`): IMAP's ID command with Dovecot's
x-originating-* fields when the backend announces ID, POP3's XCLIENT when
it announces XCLIENT.  A backend that refuses it still gets the login.
"""

import contextlib
import logging
import re
import socket
import ssl
from dataclasses import dataclass

from . import backend_sasl, words
from .log import LEVELS
from .stream import Closed, Stream, TooLong

ALERT = LEVELS["alert"]
LITERAL_MINUS_MAX = 4096  # RFC 7888: the longest non-synchronizing literal LITERAL- allows
_GREETING_CAPABILITY = re.compile(rb"\* OK \[CAPABILITY ([^\]\r\n]*)\]", re.IGNORECASE)
_POP3_XCLIENT = re.compile(rb"\+OK \[XCLIENT\]", re.IGNORECASE)   # Dovecot's greeting code
MAX_CAPABILITY_LINES = 64   # lines of a CAPABILITY or CAPA reply read before giving up


class BackendError(Exception):
    """The backend login failed.  `reply` is what the backend said (None
    when it said nothing usable: closed, timed out, line too long);
    `level` is the log level the session logs it at."""

    def __init__(self, message, reply=None, level=logging.ERROR):
        super().__init__(message)
        self.reply, self.level = reply, level


class Unreachable(BackendError):
    """The backend could not be reached: no connection, no TLS, no
    greeting (proxy_backend_tries may try another one)."""


@contextlib.contextmanager
def reaching():
    """Any BackendError inside (connecting, the greeting) is Unreachable."""
    try:
        yield
    except BackendError as exc:
        raise Unreachable(str(exc), exc.reply, exc.level) from None


@dataclass(frozen=True)
class Origin:
    """Who the client is, for `proxy_client_address`: its real address
    (after the PROXY protocol and set_real_ip_from), the address it
    connected to (None for a unix-domain listener without a PROXY header),
    and the session's connection number, as the logs show it."""
    client_ip: str
    client_port: int
    server_ip: str = None
    server_port: int = None
    session: int = 0


def new_socket(server):
    """The socket for a backend at `server`, not yet connected.  The
    session holds it before connect() starts, so that a fast stop can shut
    down a connect in progress (socket.create_connection would hide the
    socket until it is connected)."""
    # Auth-Server is an IP literal (spec 2.4): no name lookup is needed.
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET)
    except OSError as exc:      # out of descriptors: nginx's [alert], and the client is told
        raise BackendError(f"socket() failed ({exc.errno}: {exc.strerror})",
                           level=ALERT) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(sock, server, port, timeout, tls=None, proxy_header=b""):
    """Connect `sock` (new_socket) and return a Stream to the backend whose
    deadline covers connect + login; with `proxy_ssl` (tls.implicit) the
    TLS handshake too.  A PROXY header (`proxy_protocol on|v2`) is the
    first thing sent (spec 4.7).  The caller closes `sock` when done with
    it, after a failure too."""
    stream = Stream(sock)
    stream.set_deadline(timeout)
    sock.settimeout(timeout)
    try:
        sock.connect((server, port))
    except TimeoutError:
        raise Unreachable("upstream timed out (connecting)") from None
    except OSError as exc:
        raise Unreachable(f"connect() failed ({exc.errno}: {exc.strerror})") from None
    with reaching():
        if proxy_header:
            send_proxy_header(sock, proxy_header)
        if tls and tls.implicit:
            start_tls(stream, tls, server)
    return stream


def send_proxy_header(sock, header):
    """One send() on the fresh socket, which the kernel must take whole: a
    header split over two writes is an error in nginx (spec 4.7), and a
    backend reading it in pieces could take it for two."""
    try:
        sent = sock.send(header)
    except OSError as exc:
        sock.close()
        raise BackendError(f"could not send PROXY protocol header ({exc.strerror or exc})") \
            from None
    if sent != len(header):
        sock.close()
        raise BackendError("could not send PROXY protocol header at once")


def start_tls(stream, tls, address):
    """TLS to the backend (beyond nginx); a failed verification or pin is
    an error that says exactly why."""
    channel = tls.channel(stream.sock, address)
    try:
        stream.start_tls(channel)
    except ssl.SSLCertVerificationError as exc:
        raise BackendError(f"upstream SSL certificate verify error: ({exc.verify_message})") \
            from None
    except ssl.SSLError as exc:
        raise BackendError(f"upstream SSL handshake failed ({exc.reason or exc})") from None
    except TimeoutError:
        raise BackendError("upstream timed out (SSL handshake)") from None
    except (ConnectionError, Closed):
        raise BackendError("upstream closed the connection during the SSL handshake") \
            from None
    problem = tls.check_pin(channel)
    if problem:
        raise BackendError(problem)


def read_reply(stream, limit):
    """One line from the backend, LF included, at most `limit` bytes."""
    try:
        return stream.readline(limit)
    except TooLong:
        raise BackendError("upstream sent too long response line") from None
    except Closed:
        raise BackendError("upstream prematurely closed connection") from None
    except TimeoutError:
        raise BackendError("upstream timed out") from None
    except ssl.SSLError as exc:     # not the client's: the session would blame it
        raise BackendError(f"upstream SSL error ({exc.reason or exc})") from None


def send(stream, data):
    try:
        stream.write(data)
    except (Closed, OSError):
        raise BackendError("upstream closed the connection while sending") from None


def expect(line, prefix):
    """Check a reply's start (nginx compares only the first line's prefix)."""
    if not line[:len(prefix)].upper() == prefix.upper():
        raise BackendError(f'upstream sent invalid response: "{_printable(line)}"', line)
    return line


# ------------------------------------------------------------------- IMAP

def imap_login(stream, tag, login, password, limit, step=lambda text: None, starttls=None,
               origin=None, log=None, sasl=None, address=("", 0)):
    """LOGIN with both values as literals, reusing the client's tag (spec
    4.2); returns the lines to forward to the client: the tagged OK, and the
    one untagged line nginx 1.27.3+ allows before it (e.g. a CAPABILITY from
    SmarterMail or Gmail).  `starttls` (beyond nginx, proxy_starttls)
    upgrades the connection first (RFC 3501 6.2.1); `origin` (beyond
    nginx, proxy_client_address) is sent in an ID command before LOGIN.
    `sasl` (beyond nginx, Auth-Backend-Auth): AUTHENTICATE with that
    mechanism instead of LOGIN (backend_sasl.py); `address` is the
    backend's (host, port).

    nginx always sends synchronizing literals: three round trips.  When the
    greeting's CAPABILITY allows non-synchronizing ones (RFC 7888), as
    Dovecot's does, the whole command goes in one write and one round trip
    (beyond nginx: the backend cannot tell the difference; a greeting seen
    before STARTTLS is not trusted for it)."""
    step("reading response from upstream")
    with reaching():
        greeting = expect(read_reply(stream, limit), b"* OK")
    if starttls:
        step("sending starttls to upstream")
        send(stream, tag + b" STARTTLS\r\n")
        expect(read_tagged(stream, tag, limit), tag + b" OK")
        starttls()
    if origin:
        # RFC 3501 6.2.1: capabilities seen before STARTTLS are forgotten.
        known = None if starttls else _greeting_capabilities(greeting)
        imap_id(stream, tag, origin, known, limit, step, log)
    if sasl in backend_sasl.MECHANISMS:
        step("sending authenticate to upstream")
        dialect = backend_sasl.Imap(stream, tag, limit, sasl_ir=not starttls and
                                    b"SASL-IR" in (_greeting_capabilities(greeting) or ()))
        return backend_sasl.authenticate(dialect, sasl, login, password, address)
    send_login(stream, tag, login, password, limit, step,
               one_write=not starttls and _non_synchronizing(greeting, login, password))
    step("reading response from upstream")
    line = read_reply(stream, limit)
    untagged = b""
    if line.startswith(b"* "):
        untagged, line = line, read_reply(stream, limit)
    try:
        expect(line, tag + b" OK")
    except BackendError as exc:     # the client may see the whole reply (spec 4.5)
        exc.reply = untagged + line
        raise
    return untagged + line


def imap_id(stream, tag, origin, capabilities, limit, step, log):
    """proxy_client_address: `ID (...)` with the client's addresses, if
    the backend announces ID (RFC 2971) in `capabilities`, or, when those
    are unknown (None), in its answer to CAPABILITY.  A refusal is
    logged and the login goes on."""
    if capabilities is None:
        step("sending capability to upstream")
        send(stream, tag + b" CAPABILITY\r\n")
        capabilities = _capability_reply(stream, tag, limit)
    if b"ID" not in capabilities:
        log.info("upstream does not announce ID, client address not sent")
        return
    step("sending id to upstream")
    send(stream, tag + b" ID (" + id_fields(origin) + b")\r\n")
    line = read_tagged(stream, tag, limit)
    if not line[:len(tag) + 3].upper() == tag.upper() + b" OK":
        log.info('upstream refused ID: "%s"', _printable(line))


def id_fields(origin):
    """Dovecot's ID fields for the client's address, as IMAP strings."""
    fields = [(b"x-originating-ip", origin.client_ip), (b"x-originating-port", origin.client_port)]
    if origin.server_ip is not None:
        fields += [(b"x-connected-ip", origin.server_ip),
                   (b"x-connected-port", origin.server_port)]
    fields.append((b"x-session-id", origin.session))
    return b" ".join(b'"%s" "%s"' % (name, str(value).encode()) for name, value in fields)


def _greeting_capabilities(greeting):
    """The words of a greeting's [CAPABILITY ...] code, upper-cased, or
    None when it has none."""
    match = _GREETING_CAPABILITY.match(greeting)
    return match.group(1).upper().split() if match else None


def _capability_reply(stream, tag, limit):
    """The words of the `* CAPABILITY` lines before the tagged reply."""
    words_seen = []
    for _ in range(MAX_CAPABILITY_LINES):
        line = read_reply(stream, limit)
        if not line.startswith(b"* "):
            return words_seen
        if line[2:13].upper() == b"CAPABILITY ":
            words_seen += line[13:].upper().split()
    raise BackendError("upstream sent too long CAPABILITY response")


def send_login(stream, tag, login, password, limit, step, one_write):
    """`tag LOGIN {n}` + login + `{m}` + password: in one write with
    non-synchronizing literals, or waiting for each `+` continuation."""
    step("sending login command to upstream")
    if one_write:
        send(stream, b"%s LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n"
             % (tag, len(login), login, len(password), password))
        return
    send(stream, b"%s LOGIN {%d}\r\n" % (tag, len(login)))
    expect(read_reply(stream, limit), b"+")
    step("sending user name to upstream")
    send(stream, b"%s {%d}\r\n" % (login, len(password)))
    expect(read_reply(stream, limit), b"+")
    step("sending password to upstream")
    send(stream, password + b"\r\n")


def _non_synchronizing(greeting, *values):
    """May `values` go as non-synchronizing literals?  Yes if the greeting's
    CAPABILITY has LITERAL+, or LITERAL- and none is over 4096 bytes."""
    capabilities = _greeting_capabilities(greeting)
    if capabilities is None:
        return False
    return b"LITERAL+" in capabilities or \
        (b"LITERAL-" in capabilities and max(map(len, values)) <= LITERAL_MINUS_MAX)


def read_tagged(stream, tag, limit, untagged=3):
    """The tagged reply, skipping a few untagged lines before it."""
    line = read_reply(stream, limit)
    for _ in range(untagged):
        if not line.startswith(b"* "):
            break
        line = read_reply(stream, limit)
    return line


# ------------------------------------------------------------------- POP3

def pop3_login(stream, login, password, limit, step=lambda text: None, starttls=None,
               origin=None, log=None, sasl=None, address=("", 0)):
    """USER then PASS, whatever the client used (spec 4.3); returns the
    backend's final +OK line for the client.  `starttls`: STLS first
    (RFC 2595 4, beyond nginx); `origin`: XCLIENT before USER (beyond
    nginx, proxy_client_address).  `sasl` (beyond nginx, Auth-Backend-Auth):
    AUTH with that mechanism instead of USER/PASS (backend_sasl.py);
    `address` is the backend's (host, port)."""
    if sasl not in backend_sasl.MECHANISMS and \
            (b"\r" in login + password or b"\n" in login + password):
        # Only SASL (base64) can carry them; replayed in USER or PASS, the
        # rest of the line would run as a second command on the backend.
        raise BackendError("login or password holds CR or LF, which USER/PASS cannot carry")
    step("reading response from upstream")
    with reaching():
        greeting = expect(read_reply(stream, limit), b"+OK")
    if starttls:
        step("sending stls to upstream")
        send(stream, b"STLS\r\n")
        expect(read_reply(stream, limit), b"+OK")
        starttls()
    if origin:
        # RFC 2595 4: what the backend said before STLS is forgotten.
        announced = not starttls and bool(_POP3_XCLIENT.match(greeting))
        pop3_xclient(stream, origin, announced, limit, step, log)
    if sasl in backend_sasl.MECHANISMS:
        step("sending auth to upstream")
        return backend_sasl.authenticate(backend_sasl.Pop3(stream, limit), sasl, login,
                                         password, address)
    step("sending user name to upstream")
    send(stream, b"USER " + login + b"\r\n")
    expect(read_reply(stream, limit), b"+OK")
    step("sending password to upstream")
    send(stream, b"PASS " + password + b"\r\n")
    return expect(read_reply(stream, limit), b"+OK")


def pop3_xclient(stream, origin, announced, limit, step, log):
    """proxy_client_address: `XCLIENT ADDR= PORT= SESSION=` if the backend
    announced XCLIENT in its greeting (`announced`: Dovecot's way) or
    lists it in CAPA.  A refusal is logged and the login goes on."""
    if not announced:
        step("sending capa to upstream")
        send(stream, b"CAPA\r\n")
        announced = b"XCLIENT" in _capa_reply(stream, limit)
    if not announced:
        log.info("upstream does not announce XCLIENT, client address not sent")
        return
    step("sending xclient to upstream")
    send(stream, b"XCLIENT ADDR=%s PORT=%d SESSION=%d\r\n"
         % (origin.client_ip.encode(), origin.client_port, origin.session))
    line = read_reply(stream, limit)
    if not line[:3].upper() == b"+OK":
        log.info('upstream refused XCLIENT: "%s"', _printable(line))


def _capa_reply(stream, limit):
    """The capability names (first words, upper-cased) of a CAPA reply
    (RFC 2449 5); none after -ERR."""
    if not read_reply(stream, limit).startswith(b"+OK"):
        return []
    names = []
    for _ in range(MAX_CAPABILITY_LINES):
        line = read_reply(stream, limit)
        if line in (b".\r\n", b".\n"):
            return names
        names += line.upper().split()[:1]
    raise BackendError("upstream sent too long CAPA response")


# ------------------------------------------------------------------- SMTP

@dataclass(frozen=True)
class SmtpPlan:
    """Everything the SMTP backend login needs (spec 4.4)."""
    server_name: bytes
    ehlo: bool                  # EHLO (client used EHLO, or XCLIENT on) else HELO
    xclient: bool
    client_ip: str
    client_host: bytes
    login: bytes
    password: bytes
    helo: tuple = None          # (verb, argument) the client sent, or None
    auth: str = None            # a backend_sasl.MECHANISMS name, or None
    backend: tuple = ("", 0)    # the backend's (host, port), which OAUTHBEARER names
    mail_from: bytes = b""      # MX mode: the client's MAIL and RCPT lines
    rcpt_to: bytes = b""

    def __repr__(self):
        return f"SmtpPlan(login={self.login!r}, auth={self.auth}, xclient={self.xclient})"


def read_smtp_reply(stream, limit):
    """A whole reply, multi-line included (`250-...` up to `250 ...`),
    bounded by `limit` bytes in all (RFC 5321 4.2.1)."""
    reply = b""
    while True:
        line = read_reply(stream, limit - len(reply))
        reply += line
        if line[3:4] != b"-":
            return reply


def expect_code(reply, *codes):
    if reply[:3] not in codes:
        raise BackendError(f'upstream sent invalid response: "{_printable(reply)}"', reply)
    return reply


def smtp_login(stream, plan, limit, step=lambda text: None, starttls=None):
    """Greeting, EHLO/HELO, XCLIENT, the client's own HELO, AUTH, and in MX
    mode MAIL/RCPT; returns the last reply (the client sees the RCPT reply
    in MX mode, `235 2.0.0 OK` otherwise).  `starttls` (beyond nginx):
    EHLO, STARTTLS, and EHLO again over TLS (RFC 3207 4.2) first."""
    def command(line, *codes):
        send(stream, line + b"\r\n")
        return expect_code(read_smtp_reply(stream, limit), *codes)

    step("reading response from upstream")
    with reaching():
        expect_code(read_smtp_reply(stream, limit), b"220")
    hello = (b"EHLO " if plan.ehlo or starttls else b"HELO ") + plan.server_name
    if starttls:
        step("sending starttls to upstream")
        command(hello, b"250")
        command(b"STARTTLS", b"220")
        starttls()
    step("sending helo to upstream")
    reply = command(hello, b"250")
    if plan.xclient:
        step("sending xclient to upstream")
        reply = command(xclient_line(plan), b"220", b"250")
        if plan.helo:
            step("sending client helo to upstream")
            reply = command(plan.helo[0] + b" " + plan.helo[1], b"250")
    if plan.auth:
        if not plan.password:
            raise BackendError("no password available for upstream AUTH")
        step("sending auth to upstream")
        reply = backend_sasl.authenticate(backend_sasl.Smtp(stream, limit), plan.auth,
                                          plan.login, plan.password, plan.backend)
    if plan.rcpt_to:
        step("sending mail from to upstream")
        command(plan.mail_from, b"250")
        step("sending rcpt to to upstream")
        send(stream, plan.rcpt_to + b"\r\n")
        reply = read_smtp_reply(stream, limit)     # any reply: the client judges it
    return reply


def xclient_line(plan):
    """`XCLIENT ADDR=... [LOGIN=...] NAME=...`, values xtext-encoded."""
    addr = plan.client_ip.encode()
    if b":" in addr:
        addr = b"IPV6:" + addr
    line = b"XCLIENT ADDR=" + xtext(addr)
    if plan.login and not plan.auth:
        line += b" LOGIN=" + xtext(plan.login)
    return line + b" NAME=" + xtext(plan.client_host)


def xtext(value):
    """RFC 3461 4: bytes outside "!".."~", "+" and "=" become +XX (upper-case
    hex), so a login cannot inject XCLIENT attributes or commands."""
    return b"".join(b"+%02X" % byte if byte < 0x21 or byte > 0x7E or byte in b"+="
                    else bytes((byte,)) for byte in value)


def _printable(line, limit=200):
    """A backend line for the log: no CR/LF, control bytes escaped, bounded."""
    text = words.line_body(line)[:limit].decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
