"""The demo's OAuth 2.0 provider: a token endpoint and an IMAP backend that
takes access tokens only, as Gmail and Office 365 do with passwords off.

`mailproxy demo` shows the password-to-OAuth bridge with them: carol logs
in to the proxy with a password; the reference auth service trades her
refresh token at `TokenEndpoint` for an access token (oauth_tokens.py) and
answers with it and `Auth-Backend-Auth: xoauth2`; the proxy logs in to
`OAuthImapBackend` with `AUTHENTICATE XOAUTH2` (backend_sasl.py), which
refuses LOGIN outright.  Like the other demo backends these are teaching
aids: tokens live in memory and the endpoint speaks plain HTTP on loopback.
"""

import base64
import hmac
import http.server
import json
import secrets
import threading
import time
import urllib.parse

from .backend_common import CRLF, Refused
from .backend_imap import IMAP_CAPABILITIES, ImapBackend
from .demo_backends import POLL_INTERVAL, BackendServer

CLIENT_ID, CLIENT_SECRET = "mailproxy-demo", "demo-client-secret"
TOKEN_LIFETIME = 3600           # seconds an access token is good for (expires_in)
MAX_FORM = 8192                 # bytes of a token request's body
OAUTH_CAPABILITIES = IMAP_CAPABILITIES + b" SASL-IR AUTH=XOAUTH2 LOGINDISABLED"
OAUTH_GREETING = b"* OK [CAPABILITY " + OAUTH_CAPABILITIES + b"] demo OAuth IMAP ready\r\n"
TOKENS_ONLY = b"NO [AUTHENTICATIONFAILED] this backend takes OAuth 2.0 tokens only"
BAD_TOKEN = b"NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
ONLY_XOAUTH2 = b"NO [CANNOT] XOAUTH2 is the only mechanism here"
# RFC 7628 3.2.2's error, as a provider sends it before the failure.
TOKEN_ERROR = base64.b64encode(json.dumps({"status": "401", "schemes": "Bearer"}).encode())


class Provider:
    """Who holds which refresh token, and the access tokens issued; the
    token endpoint's threads and the backend's share it (hence the lock)."""

    def __init__(self, refresh_tokens):
        self.refresh_tokens = dict(refresh_tokens)      # user -> refresh token
        self.lock = threading.Lock()
        self.issued = {}                                # access token -> (user, expiry)

    def grant(self, form):
        """RFC 6749 6: (status, JSON answer) for a refresh_token request."""
        if form.get("client_id") != CLIENT_ID or \
                not hmac.compare_digest(form.get("client_secret", ""), CLIENT_SECRET):
            return 401, {"error": "invalid_client"}
        if form.get("grant_type") != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}
        user = next((user for user, token in self.refresh_tokens.items()
                     if hmac.compare_digest(token, form.get("refresh_token", ""))), None)
        if user is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown refresh token"}
        token = "demo-access-" + secrets.token_urlsafe(24)
        with self.lock:
            now = time.monotonic()
            self.issued = {t: held for t, held in self.issued.items() if held[1] > now}
            self.issued[token] = (user, now + TOKEN_LIFETIME)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME}

    def user_of(self, token):
        """The user an unexpired access token was issued to, or None."""
        with self.lock:
            user, expiry = self.issued.get(token, (None, 0))
        return user if expiry > time.monotonic() else None


class TokenHandler(http.server.BaseHTTPRequestHandler):
    """POST /token with a form (RFC 6749 6), JSON out."""

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_FORM:
            status, answer = 400, {"error": "invalid_request"}
        else:
            form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            status, answer = self.server.provider.grant({k: v[0] for k, v in form.items()})
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")       # RFC 6749 5.1
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass                            # requests carry secrets: never log them


class OAuthImapBackend(ImapBackend):
    """The demo IMAP backend, but LOGIN is refused, and AUTHENTICATE
    XOAUTH2 takes an access token the provider issued."""

    GREETING = OAUTH_GREETING
    STATES = dict(ImapBackend.STATES,
                  **{"not authenticated": ImapBackend.ANY_STATE | {"LOGIN", "AUTHENTICATE"}})

    def do_LOGIN(self, command):
        raise Refused(TOKENS_ONLY)

    def do_AUTHENTICATE(self, command):
        """RFC 3501 6.2.2 with SASL-IR (RFC 4959): the initial response on
        the command line, else after an empty `+` challenge."""
        if not command.args or not isinstance(command.args[0], bytes) or \
                command.args[0].upper() != b"XOAUTH2" or len(command.args) > 2:
            raise Refused(ONLY_XOAUTH2)
        if len(command.args) == 2:
            response = command.args[1]
        else:
            self.send(b"+ " + CRLF)
            response = self.reader.readline().strip()
        user = self.xoauth2_user(response)
        if user is None:
            self.send(b"+ " + TOKEN_ERROR + CRLF)       # the client answers with an empty line
            self.reader.readline()
            raise Refused(BAD_TOKEN)
        self.user, self.state = user, "authenticated"
        self.ok(command, b"[CAPABILITY " + IMAP_CAPABILITIES + b"] AUTHENTICATE completed")

    def xoauth2_user(self, response):
        """`user=U ^A auth=Bearer T ^A ^A` -> U, if the provider issued T to U."""
        try:
            fields = base64.b64decode(response, validate=True).decode().split("\x01")
        except ValueError:
            return None
        values = dict(field.partition("=")[::2] for field in fields if "=" in field)
        token = values.get("auth", "").removeprefix("Bearer ")
        user = self.server.provider.user_of(token)
        return user if user is not None and user == values.get("user") else None


class DemoProvider:
    """The token endpoint and the OAuth-only IMAP backend, serving on
    loopback from named threads; `close()` stops both."""

    def __init__(self, store, refresh_tokens, host="127.0.0.1"):
        self.provider = Provider(refresh_tokens)
        self.endpoint = http.server.ThreadingHTTPServer((host, 0), TokenHandler)
        self.endpoint.daemon_threads = True
        self.imap = BackendServer((host, 0), OAuthImapBackend, store)
        for server in (self.endpoint, self.imap):
            server.provider = self.provider
        self.threads = [threading.Thread(target=server.serve_forever, name=name,
                                         kwargs={"poll_interval": POLL_INTERVAL})
                        for name, server in (("demo token endpoint", self.endpoint),
                                             ("demo oauth imap backend", self.imap))]
        for thread in self.threads:
            thread.start()

    @property
    def token_url(self):
        return f"http://127.0.0.1:{self.endpoint.server_address[1]}/token"

    @property
    def imap_port(self):
        return self.imap.server_address[1]

    def close(self):
        for server in (self.endpoint, self.imap):
            server.shutdown()
        self.imap.end_connections()
        for server in (self.endpoint, self.imap):
            server.server_close()
        for thread in self.threads:
            thread.join()
