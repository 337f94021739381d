"""Fuzzing with hypothesis: every input gets an answer or a clean error.

The targets and their properties:

* the configuration loader, on random text and on mutations of a valid
  file: a Config or a ConfigError, never another exception;
* the IMAP, POP3 and SMTP command parsers, driven through real sessions
  over loopback: every reply is a well-formed protocol line, the session
  ends cleanly when the client's input ends, and the proxy's log shows no
  "unexpected error" or traceback;
* IMAP literals: any bytes sent as a literal LOGIN reach the auth service
  exactly (escaped);
* sasl.decode and the SASL mechanisms: Credentials or SaslError;
* auth_http.parse_reply on random header lists: an AuthReply that makes
  sense, or AuthServiceError; and the same headers sent on the wire
  (test_auth_http.py fuzzes the framing and bodies of replies on a kept
  connection);
* backend.read_smtp_reply on random byte streams: one whole, bounded reply
  or BackendError;
* the PROXY protocol v1/v2 parser and reader: a header, None or
  BrokenHeader; the reader never takes a byte past the header; what the
  builders write parses back to the same addresses;
* xtext: it decodes back to the input and holds only safe characters.

Example counts are fixed per target (EXAMPLES below; the module takes about
half a minute) and multiplied by MAILPROXY_FUZZ_SCALE for a longer run.
The database is off, so a run leaves no files behind; a failure prints the
example to replay with @reproduce_failure.
"""

import base64
import ipaddress
import os
import re
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import ScriptedAuthService
from harness import RunningProxy, free_port
from mailproxy import auth_http, backend, config, directives, imap, pop3, sasl
from mailproxy.auth_http import AuthReply, AuthServiceError
from mailproxy.backend import BackendError
from mailproxy.ops import proxy_protocol
from mailproxy.ops.proxy_protocol import BrokenHeader, ProxyHeader
from mailproxy.stream import Closed
from mailproxy.sasl import Credentials, SaslError
from mailproxy.stream import Stream

SCALE = int(os.environ.get("MAILPROXY_FUZZ_SCALE", "1"))
EXAMPLES = {"config_text": 150, "config_mutation": 200, "imap": 200, "pop3": 150,
            "smtp": 150, "raw_bytes": 120, "imap_literal": 100, "sasl_decode": 500,
            "sasl_mechanisms": 300, "parse_reply": 300, "smtp_reply": 200,
            "xtext": 500, "proxy_parse": 400, "proxy_read": 200, "proxy_build": 200}
READ_LIMIT = 5.0        # seconds a session may take to answer one burst and close
CRASH = re.compile(r"unexpected error|session crashed|Traceback")


def fuzz(target):
    return settings(max_examples=EXAMPLES[target] * SCALE, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# ------------------------------------------------------------- config

VALID_CONFIG = """\
worker_processes 1;
error_log stderr info;
events { worker_connections 512; }
mail {
    server_name mx.test;
    auth_http 127.0.0.1:9000/auth;
    auth_http_timeout 5s;
    auth_http_header X-Auth-Key "secret";
    timeout 60s;
    proxy_timeout 24h;
    proxy_buffer 4k;
    proxy_pass_error_message on;
    max_errors 5;
    xclient on;
    resolver 127.0.0.1:53 ipv6=off;
    resolver_timeout 30s;
    imap_capabilities IMAP4 IMAP4rev1 UIDPLUS;
    imap_auth plain login cram-md5;
    imap_client_buffer 4k;
    pop3_capabilities TOP USER UIDL;
    pop3_auth plain apop;
    smtp_capabilities PIPELINING "SIZE 10485760";
    smtp_auth login plain none;
    smtp_client_buffer 4k;
    smtp_greeting_delay 0;
    server { listen 127.0.0.1:1143; protocol imap; }
    server { listen [::1]:1110 ipv6only=on; protocol pop3; }
    server { listen 127.0.0.1:1025 backlog=100 so_keepalive=on; protocol smtp; starttls off; }
}
"""
# `include` is left out: it would read whatever files a random pattern names.
NAMES = sorted(set(directives.TABLE) - {"include"})
TOKENS = NAMES + ["{", "}", ";", '"', "'", "\\", "#", "$", "\n", " ", "on", "off", "0",
                  "-1", "99999999999999999999", "4k", "1m", "60s", "1h30m", "500ms",
                  "127.0.0.1", "[::1]", ":", "127.0.0.1:0", "*:143", "unix:/x", "ssl",
                  "server", "mail", "events", "plain", "none", "login", "cram-md5",
                  "http://", "/auth", "=", "backlog=", "\u00e9", "\x00", "\u0663"]
token_text = st.lists(st.sampled_from(TOKENS) | st.text(max_size=8), max_size=60) \
    .map(" ".join)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "fuzz.conf"

    def load(text):
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            return config.load(str(path), prefix=str(tmp_path))
        except config.ConfigError as exc:
            assert str(exc)
            return exc
    return load


def test_valid_config_loads(config_file):
    assert isinstance(config_file(VALID_CONFIG), config.Config)


@fuzz("config_text")
@given(text=token_text | st.text(max_size=300))
def test_config_loader_on_random_text_raises_only_config_errors(config_file, text):
    config_file(text)


@st.composite
def mutated_config(draw):
    """The valid file with a few token-level edits: deleted, inserted,
    replaced or duplicated tokens (values, names, braces, semicolons)."""
    tokens = re.split(r"(\s+|[{};])", VALID_CONFIG)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(tokens) - 1))
        action = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        new = draw(st.sampled_from(TOKENS) | st.text(max_size=12))
        if action == "delete":
            del tokens[position]
        elif action == "insert":
            tokens.insert(position, new)
        elif action == "replace":
            tokens[position] = new
        else:
            tokens.insert(position, tokens[position])
        if not tokens:
            tokens = [""]
    return "".join(tokens)


@fuzz("config_mutation")
@given(text=mutated_config())
def test_config_loader_on_mutated_valid_configs_raises_only_config_errors(config_file, text):
    config_file(text)


# ---------------------------------------------- sessions over loopback

@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """One proxy for the parser targets: IMAP, POP3 and SMTP behind an auth
    address nobody listens on (a login ends in the internal-error line),
    then the same three behind a scripted auth service that records what
    it is asked (for the literal target)."""
    auth = ScriptedAuthService({"Auth-Status": "Invalid login"})
    dead = f"127.0.0.1:{free_port()}/auth"
    mail = ("server_name mx.test;\nimap_auth plain login cram-md5 external;\n"
            "pop3_auth plain apop cram-md5 external;\n"
            "smtp_auth plain login cram-md5 external none;\nmax_errors 20;")
    servers = [f"protocol {p};\nauth_http {dead};" for p in ("imap", "pop3", "smtp")] + \
              [f"protocol imap;\nauth_http {auth.url};"]
    proxy = RunningProxy(tmp_path_factory.mktemp("fuzz"), mail=mail, servers=servers,
                         level="info")
    proxy.auth = auth
    yield proxy
    proxy.stop()
    auth.close()


class LogWatch:
    """The proxy log from where the last look ended."""

    def __init__(self, proxy):
        self.path, self.offset = proxy.log_path, 0

    def new(self):
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read()
        self.offset += len(data)
        return data.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def log_watch(sessions):
    return LogWatch(sessions)


def converse(port, data):
    """Connect, read the greeting, send `data`, end the input, and read
    every reply until the proxy closes.  Returns (greeting, replies)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_LIMIT) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:             # the proxy may close first (max_errors, too long)
            pass
        replies = []
        deadline = time.monotonic() + READ_LIMIT
        while time.monotonic() < deadline:
            try:
                line = reader.readline(65536)
            except ConnectionResetError:
                break
            if not line:
                break
            replies.append(line)
        else:
            raise AssertionError(f"no end of session within {READ_LIMIT}s")
        reader.close()
    return greeting, replies


def assert_clean(log_watch):
    text = log_watch.new()
    assert not CRASH.search(text), text


IMAP_TAGGED = re.compile(rb"[A-Za-z0-9._-]{1,32} (OK|NO|BAD)( .*)?\r\n", re.S)


def check_imap(replies):
    for line in replies:
        assert line.endswith(b"\r\n"), line
        assert line.startswith((b"* ", b"+ ")) or IMAP_TAGGED.fullmatch(line), line


def check_pop3(replies):
    listing = False         # inside a CAPA or AUTH list, up to "."
    for line in replies:
        assert line.endswith(b"\r\n"), line
        if listing:
            listing = line != pop3.END
            continue
        assert line.startswith((b"+OK", b"-ERR", b"+ ")), line
        listing = line in (pop3.CAPA_HEADER, pop3.AUTH_HEADER)
    assert not listing, "a list without its final dot"


def check_smtp(replies):
    for line in replies:
        assert re.fullmatch(rb"[2-5][0-9]{2}[ -].*\r\n", line, re.S), line


def answered(data, replies):
    """A complete line that a non-synchronizing literal did not swallow
    always gets some reply (or a continuation)."""
    return b"\n" not in data or b"+}" in data or bool(replies)


# Pieces of input, hostile and ordinary, that the command strategies join.
LINE_ENDS = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\n\r"])
NOISE = st.binary(max_size=12) | st.sampled_from(
    [b"\0", b"\r", b"\xff", b" ", b"  ", b'"', b"\\", b"{", b"}", b"=", b"*", b"+", b"%"])
B64 = st.binary(max_size=40).map(base64.b64encode)


def literal():
    """`{N}` or `{N+}` and (usually) N bytes; sometimes a wrong count."""
    return st.tuples(st.binary(max_size=20), st.booleans(), st.integers(-2, 2),
                     LINE_ENDS).map(
        lambda t: b"{%d%s}%s%s" % (max(0, len(t[0]) + (t[2] if t[2] in (-1, 1) else 0)),
                                  b"+" if t[1] else b"", t[3], t[0]))


def quoted():
    return st.binary(max_size=16).map(
        lambda b: b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')


IMAP_ARG = st.sampled_from([b"PLAIN", b"LOGIN", b"CRAM-MD5", b"EXTERNAL", b"XOAUTH2", b"joe",
                            b'""', b"NIL"]) | quoted() | literal() | B64 | NOISE
IMAP_TAG = st.sampled_from([b"a", b"A1", b"x.y-z_", b"t" * 32, b"t" * 33, b"", b"*", b"+",
                            b"a%", b"\xff"]) | st.binary(max_size=4)
IMAP_VERB = st.sampled_from([b"CAPABILITY", b"NOOP", b"LOGOUT", b"LOGIN", b"AUTHENTICATE",
                             b"STARTTLS", b"ID", b"SELECT", b"login", b"Noop", b"X"]) | NOISE


@st.composite
def imap_input(draw):
    lines = []
    for _ in range(draw(st.integers(1, 5))):
        args = draw(st.lists(IMAP_ARG, max_size=4))
        lines.append(b" ".join([draw(IMAP_TAG), draw(IMAP_VERB)] + args) + draw(LINE_ENDS))
        if draw(st.booleans()):
            lines.append(draw(B64) + draw(LINE_ENDS))     # a SASL response, maybe
    return b"".join(lines)


POP3_VERB = st.sampled_from([b"USER", b"PASS", b"APOP", b"AUTH", b"CAPA", b"NOOP", b"QUIT",
                             b"STLS", b"STAT", b"RETR", b"user", b"US"]) | NOISE
POP3_ARG = st.sampled_from([b"PLAIN", b"LOGIN", b"CRAM-MD5", b"EXTERNAL", b"joe",
                            b"a" * 130, b"x y z"]) | B64 | NOISE


@st.composite
def pop3_input(draw):
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        args = draw(st.lists(POP3_ARG, max_size=4))
        lines.append(b" ".join([draw(POP3_VERB)] + args) + draw(LINE_ENDS))
        if draw(st.booleans()):
            lines.append(draw(B64) + draw(LINE_ENDS))
    return b"".join(lines)


SMTP_VERB = st.sampled_from([b"HELO", b"EHLO", b"AUTH", b"MAIL", b"RCPT", b"RSET", b"NOOP",
                             b"QUIT", b"VRFY", b"EXPN", b"HELP", b"DATA", b"BDAT",
                             b"STARTTLS", b"ehlo"]) | NOISE
SMTP_ARG = st.sampled_from([b"PLAIN", b"LOGIN", b"CRAM-MD5", b"EXTERNAL", b"client.test",
                            b"FROM:<a@b>", b"TO:<c@d>", b"SIZE=100", b"=", b"*"]) | B64 | NOISE


@st.composite
def smtp_input(draw):
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        args = draw(st.lists(SMTP_ARG, max_size=13))
        lines.append(b" ".join([draw(SMTP_VERB)] + args) + draw(LINE_ENDS))
        if draw(st.booleans()):
            lines.append(draw(B64) + draw(LINE_ENDS))
    return b"".join(lines)


@fuzz("imap")
@given(data=imap_input())
def test_imap_parser_answers_every_input_cleanly(sessions, log_watch, data):
    greeting, replies = converse(sessions.ports[0], data)
    assert greeting == imap.GREETING
    check_imap(replies)
    assert answered(data, replies)
    assert_clean(log_watch)


@fuzz("pop3")
@given(data=pop3_input())
def test_pop3_parser_answers_every_input_cleanly(sessions, log_watch, data):
    greeting, replies = converse(sessions.ports[1], data)
    assert greeting.startswith(pop3.GREETING)
    check_pop3(replies)
    assert answered(data, replies)
    assert_clean(log_watch)


@fuzz("smtp")
@given(data=smtp_input())
def test_smtp_parser_answers_every_input_cleanly(sessions, log_watch, data):
    greeting, replies = converse(sessions.ports[2], data)
    assert greeting == b"220 mx.test ESMTP ready\r\n"
    check_smtp(replies)
    assert answered(data, replies)
    assert_clean(log_watch)


@fuzz("raw_bytes")
@given(data=st.binary(max_size=600), index=st.integers(0, 2))
def test_raw_bytes_in_any_protocol_end_cleanly(sessions, log_watch, data, index):
    greeting, replies = converse(sessions.ports[index], data)
    assert greeting
    (check_imap, check_pop3, check_smtp)[index](replies)
    assert_clean(log_watch)


# --------------------------------------------------------- IMAP literals

@fuzz("imap_literal")
@given(login=st.binary(min_size=1, max_size=60), password=st.binary(max_size=60),
       non_sync=st.booleans(), chunked=st.booleans())
def test_imap_literal_login_reaches_the_auth_service_byte_for_byte(
        sessions, log_watch, login, password, non_sync, chunked):
    """Any bytes, CR, LF and NUL included, in `{N}` or `{N+}` literals
    arrive as the escaped Auth-User and Auth-Pass, nothing more."""
    plus = b"+" if non_sync else b""
    before = len(sessions.auth.requests)
    with socket.create_connection(("127.0.0.1", sessions.ports[3]), timeout=READ_LIMIT) as sock:
        reader = sock.makefile("rb")
        assert reader.readline() == imap.GREETING
        first = b"a LOGIN {%d%s}\r\n" % (len(login), plus)
        second = login + b" {%d%s}\r\n" % (len(password), plus)
        for part in (first, second):
            sock.sendall(part)
            if not non_sync:
                assert reader.readline() == imap.CONTINUE_LITERAL
        sock.sendall(password[:len(password) // 2] if chunked else password)
        if chunked:
            time.sleep(0.001)
            sock.sendall(password[len(password) // 2:])
        sock.sendall(b"\r\n")
        assert reader.readline() == b"a NO Invalid login\r\n"
        assert reader.readline() == b""
        reader.close()
    request = sessions.auth.wait_requests(before + 1)[before]
    assert request.header("Auth-User") == auth_http.escape(login)
    assert request.header("Auth-Pass") == auth_http.escape(password)
    assert_clean(log_watch)


# ------------------------------------------------------------------ SASL

@fuzz("sasl_decode")
@given(line=st.binary(max_size=80) | B64.map(lambda b: b + b"\r\n"))
def test_sasl_decode_gives_bytes_or_sasl_error(line):
    try:
        assert isinstance(sasl.decode(line), bytes)
    except SaslError:
        pass


@fuzz("sasl_decode")
@given(data=st.binary(max_size=80))
def test_sasl_decode_reads_what_base64_wrote(data):
    encoded = base64.b64encode(data)
    assert sasl.decode(encoded + b"\r\n") == data
    assert sasl.decode(encoded.rstrip(b"=")) == data      # padding is optional


@fuzz("sasl_mechanisms")
@given(mechanism=st.sampled_from(sorted(sasl.EXCHANGES)),
       initial=st.none() | st.binary(max_size=40) | B64,
       responses=st.lists(st.binary(max_size=60) | B64, min_size=3, max_size=3),
       salt=st.binary(max_size=40))
def test_sasl_mechanisms_give_credentials_or_sasl_error(mechanism, initial, responses, salt):
    """At most two challenges; the outcome is Credentials or SaslError."""
    exchange = sasl.EXCHANGES[mechanism](initial, salt)
    try:
        challenge = next(exchange)
        for response in responses:
            assert isinstance(challenge, str) and challenge.isascii()
            challenge = exchange.send(response)
        raise AssertionError(f"{mechanism} asked more than {len(responses)} times")
    except StopIteration as done:
        assert isinstance(done.value, Credentials)
        assert repr(done.value).endswith("password=***)")
    except SaslError:
        pass


@fuzz("sasl_mechanisms")
@given(authzid=st.binary(max_size=20).filter(lambda b: b"\0" not in b),
       login=st.binary(max_size=30).filter(lambda b: b"\0" not in b),
       password=st.binary(max_size=30).filter(lambda b: b"\0" not in b))
def test_sasl_plain_round_trip(authzid, login, password):
    token = base64.b64encode(authzid + b"\0" + login + b"\0" + password)
    exchange = sasl.plain(token)
    with pytest.raises(StopIteration) as done:
        next(exchange)
    assert done.value.value == Credentials("plain", login, password)


# ---------------------------------------------------- auth service replies

HEADER_NAMES = st.sampled_from(["Auth-Status", "Auth-Server", "Auth-Port", "Auth-Wait",
                                "Auth-User", "Auth-Pass", "Auth-Error-Code",
                                "Auth-SMTP-Auth", "Content-Length", "X-Other"])
LATIN1 = st.text(st.characters(max_codepoint=255, exclude_characters="\r\n"), max_size=40)
HEADER_VALUES = st.sampled_from(["OK", "WAIT", "Invalid login", "127.0.0.1", "::1",
                                 "mail.example", "143", "0", "65536", "-1", "3", "3s",
                                 "99999999999", "", " ", "+1", "\xb2", "1e3"]) | LATIN1


@fuzz("parse_reply")
@given(headers=st.lists(st.tuples(HEADER_NAMES.map(str.lower) | HEADER_NAMES | LATIN1,
                                  HEADER_VALUES), max_size=12))
def test_auth_reply_parser_gives_a_sane_reply_or_an_auth_service_error(headers):
    """Header lists as the wire can carry them (latin-1 text, at most
    MAX_REPLY_HEADERS bytes in all, which _raw_headers checks first)."""
    if sum(len(name) + len(value) + 4 for name, value in headers) > auth_http.MAX_REPLY_HEADERS:
        headers = headers[:1]
    try:
        reply = auth_http.parse_reply(headers)
    except AuthServiceError as exc:
        assert str(exc)
        return
    assert isinstance(reply, AuthReply)
    assert reply.wait >= 0
    if reply.ok:
        assert str(reply.server) and 0 < reply.port < 65536
        assert reply.server == str(ipaddress.ip_address(reply.server))
    for value in (reply.user, reply.password):
        assert value is None or isinstance(value, bytes)


# --------------------------------------------------- SMTP backend replies

SMTP_LINES = st.binary(max_size=40) | st.sampled_from(
    [b"250-first\r\n", b"250 last\r\n", b"220 ready\r\n", b"250-", b"2", b"\r\n", b"\n",
     b"-", b"250", b"x" * 300])


@fuzz("smtp_reply")
@given(pieces=st.lists(SMTP_LINES, max_size=12), limit=st.integers(1, 600))
def test_smtp_reply_reader_gives_one_bounded_reply_or_backend_error(pieces, limit):
    data = b"".join(pieces)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        stream = Stream(right)
        stream.set_deadline(2)
        try:
            reply = backend.read_smtp_reply(stream, limit)
        except BackendError as exc:
            assert str(exc)
            return
    assert len(reply) <= limit
    assert data.startswith(reply) and reply.endswith(b"\n")
    lines = [line + b"\n" for line in reply.split(b"\n")[:-1]]
    assert all(line[3:4] == b"-" for line in lines[:-1])
    assert lines[-1][3:4] != b"-"


# -------------------------------------------------------------------- xtext

XTEXT_SAFE = re.compile(rb"([!-*,-<>-~]|\+[0-9A-F]{2})*")


def xtext_decode(text):
    return re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), text)


@fuzz("xtext")
@given(value=st.binary(max_size=80))
def test_xtext_round_trip_and_safe_characters(value):
    """RFC 3461 4: nothing but "!".."~" less "+" and "=", or +XX."""
    encoded = backend.xtext(value)
    assert XTEXT_SAFE.fullmatch(encoded), encoded
    assert xtext_decode(encoded) == value


# -------------------------------------------------------- PROXY protocol

IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORTS = st.integers(0, 65535)
V1_WORDS = st.sampled_from([b"PROXY", b"TCP4", b"TCP6", b"UNKNOWN", b"127.0.0.1", b"::1",
                            b"1.2.3.4", b"01.2.3.4", b"fe80::1%eth0", b"65535", b"65536",
                            b"0", b"-1", b"", b"\xff"]) | st.binary(max_size=8)


@st.composite
def v1_lines(draw):
    words = [b"PROXY"] + draw(st.lists(V1_WORDS, max_size=7))
    end = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b""]))
    return b" ".join(words) + end


@st.composite
def v2_blocks(draw):
    """The v2 signature, then random version/command, family/transport,
    a length that may lie, and random address bytes."""
    body = draw(st.binary(max_size=60))
    length = draw(st.sampled_from([len(body), len(body) + 1, max(0, len(body) - 1)]) |
                  st.integers(0, 70000))
    return (proxy_protocol.V2_SIGNATURE + bytes([draw(st.integers(0, 255)),
                                                 draw(st.integers(0, 255))])
            + (length % 65536).to_bytes(2, "big") + body)


PROXY_INPUT = v1_lines() | v2_blocks() | st.binary(max_size=120)


@fuzz("proxy_parse")
@given(data=PROXY_INPUT)
def test_proxy_header_parser_gives_a_header_none_or_broken_header(data):
    try:
        header = proxy_protocol.parse(data)
    except BrokenHeader as exc:
        assert str(exc) and repr(data[6:30]) not in str(exc)
        return
    if header is not None:
        assert isinstance(header, ProxyHeader)
        assert ipaddress.ip_address(header.source) and ipaddress.ip_address(header.destination)
        assert 0 <= header.source_port <= 65535 and 0 <= header.destination_port <= 65535


@fuzz("proxy_read")
@given(data=PROXY_INPUT, after=st.binary(min_size=1, max_size=20))
def test_proxy_header_reader_never_takes_a_byte_past_what_it_returns(data, after):
    """Whatever the reader returns (or refuses), the bytes it did not
    return are still in the socket, in order: the TLS handshake or the
    first command that follows the header is never eaten."""
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data + after)
        left.shutdown(socket.SHUT_WR)
        try:
            header = proxy_protocol.read_header(right, time.monotonic() + 2)
        except (BrokenHeader, Closed):
            return
        rest = b""
        right.settimeout(2)
        while chunk := right.recv(65536):
            rest += chunk
    assert header + rest == data + after
    assert len(header) <= proxy_protocol.V2_MAX


@fuzz("proxy_build")
@given(version=st.sampled_from([4, 6]), ports=st.tuples(PORTS, PORTS),
       data=st.data(), build=st.sampled_from(sorted(proxy_protocol.BUILDERS)))
def test_proxy_headers_the_proxy_writes_parse_back(version, ports, data, build):
    addresses = st.ip_addresses(v=version).map(str)
    client, local = (data.draw(addresses), ports[0]), (data.draw(addresses), ports[1])
    header = proxy_protocol.BUILDERS[build](client, local)
    assert proxy_protocol.parse(header) == ProxyHeader(
        _one_family(client[0], local[0]), client[1], _one_family(local[0], client[0]), local[1])


def _one_family(address, other):
    """How a header names `address` next to `other`: IPv4-mapped addresses
    unmapped, then IPv4 mapped into IPv6 if the other end is IPv6."""
    address, other = (ipaddress.ip_address(a) for a in (address, other))
    address, other = (a.ipv4_mapped or a if a.version == 6 else a for a in (address, other))
    if address.version == 4 and other.version == 6:
        address = ipaddress.IPv6Address(f"::ffff:{address}")
    return str(address)


# ------------------------------------------------- auth replies on the wire

REPLY_NAMES = st.sampled_from(["Auth-Status", "Auth-Server", "Auth-Port", "Auth-User",
                               "Auth-Pass", "Auth-Wait", "Auth-Error-Code", "auth-port",
                               "X-Other", "Content-Length"])
REPLY_VALUES = st.one_of(st.sampled_from(["OK", "WAIT", "127.0.0.1", "1143", "Invalid login",
                                          "0", "joe"]),
                         st.binary(max_size=12).map(lambda b: b.decode("latin-1")))
REPLY_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n ", b"\r\n\t"])   # and folds


class OneShotHttp:
    """A loopback server that answers each connection with `reply` bytes
    after the request's blank line, then closes."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(READ_LIMIT)
        self.port = self.listener.getsockname()[1]
        self.reply = b""

    def serve_one(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(READ_LIMIT)
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            conn.sendall(self.reply)


@pytest.fixture(scope="module")
def one_shot():
    server = OneShotHttp()
    yield server
    server.listener.close()


@fuzz("parse_reply")
@given(headers=st.lists(st.tuples(REPLY_NAMES, REPLY_VALUES, REPLY_ENDS), max_size=8))
def test_an_auth_reply_on_the_wire_is_an_answer_or_an_auth_service_error(one_shot, headers):
    """Whatever the auth service writes (bare CRs, folds, repeats, control
    bytes), the client gives an AuthReply whose texts hold no control byte
    and whose backend port came from one Auth-Port line, or raises
    AuthServiceError: nothing else, and never a silent second request."""
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(
        name.encode() + b": " + value.encode("latin-1") + end for name, value, end in headers)
    one_shot.reply = raw + b"\r\nContent-Length: 0\r\n\r\n"
    client = auth_http.AuthClient(("127.0.0.1", one_shot.port, "/auth", None), 2.0)
    thread = threading.Thread(target=one_shot.serve_one)
    thread.start()
    try:
        reply = client.ask(auth_http.AuthRequest("plain", b"joe", b"pw", b"", "imap", 1,
                                                 "127.0.0.1"))
    except AuthServiceError:
        return
    finally:
        thread.join(READ_LIMIT)
        client.close()
    for text in (reply.status, reply.error_code or ""):
        assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", text), text
    if reply.ok:
        assert raw.lower().count(b"auth-port") == 1, raw
