"""Fixtures for the POP3, SMTP and resolver transcript tests (a pytest
plugin: the test modules name it in `pytest_plugins`).

`start_proxy` is a fixture: a function that starts a RunningProxy (each in
its own directory under tmp_path) and stops every one it started at
teardown, so a failing test never leaves a listener or session thread
behind.  `shared_proxy` does the same once per module and configuration,
for the many short transcripts.  The mail block always names
`server_name mx.test`, the name the spec's transcripts use.
`auth_service` and `backend` wrap the scripted fakes of fakes.py.
"""

import itertools

import pytest

from fakes import ScriptedAuthService, ScriptedBackend
from harness import RunningProxy, free_port
from transcript import SERVER_NAME


def unused_auth_url():
    """An auth_http address nobody listens on: for transcripts that never
    reach the auth service (a connection there would fail loudly)."""
    return f"127.0.0.1:{free_port()}/auth"


class Proxies:
    """Starts RunningProxy instances under one directory; stops them all."""

    def __init__(self, directory):
        self.directory = directory
        self.numbers = itertools.count(1)
        self.started = []

    def start(self, servers, auth=None, mail="", level="debug"):
        directory = self.directory / f"proxy{next(self.numbers)}"
        directory.mkdir()
        text = (f"server_name {SERVER_NAME};\n"
                f"auth_http {auth or unused_auth_url()};\n{mail}")
        proxy = RunningProxy(directory, mail=text, servers=servers, level=level)
        self.started.append(proxy)
        return proxy

    def stop(self):
        for proxy in self.started:
            proxy.stop()
        self.started = []


class SharedProxies(Proxies):
    """One proxy per configuration, kept for a module's transcripts.

    Loggers are process-wide (`mailproxy.server.N`): the newest proxy's
    error_log receives every proxy's lines, and when it stops its closed
    file would be reopened by an older one.  So the shared proxies are
    stopped whenever a test starts a proxy of its own (start_proxy), and
    started again on demand."""

    def __init__(self, directory):
        super().__init__(directory)
        self.cache = {}

    def get(self, servers, mail=""):
        key = (tuple(servers), mail)
        if key not in self.cache:
            self.cache[key] = self.start(servers, mail=mail)
        return self.cache[key]

    def stop(self):
        super().stop()
        self.cache = {}


@pytest.fixture(scope="module")
def shared_proxies(tmp_path_factory):
    proxies = SharedProxies(tmp_path_factory.mktemp("shared"))
    yield proxies
    proxies.stop()


@pytest.fixture
def start_proxy(tmp_path, shared_proxies):
    """start_proxy(servers, auth=URL, mail=extra) -> a new RunningProxy,
    the only one running (with any it started before in the same test)."""
    shared_proxies.stop()
    proxies = Proxies(tmp_path)
    yield proxies.start
    proxies.stop()


@pytest.fixture
def shared_proxy(shared_proxies):
    """shared_proxy(servers, mail=extra) -> a RunningProxy shared by the
    module's tests with the same configuration (starting one costs a few
    tenths of a second).  Only for transcripts that need no auth service
    and read nothing from the log."""
    return shared_proxies.get


@pytest.fixture
def auth_service():
    """A ScriptedAuthService for one test; set `.reply`, read `.requests`."""
    with ScriptedAuthService() as service:
        yield service


@pytest.fixture
def backend():
    """backend(script) -> a ScriptedBackend, closed at teardown."""
    started = []

    def start(script):
        server = ScriptedBackend(script)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
