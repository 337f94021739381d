"""After the credentials: ask the auth service, log in to the backend, relay.

A protocol handler (`do_LOGIN`, `do_PASS`, `do_AUTH`, ...) that has taken
the client's credentials returns them, and the session's command loop calls
`log_in(session, credentials)`, the one login step all three protocols
share, and then, once it has logged in, `relay(session)`:

    ask the auth service (again while it says WAIT)
      -> refused: the protocol's failure reply (after any Auth-Wait, and
         for XOAUTH2/OAUTHBEARER after any Auth-Error-SASL challenge and
         the client's answer to it), and either the end of the session
         or, with Auth-Wait, a fresh start
      -> admitted: connect to the backend it named, replay the login there
         (the protocol's `backend_login` hook), forward the backend's final
         reply, then relay bytes both ways until one side closes.
      -> the backend cannot be reached (no connection, no greeting) and
         `proxy_backend_tries` allows another: ask the auth service again,
         naming the backends that failed (Auth-Backend-Failed), and try
         the one it names.  The client only waits.

What it uses of the session: its config and service (auth client, TLS to
backends), its client Stream and log, the protocol hooks
(auth_extra_headers, auth_failed_reply, back_to_start, backend_login,
relay_buffers, continuation, sasl_syntax_reply)
and the fields the logs and the status page show.

Deadlines (SECURITY.md, "Deadlines, phase by phase"): the client has none
while the auth service is asked (`auth_http_timeout` per request), during
an Auth-Wait (the wait itself) and while the backend logs in (`timeout`
from the connect, afresh for each backend that proxy_backend_tries
tries); each write to the client afterwards, and the next try after an
Auth-Wait, has a fresh `timeout`.  During all three waits the client's
close ends the session at once: the auth request and the backend Stream
are given the client's raw socket to watch (stream.ClientGone), and
Auth-Wait watches it itself (Stream.wait).
"""

import dataclasses
import functools
import time

from . import backend, sasl
from .auth_http import AuthRequest, AuthServiceError
from .backend import BackendError, Origin
from .log import hostport
from .ops import metrics, proxy_protocol
from .ops.splice import relay_class
from .stream import TooLong

MAX_WAIT_RETRIES = 10       # `Auth-Status: WAIT` answers in a row before we give up
                            # (nginx loops for ever; its docs suggest 10-20 attempts)


def log_in(session, credentials):
    """Ask the auth service; on success log in to the backend: True when
    the session is logged in and relay() may start.  On a refusal the
    client gets the error; with Auth-Wait the session goes back to the
    start state, as nginx does."""
    session.attempt += 1
    session.set_login(credentials.login)
    if session.tracer:
        session.tracer.login(credentials.login)
    session.set_step("in http auth state")
    session.enter(metrics.AUTH_SERVICE)
    session.client.set_deadline(None)
    request = auth_request(session, credentials)
    reply = session.auth_reply = ask_auth_service(session, request)
    failed = []             # "addr:port" of each backend that could not be reached
    while reply.ok:
        try:
            stream = connect_backend(session, credentials, reply)
        except backend.Unreachable as exc:
            failed.append(hostport(reply.server, reply.port))
            reply = session.auth_reply = another_backend(session, request, failed, exc)
            continue
        return stream is not None
    refused(session, reply, credentials)
    return False


def auth_request(session, credentials):
    """The question for the auth service (spec 2.2, and beyond nginx the
    client's port and the address it connected to)."""
    extra = proxy_protocol.auth_headers(session.proxy_header, session.auth_extra_headers())
    client_port = session.client_address[1] if session.client_address else None
    server_ip, server_port = session.server_address or (None, None)
    return AuthRequest(method=credentials.method, login=credentials.login,
                       password=credentials.password, salt=credentials.salt,
                       protocol=session.protocol, attempt=session.attempt,
                       client_ip=session.client_text, extra=extra + session.tls_headers(),
                       client_port=client_port, server_ip=server_ip, server_port=server_port)


def another_backend(session, request, failed, exc):
    """proxy_backend_tries: after `failed` backends could not be reached
    (the last one with `exc`), the auth service's answer for the same
    login (same Auth-Login-Attempt), told which ones failed.  Raises when
    the tries are spent: the client gets the internal-error line."""
    tries = session.config.proxy_backend_tries
    if tries == 1:
        raise exc                               # nginx: no second try
    session.log.warning("%s, backend %d of %d", exc, len(failed), tries)
    close_backend(session)
    if len(failed) >= tries:
        raise BackendError(f"no backend could be reached in {tries} tries") from None
    session.set_step("in http auth state")
    session.enter(metrics.AUTH_SERVICE)
    return ask_auth_service(session, dataclasses.replace(request, failed_backends=tuple(failed)))


def close_backend(session):
    """Let go of a backend that failed before the next one is tried."""
    session.backend_socket.close()
    session.backend = session.backend_socket = None
    session.context.upstream = None


def ask_auth_service(session, request):
    """The auth service's answer, asking again (same attempt number) while
    it says WAIT, at most MAX_WAIT_RETRIES times."""
    reply = ask_once(session, request)
    for _ in range(MAX_WAIT_RETRIES):
        if not reply.retry:
            return reply
        session.log.info("auth http server asked to wait %ss", reply.wait)
        session.client.wait(reply.wait, session.command_limit())
        reply = ask_once(session, request)
    if reply.retry:
        raise AuthServiceError(f"auth http server answered WAIT {MAX_WAIT_RETRIES + 1} times")
    return reply


def ask_once(session, request):
    """One auth service round trip, timed and counted for the status page."""
    started = time.monotonic()
    session.log.debug("auth http request sent: %s, attempt %d", request.method,
                      request.attempt)
    try:
        reply = session.service.auth.ask(request, watch=session.request)
    except AuthServiceError:
        session.meter.auth(session.protocol, metrics.ERROR, time.monotonic() - started)
        raise
    session.meter.auth(session.protocol, metrics.auth_result(reply),
                       time.monotonic() - started)
    session.log.debug('auth http server answered "%s"%s', reply.status,
                      f", backend {hostport(reply.server, reply.port)}" if reply.ok else "")
    return reply


def refused(session, reply, credentials):
    """The client is told no; with Auth-Wait, after the wait, and it may
    try again under a fresh `timeout`.  After XOAUTH2 or OAUTHBEARER an
    Auth-Error-SASL challenge and the client's answer come first."""
    session.log.info('client login failed: "%s"', reply.status)
    if reply.wait:
        session.client.wait(reply.wait, session.command_limit())
    session.client.set_deadline(session.config.timeout)  # the reply and the next try
    failure = session.auth_failed_reply(reply)
    challenge = reply.header("Auth-Error-SASL")
    if challenge is not None and credentials.method in sasl.OAUTH_METHODS:
        failure = sasl_error(session, challenge.strip(" ")) or failure
    if not reply.wait:
        session.ended("auth")
        session.send(failure)
        session.quit = True
        return
    session.send(failure)
    session.back_to_start()
    session.set_step("in auth state")
    session.enter(metrics.GREETING)


def sasl_error(session, challenge):
    """Auth-Error-SASL (freenginx; RFC 7628 3.2.2): the auth service's
    error (base64 JSON) goes to the client as a challenge, and its answer
    (`AQ==` or an empty line) ends the exchange, under `timeout`.  The
    protocol's syntax-error reply if that answer is not base64, else None
    (the failure reply follows as usual)."""
    if not sasl.is_challenge(challenge):
        raise AuthServiceError("auth http server sent invalid Auth-Error-SASL")
    session.client.set_deadline(session.config.timeout)
    session.send(session.continuation(challenge))
    if session.tracer:
        session.tracer.sasl(True)
    failed = True
    try:
        sasl.decode(session.client.readline(session.command_limit()))
        failed = False
    except sasl.SaslError:
        return session.sasl_syntax_reply()
    except TooLong:         # an answer is a credential: no IMAP tag is echoed from it
        raise TooLong(b"") from None
    finally:
        if session.tracer:
            session.tracer.sasl(False, failed)
    return None


def connect_backend(session, credentials, reply):
    """Log in to the backend the auth service chose and forward its final
    reply; the backend Stream, or None when the backend refused and the
    client was shown why (proxy_pass_error_message)."""
    login = reply.user if reply.user is not None else credentials.login
    clear_text = credentials.password if credentials.method == "plain" else b""
    password = reply.password if reply.password is not None else clear_text
    if session.needs_backend_password and not password:
        raise AuthServiceError("auth http server did not send password")
    session.set_login(login)
    session.context.upstream = hostport(reply.server, reply.port)
    session.set_step("connecting to upstream")
    session.enter(metrics.BACKEND_LOGIN)
    stream = session.backend = open_backend(session, reply.server, reply.port)
    tls = session.service.backend_tls
    starttls = None         # proxy_starttls: the backend login upgrades first
    if tls and not tls.implicit:
        starttls = functools.partial(backend.start_tls, stream, tls, reply.server)
    elif not tls:
        session.service.warn_clear_text(reply.server, session.log)
    try:
        final = session.backend_login(stream, login, password, starttls, client_origin(session))
    except BackendError as exc:
        return backend_failed(session, exc)
    session.client.set_deadline(session.config.timeout)    # a client that stops reading
    session.send(final + stream.take_buffer())
    return stream


def client_origin(session):
    """What `proxy_client_address on` tells an IMAP or POP3 backend; None
    when off, or when the client has no IP address (a unix-domain socket
    without a PROXY header)."""
    if not session.config.proxy_client_address or not session.client_address:
        return None
    server_ip, server_port = session.server_address or (None, None)
    return Origin(session.client_address[0], session.client_address[1],
                  server_ip, server_port, session.context.conn)


def open_backend(session, server, port):
    """The connected (and with proxy_ssl, encrypted) backend Stream, under
    the `timeout` deadline.  The socket is the session's before connect()
    starts, so a fast stop can cut a connect in progress."""
    sock = session.backend_socket = backend.new_socket(server)
    mode, header = session.config.proxy_protocol, b""
    if mode != "off":       # the address the client connected to is a system call away
        header = proxy_protocol.outgoing(mode, session.client_address,
                                         session.request.getsockname())
    try:
        stream = backend.connect(sock, server, port, session.config.timeout,
                                 session.service.backend_tls, header)
    except BackendError:
        session.meter.backend_error(session.protocol)
        raise
    session.log.debug("upstream connected")
    stream.watch = session.request      # the client's close ends the login (stream.py)
    if session.tracer:
        stream = session.tracer.backend_stream(stream)
    return stream


def backend_failed(session, exc):
    """proxy_pass_error_message: show the backend's refusal verbatim (but
    a backend that did not greet is passed over when proxy_backend_tries
    allows another)."""
    passed_over = isinstance(exc, backend.Unreachable) and session.config.proxy_backend_tries > 1
    if exc.reply and session.config.proxy_pass_error_message and not passed_over:
        session.log.error("%s", exc)
        session.send_quietly(exc.reply)
        session.ended("backend")
        session.quit = True
        return None
    raise exc


def relay(session):
    """Copy bytes both ways until one side closes (relay.py), then count them."""
    session.set_step("proxying")
    session.enter(metrics.RELAY)
    session.log.info("client logged in, proxying to %s", session.context.upstream)
    client, backend_sock = session.client.sock, session.backend.sock
    relay_type = relay_class(client, backend_sock)
    relayer = relay_type(client, backend_sock, session.config.proxy_timeout,
                         linger=session.config.timeout, buffers=session.relay_buffers(),
                         name=f"session-{session.context.conn}")
    leftover = session.client.take_buffer()        # already counted as received
    session.log.debug("relay started (%s), %d pipelined bytes first", relay_type.__name__,
                      len(leftover))
    outcome = relayer.run(leftover)
    session.log.debug("relay done: %d bytes from the client, %d from the backend, "
                      "closed by %s", outcome.client_bytes, outcome.backend_bytes,
                      outcome.closed_by or "error")
    session.meter.relayed(session.protocol, outcome.client_bytes, outcome.backend_bytes)
    session.quit = True
    session.relayed = (max(0, outcome.client_bytes - len(leftover)), outcome.backend_bytes)
    session.ended(outcome.closed_by or "error")
    if session.tracer:
        session.tracer.relayed(outcome.client_bytes, outcome.backend_bytes)
