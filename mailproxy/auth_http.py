"""The auth service client: may this client log in, and to which backend?

The proxy asks an HTTP service (the `auth_http` address) with one GET whose
headers carry the credentials (spec 2.2); the answer comes back as headers
too (spec 2.3-2.4): `Auth-Status: OK` with `Auth-Server`/`Auth-Port`, or
an error text for the client, or `WAIT`.  As in nginx, a host name in the
URL was resolved once, when the configuration loaded (addresses.py): the
request goes to that address, and the Host header carries the name.

The request goes through requests' interface to our own transport
adapter, which speaks HTTP/1.1 with http.client on keep-alive connections,
with one deadline for the whole of it (auth_transport.py).
Any failure of the auth service itself (refused, timed out, not HTTP, bad
headers, no usable backend address) raises AuthServiceError, which the
session turns into the protocol's internal-error line.
"""

import http.client
import ipaddress
import re
from dataclasses import dataclass

import requests

from .addresses import UNIX_PREFIX, AuthHttp
from .auth_transport import TIMED_OUT, AuthAdapter, watching

MAX_REPLY_HEADERS = 1024    # nginx's auth_http response buffer; more is an error
UNIX_HOST = "localhost"     # nginx's Host header for a unix: auth service
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESCAPED = frozenset(range(0x21)) | {0x25, 0x7F}     # control bytes, space, "%" and DEL
# Auth-Backend-Auth (beyond nginx): how the proxy logs in to the backend;
# "none" is the protocol's own way (IMAP LOGIN, POP3 USER/PASS, SMTP no AUTH).
BACKEND_AUTH = ("none", "plain", "login", "xoauth2", "oauthbearer")
TOKEN_MECHANISMS = ("xoauth2", "oauthbearer")      # Auth-Pass must carry the token
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")   # in a reply's value: invalid (HTAB is not)


class AuthServiceError(Exception):
    """The auth service failed; the message is for the log."""


@dataclass(frozen=True)
class AuthRequest:
    """One question to the auth service; `extra` holds protocol-specific
    (name, value) headers such as SMTP's Client-Host, in order.  Beyond
    nginx: the client's port and the address it connected to (None when
    unknown: a unix-domain socket), and the backends that could not be
    reached for this login so far ("addr:port", proxy_backend_tries)."""
    method: str
    login: bytes
    password: bytes
    salt: bytes
    protocol: str
    attempt: int
    client_ip: str
    extra: tuple = ()
    client_port: int = None
    server_ip: str = None
    server_port: int = None
    failed_backends: tuple = ()

    def __repr__(self):
        return f"AuthRequest({self.method}, login={self.login!r}, attempt={self.attempt})"


@dataclass(frozen=True)
class AuthReply:
    """The auth service's answer.  `status` is "OK", "WAIT" or the error
    text; `user`/`password` are the backend overrides (raw bytes or None);
    `backend_auth` is Auth-Backend-Auth (a BACKEND_AUTH name, or None)."""
    status: str
    server: str = None
    port: int = None
    user: bytes = None
    password: bytes = None
    wait: int = 0
    error_code: str = None
    backend_auth: str = None
    headers: tuple = ()         # every (name, value) received, for protocol extensions

    @property
    def ok(self):
        return self.status == "OK"

    @property
    def retry(self):
        return self.status == "WAIT"

    def header(self, name):
        """The last value of an extension header, or None."""
        found = None
        for key, value in self.headers:
            if key.lower() == name.lower():
                found = value
        return found

    def __repr__(self):
        return f"AuthReply({self.status!r}, {self.server}:{self.port}, wait={self.wait})"


def escape(value):
    """Auth-User/Auth-Pass escaping (spec 2.2): control bytes (DEL too),
    space and "%" become %XX, as nginx's NGX_ESCAPE_MAIL_AUTH; everything else, UTF-8 included, passes raw.  The result is
    a str holding those bytes one-to-one (latin-1), as http.client sends it."""
    return "".join(f"%{byte:02X}" if byte in _ESCAPED else chr(byte) for byte in value)


class AuthClient:
    """Asks one `auth_http` service; shared by every session of a server.
    `url` is the directive's value, an addresses.AuthHttp: (host, port,
    uri, address), or for a unix socket ("unix:/path", None, uri)."""

    def __init__(self, url, timeout, headers=()):
        host, port, uri, address = AuthHttp(*url)
        self.timeout = timeout
        self.extra_headers = tuple(headers)
        if host.startswith(UNIX_PREFIX):
            self.host = UNIX_HOST
            self.url = f"{host}:{uri}"      # as configured, for the log
            target = f"http://{UNIX_HOST}{uri}"
            service = host[len(UNIX_PREFIX):]
        else:
            self.host = _bracketed(host)        # nginx sends Host without the port
            # nginx connects to the address the name resolved to at load
            self.url = target = f"http://{_bracketed(address or host)}:{port}{uri}"
            service = (address or host, port)
        # The request goes straight to the transport adapter: a
        # requests.Session would add what nginx does not do (cookies, netrc,
        # proxies from the environment, redirects), and its per-request
        # bookkeeping was a twentieth of an auth request's Python calls.
        self.adapter = AuthAdapter(service, timeout)
        # What is the same in every request is made once: the URL as
        # requests prepares it, and the headers after the per-login ones.
        self.target = requests.Request("GET", target).prepare().url
        self.wire_tail = tuple((name, value.encode().decode("latin-1"))
                               for name, value in self.extra_headers)

    def headers_for(self, request):
        """The request headers in nginx's order (spec 2.2); mailproxy's own
        (Client-Port, Server-IP, Server-Port, Auth-Backend-Failed) follow
        nginx's, and the `auth_http_header` ones come last."""
        headers = [("Host", self.host),
                   ("Auth-Method", request.method),
                   ("Auth-User", escape(request.login)),
                   ("Auth-Pass", escape(request.password))]
        if request.salt:
            headers.append(("Auth-Salt", request.salt.decode("latin-1")))
        headers += [("Auth-Protocol", request.protocol),
                    ("Auth-Login-Attempt", str(request.attempt)),
                    ("Client-IP", request.client_ip)]
        headers += list(request.extra)
        if request.client_port is not None:
            headers.append(("Client-Port", str(request.client_port)))
        if request.server_ip is not None:
            headers += [("Server-IP", request.server_ip),
                        ("Server-Port", str(request.server_port))]
        headers += [("Auth-Backend-Failed", failed) for failed in request.failed_backends]
        headers += list(self.extra_headers)
        return headers

    def wire_headers(self, request):
        """headers_for() as they go out: (name, value) pairs, where a name
        may repeat (Auth-Backend-Failed), of str values that http.client
        sends as latin-1, so each is the bytes meant (a login's one-to-one,
        an `auth_http_header` value in UTF-8)."""
        return self.headers_for(request)[:-len(self.extra_headers) or None] + \
            list(self.wire_tail)

    def ask(self, request, watch=None):
        """One GET; the reply's headers are the answer (the body is
        ignored: auth_transport.py); the status, a redirect's too, is
        ignored, as nginx does.  With `watch` (the client's raw socket) the wait for
        the headers ends with stream.ClientGone, and the connection is
        dropped, as soon as the client closes (auth_transport.py); the body
        that follows them is read unwatched."""
        prepared = requests.PreparedRequest()
        prepared.method, prepared.url = "GET", self.target
        headers = self.wire_headers(request)
        try:
            # requests checks each name and value; as bytes, since its check
            # of a str takes a leading \xa0 (a login's byte) for a space.
            prepared.prepare_headers({name: value.encode("latin-1") for name, value in headers})
            prepared.headers = headers          # and these go out, repeated names kept
            with watching(watch):
                response = self.adapter.send(prepared)
        except requests.RequestException as exc:
            raise AuthServiceError(self.failure(exc)) from None
        return parse_reply(_raw_headers(response))

    def failure(self, exc):
        """The log line for a request that failed: "timed out" whatever
        step the deadline cut (connect, send or a read), else the cause."""
        reason = TIMED_OUT if isinstance(exc, requests.Timeout) else _reason(exc)
        if reason == TIMED_OUT:
            return f"auth http server {self.url} timed out"
        return f"auth http server {self.url} failed: {reason}"

    def close(self):
        self.adapter.close()


def _raw_headers(response):
    """The reply's headers in order, duplicates kept, checked like nginx."""
    headers = response.raw.getheaders()
    size = len(response.reason or "") + 15
    for name, value in headers:
        size += len(name) + len(value) + 4
        if not _HEADER_NAME.fullmatch(name):
            raise AuthServiceError("auth http server sent invalid header in response")
    if size > MAX_REPLY_HEADERS:
        raise AuthServiceError("auth http server sent too long response")
    return headers


def parse_reply(headers):
    """(name, value) pairs -> AuthReply, or AuthServiceError (spec 2.3-2.5).

    Stricter than nginx (issue 16): an Auth-* header that comes twice, or
    holds a control byte, makes the reply invalid, and so does a reply
    with no Auth-Status.  Python's header parser takes a bare CR for a line
    end and joins folded lines, so a login that an auth service reflects
    into a header could otherwise add or override one (say Auth-Port), and
    a status text could carry a line break to the client or the log."""
    values = {}
    for name, value in headers:
        key = name.lower()
        if key.startswith("auth-"):
            if key in values:
                raise AuthServiceError(f'auth http server sent "{name}" twice')
            if _CONTROL.search(value):
                raise AuthServiceError(f'auth http server sent a control byte in "{name}"')
        values[key] = value.strip(" ")
    status = values.get("auth-status")
    if status is None:
        raise AuthServiceError("auth http server sent no Auth-Status")
    server = port = backend_auth = None
    if status == "OK":
        server, port = values.get("auth-server"), values.get("auth-port")
        if server is None or port is None:
            raise AuthServiceError("auth http server did not send server or port")
        server, port = _server(server), _port(port)
        backend_auth = _backend_auth(values.get("auth-backend-auth"))
        if backend_auth in TOKEN_MECHANISMS and "auth-pass" not in values:
            # the client's password is no token: never send it to a provider as one
            raise AuthServiceError(f'auth http server sent "Auth-Backend-Auth: {backend_auth}" '
                                   "without Auth-Pass")
    return AuthReply(
        status=status, server=server, port=port,
        user=_raw(values.get("auth-user")), password=_raw(values.get("auth-pass")),
        wait=_atoi(values.get("auth-wait", "")), error_code=values.get("auth-error-code"),
        backend_auth=backend_auth, headers=tuple(headers))


def _server(text):
    """An IP literal, as nginx's parser takes it: no name, and no IPv6
    zone (`fe80::1%eth0`), which nginx cannot parse either."""
    try:
        if "%" in text:
            raise ValueError(text)
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise AuthServiceError(f'auth http server sent invalid server address:"{text}"') \
            from None


def _port(text):
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise AuthServiceError(f'auth http server sent invalid server port:"{text}"')
    return int(text)


def _backend_auth(text):
    if text is None:
        return None
    if text.lower() not in BACKEND_AUTH:
        raise AuthServiceError(f'auth http server sent invalid Auth-Backend-Auth "{text}"')
    return text.lower()


def _raw(value):
    """Auth-User/Auth-Pass from the service are used raw, not %-decoded."""
    return None if value is None else value.encode("latin-1")


def _atoi(text):
    """Auth-Wait as nginx's ngx_atoi reads it: digits only, else ignored (0)."""
    return int(text) if text.isascii() and text.isdigit() else 0


def _reason(exc):
    """The root cause of a requests error ("111: Connection refused", "sent
    invalid response (BadStatusLine)"), for the log."""
    seen = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TimeoutError):       # the deadline, whichever step it cut
            return TIMED_OUT
        if isinstance(exc, OSError) and exc.strerror:
            return f"{exc.errno}: {exc.strerror}"
        if isinstance(exc, http.client.HTTPException):
            return f"sent invalid response ({type(exc).__name__})"
        inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None)
        reason = getattr(exc, "reason", None)
        exc = reason if isinstance(reason, BaseException) else \
            inner or exc.__cause__ or exc.__context__
    return "connection failed"


def _bracketed(host):
    return f"[{host}]" if ":" in host else host
