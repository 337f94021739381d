"""The TLS example configurations, served.

examples/mozilla-intermediate.conf (Mozilla's generated "intermediate"
settings) and examples/nginx-admin-guide.conf (the nginx admin guide's
mail example) run as written, with only what a test must change: loopback
ports, the test certificates, the scripted auth service, and files in a
temporary folder.  Every listener they declare takes a login, over
implicit TLS or after STARTTLS/STLS where the file says so, and the auth
service sees it arrive with `Auth-SSL: on`.
"""

import re
import threading
from pathlib import Path

import pytest

pytest.register_assert_rewrite("certs")
from certs import Peer, client_context
from harness import free_port
from mailproxy import config as configmod
from mailproxy.server import Worker
from transcript import b64

pytest_plugins = ("proxying", "certs")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LISTEN = re.compile(r"listen\s+(\d+)((?:\s+ssl)?);")
FILES = re.compile(r"^(\s*)(error_log|pid)\s+[^\s;]+", re.MULTILINE)


def adapted(name, certs, tmp_path, auth_url):
    """The example's text with loopback ports, test certificates, the
    scripted auth service, one process, and files under tmp_path."""
    text = (EXAMPLES / name).read_text()
    text = LISTEN.sub(lambda m: f"listen 127.0.0.1:{free_port()}{m[2]};", text)
    text = re.sub(r"auth_http\s+\S+;", f"auth_http {auth_url};", text)
    text = re.sub(r"worker_processes\s+\d+;", "worker_processes 1;", text)
    text = FILES.sub(lambda m: f"{m[1]}{m[2]} {tmp_path / m[2]}", text)
    for directive, attribute in (("ssl_certificate", "cert"), ("ssl_certificate_key", "key")):
        def ours(match, attribute=attribute):
            pair = certs.ecdsa if "ecdsa" in match[2] else certs.rsa
            return f"{match[1]}{getattr(pair, attribute)};"
        text = re.sub(rf"({directive}\s+)(\S+);", ours, text)
    path = tmp_path / name
    path.write_text(text)
    return path


def reply(peer):
    lines = [peer.line()]
    while lines[-1][3:4] == b"-" and len(lines) < 32:
        lines.append(peer.line())
    return lines


def log_in(peer, protocol, starttls, certs):
    """One login attempt; the auth service answers no (scripted)."""
    context = client_context(certs)
    if protocol == "imap":
        assert peer.line().startswith(b"* OK")
        if starttls:
            peer.send(b"a STARTTLS\r\n")
            assert peer.line() == b"a OK completed\r\n"
            peer.starttls(context)
        peer.send(b"b LOGIN joe secret\r\n")
        assert peer.line() == b"b NO no reply scripted\r\n"
    elif protocol == "pop3":
        assert peer.line().startswith(b"+OK")
        if starttls:
            peer.send(b"STLS\r\n")
            assert peer.line().startswith(b"+OK")
            peer.starttls(context)
        peer.send(b"USER joe\r\nPASS secret\r\n")
        assert peer.lines(2) == [b"+OK\r\n", b"-ERR no reply scripted\r\n"]
    else:
        assert reply(peer)[0].startswith(b"220 ")
        peer.send(b"EHLO client.example\r\n")
        reply(peer)
        if starttls:
            peer.send(b"STARTTLS\r\n")
            assert reply(peer)[0].startswith(b"220 ")
            peer.starttls(context)
            peer.send(b"EHLO client.example\r\n")
            reply(peer)
        peer.send(b"AUTH PLAIN " + b64(b"\0joe\0secret") + b"\r\n")
        assert reply(peer) == [b"535 5.7.0 no reply scripted\r\n"]


@pytest.mark.parametrize("name", ["mozilla-intermediate.conf", "nginx-admin-guide.conf"])
def test_every_listener_of_the_tls_examples_takes_a_login(certs, tmp_path, auth_service,
                                                          name):
    config = configmod.load(str(adapted(name, certs, tmp_path, auth_service.url)),
                            prefix=str(tmp_path))
    assert config.warnings == ()
    worker = Worker(config)
    worker.open()
    thread = threading.Thread(target=worker.serve, name="example proxy")
    thread.start()
    try:
        for server in config.servers:
            for entry in server.listens:
                with Peer.connect(entry.port) as peer:
                    if entry.ssl:
                        peer.starttls(client_context(certs))
                    log_in(peer, server.protocol, server.starttls != "off" and not entry.ssl,
                           certs)
                request = auth_service.requests[-1]
                assert request.header("Auth-Protocol") == server.protocol
                secure = entry.ssl or server.starttls != "off"
                assert request.header("Auth-SSL") == ("on" if secure else None), entry.text
    finally:
        worker.stop("stop")
        thread.join(timeout=15)
