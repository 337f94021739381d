"""What the IMAP, POP3, SMTP and resolver transcripts share: the server name,
base64, the auth request's protocol headers, and an auth reply function
that checks credentials the way a real auth service would."""

import base64
import hashlib
import hmac
import urllib.parse

from fakes import fail, ok

SERVER_NAME = "mx.test"


def b64(data):
    """base64 of bytes (or str), as bytes: the SASL wire form."""
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data)


def auth_headers(request):
    """The auth protocol's own headers of a recorded request, in order:
    Auth-* and Client-* (HTTP plumbing such as Host left out, and
    Client-Port, Server-IP and Server-Port, which name the connection:
    tests/test_client_address.py checks those)."""
    return [(name, value) for name, value in request.headers
            if name.startswith(("Auth-", "Client-")) and name != "Client-Port"]


def unescape(value):
    """Undo the auth request escaping (%XX) of Auth-User/Auth-Pass."""
    return urllib.parse.unquote_to_bytes(value.encode("latin-1"))


def checking_auth(users, port, host="127.0.0.1"):
    """A reply function for ScriptedAuthService that behaves like a real auth
    service: it checks the password (plain), or the APOP or CRAM-MD5 digest
    against `users` ({login: password}), and on success sends the client to
    host:port with the clear-text password as Auth-Pass."""
    def reply(request):
        method = request.header("Auth-Method")
        login = unescape(request.header("Auth-User", "")).decode("utf-8", "replace")
        given = unescape(request.header("Auth-Pass", ""))
        salt = request.header("Auth-Salt", "").encode("latin-1")
        password = users.get(login)
        if password is None:
            return fail()
        expected = {"plain": password.encode(),
                    "apop": hashlib.md5(salt + password.encode()).hexdigest().encode(),
                    "cram-md5": hmac.new(password.encode(), salt, "md5").hexdigest().encode()}
        if given != expected.get(method):
            return fail()
        return ok(host, port, Auth_Pass=password)
    return reply
