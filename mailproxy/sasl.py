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
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL", "XOAUTH2", "OAUTHBEARER")
OAUTH_METHODS = frozenset({"xoauth2", "oauthbearer"})   # Auth-Error-SASL may answer these
# Accepted only when the protocol's *_auth directive lists them (PLAIN and
# LOGIN always are, as in nginx).
GATED_METHODS = frozenset({"cram-md5", "external"}) | OAUTH_METHODS
KVSEP = b"\x01"                          # ends each key=value of XOAUTH2 and OAUTHBEARER
BEARER = b"bearer "                      # RFC 6750 2.1; the scheme is case-insensitive
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*")
_CHALLENGE = re.compile(r"[A-Za-z0-9+/]*={0,2}")    # an Auth-Error-SASL value
_SASLNAME_ESCAPE = re.compile(rb"=(2C|3D)")         # RFC 5801 4: "," and "=" in a name
_CONTROL_OR_SPACE = re.compile(rb"[\x00-\x20\x7f]")


class SaslError(Exception):
    """The client's SASL or APOP input is malformed."""


@dataclass(frozen=True)
class Credentials:
    """What the client proved, as the auth service will hear it.

    `method` is the auth_http Auth-Method (plain, apop, cram-md5, external,
    xoauth2, oauthbearer, none).  `password` holds the password, the digest
    for APOP and CRAM-MD5, or the bearer token for XOAUTH2 and OAUTHBEARER;
    `salt` the challenge those digests answer.  repr() never shows the
    password.
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


def is_challenge(text):
    """Whether `text` (an auth reply's Auth-Error-SASL) may go on the
    client's wire as a SASL challenge: base64, nothing else."""
    return _CHALLENGE.fullmatch(text) is not None


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


def xoauth2(initial=None, salt=b""):
    """Google's XOAUTH2: `user=U ^Aauth=Bearer TOKEN ^A^A`.  With no
    initial response the challenge is empty."""
    response = initial if initial is not None else (yield "")
    fields = _key_values(decode(response))
    if not fields or fields[0][0] != b"user" or not fields[0][1]:
        raise SaslError("XOAUTH2 response does not start with user=")
    return Credentials("xoauth2", fields[0][1], _bearer_token(fields[1:]))


def oauthbearer(initial=None, salt=b""):
    """RFC 7628 OAUTHBEARER: a GS2 header `n,a=U,` naming the user, then
    `^Akey=value` pairs, one of them `auth=Bearer TOKEN`, then `^A^A`.
    Channel binding (`p=`) is not offered, so a client may not ask for it."""
    response = initial if initial is not None else (yield "")
    header, separator, rest = decode(response).partition(KVSEP)
    parts = header.split(b",")
    if not separator or len(parts) != 3 or parts[0] not in (b"n", b"y") or parts[2]:
        raise SaslError("OAUTHBEARER response has no GS2 header")
    if not parts[1].startswith(b"a=") or len(parts[1]) == 2:
        raise SaslError("OAUTHBEARER response names no user")
    return Credentials("oauthbearer", _saslname(parts[1][2:]),
                       _bearer_token(_key_values(rest)))


def apop(user, digest, salt):
    """POP3 APOP (RFC 1939 7): the digest is passed on unchecked."""
    return Credentials("apop", user, digest, salt)


EXCHANGES = {"PLAIN": plain, "LOGIN": login, "CRAM-MD5": cram_md5, "EXTERNAL": external,
             "XOAUTH2": xoauth2, "OAUTHBEARER": oauthbearer}


# ---------------------------------------------------------------- helpers

def _key_values(data):
    """`k=v ^A k=v ^A ^A` -> [(k, v), ...]: each pair ends with ^A and
    the whole with one more (RFC 7628 3.1, as XOAUTH2).  Keys are lowered."""
    if not data.endswith(KVSEP + KVSEP):
        raise SaslError("response does not end with two ^A")
    pairs = []
    for item in data[:-2].split(KVSEP):
        key, equals, value = item.partition(b"=")
        if not equals or not key.isalpha():
            raise SaslError("response holds something other than key=value")
        pairs.append((key.lower(), value))
    return pairs


def _bearer_token(pairs):
    """The token of the one `auth=Bearer TOKEN` pair (RFC 6750 2.1)."""
    auths = [value for key, value in pairs if key == b"auth"]
    if len(auths) != 1 or auths[0][:len(BEARER)].lower() != BEARER:
        raise SaslError("response has no auth=Bearer")
    token = auths[0][len(BEARER):]
    if not token or _CONTROL_OR_SPACE.search(token):
        raise SaslError("bearer token is empty or holds a space or control byte")
    return token


def _saslname(name):
    """RFC 5801 4 / RFC 7628 3.1: `=2C` is "," and `=3D` is "="; any other
    "=" is malformed."""
    if b"=" in _SASLNAME_ESCAPE.sub(b"", name):
        raise SaslError("user name holds an undecodable =")
    return _SASLNAME_ESCAPE.sub(lambda m: b"," if m.group(1) == b"2C" else b"=", name)
