"""The client's real address, told to the auth service and to the backend.

* Every auth request carries Client-Port, Server-IP and Server-Port (the
  address the client connected to): the listening socket's, or with a
  trusted PROXY header its source port and destination, as Client-IP is
  its source.
* `proxy_client_address on`: an IMAP backend that announces ID gets
  `ID ("x-originating-ip" ...)` before LOGIN, a POP3 backend that announces
  XCLIENT gets `XCLIENT ADDR= PORT= SESSION=` before USER; a refusal does
  not stop the login.  Scripted backends show the exact lines; a real
  Dovecot that trusts the proxy (`login_trusted_networks`) shows in its own
  log that it took the client's address.

The client always comes through a balancer's PROXY header saying
192.0.2.7:40000 -> 203.0.113.9:993, so the address differs from the TCP
peer's (127.0.0.1).
"""

import re
import socket

import pytest

import peers
from conftest import USERS, _started
from fakes import ScriptedAuthService, ScriptedBackend, ok
from harness import Client, RunningProxy, free_port, wait_until
from mailproxy import imap, pop3

HEADER = b"PROXY TCP4 192.0.2.7 203.0.113.9 40000 993\r\n"
ID_LINE = (b'a ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "40000" '
           b'"x-connected-ip" "203.0.113.9" "x-connected-port" "993" "x-session-id" "%d")\r\n')
XCLIENT_LINE = b"XCLIENT ADDR=192.0.2.7 PORT=40000 SESSION=%d\r\n"
LOGIN_ONE_WRITE = b"a LOGIN {3+}\r\njoe {6+}\r\nsecret\r\n"
USER_PASS = b"USER joe\r\nPASS secret\r\n"
LOGGED_IN = {"imap": b"a OK logged in\r\n", "pop3": b"+OK logged in\r\n"}

# Each case: protocol, directive value, and the backend's side as
# (what the proxy must send, what the backend answers) pairs; %d in a
# line is the session number.
CASES = {
    "imap-greeting-announces-id": ("imap", "on", [
        (None, b"* OK [CAPABILITY IMAP4rev1 ID LITERAL+] ready\r\n"),
        (ID_LINE, b'* ID ("name" "scripted")\r\na OK ID completed\r\n'),
        (LOGIN_ONE_WRITE, LOGGED_IN["imap"])]),
    "imap-capability-asked": ("imap", "on", [
        (None, b"* OK ready\r\n"),
        (b"a CAPABILITY\r\n", b"* CAPABILITY IMAP4rev1 ID\r\na OK done\r\n"),
        (ID_LINE, b"a OK ID completed\r\n"),
        (b"a LOGIN {3}\r\n", b"+ OK\r\n"), (b"joe {6}\r\n", b"+ OK\r\n"),
        (b"secret\r\n", LOGGED_IN["imap"])]),
    "imap-id-refused": ("imap", "on", [
        (None, b"* OK [CAPABILITY IMAP4rev1 ID LITERAL+] ready\r\n"),
        (ID_LINE, b"a NO not from you\r\n"),
        (LOGIN_ONE_WRITE, LOGGED_IN["imap"])]),
    "imap-no-id": ("imap", "on", [
        (None, b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n"),
        (LOGIN_ONE_WRITE, LOGGED_IN["imap"])]),
    "imap-off": ("imap", "off", [
        (None, b"* OK [CAPABILITY IMAP4rev1 ID LITERAL+] ready\r\n"),
        (LOGIN_ONE_WRITE, LOGGED_IN["imap"])]),
    "pop3-greeting-announces-xclient": ("pop3", "on", [
        (None, b"+OK [XCLIENT] ready\r\n"), (XCLIENT_LINE, b"+OK Updated\r\n"),
        (b"USER joe\r\n", b"+OK\r\n"), (b"PASS secret\r\n", LOGGED_IN["pop3"])]),
    "pop3-capa-lists-xclient": ("pop3", "on", [
        (None, b"+OK ready\r\n"), (b"CAPA\r\n", b"+OK\r\nUSER\r\nXCLIENT\r\n.\r\n"),
        (XCLIENT_LINE, b"+OK\r\n"),
        (b"USER joe\r\n", b"+OK\r\n"), (b"PASS secret\r\n", LOGGED_IN["pop3"])]),
    "pop3-xclient-refused": ("pop3", "on", [
        (None, b"+OK [XCLIENT] ready\r\n"), (XCLIENT_LINE, b"-ERR not from you\r\n"),
        (b"USER joe\r\n", b"+OK\r\n"), (b"PASS secret\r\n", LOGGED_IN["pop3"])]),
    "pop3-no-xclient": ("pop3", "on", [
        (None, b"+OK ready\r\n"), (b"CAPA\r\n", b"+OK\r\nUSER\r\n.\r\n"),
        (b"USER joe\r\n", b"+OK\r\n"), (b"PASS secret\r\n", LOGGED_IN["pop3"])]),
    "pop3-off": ("pop3", "off", [
        (None, b"+OK [XCLIENT] ready\r\n"),
        (b"USER joe\r\n", b"+OK\r\n"), (b"PASS secret\r\n", LOGGED_IN["pop3"])]),
}
NOTES = {"imap-id-refused": 'upstream refused ID: "a NO not from you"',
         "imap-no-id": "upstream does not announce ID, client address not sent",
         "pop3-xclient-refused": 'upstream refused XCLIENT: "-ERR not from you"',
         "pop3-no-xclient": "upstream does not announce XCLIENT, client address not sent"}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def auth():
    with ScriptedAuthService() as service:
        yield service


@pytest.fixture(scope="module")
def start(tmp_path_factory, auth):
    """start(protocol, setting) -> the module's RunningProxy for that
    protocol and proxy_client_address `setting`, which also listens with
    proxy_protocol on `proxy.pp_port`, trusting 127.0.0.1."""
    started = {}

    def run(protocol, setting):
        if (protocol, setting) not in started:
            pp_port = free_port()
            proxy = RunningProxy(
                tmp_path_factory.mktemp("proxy"),
                mail=f"server_name mx.test; auth_http {auth.url};\n"
                     f"set_real_ip_from 127.0.0.1; proxy_client_address {setting};",
                servers=[f"protocol {protocol};\nlisten 127.0.0.1:{pp_port} proxy_protocol;"])
            proxy.pp_port = pp_port
            started[protocol, setting] = proxy
        return started[protocol, setting]
    yield run
    for proxy in started.values():
        proxy.stop()


def session_number(proxy, client):
    """The connection number the proxy's log gives `client`'s session."""
    port = client.sock.getsockname()[1]
    pattern = re.compile(rf"\*(\d+) client 127\.0\.0\.1:{port} connected")
    return int(wait_until(lambda: pattern.search(proxy.log())).group(1))


def log_in(client, protocol):
    """After the greeting: the login; returns the backend's final line."""
    client.send(b"a LOGIN joe secret\r\n" if protocol == "imap" else USER_PASS)
    line = client.line()
    return client.line() if protocol == "pop3" and line == pop3.OK else line


# ------------------------------------------------------ auth request headers

def test_the_auth_service_learns_both_ends_of_the_connection(tmp_path):
    """Over IPv4 and IPv6 the listening socket's address and port; over a
    unix-domain socket neither, and no client port."""
    v6_port, path = free_port(), tmp_path / "imap.sock"
    with ScriptedAuthService() as auth:
        proxy = RunningProxy(tmp_path, mail=f"auth_http {auth.url};",
                             servers=[f"protocol imap; listen [::1]:{v6_port}; "
                                      f"listen unix:{path};"])
        try:
            ends = [refused_login(socket.create_connection((host, port), timeout=10))
                    for host, port in (("127.0.0.1", proxy.port), ("::1", v6_port))]
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                refused_login(sock)
        finally:
            proxy.stop()
        requests = auth.requests
    connection_headers = [[(name, value) for name, value in request.headers
                           if name in ("Client-IP", "Client-Port", "Server-IP", "Server-Port")]
                          for request in requests]
    assert connection_headers == [
        [("Client-IP", "127.0.0.1"), ("Client-Port", str(ends[0])),
         ("Server-IP", "127.0.0.1"), ("Server-Port", str(proxy.port))],
        [("Client-IP", "::1"), ("Client-Port", str(ends[1])),
         ("Server-IP", "::1"), ("Server-Port", str(v6_port))],
        [("Client-IP", "unix:")]]


def refused_login(sock):
    """Log in on `sock` (the auth service refuses); the client's port."""
    with sock, sock.makefile("rb") as reader:
        assert reader.readline() == imap.GREETING
        sock.sendall(b"a LOGIN joe secret\r\n")
        assert reader.readline() == b"a NO no reply scripted\r\n"
        return sock.getsockname()[1] if sock.family != socket.AF_UNIX else None


# ----------------------------------------------- the backend (scripted)

@pytest.mark.parametrize("case", sorted(CASES))
def test_the_backend_hears_the_client_address_before_the_login(start, auth, case):
    protocol, setting, dialogue = CASES[case]
    script = []
    for expected, answer in dialogue:
        script += ([("recv_line",)] * expected.count(b"\n") if expected else []) + \
            [("send", answer)]
    with ScriptedBackend(script) as backend:
        auth.reply = ok("127.0.0.1", backend.port)
        proxy = start(protocol, setting)
        with Client(proxy.pp_port) as client:
            client.send(HEADER)
            client.line()                                   # the greeting
            assert log_in(client, protocol) == LOGGED_IN[protocol]
            session = session_number(proxy, client)
        backend.wait_connections(1)
        sent = b"".join(expected for expected, _ in dialogue if expected)
        assert bytes(backend.received[0]) == sent.replace(b"%d", b"%d" % session)
        assert backend.errors == []
    note = NOTES.get(case)
    if note:
        line = wait_until(lambda: next((line for line in proxy.log().splitlines()
                                        if line.find(f"*{session} {note}") > 0), None))
        assert "[info]" in line


# ------------------------------------------------------- a real Dovecot

@pytest.fixture(scope="module")
def trusting_dovecot():
    """A Dovecot of its own that trusts the proxy's address (127.0.0.1)
    with the client's: the session-wide one does not."""
    peer = _started(peers.Dovecot(None, users=USERS,
                                  extra_config="login_trusted_networks = 127.0.0.1\n"))
    yield peer
    peer.stop()


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_dovecot_logs_the_real_client_address(start, auth, trusting_dovecot, protocol):
    port = trusting_dovecot.imap_port if protocol == "imap" else trusting_dovecot.pop3_port
    auth.reply = ok("127.0.0.1", port, Auth_Pass=USERS["joe"])
    proxy = start(protocol, "on")
    with Client(proxy.pp_port) as client:
        client.send(HEADER)
        client.line()
        final = log_in(client, protocol)
        assert final.startswith(b"a OK" if protocol == "imap" else b"+OK")
        session = session_number(proxy, client)
        client.send(b"a LOGOUT\r\n" if protocol == "imap" else b"QUIT\r\n")
        client.line()
    # Dovecot's login process logs the address it took from the proxy (and
    # "secured": it trusts the proxy).  POP3's XCLIENT has no field for the
    # address the client connected to.
    where = "lip=203.0.113.9" if protocol == "imap" else "lip=127.0.0.1"
    expected = re.compile(rf"{protocol}-login: Info: Login: user=<joe>, method=PLAIN, "
                          rf"rip=192\.0\.2\.7, {where}, mpid=\d+, secured, session=<{session}>")
    assert wait_until(lambda: expected.search(trusting_dovecot.log_text())), \
        trusting_dovecot.log_text()[-2000:]
