"""Logging in to the backend with a SASL mechanism (beyond nginx).

nginx logs in to a backend one way per protocol: IMAP LOGIN, POP3 USER and
PASS, SMTP XCLIENT (or AUTH PLAIN with `proxy_smtp_auth`).  The auth service
may ask for a SASL mechanism instead, with the reply header
`Auth-Backend-Auth` (auth_http.py); the proxy then authenticates with
Auth-User and Auth-Pass from that reply:

    plain         RFC 4616: an empty authzid, the user, the password
    login         the user, then the password, each after a challenge
    xoauth2       Google's and Microsoft's `user=U ^A auth=Bearer T ^A ^A`
    oauthbearer   RFC 7628 3.1: `n,a=U, ^A host=H ^A port=P ^A auth=Bearer T ^A ^A`

With xoauth2 or oauthbearer, a client that only speaks passwords reaches a
provider that only takes OAuth 2.0 access tokens: the auth service checks
the password and answers with a token (reference/oauth_tokens.py).

`authenticate()` is one exchange for the three protocols; a dialect says
how each one writes the command and the answers and reads a reply: IMAP
`AUTHENTICATE` (RFC 3501 6.2.2, with the initial response when the greeting
announces SASL-IR, RFC 4959), POP3 `AUTH` (RFC 5034: always after the `+`
challenge, as a token outgrows its 255-octet line for initial responses),
SMTP `AUTH` (RFC 4954, initial response).

A refused token: the provider sends a challenge holding a JSON error (RFC
7628 3.2.2; Google and Microsoft do the same for XOAUTH2), the proxy answers
it as the client must (an empty line for XOAUTH2, the dummy `%x01` for
OAUTHBEARER, RFC 7628 3.2.3), and the failure reply follows.  The decoded
error goes to the log with the failure; the token never does.
"""

import base64
import binascii

from . import backend       # its I/O helpers and _printable(), the log's form of a reply

CANCEL = b"*"               # RFC 3501 6.2.2, RFC 4954 4, RFC 5034 4: abort the exchange
# What answers a provider's error challenge, base64 already (RFC 7628 3.2.3).
AFTER_ERROR = {"xoauth2": b"", "oauthbearer": base64.b64encode(b"\x01")}
MAX_UNTAGGED = 3            # IMAP untagged lines before the tagged reply (a CAPABILITY)
MAX_ERROR_TEXT = 300        # characters of a provider's decoded error kept for the log


def _plain(login, password, address):
    return [b"\0" + login + b"\0" + password]


def _login(login, password, address):
    return [login, password]


def _xoauth2(login, password, address):
    return [b"user=" + login + b"\x01auth=Bearer " + password + b"\x01\x01"]


def _oauthbearer(login, password, address):
    """RFC 7628 3.1: the GS2 header names the user (`,` and `=` escaped as
    in RFC 5801 4), then host, port and the token as key=value pairs."""
    name = login.replace(b"=", b"=3D").replace(b",", b"=2C")
    host, port = address
    return [b"n,a=" + name + b",\x01host=" + host.encode() + b"\x01port=%d" % port +
            b"\x01auth=Bearer " + password + b"\x01\x01"]


# Auth-Backend-Auth values -> the client messages of the mechanism.
MECHANISMS = {"plain": _plain, "login": _login, "xoauth2": _xoauth2,
              "oauthbearer": _oauthbearer}


def authenticate(dialect, mechanism, login, password, address):
    """Run `mechanism` (a MECHANISMS name) with `dialect`; the backend's
    success reply for the client, or BackendError.  `address` is the
    backend's (host, port), which OAUTHBEARER names."""
    pending = MECHANISMS[mechanism](login, password, address)
    initial = dialect.initial_response and mechanism != "login"
    dialect.start(mechanism.upper().encode(),
                  base64.b64encode(pending.pop(0)) if initial else None)
    error = None
    for _ in range(len(pending) + 2):   # each message, one error challenge, then the end
        accepted, challenge, reply = dialect.read()
        if accepted:
            return reply
        if challenge is None:
            raise _refused(mechanism, reply, error)
        if pending:
            dialect.answer(base64.b64encode(pending.pop(0)))
        elif error is None:
            error = _decoded(challenge)
            dialect.answer(AFTER_ERROR.get(mechanism, CANCEL))
        else:
            break
    raise backend.BackendError(f"upstream sent too many {mechanism.upper()} challenges")


def _refused(mechanism, reply, error):
    text = f'upstream sent invalid response: "{backend._printable(reply)}"'
    if error is not None:
        text = f"upstream refused {mechanism.upper()} login ({error}), " + text
    return backend.BackendError(text, reply)


def _decoded(challenge):
    """A provider's error challenge as text for the log: base64-decoded
    when it is base64 (the JSON of RFC 7628 3.2.2), printable, bounded."""
    try:
        text = base64.b64decode(challenge, validate=True)
    except (binascii.Error, ValueError):
        text = challenge
    return backend._printable(text, MAX_ERROR_TEXT) or "no error text"


class Dialect:
    """What the three protocols share: the command is `command` + the
    mechanism [+ the initial response], every answer one line."""

    initial_response = True     # may the first message go with the command?
    command = b"AUTH "

    def __init__(self, stream, limit):
        self.stream, self.limit = stream, limit

    def start(self, mechanism, initial):
        backend.send(self.stream, self.command + mechanism +
                     (b" " + initial if initial else b"") + b"\r\n")

    def answer(self, data):
        backend.send(self.stream, data + b"\r\n")


class Imap(Dialect):
    """`tag AUTHENTICATE MECH [initial]`; `+ challenge` lines; untagged
    lines kept for the client (a CAPABILITY), then the tagged reply."""

    def __init__(self, stream, tag, limit, sasl_ir):
        super().__init__(stream, limit)
        self.tag, self.initial_response = tag, sasl_ir
        self.command = tag + b" AUTHENTICATE "

    def read(self):
        """(accepted, the challenge or None, the reply for the client)."""
        untagged = b""
        line = backend.read_reply(self.stream, self.limit)
        for _ in range(MAX_UNTAGGED):
            if not line.startswith(b"* "):
                break
            untagged += line
            line = backend.read_reply(self.stream, self.limit)
        if line.startswith(b"+") and not untagged:
            return False, line[1:].strip(), line
        return line.upper().startswith(self.tag.upper() + b" OK"), None, untagged + line


class Pop3(Dialect):
    """`AUTH MECH`, then `+ challenge` lines, then `+OK` or `-ERR`."""

    initial_response = False

    def read(self):
        line = backend.read_reply(self.stream, self.limit)
        if line[:3].upper() == b"+OK":
            return True, None, line
        if line[:2] in (b"+ ", b"+\r", b"+\n"):
            return False, line[1:].strip(), line
        return False, None, line


class Smtp(Dialect):
    """`AUTH MECH initial`, then `334 challenge` replies, then 235 or not."""

    def read(self):
        reply = backend.read_smtp_reply(self.stream, self.limit)
        if reply[:3] == b"334":
            return False, reply[4:].split(b"\r\n")[0].strip(), reply
        return reply[:3] == b"235", None, reply
