"""Session-wide real peers: one Dovecot and one Postfix for the whole suite;
and `echo_peers`, the scripted auth service and echoing backend that the
process-level tests (the master, a worker out of descriptors) log in through.

Starting a real server costs a fraction of a second, so each starts once.
When one cannot run here, its tests are skipped on a developer's machine but
fail under CI (``CI=true``), where .ci/run is meant to have installed it.
"""

import pytest

import peers
from mailproxy import server
from mailproxy.reference import demo_backends
from fakes import IMAP_LOGIN_THEN_ECHO, ScriptedAuthService, ScriptedBackend, ok

# Test accounts on the Dovecot backend; ann's password has spaces on purpose
# (IMAP must quote it, POP3 sends it as the rest of the PASS line).
USERS = {'joe': 'secret', 'ann': 'pa ss word'}

# A proxy served in this process (harness.RunningProxy) stops each listener
# in turn, and each waits for its serve_forever to look for shutdown(): up to
# server.POLL_INTERVAL (0.2 s) per listener, ~0.2 s of every test's teardown,
# about a third of the suite.  The tests check what a stop does, not how
# often a listener looks; processes started by the tests keep the 0.2 s.
server.POLL_INTERVAL = 0.01
# The same for the demo backends served in this process (test_conf_styles):
# close() stops its three servers in turn, each after up to 0.1 s.
demo_backends.POLL_INTERVAL = 0.01


def _started(peer):
    try:
        peer.start()
    except peers.PeerUnavailable as exc:
        if peers.in_ci():
            pytest.fail(f'{type(peer).__name__} unavailable under CI: {exc}', pytrace=False)
        pytest.skip(f'{type(peer).__name__} unavailable: {exc}')
    return peer


@pytest.fixture(scope='session')
def dovecot():
    """A running `peers.Dovecot` with the users in USERS."""
    peer = _started(peers.Dovecot(None, users=USERS))
    yield peer
    peer.stop()


@pytest.fixture(scope='session')
def postfix():
    """A running `peers.Postfix` (backend.test) that accepts XCLIENT."""
    peer = _started(peers.Postfix())
    yield peer
    peer.stop()


@pytest.fixture
def echo_peers():
    """(auth service, backend): the auth service sends every login to a
    backend that takes `a LOGIN joe secret` and then echoes (fakes.py)."""
    backend = ScriptedBackend(IMAP_LOGIN_THEN_ECHO)
    auth = ScriptedAuthService(ok("127.0.0.1", backend.port))
    yield auth, backend
    auth.close()
    backend.close()
