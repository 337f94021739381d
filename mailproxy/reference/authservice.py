"""A reference auth service: the other half of `auth_http`, for small sites.

The proxy asks "may this client log in, and where to?" with one HTTP GET
whose headers carry the credentials (docs/auth-protocol.md).  This service
answers from a users file:

    # login  password              backends
    joe      {SCRYPT}16384$8$1$...  imap=127.0.0.1:1143 pop3=127.0.0.1:1110 smtp=127.0.0.1:1025
    ann      {PLAIN}pa55word        imap=10.0.0.5:143,10.0.0.6:143 auth-user=ann@example.org

Passwords are stored as scrypt hashes (`mailproxy auth-service passwd joe`
writes one), or as `{PLAIN}text` (`{PLAIN-B64}base64` if it holds white
space or "#") for users who log in with CRAM-MD5 or APOP: those send a
digest of the password, and checking a digest needs the clear text.
`auth-user=` renames the login toward the backend.  A protocol may list
several backends, comma-separated: the first is named, and when the proxy
asks again because a backend failed (`Auth-Backend-Failed: ADDR:PORT`
headers, `proxy_backend_tries`), the first one that has not failed.
`bearer=TOKEN` lets the user log in with XOAUTH2 or OAUTHBEARER and that
bearer token (a demonstration: a real site asks its OAuth provider
instead); the backend login then needs a {PLAIN} password for IMAP and
POP3, as for CRAM-MD5, and a refused token is answered with an
Auth-Error-SASL challenge.  A user with `token-url=`, `client-id=`,
`client-secret=` and `refresh-token=` is an OAuth account toward the
backend: a login is answered with an access token and `Auth-Backend-Auth`
(oauth_tokens.py: the password-to-OAuth bridge).  For SMTP without
authentication (`smtp_auth none`, MX mode), the recipient's local part picks
the user whose smtp= backend takes the mail.

Failures are answered with a growing `Auth-Wait` (the proxy pauses before
telling the client, then lets it try again), and a client address with too
many recent failures is locked out for a while (`Auth-Error-Code: 454 4.7.0`
for SMTP).  The file is re-read when it changes.

What an attacker can learn is kept small: a PLAIN login for an unknown
user (or one without a backend for the protocol) is checked against a
decoy scrypt hash, so the refusal takes as long as a known user's; at most
CHECKS_AT_ONCE scrypt checks run together (16 MB each); and the failure
table keeps at most MAX_TRACKED client addresses.
"""

import base64
import hashlib
import hmac
import http.server
import ipaddress
import os
import stat
import tempfile
import threading
import time
import logging
import urllib.parse
from dataclasses import dataclass, field

from . import oauth_tokens

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1     # interactive-login cost (RFC 7914 12)
MAX_WAIT = 8                    # seconds: Auth-Wait doubles per attempt up to this
MAX_ATTEMPTS = 10               # then no Auth-Wait: the proxy closes the session
FAILURES_BEFORE_LOCKOUT = 10    # per client address, within LOCKOUT_WINDOW
LOCKOUT_WINDOW = 600            # seconds
LOCKOUT_TIME = 300              # seconds
RELOAD_CHECK = 1.0              # seconds between two looks at the users file
MAX_TRACKED = 10000             # client addresses the failure table keeps at most
CHECKS_AT_ONCE = 4              # scrypt checks run together: each takes 16 MB (N=2^14, r=8)
# A hash of no one's password: an unknown login is checked against it, so it
# takes as long as a known one and the answer's timing names no account.
DECOY = ("{SCRYPT}16384$8$1$ZqUfAhDcAH4zSGhzH1qNig==$vJwF/xTULyvhX/X+TBlXZzhteENxiFkd9/ZT/"
         "b87/JpY2YUihVGfA3tfAqocLyiiVl6z98CrmJByjcnjnuqyIg==")
_scrypt_slots = threading.BoundedSemaphore(CHECKS_AT_ONCE)
SCHEMES = ("{SCRYPT}", "{PLAIN}", "{PLAIN-B64}")
INVALID = "Invalid login or password"
LOCKED = "Too many failures, try again later"
UNAVAILABLE = "Temporary authentication failure"     # no token, or no backend left
log = logging.getLogger("mailproxy.authservice")


class UsersFileError(Exception):
    """A line of the users file does not parse; names file:line."""


@dataclass
class User:
    login: str
    secret: str                 # "{SCRYPT}..." or "{PLAIN}..."
    backends: dict = field(default_factory=dict)   # protocol -> [(host, port), ...]
    backend_login: str = None
    bearer: str = None          # the token XOAUTH2 and OAUTHBEARER logins must show
    oauth: oauth_tokens.Account = None

    @property
    def clear_text(self):
        """The password itself, for {PLAIN} and {PLAIN-B64} entries."""
        if self.secret.startswith("{PLAIN}"):
            return self.secret[len("{PLAIN}"):]
        if self.secret.startswith("{PLAIN-B64}"):
            return base64.b64decode(self.secret[len("{PLAIN-B64}"):], validate=True).decode()
        return None


# --------------------------------------------------------------- passwords

def hash_password(password):
    """`{SCRYPT}N$r$p$salt$hash`, salt and hash in base64."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return "{SCRYPT}%d$%d$%d$%s$%s" % (SCRYPT_N, SCRYPT_R, SCRYPT_P,
                                       base64.b64encode(salt).decode(),
                                       base64.b64encode(digest).decode())


def plain_secret(password):
    """The {PLAIN} form; {PLAIN-B64} when the password has white space or
    "#", which the users file's syntax cannot hold."""
    if any(ch.isspace() or ch == "#" for ch in password):
        return "{PLAIN-B64}" + base64.b64encode(password.encode()).decode()
    return "{PLAIN}" + password


def check_password(user, password):
    if user.clear_text is not None:
        return hmac.compare_digest(user.clear_text.encode(), password)
    secret = user.secret
    if not secret.startswith("{SCRYPT}"):
        return False
    try:
        n, r, p, salt, digest = secret[8:].split("$")
        expected = base64.b64decode(digest)
        with _scrypt_slots:         # a burst of logins must not take 16 MB each at once
            actual = hashlib.scrypt(password, salt=base64.b64decode(salt), n=int(n), r=int(r),
                                    p=int(p), dklen=len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def check_cram_md5(clear_text, salt, digest):
    """RFC 2195: hex HMAC-MD5 of the challenge, keyed with the password."""
    expected = hmac.new(clear_text.encode(), salt, hashlib.md5).hexdigest()
    return hmac.compare_digest(expected.encode(), digest.lower())


def check_apop(clear_text, salt, digest):
    """RFC 1939 7: hex MD5 of the timestamp followed by the password."""
    expected = hashlib.md5(salt + clear_text.encode()).hexdigest()
    return hmac.compare_digest(expected.encode(), digest.lower())


# -------------------------------------------------------------- users file

def parse_users(path):
    """{login: User}; a line that does not parse raises UsersFileError."""
    users = {}
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            try:
                user = _parse_user(words)
            except ValueError as exc:
                raise UsersFileError(f"{path}:{number}: {exc}") from None
            users[user.login] = user
    return users


def _parse_user(words):
    if len(words) < 2:
        raise ValueError("expected 'login password [backends]'")
    user = User(words[0], words[1])
    _check_secret(user)
    oauth = {}
    for word in words[2:]:
        key, eq, value = word.partition("=")
        if not eq:
            raise ValueError(f"expected key=value, got {word!r}")
        if key == "auth-user":
            user.backend_login = value
        elif key == "bearer":
            user.bearer = value
        elif key in ("imap", "pop3", "smtp"):
            user.backends[key] = [_backend(item) for item in value.split(",")]
        elif key in oauth_tokens.KEYS:
            oauth[key] = value
        else:
            raise ValueError(f"unknown key {key!r}")
    user.oauth = oauth_tokens.account(oauth)
    return user


def _check_secret(user):
    """Refuse now what would fail every login later (never quoting it)."""
    if not user.secret.startswith(SCHEMES):
        raise ValueError("unknown password scheme (expected {SCRYPT}, {PLAIN} or {PLAIN-B64})")
    try:
        text = user.clear_text
    except ValueError:                  # binascii.Error, UnicodeDecodeError
        raise ValueError("bad {PLAIN-B64} password: not base64 of UTF-8 text") from None
    if text is not None and any(ch < " " or ch == "\x7f" for ch in text):
        raise ValueError("the password holds control characters, which Auth-Pass cannot carry")


def _backend(value):
    """`IP:PORT` (`[IPv6]:PORT` too): the proxy takes no host names."""
    host, _, port = value.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"bad backend {value!r}: expected IP:PORT") from None
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad backend {value!r}: expected IP:PORT")
    return str(address), int(port)


def set_password(path, login, password, plain=False):
    """Add `login` or replace its password, keeping every other line (and
    the file's mode: the service may read it under another user)."""
    if not login or any(ch.isspace() or ch == "#" for ch in login):
        raise ValueError(f"a login cannot be empty or hold white space or '#': {login!r}")
    secret = plain_secret(password) if plain else hash_password(password)
    lines, mode = [], 0o600
    if os.path.exists(path):
        lines = open(path, encoding="utf-8").read().splitlines()
        mode = stat.S_IMODE(os.stat(path).st_mode)
    for index in reversed(range(len(lines))):   # the last line of a login counts
        words = lines[index].split()
        if words and words[0] == login:
            lines[index] = " ".join([login, secret] + words[2:])
            break
    else:
        lines.append(f"{login} {secret}")
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.fchmod(fd, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    os.replace(temporary, path)     # a reload never sees a half-written file


class Users:
    """The users file, re-read when it changes (checked at most once a
    second).  Request threads share it; the lock guards the swap."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.signature = _signature(path)
        self.users = parse_users(path)
        self.checked = time.monotonic()

    def get(self, login):
        self._maybe_reload()
        with self.lock:
            return self.users.get(login)

    def _maybe_reload(self):
        now = time.monotonic()
        if now - self.checked < RELOAD_CHECK:
            return
        self.checked = now
        try:
            signature = _signature(self.path)
            if signature != self.signature:
                users = parse_users(self.path)
                with self.lock:
                    self.users, self.signature = users, signature
        except (OSError, UsersFileError):
            pass                    # keep serving the last good file


def _signature(path):
    """What changes when the file does.  The mtime alone can miss an edit
    made in the same clock tick; set_password's rename changes the inode."""
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size, info.st_ino


class Failures:
    """Recent failures per client address, for the temporary lockout."""

    def __init__(self):
        self.lock = threading.Lock()    # request threads record concurrently
        self.recent = {}

    def locked(self, address):
        with self.lock:
            times = [t for t in self.recent.get(address, []) if time.monotonic() - t
                     < LOCKOUT_WINDOW]
            if not times:
                self.recent.pop(address, None)      # keep no entry per address ever seen
                return False
            self.recent[address] = times
            return len(times) >= FAILURES_BEFORE_LOCKOUT and \
                time.monotonic() - times[-1] < LOCKOUT_TIME

    def add(self, address):
        with self.lock:
            self.recent.setdefault(address, []).append(time.monotonic())
            if len(self.recent) > MAX_TRACKED:
                self._forget_oldest()

    def _forget_oldest(self):
        """Over MAX_TRACKED addresses: drop those whose failures are all past
        LOCKOUT_WINDOW, then, if still over, the ones that failed longest
        ago (called with `lock` held)."""
        now = time.monotonic()
        self.recent = {address: times for address, times in self.recent.items()
                       if now - times[-1] < LOCKOUT_WINDOW}
        if len(self.recent) > MAX_TRACKED:
            by_age = sorted(self.recent, key=lambda address: self.recent[address][-1])
            for address in by_age[:len(self.recent) - MAX_TRACKED]:
                del self.recent[address]


# ----------------------------------------------------------------- service

class AuthHandler(http.server.BaseHTTPRequestHandler):
    """One auth_http request: headers in, Auth-* headers out."""

    protocol_version = "HTTP/1.1"       # keep-alive, which the proxy uses

    def do_GET(self):
        answer = self.server.decide(self.headers)
        self.send_response(200)
        for name, value in answer.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        pass                            # requests carry passwords: never log them


class AuthService(http.server.ThreadingHTTPServer):
    """The HTTP server: `decide()` is the whole policy."""

    daemon_threads = True

    def __init__(self, address, users_path):
        self.users = Users(users_path)
        self.failures = Failures()
        self.tokens = oauth_tokens.Tokens()
        super().__init__(address, AuthHandler)

    def server_close(self):
        super().server_close()
        self.tokens.close()

    def decide(self, headers):
        method = headers.get("Auth-Method", "")
        protocol = headers.get("Auth-Protocol", "")
        client = headers.get("Client-IP", "")
        if self.failures.locked(client):
            return _refusal(LOCKED, protocol, attempt=None, code="454 4.7.0")
        if method == "none":
            return self.route_recipient(headers)
        login = _unescape(headers.get("Auth-User", ""))
        user = self.users.get(login.decode("utf-8", "replace"))
        if user and protocol in user.backends and _verify(user, method, headers):
            return self.admit(user, protocol, method != "plain", headers)
        if method == "plain" and (user is None or protocol not in user.backends):
            # as slow as a known login's check: the timing names no account
            check_password(User("", DECOY), _unescape(headers.get("Auth-Pass", "")))
        self.failures.add(client)
        return bearer_refusal(method, _refusal(INVALID, protocol, _attempt(headers)))

    def admit(self, user, protocol, needs_password, headers):
        """Where to and as whom: the first backend of the user's list that
        has not failed (Auth-Backend-Failed), the password or, for an
        OAuth account, an access token and the mechanism to use it with."""
        answer = _next_backend(user, protocol, headers)
        if answer["Auth-Status"] != "OK":
            return answer
        if user.backend_login:
            answer["Auth-User"] = _wire(user.backend_login)
        if user.oauth:
            try:
                token = self.tokens.access_token(user.login, user.oauth)
            except oauth_tokens.TokenError as exc:
                log.warning("no access token for %s: %s", user.login, exc)
                return _refusal(UNAVAILABLE, protocol, attempt=None, code="454 4.7.0")
            answer.setdefault("Auth-User", _wire(user.login))
            answer.update({"Auth-Pass": token, "Auth-Backend-Auth": user.oauth.mechanism})
        elif needs_password and user.clear_text is not None:
            answer["Auth-Pass"] = _wire(user.clear_text)
        return answer

    def route_recipient(self, headers):
        """MX mode: `RCPT TO:<joe@example.org>` goes to joe's smtp backend."""
        rcpt = headers.get("Auth-SMTP-To", "")
        address = rcpt.partition("<")[2].partition(">")[0] or rcpt.partition(":")[2]
        user = self.users.get(address.partition("@")[0]) or self.users.get(address)
        if user is None or "smtp" not in user.backends:
            return {"Auth-Status": "User unknown", "Auth-Error-Code": "550 5.1.1"}
        return _next_backend(user, "smtp", headers)


def _verify(user, method, headers):
    password = _unescape(headers.get("Auth-Pass", ""))
    salt = headers.get("Auth-Salt", "").encode("latin-1").strip()
    if method == "plain":
        return check_password(user, password)
    if method in BEARER_METHODS:
        return check_bearer(user, password)
    if user.clear_text is None:
        return False                # digests need the clear text: a {PLAIN} entry
    if method == "cram-md5":
        return check_cram_md5(user.clear_text, salt, password)
    if method == "apop":
        return check_apop(user.clear_text, salt, password)
    return False                    # external: needs a client certificate (TLS)


# ------------------------------------------- bearer tokens (XOAUTH2, OAUTHBEARER)

BEARER_METHODS = ("xoauth2", "oauthbearer")
# RFC 7628 3.2.2: the error a client hears (as a SASL challenge) when its
# token is refused; the proxy sends it, base64, before the failure reply.
BEARER_ERROR = base64.b64encode(b'{"status":"invalid_token","schemes":"bearer"}').decode()


def check_bearer(user, token):
    """The token the users file holds for `user` (its bearer= key)."""
    return user.bearer is not None and hmac.compare_digest(user.bearer.encode(), token)


def bearer_refusal(method, answer):
    """A refused XOAUTH2 or OAUTHBEARER login also carries Auth-Error-SASL."""
    if method in BEARER_METHODS:
        answer["Auth-Error-SASL"] = BEARER_ERROR
    return answer


def _refusal(text, protocol, attempt, code=None):
    answer = {"Auth-Status": text}
    if attempt is not None and attempt < MAX_ATTEMPTS:
        answer["Auth-Wait"] = str(min(2 ** (attempt - 1), MAX_WAIT))
    if protocol == "smtp" and code:
        answer["Auth-Error-Code"] = code
    return answer


def _attempt(headers):
    """Auth-Login-Attempt, counted from 1 as the proxy does."""
    text = headers.get("Auth-Login-Attempt", "")
    return max(int(text), 1) if text.isascii() and text.isdigit() else 1


def _next_backend(user, protocol, headers):
    """The answer naming the first of the user's backends that the proxy
    has not reported failed (Auth-Backend-Failed), or, with none left, a
    temporary failure."""
    failed = headers.get_all("Auth-Backend-Failed") or []
    backend = next((b for b in user.backends[protocol] if _hostport(b) not in failed), None)
    if backend is None:
        log.warning("no backend left for %s (%s): %s failed", user.login, protocol,
                    ", ".join(failed))
        return _refusal(UNAVAILABLE, protocol, attempt=None, code="454 4.7.0")
    return {"Auth-Status": "OK", "Auth-Server": backend[0], "Auth-Port": str(backend[1])}


def _hostport(backend):
    """`ADDR:PORT`, `[ADDR]:PORT` for IPv6: as Auth-Backend-Failed names it."""
    host, port = backend
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wire(text):
    """The proxy uses Auth-User/Auth-Pass raw, and http.server writes
    header values as latin-1: hand it the UTF-8 bytes one to one."""
    return text.encode().decode("latin-1")


def _unescape(value):
    """Undo the proxy's %XX escaping of Auth-User/Auth-Pass (bytes out)."""
    return urllib.parse.unquote_to_bytes(value.encode("latin-1"))


def serve(users_path, host="127.0.0.1", port=9000):
    """Run until interrupted (the `mailproxy auth-service` command)."""
    if not logging.getLogger().handlers:        # token and backend failures to stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(message)s")
    service = AuthService((host, port), users_path)
    try:
        service.serve_forever()
    finally:
        service.server_close()
