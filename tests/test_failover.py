"""Backend failover through the auth service (`proxy_backend_tries`).

A backend that cannot be reached (its port closed, no greeting before
`timeout`) is not the end of a login: the proxy asks the auth service again,
for the same login and with the same Auth-Login-Attempt, naming every
backend that failed in an Auth-Backend-Failed header, and tries the one the
answer names, at most `proxy_backend_tries` backends.  The client only
waits.  The auth service here is scripted: it reads Auth-Backend-Failed as
a real one would, and the tests check every request it received.
"""

import re
import socket

import pytest

from fakes import ScriptedAuthService, ScriptedBackend, fail, ok
from harness import RunningProxy, wait_until
from mailproxy import imap, pop3, smtp
from mailproxy.config import ConfigError, load

LIVE_IMAP = [("send", b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n"),
             ("expect", b"a LOGIN {3+}\r\n"), ("expect", b"joe {6+}\r\n"),
             ("expect", b"secret\r\n"), ("send", b"a OK logged in\r\n"), ("echo",)]
LIVE = {
    "imap": (LIVE_IMAP, imap.GREETING, b"a LOGIN joe secret\r\n", b"a OK logged in\r\n"),
    "pop3": ([("send", b"+OK ready\r\n"), ("expect", b"USER joe\r\n"), ("send", b"+OK\r\n"),
              ("expect", b"PASS secret\r\n"), ("send", b"+OK logged in\r\n"), ("echo",)],
             b"+OK POP3 ready\r\n", b"USER joe\r\nPASS secret\r\n", b"+OK logged in\r\n"),
    "smtp": ([("send", b"220 backend ESMTP\r\n"), ("expect", b"EHLO mx.test\r\n"),
              ("send", b"250 backend\r\n"),
              ("expect", b"XCLIENT ADDR=127.0.0.1 LOGIN=joe NAME=[UNAVAILABLE]\r\n"),
              ("send", b"220 backend ESMTP\r\n"), ("echo",)],
             b"220 mx.test ESMTP ready\r\n", b"AUTH PLAIN AGpvZQBzZWNyZXQ=\r\n", smtp.AUTH_OK),
}


# ---------------------------------------------------------------- fixtures

class AuthView:
    """The module's scripted auth service as one test sees it: the reply
    it sets, and only the requests made since it started."""

    def __init__(self, service):
        self.service, self.since = service, len(service.requests)

    @property
    def url(self):
        return self.service.url

    @property
    def requests(self):
        return self.service.requests[self.since:]

    @property
    def reply(self):
        return self.service.reply

    @reply.setter
    def reply(self, reply):
        self.service.reply = reply


@pytest.fixture(scope="module")
def auth_service():
    with ScriptedAuthService() as service:
        yield service


@pytest.fixture
def auth(auth_service):
    return AuthView(auth_service)


@pytest.fixture
def peers():
    """peers(script) -> a ScriptedBackend, closed after the test."""
    started = []

    def peer(script):
        started.append(ScriptedBackend(script))
        return started[-1]
    yield peer
    for backend in started:
        backend.close()


@pytest.fixture(scope="module")
def proxies(tmp_path_factory, auth_service):
    """proxies(protocol, settings) -> the module's RunningProxy asking the
    auth service, one per protocol and settings, under `timeout 1s`."""
    started = {}

    def run(protocol="imap", settings="proxy_backend_tries 3;"):
        if (protocol, settings) not in started:
            started[protocol, settings] = RunningProxy(
                tmp_path_factory.mktemp("proxy"), servers=[f"protocol {protocol};"],
                mail=f"server_name mx.test; auth_http {auth_service.url};\n"
                     f"timeout 1s;\n{settings}")
        return started[protocol, settings]
    yield run
    for proxy in started.values():
        proxy.stop()


def closed_port(host="127.0.0.1"):
    """A port on `host` where nothing listens (a stopped backend)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def by_failures(*backends):
    """An auth reply that names backends[k] when k backends failed so far."""
    def reply(request):
        failed = [value for name, value in request.headers if name == "Auth-Backend-Failed"]
        return ok(*backends[min(len(failed), len(backends) - 1)])
    return reply


def failed_headers(request):
    return [value for name, value in request.headers if name == "Auth-Backend-Failed"]


def log_in(proxy, protocol="imap"):
    """Log in through the proxy: the line the client gets after the login,
    and the client's port (for session_log)."""
    _, greeting, lines, _ = LIVE[protocol]
    with proxy.client() as client:
        assert client.line() == greeting
        client.send(lines)
        reply = client.line()
        if protocol == "pop3" and reply == pop3.OK:    # USER's +OK
            reply = client.line()
        return reply, client.sock.getsockname()[1]


def session_log(proxy, port):
    """The log lines of the session of the client at 127.0.0.1:`port`,
    once it is done (the module's proxies serve many tests)."""
    opened = re.compile(rf"\*(\d+) client 127\.0\.0\.1:{port} connected")
    conn = f"*{wait_until(lambda: opened.search(proxy.log())).group(1)} "
    proxy.wait_log(f"{conn}session done")
    return [line for line in proxy.log().splitlines() if conn in line]


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_stopped_backend_is_passed_over_for_the_next_one(proxies, auth, peers, host):
    live = peers(LIVE_IMAP)
    dead = closed_port(host)
    auth.reply = by_failures((host, dead), ("127.0.0.1", live.port))
    proxy = proxies()
    reply, port = log_in(proxy)
    assert reply == b"a OK logged in\r\n"
    first, second = auth.requests
    named = f"[{host}]:{dead}" if ":" in host else f"{host}:{dead}"
    assert (failed_headers(first), failed_headers(second)) == ([], [named])
    assert first.header("Auth-Login-Attempt") == second.header("Auth-Login-Attempt") == "1"
    assert [name for name, _ in second.headers][-1] == "Auth-Backend-Failed"
    [warning] = [line for line in session_log(proxy, port) if "[warn]" in line]
    assert f"connect() failed (111: Connection refused), backend 1 of 3 while connecting " \
           f"to upstream, client: 127.0.0.1, server: 127.0.0.1:{proxy.port}, login: \"joe\", " \
           f"upstream: {named}" in warning
    live.wait_connections(1)
    assert live.errors == []


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_a_backend_that_closes_before_its_greeting_is_passed_over(proxies, auth, peers,
                                                                    protocol):
    script, _, _, logged_in = LIVE[protocol]
    mute, live = peers([("close",)]), peers(script)
    auth.reply = by_failures(("127.0.0.1", mute.port), ("127.0.0.1", live.port))
    proxy = proxies(protocol, "proxy_backend_tries 2;")
    reply, port = log_in(proxy, protocol)
    assert reply == logged_in
    assert [failed_headers(request) for request in auth.requests] == \
        [[], [f"127.0.0.1:{mute.port}"]]
    [warning] = [line for line in session_log(proxy, port) if "[warn]" in line]
    assert "upstream prematurely closed connection, backend 1 of 2 while reading " \
           "response from upstream" in warning
    live.wait_connections(1)
    assert live.errors == []


def test_a_greeting_that_is_not_one_is_passed_over_not_shown(proxies, auth, peers):
    """With proxy_pass_error_message on, a backend's refusal of the login
    reaches the client; a backend that greets with BYE is failed over."""
    busy, live = peers([("send", b"* BYE too many connections\r\n")]), peers(LIVE_IMAP)
    auth.reply = by_failures(("127.0.0.1", busy.port), ("127.0.0.1", live.port))
    proxy = proxies(settings="proxy_backend_tries 2; proxy_pass_error_message on;")
    reply, port = log_in(proxy)
    assert reply == b"a OK logged in\r\n"
    [warning] = [line for line in session_log(proxy, port) if "[warn]" in line]
    assert 'upstream sent invalid response: "* BYE too many connections", backend 1 of 2' \
        in warning


def test_a_backend_that_never_greets_gets_its_own_timeout(proxies, auth, peers):
    silent, live = peers([("sleep", 5)]), peers(LIVE_IMAP)
    auth.reply = by_failures(("127.0.0.1", silent.port), ("127.0.0.1", live.port))
    proxy = proxies()
    reply, port = log_in(proxy)
    assert reply == b"a OK logged in\r\n"
    assert failed_headers(auth.requests[1]) == [f"127.0.0.1:{silent.port}"]
    [warning] = [line for line in session_log(proxy, port) if "[warn]" in line]
    assert "upstream timed out, backend 1 of 3 while reading response from upstream" in warning


def test_when_every_try_fails_the_client_gets_the_internal_error(proxies, auth):
    dead = [closed_port() for _ in range(3)]
    auth.reply = by_failures(*(("127.0.0.1", port) for port in dead))
    proxy = proxies()
    reply, port = log_in(proxy)
    assert reply == imap.INTERNAL_ERROR
    assert [failed_headers(request) for request in auth.requests] == [
        [], [f"127.0.0.1:{dead[0]}"], [f"127.0.0.1:{dead[0]}", f"127.0.0.1:{dead[1]}"]]
    assert len({request.header("Auth-Login-Attempt") for request in auth.requests}) == 1
    log = session_log(proxy, port)
    assert [f"backend {n} of 3" for n in (1, 2, 3)] == \
        [line[line.index("backend "):][:14] for line in log if "[warn]" in line]
    assert "[error]" in next(line for line in log
                             if "no backend could be reached in 3 tries" in line)


def test_the_auth_service_may_refuse_instead_of_naming_another(proxies, auth):
    dead = closed_port()
    auth.reply = lambda request: fail("No backend left") if failed_headers(request) \
        else ok("127.0.0.1", dead)
    assert log_in(proxies())[0] == b"a NO No backend left\r\n"
    assert len(auth.requests) == 2


def test_one_try_is_nginx_behaviour(proxies, auth):
    dead = closed_port()
    auth.reply = ok("127.0.0.1", dead)
    proxy = proxies(settings="")
    reply, port = log_in(proxy)
    assert reply == imap.INTERNAL_ERROR
    [request] = auth.requests
    assert failed_headers(request) == []
    log = session_log(proxy, port)
    assert [line for line in log if "[warn]" in line] == []
    assert "[error]" in next(line for line in log
                             if "connect() failed (111: Connection refused)" in line)


def test_a_refused_backend_login_is_not_failed_over(proxies, auth, peers):
    """Failover is for a backend that cannot be reached, not for one
    that refuses the login."""
    refusing = peers(LIVE_IMAP[:4] + [("send", b"a NO [AUTHENTICATIONFAILED] no\r\n")])
    auth.reply = ok("127.0.0.1", refusing.port)
    assert log_in(proxies())[0] == imap.INTERNAL_ERROR
    assert len(auth.requests) == 1


def test_the_directive_takes_a_positive_number(tmp_path):
    path = tmp_path / "mail.conf"
    path.write_text("mail { server { listen 127.0.0.1:1143; protocol imap; "
                    "auth_http 127.0.0.1:1/a; proxy_backend_tries 0; } }\n")
    with pytest.raises(ConfigError, match='invalid value "0" in "proxy_backend_tries" '
                                          'directive in .*mail.conf:1'):
        load(str(path))
