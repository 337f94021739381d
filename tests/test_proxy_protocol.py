"""PROXY protocol v1/v2 in and out, set_real_ip_from, and unix: listeners.

First the parser and the builders alone (bytes in, ProxyHeader or
BrokenHeader out), then the reader on a real socket pair (it must take the
header and not one byte more), then whole sessions through a RunningProxy:
a load balancer's header in front of a client's IMAP or SMTP dialogue, and
the header the backend receives with `proxy_protocol on|v2`.
"""

import imaplib
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import dns.message
import pytest

pytest.register_assert_rewrite("certs")     # a plugin below, imported before pytest loads it
from certs import client_context
from fakes import IMAP_LOGIN_THEN_ECHO, ScriptedAuthService, ScriptedBackend, ok
from harness import Client, RunningProxy, free_port, wait_until
from mailproxy import config as configmod
from mailproxy import imap, smtp
from mailproxy.backend import BackendError, send_proxy_header
from mailproxy.config import ConfigError
from mailproxy.ops import proxy_protocol as pp
from mailproxy.ops.proxy_protocol import BrokenHeader, ProxyHeader
from mailproxy.stream import Closed

pytest_plugins = ("certs",)     # certs: a small PKI for the TLS test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIG = pp.V2_SIGNATURE
V1_TCP4 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 143\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 993\r\n"
REAL = ProxyHeader("203.0.113.7", 51234, "192.0.2.1", 143)
LOGIN = IMAP_LOGIN_THEN_ECHO


def v2(command=pp.PROXY, family=pp.INET, transport=pp.STREAM, block=b"", version=2,
       length=None):
    """A v2 header with the given fields; `length` overrides the real one."""
    length = len(block) if length is None else length
    return SIG + bytes((version << 4 | command, family << 4 | transport)) + \
        struct.pack("!H", length) + block


def inet4(src="203.0.113.7", dst="192.0.2.1", sport=51234, dport=143):
    return struct.pack("!4s4sHH", ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed, sport, dport)


def inet6(src="2001:db8::7", dst="2001:db8::1", sport=51234, dport=993):
    return struct.pack("!16s16sHH", ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed, sport, dport)


def tlv(kind, value):
    return struct.pack("!BH", kind, len(value)) + value


# ------------------------------------------------------------- v1 parsing

def test_v1_tcp4():
    assert pp.parse(V1_TCP4) == REAL


def test_v1_tcp6():
    assert pp.parse(V1_TCP6) == ProxyHeader("2001:db8::7", 51234, "2001:db8::1", 993)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"])
def test_v1_unknown_carries_no_address(line):
    assert pp.parse(line) is None


def test_v1_longest_lines_are_accepted():
    addresses = (b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                 b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert pp.parse(b"PROXY TCP6 " + addresses).source_port == 65535
    unknown = b"PROXY UNKNOWN " + addresses     # the spec's worst case
    assert len(unknown) == pp.V1_MAX == 107
    assert pp.parse(unknown) is None


# ------------------------------------------------------------- v2 parsing

def test_v2_ipv4():
    assert pp.parse(v2(block=inet4())) == REAL


def test_v2_ipv6():
    assert pp.parse(v2(family=pp.INET6, block=inet6())) == \
        ProxyHeader("2001:db8::7", 51234, "2001:db8::1", 993)


def test_v2_tlvs_after_the_addresses_are_skipped():
    block = inet4() + tlv(0x01, b"imap") + tlv(0x04, b"") + tlv(0xE0, b"x" * 300)
    assert pp.parse(v2(block=block)) == REAL


@pytest.mark.parametrize("header", [
    v2(command=pp.LOCAL, family=pp.UNSPEC, transport=0),        # a balancer's health check
    v2(command=pp.LOCAL, block=inet4()),                        # LOCAL ignores addresses
    v2(family=pp.UNSPEC, transport=0),                          # PROXY, family unknown
    v2(family=pp.UNIX, block=b"\0" * 216),                      # unix-domain addresses
    v2(transport=pp.DGRAM, block=inet4()),                      # not a stream
], ids=["local", "local-with-addresses", "unspec", "unix", "dgram"])
def test_v2_without_a_usable_address(header):
    assert pp.parse(header) is None


# ------------------------------------------------------------- malformed

@pytest.mark.parametrize("data", [
    b"a LOGIN joe secret\r\n",                                  # a client without the balancer
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",            # a TLS ClientHello
    b"PROXY\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 143\n",            # LF without CR
    b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 143",              # truncated: no line end
    b"PROXY TCP4 203.0.113.7 192.0.2.1 51234\r\n",              # a port missing
    b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 143 1\r\n",        # a word too many
    b"PROXY TCP4  203.0.113.7 192.0.2.1 51234 143\r\n",         # two spaces
    b"PROXY UDP4 203.0.113.7 192.0.2.1 51234 143\r\n",
    b"PROXY tcp4 203.0.113.7 192.0.2.1 51234 143\r\n",
    b"PROXY TCP4 203.0.113 192.0.2.1 51234 143\r\n",            # bad addresses
    b"PROXY TCP4 203.0.113.7 192.0.2.256 51234 143\r\n",
    b"PROXY TCP4 localhost 192.0.2.1 51234 143\r\n",
    b"PROXY TCP4 2001:db8::7 192.0.2.1 51234 143\r\n",          # family and address disagree
    b"PROXY TCP6 203.0.113.7 2001:db8::1 51234 143\r\n",
    b"PROXY TCP6 fe80::1%eth0 2001:db8::1 51234 143\r\n",       # a zone is local to the sender
    b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 143\r\n",          # bad ports
    b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 143\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 +80 143\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 000080 143\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 http 143\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 143\r\r\n",
    b"PROXY UNKNOWN" + b" " * 100 + b"\r\n",                    # too long: 115 bytes
    SIG[:-1] + b"X" + v2(block=inet4())[12:],                   # bad signature
    v2(block=inet4())[:15],                                     # truncated fixed part
    v2(block=inet4(), length=13),                               # wrong length: says more
    v2(block=inet4(), length=11),                               # says less than it has
    v2(block=inet4()[:11]),                                     # address block too short
    v2(family=pp.INET6, block=inet4()),
    v2(version=1, block=inet4()),                               # unknown version
    v2(command=0x2, block=inet4()),                             # unknown command
    v2(family=0x4, block=inet4()),                              # unknown family
    v2(transport=0x3, block=inet4()),                           # unknown transport
    v2(block=b"\0" * (pp.V2_MAX - 15)),                         # more than 4096 bytes
], ids=lambda data: repr(data[:24]))
def test_broken_headers(data):
    with pytest.raises(BrokenHeader):
        pp.parse(data)


def test_broken_header_message_never_repeats_the_bytes():
    with pytest.raises(BrokenHeader) as info:
        pp.parse(b"a LOGIN joe secret\r\n")
    assert "secret" not in str(info.value)


# ----------------------------------------------------- reading a socket

@pytest.fixture
def pair():
    """Two connected sockets: (what the proxy reads, what the client writes)."""
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def soon(seconds=5):
    return time.monotonic() + seconds


@pytest.mark.parametrize("header", [V1_TCP4, b"PROXY UNKNOWN\r\n",
                                    v2(block=inet4() + tlv(0x01, b"imap")),
                                    v2(command=pp.LOCAL, family=pp.UNSPEC, transport=0)])
def test_reader_takes_the_header_and_not_one_byte_more(pair, header):
    ours, theirs = pair
    theirs.sendall(header + b"a CAPABILITY\r\n")
    assert pp.read_header(ours, soon()) == header
    assert ours.recv(100) == b"a CAPABILITY\r\n"


def test_reader_waits_for_a_header_sent_in_pieces(pair):
    ours, theirs = pair
    header = v2(block=inet4() + tlv(0x01, b"imap"))
    pieces = [V1_TCP4[:3], V1_TCP4[3:20], V1_TCP4[20:-1], V1_TCP4[-1:] + header[:5],
              header[5:14], header[14:20], header[20:] + b"next"]

    def dribble():
        for piece in pieces:
            time.sleep(0.02)
            theirs.sendall(piece)
    thread = threading.Thread(target=dribble, name="dribble")
    thread.start()
    try:
        assert pp.read_header(ours, soon()) == V1_TCP4
        assert pp.read_header(ours, soon()) == header
        assert ours.recv(100) == b"next"
    finally:
        thread.join()


def test_reader_gives_up_on_a_v1_line_after_107_bytes(pair):
    ours, theirs = pair
    theirs.sendall(b"PROXY " + b"x" * 200)
    with pytest.raises(BrokenHeader, match="107"):
        pp.read_header(ours, soon())
    assert len(ours.recv(1000)) == 206 - pp.V1_MAX     # it read no more than the limit


def test_reader_refuses_a_long_v2_header_before_reading_it(pair):
    ours, theirs = pair
    theirs.sendall(v2(length=5000))                     # and no body follows
    with pytest.raises(BrokenHeader, match="4096"):
        pp.read_header(ours, soon())


def test_reader_refuses_garbage_after_eight_bytes(pair):
    ours, theirs = pair
    theirs.sendall(b"a LOGIN joe secret\r\n")
    with pytest.raises(BrokenHeader):
        pp.read_header(ours, soon())
    assert ours.recv(100) == b"joe secret\r\n"


def test_reader_times_out_at_the_deadline(pair):
    ours, theirs = pair
    theirs.sendall(b"PROXY TCP4 203.0.113.7")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        pp.read_header(ours, time.monotonic() + 0.3)
    assert 0.25 < time.monotonic() - started < 2


def test_reader_sees_the_client_close(pair):
    ours, theirs = pair
    theirs.sendall(SIG)
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(Closed):
        pp.read_header(ours, soon())


# ---------------------------------------------------------------- building

def test_v1_line_tcp4():
    assert pp.v1_line(("203.0.113.7", 51234), ("192.0.2.1", 143)) == V1_TCP4


def test_v1_line_tcp6():
    assert pp.v1_line(("2001:db8::7", 51234, 0, 0), ("2001:db8::1", 993, 0, 0)) == V1_TCP6


def test_v1_line_for_a_unix_client_is_unknown():
    assert pp.v1_line("", "/run/mailproxy/imap.sock") == b"PROXY UNKNOWN\r\n"
    assert pp.v1_line(("203.0.113.7", 51234), "/run/mailproxy/imap.sock") == \
        b"PROXY UNKNOWN\r\n"


def test_v1_line_names_one_family_for_both_ends():
    """A client from a PROXY header may be IPv4 on an IPv6 listener."""
    assert pp.v1_line(("203.0.113.7", 51234), ("::ffff:192.0.2.1", 143, 0, 0)) == V1_TCP4
    line = pp.v1_line(("203.0.113.7", 51234), ("2001:db8::1", 143, 0, 0))
    assert line.startswith(b"PROXY TCP6 ::ffff:")
    assert pp.parse(line).source == str(ipaddress.ip_address("::ffff:203.0.113.7"))


def test_v2_header_round_trips():
    assert pp.v2_header(("203.0.113.7", 51234), ("192.0.2.1", 143)) == v2(block=inet4())
    assert pp.v2_header(("2001:db8::7", 51234, 0, 0), ("2001:db8::1", 993, 0, 0)) == \
        v2(family=pp.INET6, block=inet6())
    assert pp.parse(pp.v2_header(("203.0.113.7", 51234), ("192.0.2.1", 143))) == REAL


def test_v2_header_for_a_unix_client_is_unspec():
    header = pp.v2_header("", "/run/mailproxy/imap.sock")
    assert header == SIG + b"\x21\x00\x00\x00"
    assert pp.parse(header) is None


class ShortWriter:
    """A socket whose kernel takes all but one byte (the case nginx names)."""

    def __init__(self):
        self.closed = False

    def send(self, data):
        return len(data) - 1

    def close(self):
        self.closed = True


def test_a_partial_write_of_the_header_is_an_error():
    sock = ShortWriter()
    with pytest.raises(BackendError, match="could not send PROXY protocol header at once"):
        send_proxy_header(sock, V1_TCP4)
    assert sock.closed


# --------------------------------------------------- realip and headers

@pytest.mark.parametrize("peer, networks, expected", [
    (("127.0.0.1", 4000), (ipaddress.ip_network("127.0.0.0/8"),), True),
    (("127.0.0.1", 4000), (ipaddress.ip_network("10.0.0.0/8"),), False),
    (("::ffff:127.0.0.1", 4000, 0, 0), (ipaddress.ip_network("127.0.0.1/32"),), True),
    (("::1", 4000, 0, 0), (ipaddress.ip_network("::1/128"), "unix:"), True),
    (("::1", 4000, 0, 0), ("unix:",), False),
    ("", ("unix:",), True),
    ("", (ipaddress.ip_network("0.0.0.0/0"),), False),
    (("127.0.0.1", 4000), (), False),
])
def test_trusted_peers(peer, networks, expected):
    assert pp.trusted(peer, networks) is expected


def test_proxy_protocol_headers_go_after_client_host_and_before_auth_smtp():
    extra = (("Client-Host", "[UNAVAILABLE]"), ("Auth-SMTP-Helo", "x"))
    assert [name for name, _ in pp.auth_headers(REAL, extra)] == [
        "Client-Host", "Proxy-Protocol-Addr", "Proxy-Protocol-Port",
        "Proxy-Protocol-Server-Addr", "Proxy-Protocol-Server-Port", "Auth-SMTP-Helo"]
    assert pp.auth_headers(REAL, ())[1] == ("Proxy-Protocol-Port", "51234")
    assert pp.auth_headers(None, extra) == extra


# ------------------------------------------------------------ configuration

def load(tmp_path, server="", mail=""):
    path = tmp_path / "mail.conf"
    path.write_text(f"mail {{\n auth_http 127.0.0.1:9000/auth;\n {mail}\n server {{\n"
                    f"  listen 127.0.0.1:1143; protocol imap;\n  {server}\n }}\n}}\n")
    return configmod.load(str(path), prefix=str(tmp_path))


def test_set_real_ip_from_addresses_networks_names_and_unix(tmp_path):
    config = load(tmp_path, "set_real_ip_from 192.0.2.1; set_real_ip_from 2001:db8::/32; "
                            "set_real_ip_from localhost; set_real_ip_from unix:;")
    networks = config.servers[0].set_real_ip_from
    assert networks[:2] == (ipaddress.ip_network("192.0.2.1/32"),
                            ipaddress.ip_network("2001:db8::/32"))
    assert ipaddress.ip_network("127.0.0.1/32") in networks     # localhost, resolved now
    assert networks[-1] == "unix:"
    assert config.warnings == ()


def test_set_real_ip_from_host_bits_warn_like_nginx(tmp_path):
    config = load(tmp_path, "set_real_ip_from 10.1.2.3/8;")
    assert config.servers[0].set_real_ip_from == (ipaddress.ip_network("10.0.0.0/8"),)
    assert config.warnings == (f"low address bits of 10.1.2.3/8 are meaningless in "
                               f"{tmp_path / 'mail.conf'}:6",)


def test_the_cli_prints_the_warning(tmp_path):
    load(tmp_path, "set_real_ip_from 10.1.2.3/8;")
    result = subprocess.run([sys.executable, "mailproxy.py", "-t", "-c",
                             str(tmp_path / "mail.conf")], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    assert f"mailproxy: [warn] low address bits of 10.1.2.3/8 are meaningless in " \
           f"{tmp_path / 'mail.conf'}:6\n" in result.stderr


def test_set_real_ip_from_a_server_replaces_the_mail_list(tmp_path):
    config = load(tmp_path, "set_real_ip_from 192.0.2.1;",
                  mail="set_real_ip_from 10.0.0.0/8; set_real_ip_from unix:;")
    assert config.servers[0].set_real_ip_from == (ipaddress.ip_network("192.0.2.1/32"),)


@pytest.mark.parametrize("value, message", [
    ("no-such-host.invalid", 'host not found in "no-such-host.invalid"'),
    ("10.0.0.0/33", 'invalid network "10.0.0.0/33"'),
    ("unix:/run/x.sock", 'invalid network "unix:/run/x.sock"'),
])
def test_set_real_ip_from_errors(tmp_path, value, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"set_real_ip_from {value};")
    assert str(info.value) == f'{message} in "set_real_ip_from" directive in ' \
                              f'{tmp_path / "mail.conf"}:6'


def test_listen_unix_and_proxy_protocol(tmp_path):
    config = load(tmp_path, "listen unix:/run/mp/imap.sock proxy_protocol; proxy_protocol v2;")
    entry = config.servers[0].listens[1]
    assert (entry.family, entry.host, entry.port, entry.name, entry.proxy_protocol) == \
        (socket.AF_UNIX, "/run/mp/imap.sock", 0, "unix:/run/mp/imap.sock", True)
    assert config.servers[0].proxy_protocol == "v2"


@pytest.mark.parametrize("text, message", [
    ("listen unix:;", 'no path in the unix domain socket "unix:"'),
    ("listen unix:/x multipath;", '"multipath" is not supported on the unix domain socket '
                                  '"unix:/x"'),
    ("listen unix:/" + "x" * 107 + ";", "too long path in the unix domain socket"),
])
def test_listen_unix_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


# ------------------------------------------------------- whole sessions

@pytest.fixture
def auth():
    with ScriptedAuthService() as service:
        yield service


@pytest.fixture
def start(tmp_path, auth):
    """start(server_body, mail=..., params=...) -> a RunningProxy whose
    server also listens with proxy_protocol (and `params`) on `proxy.pp_port`."""
    started = []

    def run(body="protocol imap;", mail="", params=""):
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        port = free_port()
        proxy = RunningProxy(directory, mail=f"auth_http {auth.url};\n{mail}",
                             servers=[f"listen 127.0.0.1:{port} proxy_protocol {params};\n"
                                      f"{body}"])
        proxy.pp_port = port
        started.append(proxy)
        return proxy
    yield run
    for proxy in started:
        proxy.stop()


@pytest.fixture
def backend():
    servers = []

    def run(script=LOGIN):
        servers.append(ScriptedBackend(script))
        return servers[-1]
    yield run
    for server in servers:
        server.close()


def proxy_headers(request):
    return [(name, value) for name, value in request.headers
            if name.startswith(("Client-", "Server-", "Proxy-Protocol-", "Auth-SMTP-"))]


def connection_headers(client_port, port):
    """Client-Port, Server-IP, Server-Port of a client (from `client_port`)
    that connected straight to 127.0.0.1:`port` (no trusted header)."""
    return [("Client-Port", str(client_port)), ("Server-IP", "127.0.0.1"),
            ("Server-Port", str(port))]


def imap_login(port, header):
    """Connect, send `header`, log in as joe; the logged-in client."""
    client = Client(port)
    client.send(header)
    assert client.line() == imap.GREETING
    client.send(b"a LOGIN joe secret\r\n")
    assert client.line() == b"a OK logged in\r\n"
    return client


@pytest.mark.parametrize("header", [V1_TCP4, v2(block=inet4() + tlv(0x01, b"imap"))],
                         ids=["v1", "v2"])
def test_a_trusted_balancer_gives_the_real_client_address(start, auth, backend, header):
    server = backend()
    auth.reply = ok("127.0.0.1", server.port)
    proxy = start("protocol imap; set_real_ip_from 127.0.0.1;")
    with imap_login(proxy.pp_port, header):
        pass
    (request,) = auth.requests
    assert proxy_headers(request) == [
        ("Client-IP", "203.0.113.7"), ("Proxy-Protocol-Addr", "203.0.113.7"),
        ("Proxy-Protocol-Port", "51234"), ("Proxy-Protocol-Server-Addr", "192.0.2.1"),
        ("Proxy-Protocol-Server-Port", "143"),
        # as Client-IP is the header's source, Server-IP is its destination
        ("Client-Port", "51234"), ("Server-IP", "192.0.2.1"), ("Server-Port", "143")]
    proxy.wait_log("session done")
    log = proxy.log()
    assert "client 127.0.0.1:" in log           # the connection line names the TCP peer
    assert "client logged in, proxying to" in log
    assert f'client: 203.0.113.7, server: 127.0.0.1:{proxy.pp_port}, login: "joe"' in log
    assert "PROXY protocol src: 203.0.113.7 51234, dst: 192.0.2.1 143" in log


def test_an_untrusted_peer_keeps_its_address_but_the_headers_still_go(start, auth, backend):
    server = backend()
    auth.reply = ok("127.0.0.1", server.port)
    proxy = start("protocol imap; set_real_ip_from 10.0.0.0/8; set_real_ip_from unix:;")
    with imap_login(proxy.pp_port, V1_TCP4) as client:
        client_port = client.sock.getsockname()[1]
    assert proxy_headers(auth.requests[0]) == [
        ("Client-IP", "127.0.0.1"), ("Proxy-Protocol-Addr", "203.0.113.7"),
        ("Proxy-Protocol-Port", "51234"), ("Proxy-Protocol-Server-Addr", "192.0.2.1"),
        ("Proxy-Protocol-Server-Port", "143"), *connection_headers(client_port, proxy.pp_port)]


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n",
                                    v2(command=pp.LOCAL, family=pp.UNSPEC, transport=0)],
                         ids=["unknown", "local"])
def test_a_header_without_addresses_adds_no_headers(start, auth, backend, header):
    server = backend()
    auth.reply = ok("127.0.0.1", server.port)
    proxy = start("protocol imap; set_real_ip_from 127.0.0.1;")
    with imap_login(proxy.pp_port, header) as client:
        client_port = client.sock.getsockname()[1]
    assert proxy_headers(auth.requests[0]) == [("Client-IP", "127.0.0.1"),
                                               *connection_headers(client_port, proxy.pp_port)]


def test_the_plain_listener_of_the_same_server_expects_no_header(start, auth, backend):
    server = backend()
    auth.reply = ok("127.0.0.1", server.port)
    proxy = start("protocol imap; set_real_ip_from 127.0.0.1;")
    with imap_login(proxy.port, b"") as client:
        client_port = client.sock.getsockname()[1]
    assert proxy_headers(auth.requests[0]) == [("Client-IP", "127.0.0.1"),
                                               *connection_headers(client_port, proxy.port)]


def test_the_header_comes_before_the_tls_handshake(start, auth, backend, certs):
    server = backend()
    auth.reply = ok("127.0.0.1", server.port)
    proxy = start(f"protocol imap; set_real_ip_from 127.0.0.1; ssl_certificate "
                  f"{certs.rsa.cert}; ssl_certificate_key {certs.rsa.key};", params="ssl")
    raw = socket.create_connection(("127.0.0.1", proxy.pp_port), timeout=10)
    raw.sendall(V1_TCP4)
    with client_context(certs).wrap_socket(raw, server_hostname="localhost") as tls:
        reader = tls.makefile("rb")
        assert reader.readline() == imap.GREETING
        tls.sendall(b"a LOGIN joe secret\r\n")
        assert reader.readline() == b"a OK logged in\r\n"
        reader.close()
    (request,) = auth.requests
    assert (request.header("Client-IP"), request.header("Auth-SSL")) == ("203.0.113.7", "on")


def test_the_header_and_the_first_command_in_one_packet(start):
    proxy = start()
    with Client(proxy.pp_port) as client:
        client.send(V1_TCP4 + b"a CAPABILITY\r\nb LOGOUT\r\n")
        assert client.line() == imap.GREETING
        assert client.line().startswith(b"* CAPABILITY IMAP4 IMAP4rev1")
        assert client.line() == b"a OK completed\r\n"


@pytest.mark.parametrize("data", [b"a LOGIN joe secret\r\n", b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n",
                                  v2(version=1, block=inet4())],
                         ids=["no-header", "bad-v1", "bad-v2"])
def test_a_broken_header_is_logged_and_closed_without_a_reply(start, data):
    proxy = start()
    with Client(proxy.pp_port) as client:
        client.send(data)
        assert client.closed()
    proxy.wait_log("broken header:")
    line = next(line for line in proxy.log().splitlines() if "broken header" in line)
    assert "[error]" in line and "while reading PROXY protocol, client: 127.0.0.1" in line
    assert "secret" not in proxy.log()


@pytest.mark.parametrize("data", [b"PROXY TCP4 203.0.113.7", v2(length=12)[:-2],
                                  v2(length=12) + b"1234"], ids=["v1", "v2-fixed", "v2-body"])
def test_a_header_that_never_ends_is_closed_at_timeout(start, data):
    proxy = start("protocol imap; timeout 500ms;")
    with Client(proxy.pp_port) as client:
        started = time.monotonic()
        client.send(data)
        assert client.closed()
        assert 0.4 < time.monotonic() - started < 5
    proxy.wait_log("client timed out while reading PROXY protocol")


def smtp_backend(address):
    return [("send", b"220 backend.test ESMTP\r\n"), ("expect", b"EHLO mx.test\r\n"),
            ("send", b"250-backend.test\r\n250 XCLIENT ADDR LOGIN NAME\r\n"),
            ("expect", b"XCLIENT ADDR=" + address + b" NAME=[UNAVAILABLE]\r\n"),
            ("send", b"220 backend.test ESMTP\r\n"),
            ("expect", b"HELO client.example\r\n"), ("send", b"250 backend.test\r\n"),
            ("expect", b"MAIL FROM:<a@example.org>\r\n"), ("send", b"250 ok\r\n"),
            ("expect", b"RCPT TO:<joe@example.org>\r\n"), ("send", b"250 ok\r\n"), ("echo",)]


@pytest.mark.parametrize("header, address, client_ip", [
    (V1_TCP4, b"203.0.113.7", "203.0.113.7"),
    (V1_TCP6, b"IPV6:2001:db8::7", "2001:db8::7"),
], ids=["ipv4", "ipv6"])
def test_smtp_xclient_and_auth_service_see_the_real_client(start, auth, backend, header,
                                                           address, client_ip):
    server = backend(smtp_backend(address))
    auth.reply = ok("127.0.0.1", server.port)
    proxy = start("protocol smtp; smtp_auth none; server_name mx.test; "
                  "set_real_ip_from 127.0.0.0/8;")
    with Client(proxy.pp_port) as client:
        client.send(header)
        assert client.line() == b"220 mx.test ESMTP ready\r\n"
        client.send(b"HELO client.example\r\nMAIL FROM:<a@example.org>\r\n"
                    b"RCPT TO:<joe@example.org>\r\n")
        assert client.lines(3) == [b"250 mx.test\r\n", smtp.OK, b"250 ok\r\n"]
        client.send(b"DATA\r\n")
        assert client.line() == b"DATA\r\n"      # the backend echoes: relay is on
    assert [name for name, _ in proxy_headers(auth.requests[0])] == [
        "Client-IP", "Client-Host", "Proxy-Protocol-Addr", "Proxy-Protocol-Port",
        "Proxy-Protocol-Server-Addr", "Proxy-Protocol-Server-Port", "Auth-SMTP-Helo",
        "Auth-SMTP-From", "Auth-SMTP-To", "Client-Port", "Server-IP", "Server-Port"]
    assert auth.requests[0].header("Client-IP") == client_ip
    server.wait_connections(1)
    assert server.errors == []


def test_the_smtp_host_lookup_asks_about_the_real_client(start):
    """The PTR query goes out for 203.0.113.7, not for the balancer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as resolver:
        resolver.bind(("127.0.0.1", 0))
        resolver.settimeout(10)
        proxy = start(f"protocol smtp; server_name mx.test; set_real_ip_from 127.0.0.1; "
                      f"resolver 127.0.0.1:{resolver.getsockname()[1]} ipv6=off; "
                      f"resolver_timeout 500ms;")
        with Client(proxy.pp_port) as client:
            client.send(V1_TCP4)
            query, _ = resolver.recvfrom(512)
            assert dns.message.from_wire(query).question[0].name.to_text() == \
                "7.113.0.203.in-addr.arpa."
            assert client.line() == b"220 mx.test ESMTP ready\r\n"   # no answer: TEMPUNAVAIL


# ---------------------------------------------------- toward the backend

def backend_with_header(size):
    """A backend that takes `size` bytes of PROXY header before its login."""
    return [("recv", size)] + LOGIN


def test_proxy_protocol_on_sends_the_v1_line_first(start, auth, backend):
    expected = b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 %d\r\n"
    proxy = start("protocol imap; set_real_ip_from 127.0.0.1; proxy_protocol on;")
    line = expected % proxy.pp_port
    server = backend(backend_with_header(len(line)))
    auth.reply = ok("127.0.0.1", server.port)
    with imap_login(proxy.pp_port, V1_TCP4) as client:
        client.send(b"z NOOP\r\n")
        assert client.line() == b"z NOOP\r\n"
    server.wait_connections(1)
    assert server.errors == []
    assert server.received[0].startswith(line + b"a LOGIN {3}\r\n")


def test_proxy_protocol_v2_sends_the_binary_header_first(start, auth, backend):
    proxy = start("protocol imap; proxy_protocol v2;")
    client = Client(proxy.port)                     # a direct client, no header in
    logs_in_after_header(client, auth, backend, v2(block=inet4(
        "127.0.0.1", "127.0.0.1", client.sock.getsockname()[1], proxy.port)))


@pytest.mark.parametrize("mode", ["on", "v2"])
def test_an_ipv4_mapped_client_goes_out_as_tcp4(tmp_path, auth, backend, mode):
    """A dual-stack listener (an IPv6 socket with ipv6only=off) sees an
    IPv4 client as ::ffff:127.0.0.1; the outgoing header names it, and the
    local address, as IPv4 (TCP4, dotted quads), as docs/directives.md says."""
    port = free_port()
    proxy = RunningProxy(tmp_path, mail=f"auth_http {auth.url};", servers=[
        f"listen [::ffff:127.0.0.1]:{port} ipv6only=off;\nprotocol imap; proxy_protocol {mode};"])
    try:
        client = Client(port)
        local = client.sock.getsockname()[1]
        logs_in_after_header(client, auth, backend, v2(block=inet4(
            "127.0.0.1", "127.0.0.1", local, port)) if mode == "v2" else
            b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (local, port))
        assert "client: ::ffff:127.0.0.1," in proxy.log()      # the logs keep the socket's
    finally:
        proxy.stop()


def logs_in_after_header(client, auth, backend, expected):
    """`client` logs in as joe; its backend must get `expected` first."""
    server = backend(backend_with_header(len(expected)))
    auth.reply = ok("127.0.0.1", server.port)
    with client:
        assert client.line() == imap.GREETING
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK logged in\r\n"
    server.wait_connections(1)
    assert server.errors == []
    assert server.received[0].startswith(expected + b"a LOGIN {3}\r\n")


# ------------------------------------------------------------ unix: sockets

@pytest.fixture
def short_dir():
    """A directory whose socket paths fit in sun_path (pytest's are long)."""
    path = tempfile.mkdtemp(prefix="mp-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class UnixIMAP4(imaplib.IMAP4):
    """imaplib over a unix-domain socket."""

    def __init__(self, path):
        self.path = path
        super().__init__("localhost", 0, timeout=10)

    def _create_socket(self, timeout):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.path)
        return sock


def unix_login_script(tags):
    """The PROXY line, then LOGIN with the tag imaplib chose (read from
    `tags` when the proxy connects)."""
    def script(index):
        tag = tags["login"]
        return [("expect", b"PROXY UNKNOWN\r\n"),
                ("send", b"* OK backend ready\r\n"), ("expect", tag + b" LOGIN {3}\r\n"),
                ("send", b"+ go\r\n"), ("expect", b"joe {6}\r\n"), ("send", b"+ go\r\n"),
                ("expect", b"secret\r\n"), ("send", tag + b" OK logged in\r\n"), ("echo",)]
    return script


def test_unix_listener_with_imaplib(start, auth, backend, short_dir):
    path = os.path.join(short_dir, "imap.sock")
    tags = {}
    server = backend(unix_login_script(tags))
    auth.reply = ok("127.0.0.1", server.port)
    proxy = start(f"protocol imap; listen unix:{path}; proxy_protocol on;")
    assert oct(os.stat(path).st_mode & 0o777) == "0o666"
    client = UnixIMAP4(path)
    assert "IMAP4REV1" in client.capabilities
    tags["login"] = client.tagpre + str(client.tagnum).encode()
    assert client.login("joe", "secret")[0] == "OK"
    client.shutdown()
    server.wait_connections(1)
    assert server.errors == []
    assert server.received[0].startswith(b"PROXY UNKNOWN\r\n")     # no address to tell
    assert auth.requests[0].header("Client-IP") == "unix:"
    proxy.wait_log("session done")
    assert f"client unix: connected to unix:{path}" in proxy.log()
    assert f"client: unix:, server: unix:{path}" in proxy.log()
    proxy.stop()
    assert not os.path.exists(path)                 # a clean stop removes the socket file


def test_unix_listener_behind_a_trusted_balancer(start, auth, backend, short_dir):
    path = os.path.join(short_dir, "imap.sock")
    server = backend(backend_with_header(len(b"PROXY UNKNOWN\r\n")))
    auth.reply = ok("127.0.0.1", server.port)
    start(f"protocol imap; listen unix:{path} proxy_protocol; set_real_ip_from unix:; "
          "proxy_protocol on;")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        reader = sock.makefile("rb")
        sock.sendall(V1_TCP4)
        assert reader.readline() == imap.GREETING
        sock.sendall(b"a LOGIN joe secret\r\n")
        assert reader.readline() == b"a OK logged in\r\n"
        reader.close()
    assert auth.requests[0].header("Client-IP") == "203.0.113.7"
    server.wait_connections(1)
    # A client address, but no IP address on our side of a unix: socket.
    assert server.received[0].startswith(b"PROXY UNKNOWN\r\n")


def test_a_unix_client_bound_to_a_path_is_still_unix(start, auth, short_dir):
    path = os.path.join(short_dir, "imap.sock")
    auth.reply = {"Auth-Status": "Invalid login or password"}
    proxy = start(f"protocol imap; listen unix:{path};")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.bind(os.path.join(short_dir, "client.sock"))
        sock.connect(path)
        reader = sock.makefile("rb")
        assert reader.readline() == imap.GREETING
        sock.sendall(b"a LOGIN joe secret\r\n")
        assert reader.readline() == b"a NO Invalid login or password\r\n"
        reader.close()
    assert auth.requests[0].header("Client-IP") == "unix:"
    proxy.wait_log("client login failed")
    assert "client: unix:, server: unix:" in proxy.log()


def test_smtp_over_unix_has_no_host_to_look_up(start, auth, short_dir):
    path = os.path.join(short_dir, "smtp.sock")
    auth.reply = {"Auth-Status": "Invalid login or password"}
    start(f"protocol smtp; listen unix:{path}; server_name mx.test; "
          f"resolver 127.0.0.1:{free_port()}; resolver_timeout 1s;")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        reader = sock.makefile("rb")
        assert reader.readline() == b"220 mx.test ESMTP ready\r\n"
        sock.sendall(b"AUTH PLAIN AGpvZQBzZWNyZXQ=\r\n")
        assert reader.readline().startswith(b"535 ")
        reader.close()
    assert auth.requests[0].header("Client-Host") == "[TEMPUNAVAIL]"


def test_a_stale_socket_file_is_replaced_and_a_live_one_is_not(start, short_dir, tmp_path):
    path = os.path.join(short_dir, "imap.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                                   # the file stays, nobody listens
    start(f"protocol imap; listen unix:{path};")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        assert sock.makefile("rb").readline() == imap.GREETING
    config_path = tmp_path / "second.conf"
    config_path.write_text(f"mail {{ auth_http 127.0.0.1:1/auth; server {{ "
                           f"listen unix:{path}; protocol imap; }} }}\n")
    result = subprocess.run([sys.executable, "mailproxy.py", "-c", str(config_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"bind() to unix:{path} failed (98: Address already in use)" in result.stderr


def test_a_master_removes_its_socket_file_on_stop(tmp_path, short_dir):
    path = os.path.join(short_dir, "imap.sock")
    conf = tmp_path / "mail.conf"
    conf.write_text(f"worker_processes 2;\nerror_log {tmp_path / 'error.log'} info;\n"
                    f"mail {{ auth_http 127.0.0.1:1/auth; server {{ listen unix:{path}; "
                    f"protocol imap; }} }}\n")
    process = subprocess.Popen([sys.executable, "mailproxy.py", "-c", str(conf)], cwd=ROOT,
                               stderr=subprocess.DEVNULL)
    try:
        def greets():
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(2)
                    sock.connect(path)
                    return sock.makefile("rb").readline() == imap.GREETING
            except OSError:
                return False
        assert wait_until(greets, timeout=10)
        process.send_signal(15)
        assert process.wait(timeout=15) == 0
        assert not os.path.exists(path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
