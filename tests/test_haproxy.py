"""Scaling out: a real HAProxy in front of two mailproxy nodes, on loopback.

This is the setup of docs/operations.md ("Scaling out") and
examples/haproxy.cfg, made small: HAProxy in `mode tcp` balances IMAP
connections over two mailproxy processes (the real CLI, `worker_processes
1` each) with `send-proxy-v2`; each node's listener expects the PROXY header
and trusts 127.0.0.1, HAProxy's address.  Both nodes ask one auth service,
which learns from an `auth_http_header X-Node` which node asked.

The client connects from 127.0.0.2, so the address the auth service sees
(Client-IP) can only be right if it came through the PROXY header.  Then
one node is stopped gracefully (SIGQUIT) with a session open on it: HAProxy's
health checks take it out, every new login lands on the other node and
succeeds, and the open session keeps relaying until it ends.

HAProxy is a Debian package that .ci/run installs; without it the test is
skipped on a developer's machine and fails under CI.
"""

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from fakes import IMAP_LOGIN_THEN_ECHO, ScriptedAuthService, ScriptedBackend, ok
from harness import free_port, wait_until
from mailproxy import imap
from peers import in_ci

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAPROXY = shutil.which("haproxy") or next(
    (path for path in ("/usr/sbin/haproxy",) if os.access(path, os.X_OK)), None)
CLIENT_ADDRESS = "127.0.0.2"        # not HAProxy's 127.0.0.1: only the header can tell it
LOGINS = 6                          # logins per round (both nodes get some)
IO_TIMEOUT = 10
START_TIMEOUT = 15
LOGIN = IMAP_LOGIN_THEN_ECHO
NODE_CONFIG = """\
worker_processes 1;
error_log {log} info;
pid {pid};
mail {{
    auth_http {auth};
    auth_http_header X-Node {name};
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        protocol imap;
        set_real_ip_from 127.0.0.1;
    }}
}}
"""
HAPROXY_CONFIG = """\
global
    maxconn 200
    stats socket {stats} mode 600 level user
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    retries 2
    option redispatch 1
frontend imap
    bind 127.0.0.1:{port}
    default_backend mailproxy
backend mailproxy
    balance roundrobin
    option tcp-check
    tcp-check expect string "* OK"
    default-server send-proxy-v2 check-send-proxy check inter 200ms fall 1 rise 1
    server node1 127.0.0.1:{node1}
    server node2 127.0.0.1:{node2}
"""

pytestmark = pytest.mark.skipif(HAPROXY is None and not in_ci(),
                                reason="haproxy is not installed (apt-get install haproxy)")


class Node:
    """One mailproxy process: `python mailproxy.py -c CONF`."""

    def __init__(self, directory, name, auth_url):
        self.name, self.port = name, free_port()
        self.log_path = directory / f"{name}.log"
        conf = directory / f"{name}.conf"
        conf.write_text(NODE_CONFIG.format(log=self.log_path, pid=directory / f"{name}.pid",
                                           auth=auth_url, name=name, port=self.port))
        self.process = subprocess.Popen([sys.executable, "mailproxy.py", "-c", str(conf)],
                                        cwd=ROOT, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: "listening on" in self.log(), timeout=START_TIMEOUT), \
            self.log()

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


class HAProxy:
    """A private HAProxy in the foreground (-db), with a stats socket."""

    def __init__(self, directory, nodes):
        self.port = free_port()
        self.stats = os.path.join(directory, "stats.sock")
        conf = os.path.join(directory, "haproxy.cfg")
        with open(conf, "w") as file:
            file.write(HAPROXY_CONFIG.format(stats=self.stats, port=self.port,
                                             node1=nodes[0].port, node2=nodes[1].port))
        self.output = open(os.path.join(directory, "haproxy.out"), "w+")
        self.process = subprocess.Popen([HAPROXY or "haproxy", "-f", conf, "-db"],
                                        stdout=self.output, stderr=subprocess.STDOUT)
        assert wait_until(lambda: self.states() == {"node1": "UP", "node2": "UP"},
                          timeout=START_TIMEOUT), self.failure()

    def states(self):
        """{server name: status} from `show stat` on the stats socket."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(self.stats)
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["svname"]: row["status"].split()[0] for row in rows
                if row["pxname"] == "mailproxy" and row["svname"].startswith("node")}

    def failure(self):
        self.output.seek(0)
        return f"haproxy did not come up:\n{self.output.read()}"

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=15)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.output.close()


@pytest.fixture
def cluster(tmp_path):
    """(haproxy, {name: node}, auth service): everything stopped afterwards."""
    if HAPROXY is None:
        pytest.fail("haproxy unavailable under CI (.ci/run installs it)", pytrace=False)
    short = tempfile.mkdtemp(prefix="hap-", dir="/tmp")    # a unix socket path must be short
    backend = ScriptedBackend(LOGIN)
    auth = ScriptedAuthService(ok("127.0.0.1", backend.port))
    nodes, balancer = {}, None
    try:
        for name in ("node1", "node2"):
            nodes[name] = Node(tmp_path, name, auth.url)
        balancer = HAProxy(short, list(nodes.values()))
        yield balancer, nodes, auth
    finally:
        if balancer:
            balancer.stop()
        for node in nodes.values():
            node.stop()
        auth.close()
        backend.close()
        shutil.rmtree(short, ignore_errors=True)


class ImapClient:
    """A client on 127.0.0.2, logged in through HAProxy."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT,
                                             source_address=(CLIENT_ADDRESS, 0))
        self.file = self.sock.makefile("rb")
        assert self.file.readline() == imap.GREETING
        self.sock.sendall(b"a LOGIN joe secret\r\n")
        self.reply = self.file.readline()

    def echo(self, data):
        self.sock.sendall(data)
        return self.file.read(len(data))

    def close(self):
        self.file.close()
        self.sock.close()


def login(port):
    """One whole login through HAProxy; True if it succeeded."""
    client = ImapClient(port)
    try:
        return client.reply == b"a OK logged in\r\n" and client.echo(b"z NOOP\r\n") == \
            b"z NOOP\r\n"
    finally:
        client.close()


def nodes_asked(requests):
    return [request.header("X-Node") for request in requests]


def test_logins_spread_and_survive_a_node_quitting(cluster):
    balancer, nodes, auth = cluster

    assert all(login(balancer.port) for _ in range(LOGINS))
    requests = auth.wait_requests(LOGINS)
    assert set(nodes_asked(requests)) == {"node1", "node2"}
    for request in requests:
        assert request.header("Client-IP") == CLIENT_ADDRESS
        assert request.header("Proxy-Protocol-Addr") == CLIENT_ADDRESS
        assert request.header("Proxy-Protocol-Server-Port") == str(balancer.port)
    assert f"client: {CLIENT_ADDRESS}, server: 127.0.0.1:" in nodes["node1"].log()

    held = ImapClient(balancer.port)            # a session that stays open across the quit
    assert held.reply == b"a OK logged in\r\n"
    victim = nodes[auth.wait_requests(LOGINS + 1)[-1].header("X-Node")]
    survivor = next(node for node in nodes.values() if node is not victim)
    victim.process.send_signal(signal.SIGQUIT)
    assert wait_until(lambda: not victim.accepts(), timeout=10)
    assert wait_until(lambda: balancer.states().get(victim.name) == "DOWN", timeout=10), \
        balancer.states()

    before = len(auth.requests)
    assert [login(balancer.port) for _ in range(LOGINS)] == [True] * LOGINS
    assert nodes_asked(auth.wait_requests(before + LOGINS)[before:]) == [survivor.name] * LOGINS

    assert held.echo(b"z NOOP still here\r\n") == b"z NOOP still here\r\n"
    assert victim.process.poll() is None        # graceful: it waits for the open session
    held.close()
    assert victim.process.wait(timeout=15) == 0
