"""The auth service client: may this client log in, and to which backend?

The proxy asks an HTTP service (the `auth_http` URL) with one GET whose
headers carry the credentials (spec 2.2); the answer comes back as headers
too (spec 2.3-2.4): `Auth-Status: OK` with `Auth-Server`/`Auth-Port`, or
an error text for the client, or `WAIT`.

Unlike nginx, which opens a new connection per attempt, one
`requests.Session` per server keeps connections alive (its urllib3 pool is
safe to share between session threads).  Any failure of the auth service
itself (refused, timed out, not HTTP, bad headers, no usable backend
address) raises AuthServiceError, which the session turns into the
protocol's internal-error line.
"""

import http.client
import ipaddress
import re
import socket
import threading
from dataclasses import dataclass

import requests
import requests.adapters
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.util import SKIP_HEADER

MAX_REPLY_HEADERS = 1024    # nginx's auth_http response buffer; more is an error
MAX_REPLY_BODY = 65536      # the body is ignored; a longer one drops the connection
POOL_SIZE = 64              # keep-alive connections kept per server
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESCAPED = frozenset(range(0x21)) | {0x25}     # control bytes, space and "%"


class AuthServiceError(Exception):
    """The auth service failed; the message is for the log."""


@dataclass(frozen=True)
class AuthRequest:
    """One question to the auth service; `extra` holds protocol-specific
    (name, value) headers such as SMTP's Client-Host, in order."""
    method: str
    login: bytes
    password: bytes
    salt: bytes
    protocol: str
    attempt: int
    client_ip: str
    extra: tuple = ()

    def __repr__(self):
        return f"AuthRequest({self.method}, login={self.login!r}, attempt={self.attempt})"


@dataclass(frozen=True)
class AuthReply:
    """The auth service's answer.  `status` is "OK", "WAIT" or the error
    text; `user`/`password` are the backend overrides (raw bytes or None)."""
    status: str
    server: str = None
    port: int = None
    user: bytes = None
    password: bytes = None
    wait: int = 0
    error_code: str = None
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
    """Auth-User/Auth-Pass escaping (spec 2.2): control bytes, space and "%"
    become %XX; everything else, UTF-8 included, passes raw.  The result is
    a str holding those bytes one-to-one (latin-1), as http.client sends it."""
    return "".join(f"%{byte:02X}" if byte in _ESCAPED else chr(byte) for byte in value)


class AuthClient:
    """Asks one `auth_http` service; shared by every session of a server."""

    def __init__(self, url, timeout, headers=()):
        host, port, uri = url
        self.host = f"[{host}]" if ":" in host else host   # nginx sends Host without the port
        self.url = f"http://{self.host}:{port}{uri}"
        self.timeout = timeout
        self.extra_headers = tuple(headers)
        self.http = requests.Session()
        self.http.trust_env = False     # no proxies or netrc from the environment
        self.http.headers.clear()
        self.in_flight = {}     # thread id -> connection; one key per thread
        self.adapter = _Adapter(self.in_flight, self.url, uri, pool_maxsize=POOL_SIZE,
                                max_retries=0)
        self.http.mount("http://", self.adapter)

    def headers_for(self, request):
        """The request headers in nginx's order (spec 2.2)."""
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
        headers += list(self.extra_headers)
        return headers

    def wire_headers(self, request):
        """headers_for() as requests must get them: bytes values (so logins
        pass byte for byte), and urllib3's own Accept-Encoding and
        User-Agent suppressed so nothing comes before Host."""
        headers = {name: value.encode("latin-1") for name, value in
                   self.headers_for(request)[:-len(self.extra_headers) or None]}
        headers.update((name, value.encode()) for name, value in self.extra_headers)
        headers.update({"Accept-Encoding": SKIP_HEADER, "User-Agent": SKIP_HEADER})
        return headers

    def ask(self, request):
        """One request through requests' transport adapter.  Session.get()
        would merge settings, copy cookie jars and parse the URL again on
        every login (two thirds of a login's CPU in a profile); the request
        here is the same every time except its headers, so it is built
        directly (requests' PreparedRequest) and handed to the adapter,
        which keeps the pooled keep-alive connections."""
        prepared = requests.PreparedRequest()
        prepared.method, prepared.url = "GET", self.url
        prepared.headers = self.wire_headers(request)
        try:
            response = self.adapter.send(prepared, stream=True,
                                         timeout=(self.timeout, self.timeout))
        except requests.Timeout:
            raise AuthServiceError(f"auth http server {self.url} timed out") from None
        except requests.RequestException as exc:
            raise AuthServiceError(f"auth http server {self.url} failed: {_reason(exc)}") \
                from None
        try:
            return parse_reply(_raw_headers(response))
        finally:
            _finish(response)

    def abort(self, thread_id):
        """Cut the request `thread_id` has in flight (fast stop)."""
        connection = self.in_flight.get(thread_id)
        if connection is not None and connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.http.close()


class _AbortableConnection(HTTPConnection):
    """While a request is in flight it is listed under the asking thread's
    id, so a fast stop can cut it instead of waiting `auth_http_timeout`."""
    in_flight = None            # per AuthClient, set by _Adapter

    def connect(self):
        super().connect()
        self.sock = _SteadyTimeout(self.sock)

    def request(self, *args, **kwargs):
        self.in_flight[threading.get_ident()] = self
        return super().request(*args, **kwargs)

    def getresponse(self, *args, **kwargs):
        try:
            return super().getresponse(*args, **kwargs)
        finally:
            self.in_flight.pop(threading.get_ident(), None)


class _SteadyTimeout:
    """The connection's socket, for urllib3, which sets its timeout again
    before every request and every response: a system call each time (one
    that lets go of the GIL), for a value that never changes here.  This
    passes on only a change; everything else goes to the socket."""

    def __init__(self, sock):
        self._sock = sock
        self._timeout = sock.gettimeout()

    def settimeout(self, seconds):
        if seconds != self._timeout:
            self._sock.settimeout(seconds)
            self._timeout = seconds

    def gettimeout(self):
        return self._timeout

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with pools of _AbortableConnection, for one URL.

    Three of HTTPAdapter's per-request steps are done once instead: finding
    the URL's connection pool (URL parsing and a pool-key lookup), working
    out the request target (a proxy lookup; there are no proxies here), and
    building a requests.Response with its headers copied into a
    case-insensitive dict and its cookies into a jar (the auth protocol has
    no cookies; nginx ignores them).  The response here is requests' own,
    with the urllib3 response as `raw`, which is all AuthClient reads.
    Together they were a fifth of an auth request's CPU time."""

    def __init__(self, in_flight, url, uri, **kwargs):
        self.in_flight = in_flight          # before super(): it builds the pools
        super().__init__(**kwargs)
        self.uri = uri
        self.pool = self.poolmanager.connection_from_url(url)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        connection = type("Connection", (_AbortableConnection,), {"in_flight": self.in_flight})
        pool = type("Pool", (HTTPConnectionPool,), {"ConnectionCls": connection})
        self.poolmanager.pool_classes_by_scheme = {"http": pool}

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self.pool

    def request_url(self, request, proxies):
        return self.uri

    def build_response(self, req, resp):
        response = requests.Response()
        response.raw, response.status_code, response.reason = resp, resp.status, resp.reason
        response.request, response.connection, response.url = req, self, req.url
        return response


def _raw_headers(response):
    """The reply's headers in order, duplicates kept, checked like nginx."""
    headers = list(response.raw.headers.items())
    size = len(response.reason or "") + 15
    for name, value in headers:
        size += len(name) + len(value) + 4
        if not _HEADER_NAME.fullmatch(name):
            raise AuthServiceError("auth http server sent invalid header in response")
    if size > MAX_REPLY_HEADERS:
        raise AuthServiceError("auth http server sent too long response")
    return headers


def _finish(response):
    """Read a short body so the connection can be reused; drop a long one."""
    try:
        body = response.raw.read(MAX_REPLY_BODY + 1, decode_content=False)
        if len(body) > MAX_REPLY_BODY:
            response.raw.close()
    except Exception:               # the body does not matter; the socket does
        response.raw.close()
    response.close()


def parse_reply(headers):
    """(name, value) pairs -> AuthReply, or AuthServiceError (spec 2.3-2.5)."""
    values = {}
    for name, value in headers:
        key = name.lower()
        value = value.strip(" ")
        if key == "auth-status" and key in values and value in ("OK", "WAIT"):
            continue                # the last error text wins over OK/WAIT
        values[key] = value
    status = values.get("auth-status", "OK")
    server = port = None
    if status == "OK":
        server, port = values.get("auth-server"), values.get("auth-port")
        if server is None or port is None:
            raise AuthServiceError("auth http server did not send server or port")
        server, port = _server(server), _port(port)
    return AuthReply(
        status=status, server=server, port=port,
        user=_raw(values.get("auth-user")), password=_raw(values.get("auth-pass")),
        wait=_atoi(values.get("auth-wait", "")), error_code=values.get("auth-error-code"),
        headers=tuple(headers))


def _server(text):
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise AuthServiceError(f'auth http server sent invalid server address:"{text}"') \
            from None


def _port(text):
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise AuthServiceError(f'auth http server sent invalid server port:"{text}"')
    return int(text)


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
        if isinstance(exc, OSError) and exc.strerror:
            return f"{exc.errno}: {exc.strerror}"
        if isinstance(exc, http.client.HTTPException):
            return f"sent invalid response ({type(exc).__name__})"
        inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None)
        reason = getattr(exc, "reason", None)
        exc = reason if isinstance(reason, BaseException) else \
            inner or exc.__cause__ or exc.__context__
    return "connection failed"
