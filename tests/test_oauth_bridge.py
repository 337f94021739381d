"""The password-to-OAuth bridge, end to end (issue 18 item 8).

A real client (imaplib, poplib, smtplib) logs in to the proxy with a
PASSWORD; the reference auth service checks it and answers with an access
token as Auth-Pass and `Auth-Backend-Auth: xoauth2` (or oauthbearer), having
got the token from a token endpoint with the user's refresh token; the proxy
logs in to the backend with `AUTHENTICATE XOAUTH2` / `AUTH XOAUTH2`.

The proxy runs with `trace on`: neither its log nor the auth service's
shows a token, a refresh token, the client secret or the password.  The
token endpoint is a tiny loopback HTTP server written here; the
backends are ScriptedBackends that check the exact SASL strings
(`user=...^Aauth=Bearer ...^A^A`, RFC 7628's `n,a=...`).  Then: a cached
token serves two logins, an expired one is refreshed (with a rotated
refresh token), one refresh per user at a time, a failing token endpoint,
and a backend refusing the token (the provider's error in the log, never
the token).
"""

import base64
import contextlib
import http.server
import imaplib
import json
import logging
import poplib
import smtplib
import threading
import urllib.parse

import pytest

from harness import free_port, reference_auth_service, wait_until
from fakes import ok
from mailproxy import imap
from mailproxy.reference import oauth_tokens
from mailproxy.reference.authservice import UNAVAILABLE

pytest_plugins = ("proxying",)     # start_proxy, backend

LOGIN, PASSWORD, BACKEND_USER = "joe", "secret", "joe@example.org"
REFRESH_TOKEN, CLIENT_ID, CLIENT_SECRET = "1//refresh-joe", "proxy-client", "s3cret-client"
TOKENS = ("ya29.first-access-token", "ya29.second-access-token")
PROVIDER_ERROR = b'{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}'
SERVERS = {"imap": "protocol imap;", "pop3": "protocol pop3;",
           "smtp": "protocol smtp; xclient off;"}
PROTOCOLS = ("imap", "pop3", "smtp")


def xoauth2(token, user=BACKEND_USER):
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def granted(token, expires_in=3600, **extra):
    return 200, {"access_token": token, "token_type": "Bearer", "expires_in": expires_in,
                 **extra}


class TokenEndpoint:
    """An OAuth 2.0 token endpoint on loopback: answers each POST with the
    next of `replies` ((status, JSON), the last repeating) and records the
    forms; `hold` (an Event) delays every answer until it is set."""

    def __init__(self, replies, hold=None):
        self.replies, self.hold, self.forms = list(replies), hold, []
        self.lock = threading.Lock()    # handler threads record concurrently
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status, answer = endpoint.record(urllib.parse.parse_qs(body.decode()))
                if endpoint.hold is not None:
                    endpoint.hold.wait(10)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       name="test token endpoint")
        self.thread.start()

    def record(self, form):
        with self.lock:
            self.forms.append({key: values[0] for key, values in form.items()})
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    def close(self):
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def bridge(tmp_path, start_proxy, backend):
    """bridge(scripts, replies, ...) -> (proxy, token endpoint, backends):
    the proxy (a listener for the protocol of each script, in order)
    asking the reference auth service, whose user joe is an OAuth account
    of the token endpoint."""
    with contextlib.ExitStack() as stack:
        def start(scripts, replies=(granted(TOKENS[0]),), mechanism="xoauth2",
                  user=BACKEND_USER, token_url=None, hold=None):
            endpoint = TokenEndpoint(replies, hold)
            stack.callback(endpoint.close)
            servers = {name: backend(script) for name, script in scripts.items()}
            ports = {name: servers[name].port if name in servers else 9     # never used
                     for name in PROTOCOLS}
            users = tmp_path / "users.conf"
            users.write_text(
                f"{LOGIN} {{PLAIN}}{PASSWORD} " +
                " ".join(f"{name}=127.0.0.1:{port}" for name, port in ports.items()) +
                f" auth-user={user} token-url={token_url or endpoint.url} client-id={CLIENT_ID}"
                f" client-secret={CLIENT_SECRET} refresh-token={REFRESH_TOKEN}"
                f" backend-auth={mechanism}\n")
            service = stack.enter_context(reference_auth_service(users))
            proxy = start_proxy([SERVERS[name] for name in scripts], auth=f"127.0.0.1:{service.server_address[1]}/auth",
                                mail="trace on;")      # a trace shows no token either
            return proxy, endpoint, servers
        yield start


def imap_script(token=TOKENS[0], sasl_ir=True):
    if sasl_ir:
        return [("send", b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n"),
                ("expect_tagged", b"AUTHENTICATE XOAUTH2 " + xoauth2(token) + b"\r\n"),
                ("send", b"* CAPABILITY IMAP4rev1 IDLE\r\n"), ("send_tagged", b"OK Success\r\n"),
                ("expect_tagged", b"NOOP\r\n"), ("send_tagged", b"OK NOOP relayed\r\n")]
    return [("send", b"* OK Gimap ready\r\n"),      # no CAPABILITY: no initial response
            ("expect_tagged", b"AUTHENTICATE XOAUTH2\r\n"), ("send", b"+ \r\n"),
            ("expect", xoauth2(token) + b"\r\n"), ("send_tagged", b"OK Success\r\n"),
            ("expect_tagged", b"NOOP\r\n"), ("send_tagged", b"OK NOOP relayed\r\n")]


POP3_SCRIPT = [("send", b"+OK ready\r\n"), ("expect", b"AUTH XOAUTH2\r\n"), ("send", b"+ \r\n"),
               ("expect", xoauth2(TOKENS[0]) + b"\r\n"), ("send", b"+OK Welcome.\r\n"),
               ("expect", b"STAT\r\n"), ("send", b"+OK 0 0\r\n")]
SMTP_SCRIPT = [("send", b"220 smtp.test ESMTP\r\n"), ("expect", b"EHLO mx.test\r\n"),
               ("send", b"250-smtp.test\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n"),
               ("expect", b"AUTH XOAUTH2 " + xoauth2(TOKENS[0]) + b"\r\n"),
               ("send", b"235 2.7.0 Accepted\r\n"),
               ("expect", b"noop\r\n"), ("send", b"250 2.0.0 relayed\r\n")]


def imap_login(proxy):
    """imaplib logs in with the password and sends one NOOP to the backend."""
    client = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)
    try:
        client.login(LOGIN, PASSWORD)
        assert client.noop() == ("OK", [b"NOOP relayed"])
    finally:
        client.shutdown()


def pop3_login(proxy):
    client = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
    client.user(LOGIN)
    assert client.pass_(PASSWORD) == b"+OK Welcome."
    assert client.stat() == (0, 0)
    client.close()


def smtp_login(proxy):
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as client:
        assert client.login(LOGIN, PASSWORD) == (235, b"2.0.0 OK")
        assert client.noop() == (250, b"2.0.0 relayed")
        client.close()


def finished(server, count=1):
    server.wait_connections(count)
    assert server.errors == []


def assert_no_secret(*texts):
    for text in texts:
        for secret in (*TOKENS, REFRESH_TOKEN, CLIENT_SECRET, PASSWORD):
            assert secret not in text
        assert xoauth2(TOKENS[0]).decode() not in text


# ------------------------------------------------------------ logging in

@pytest.mark.parametrize("protocol, script, login", [
    ("imap", imap_script(), imap_login), ("imap", imap_script(sasl_ir=False), imap_login),
    ("pop3", POP3_SCRIPT, pop3_login), ("smtp", SMTP_SCRIPT, smtp_login)],
    ids=["imap-sasl-ir", "imap-continuation", "pop3", "smtp"])
def test_a_password_login_reaches_the_backend_with_xoauth2(bridge, caplog, protocol, script,
                                                           login):
    caplog.set_level(logging.DEBUG)
    proxy, endpoint, servers = bridge({protocol: script})
    login(proxy)
    finished(servers[protocol])
    assert endpoint.forms == [{"grant_type": "refresh_token", "refresh_token": REFRESH_TOKEN,
                               "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}]
    proxy.wait_log("session done:")
    assert " XOAUTH2" in "".join(line for line in proxy.log().splitlines() if "P: " in line)
    assert_no_secret(proxy.log(), caplog.text)


def test_oauthbearer_names_the_user_host_and_port(bridge):
    """RFC 7628 3.1, with `,` and `=` in the user escaped as =2C and =3D."""
    def script(index):
        port = servers["imap"].port
        message = (f"n,a=j=3Do=2Ce@example.org,\x01host=127.0.0.1\x01port={port}"
                   f"\x01auth=Bearer {TOKENS[0]}\x01\x01")
        return [("send", b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER] ready\r\n"),
                ("expect_tagged", b"AUTHENTICATE OAUTHBEARER " +
                 base64.b64encode(message.encode()) + b"\r\n"),
                ("send_tagged", b"OK Success\r\n"),
                ("expect_tagged", b"NOOP\r\n"), ("send_tagged", b"OK NOOP relayed\r\n")]
    proxy, _, servers = bridge({"imap": script}, mechanism="oauthbearer",
                               user="j=o,e@example.org")
    imap_login(proxy)
    finished(servers["imap"])


# ------------------------------------------------------ the token cache

def test_a_cached_token_serves_two_logins_with_one_refresh(bridge):
    proxy, endpoint, servers = bridge({"imap": imap_script()})
    imap_login(proxy)
    imap_login(proxy)
    finished(servers["imap"], 2)
    assert len(endpoint.forms) == 1


def test_an_expired_token_is_refreshed_with_the_rotated_refresh_token(bridge):
    """expires_in 0: the first token is past its lifetime at the next login;
    the endpoint rotated the refresh token, and the new one is used."""
    proxy, endpoint, servers = bridge(
        {"imap": lambda index: imap_script(TOKENS[index])},
        replies=[granted(TOKENS[0], 0, refresh_token="1//rotated"), granted(TOKENS[1])])
    imap_login(proxy)
    imap_login(proxy)
    finished(servers["imap"], 2)
    assert [form["refresh_token"] for form in endpoint.forms] == [REFRESH_TOKEN, "1//rotated"]


def test_one_refresh_per_user_at_a_time_and_others_wait_with_a_deadline():
    """While one refresh of joe runs, another login of joe waits for it
    (here past its deadline: TokenError), then the fresh token is shared."""
    hold = threading.Event()
    endpoint = TokenEndpoint([granted(TOKENS[0])], hold)
    account = oauth_tokens.Account(endpoint.url, CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN)
    tokens = oauth_tokens.Tokens(timeout=5, wait=0.2)
    got = []
    first = threading.Thread(target=lambda: got.append(tokens.access_token(LOGIN, account)))
    try:
        first.start()
        assert wait_until(lambda: endpoint.forms)      # the first refresh is under way
        with pytest.raises(oauth_tokens.TokenError, match="waiting for the token refresh"):
            tokens.access_token(LOGIN, account)
        hold.set()
        first.join(10)
        assert got == [TOKENS[0]] and tokens.access_token(LOGIN, account) == TOKENS[0]
        assert len(endpoint.forms) == 1
    finally:
        hold.set()
        first.join(10)
        endpoint.close()
        tokens.close()


# ------------------------------------------------------------ failures

@pytest.mark.parametrize("replies, token_url, logged", [
    ([(400, {"error": "invalid_grant", "error_description": "Token has been revoked."})], None,
     "refused the refresh (HTTP 400): invalid_grant: Token has been revoked."),
    ([granted(TOKENS[0])], f"http://127.0.0.1:{free_port()}/token", "failed (ConnectionError)")],
    ids=["refused", "unreachable"])
def test_a_failing_token_endpoint_fails_the_login_cleanly(bridge, caplog, replies, token_url,
                                                          logged):
    caplog.set_level(logging.INFO, logger="mailproxy.authservice")
    proxy, _, servers = bridge({"imap": imap_script()}, replies=replies, token_url=token_url)
    client = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=UNAVAILABLE):
            client.login(LOGIN, PASSWORD)
    finally:
        client.shutdown()
    assert f"no access token for {LOGIN}: token endpoint " in caplog.text
    assert logged in caplog.text
    proxy.wait_log(f'client login failed: "{UNAVAILABLE}"')
    assert servers["imap"].connections == []
    assert_no_secret(proxy.log(), caplog.text)


REFUSING = {
    "imap": [("send", b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n"),
             ("expect_tagged", b"AUTHENTICATE XOAUTH2 " + xoauth2(TOKENS[0]) + b"\r\n"),
             ("send", b"+ " + base64.b64encode(PROVIDER_ERROR) + b"\r\n"), ("expect", b"\r\n"),
             ("send_tagged", b"NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")],
    "pop3": [("send", b"+OK ready\r\n"), ("expect", b"AUTH XOAUTH2\r\n"), ("send", b"+ \r\n"),
             ("expect", xoauth2(TOKENS[0]) + b"\r\n"),
             ("send", b"+ " + base64.b64encode(PROVIDER_ERROR) + b"\r\n"), ("expect", b"\r\n"),
             ("send", b"-ERR Authentication failure: unknown user name or bad password.\r\n")],
    "smtp": [("send", b"220 smtp.test ESMTP\r\n"), ("expect", b"EHLO mx.test\r\n"),
             ("send", b"250 smtp.test\r\n"),
             ("expect", b"AUTH XOAUTH2 " + xoauth2(TOKENS[0]) + b"\r\n"),
             ("send", b"334 " + base64.b64encode(PROVIDER_ERROR) + b"\r\n"), ("expect", b"\r\n"),
             ("send", b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 Learn more\r\n")]}
CLIENTS = {"imap": lambda port: imaplib.IMAP4("127.0.0.1", port, timeout=10),
           "pop3": lambda port: poplib.POP3("127.0.0.1", port, timeout=10),
           "smtp": lambda port: smtplib.SMTP("127.0.0.1", port, timeout=10)}
CLIENT_ERRORS = {"imap": imaplib.IMAP4.error, "pop3": poplib.error_proto,
                 "smtp": smtplib.SMTPException}


def failed_login(proxy, protocol):
    """The client's password login, which must fail; its socket closed."""
    client = CLIENTS[protocol](proxy.port)
    try:
        with pytest.raises(CLIENT_ERRORS[protocol]):
            if protocol == "pop3":
                client.user(LOGIN)
                client.pass_(PASSWORD)
            else:
                client.login(LOGIN, PASSWORD)
    finally:
        (client.shutdown if protocol == "imap" else client.close)()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_backend_refusing_the_token_logs_the_provider_error(bridge, caplog, protocol):
    """The error challenge is answered with an empty line; the decoded
    JSON goes to the log with the failure, never the token; the client gets
    the protocol's internal error."""
    proxy, _, servers = bridge({protocol: REFUSING[protocol]})
    failed_login(proxy, protocol)
    finished(servers[protocol])
    proxy.wait_log(f"upstream refused XOAUTH2 login ({PROVIDER_ERROR.decode()}), "
                   "upstream sent invalid response: ")
    assert_no_secret(proxy.log(), caplog.text)


# ------------------------------------- Auth-Backend-Auth from any service

PLAIN = base64.b64encode(b"\0joe\0secret")
BACKEND_AUTH_SCRIPTS = {
    ("imap", "plain"): [("send", b"* OK ready\r\n"), ("expect", b"a AUTHENTICATE PLAIN\r\n"),
                        ("send", b"+ \r\n"), ("expect", PLAIN + b"\r\n"),
                        ("send", b"a OK done\r\n")],
    ("imap", "login"): [("send", b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n"),
                        ("expect", b"a AUTHENTICATE LOGIN\r\n"), ("send", b"+ VXNlcg==\r\n"),
                        ("expect", b"am9l\r\n"), ("send", b"+ UGFzcw==\r\n"),
                        ("expect", b"c2VjcmV0\r\n"), ("send", b"a OK done\r\n")],
    ("pop3", "plain"): [("send", b"+OK ready\r\n"), ("expect", b"AUTH PLAIN\r\n"),
                        ("send", b"+ \r\n"), ("expect", PLAIN + b"\r\n"),
                        ("send", b"+OK done\r\n")],
    ("pop3", "none"): [("send", b"+OK ready\r\n"), ("expect", b"USER joe\r\n"),
                       ("send", b"+OK\r\n"), ("expect", b"PASS secret\r\n"),
                       ("send", b"+OK done\r\n")]}
CLIENT_LOGINS = {"imap": (b"a LOGIN joe secret\r\n", b"a OK done\r\n"),
                 "pop3": (b"USER joe\r\nPASS secret\r\n", b"+OK done\r\n")}


@pytest.mark.parametrize("protocol, mechanism", sorted(BACKEND_AUTH_SCRIPTS))
def test_auth_backend_auth_names_the_backend_login(start_proxy, auth_service, backend,
                                                   protocol, mechanism):
    """PLAIN and LOGIN too; `none` is the protocol's own login."""
    server = backend(BACKEND_AUTH_SCRIPTS[protocol, mechanism])
    auth_service.reply = ok("127.0.0.1", server.port, Auth_Backend_Auth=mechanism.upper())
    proxy = start_proxy([f"protocol {protocol};"], auth=auth_service.url)
    command, final = CLIENT_LOGINS[protocol]
    with proxy.client() as client:
        client.line()
        client.send(command)
        if protocol == "pop3":
            assert client.line() == b"+OK\r\n"
        assert client.line() == final
    finished(server)


@pytest.mark.parametrize("headers, logged", [
    ({"Auth_Backend_Auth": "cram-md5"}, 'auth http server sent invalid Auth-Backend-Auth "cram-md5"'),
    ({"Auth_Backend_Auth": "XOAUTH2"},           # the client's password is not a token
     'auth http server sent "Auth-Backend-Auth: xoauth2" without Auth-Pass')])
def test_a_wrong_auth_backend_auth_is_the_auth_services_error(start_proxy, auth_service,
                                                              headers, logged):
    auth_service.reply = ok("127.0.0.1", 9, **headers)
    proxy = start_proxy(["protocol imap;"], auth=auth_service.url)
    with proxy.client() as client:
        client.line()
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == imap.INTERNAL_ERROR
    proxy.wait_log(logged)
