"""The SMTP client's host name (spec 3.3.1): resolver.HostResolver against
a scripted DNS server on loopback UDP, alone, inside an SMTP session (the
name in Client-Host and XCLIENT NAME=), and as the real Postfix logs it.

The DNS server is the one fake here: no real resolver can be told to send
SERVFAIL, drop a query, or answer a PTR with a name holding CR LF.  It
parses queries and builds answers with dnspython's own message code.
"""

import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from fakes import ok
from harness import wait_until
from mailproxy import smtp
from mailproxy.ops.resolver import TEMPUNAVAIL, UNAVAILABLE, HostResolver
from transcript import b64

pytest_plugins = ("proxying",)     # start_proxy, shared_proxy, auth_service, backend

ROOT = Path(__file__).resolve().parent.parent
PTR_127 = "1.0.0.127.in-addr.arpa."
PTR_V6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa."
POLL = 0.05             # how often the server thread looks at its stop flag
MAX_QUERY = 4096        # one UDP datagram


class ScriptedDns:
    """A UDP DNS server on 127.0.0.1 answering from `zone`.

    `zone[(name, type)]` is a list of record texts (the answer), or one of
    "NXDOMAIN", "SERVFAIL", "DROP" (no reply at all).  A name/type not in
    the zone gets NOERROR with no answer.  `queries` records (name, type)
    of every query, in order.
    """

    def __init__(self, zone):
        self.zone = {(name.lower(), rdtype): answer for (name, rdtype), answer in zone.items()}
        self.queries = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(POLL)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, name="scripted dns")
        self.thread.start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def serve(self):
        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(MAX_QUERY)
            except socket.timeout:
                continue
            reply = self.answer(dns.message.from_wire(data))
            if reply is not None:
                self.sock.sendto(reply.to_wire(), peer)

    def answer(self, query):
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        script = self.zone.get((name, rdtype), [])
        if script == "DROP":
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.RA
        if script in ("NXDOMAIN", "SERVFAIL"):
            reply.set_rcode(dns.rcode.from_text(script))
        elif script:
            reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", rdtype, *script))
        return reply

    def close(self):
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def dns_server():
    """dns_server(zone) -> a running ScriptedDns, closed at teardown."""
    servers = []

    def start(zone):
        server = ScriptedDns(zone)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def resolver_for(server, *extra, timeout=2):
    return HostResolver([server.address, *extra], timeout)


# ----------------------------------------------------- HostResolver alone

def test_ptr_confirmed_by_a_matching_a_record_gives_the_name(dns_server):
    server = dns_server({(PTR_127, "PTR"): ["client.example."],
                         ("client.example.", "A"): ["192.0.2.7", "127.0.0.1"]})
    assert resolver_for(server).lookup("127.0.0.1") == ("client.example", None)
    assert server.queries == [(PTR_127, "PTR"), ("client.example.", "A")]


def test_an_aaaa_record_confirms_an_ipv6_client(dns_server):
    server = dns_server({(PTR_V6, "PTR"): ["six.example."],
                         ("six.example.", "AAAA"): ["::1"]})
    assert resolver_for(server).lookup("::1") == ("six.example", None)


def test_ipv4_off_asks_only_for_aaaa(dns_server):
    server = dns_server({(PTR_127, "PTR"): ["client.example."],
                         ("client.example.", "A"): ["127.0.0.1"]})
    assert resolver_for(server, "ipv4=off").lookup("127.0.0.1") == (UNAVAILABLE, None)
    assert ("client.example.", "A") not in server.queries
    assert ("client.example.", "AAAA") in server.queries


def test_ptr_nxdomain_is_unavailable(dns_server):
    server = dns_server({(PTR_127, "PTR"): "NXDOMAIN"})
    assert resolver_for(server).lookup("127.0.0.1") == (UNAVAILABLE, None)


def test_ptr_with_no_answer_is_unavailable(dns_server):
    server = dns_server({})
    assert resolver_for(server).lookup("127.0.0.1") == (UNAVAILABLE, None)


def test_ptr_servfail_is_tempunavail_and_says_why(dns_server):
    server = dns_server({(PTR_127, "PTR"): "SERVFAIL"})
    host, problem = resolver_for(server).lookup("127.0.0.1")
    assert host == TEMPUNAVAIL
    assert "PTR lookup of 127.0.0.1 failed" in problem


def test_ptr_timeout_is_tempunavail_within_the_resolver_timeout(dns_server):
    server = dns_server({(PTR_127, "PTR"): "DROP"})
    started = time.monotonic()
    host, problem = resolver_for(server, timeout=0.5).lookup("127.0.0.1")
    assert host == TEMPUNAVAIL and problem
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("target", ["evil.example\\013\\010X:\\032y.", "a_b.example.", ".",
                                    "spa\\032ce.example.", 'quo\\"te.example.'])
def test_an_empty_ptr_name_or_one_with_forbidden_characters_is_tempunavail(dns_server, target):
    """CVE-2026-28753: the name would reach Client-Host and XCLIENT NAME."""
    server = dns_server({(PTR_127, "PTR"): [target]})
    host, problem = resolver_for(server).lookup("127.0.0.1")
    assert host == TEMPUNAVAIL
    assert "invalid name" in problem
    assert all(rdtype == "PTR" for _, rdtype in server.queries), "no forward lookup after"


def test_forward_mismatch_is_unavailable(dns_server):
    server = dns_server({(PTR_127, "PTR"): ["liar.example."],
                         ("liar.example.", "A"): ["192.0.2.1"],
                         ("liar.example.", "AAAA"): ["2001:db8::1"]})
    assert resolver_for(server).lookup("127.0.0.1") == (UNAVAILABLE, None)


def test_forward_nxdomain_is_unavailable(dns_server):
    server = dns_server({(PTR_127, "PTR"): ["gone.example."],
                         ("gone.example.", "A"): "NXDOMAIN",
                         ("gone.example.", "AAAA"): "NXDOMAIN"})
    assert resolver_for(server).lookup("127.0.0.1") == (UNAVAILABLE, None)


def test_forward_servfail_is_tempunavail(dns_server):
    server = dns_server({(PTR_127, "PTR"): ["flaky.example."],
                         ("flaky.example.", "A"): "SERVFAIL",
                         ("flaky.example.", "AAAA"): "SERVFAIL"})
    host, problem = resolver_for(server).lookup("127.0.0.1")
    assert host == TEMPUNAVAIL
    assert "forward lookup" in problem


# ------------------------------------------------- inside an SMTP session

PLAIN_JOE = b"AUTH PLAIN " + b64(b"\0joe\0secret") + b"\r\n"
GOOD_ZONE = {(PTR_127, "PTR"): ["client.example."], ("client.example.", "A"): ["127.0.0.1"]}


def session_host(start_proxy, auth_service, backend, zone, dns_server):
    """Log in over SMTP with `resolver` pointing at a scripted server; returns
    (Client-Host sent to the auth service, NAME= sent in XCLIENT, proxy)."""
    server = dns_server(zone)
    upstream = backend([("send", b"220 backend.test ESMTP\r\n"),
                        ("expect", b"EHLO mx.test\r\n"), ("send", b"250 backend.test\r\n"),
                        ("recv_line",), ("send", b"250 ok\r\n"), ("echo",)])
    auth_service.reply = ok("127.0.0.1", upstream.port)
    proxy = start_proxy(["protocol smtp;"], auth=auth_service.url,
                        mail=f"resolver {server.address} ipv6=off; resolver_timeout 1s;")
    with proxy.client() as client:
        assert client.line() == b"220 mx.test ESMTP ready\r\n"
        client.send(PLAIN_JOE)
        assert client.line() == smtp.AUTH_OK
    upstream.wait_connections(1)
    assert upstream.errors == []
    xclient = upstream.connections[0].reads[1]
    (request,) = auth_service.requests
    assert xclient.startswith(b"XCLIENT ADDR=127.0.0.1 LOGIN=joe NAME=")
    return request, xclient[len(b"XCLIENT ADDR=127.0.0.1 LOGIN=joe NAME="):-2].decode(), proxy


def test_a_confirmed_name_reaches_client_host_and_xclient(
        start_proxy, auth_service, backend, dns_server):
    request, name, _ = session_host(start_proxy, auth_service, backend, GOOD_ZONE, dns_server)
    assert request.header("Client-Host") == name == "client.example"


@pytest.mark.parametrize("zone, host", [
    ({(PTR_127, "PTR"): "NXDOMAIN"}, UNAVAILABLE),
    ({(PTR_127, "PTR"): "SERVFAIL"}, TEMPUNAVAIL),
    ({(PTR_127, "PTR"): "DROP"}, TEMPUNAVAIL),
    ({(PTR_127, "PTR"): ["liar.example."], ("liar.example.", "A"): ["192.0.2.1"]}, UNAVAILABLE),
], ids=["nxdomain", "servfail", "timeout", "mismatch"])
def test_lookup_failures_give_the_placeholders(
        start_proxy, auth_service, backend, dns_server, zone, host):
    request, name, _ = session_host(start_proxy, auth_service, backend, zone, dns_server)
    assert request.header("Client-Host") == name == host


def test_a_ptr_name_with_header_injection_is_refused_and_logged(
        start_proxy, auth_service, backend, dns_server):
    """CVE-2026-28753: CR LF in a PTR name must not reach the auth request."""
    zone = {(PTR_127, "PTR"): ["evil.example\\013\\010X-Injected:\\032y."],
            ("evil.example\\013\\010X-Injected:\\032y.", "A"): ["127.0.0.1"]}
    request, name, proxy = session_host(start_proxy, auth_service, backend, zone, dns_server)
    assert request.header("Client-Host") == name == TEMPUNAVAIL
    assert b"X-Injected" not in request.raw
    proxy.wait_log("gave an invalid name")
    assert "[error]" in next(line for line in proxy.log().splitlines()
                             if "gave an invalid name" in line)


def test_postfix_logs_the_name_passed_in_xclient(start_proxy, auth_service, dns_server, postfix):
    """The real Postfix behind the proxy sees the confirmed name as the client."""
    auth_service.reply = ok("127.0.0.1", postfix.port)
    server = dns_server(GOOD_ZONE)
    proxy = start_proxy(["protocol smtp;"], auth=auth_service.url,
                        mail=f"resolver {server.address}; resolver_timeout 2s;")
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as client:
        client.login("joe", "secret")
        client.noop()
    assert wait_until(lambda: "disconnect from client.example[127.0.0.1]"
                      in postfix.maillog_text(), timeout=10), postfix.maillog_text()[-2000:]


# ------------------------------------------------ dnspython only when used

def test_dnspython_is_imported_only_by_a_host_resolver():
    """A proxy without `resolver` never loads dnspython: importing the
    command, the server and the SMTP module leaves every `dns` module out
    of sys.modules, the placeholders import without it, and the first
    HostResolver brings it in.  In a fresh interpreter, since this test
    module imports dns itself."""
    script = "\n".join([
        "import sys",
        "import mailproxy.cli, mailproxy.server, mailproxy.smtp",
        "from mailproxy.ops.resolver import TEMPUNAVAIL, UNAVAILABLE, HostResolver",
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'dns'))",
        "HostResolver(['127.0.0.1'], 1.0)",
        "print('dns.resolver' in sys.modules)",
    ])
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True"]
