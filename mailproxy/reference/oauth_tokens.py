"""OAuth 2.0 access tokens for the reference auth service: the bridge half.

A user of the auth service (authservice.py) may be an OAuth account: the
users file holds, beside the password the mail client logs in with, what
the provider's token endpoint needs to issue an access token:

    joe {SCRYPT}... imap=142.250.1.108:993 token-url=https://oauth2.googleapis.com/token
        client-id=ID client-secret=SECRET refresh-token=1//0g... backend-auth=xoauth2

(one line in the file).  When joe logs in with his password, the auth
service answers with an access token as Auth-Pass and `Auth-Backend-Auth:
xoauth2` (or oauthbearer), and the proxy logs in to the provider with it
(mailproxy/backend_sasl.py): a headless, multi-user password-to-OAuth
bridge.

`Tokens.access_token()` returns a cached token while it has more than
REFRESH_MARGIN seconds to live, else asks the token endpoint for a new one
with the refresh token (RFC 6749 section 6: a POST of
grant_type=refresh_token, the client's id and secret in the body, 2.3.1).
One refresh per user runs at a time; the user's other logins wait for it,
at most WAIT_FOR_REFRESH seconds.  A provider that rotates refresh tokens
returns a new one, which is used from then on (kept in memory only).

Tokens and secrets are never logged or put in an exception's text: a
failure says which endpoint failed and the provider's `error` code.
"""

import threading
import time
from dataclasses import dataclass

import requests

REFRESH_MARGIN = 60         # seconds before expiry a token is refreshed (clock skew, slow logins)
DEFAULT_LIFETIME = 3600     # seconds, when the endpoint sends no expires_in (RFC 6749 5.1)
REQUEST_TIMEOUT = 10        # seconds for the token endpoint's connect, and for each read
WAIT_FOR_REFRESH = 15       # seconds a login waits for another login's refresh of the user
MAX_ERROR_TEXT = 200        # characters of a provider's error kept for the log
MECHANISMS = ("xoauth2", "oauthbearer")
# users-file keys -> Account fields
KEYS = {"token-url": "token_url", "client-id": "client_id", "client-secret": "client_secret",
        "refresh-token": "refresh_token", "backend-auth": "mechanism"}


class TokenError(Exception):
    """No access token; the message is for the log (it holds no secret)."""


@dataclass(frozen=True)
class Account:
    """One user's OAuth settings, from the users file."""
    token_url: str
    client_id: str
    client_secret: str
    refresh_token: str
    mechanism: str = "xoauth2"

    def __repr__(self):
        return f"Account({self.token_url}, {self.client_id}, {self.mechanism})"


def account(options):
    """An Account from the users-file keys of one user ({KEYS name: value}),
    None when there are none; ValueError when some are missing or wrong."""
    if not options:
        return None
    fields = {KEYS[key]: value for key, value in options.items()}
    missing = [key for key, name in KEYS.items() if name not in fields and name != "mechanism"]
    if missing:
        raise ValueError(f"OAuth account without {', '.join(missing)}")
    if not fields["token_url"].startswith(("https://", "http://")):
        raise ValueError(f"token-url is not an http(s) URL: {fields['token_url']!r}")
    if fields.get("mechanism", "xoauth2") not in MECHANISMS:
        raise ValueError(f"backend-auth must be one of {', '.join(MECHANISMS)}")
    return Account(**fields)


class _Entry:
    """One user's cached token.  `lock` is held while the token is checked
    or refreshed, so one refresh per user runs at a time."""

    def __init__(self, refresh_token):
        self.lock = threading.Lock()
        self.refresh_token = refresh_token
        self.token = None
        self.expires = 0.0          # time.monotonic() after which it is refreshed


class Tokens:
    """Access tokens per user, cached and refreshed; shared by the auth
    service's request threads."""

    def __init__(self, timeout=REQUEST_TIMEOUT, wait=WAIT_FOR_REFRESH):
        self.timeout, self.wait = timeout, wait
        self.lock = threading.Lock()    # guards `entries` (not the refreshes)
        self.entries = {}
        self.http = requests.Session()
        self.http.trust_env = False     # no proxies or netrc from the environment

    def access_token(self, login, account):
        """A token with more than REFRESH_MARGIN seconds to live, or
        TokenError."""
        entry = self._entry(login, account)
        if not entry.lock.acquire(timeout=self.wait):
            raise TokenError(f"gave up after {self.wait}s waiting for the token refresh "
                             f"of another login")
        try:
            if entry.token is None or time.monotonic() >= entry.expires:
                self._refresh(entry, account)
            return entry.token
        finally:
            entry.lock.release()

    def _entry(self, login, account):
        """The cache entry; a changed account (the users file was edited)
        starts a fresh one."""
        key = (login, account)
        with self.lock:
            if key not in self.entries:
                for old in [k for k in self.entries if k[0] == login]:
                    del self.entries[old]
                self.entries[key] = _Entry(account.refresh_token)
            return self.entries[key]

    def _refresh(self, entry, account):
        """RFC 6749 section 6: refresh_token grant; the answer is JSON with
        access_token, expires_in and perhaps a new refresh_token (5.1)."""
        form = {"grant_type": "refresh_token", "refresh_token": entry.refresh_token,
                "client_id": account.client_id, "client_secret": account.client_secret}
        started = time.monotonic()
        try:
            response = self.http.post(account.token_url, data=form, allow_redirects=False,
                                      timeout=(self.timeout, self.timeout))
        except requests.Timeout:
            raise TokenError(f"token endpoint {account.token_url} timed out") from None
        except requests.RequestException as exc:
            raise TokenError(f"token endpoint {account.token_url} failed "
                             f"({type(exc).__name__})") from None
        try:
            answer = response.json()
        except ValueError:          # requests' JSONDecodeError is one
            raise TokenError(f"token endpoint {account.token_url} sent no JSON "
                             f"(HTTP {response.status_code})") from None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if response.status_code != 200 or not isinstance(token, str) or not token:
            raise TokenError(f"token endpoint {account.token_url} refused the refresh "
                             f"(HTTP {response.status_code}): {_error_text(answer)}")
        entry.token = token
        entry.expires = started + _usable_lifetime(answer.get("expires_in"))
        if isinstance(answer.get("refresh_token"), str) and answer["refresh_token"]:
            entry.refresh_token = answer["refresh_token"]       # rotated (RFC 6749 6)

    def close(self):
        self.http.close()


def _usable_lifetime(expires_in):
    """Seconds the token is used: its lifetime minus REFRESH_MARGIN (half
    its lifetime if that is shorter)."""
    try:
        lifetime = max(int(expires_in), 0)
    except (TypeError, ValueError):
        lifetime = DEFAULT_LIFETIME
    return lifetime - min(REFRESH_MARGIN, lifetime / 2)


def _error_text(answer):
    """RFC 6749 5.2's error and error_description, printable and bounded;
    nothing else of the body (it might echo a secret)."""
    if not isinstance(answer, dict):
        return "no error code"
    parts = [str(answer.get(key)) for key in ("error", "error_description") if answer.get(key)]
    text = ": ".join(parts) or "no error code"
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:MAX_ERROR_TEXT]
