"""No secret a parser accepts reaches a trace: adversarial tests (issue 16).

The trace redactor (mailproxy/ops/trace.py) shows what the session's parser
made of a line, with the arguments its verb's words.Secret marks hidden.
These tests try to make it show a secret anyway, over real loopback
sessions of one proxy with `trace on` at `debug`: every whitespace byte a
client might put between words (SP, TAB, VT, FF, runs of them), verbs in
any case, several commands in one send, commands the proxy refuses, and
SASL answers pipelined after an AUTH that a `starttls only` listener
refuses, and XOAUTH2/OAUTHBEARER tokens with the answer to the auth
service's Auth-Error-SASL challenge.  Each secret is a fresh random word;
none may appear anywhere in the log.  The first tests are the findings of issue 16 as reported; then
one hypothesis property per parser.

MAILPROXY_FUZZ_SCALE multiplies the examples (the long form; its figures
are in SECURITY.md).
"""

import base64
import os
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import ScriptedAuthService, fail
from harness import Client, RunningProxy, wait_until

pytest_plugins = ("certs",)     # certs: a small PKI, made once per run

SCALE = int(os.environ.get("MAILPROXY_FUZZ_SCALE", "1"))
EXAMPLES = 100                  # per parser, per run of the CI form (about 2 s each)
WHITESPACE = (b" ", b"\t", b"\x0b", b"\x0c")
BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
WORDLIKE = b"SecretAnswerWord"  # letters only: valid base64, and looks like a verb
MECHANISMS = (b"PLAIN", b"LOGIN", b"CRAM-MD5", b"EXTERNAL", b"plain", b"Login", b"XOAUTH2",
              b"OAUTHBEARER", b"xoauth2", b"SCRAM-SHA-1")
# The token strings (the secret is the bearer token); a second answer is
# the client's answer to the Auth-Error-SASL challenge.
OAUTH = {b"XOAUTH2": b"user=joe\x01auth=Bearer %s\x01\x01",
         b"OAUTHBEARER": b"n,a=joe,\x01host=mx.test\x01auth=Bearer %s\x01\x01"}
SASL_ERROR = "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0="   # what the auth service sends
# One listener per protocol, then the same with `starttls only` (AUTH refused).
LISTENERS = {"imap": 0, "pop3": 1, "smtp": 2}
GOODBYE = {"imap": b"z LOGOUT\r\n", "pop3": b"QUIT\r\n", "smtp": b"QUIT\r\n"}
METHODS = {"imap": "imap_auth plain login cram-md5 external xoauth2 oauthbearer;",
           "pop3": "pop3_auth plain apop cram-md5 external xoauth2 oauthbearer;",
           "smtp": "smtp_auth plain login cram-md5 external xoauth2 oauthbearer;"}


class TracedProxy:
    """One proxy, six listeners; `run` plays one session and returns its log lines."""

    def __init__(self, proxy):
        self.proxy, self.seen = proxy, 0     # bytes of the log already read

    def run(self, protocol, data, only=False, half_close=True):
        """Send `data` and the goodbye at once, then (with `half_close`) end
        the client's half; read to EOF; (the session's trace lines, the log
        it wrote).  A client that half-closes is gone for a session that
        then asks the auth service (differences.md, "Waits notice a client
        that hangs up"), so a session whose trace must show what follows
        the auth service's answer keeps its half open and ends by the
        goodbye."""
        port = self.proxy.ports[LISTENERS[protocol] + (3 if only else 0)]
        with Client(port) as client:
            client.line()
            client.send(data + GOODBYE[protocol])
            if half_close:
                client.sock.shutdown(socket.SHUT_WR)
            while not client.closed():
                pass
        assert wait_until(lambda: b"session done:" in self.new_log())
        log = self.new_log()
        self.seen += len(log)
        log = log.decode("utf-8", "replace")
        return re.findall(r"\*\d+ ([CSPB]: .*) while ", log), log

    def new_log(self):
        """What the log gained since the last session (sessions run one at a time)."""
        with open(self.proxy.log_path, "rb") as log:
            log.seek(self.seen)
            return log.read()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, certs):
    directory = tmp_path_factory.mktemp("traced")
    tls = f"ssl_certificate {certs.rsa.cert};\nssl_certificate_key {certs.rsa.key};"
    servers = [f"protocol {p}; {METHODS[p]}" for p in LISTENERS]
    servers += [f"protocol {p}; {METHODS[p]} starttls only;" for p in LISTENERS]
    with ScriptedAuthService() as auth:
        auth.reply = fail("Invalid login or password", Auth_Error_SASL=SASL_ERROR)
        proxy = RunningProxy(directory, servers=servers, level="debug",
                             mail=f"auth_http {auth.url};\ntrace on;\nserver_name mx.test;\n"
                                  f"{tls}")
        try:
            yield TracedProxy(proxy)
        finally:
            proxy.stop()


def assert_hidden(lines, log, secrets):
    assert any(line.startswith("C: ") for line in lines), f"no trace:\n{log}"
    assert not re.search("Traceback|unexpected error", log), log
    leaked = [secret for secret in secrets if secret.decode() in log]
    assert leaked == [], f"secrets in the log: {leaked}\n" + "\n".join(lines)


# ======================================================== what a trace shows

def b64(data):
    return base64.b64encode(data)


R = "***"
SHOWN = [
    ("imap", b"a CAPABILITY\r\n", ["a CAPABILITY"]),
    ("imap", b"a LOGIN joe secret\r\n", [f"a LOGIN joe {R}"]),
    ("imap", b'a login "joe" "sec ret"\r\n', [f'a login "joe" {R}']),
    ("imap", b'a LOGIN "jo\\"e x" "pw"\r\n', [f'a LOGIN "jo\\"e x" {R}']),
    ("imap", b"a LOGIN joe\r\n", [f"a LOGIN {R}"]),      # one word: it may hold a TAB and more
    ("imap", b"a LOGIN joe {6}\r\nsecret\r\n", [f"a LOGIN joe {R}"]),
    ("imap", b"a LOGIN joe {6+}\r\nsecret\r\n", [f"a LOGIN joe {R}"]),
    ("imap", b"a LOGIN {3}\r\njoe {6}\r\nsecret\r\n", [f"a LOGIN {{3}} {R}"]),
    ("imap", b"a AUTHENTICATE PLAIN " + b64(b"\0joe\0secret") + b"\r\n",
     [f"a AUTHENTICATE PLAIN {R}"]),
    ("imap", b"a AUTHENTICATE PLAIN\r\n" + b64(b"\0joe\0secret") + b"\r\n",
     ["a AUTHENTICATE PLAIN", R]),
    ("imap", b"a AUTHENTICATE LOGIN\r\n" + b64(b"joe") + b"\r\n" + b64(b"secret") + b"\r\n",
     ["a AUTHENTICATE LOGIN", R, R]),
    ("imap", b"a AUTHENTICATE PLAIN {12}\r\n" + b64(b"\0joe\0pw") + b"\r\n",
     [f"a AUTHENTICATE PLAIN {R}"]),
    ("imap", b"a NOOP {3}\r\nabc x\r\n", ["a NOOP {3} x"]),
    ("imap", b"x FOO\r\na\tNOOP\r\n", [R, R]),            # not commands the proxy knows
    ("imap", b"a LOGIN joe {99999}\r\n", [R]),             # refused: too long
    ("pop3", b"CAPA\r\nUSER joe\r\n", ["CAPA", "USER joe"]),
    ("pop3", b"PASS sec ret\r\npass x\r\nPASS\r\n", [f"PASS {R}", f"pass {R}", "PASS"]),
    ("pop3", b"APOP joe 0123456789abcdef0123456789abcdef\r\n", [f"APOP joe {R}"]),
    ("pop3", b"AUTH\r\nSTAT\r\n", ["AUTH", R]),
    ("pop3", b"AUTH PLAIN " + b64(b"\0joe\0pw") + b"\r\n", [f"AUTH PLAIN {R}"]),
    ("pop3", b"AUTH LOGIN\r\n" + b64(b"joe") + b"\r\n" + b64(b"pw") + b"\r\n",
     ["AUTH LOGIN", R, R]),
    ("pop3", b"AUTH CRAM-MD5\r\n" + b64(b"joe digest") + b"\r\n", ["AUTH CRAM-MD5", R]),
    ("smtp", b"EHLO client.test\r\nMAIL FROM:<a@b>\r\nDATA\r\nSubject: x\r\n",
     ["EHLO client.test", "MAIL FROM:<a@b>", "DATA", R]),      # a verb the proxy refuses
    ("smtp", b"AUTH\r\nAUTH PLAIN " + b64(b"\0joe\0pw") + b"\r\n", ["AUTH", f"AUTH PLAIN {R}"]),
    ("smtp", b"AUTH LOGIN " + b64(b"joe") + b"\r\n" + b64(b"pw") + b"\r\n",
     [f"AUTH LOGIN {R}", R]),
    ("smtp", b"AUTH PLAIN\r\n" + b64(b"\0joe\0pw") + b"\r\n", ["AUTH PLAIN", R]),
    ("imap", b"a AUTHENTICATE XOAUTH2 " + b64(OAUTH[b"XOAUTH2"] % b"tok") + b"\r\nAQ==\r\n",
     [f"a AUTHENTICATE XOAUTH2 {R}", R]),
    ("pop3", b"AUTH OAUTHBEARER\r\n" + b64(OAUTH[b"OAUTHBEARER"] % b"tok") + b"\r\n\r\n",
     ["AUTH OAUTHBEARER", R]),     # the empty answer: no line at all
    ("smtp", b"AUTH XOAUTH2 " + b64(OAUTH[b"XOAUTH2"] % b"tok") + b"\r\n*\r\n",
     [f"AUTH XOAUTH2 {R}", R]),
]


@pytest.mark.parametrize("protocol, data, expected", SHOWN)
def test_what_a_trace_shows_of_client_lines(traced, protocol, data, expected):
    """The parsed command, its secrets as ***; anything else as ***."""
    lines, _ = traced.run(protocol, data, half_close=False)
    shown = [line[3:] for line in lines if line.startswith("C: ")]
    assert shown[:len(expected)] == expected, lines


def test_the_auth_error_sasl_challenge_is_shown_and_its_answer_hidden(traced):
    lines, _ = traced.run("smtp", b"AUTH XOAUTH2 " + b64(OAUTH[b"XOAUTH2"] % b"tok")
                          + b"\r\nAQ==\r\n", half_close=False)
    assert lines[1:4] == [f"C: AUTH XOAUTH2 {R}", f"S: 334 {SASL_ERROR}", f"C: {R}"], lines


def test_a_literal_continuation_follows_its_command_in_the_trace(traced):
    """The line is shown once parsed, so the `+ OK` sent meanwhile waits."""
    lines, _ = traced.run("imap", b"a NOOP {3}\r\nabc\r\n")
    assert lines[1:3] == ["C: a NOOP {3}", "S: + OK"], lines


# ============================================================ the findings

TOKEN = base64.b64encode(b"\0joe\0Finding-0ne-Passw0rd")


@pytest.mark.parametrize("protocol, data, secret", [
    ("pop3", b"AUTH PLAIN\t" + TOKEN + b"\r\n", TOKEN),
    ("smtp", b"EHLO client.test\r\nAUTH PLAIN\t" + TOKEN + b"\r\n", TOKEN),
    ("pop3", b"APOP joe\t0123456789abcdef0123456789abcdef\r\n",
     b"0123456789abcdef0123456789abcdef"),
    ("imap", b"a LOGIN joe\tFinding-0ne-Passw0rd\r\n", b"Finding-0ne-Passw0rd"),
])
def test_whitespace_other_than_space_hides_the_secret(traced, protocol, data, secret):
    """Finding 1: the redactor split on SP while the POP3 and SMTP parsers
    split on any whitespace; now both use words.py (SP only, as nginx)."""
    lines, log = traced.run(protocol, data)
    assert_hidden(lines, log, [secret])


@pytest.mark.parametrize("protocol, auth", [("pop3", b"AUTH LOGIN\r\n"),
                                            ("smtp", b"EHLO client.test\r\nAUTH LOGIN\r\n"),
                                            ("imap", b"a AUTHENTICATE LOGIN\r\n")])
def test_answers_pipelined_after_a_refused_auth_are_hidden(traced, protocol, auth):
    """Finding 1: `starttls only` refuses the AUTH; the answers the client
    already sent arrive as commands, one of them shaped like a word."""
    data = auth + WORDLIKE + b"\r\n" + b"NOOP\r\n"
    lines, log = traced.run(protocol, data, only=True)
    assert_hidden(lines, log, [WORDLIKE])
    assert "C: ***" in lines


def test_a_pipelined_answer_that_spells_a_verb_is_hidden(traced):
    """`NOOP` is valid base64: right after a refused AUTH it may be an answer."""
    lines, _ = traced.run("smtp", b"EHLO c\r\nAUTH PLAIN\r\nNOOP\r\nNOOP x\r\n", only=True)
    assert lines.count("C: ***") == 1 and "C: NOOP x" in lines


# =================================================== one property per parser

def separators():
    return st.lists(st.sampled_from(WHITESPACE), min_size=1, max_size=3).map(b"".join)


def any_case(word):
    """`word` with each letter in either case."""
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda upper: "".join(c.upper() if u else c.lower()
                              for c, u in zip(word.decode(), upper)).encode())


secrets = st.text(alphabet=BASE64, min_size=16, max_size=40).map(str.encode)


@st.composite
def sasl_commands(draw, verb):
    """AUTH/AUTHENTICATE with an initial response, or its answers on the next lines."""
    sep = separators()
    mechanism = draw(st.sampled_from(MECHANISMS))
    answers = draw(st.lists(secrets, min_size=1, max_size=2))
    hidden = list(answers)
    if mechanism.upper() in OAUTH and draw(st.booleans()):     # a well-formed token
        answers[0] = b64(OAUTH[mechanism.upper()] % answers[0])
        hidden.append(answers[0])
    if draw(st.booleans()):
        text = draw(verb) + draw(sep) + mechanism + draw(sep) + answers[0] + b"\r\n"
        text += b"".join(answer + b"\r\n" for answer in answers[1:])
    else:
        text = draw(verb) + draw(sep) + mechanism + b"\r\n" \
            + b"".join(answer + b"\r\n" for answer in answers)
    return text, hidden


@st.composite
def pop3_commands(draw):
    secret = draw(secrets)
    form = draw(st.sampled_from(["pass", "user-pass", "apop", "sasl"]))
    if form == "sasl":
        return draw(sasl_commands(any_case(b"AUTH")))
    if form == "apop":
        return draw(any_case(b"APOP")) + draw(separators()) + b"joe" + draw(separators()) \
            + secret + b"\r\n", [secret]
    text = draw(any_case(b"PASS")) + draw(separators()) + secret + b"\r\n"
    return (b"USER joe\r\n" + text if form == "user-pass" else text), [secret]


@st.composite
def smtp_commands(draw):
    return draw(sasl_commands(any_case(b"AUTH")))


@st.composite
def imap_commands(draw):
    secret = draw(secrets)
    tag = draw(st.sampled_from([b"a", b"A1", b"t.2"])) + draw(separators())
    form = draw(st.sampled_from(["atom", "quoted", "literal", "non-sync", "sasl"]))
    if form == "sasl":
        text, answers = draw(sasl_commands(any_case(b"AUTHENTICATE")))
        return tag + text, answers
    login = tag + draw(any_case(b"LOGIN")) + draw(separators()) + b"joe" + draw(separators())
    password = {"atom": secret + b"\r\n", "quoted": b'"' + secret + b'"\r\n',
                "literal": b"{%d}\r\n" % len(secret) + secret + b"\r\n",
                "non-sync": b"{%d+}\r\n" % len(secret) + secret + b"\r\n"}[form]
    return login + password, [secret]


def pipelined(commands, harmless):
    """One to three secret-bearing commands, harmless ones around them, in one send."""
    return st.lists(st.tuples(st.sampled_from(harmless), commands), min_size=1, max_size=3)


def play(traced, protocol, batch, only):
    """Send the batch in one go; no secret of it may reach the log."""
    data, secrets_sent = b"", []
    for harmless, (text, secrets_) in batch:
        data += harmless + text
        secrets_sent += secrets_
    lines, log = traced.run(protocol, data, only)
    assert_hidden(lines, log, secrets_sent)


def examples():
    return settings(max_examples=EXAMPLES * SCALE, deadline=None, database=None)


@examples()
@given(batch=pipelined(pop3_commands(), [b"", b"CAPA\r\n", b"NOOP\r\n", b"STAT\r\n"]),
       only=st.booleans())
def test_pop3_trace_hides_every_secret_the_parser_accepts(traced, batch, only):
    play(traced, "pop3", batch, only)


@examples()
@given(batch=pipelined(smtp_commands(), [b"", b"NOOP\r\n", b"EHLO c.test\r\n", b"DATA\r\n"]),
       only=st.booleans())
def test_smtp_trace_hides_every_secret_the_parser_accepts(traced, batch, only):
    play(traced, "smtp", batch, only)


@examples()
@given(batch=pipelined(imap_commands(), [b"", b"n NOOP\r\n", b"c CAPABILITY\r\n",
                                         b"x FOO\r\n"]),
       only=st.booleans())
def test_imap_trace_hides_every_secret_the_parser_accepts(traced, batch, only):
    play(traced, "imap", batch, only)
