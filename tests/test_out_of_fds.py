"""A worker out of file descriptors: logged as nginx does, and never a spin.

The proxy runs as users run it (`python mailproxy.py -c CONF`), with a
small `worker_rlimit_nofile`, so that a few idle clients use up its
descriptors; the test counts the descriptors in /proc to know when.
"""

import os
import re
import subprocess
import sys
import time

import pytest

from harness import Client, free_port, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 20
CONFIG = """\
worker_rlimit_nofile {limit};
error_log {log} info;
mail {{
    auth_http {auth};
    server {{ listen 127.0.0.1:{port}; protocol imap; }}
}}
"""
CRIT = re.compile(r"\[crit\] \d+#\d+: accept4\(\) failed \(24: Too many open files\)")


class Proxy:
    """`python mailproxy.py -c CONF` with LIMIT descriptors."""

    def __init__(self, tmp_path, auth_url):
        self.port = free_port()
        self.log_path = tmp_path / "error.log"
        conf = tmp_path / "mail.conf"
        conf.write_text(CONFIG.format(limit=LIMIT, log=self.log_path, auth=auth_url,
                                      port=self.port))
        self.process = subprocess.Popen([sys.executable, "mailproxy.py", "-c", str(conf)],
                                        cwd=ROOT, stderr=subprocess.PIPE)
        assert wait_until(lambda: "listening on" in self.log()), self.log()

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def fds(self):
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def fill(self):
        """Idle clients, greeted, until every descriptor is in use."""
        clients = []
        while self.fds() < LIMIT:
            clients.append(Client(self.port, timeout=5))
            assert clients[-1].line() == b"* OK IMAP4 ready\r\n"
        assert self.fds() == LIMIT
        return clients

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=15)


@pytest.fixture
def proxy(tmp_path, echo_peers):
    auth, _ = echo_peers
    running = Proxy(tmp_path, auth.url[len("http://"):])
    yield running
    running.stop()


def test_accept_out_of_descriptors_is_logged_at_crit_and_pauses(proxy):
    held = proxy.fill()
    waiting = Client(proxy.port, timeout=5)       # stays in the backlog
    assert wait_until(lambda: CRIT.search(proxy.log())), proxy.log()
    first = len(CRIT.findall(proxy.log()))
    time.sleep(1)
    # One line per ACCEPT_PAUSE (0.5 s) at most, not a loop at full speed.
    assert len(CRIT.findall(proxy.log())) - first <= 4
    held.pop().close()                            # a descriptor comes free
    assert waiting.line() == b"* OK IMAP4 ready\r\n"
    for client in held + [waiting]:
        client.close()


def test_a_backend_socket_out_of_descriptors_gives_the_internal_error(proxy, echo_peers):
    auth, backend = echo_peers
    with Client(proxy.port) as client:             # leaves one kept auth connection
        client.line()
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK logged in\r\n"
    assert wait_until(lambda: proxy.log().count("session done") == 1)
    held = proxy.fill()
    waiting = Client(proxy.port, timeout=5)
    assert wait_until(lambda: CRIT.search(proxy.log())), proxy.log()
    held.pop().close()
    assert waiting.line() == b"* OK IMAP4 ready\r\n"
    waiting.send(b"b LOGIN joe secret\r\n")      # the auth request reuses its connection
    assert waiting.line() == b"* BAD internal server error\r\n"
    assert waiting.closed()
    assert re.search(r"\[alert\] \d+#\d+: \*\d+ socket\(\) failed \(24: Too many open files\) "
                     r"while connecting to upstream", proxy.log()), proxy.log()
    for client in held + [waiting]:
        client.close()
