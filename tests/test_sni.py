"""SNI: several server{} blocks on one address, picked by the client's TLS
server name (names.py, hello.py).

One proxy for the module: three IMAP blocks share an implicit-TLS address
and a STARTTLS address (the default, an exact name, and wildcards), and two
SMTP blocks do the same.  Real clients (Python's ssl, smtplib's wire
through certs.Peer, `openssl s_client -servername`) check the certificate
served (its subject CN) and what differs per block: capabilities, the
SMTP greeting and EHLO name, the auth service asked.  A second proxy
shows that each block keeps its own TLS settings (client certificates,
versions) and that a session resumed under one name is refused under
another (nginx's CVE-2025-23419).  The ClientHello reader (hello.py) gets
whole, split, trickled, truncated and random hellos; each mistake in
sharing an address is a `-t` error naming file:line; examples/sni.conf
picks as its comments say.
"""

import functools
import re
import shutil
import socket
import ssl
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.register_assert_rewrite("certs")
import peers
from certs import Peer, issue_named
from fakes import ScriptedAuthService, fail
from harness import RunningProxy, free_port
from mailproxy import hello, imap, names, smtp
from mailproxy.config import ConfigError, load
from mailproxy.imap import GREETING

pytest_plugins = ("certs",)

OPENSSL = shutil.which("openssl")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sni.conf"
CERT_LINE = re.compile(r"^(\s*ssl_certificate(?:_key)?)\s+\S+;", re.MULTILINE)
IO_TIMEOUT = 5
CAPS = {"default": b"* CAPABILITY IMAP4rev1 X-DEFAULT AUTH=PLAIN\r\n",
        "a": b"* CAPABILITY IMAP4rev1 X-A AUTH=PLAIN\r\n",
        "b": b"* CAPABILITY IMAP4rev1 X-B AUTH=PLAIN\r\n"}
CN = {"default": "default.test", "a": "imap.a.test", "b": "*.b.test"}
# SNI name -> the block it picks (nginx's order: exact, leading, trailing wildcard)
PICKS = [(None, "default"), ("unknown.test", "default"), ("imap.a.test", "a"),
         ("IMAP.A.Test", "a"), ("x.b.test", "b"), ("deep.x.b.test", "b"), ("b.test", "b"),
         ("mail.elsewhere", "b"), ("imap.b.test", "b")]


def block(protocol, name, key, ports, extra):
    return textwrap.dedent(f"""\
        server {{
            listen 127.0.0.1:{ports[0]} ssl;
            listen 127.0.0.1:{ports[1]};
            protocol {protocol};
            starttls on;
            server_name {name};
            ssl_certificate {key.cert};
            ssl_certificate_key {key.key};
            {extra}
        }}
        """)


@pytest.fixture(scope="module")
def setup(certs, tmp_path_factory):
    """(proxy, {"imap"/"smtp": (ssl port, starttls port)}, auth services)."""
    folder = tmp_path_factory.mktemp("sni")
    pairs = {kind: issue_named(certs, folder, CN[kind], [CN[kind]]) for kind in CN}
    ports = {"imap": (free_port(), free_port()), "smtp": (free_port(), free_port())}
    auths = {kind: ScriptedAuthService(fail(f"no from {kind}")) for kind in CN}
    imap = [block("imap", CN[kind] + (" .b.test mail.*" if kind == "b" else ""),
                  pairs[kind], ports["imap"],
                  f"imap_capabilities IMAP4rev1 X-{kind.upper()}; auth_http {auths[kind].url};")
            for kind in CN]
    mx = [block("smtp", name, pairs["a" if "a." in name else "default"], ports["smtp"],
                "smtp_auth none; auth_http 127.0.0.1:9/auth;")
          for name in ("mx.default.test", "mx.a.test")]
    conf = folder / "mail.conf"
    conf.write_text(f"error_log {folder / 'error.log'} info;\nmail {{\n" +
                    "".join(imap + mx) + "}\n")
    proxy = RunningProxy.from_file(conf, folder / "error.log")
    yield proxy, ports, auths
    proxy.stop()
    for auth in auths.values():
        auth.close()


def client_context(certs):
    context = ssl.create_default_context(cafile=certs.ca.cert)
    context.check_hostname = False      # the test checks the CN itself
    return context


def common_name(sock):
    subject = dict(item[0] for item in sock.getpeercert()["subject"])
    return subject["commonName"]


def tls_connect(port, context, name, session=None):
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    return context.wrap_socket(sock, server_hostname=name, session=session)


def imap_capability(peer):
    peer.send(b"a CAPABILITY\r\n")
    return peer.lines(2)[0]


# ------------------------------------------------------------ implicit TLS

@pytest.mark.parametrize("name, kind", PICKS)
def test_implicit_tls_name_picks_the_certificate_and_the_block(setup, certs, name, kind):
    proxy, ports, _ = setup
    with Peer(tls_connect(ports["imap"][0], client_context(certs), name)) as peer:
        assert common_name(peer.sock) == CN[kind]
        assert peer.line() == GREETING
        assert imap_capability(peer) == CAPS[kind]


@pytest.mark.parametrize("name, kind", [("imap.a.test", "a"), (None, "default"),
                                        ("x.b.test", "b")])
def test_the_picked_block_asks_its_own_auth_service(setup, certs, name, kind):
    proxy, ports, auths = setup
    with Peer(tls_connect(ports["imap"][0], client_context(certs), name)) as peer:
        peer.line()
        peer.send(b"a LOGIN joe secret\r\n")
        assert peer.line() == f"a NO no from {kind}\r\n".encode()
    assert auths[kind].requests[-1].header("Auth-User") == "joe"


def test_openssl_s_client_servername_on_implicit_tls_smtp(setup, certs):
    require_openssl()
    proxy, ports, _ = setup
    done = s_client(["-connect", f"127.0.0.1:{ports['smtp'][0]}", "-servername", "mx.a.test"],
                    b"EHLO client.test\r\nQUIT\r\n", certs)
    assert served(done) == CN["a"], done.stderr
    assert b"220 mx.a.test ESMTP ready\r\n" in done.stdout
    assert b"250 mx.a.test\r\n" in done.stdout


# ---------------------------------------------------------------- STARTTLS

@pytest.mark.parametrize("name, kind", [("imap.a.test", "a"), ("unknown.test", "default"),
                                        ("x.b.test", "b")])
def test_openssl_s_client_starttls_imap_name_picks_the_certificate(setup, certs, name, kind):
    require_openssl()
    proxy, ports, _ = setup
    done = s_client(["-starttls", "imap", "-connect", f"127.0.0.1:{ports['imap'][1]}",
                     "-servername", name], b"a CAPABILITY\r\na LOGOUT\r\n", certs)
    assert served(done) == CN[kind], done.stderr
    assert CAPS[kind] in done.stdout


def test_starttls_imap_greets_as_the_first_block_then_serves_as_the_named_one(setup, certs):
    proxy, ports, _ = setup
    with Peer.connect(ports["imap"][1]) as peer:
        assert peer.line() == GREETING
        assert imap_capability(peer) == CAPS["default"].replace(b" AUTH=PLAIN",
                                                                b" AUTH=PLAIN STARTTLS")
        peer.send(b"a STARTTLS\r\n")
        assert peer.line() == b"a OK completed\r\n"
        peer.starttls(client_context(certs), hostname="imap.a.test")
        assert common_name(peer.sock) == CN["a"]
        assert imap_capability(peer) == CAPS["a"]


@pytest.mark.parametrize("name, server", [("mx.a.test", b"mx.a.test"),
                                          (None, b"mx.default.test")])
def test_starttls_smtp_ehlo_after_tls_names_the_picked_block(setup, certs, name, server):
    proxy, ports, _ = setup
    with Peer.connect(ports["smtp"][1]) as peer:
        assert peer.line() == b"220 mx.default.test ESMTP ready\r\n"
        peer.send(b"EHLO client.test\r\n")
        assert peer.lines(2) == [b"250-mx.default.test\r\n", b"250 STARTTLS\r\n"]
        peer.send(b"STARTTLS\r\n")
        assert peer.line() == smtp.START_TLS
        peer.starttls(client_context(certs), hostname=name)
        peer.send(b"EHLO client.test\r\n")
        assert peer.line() == b"250 " + server + b"\r\n"


# ------------------------------------------------------- the ClientHello

def client_hello(name, version="TLSv1_3"):
    """The first flight of Python's TLS client for `name`: one record."""
    context = ssl.create_default_context()
    context.maximum_version = getattr(ssl.TLSVersion, version)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records(message, sizes):
    """A handshake message cut into records of `sizes` bytes (RFC 8446 5.1
    lets a ClientHello span records)."""
    out, at = b"", 0
    for size in sizes:
        part = message[at:at + size]
        out += bytes([hello.HANDSHAKE, 3, 1]) + len(part).to_bytes(2, "big") + part
        at += size
    return out


@functools.lru_cache(maxsize=1)
def real_hello():
    return client_hello("mail.example.org")


def hello_from(data, deadline_seconds=IO_TIMEOUT, trickle=False):
    """What read_client_hello makes of `data` sent to it (a byte at a time
    with `trickle`), over a loopback socket pair."""
    def send():         # a byte per send outgrows the socket buffer: a thread
        for byte in data:
            theirs.sendall(bytes([byte]))
        theirs.shutdown(socket.SHUT_WR)

    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = threading.Thread(target=send, name="hello sender")
        if trickle:
            sender.start()
        else:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)
        try:
            return hello.read_client_hello(ours, time.monotonic() + deadline_seconds)
        finally:
            if trickle:
                sender.join(IO_TIMEOUT)


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("cut", [None, (3, 40, 10000), (1,) * 5])
def test_the_server_name_is_read_from_whole_or_split_hellos(version, cut):
    first = client_hello("Mail.Example.ORG", version)
    message = first[hello.RECORD_HEADER:]
    data = records(message, cut[:-1] + (len(message),)) if cut else first
    assert hello_from(data + b"after", trickle=cut == (1,) * 5) == \
        (data, "mail.example.org")           # nothing past the hello is read


@pytest.mark.parametrize("data", [
    b"", b"\x16\x03", b"a LOGIN joe secret\r\n", b"\x17\x03\x03\x00\x05hello",
    b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
    b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",
])
def test_what_is_no_client_hello_gives_no_name_and_keeps_every_byte(data):
    received, name = hello_from(data)
    assert name is None and data.startswith(received) and received[:5] == data[:5]


def test_a_hello_without_a_name_gives_none():
    assert hello_from(client_hello(None))[1] is None


def test_a_hello_that_stops_halfway_times_out_at_the_deadline():
    first = client_hello("mail.example.org")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(first[:100])
        with pytest.raises(TimeoutError):
            hello.read_client_hello(ours, time.monotonic() + 0.1)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 299))
def test_any_bytes_give_a_name_or_none_never_an_error(noise, at):
    real = real_hello()
    for data in (noise, real[:at] + noise, bytes([22, 3, 1]) + noise):
        received, name = hello_from(data)
        assert data.startswith(received) and (name is None or isinstance(name, str))


# ---------------------------------------------------------- resumption

@pytest.mark.parametrize("first, second", [("imap.a.test", "x.b.test"),
                                           ("x.b.test", "imap.a.test"),
                                           ("imap.a.test", None), (None, "imap.a.test")])
@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_a_session_resumed_under_one_name_is_refused_under_another(setup, certs, first,
                                                                    second, version):
    proxy, ports, _ = setup
    context = client_context(certs)
    context.maximum_version = getattr(ssl.TLSVersion, version)
    session = None
    for _ in range(2):      # the second one shows the name's session resumes
        with Peer(tls_connect(ports["imap"][0], context, first, session)) as peer:
            assert peer.line() == GREETING      # a TLS 1.3 ticket comes with the greeting
            resumed, session = peer.sock.session_reused, peer.sock.session
    assert resumed
    with Peer(tls_connect(ports["imap"][0], context, second, session)) as peer:
        assert peer.line() == GREETING
        assert not peer.sock.session_reused
        assert common_name(peer.sock) == CN["a" if second == "imap.a.test" else
                                            "b" if second else "default"]


# -------------------------------------------- each block's own TLS settings

@pytest.fixture(scope="module")
def strict(certs, tmp_path_factory):
    """One address, two blocks: the first as lax as the defaults, the second
    (strict.test) with client certificates required and TLSv1.3 only.
    Returns the port."""
    folder = tmp_path_factory.mktemp("strict")
    port = free_port()
    common = (f"listen 127.0.0.1:{port} ssl; protocol imap; auth_http 127.0.0.1:9/auth; "
              f"ssl_certificate {certs.rsa.cert}; ssl_certificate_key {certs.rsa.key};")
    conf = folder / "mail.conf"
    conf.write_text(f"error_log {folder / 'error.log'} info;\nmail {{\n"
                    f"server {{ {common} server_name lax.test; }}\n"
                    f"server {{ {common} server_name strict.test; ssl_protocols TLSv1.3; "
                    f"ssl_verify_client on; ssl_client_certificate {certs.ca.cert}; }}\n}}\n")
    proxy = RunningProxy.from_file(conf, folder / "error.log")
    yield port
    proxy.stop()


@pytest.mark.parametrize("name, cert, expected", [
    ("lax.test", False, GREETING), ("strict.test", True, GREETING),
    ("strict.test", False, imap.NO_CERTIFICATE)])
def test_the_named_block_asks_for_its_own_client_certificate(strict, certs, name, cert,
                                                             expected):
    context = client_context(certs)
    if cert:
        context.load_cert_chain(certs.client.cert, certs.client.key)
    with Peer(tls_connect(strict, context, name)) as peer:
        assert peer.line() == expected


def test_the_named_block_keeps_its_own_tls_versions(strict, certs):
    context = client_context(certs)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with Peer(tls_connect(strict, context, "lax.test")) as peer:
        assert peer.line() == GREETING and peer.sock.version() == "TLSv1.2"
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        tls_connect(strict, context, "strict.test").close()


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_a_lax_session_does_not_pass_the_strict_block_cve_2025_23419(strict, certs, version):
    """nginx's CVE-2025-23419: a session from a block that asks for no
    client certificate, resumed under the name of one that does."""
    context = client_context(certs)
    context.maximum_version = getattr(ssl.TLSVersion, version)
    session = None
    for _ in range(2):
        with Peer(tls_connect(strict, context, "lax.test", session)) as peer:
            assert peer.line() == GREETING
            resumed, session = peer.sock.session_reused, peer.sock.session
    assert resumed
    context.maximum_version = ssl.TLSVersion.TLSv1_3       # what strict.test accepts
    with Peer(tls_connect(strict, context, "strict.test", session)) as peer:
        assert peer.line() == imap.NO_CERTIFICATE
        assert not peer.sock.session_reused


# ------------------------------------------------------------ -t errors

def conf_error(tmp_path, certs, *servers):
    """The ConfigError text of a configuration of `servers` (bodies, each
    given a certificate), with each body's first line's number."""
    lines = [f"mail {{ auth_http 127.0.0.1:9/auth; ssl_certificate {certs.rsa.cert}; "
             f"ssl_certificate_key {certs.rsa.key};"]
    starts = []
    for body in servers:
        lines.append("server {")
        starts.append(len(lines) + 1)
        lines += body
        lines.append("}")
    lines.append("}")
    path = tmp_path / "mail.conf"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    return str(caught.value), path, starts


IMAPS = "listen 127.0.0.1:1993 ssl;"
A = [IMAPS, "protocol imap;", "server_name a.test;"]


# (the servers, the message, the culprit: (which server, its directive))
@pytest.mark.parametrize("servers, message, culprit", [
    ((A, [IMAPS, "protocol pop3;", "server_name b;"]),
     'protocol "pop3" differs from "imap" of the server{} at PATH:2 on "127.0.0.1:1993"',
     (1, "listen")),
    ((A, ["listen 127.0.0.1:1993;", "protocol imap;", "starttls on;", "server_name b;"]),
     'the "ssl" parameter differs from "listen 127.0.0.1:1993 ssl" in PATH:3', (1, "listen")),
    ((A, ["listen 127.0.0.1:1993 ssl proxy_protocol;", "protocol imap;", "server_name b;"]),
     'the "proxy_protocol" parameter differs from "listen 127.0.0.1:1993 ssl" in PATH:3',
     (1, "listen")),
    ((A, ["listen 127.0.0.1:1993 ssl backlog=10;", "protocol imap;", "server_name b;"]),
     'duplicate listen options for "127.0.0.1:1993" (the first is '
     '"listen 127.0.0.1:1993 ssl" in PATH:3)', (1, "listen")),
    ((A, [IMAPS, "protocol imap;", "server_name b.test A.test;"]),
     'conflicting server name "A.test" on "127.0.0.1:1993"', (1, "server_name")),
    (([IMAPS, "protocol imap;", "server_name *.a.test;"],
      [IMAPS, "protocol imap;", "server_name .a.test;"]),
     'conflicting server name ".a.test" on "127.0.0.1:1993"', (1, "server_name")),
    ((["listen 127.0.0.1:1143;", "protocol imap;"],
      ["listen 127.0.0.1:1143;", "protocol imap;", "starttls on;", "server_name b;"]),
     'a server{} without TLS shares "127.0.0.1:1143": a client picks one of the servers '
     'on an address by its TLS server name, so each needs "listen ... ssl" or '
     '"starttls on|only"', (0, "listen")),
    ((["listen 127.0.0.1:1143;", "protocol imap;"], ["listen 127.0.0.1:1143;", "protocol imap;"]),
     'duplicate "127.0.0.1:1143" address and port pair', (1, "listen")),
    (([IMAPS, "protocol imap;", "server_name mail.*.test;"],),
     'invalid server name or wildcard "mail.*.test"', (0, "server_name")),
    (([IMAPS, "protocol imap;", "server_name ~^mail;"],),
     'regular expression server names are not supported: "~^mail"', (0, "server_name")),
], ids=["protocol", "ssl", "proxy_protocol", "options", "name", "wildcard name", "no TLS",
        "nginx duplicate", "bad wildcard", "regex"])
def test_sharing_mistakes_are_minus_t_errors_naming_the_line(tmp_path, certs, servers, message,
                                                             culprit):
    text, path, starts = conf_error(tmp_path, certs, *servers)
    server, directive = culprit
    line = starts[server] + next(i for i, said in enumerate(servers[server])
                                 if said.startswith(directive))
    assert text == f"{message.replace('PATH', str(path))} in {path}:{line}"


def test_one_block_per_address_keeps_working_without_names(tmp_path, certs):
    """A lone block's name is never looked at: any name, no TLS needed."""
    path = tmp_path / "mail.conf"
    path.write_text("mail { auth_http 127.0.0.1:9/auth; server { listen 127.0.0.1:1143; "
                    "protocol imap; server_name mx.test other.test; } }\n")
    server = load(str(path)).servers[0]
    assert server.server_name == "mx.test"
    assert names.server_names(server) == ("mx.test", "other.test")


# ---------------------------------------------------------------- example

def test_the_sni_example_picks_as_its_comments_say(tmp_path, certs):
    """examples/sni.conf, with the test's certificate and log: each address
    it shares picks as its comments say."""
    text = CERT_LINE.sub(lambda m: f"{m[1]} {certs.rsa.key if m[1].endswith('key') else ''}"
                         f"{'' if m[1].endswith('key') else certs.rsa.cert};", EXAMPLE.read_text())
    path = tmp_path / "sni.conf"
    path.write_text(text.replace("/var/log/mailproxy/", f"{tmp_path}/"))
    config = load(str(path))
    for port, protocol in ((993, "imap"), (143, "imap"), (587, "smtp")):
        members = next(members for key, members in names.shared_addresses(config.servers)
                       .items() if key[2] == port)
        table, servers = names.NameTable(), [config.servers[index] for index, _ in members]
        for server in servers:
            for name in names.server_names(server):
                table.add(name, server.server_name)
        assert [server.protocol for server in servers] == [protocol, protocol]
        assert table.pick("mail.example.org", None) == "mail.example.org"
        assert table.pick("imap.example.net", None) == "mail.example.net"
        assert table.pick("example.net", None) == ("mail.example.net" if port != 587 else None)
        assert table.pick("unknown.example.com", None) is None


# ---------------------------------------------------------------- helpers

def require_openssl():
    if OPENSSL is None:
        if peers.in_ci():
            pytest.fail("openssl is not installed (required under CI)")
        pytest.skip("openssl is not installed")


def served(done):
    """The CN of the certificate `openssl s_client` verified (its depth=0 line)."""
    line = next(line for line in done.stderr.decode().splitlines()
                if line.startswith("depth=0 "))
    return line.rpartition("CN = ")[2]


def s_client(args, commands, certs):
    return subprocess.run([OPENSSL, "s_client", "-quiet", "-CAfile", certs.ca.cert,
                           "-verify_return_error", *args],
                          input=commands, capture_output=True, timeout=30)
