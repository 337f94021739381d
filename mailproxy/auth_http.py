"""The auth service client: may this client log in, and to which backend?

The proxy asks an HTTP service (the `auth_http` address) with one GET whose
headers carry the credentials (spec 2.2); the answer comes back as headers
too (spec 2.3-2.4): `Auth-Status: OK` with `Auth-Server`/`Auth-Port`, or
an error text for the client, or `WAIT`.  As in nginx, a host name in the
URL was resolved once, when the configuration loaded (addresses.py): the
request goes to that address, and the Host header carries the name.

The transport, top down, uses requests and urllib3 only through their
public classes and documented extension points:

* one `requests.Session` per server, with an `AuthAdapter` mounted for
  http://.  Subclassing HTTPAdapter is requests' way to change the
  transport, and `get_connection_with_tls_context()` is the method it
  exposes "for use when subclassing" to choose the pool for a request:
  ours returns one `AuthPool`, whatever host the URL names.  For
  `auth_http unix:/path:/uri` the URL is http://localhost/uri and the
  pool holds the path;
* `AuthPool`: urllib3's HTTPConnectionPool making `AuthConnection`s (its
  `ConnectionCls` class attribute), each given the socket path and the
  time budget (the pool's `**conn_kw`, passed on to every connection);
* `AuthConnection`: urllib3's HTTPConnection with its public `connect()`
  replaced (a unix socket or TCP) and `request()`/`getresponse()` wrapped;
* `DeadlineSocket`: a socket.socket whose waits all end at one deadline.

Not taken: an `init_poolmanager()` that changes the PoolManager's
`pool_classes_by_scheme` (an attribute urllib3 does not document), and a
watchdog thread that shuts the socket at the deadline (it would need the
socket from inside the response: private attributes).

The deadline: `auth_http_timeout` bounds connecting, sending the request
and receiving the reply's headers together, as nginx's one timer that is
never re-armed (spec 1.3, 2.1).  requests' timeouts apply to each socket
operation, which a service trickling its headers a byte at a time never
hits.  So `AuthConnection.request()` arms its socket with the deadline
(now + auth_http_timeout) when each request starts, and before each
blocking call (connect, sendall, recv_into) `DeadlineSocket` sets the
socket timeout to what is left, or raises TimeoutError when nothing is.
recv_into is what `socket.makefile()`'s reader calls, and http.client
reads the reply through it (ssl.SSLSocket, the standard library's own
socket.socket subclass, overrides the same methods and is read through
makefile() just so).  The body, read only to reuse the connection, is under the
same deadline.  One wait is outside it: a host name in `auth_http` is
looked up (getaddrinfo, which takes no timeout) as a connection opens; an
IP literal needs no lookup.

The end of the headers: http.client takes the service's close as the end
of the headers, while nginx counts a reply cut before its blank line as a
failure (spec 2.1).  DeadlineSocket notes a read that met the close, and
`AuthConnection.getresponse()` turns headers that ended so into
`IncompleteHeaders`.

Unlike nginx, which opens a new connection per attempt, the pool keeps
connections alive.  What the session threads share is the pool, which is
safe to share, and a cookie jar that keeps nothing.  It keeps up to
POOL_SIZE idle connections; a login that finds none idle opens one more
rather than wait (block off).  No request is ever sent twice (NO_RETRY says
why).  Any failure of the auth service itself (refused, timed out, not
HTTP, bad headers, no usable backend address) raises AuthServiceError,
which the session turns into the protocol's internal-error line.
"""

import http.client
import http.cookiejar
import ipaddress
import re
import socket
import time
from dataclasses import dataclass

import requests
import requests.adapters
from urllib3 import HTTPConnectionPool
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import SKIP_HEADER, Retry

from .addresses import UNIX_PREFIX, AuthHttp

MAX_REPLY_HEADERS = 1024    # nginx's auth_http response buffer; more is an error
MAX_REPLY_BODY = 65536      # the body is ignored; a longer one drops the connection
POOL_SIZE = 64              # idle keep-alive connections kept per server
UNIX_HOST = "localhost"     # nginx's Host header for a unix: auth service
TIMED_OUT = "timed out"
# urllib3's retries, all off.  A request that failed may have reached the
# auth service, which may have counted the attempt, so it is never sent
# again: the login fails, as with nginx, which makes one attempt per login.
# total=0 ends at the first error of any kind, a refused connect included;
# read=False raises a read error as it came, so a timeout stays a timeout;
# redirect=False returns a 3xx as the reply (spec 2.3: the status is
# ignored); status=0, other=0: no retry on a status or anything else.
# A kept connection the service has closed needs no retry: the pool checks
# for the close before it reuses one, and connects anew.  Only a close that
# crosses a request on the wire fails that login (internal error).
NO_RETRY = Retry(total=0, connect=0, read=False, redirect=False, status=0, other=0)
NO_COOKIES = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])   # as nginx, none kept
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESCAPED = frozenset(range(0x21)) | {0x25, 0x7F}     # control bytes, space, "%" and DEL
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")   # in a reply's value: invalid (HTAB is not)


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
            pool = AuthPool(UNIX_HOST, path=host[len(UNIX_PREFIX):], budget=timeout)
        else:
            self.host = _bracketed(host)        # nginx sends Host without the port
            # nginx connects to the address the name resolved to at load
            self.url = target = f"http://{_bracketed(address or host)}:{port}{uri}"
            pool = AuthPool(address or host, port, budget=timeout)
        self.http = requests.Session()
        self.http.trust_env = False     # no proxies or netrc from the environment
        self.http.headers.clear()       # no User-Agent, Accept, Connection of requests' own
        self.http.cookies.set_policy(NO_COOKIES)
        self.http.mount("http://", AuthAdapter(pool))
        # Every request is this one with its own headers, so it is prepared
        # once: merging the session's settings and parsing the URL again for
        # each login were over a quarter of an auth request's CPU.
        self.template = self.http.prepare_request(requests.Request("GET", target))

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
        """One GET; the reply's headers are the answer.  With stream=True
        the session returns once the headers are in, leaving the body to
        _finish(); no redirect is followed (nginx ignores the status).
        requests' own timeout (per socket operation) is never the one that
        ends a request: the connection's deadline comes first."""
        prepared = self.template.copy()
        try:
            prepared.prepare_headers(self.wire_headers(request))
            response = self.http.send(prepared, timeout=(self.timeout, self.timeout),
                                      stream=True, allow_redirects=False)
        except requests.RequestException as exc:
            raise AuthServiceError(self.failure(exc)) from None
        except ValueError:
            # Session.send parses a 3xx's Location (after reading its body)
            # even when it follows no redirect, for Response.next.
            raise AuthServiceError(f"auth http server {self.url} sent invalid Location") \
                from None
        try:
            return parse_reply(_raw_headers(response))
        finally:
            _finish(response)

    def failure(self, exc):
        """The log line for a request that failed: "timed out" whatever
        step the deadline cut (connect, send or a read), else the cause."""
        reason = TIMED_OUT if isinstance(exc, requests.Timeout) else _reason(exc)
        if reason == TIMED_OUT:
            return f"auth http server {self.url} timed out"
        return f"auth http server {self.url} failed: {reason}"

    def close(self):
        self.http.close()


class AuthAdapter(requests.adapters.HTTPAdapter):
    """requests' transport for one auth service: every request goes to the
    one AuthPool, whatever host its URL names."""

    def __init__(self, pool):
        super().__init__(max_retries=NO_RETRY)
        self.pool = pool

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self.pool

    def close(self):
        super().close()
        self.pool.close()


class IncompleteHeaders(http.client.HTTPException):
    """The auth service closed the connection before the blank line that
    ends the headers (spec 2.1: a failure, not a complete reply)."""


class DeadlineSocket(socket.socket):
    """A socket whose blocking calls all end at one deadline (`arm()`),
    instead of each waiting a full timeout: before each call it sets the
    socket timeout to the time left, and past the deadline it raises
    TimeoutError at once.  `ended` says a read has met the peer's close
    since the socket was armed."""

    @classmethod
    def connected(cls, address, deadline):
        """A socket connected to a unix path or a (host, port) by the
        deadline; each address a host name gives is tried in turn."""
        if isinstance(address, str):
            candidates = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, "", address)]
        else:
            candidates = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)
        error = OSError(f"no address for {address}")
        for family, kind, proto, _, sockaddr in candidates:
            sock = cls(family, kind, proto)
            sock.arm(deadline)
            try:
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            if family != socket.AF_UNIX:    # no Nagle delay, as urllib3 sets it
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise error

    def arm(self, deadline):
        """Start one request: every wait from now on ends by `deadline`
        (a time.monotonic() value)."""
        self.deadline = deadline
        self.ended = False

    def time_left(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(TIMED_OUT)
        return left

    def connect(self, address):
        self.settimeout(self.time_left())
        super().connect(address)

    def sendall(self, data, flags=0):
        self.settimeout(self.time_left())
        super().sendall(data, flags)

    def recv_into(self, buffer, nbytes=0, flags=0):
        self.settimeout(self.time_left())
        count = super().recv_into(buffer, nbytes, flags)
        if count == 0:
            self.ended = True
        return count


class AuthConnection(HTTPConnection):
    """One connection to the auth service, over TCP or, with `path`, a
    unix socket.  For each request urllib3 calls request(), which arms the
    socket with the request's deadline (now + `budget`, auth_http_timeout),
    then getresponse(); the socket is opened (connect()) on the first
    request and again after a close."""

    def __init__(self, host, port=None, *, path=None, budget, **kwargs):
        super().__init__(host, port, **kwargs)
        self.path = path
        self.budget = budget
        self.deadline = None

    def request(self, *args, **kwargs):
        self.deadline = time.monotonic() + self.budget
        if self.sock is not None:
            self.sock.arm(self.deadline)
        super().request(*args, **kwargs)

    def connect(self):
        """Open the socket under the request's deadline; failures are
        raised as urllib3's own connect errors, as its connect() does."""
        address = self.path or (self.host, self.port)
        try:
            self.sock = DeadlineSocket.connected(address, self.deadline)
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"connecting to {address} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"cannot connect to {address}: {exc}") from exc

    def getresponse(self):
        sock = self.sock                # http.client lets it go when the reply says close
        response = super().getresponse()
        if sock.ended:                  # the headers stopped at the close, not a blank line
            response.close()
            raise IncompleteHeaders("connection closed before the end of the headers")
        return response


class AuthPool(HTTPConnectionPool):
    """urllib3's connection pool, of AuthConnections; `path` and `budget`
    are passed on to each (urllib3's conn_kw)."""

    ConnectionCls = AuthConnection

    def __init__(self, host, port=None, *, path=None, budget):
        super().__init__(host, port, maxsize=POOL_SIZE, block=False, path=path, budget=budget)


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
