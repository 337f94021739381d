"""ops/trace.py: the redaction rules alone, then traced sessions through a real proxy.

The first half feeds the pure per-protocol functions line by line, as a
session would, and reads what they would show.  The second half runs every
login mechanism of every protocol with `trace on` and the log at `debug`,
through a scripted auth service and scripted backends (tests/fakes.py), and
checks the two promises of a trace: the dialogue is there (C:, S:, P:, B:),
and no secret is anywhere in the log: not the password, not its base64
forms, not a SASL response, not a CRAM-MD5 or APOP digest.  Last come the
`login:NAME` and CIDR selections and the `--trace` flag of the real CLI.
"""

import base64
import hashlib
import hmac
import ipaddress
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fakes import ScriptedAuthService, ScriptedBackend, ok
from harness import Client, RunningProxy, free_port, wait_until
from mailproxy import config as configmod
from mailproxy import imap
from mailproxy.cli import main
from mailproxy.imap import CONTINUE_LITERAL
from mailproxy.imap import GREETING as IMAP_GREETING
from mailproxy.ops import trace
from mailproxy.ops.trace import Rule
from mailproxy.sasl import PASSWORD_CHALLENGE, USERNAME_CHALLENGE
from mailproxy.session import Command
from mailproxy.smtp import AUTH_OK

REPO = Path(__file__).resolve().parents[1]
LOGIN = b"joe"
PASSWORD = b"Sup3r-s3cret pw"               # a space: IMAP must quote or literal it
ATOM_PASSWORD = b"Sup3r-s3cret_pw"          # for IMAP LOGIN with an atom
BACKEND_PASSWORD = b"backend-0nly-pw"       # what the auth service hands out (CRAM, APOP)
SERVER_NAME = "mx.test"
R = trace.REDACTED


def b64(data):
    return base64.b64encode(data)


# ============================================================ pure functions

# (What a trace shows of client lines depends on the parser: those tables
# run through real sessions in test_trace_secrets.py.)

def to_backend(redact, writes):
    """What the writes of the proxy to a backend show, one after another."""
    state, shown = trace.COMMAND, []
    for data in writes:
        text, state = redact(state, data)
        shown.append(text)
    return shown


def test_imap_to_backend_hides_the_password_and_its_length():
    shown = to_backend(trace.imap_to_backend, [b"a LOGIN {3}\r\n", b"joe {15}\r\n",
                                               PASSWORD + b"\r\n", b"b NOOP\r\n"])
    assert shown == ["a LOGIN {3}", f"joe {R}", R, "b NOOP"]


def test_imap_to_backend_login_with_a_line_break_cannot_shift_the_redaction():
    """A literal login may hold CR LF; one write is one step."""
    shown = to_backend(trace.imap_to_backend,
                       [b"a LOGIN {5}\r\n", b"j\r\noe {15}\r\n", PASSWORD + b"\r\n"])
    assert shown == ["a LOGIN {5}", f"j\\x0d\\x0aoe {R}", R]


def test_imap_to_backend_non_synchronizing_login_in_one_write():
    """LITERAL+ backends get the whole LOGIN at once: the user is shown,
    not the password nor its length, whatever bytes either holds."""
    shown = to_backend(trace.imap_to_backend,
                       [b"a LOGIN {5+}\r\nj\r\noe {15+}\r\n" + PASSWORD + b"\r\n",
                        b"b NOOP\r\n"])
    assert shown == [f"a LOGIN {{5+}} j\\x0d\\x0aoe {R}", "b NOOP"]


def test_pop3_to_backend():
    shown = to_backend(trace.pop3_to_backend,
                       [b"USER joe\r\n", b"PASS " + PASSWORD + b"\r\n", b"STLS\r\n"])
    assert shown == ["USER joe", f"PASS {R}", "STLS"]


def test_smtp_to_backend():
    events = [("C", "line", b"EHLO mx.test\r\n"), ("S", b"250 backend\r\n"),
              ("C", "line", b"XCLIENT ADDR=127.0.0.1 LOGIN=joe NAME=[UNAVAILABLE]\r\n"),
              ("C", "line", b"AUTH PLAIN " + b64(b"\0joe\0" + PASSWORD) + b"\r\n"),
              ("S", b"235 ok\r\n"),
              ("C", "line", b"AUTH LOGIN\r\n"), ("S", b"334 VXNlcm5hbWU6\r\n"),
              ("C", "line", b64(b"joe") + b"\r\n"), ("S", b"334 UGFzc3dvcmQ6\r\n"),
              ("C", "line", b64(PASSWORD) + b"\r\n"), ("S", b"235 ok\r\n"),
              ("C", "line", b"MAIL FROM:<a@b>\r\n")]
    state, shown = trace.COMMAND, []
    for direction, *data in events:
        if direction == "S":
            state = trace.smtp_server(state, data[0])
            continue
        text, state = trace.smtp_to_backend(state, data[1])
        shown.append(text)
    assert shown == ["EHLO mx.test", "XCLIENT ADDR=127.0.0.1 LOGIN=joe NAME=[UNAVAILABLE]",
                     f"AUTH PLAIN {R}", "AUTH LOGIN", R, R, "MAIL FROM:<a@b>"]


@pytest.mark.parametrize("protocol, events, expected", [
    ("imap", [("C", b"a AUTHENTICATE XOAUTH2 " + b64(b"user=joe\1auth=Bearer " + PASSWORD)),
              ("S", b"+ eyJzdGF0dXMiOiI0MDEifQ=="), ("C", b""), ("S", b"a NO refused"),
              ("C", b"b NOOP")], ["a AUTHENTICATE XOAUTH2 ***", R, "b NOOP"]),
    ("imap", [("C", b"a AUTHENTICATE PLAIN"), ("S", b"+ "), ("C", b64(b"\0joe\0" + PASSWORD)),
              ("S", b"* CAPABILITY IMAP4rev1"), ("S", b"a OK done"), ("C", b"b NOOP")],
     ["a AUTHENTICATE PLAIN", R, "b NOOP"]),
    ("pop3", [("C", b"AUTH XOAUTH2"), ("S", b"+ "), ("C", b64(b"auth=Bearer " + PASSWORD)),
              ("S", b"+OK welcome"), ("C", b"STAT")], ["AUTH XOAUTH2", R, "STAT"]),
    ("smtp", [("C", b"AUTH XOAUTH2 " + b64(b"auth=Bearer " + PASSWORD)),
              ("S", b"334 eyJzdGF0dXMiOiI0MDEifQ=="), ("C", b""), ("S", b"535 5.7.8 no"),
              ("C", b"QUIT")], [f"AUTH XOAUTH2 {R}", R, "QUIT"])])
def test_backend_sasl_hides_initial_responses_and_answers(protocol, events, expected):
    """backend_sasl.py's exchanges: the mechanism is shown, every response
    (a token, PLAIN's password, the answer to an error challenge) is not,
    until the backend's final reply ends the exchange."""
    redactor, state, shown = trace.REDACTORS[protocol], trace.COMMAND, []
    for direction, data in events:
        if direction == "S":
            state = redactor.from_backend(state, data + b"\r\n")
            continue
        text, state = redactor.to_backend(state, data + b"\r\n")
        shown.append(text)
    assert [text for text in shown if text] == expected


def test_shown_escapes_and_bounds():
    assert trace.shown(b"a\x00b\x1b[31m\r\n") == "a\\x00b\\x1b[31m"
    assert trace.shown(b"caf\xc3\xa9 \xff") == "caf\u00e9 \\xff"
    long = trace.shown(b"x" * (trace.MAX_SHOWN + 50))
    assert long == "x" * trace.MAX_SHOWN + "..."


# ================================================================== Tracer

class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def tracer(rule, address="127.0.0.1"):
    logger = logging.Logger("trace-test")
    handler = Lines()
    logger.addHandler(handler)
    where = {"address": address}
    return trace.Tracer(rule, "imap", logger, lambda: where["address"]), handler.lines, where


def command(tracer_, tag, verb, *args):
    """A client line read, then parsed as imap.py parses it (atoms only)."""
    tracer_.from_client("line", b" ".join((tag, verb) + args) + b"\r\n")
    tracer_.command(Command(verb.decode(), args, tag, line=tag + b" " + verb,
                            written=list(args)), imap.SECRETS.get(verb.decode()), True)


def test_login_rule_holds_lines_until_the_login_matches():
    rule = Rule(logins=(b"ann",))
    tracer_, lines, _ = tracer(rule)
    tracer_.to_client(b"* OK IMAP4 ready\r\n")
    command(tracer_, b"a", b"LOGIN", b"joe", b"pw")
    tracer_.login(b"joe")
    tracer_.to_client(b"a NO refused\r\n")
    assert lines == []                          # joe is not traced, and nothing is kept
    command(tracer_, b"b", b"LOGIN", b"ann", b"pw")
    tracer_.login(b"ann")
    tracer_.to_client(b"b OK\r\n")
    assert lines == ["S: a NO refused", f"C: b LOGIN ann {R}", "S: b OK"]


def test_held_lines_are_bounded():
    tracer_, lines, _ = tracer(Rule(logins=(b"ann",)))
    for number in range(trace.MAX_HELD + 7):
        command(tracer_, b"a%d" % number, b"NOOP")
    tracer_.login(b"ann")
    assert lines[0] == "trace: 7 earlier lines not kept"
    assert lines[1] == "C: a7 NOOP" and lines[-1] == f"C: a{trace.MAX_HELD + 6} NOOP"
    assert len(lines) == trace.MAX_HELD + 1


def test_address_rule_is_decided_at_the_greeting():
    """The address as known when the greeting goes out (after a PROXY
    header has replaced it) decides."""
    rule = Rule(networks=(ipaddress.ip_network("192.0.2.0/24"),))
    tracer_, lines, where = tracer(rule, address="10.0.0.1")
    where["address"] = "192.0.2.7"
    tracer_.to_client(b"* OK IMAP4 ready\r\n")
    assert lines == ["S: * OK IMAP4 ready"]
    other, lines, _ = tracer(rule, address="10.0.0.1")
    other.to_client(b"* OK IMAP4 ready\r\n")
    command(other, b"a", b"NOOP")
    assert lines == [] and not other.held


def test_address_rule_matches_ipv4_mapped_clients():
    rule = Rule(networks=(ipaddress.ip_network("192.0.2.0/24"),))
    assert rule.selects_address("::ffff:192.0.2.9") and rule.selects_address("192.0.2.9")
    assert not rule.selects_address("unix:") and not rule.selects_address("2001:db8::1")


def test_address_or_login():
    rule = Rule(networks=(ipaddress.ip_network("192.0.2.0/24"),), logins=(b"joe",))
    tracer_, lines, _ = tracer(rule, address="10.0.0.1")
    tracer_.to_client(b"* OK IMAP4 ready\r\n")
    command(tracer_, b"a", b"LOGIN", b"joe", b"x")
    assert lines == []
    tracer_.login(b"joe")
    assert lines == ["S: * OK IMAP4 ready", f"C: a LOGIN joe {R}"]


# ============================================================ through a proxy

def cram_response(challenge_line, password=PASSWORD):
    salt = base64.b64decode(challenge_line.split(b" ", 1)[1].strip())
    digest = hmac.new(password, salt, hashlib.md5).hexdigest().encode()
    return digest, b64(LOGIN + b" " + digest)


class Session:
    """A client connection with a record of every secret it sent."""

    def __init__(self, port):
        self.conn = Client(port)
        self.secrets = []

    def send(self, data, secret=None):
        self.conn.send(data)
        if secret is not None:
            self.secrets.append(secret)

    def line(self):
        return self.conn.line()

    def expect(self, data):
        got = self.conn.line()
        assert got == data, (got, data)
        return got


# Each mechanism: a function(session, continuation prefix) that logs in.
# IMAP

def imap_login_atom(s):
    s.send(b"t LOGIN joe " + ATOM_PASSWORD + b"\r\n", ATOM_PASSWORD)


def imap_login_quoted(s):
    s.send(b't LOGIN "joe" "' + PASSWORD + b'"\r\n')


def imap_login_literal(s):
    s.send(b"t LOGIN joe {%d}\r\n" % len(PASSWORD))
    s.expect(CONTINUE_LITERAL)
    s.send(PASSWORD + b"\r\n")


def imap_login_literals(s):
    s.send(b"t LOGIN {3}\r\n")
    s.expect(CONTINUE_LITERAL)
    s.send(b"joe {%d}\r\n" % len(PASSWORD))
    s.expect(CONTINUE_LITERAL)
    s.send(PASSWORD + b"\r\n")


def imap_login_nonsync(s):
    s.send(b"t LOGIN joe {%d+}\r\n" % len(PASSWORD) + PASSWORD + b"\r\n")


def sasl_plain_initial(verb, cont):
    def run(s):
        response = b64(b"\0" + LOGIN + b"\0" + PASSWORD)
        s.send(verb + b" PLAIN " + response + b"\r\n", response)
    return run


def sasl_plain(verb, cont):
    def run(s):
        response = b64(b"joe\0" + LOGIN + b"\0" + PASSWORD)
        s.send(verb + b" PLAIN\r\n")
        s.expect(cont + b"\r\n")
        s.send(response + b"\r\n", response)
    return run


def sasl_login(verb, cont):
    def run(s):
        s.send(verb + b" LOGIN\r\n")
        s.expect(cont + USERNAME_CHALLENGE.encode() + b"\r\n")
        s.send(b64(LOGIN) + b"\r\n")
        s.expect(cont + PASSWORD_CHALLENGE.encode() + b"\r\n")
        s.send(b64(PASSWORD) + b"\r\n")
    return run


def sasl_login_initial(verb, cont):
    def run(s):
        s.send(verb + b" LOGIN " + b64(LOGIN) + b"\r\n")
        s.expect(cont + PASSWORD_CHALLENGE.encode() + b"\r\n")
        s.send(b64(PASSWORD) + b"\r\n")
    return run


def sasl_cram_md5(verb, cont):
    def run(s):
        s.send(verb + b" CRAM-MD5\r\n")
        challenge = s.line()
        assert challenge.startswith(cont)
        digest, response = cram_response(challenge)
        s.send(response + b"\r\n", digest)
        s.secrets.append(response)
    return run


def sasl_external_initial(verb, cont):
    def run(s):
        s.send(verb + b" EXTERNAL " + b64(LOGIN) + b"\r\n", b64(LOGIN))
    return run


def sasl_external(verb, cont):
    def run(s):
        s.send(verb + b" EXTERNAL\r\n")
        s.expect(cont + USERNAME_CHALLENGE.encode() + b"\r\n")
        s.send(b64(LOGIN) + b"\r\n", b64(LOGIN))
    return run


SASL = [sasl_plain_initial, sasl_plain, sasl_login, sasl_login_initial, sasl_cram_md5,
        sasl_external_initial, sasl_external]


def pop3_user_pass(s):
    s.send(b"USER joe\r\n")
    s.expect(b"+OK\r\n")
    s.send(b"PASS " + PASSWORD + b"\r\n")


def pop3_apop(s):
    salt = re.search(rb"<[^>]+>", s.greeting).group(0)
    digest = hashlib.md5(salt + PASSWORD).hexdigest().encode()
    s.send(b"APOP joe " + digest + b"\r\n", digest)


PROTOCOLS = {
    "imap": {
        "settings": "imap_auth plain login cram-md5 external;",
        "mechanisms": [imap_login_atom, imap_login_quoted, imap_login_literal,
                       imap_login_literals, imap_login_nonsync]
                      + [make(b"t AUTHENTICATE", b"+ ") for make in SASL],
        "before": [(b"a CAPABILITY\r\n", 2), (b"b NOOP\r\n", 1)],
        "shown": ["C: a CAPABILITY", "C: b NOOP", "S: b OK completed", "S: * OK IMAP4 ready",
                  "B: * OK backend ready", "P: t LOGIN {3}", f"P: joe {R}", f"P: {R}",
                  "S: t OK done"],
        "backend": [("send", b"* OK backend ready\r\n"), ("recv_line",),
                    ("send", b"+ go ahead\r\n"), ("recv_line",),
                    ("send", b"+ go ahead\r\n"), ("recv_line",),
                    ("send", b"t OK done\r\n"), ("echo",)],
        "success": b"t OK done\r\n",
        "after": b"u SELECT INBOX\r\n",
    },
    "pop3": {
        "settings": "pop3_auth plain apop cram-md5 external;",
        "mechanisms": [pop3_user_pass, pop3_apop] + [make(b"AUTH", b"+ ") for make in SASL],
        "before": [(b"NOOP\r\n", 1)],
        "shown": ["C: NOOP", "S: +OK", "B: +OK backend ready", "P: USER joe", f"P: PASS {R}",
                  "S: +OK logged in"],
        "backend": [("send", b"+OK backend ready\r\n"), ("recv_line",),
                    ("send", b"+OK\r\n"), ("recv_line",),
                    ("send", b"+OK logged in\r\n"), ("echo",)],
        "success": b"+OK logged in\r\n",
        "after": b"RETR 1\r\n",
    },
}
SMTP_SETTINGS = f"smtp_auth plain login cram-md5 external;\nserver_name {SERVER_NAME};"
SMTP_BACKENDS = {
    "xclient": ("", [("send", b"220 backend ESMTP\r\n"), ("recv_line",),
                     ("send", b"250-backend\r\n250 XCLIENT ADDR NAME LOGIN\r\n"),
                     ("recv_line",), ("send", b"220 backend ESMTP\r\n"), ("recv_line",),
                     ("send", b"250-backend\r\n250 8BITMIME\r\n"), ("echo",)],
                ["P: EHLO mx.test", "P: EHLO client.test"]),
    "plain": ("xclient off;\nproxy_smtp_auth plain;",
              [("send", b"220 backend ESMTP\r\n"), ("recv_line",),
               ("send", b"250-backend\r\n250 AUTH PLAIN LOGIN\r\n"), ("recv_line",),
               ("send", b"235 2.7.0 ok\r\n"), ("echo",)],
              [f"P: AUTH PLAIN {R}", "B: 235 2.7.0 ok"]),
    "login": ("xclient off;\nproxy_smtp_auth login;",
              [("send", b"220 backend ESMTP\r\n"), ("recv_line",),
               ("send", b"250-backend\r\n250 AUTH PLAIN LOGIN\r\n"), ("recv_line",),
               ("send", b"334 VXNlcm5hbWU6\r\n"), ("recv_line",),
               ("send", b"334 UGFzc3dvcmQ6\r\n"), ("recv_line",),
               ("send", b"235 2.7.0 ok\r\n"), ("echo",)],
              ["P: AUTH LOGIN", f"P: {R}", "B: 334 UGFzc3dvcmQ6", "B: 235 2.7.0 ok"]),
}


def auth_reply(backend_port):
    """OK to the backend; a password for the methods that carry none."""
    def answer(request):
        extra = {}
        if request.header("Auth-Method") in ("cram-md5", "apop", "external"):
            extra["Auth_Pass"] = BACKEND_PASSWORD.decode()
        return ok("127.0.0.1", backend_port, **extra)
    return answer


def all_secrets(sent):
    """Every text that would betray a password, as the log (UTF-8) shows it."""
    found = set()
    for secret in (PASSWORD, ATOM_PASSWORD, BACKEND_PASSWORD):
        found |= {secret, b64(secret), b64(secret).rstrip(b"=")}
        # what the proxy sends a backend for AUTH PLAIN
        plain = b64(b"\0" + LOGIN + b"\0" + secret)
        found |= {plain, plain.rstrip(b"=")}
    for item in sent:
        if item != b64(LOGIN):              # EXTERNAL's response is only the login
            found |= {item, item.rstrip(b"=")}
    found |= {trace.shown(item) .encode() for item in list(found)}
    return sorted({secret.decode("latin-1") for secret in found})


def run_mechanisms(tmp_path, protocol, mechanisms, settings, script, before, success,
                   after, greet):
    sent = []
    with ScriptedAuthService() as auth, ScriptedBackend(script) as backend:
        auth.reply = auth_reply(backend.port)
        proxy = RunningProxy(tmp_path, servers=(f"protocol {protocol};",), level="debug",
                             mail=f"auth_http {auth.url};\ntrace on;\n{settings}")
        try:
            for mechanism in mechanisms:
                session = Session(proxy.port)
                greet(session)
                for command, replies in before:
                    session.send(command)
                    for _ in range(replies):
                        session.line()
                mechanism(session)
                assert session.line() == success, mechanism.__name__
                session.send(after)
                assert session.line() == after          # the backend echoes
                session.conn.close()
                sent += session.secrets
            wait_until(lambda: proxy.log().count("session done:") == len(mechanisms))
        finally:
            proxy.stop()
        assert not backend.errors
    return proxy.log(), sent


def check_log(log, sent, shown, after, count):
    leaked = [secret for secret in all_secrets(sent) if secret in log]
    assert leaked == [], f"secrets in the log: {leaked}\n{log}"
    lines = re.findall(r"\*\d+ ([CSPB]: .*) while [^,]*, client: ", log)
    for text in shown:
        assert text in lines, f"{text!r} not traced:\n{log}"
    assert after.strip().decode() not in log                # the relay is not traced
    assert log.count("trace: relay done") == count


def greet_imap(session):
    session.expect(IMAP_GREETING)


def greet_pop3(session):
    session.greeting = session.line()
    assert session.greeting.startswith(b"+OK POP3 ready")


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_every_mechanism_traced_without_a_secret(tmp_path, protocol):
    case = PROTOCOLS[protocol]
    log, sent = run_mechanisms(tmp_path, protocol, case["mechanisms"], case["settings"],
                               case["backend"], case["before"], case["success"],
                               case["after"], greet_imap if protocol == "imap" else greet_pop3)
    check_log(log, sent, case["shown"], case["after"], len(case["mechanisms"]))
    if protocol == "imap":
        assert f"C: t LOGIN joe {R}" in log and f'C: t LOGIN "joe" {R}' in log
        assert f"C: t AUTHENTICATE PLAIN {R}" in log and "C: t AUTHENTICATE LOGIN" in log
    else:
        assert f"C: PASS {R}" in log and f"C: APOP joe {R}" in log


def greet_smtp(session):
    session.expect(f"220 {SERVER_NAME} ESMTP ready\r\n".encode())
    session.send(b"EHLO client.test\r\n")
    while session.line()[3:4] == b"-":
        pass


@pytest.mark.parametrize("backend_login", sorted(SMTP_BACKENDS))
def test_every_smtp_mechanism_traced_without_a_secret(tmp_path, backend_login):
    settings, script, shown = SMTP_BACKENDS[backend_login]
    mechanisms = [make(b"AUTH", b"334 ") for make in SASL]
    log, sent = run_mechanisms(tmp_path, "smtp", mechanisms, SMTP_SETTINGS + "\n" + settings,
                               script, [(b"NOOP\r\n", 1)], AUTH_OK, b"MAIL FROM:<a@b>\r\n",
                               greet_smtp)
    check_log(log, sent, shown + ["C: EHLO client.test", "C: NOOP", "S: 250 2.0.0 OK",
                                  f"C: AUTH PLAIN {R}", "C: AUTH LOGIN", "C: AUTH CRAM-MD5",
                                  "B: 220 backend ESMTP", "S: 235 2.0.0 OK"],
              b"MAIL FROM:<a@b>\r\n", len(mechanisms))
    if backend_login == "xclient":
        assert re.search(r"P: XCLIENT ADDR=127\.0\.0\.1 LOGIN=joe NAME=\S+ while", log)


def test_refused_logins_are_traced_without_a_secret(tmp_path):
    """The auth service says no: the trace ends with the refusal."""
    with ScriptedAuthService() as auth:
        auth.reply = {"Auth-Status": "Invalid login or password"}
        proxy = RunningProxy(tmp_path, level="debug",
                             mail=f"auth_http {auth.url};\ntrace on;\n"
                                  "imap_auth plain login cram-md5;")
        sent = []
        try:
            for make in SASL[:5]:
                session = Session(proxy.port)
                greet_imap(session)
                make(b"t AUTHENTICATE", b"+ ")(session)
                assert session.line() == b"t NO Invalid login or password\r\n"
                session.conn.close()
                sent += session.secrets
            wait_until(lambda: proxy.log().count("session done:") == 5)
        finally:
            proxy.stop()
    log = proxy.log()
    leaked = [secret for secret in all_secrets(sent) if secret in log]
    assert leaked == [], f"secrets in the log: {leaked}\n{log}"
    assert log.count("S: t NO Invalid login or password") == 5
    assert "trace: relay" not in log


# ---------------------------------------------------------------- selection

def traced_sessions(tmp_path, rule, logins):
    """One IMAP login per name in `logins` under `trace RULE`; the log."""
    tmp_path.mkdir(exist_ok=True)
    with ScriptedAuthService() as auth:
        auth.reply = {"Auth-Status": "Invalid login or password"}
        proxy = RunningProxy(tmp_path, level="info",
                             mail=f"auth_http {auth.url};\ntrace {rule};")
        try:
            for login in logins:
                session = Session(proxy.port)
                greet_imap(session)
                session.send(b"a CAPABILITY\r\n")
                session.conn.lines(2)
                session.send(b"t LOGIN " + login + b" " + ATOM_PASSWORD + b"\r\n")
                assert session.line().startswith(b"t NO")
                session.conn.close()
            wait_until(lambda: proxy.log().count("session done:") == len(logins))
        finally:
            proxy.stop()
    return proxy.log()


def traced_logins(log):
    return re.findall(r"C: t LOGIN (\S+) \*\*\* while", log)


def test_login_rule_traces_only_that_login_from_the_greeting_on(tmp_path):
    log = traced_sessions(tmp_path, "login:ann", [b"joe", b"ann", b"bob"])
    assert traced_logins(log) == ["ann"]
    assert log.count("S: * OK IMAP4 ready") == 1
    assert log.count("C: a CAPABILITY") == 1
    assert ATOM_PASSWORD.decode() not in log


def test_cidr_rule(tmp_path):
    log = traced_sessions(tmp_path / "in", "127.0.0.0/8", [b"joe", b"ann"])
    assert traced_logins(log) == ["joe", "ann"]
    log = traced_sessions(tmp_path / "out", "192.0.2.0/24 10.0.0.0/8", [b"joe"])
    assert traced_logins(log) == [] and "S: " not in log
    log = traced_sessions(tmp_path / "either", "192.0.2.0/24 login:ann", [b"joe", b"ann"])
    assert traced_logins(log) == ["ann"]


def test_trace_off_installs_nothing(tmp_path):
    log = traced_sessions(tmp_path, "off", [b"joe"])
    assert traced_logins(log) == [] and "S: " not in log


@pytest.mark.parametrize("value, error", [
    ("trace maybe;", 'invalid value "maybe", expected on, off, an address or CIDR, '
                     'or login:NAME in "trace" directive'),
    ("trace login:;", 'invalid value "login:"'),
    ("trace 10.0.0.0/33;", 'invalid value "10.0.0.0/33"'),
])
def test_trace_directive_errors(tmp_path, value, error):
    path = tmp_path / "mail.conf"
    path.write_text("mail {\n    auth_http 127.0.0.1:9/auth;\n"
                    f"    server {{ listen 127.0.0.1:{free_port()}; protocol imap;\n"
                    f"        {value}\n    }}\n}}\n")
    with pytest.raises(configmod.ConfigError) as info:
        configmod.load(str(path))
    assert str(info.value).startswith(error) and str(info.value).endswith(f"{path}:4")


def test_trace_directive_values(tmp_path):
    path = tmp_path / "mail.conf"
    path.write_text("mail {\n    auth_http 127.0.0.1:9/auth;\n    trace on;\n"
                    f"    server {{ listen 127.0.0.1:{free_port()}; protocol imap; }}\n"
                    f"    server {{ listen 127.0.0.1:{free_port()}; protocol imap;\n"
                    "        trace 192.0.2.1 10.0.0.0/8 login:joe; }\n"
                    f"    server {{ listen 127.0.0.1:{free_port()}; protocol imap;"
                    " trace off; }\n}\n")
    first, second, third = configmod.load(str(path)).servers
    assert first.trace == Rule(everyone=True)
    assert second.trace.logins == (b"joe",)
    assert [str(net) for net in second.trace.networks] == ["192.0.2.1/32", "10.0.0.0/8"]
    assert third.trace is None


# ---------------------------------------------------------------------- CLI

def write_conf(tmp_path, port, server="", level="info"):
    path = tmp_path / "mail.conf"
    path.write_text(f"error_log {tmp_path / 'error.log'} {level};\n"
                    f"pid {tmp_path / 'mailproxy.pid'};\n"
                    "mail {\n    auth_http 127.0.0.1:9/auth;\n"
                    f"    server {{ listen 127.0.0.1:{port}; protocol imap; {server} }}\n}}\n")
    return path


def test_trace_flag_shows_in_the_effective_configuration(tmp_path):
    path = write_conf(tmp_path, free_port(), server="trace off;")
    result = CliRunner().invoke(main, ["-T", "-c", str(path), "--trace"])
    assert result.exit_code == 0, result.output
    assert "        trace on;" in result.stdout.splitlines()
    result = CliRunner().invoke(main, ["-T", "-c", str(path)])
    assert "        trace off;" in result.stdout.splitlines()


def test_trace_flag_traces_a_real_process(tmp_path):
    """`python mailproxy.py -c FILE --trace` over a server that says `trace off`."""
    port = free_port()
    path = write_conf(tmp_path, port, server="trace off;")
    process = subprocess.Popen([sys.executable, "mailproxy.py", "-c", str(path), "--trace"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        client = wait_until(lambda: _connect(port), timeout=15)
        assert client, process.stderr.read1(4096) if process.poll() is not None else "no listener"
        with client:
            assert client.line() == IMAP_GREETING
            client.send(b"a CAPABILITY\r\n")
            client.lines(2)
            client.send(b"b LOGOUT\r\n")
            assert client.lines(2)[1] == b"b OK completed\r\n"
        log_path = tmp_path / "error.log"
        assert wait_until(lambda: "session done:" in log_path.read_text(), timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    log = (tmp_path / "error.log").read_text()
    for text in ("S: * OK IMAP4 ready", "C: a CAPABILITY", "C: b LOGOUT", "S: * BYE",
                 "S: b OK completed"):
        assert re.search(rf"\*\d+ {re.escape(text)} while ", log), (text, log)


def _connect(port):
    try:
        return Client(port)
    except OSError:
        time.sleep(0.05)
        return None
