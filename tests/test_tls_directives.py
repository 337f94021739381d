"""nginx's TLS directives on pyOpenSSL, as real TLS clients meet them.

`openssl s_client` (the system's) and Python's ssl talk to the proxy over
loopback: session resumption with -sess_out/-sess_in for each
`ssl_session_cache` form, with and without tickets, in TLS 1.2 and 1.3,
and across the workers of one master; curve lists and DH parameters; an
RSA-only and an ECDSA-only client against a two-certificate server;
`ssl_conf_command`; the [warn]s of -t; and `ssl_verify_client
optional_no_ca` with certificates no known CA signed.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.register_assert_rewrite("certs")
from certs import Peer, client_context, issue_chain
from harness import free_port, wait_until
from mailproxy import imap, pop3, smtp
from mailproxy.config import ConfigError, load, dump

pytest_plugins = ("proxying", "certs")

OPENSSL = shutil.which("openssl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = {"1.2": "-tls1_2", "1.3": "-tls1_3"}
# RFC 7919's ffdhe2048 group: DH parameters without a minute of `openssl dhparam`
FFDHE2048 = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs openssl s_client")


def tls_proxy(start_proxy, certs, settings="", protocol="imap", auth=None, pairs=None):
    """A proxy with one `listen ... ssl` server; returns (proxy, port)."""
    port = free_port()
    lines = "".join(f"ssl_certificate {pair.cert};\nssl_certificate_key {pair.key};\n"
                    for pair in (pairs or [certs.rsa]))
    proxy = start_proxy([f"protocol {protocol};\nlisten 127.0.0.1:{port} ssl;"],
                        mail=lines + settings, auth=auth)
    return proxy, port


def s_client(port, certs, *args, say=b"a LOGOUT\r\n"):
    """One `openssl s_client` conversation; its stdout as text."""
    done = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}",
                           "-CAfile", certs.ca.cert, "-ign_eof", *args],
                          input=say, capture_output=True, timeout=30)
    return (done.stdout + done.stderr).decode(errors="replace")


def resumed(port, certs, version, tmp_path):
    """Connect, save the session, connect again offering it: was it reused?"""
    session = tmp_path / f"session-{time.monotonic_ns()}"
    first = s_client(port, certs, VERSIONS[version], "-sess_out", str(session))
    assert f"Protocol  : TLSv{version}" in first or f"TLSv{version}" in first, first[-1500:]
    assert "* BYE" in first, first[-1500:]
    if not session.exists():
        return False                # nothing resumable was offered (no id, no ticket)
    second = s_client(port, certs, VERSIONS[version], "-sess_in", str(session))
    assert "* BYE" in second, second[-1500:]
    return "\nReused, " in second


# ------------------------------------------------------------ sessions

CACHES = ["off", "none", "builtin", "builtin:20480", "shared:SSL:10m",
          "builtin:1000 shared:MAIL:1m"]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("tickets", ["on", "off"])
@pytest.mark.parametrize("cache", CACHES)
def test_resumption_follows_the_session_cache_and_tickets(start_proxy, certs, tmp_path,
                                                          cache, tickets, version):
    """`off`/`none` with tickets off: no resumption at all; a cache, or
    tickets, and the second connection resumes (nginx's meaning)."""
    _, port = tls_proxy(start_proxy, certs, f"ssl_session_cache {cache};\n"
                                            f"ssl_session_tickets {tickets};")
    expected = tickets == "on" or cache not in ("off", "none")
    assert resumed(port, certs, version, tmp_path) == expected


def test_ssl_conf_command_options_minus_session_ticket_turns_tickets_off(start_proxy, certs,
                                                                         tmp_path):
    _, port = tls_proxy(start_proxy, certs, "ssl_conf_command Options -SessionTicket;")
    assert not resumed(port, certs, "1.3", tmp_path)
    _, port = tls_proxy(start_proxy, certs, "ssl_session_tickets off;\n"
                                            "ssl_conf_command Options SessionTicket;")
    assert resumed(port, certs, "1.3", tmp_path)


def test_a_session_older_than_ssl_session_timeout_is_not_resumed(start_proxy, certs,
                                                                 tmp_path):
    _, port = tls_proxy(start_proxy, certs, "ssl_session_timeout 1s;\n"
                                            "ssl_session_cache builtin;")
    session = tmp_path / "session"
    assert "* BYE" in s_client(port, certs, "-tls1_2", "-sess_out", str(session))
    time.sleep(2.2)
    assert "\nNew, " in s_client(port, certs, "-tls1_2", "-sess_in", str(session))


MASTER_CONFIG = """\
worker_processes 2;
error_log {log} info;
mail {{
    auth_http 127.0.0.1:9/auth;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_session_cache off;
    server {{ listen 127.0.0.1:{port} ssl; protocol imap; }}
}}
"""


def test_tickets_issued_by_one_worker_resume_on_another(certs, tmp_path):
    """The master builds the contexts before it forks: both workers hold
    OpenSSL's one ticket key, so every resumption works whichever worker
    takes the connection (the test goes on until both have taken some)."""
    port, log = free_port(), tmp_path / "error.log"
    conf = tmp_path / "mail.conf"
    conf.write_text(MASTER_CONFIG.format(log=log, cert=certs.rsa.cert, key=certs.rsa.key,
                                         port=port))
    master = subprocess.Popen([sys.executable, "mailproxy.py", "-c", str(conf)], cwd=ROOT,
                              stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: log.exists() and log.read_text().count("listening on") >= 2,
                          timeout=15), log.read_text() if log.exists() else ""
        session = tmp_path / "session"
        assert "* BYE" in s_client(port, certs, "-tls1_3", "-sess_out", str(session))
        for attempt in range(1, 41):        # until both workers have served some
            out = s_client(port, certs, "-tls1_3", "-sess_in", str(session))
            assert "\nReused, " in out, out[-1500:]
            pids = {line.split("#")[0].split()[-1] for line in log.read_text().splitlines()
                    if "connected to" in line}
            if len(pids) == 2 and attempt >= 4:
                break
        assert len(pids) == 2, pids
    finally:
        master.send_signal(signal.SIGTERM)
        master.wait(timeout=15)


# ------------------------------------------------- keys, curves, groups

def test_rsa_only_and_ecdsa_only_tls13_clients_get_their_certificate(start_proxy, certs):
    _, port = tls_proxy(start_proxy, certs, pairs=[certs.rsa, certs.ecdsa])
    rsa = s_client(port, certs, "-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256")
    ecdsa = s_client(port, certs, "-tls1_3", "-sigalgs", "ecdsa_secp256r1_sha256")
    assert "Peer signature type: RSA-PSS" in rsa and "* BYE" in rsa, rsa[-1500:]
    assert "Peer signature type: ECDSA" in ecdsa and "* BYE" in ecdsa, ecdsa[-1500:]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_client_outside_the_curve_list_cannot_connect(start_proxy, certs, version):
    """In TLS 1.2 the client offers only ECDHE suites: otherwise a suite
    without ECDHE (RSA key exchange) would be chosen, as nginx would too."""
    _, port = tls_proxy(start_proxy, certs, "ssl_ecdh_curve secp384r1:secp521r1;")
    only_ecdhe = ["-cipher", "ECDHE"] if version == "1.2" else []
    inside = s_client(port, certs, VERSIONS[version], "-groups", "secp521r1", *only_ecdhe)
    assert "* OK IMAP4 ready" in inside and "secp521r1" in inside, inside[-1500:]
    outside = s_client(port, certs, VERSIONS[version], "-groups", "X25519:prime256v1",
                       *only_ecdhe)
    assert "* OK IMAP4 ready" not in outside


def test_ssl_conf_command_groups_and_ciphersuites(start_proxy, certs):
    _, port = tls_proxy(start_proxy, certs, "ssl_conf_command Groups secp384r1;\n"
                        "ssl_conf_command Ciphersuites TLS_CHACHA20_POLY1305_SHA256;")
    out = s_client(port, certs, "-tls1_3")
    assert "TLS_CHACHA20_POLY1305_SHA256" in out and "secp384r1" in out, out[-1500:]


def test_ssl_conf_command_certificate_and_private_key_add_a_pair(start_proxy, certs):
    _, port = tls_proxy(start_proxy, certs, f"ssl_conf_command Certificate {certs.ecdsa.cert};\n"
                                            f"ssl_conf_command PrivateKey {certs.ecdsa.key};")
    ecdsa = s_client(port, certs, "-tls1_3", "-sigalgs", "ecdsa_secp256r1_sha256")
    rsa = s_client(port, certs, "-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256")
    assert "Peer signature type: ECDSA" in ecdsa and "* BYE" in ecdsa, ecdsa[-1500:]
    assert "Peer signature type: RSA-PSS" in rsa and "* BYE" in rsa, rsa[-1500:]


def test_ssl_conf_command_max_protocol(start_proxy, certs):
    _, port = tls_proxy(start_proxy, certs, "ssl_conf_command MaxProtocol TLSv1.2;")
    with Peer.connect(port) as peer:
        peer.starttls(client_context(certs))
        assert peer.line() == imap.GREETING
        assert peer.sock.version() == "TLSv1.2"


def test_ssl_dhparam_serves_dhe_suites(start_proxy, certs, tmp_path):
    dhparam = tmp_path / "dhparam.pem"
    dhparam.write_text(FFDHE2048)
    _, port = tls_proxy(start_proxy, certs, f"ssl_dhparam {dhparam};\n"
                        "ssl_ciphers DHE-RSA-AES128-GCM-SHA256;")
    out = s_client(port, certs, "-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256")
    assert "DHE-RSA-AES128-GCM-SHA256" in out and "DH, 2048 bits" in out, out[-1500:]


def test_tlsv1_is_served_with_seclevel_0(start_proxy, certs):
    _, port = tls_proxy(start_proxy, certs, "ssl_protocols TLSv1 TLSv1.1 TLSv1.2;\n"
                                            'ssl_ciphers "DEFAULT:@SECLEVEL=0";')
    out = s_client(port, certs, "-tls1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert "Protocol  : TLSv1\n" in out and "* BYE" in out, out[-1500:]


# ------------------------------------------------------ configuration

def conf(tmp_path, certs, lines):
    path = tmp_path / "mail.conf"
    body = "\n".join(f"        {line}" for line in lines)
    path.write_text(f"mail {{\n    auth_http 127.0.0.1:9/auth;\n    server {{\n"
                    f"        protocol imap;\n        listen 127.0.0.1:1993 ssl;\n"
                    f"        ssl_certificate {certs.rsa.cert};\n"
                    f"        ssl_certificate_key {certs.rsa.key};\n{body}\n    }}\n}}\n")
    return str(path)


@pytest.mark.parametrize("lines", [
    ["ssl_session_cache shared:SSL:10m;", "ssl_session_timeout 10m;"],
    ["ssl_session_timeout 1d;", "ssl_session_cache shared:MozSSL:10m;",
     "ssl_session_tickets off;", "ssl_ecdh_curve X25519:prime256v1:secp384r1;"],
    ["ssl_session_cache off;", "ssl_session_tickets off;"],
    ["ssl_verify_client optional_no_ca;", "ssl_verify_depth 3;"],
    ["ssl_ecdh_curve auto;", "ssl_prefer_server_ciphers on;",
     "ssl_conf_command Options -SessionTicket,ServerPreference;"]])
def test_real_world_tls_settings_pass_the_test(tmp_path, certs, lines):
    config = load(conf(tmp_path, certs, lines), prefix=str(tmp_path))
    assert config.warnings == ()


@pytest.mark.parametrize("line, message", [
    ("ssl_session_cache shared:SSL;", 'invalid session cache "shared:SSL"'),
    ("ssl_session_cache shared:SSL:1k;", 'session cache "shared:SSL:1k" is too small'),
    ("ssl_session_cache builtin:x;", 'invalid session cache "builtin:x"'),
    ("ssl_ecdh_curve X25519:nonsense;", '"X25519:nonsense": SSL_CTX_set1_groups_list'),
    ("ssl_conf_command SignatureAlgorithms RSA+SHA256;",
     'SSL_CONF_cmd("SignatureAlgorithms", "RSA+SHA256") failed: the command is not '
     'supported by mailproxy'),
    ("ssl_conf_command Options -Bugs;", 'option "Bugs" is not supported by mailproxy'),
    ("ssl_session_ticket_key /dev/null;", '"/dev/null" must be 48 or 80 bytes'),
    ("ssl_session_ticket_key /nonexistent/ticket.key;",
     'open() "/nonexistent/ticket.key" failed (No such file or directory)')])
def test_tls_settings_that_cannot_work_are_errors_naming_the_directive(tmp_path, certs, line,
                                                                       message):
    path = conf(tmp_path, certs, [line])
    with pytest.raises(ConfigError) as caught:
        load(path, prefix=str(tmp_path))
    assert message in str(caught.value)
    assert str(caught.value).endswith(f'in "{line.split()[0]}" directive in {path}:8')


@pytest.mark.parametrize("line, warning", [
    ("ssl_protocols TLSv1 TLSv1.1 TLSv1.2;", 'TLSv1 and TLSv1.1 need "@SECLEVEL=0" in '
                                             '"ssl_ciphers"'),
    ("ssl_session_ticket_key ticket.key;", '"ssl_session_ticket_key" is not honoured: '
                                           "pyOpenSSL cannot load ticket keys"),
    ("ssl_certificate_compression on;", '"ssl_certificate_compression" ignored, not '
                                        "supported"),
    ("ssl_session_cache builtin:1000;", 'the size of "builtin:1000" is not honoured')])
def test_what_is_accepted_but_not_honoured_is_a_warning(tmp_path, certs, line, warning):
    (tmp_path / "ticket.key").write_bytes(os.urandom(80))
    path = conf(tmp_path, certs, [line.replace("ticket.key", str(tmp_path / "ticket.key"))])
    [text] = load(path, prefix=str(tmp_path)).warnings
    assert text.startswith(warning) and text.endswith(f"in {path}:8")


def test_dump_shows_the_effective_tls_settings(tmp_path, certs):
    path = conf(tmp_path, certs, ["ssl_session_cache shared:SSL:10m;",
                                  "ssl_ecdh_curve X25519:prime256v1;",
                                  "ssl_verify_client optional_no_ca;"])
    text = dump(load(path, prefix=str(tmp_path)))
    assert "# TLS: protocols TLSv1.2 TLSv1.3; ciphers HIGH:!aNULL:!MD5; groups " \
           "X25519:prime256v1" in text
    assert "# TLS: session cache on (OpenSSL's built-in cache, one per worker process); " \
           "tickets on (OpenSSL's key, shared by the workers of one master); timeout 300s" \
           in text
    assert "# TLS: verify client optional_no_ca, depth 1" in text
    assert f"# TLS: certificates {certs.rsa.cert} (RSA)" in text


# -------------------------------------------------- client certificates

def verifying(certs, mode):
    return f"ssl_verify_client {mode};\nssl_client_certificate {certs.ca.cert};\n"


def login_headers(port, certs, cert, auth_service):
    with Peer.connect(port) as peer:
        peer.starttls(client_context(certs, cert=cert))
        assert peer.line() == imap.GREETING
        peer.send(b"a LOGIN joe secret\r\n")
        assert peer.line() == b"a NO no reply scripted\r\n"
    return auth_service.requests[-1]


@pytest.mark.parametrize("with_ca", [True, False])
def test_optional_no_ca_passes_an_unknown_ca_to_the_auth_service(start_proxy, auth_service,
                                                                  certs, with_ca):
    """The handshake completes, and the auth service decides from
    Auth-Verify FAILED:<OpenSSL's reason> and the certificate headers; a
    server without any CA file takes such certificates too."""
    settings = verifying(certs, "optional_no_ca") if with_ca else \
        "ssl_verify_client optional_no_ca;\n"
    _, port = tls_proxy(start_proxy, certs, settings + "auth_http_pass_client_cert on;",
                        auth=auth_service.url)
    request = login_headers(port, certs, certs.stranger_client, auth_service)
    verdict = request.header("Auth-SSL-Verify")
    assert verdict in ("FAILED:unable to get local issuer certificate",
                       "FAILED:unable to verify the first certificate")
    assert request.header("Auth-SSL-Subject") == "CN=joe,O=Mailproxy Tests,C=DE"
    assert request.header("Auth-SSL-Issuer") == "CN=Some Other CA,O=Mailproxy Tests,C=DE"
    assert request.header("Auth-SSL-Cert").startswith("-----BEGIN%20CERTIFICATE-----%0AMII")


def test_optional_no_ca_still_refuses_an_expired_certificate(start_proxy, auth_service, certs):
    proxy, port = tls_proxy(start_proxy, certs, verifying(certs, "optional_no_ca"),
                            auth=auth_service.url)
    with Peer.connect(port) as peer:
        peer.starttls(client_context(certs, cert=certs.expired_client))
        assert peer.line() == imap.CERTIFICATE_ERROR
        assert peer.closed()
    proxy.wait_log("client SSL certificate verify error: (10:certificate has expired)")
    assert auth_service.requests == []


@pytest.mark.parametrize("protocol, line", [("imap", imap.CERTIFICATE_ERROR),
                                            ("pop3", pop3.CERTIFICATE_ERROR),
                                            ("smtp", smtp.CERTIFICATE_ERROR)])
@pytest.mark.parametrize("mode", ["on", "optional"])
def test_a_failed_client_certificate_gets_the_protocols_certificate_error(
        start_proxy, certs, protocol, line, mode):
    _, port = tls_proxy(start_proxy, certs, verifying(certs, mode), protocol=protocol)
    with Peer.connect(port) as peer:
        peer.starttls(client_context(certs, cert=certs.stranger_client))
        assert peer.line() == line
        assert peer.closed()
    assert line in (b"* BYE SSL certificate error\r\n", b"-ERR SSL certificate error\r\n",
                    b"421 4.7.1 SSL certificate error\r\n")


def test_a_refused_session_is_not_resumed(start_proxy, certs, tmp_path):
    """nginx removes the session of a client whose certificate failed."""
    _, port = tls_proxy(start_proxy, certs, verifying(certs, "on") +
                        "ssl_session_cache builtin;\nssl_session_tickets off;")
    session = tmp_path / "session"
    first = s_client(port, certs, "-tls1_2", "-sess_out", str(session),
                     "-cert", certs.stranger_client.cert, "-key", certs.stranger_client.key)
    assert "* BYE SSL certificate error" in first
    second = s_client(port, certs, "-tls1_2", "-sess_in", str(session),
                      "-cert", certs.stranger_client.cert, "-key", certs.stranger_client.key)
    assert "\nNew, " in second


@pytest.fixture(scope="module")
def chained_client(certs, tmp_path_factory):
    """A client certificate two intermediate CAs below the test CA."""
    return issue_chain(certs, tmp_path_factory.mktemp("chain"))


@pytest.mark.parametrize("depth, verdict", [(1, "certificate error"), (2, "SUCCESS")])
def test_ssl_verify_depth_limits_the_chain(start_proxy, auth_service, certs, chained_client,
                                           depth, verdict):
    """Client certificate <- two intermediate CAs <- trusted CA: depth 1
    (nginx's default: one intermediate) is one too few, 2 lets it in."""
    proxy, port = tls_proxy(start_proxy, certs, verifying(certs, "on") +
                            f"ssl_verify_depth {depth};", auth=auth_service.url)
    context = client_context(certs)
    context.load_cert_chain(*chained_client)
    with Peer.connect(port) as peer:
        peer.starttls(context)
        if verdict == "SUCCESS":
            assert peer.line() == imap.GREETING
            peer.send(b"a LOGIN joe secret\r\n")
            assert peer.line() == b"a NO no reply scripted\r\n"
            assert auth_service.requests[0].header("Auth-SSL-Verify") == "SUCCESS"
            return
        assert peer.line() == imap.CERTIFICATE_ERROR
    # OpenSSL stops building the chain at the depth: its reason is the
    # missing issuer (20), as nginx on the same OpenSSL would log
    proxy.wait_log("client SSL certificate verify error: (20:unable to get local issuer")


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_resumed_session_keeps_its_certificate_verdict(start_proxy, auth_service, certs,
                                                         tmp_path, version):
    """The verify result travels with the session (cache or ticket), as in
    nginx: resuming never turns a failed certificate into SUCCESS, and a
    refused one is refused again (no bypass through a ticket)."""
    _, port = tls_proxy(start_proxy, certs, verifying(certs, "optional_no_ca") +
                        "ssl_session_cache builtin;", auth=auth_service.url)
    cert = ["-cert", certs.stranger_client.cert, "-key", certs.stranger_client.key]
    session = tmp_path / "session"
    say = b"a LOGIN joe secret\r\nb LOGOUT\r\n"
    first = s_client(port, certs, VERSIONS[version], "-sess_out", str(session), *cert, say=say)
    second = s_client(port, certs, VERSIONS[version], "-sess_in", str(session), *cert, say=say)
    assert "\nReused, " in second, second[-1500:]
    assert "a NO no reply scripted" in first and "a NO no reply scripted" in second
    verdicts = [request.header("Auth-SSL-Verify") for request in auth_service.requests]
    assert len(verdicts) == 2 and verdicts[0] == verdicts[1] != "SUCCESS", verdicts


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_ticket_from_a_refused_session_is_refused_again(start_proxy, certs, tmp_path,
                                                          version):
    _, port = tls_proxy(start_proxy, certs, verifying(certs, "on"))
    cert = ["-cert", certs.stranger_client.cert, "-key", certs.stranger_client.key]
    session = tmp_path / "session"
    first = s_client(port, certs, VERSIONS[version], "-sess_out", str(session), *cert)
    assert "* BYE SSL certificate error" in first
    second = s_client(port, certs, VERSIONS[version], "-sess_in", str(session), *cert)
    assert "\nReused, " in second, second[-1500:]       # a ticket: stateless
    assert "* BYE SSL certificate error" in second and "* OK" not in second
