"""How an auth request reaches the auth service (auth_http.py asks).

requests is the auth client's interface: auth_http.py prepares each
request as a `requests.PreparedRequest`, hands it to a transport adapter,
and gets a `requests.Response` back, or one of requests' exceptions.  A
transport adapter is requests' published way to carry requests
differently (`requests.adapters.BaseAdapter`: `send()` and `close()`).
Ours, `AuthAdapter`, one per server, speaks HTTP/1.1 with the standard
library's http.client on connections it keeps for the next login:

* `AuthAdapter.send()`: one request on a kept connection (the newest
  idle one) or a new one; the reply's headers; then its body, which is
  ignored but read (up to MAX_BODY bytes, else the connection is dropped)
  so that the connection can be kept, unless the reply says the
  connection ends with it.  Up to POOL_SIZE idle connections
  are kept; a login that finds none idle opens one more rather than wait;
* `AuthConnection`: http.client's HTTPConnection, its `connect()` made
  to open a DeadlineSocket, over TCP or to a unix socket;
* `DeadlineSocket`: a socket.socket whose waits all end at one deadline.

Why not requests' own HTTPAdapter over urllib3 (what carried the requests
until issue 19): urllib3's pool, retry logic, header dicts and response
wrapper are for a general client (TLS, proxies, many hosts, retries), and
none of it is wanted here.  Measured with `python tests/bench/auth_cpu.py
3000` (and `500 calls`), an auth request took 0.31 ms of CPU and 1,430
Python calls through it, and 0.17-0.18 ms and 748 calls through this
adapter, on a login that took about 1.4 ms of CPU in all (docs/benchmark.md).

No request is ever sent twice.  A request that failed may have reached
the auth service, which may have counted the attempt, so the login fails,
as with nginx, which makes one attempt per login.  A kept connection is
looked at before it is used (`AuthConnection.dropped()`): one that the
service has closed meanwhile is thrown away and the next one taken, as no
byte of the request has gone out yet.  Only a close that crosses a request
on the wire fails that login (internal error).

The deadline: `auth_http_timeout` bounds connecting, sending the request
and receiving the reply's headers together, as nginx's one timer that is
never re-armed (spec 1.3, 2.1), and the body is read under the same
deadline.  A per-operation socket timeout would never end a request whose
service trickles its headers a byte at a time.  So `send()` arms the
connection's socket with the deadline (now + auth_http_timeout), and
before each blocking call (connect, sendall, recv_into) `DeadlineSocket`
sets the socket timeout to what is left (lazily, as stream.py does), or
raises TimeoutError when nothing is.  recv_into is what
`socket.makefile()`'s reader calls, and http.client reads the reply
through it (ssl.SSLSocket, the standard library's own socket.socket
subclass, overrides the same methods and is read through makefile() just
so).  One wait is outside the deadline: a host name in `auth_http` is
looked up (getaddrinfo, which takes no timeout) as a connection opens; an
IP literal needs no lookup.

The client's close: a login whose client has gone need not wait for its
answer.  `AuthClient.ask()` sends the request inside `watching(sock)`,
which names the client's raw socket for the thread (a threading.local: the
request passes through requests' adapter interface, which carries no such
value); `send()` arms the socket with it, and before each recv_into up to
the end of the reply's headers DeadlineSocket waits with
stream.wait_readable(), which raises stream.ClientGone when the client
closes or resets (the body, sent with the headers, is read unwatched).
ClientGone leaves `send()` as it came, and the connection, with a reply
half read, is closed, never kept.  The connect and the send are not
watched (a blocking connect() cannot be polled; the request is one short
write).

The end of the headers: http.client takes the service's close as the end
of the headers, while nginx counts a reply cut before its blank line as a
failure (spec 2.1).  DeadlineSocket notes a read that met the close, and
`AuthConnection.getresponse()` turns headers that ended so into
`IncompleteHeaders`.

Unlike nginx, which opens a new connection per attempt, the adapter keeps
connections alive; what the session threads share is the adapter, whose
idle list is taken from and given back to under a lock.
"""

import contextlib
import http.client
import select
import socket
import threading
import time

import requests
import requests.adapters
from requests.structures import CaseInsensitiveDict

from .stream import lazy_settimeout, wait_readable

POOL_SIZE = 64              # idle keep-alive connections kept per server
MAX_BODY = 65536            # a reply's body is ignored; a longer one drops the connection
TIMED_OUT = "timed out"
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


class AuthAdapter(requests.adapters.BaseAdapter):
    """requests' transport for one auth service, at `address` (a unix
    path or (host, port)); each request's deadline is now + `budget`
    seconds.  A request's `headers` are (name, value) pairs, sent as they
    are in that order (a name may repeat), after the request line."""

    def __init__(self, address, budget):
        super().__init__()
        self.address, self.budget = address, budget
        self.idle = []                  # kept connections, the newest last
        self.closed = False             # close(): keep no connection from now on
        self.lock = threading.Lock()    # guards `idle` and `closed`

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        """One request, and the whole reply; the arguments after the
        request are requests' and mean nothing here (the deadline is the
        adapter's own).  Raises requests.Timeout when the deadline cut it,
        requests.ConnectionError for any other failure of the service, and
        stream.ClientGone as it came."""
        connection = self._take()
        connection.arm(time.monotonic() + self.budget, getattr(_watched, "sock", None))
        try:
            connection.putrequest(request.method, request.path_url,
                                  skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers:
                connection.putheader(name, value)
            connection.endheaders()
            reply = connection.getresponse()
        except TimeoutError as exc:
            connection.close()
            raise requests.Timeout(exc, request=request) from exc
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise requests.ConnectionError(exc, request=request) from exc
        except BaseException:
            connection.close()
            raise
        self._finish(connection, reply)
        return self._response(request, reply)

    def close(self):
        """Close the idle connections, and each one still carrying a
        request once its reply is read (the server is stopping)."""
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
        for connection in idle:
            connection.close()

    def _take(self):
        """The newest kept connection the service has not closed, else a
        new one (which connects on its first request)."""
        while True:
            with self.lock:
                connection = self.idle.pop() if self.idle else None
            if connection is None:
                return AuthConnection(self.address)
            if not connection.dropped():
                return connection
            connection.close()

    def _finish(self, connection, reply):
        """Read the body (ignored) so the connection can be kept, and keep
        it unless the reply or its size says otherwise.  A reply that says
        the connection ends with it (HTTP/1.0, `Connection: close`, no
        length) is not read on: nothing would be kept, and a service that
        then did not close would hold the login to its deadline."""
        if reply.will_close:
            reply.close()
            connection.close()
            return
        try:
            body = reply.read(MAX_BODY + 1)
        except Exception:               # http.client's errors, and its ValueError for a
            body = None                 # negative chunk size: the body does not matter
        keep = body is not None and len(body) <= MAX_BODY and reply.isclosed()
        with self.lock:
            if keep and not self.closed and len(self.idle) < POOL_SIZE:
                self.idle.append(connection)
                return
        connection.close()

    def _response(self, request, reply):
        response = requests.Response()
        response.status_code, response.reason = reply.status, reply.reason
        response.headers = CaseInsensitiveDict(reply.getheaders())
        response.raw = reply            # read to its end: its getheaders() keeps order and repeats
        response.url, response.request, response.connection = request.url, request, self
        return response


class IncompleteHeaders(http.client.HTTPException):
    """The auth service closed the connection before the blank line that
    ends the headers (spec 2.1: a failure, not a complete reply)."""


class DeadlineSocket(socket.socket):
    """A socket whose blocking calls all end at one deadline (`arm()`),
    instead of each waiting a full timeout: before each call it sets the
    socket timeout to the time left (lazily: stream.lazy_settimeout), and
    past the deadline it raises TimeoutError at once.  `ended` says a read
    has met the peer's close since the socket was armed; `watch`, a socket
    whose close ends each read with stream.ClientGone (None: none)."""

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
            if family != socket.AF_UNIX:    # no Nagle delay: the request is one write
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
        lazy_settimeout(self, self.time_left())
        super().connect(address)

    def sendall(self, data, flags=0):
        lazy_settimeout(self, self.time_left())
        super().sendall(data, flags)

    def recv_into(self, buffer, nbytes=0, flags=0):
        if self.watch is not None:
            wait_readable(self, self.time_left(), self.watch)
        lazy_settimeout(self, self.time_left())
        count = super().recv_into(buffer, nbytes, flags)
        if count == 0:
            self.ended = True
        return count


class AuthConnection(http.client.HTTPConnection):
    """One connection to the auth service at `address` (a unix path or
    (host, port)).  The socket is opened (connect()) on the first request
    and again after a close, under the deadline `arm()` set for the
    request; the request's own Host header names the service."""

    def __init__(self, address):
        super().__init__("localhost")   # http.client's host: unused, Host is sent as given
        self.address = address
        self.deadline = None
        self.watch = None

    def arm(self, deadline, watch):
        """Give this request's deadline, and the client socket to watch
        (None: none), to the socket, or to the one connect() will open."""
        self.deadline, self.watch = deadline, watch
        if self.sock is not None:
            self.sock.arm(deadline, watch)

    def connect(self):
        self.sock = DeadlineSocket.connected(self.address, self.deadline, self.watch)

    def dropped(self):
        """Has the service closed this idle connection (or sent bytes no
        request asked for)?  Either way it cannot carry a request."""
        if self.sock is None:
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def getresponse(self):
        sock = self.sock                # http.client lets it go when the reply says close
        response = super().getresponse()
        sock.watch = None               # the body is read unwatched
        if sock.ended:                  # the headers stopped at the close, not a blank line
            response.close()
            raise IncompleteHeaders("connection closed before the end of the headers")
        return response
