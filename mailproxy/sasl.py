"""SASL mechanisms and APOP, shared by IMAP, POP3 and SMTP.

Each mechanism is a generator with no socket I/O: it yields a challenge (the
base64 text to put after `+ ` or `334 `), receives the client's response
line, and finally returns `Credentials`.  The session drives it:

    exchange = sasl.login(initial_response)
    challenge = next(exchange)          # "VXNlcm5hbWU6"
    challenge = exchange.send(line)     # ... until StopIteration(credentials)

so the mechanisms can be tested without a network, and each protocol only
decides how a challenge looks on its wire.  Malformed input raises SaslError;
the protocol answers with its invalid-command reply (spec 3.0).
"""

import base64
import binascii
import re
import secrets
import time
from dataclasses import dataclass

USERNAME_CHALLENGE = "VXNlcm5hbWU6"      # base64("Username:")
PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"      # base64("Password:")
CRAM_MD5_DIGEST_LENGTH = 32              # hex MD5, RFC 2195; nginx checks the length only
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL")   # capability order
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*")


class SaslError(Exception):
    """The client's SASL or APOP input is malformed."""


@dataclass(frozen=True)
class Credentials:
    """What the client proved, as the auth service will hear it.

    `method` is the auth_http Auth-Method (plain, apop, cram-md5, external,
    none).  `password` holds the password, or the digest for APOP and
    CRAM-MD5; `salt` the challenge those digests answer.  repr() never
    shows the password.
    """
    method: str
    login: bytes
    password: bytes = b""
    salt: bytes = b""

    def __repr__(self):
        return f"Credentials(method={self.method!r}, login={self.login!r}, password=***)"


def decode(line):
    """The first token of a response line, base64-decoded the nginx way:
    padding optional, anything after the first "=" ignored."""
    if b"\r" in line.removesuffix(b"\n").removesuffix(b"\r"):
        raise SaslError("bare CR")      # a CR not followed by LF (spec 3.0)
    token = line.strip().split(b" ", 1)[0] if line.strip() else b""
    data = token.split(b"=", 1)[0]
    if not _BASE64.fullmatch(data) or len(data) % 4 == 1:
        raise SaslError("invalid base64")
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4))
    except binascii.Error:
        raise SaslError("invalid base64") from None


def make_salt(server_name):
    """`<RANDOM.TIME@server_name>`: the APOP timestamp and CRAM-MD5 challenge."""
    return f"<{secrets.randbelow(2 ** 31)}.{int(time.time())}@{server_name}>".encode()


# ------------------------------------------------------------- mechanisms

def plain(initial=None, salt=b""):
    """RFC 4616: authzid NUL authcid NUL password; the authzid is dropped."""
    response = initial if initial is not None else (yield "")
    parts = decode(response).split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN response needs exactly two NUL separators")
    _authzid, login, password = parts
    return Credentials("plain", login, password)


def login(initial=None, salt=b""):
    """The LOGIN mechanism: user name, then password, each base64."""
    user = decode(initial if initial is not None else (yield USERNAME_CHALLENGE))
    password = decode((yield PASSWORD_CHALLENGE))
    return Credentials("plain", user, password)


def cram_md5(initial=None, salt=b""):
    """RFC 2195: challenge base64(salt), response base64("user digest").
    There is no initial response; the protocols refuse one before this."""
    response = decode((yield base64.b64encode(salt).decode()))
    user, space, digest = response.partition(b" ")
    if not space or len(digest) != CRAM_MD5_DIGEST_LENGTH:
        raise SaslError("CRAM-MD5 response is not 'user digest'")
    return Credentials("cram-md5", user, digest, salt)


def external(initial=None, salt=b""):
    """RFC 4422 EXTERNAL: the response is the login; the TLS client
    certificate (checked by the auth service) is the proof."""
    response = initial if initial is not None else (yield USERNAME_CHALLENGE)
    return Credentials("external", decode(response))


def apop(user, digest, salt):
    """POP3 APOP (RFC 1939 7): the digest is passed on unchecked."""
    return Credentials("apop", user, digest, salt)


EXCHANGES = {"PLAIN": plain, "LOGIN": login, "CRAM-MD5": cram_md5, "EXTERNAL": external}
