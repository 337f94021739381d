"""How an auth request reaches the auth service (auth_http.py asks).

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

The client's close: a login whose client has gone need not wait for its
answer.  `AuthClient.ask()` sends the request inside `watching(sock)`,
which names the client's raw socket for the thread (a threading.local:
the request passes through requests and urllib3, which carry no such
value); `AuthConnection.request()` reads it as it arms the socket, and
before each recv_into up to the end of the reply's headers DeadlineSocket
waits with stream.wait_readable(), which raises stream.ClientGone when the
client closes or resets (the body, sent with the headers, is read
unwatched).  ClientGone is none of the errors urllib3 handles, so it
leaves through requests as it came, and urllib3's `urlopen()` closes the
connection on its way out (a request that ended by any exception does not
give its connection back to the pool), so a half-read reply is never read
as the next login's.  The connect and the send are not watched (a
blocking connect() cannot be polled; the request is one short write).

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
why).
"""

import contextlib
import http.client
import socket
import threading
import time

import requests.adapters
from urllib3 import HTTPConnectionPool
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import Retry

from .stream import wait_readable

POOL_SIZE = 64              # idle keep-alive connections kept per server
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
_watched = threading.local()    # .sock: the client socket of this thread's request


@contextlib.contextmanager
def watching(sock):
    """Within the block, requests this thread sends end with
    stream.ClientGone as soon as `sock` (a raw socket) closes."""
    _watched.sock = sock
    try:
        yield
    finally:
        _watched.sock = None


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
    since the socket was armed; `watch`, a socket whose close ends each
    read with stream.ClientGone (None: none)."""

    @classmethod
    def connected(cls, address, deadline, watch=None):
        """A socket connected to a unix path or a (host, port) by the
        deadline, armed with it and `watch`; each address a host name
        gives is tried in turn."""
        if isinstance(address, str):
            candidates = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, "", address)]
        else:
            candidates = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)
        error = OSError(f"no address for {address}")
        for family, kind, proto, _, sockaddr in candidates:
            sock = cls(family, kind, proto)
            sock.arm(deadline, watch)
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

    def arm(self, deadline, watch=None):
        """Start one request: every wait from now on ends by `deadline`
        (a time.monotonic() value), and every read early if `watch`
        closes."""
        self.deadline = deadline
        self.watch = watch
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
        if self.watch is not None:
            wait_readable(self, self.time_left(), self.watch)
        self.settimeout(self.time_left())
        count = super().recv_into(buffer, nbytes, flags)
        if count == 0:
            self.ended = True
        return count


class AuthConnection(HTTPConnection):
    """One connection to the auth service, over TCP or, with `path`, a
    unix socket.  For each request urllib3 calls request(), which arms the
    socket with the request's deadline (now + `budget`, auth_http_timeout)
    and the client socket `watching()` names, then getresponse(); the
    socket is opened (connect()) on the first request and again after a
    close."""

    def __init__(self, host, port=None, *, path=None, budget, **kwargs):
        super().__init__(host, port, **kwargs)
        self.path = path
        self.budget = budget
        self.deadline = None
        self.watch = None

    def request(self, *args, **kwargs):
        self.deadline = time.monotonic() + self.budget
        self.watch = getattr(_watched, "sock", None)
        if self.sock is not None:
            self.sock.arm(self.deadline, self.watch)
        super().request(*args, **kwargs)

    def connect(self):
        """Open the socket under the request's deadline; failures are
        raised as urllib3's own connect errors, as its connect() does."""
        address = self.path or (self.host, self.port)
        try:
            self.sock = DeadlineSocket.connected(address, self.deadline, self.watch)
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"connecting to {address} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"cannot connect to {address}: {exc}") from exc

    def getresponse(self):
        sock = self.sock                # http.client lets it go when the reply says close
        response = super().getresponse()
        sock.watch = None               # the body is read unwatched (AuthClient.ask)
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
