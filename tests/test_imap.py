"""The IMAP front end as a client hears it: transcripts over loopback.

Each test starts a proxy with exactly the settings it needs, connects a
client, and checks the proxy's lines byte for byte (spec 3.0 and 3.1).  The
texts come from mailproxy.imap and mailproxy.sasl, not retyped; the
CAPABILITY lines are the spec's own composition.  Credentials that reach
the end of a dialogue are checked where they land: in the request the
scripted auth service records.
"""

import base64
import hashlib
import hmac
import re
import socket
import time

import pytest

import fakes
from fakes import ScriptedAuthService
from harness import RunningProxy, free_port
from imap_client import assert_serving, greeted, ok
from mailproxy.imap import BYE, CONTINUE_LITERAL, GREETING, ID_REPLY, INTERNAL_ERROR, INVALID
from mailproxy.sasl import PASSWORD_CHALLENGE, USERNAME_CHALLENGE
from transcript import b64

DEFAULT_CAPABILITY = b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n"
SERVER_NAME = "mx.test"


def bad(tag=b"*"):
    return tag + b" " + INVALID + b"\r\n"


@pytest.fixture
def start(tmp_path):
    """start(settings, auth=URL) -> a RunningProxy serving IMAP with those
    `mail {}` settings; every proxy started is stopped after the test."""
    started = []

    def start(settings="", auth=None):
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        auth = auth or f"127.0.0.1:{free_port()}/auth"      # nobody listens there
        mail = f"server_name {SERVER_NAME};\nauth_http {auth};\n{settings}"
        proxy = RunningProxy(directory, mail=mail)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def auth():
    """The auth service; it refuses every login unless a test says otherwise."""
    with ScriptedAuthService(fakes.fail("Invalid login or password")) as service:
        yield service


def asked(auth):
    """(Auth-Method, Auth-User, Auth-Pass) of the one request the auth
    service got: what the proxy understood of the client's credentials."""
    [request] = auth.wait_requests(1)
    return tuple(request.header(name) for name in ("Auth-Method", "Auth-User", "Auth-Pass"))


def refused(client, tag=b"a"):
    """The auth service's refusal reaches the client, then the end."""
    assert client.line() == tag + b" NO Invalid login or password\r\n"
    assert client.closed()


# -------------------------------------------------------------- greeting

def test_greeting_is_the_fixed_text(start):
    proxy = start()
    with proxy.client() as client:
        assert client.line() == b"* OK IMAP4 ready\r\n" == GREETING


# ------------------------------------------------------------ CAPABILITY

def test_capability_default(start):
    with greeted(start()) as client:
        client.send(b"a CAPABILITY\r\n")
        assert client.lines(2) == [DEFAULT_CAPABILITY, ok(b"a")]


@pytest.mark.parametrize("methods, tokens", [
    ("plain", b"AUTH=PLAIN"),
    ("login", b"AUTH=LOGIN"),
    ("external cram-md5 login plain", b"AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5 AUTH=EXTERNAL"),
    ("cram-md5 plain", b"AUTH=PLAIN AUTH=CRAM-MD5"),
])
def test_capability_lists_imap_auth_methods_in_fixed_order(start, methods, tokens):
    with greeted(start(f"imap_auth {methods};")) as client:
        client.send(b"a CAPABILITY\r\n")
        assert client.lines(2) == [b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS " + tokens + b"\r\n",
                                   ok(b"a")]


def test_capability_custom_list_repeated_directive_appends(start):
    proxy = start("imap_capabilities IMAP4rev1 IDLE;\nimap_capabilities NAMESPACE;")
    with greeted(proxy) as client:
        client.send(b"a1 capability\r\n")
        assert client.lines(2) == [b"* CAPABILITY IMAP4rev1 IDLE NAMESPACE AUTH=PLAIN\r\n",
                                   ok(b"a1")]


# ----------------------------------------------------- NOOP, LOGOUT, ID

def test_noop_any_case(start):
    with greeted(start()) as client:
        client.send(b"a NOOP\r\n")
        assert client.line() == ok(b"a")
        client.send(b"b noop\r\n")
        assert client.line() == ok(b"b")


def test_logout_says_bye_then_closes(start):
    proxy = start()
    with greeted(proxy) as client:
        client.send(b"a LOGOUT\r\n")
        assert client.lines(2) == [BYE, ok(b"a")]
        assert client.closed()
    assert_serving(proxy)


def test_id_before_login_answers_nil(start):
    with greeted(start()) as client:
        for argument in (b' ("name" "OfflineIMAP" "version" "8.0")', b" NIL", b""):
            client.send(b"a ID" + argument + b"\r\n")
            assert client.lines(2) == [ID_REPLY, ok(b"a")], argument


def test_id_is_not_counted_toward_max_errors(start):
    with greeted(start("max_errors 1;")) as client:
        for tag in (b"a", b"b", b"c"):
            client.send(tag + b' ID ("name" "x")\r\n')
            assert client.lines(2) == [ID_REPLY, ok(tag)]
        client.send(b"d NOOP\r\n")
        assert client.line() == ok(b"d")


def test_id_ending_in_a_literal_is_refused(start):
    with greeted(start()) as client:
        client.send(b'a ID ("name" {3}\r\n')
        assert client.line() == bad(b"a")
        client.send(b"b NOOP\r\n")
        assert client.line() == ok(b"b")


# ------------------------------------------------------------------ tags

def test_tag_of_32_characters_from_the_allowed_set(start):
    tag = b"Az09._-" + b"x" * 25
    with greeted(start()) as client:
        client.send(tag + b" NOOP\r\n")
        assert client.line() == ok(tag)


BAD_TAGS = [
    b"x" * 33 + b" NOOP\r\n",       # 33 characters
    b"a+b NOOP\r\n",                # a character outside [A-Za-z0-9._-]
    b"a*b NOOP\r\n",
    b"a\tNOOP\r\n",
    b"\r\n",                        # empty line
    b"\n",
    b"NOOP\r\n",                    # no tag at all
    b" NOOP\r\n",
]


def test_bad_tag_gets_untagged_bad(start):
    proxy = start()
    for line in BAD_TAGS:
        with greeted(proxy) as client:
            client.send(line)
            assert client.line() == bad(b"*"), line
            client.send(b"b NOOP\r\n")
            assert client.line() == ok(b"b")


def test_bad_tag_is_counted(start):
    with greeted(start("max_errors 2;")) as client:
        client.send(b"\r\n")
        assert client.line() == bad(b"*")
        client.send(b"a+ NOOP\r\n")
        assert client.line() == bad(b"*")
        assert client.closed()


# ------------------------------------------------ invalid commands, errors

UNKNOWN_COMMANDS = [b"a SELECT INBOX\r\n", b"a ENABLE UTF8=ACCEPT\r\n",
                    b"a COMPRESS DEFLATE\r\n", b"a STARTTLS\r\n",  # starttls is off
                    b"a XOAUTH2\r\n", b"a NO-OP\r\n", b"a NOOP1\r\n", b"a NOOP(\r\n"]


def test_unknown_command_is_tagged_bad(start):
    proxy = start()
    for line in UNKNOWN_COMMANDS:
        with greeted(proxy) as client:
            client.send(line)
            assert client.line() == bad(b"a"), line
            client.send(b"b NOOP\r\n")
            assert client.line() == ok(b"b")


def test_max_errors_closes_after_the_last_bad(start):
    proxy = start("max_errors 2;")
    with greeted(proxy) as client:
        client.send(b"a SELECT INBOX\r\n")
        assert client.line() == bad(b"a")
        client.send(b"b NOOP\r\n")
        assert client.line() == ok(b"b")
        client.send(b"c SELECT INBOX\r\n")
        assert client.line() == bad(b"c")
        assert client.closed()
    proxy.wait_log("client sent too many invalid commands")
    assert_serving(proxy)


def test_max_errors_default_is_five(start):
    with greeted(start()) as client:
        for number in range(5):
            client.send(b"t%d EXAMINE INBOX\r\n" % number)
            assert client.line() == bad(b"t%d" % number)
        assert client.closed()


REFUSED_AFTER_PARSING = [
    b"a LOGIN joe\r\n",             # one argument
    b"a LOGIN\r\n",                 # none
    b"a LOGIN joe secret extra\r\n",    # three: the parser allows it, LOGIN does not
    b'a LOGIN "" secret\r\n',       # an empty user
    b"a LOGIN {0}\r\n",             # an empty user, as a literal
    b"a AUTHENTICATE\r\n",
    b"a AUTHENTICATE PLAIN x y\r\n",
    b"a AUTHENTICATE XOAUTH2 dG9rZW4=\r\n",     # a mechanism that does not exist
    b"a AUTHENTICATE GSSAPI\r\n",
    b"a AUTHENTICATE CRAM-MD5\r\n",  # not enabled by default
    b"a AUTHENTICATE EXTERNAL\r\n",
]


def test_refusals_after_parsing_are_not_counted(start):
    """With max_errors 1, one counted error would close the session."""
    with greeted(start("max_errors 1;")) as client:
        for line in REFUSED_AFTER_PARSING:
            client.send(line)
            if line.endswith(b"{0}\r\n"):
                assert client.line() == CONTINUE_LITERAL
                client.send(b"\r\n")
            assert client.line() == bad(b"a"), line
        client.send(b"b NOOP\r\n")
        assert client.line() == ok(b"b")


def test_four_arguments_are_a_counted_parser_error(start):
    proxy = start("max_errors 1;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret x y\r\n")
        assert client.line() == bad(b"a")
        assert client.closed()
    assert_serving(proxy)


BARE_CR = [
    b"a NO\rOP\r\n",                # a CR inside the keyword
    b"a LOGIN jo\re secret\r\n",    # a CR inside an argument
    b"a NOOP\r\r\n",
]


def test_bare_cr_makes_the_command_invalid(start):
    proxy = start("max_errors 2;")
    for line in BARE_CR:
        with greeted(proxy) as client:
            client.send(line)
            assert client.line() == bad(b"a"), line
            client.send(b"b NOOP\r\n")
            assert client.line() == ok(b"b")
            client.send(line)
            assert client.line() == bad(b"a")
            assert client.closed()       # counted: the second one reaches max_errors 2


def test_line_ending_in_lf_alone_is_accepted(start):
    with greeted(start()) as client:
        client.send(b"a NOOP\n")
        assert client.line() == ok(b"a")


BAD_ARGUMENTS = [
    b'a LOGIN "joe secret\r\n',     # unterminated quoted string
    b'a LOGIN "joe\\\r\n',          # a backslash right before the line end
    b'a LOGIN "joe"x secret\r\n',   # no SP after the closing quote
    b"a LOGIN {3x}\r\n",            # bad literal syntax
    b"a LOGIN {}\r\n",
    b"a LOGIN {-1}\r\n",
    b"a LOGIN {3} secret\r\n",      # a literal must end the line
]


def test_bad_argument_syntax_is_a_counted_error(start):
    proxy = start("max_errors 1;")
    for line in BAD_ARGUMENTS:
        with greeted(proxy) as client:
            client.send(line)
            assert client.line() == bad(b"a"), line
            assert client.closed()


def test_pipelined_commands_are_answered_in_order(start):
    proxy = start()
    with greeted(proxy) as client:
        client.send(b"a NOOP\r\nb CAPABILITY\r\nc SELECT INBOX\r\nd ID NIL\r\ne LOGOUT\r\n")
        assert client.lines(7) == [ok(b"a"), DEFAULT_CAPABILITY, ok(b"b"), bad(b"c"),
                                   ID_REPLY, ok(b"d"), BYE]
        assert client.line() == ok(b"e")
        assert client.closed()


# ---------------------------------------------------- LOGIN's arguments

def test_login_with_atoms(start, auth):
    with greeted(start(auth=auth.url)) as client:
        client.send(b"a LOGIN joe secret\r\n")
        refused(client)
    assert asked(auth) == ("plain", "joe", "secret")


def test_login_with_quoted_strings_and_escapes(start, auth):
    with greeted(start(auth=auth.url)) as client:
        client.send(b'a LOGIN "jo e" "p\\"w\\\\d\\x"\r\n')
        refused(client)
    assert asked(auth) == ("plain", "jo%20e", 'p"w\\dx')


def test_atoms_keep_quotes_and_backslashes_inside(start, auth):
    with greeted(start(auth=auth.url)) as client:
        client.send(b'a LOGIN jo"e p\\w\r\n')
        refused(client)
    assert asked(auth) == ("plain", 'jo"e', "p\\w")


def test_login_with_synchronizing_literals(start, auth):
    with greeted(start(auth=auth.url)) as client:
        client.send(b"a LOGIN {3}\r\n")
        assert client.line() == CONTINUE_LITERAL
        client.send(b"joe {6}\r\n")
        assert client.line() == CONTINUE_LITERAL
        client.send(b"secret\r\n")
        refused(client)
    assert asked(auth) == ("plain", "joe", "secret")


def test_login_with_non_synchronizing_literals_in_one_send(start, auth):
    with greeted(start(auth=auth.url)) as client:
        client.send(b"a LOGIN {3+}\r\njoe {8+}\r\nse\r\ncr t\r\n")
        refused(client)         # no "+ OK" came first
    assert asked(auth) == ("plain", "joe", "se%0D%0Acr%20t")


def test_zero_length_literal_is_an_empty_string(start, auth):
    """RFC 3501 behaviour, not nginx's quirk of taking the next byte."""
    with greeted(start(auth=auth.url)) as client:
        client.send(b"a LOGIN joe {0}\r\n")
        assert client.line() == CONTINUE_LITERAL
        client.send(b"\r\n")
        refused(client)
    assert asked(auth) == ("plain", "joe", "")


# ---------------------------------------------------------------- literals

def test_synchronizing_literal_gets_a_continuation(start):
    with greeted(start()) as client:
        client.send(b"a NOOP {3}\r\n")
        assert client.line() == CONTINUE_LITERAL
        client.send(b"abc\r\n")
        assert client.line() == ok(b"a")


def test_non_synchronizing_literal_gets_none(start):
    with greeted(start()) as client:
        client.send(b"a NOOP {3+}\r\nabc\r\nb NOOP\r\n")
        assert client.lines(2) == [ok(b"a"), ok(b"b")]


def test_literal_may_hold_crlf_and_be_followed_by_more_arguments(start):
    with greeted(start()) as client:
        client.send(b"a NOOP {4+}\r\na\r\nb x\r\nb NOOP\r\n")
        assert client.lines(2) == [ok(b"a"), ok(b"b")]


def test_after_a_literal_only_sp_or_line_end_may_follow(start):
    with greeted(start()) as client:
        client.send(b"a NOOP {3}\r\n")
        assert client.line() == CONTINUE_LITERAL
        client.send(b"abcx\r\n")
        assert client.line() == bad(b"a")
        client.send(b"b NOOP\r\n")
        assert client.line() == ok(b"b")


def test_literal_larger_than_the_client_buffer_is_refused_then_closed(start):
    proxy = start("imap_client_buffer 1k;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN {2000}\r\n")
        assert client.line() == bad(b"a")
        assert client.closed()
    proxy.wait_log("client sent too long command")
    assert_serving(proxy)


def test_literal_must_fit_with_the_rest_of_the_command(start):
    """One whole command, literals included, must fit the buffer: two
    literals of 600 bytes do not fit in 1k although each one would."""
    with greeted(start("imap_client_buffer 1k;")) as client:
        client.send(b"a LOGIN {600}\r\n")
        assert client.line() == CONTINUE_LITERAL
        client.send(b"u" * 600 + b" {600}\r\n")
        assert client.line() == bad(b"a")
        assert client.closed()


def test_overlong_line_is_refused_then_closed(start):
    proxy = start("imap_client_buffer 1k;")
    with greeted(proxy) as client:
        client.send(b"a LOGIN " + b"x" * (1024 - 8))    # the buffer's worth, no line end
        assert client.line() == bad(b"a")
        assert client.closed()
    with greeted(proxy) as client:
        client.send(b"y" * 1024)
        assert client.line() == bad(b"*")
        assert client.closed()
    assert_serving(proxy)


def test_overlong_line_after_a_literal_is_answered_with_the_command_tag(start):
    """The bytes after a literal are the client's data (maybe a password),
    never a tag to echo back."""
    with greeted(start("imap_client_buffer 1k;")) as client:
        client.send(b"a LOGIN joe {6}\r\n")
        assert client.line() == CONTINUE_LITERAL
        client.send(b"secret" + b"xevil " + b"y" * (1024 - 17 - 6 - 6))    # fills the buffer
        assert client.line() == bad(b"a")
        assert client.closed()


def test_overlong_sasl_line_is_answered_with_the_authenticate_tag(start):
    with greeted(start("imap_client_buffer 1k;")) as client:
        client.send(b"a AUTHENTICATE PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        client.send(b"dXNlcg " + b"y" * (1024 - 7))
        assert client.line() == bad(b"a")
        assert client.closed()


NON_SYNC_INVALID = [
    b"a FOO {3+}\r\n",              # an unknown command
    b"a LOGIN a b c {3+}\r\n",      # a fourth argument
    b'a LOGIN "joe {3+}\r\n',       # an unterminated quoted string
    b"a+ LOGIN {3+}\r\n",           # a bad tag
    b'a ID ("name" {3+}\r\n',       # ID with a literal
]


def test_invalid_command_with_a_non_synchronizing_literal_closes(start):
    """Spec 3.1's security rule: the literal's bytes would run as commands,
    so even with max_errors to spare the session ends."""
    proxy = start("max_errors 100;")
    for line in NON_SYNC_INVALID:
        with greeted(proxy) as client:
            client.send(line)
            assert client.line() == bad(b"*" if line.startswith(b"a+") else b"a"), line
            assert client.closed()
    assert_serving(proxy)


def test_invalid_command_with_a_synchronizing_literal_goes_on(start):
    with greeted(start()) as client:
        client.send(b"a FOO {3}\r\n")
        assert client.line() == bad(b"a")
        client.send(b"b NOOP\r\n")
        assert client.line() == ok(b"b")


# ---------------------------------------------------------- SASL dialogue

def test_authenticate_plain_without_initial_response_sends_empty_challenge(start):
    with greeted(start()) as client:
        client.send(b"a AUTHENTICATE PLAIN\r\n")
        assert client.line() == b"+ \r\n"


def test_authenticate_login_asks_username_then_password(start):
    with greeted(start()) as client:
        client.send(b"a AUTHENTICATE LOGIN\r\n")
        assert client.line() == b"+ " + USERNAME_CHALLENGE.encode() + b"\r\n"
        client.send(b64(b"joe") + b"\r\n")
        assert client.line() == b"+ " + PASSWORD_CHALLENGE.encode() + b"\r\n"


def test_authenticate_login_with_initial_response_asks_password_only(start):
    with greeted(start()) as client:
        client.send(b"a AUTHENTICATE LOGIN " + b64(b"joe") + b"\r\n")
        assert client.line() == b"+ " + PASSWORD_CHALLENGE.encode() + b"\r\n"


def test_authenticate_plain_with_initial_response(start, auth):
    with greeted(start(auth=auth.url)) as client:
        client.send(b"a AUTHENTICATE PLAIN " + b64(b"admin\0joe\0secret") + b"\r\n")
        refused(client)
    assert asked(auth) == ("plain", "joe", "secret")      # the authzid is dropped


def test_authenticate_plain_after_the_challenge(start, auth):
    with greeted(start(auth=auth.url)) as client:
        client.send(b"a AUTHENTICATE PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        client.send(b64(b"\0joe\0secret") + b"\r\n")
        refused(client)
    assert asked(auth) == ("plain", "joe", "secret")


def test_authenticate_login_in_two_steps(start, auth):
    with greeted(start(auth=auth.url)) as client:
        client.send(b"a AUTHENTICATE LOGIN\r\n")
        assert client.line() == b"+ " + USERNAME_CHALLENGE.encode() + b"\r\n"
        client.send(b64(b"joe") + b"\r\n")
        assert client.line() == b"+ " + PASSWORD_CHALLENGE.encode() + b"\r\n"
        client.send(b64(b"secret") + b"\r\n")
        refused(client)
    assert asked(auth) == ("plain", "joe", "secret")     # LOGIN is "plain" to the service


def test_authenticate_login_with_initial_response(start, auth):
    with greeted(start(auth=auth.url)) as client:
        client.send(b"a AUTHENTICATE LOGIN " + b64(b"joe") + b"\r\n")
        assert client.line() == b"+ " + PASSWORD_CHALLENGE.encode() + b"\r\n"
        client.send(b64(b"secret") + b"\r\n")
        refused(client)
    assert asked(auth) == ("plain", "joe", "secret")


def test_authenticate_cram_md5(start, auth):
    with greeted(start("imap_auth cram-md5;", auth=auth.url)) as client:
        client.send(b"a AUTHENTICATE CRAM-MD5\r\n")
        salt = base64.b64decode(client.line()[2:-2])
        digest = hmac.new(b"secret", salt, hashlib.md5).hexdigest().encode()
        client.send(b64(b"joe " + digest) + b"\r\n")
        refused(client)
    assert asked(auth) == ("cram-md5", "joe", digest.decode())
    assert auth.requests[0].header("Auth-Salt") == salt.decode()


@pytest.mark.parametrize("initial", [False, True])
def test_authenticate_external(start, auth, initial):
    with greeted(start("imap_auth external;", auth=auth.url)) as client:
        if initial:
            client.send(b"a AUTHENTICATE EXTERNAL " + b64(b"joe") + b"\r\n")
        else:
            client.send(b"a AUTHENTICATE EXTERNAL\r\n")
            assert client.line() == b"+ " + USERNAME_CHALLENGE.encode() + b"\r\n"
            client.send(b64(b"joe") + b"\r\n")
        refused(client)
    assert asked(auth) == ("external", "joe", "")


def test_authenticate_plain_and_login_are_accepted_when_not_listed(start):
    proxy = start("imap_auth cram-md5;")
    for mechanism in (b"PLAIN", b"plain", b"LOGIN"):
        with greeted(proxy) as client:
            client.send(b"a AUTHENTICATE " + mechanism + b"\r\n")
            assert client.line().startswith(b"+ "), mechanism


def test_cram_md5_challenge_is_the_base64_salt(start):
    with greeted(start("imap_auth cram-md5;")) as client:
        client.send(b"a AUTHENTICATE CRAM-MD5\r\n")
        line = client.line()
        assert line.startswith(b"+ ") and line.endswith(b"\r\n")
        salt = base64.b64decode(line[2:-2])
        assert re.fullmatch(rb"<\d+\.\d+@mx\.test>", salt)


def test_cram_md5_with_an_initial_response_is_refused(start):
    with greeted(start("imap_auth cram-md5;")) as client:
        client.send(b"a AUTHENTICATE CRAM-MD5 " + b64(b"joe " + b"0" * 32) + b"\r\n")
        assert client.line() == bad(b"a")
        client.send(b"b NOOP\r\n")
        assert client.line() == ok(b"b")


def test_external_asks_username_when_enabled(start):
    with greeted(start("imap_auth external;")) as client:
        client.send(b"a AUTHENTICATE EXTERNAL\r\n")
        assert client.line() == b"+ " + USERNAME_CHALLENGE.encode() + b"\r\n"


SASL_STEPS = [                      # (mechanism, good lines before the bad one)
    (b"PLAIN", 0),
    (b"LOGIN", 0),                  # the username step: tagged here, untagged in nginx
    (b"LOGIN", 1),                  # the password step
    (b"CRAM-MD5", 0),
    (b"EXTERNAL", 0),
]
BAD_BASE64 = [b"!!!!", b"*", b"dXNlc", b"a", b"d XNl"]   # "*" (cancel) is just bad base64


def test_bad_base64_is_tagged_bad_and_back_to_start(start):
    """Not counted either: max_errors 1, one client throughout."""
    proxy = start("imap_auth plain cram-md5 external;\nmax_errors 1;")
    with greeted(proxy) as client:
        for mechanism, steps in SASL_STEPS:
            for answer in BAD_BASE64:
                client.send(b"a AUTHENTICATE " + mechanism + b"\r\n")
                assert client.line().startswith(b"+ ")
                for _ in range(steps):
                    client.send(b64(b"joe") + b"\r\n")
                    assert client.line().startswith(b"+ ")
                client.send(answer + b"\r\n")
                assert client.line() == bad(b"a"), (mechanism, steps, answer)
                client.send(b"b NOOP\r\n")
                assert client.line() == ok(b"b")


def test_plain_needs_exactly_two_nuls(start):
    with greeted(start()) as client:
        for response in (b"joe\0secret", b"\0joe\0secret\0", b"joe"):
            client.send(b"a AUTHENTICATE PLAIN " + b64(response) + b"\r\n")
            assert client.line() == bad(b"a"), response
        client.send(b"b NOOP\r\n")
        assert client.line() == ok(b"b")


def test_cram_md5_digest_must_be_32_characters(start):
    with greeted(start("imap_auth cram-md5;")) as client:
        client.send(b"a AUTHENTICATE CRAM-MD5\r\n")
        assert client.line().startswith(b"+ ")
        client.send(b64(b"joe " + b"0" * 31) + b"\r\n")
        assert client.line() == bad(b"a")


# ------------------------------------------------ timeout and client EOF

def test_idle_client_is_closed_silently_after_timeout(start):
    proxy = start("timeout 500ms;")
    with greeted(proxy) as client:
        began = time.monotonic()
        assert client.closed()
        assert 0.4 < time.monotonic() - began < 3
    proxy.wait_log("client timed out")
    assert_serving(proxy)


def test_timeout_is_one_deadline_for_the_whole_dialogue(start):
    """Commands do not re-arm it (spec 3.0): a chatty client still goes."""
    proxy = start("timeout 1s;")
    with greeted(proxy) as client:
        began = time.monotonic()
        answered = 0
        while time.monotonic() - began < 3:
            try:
                client.send(b"a NOOP\r\n")
                line = client.line()
            except OSError:         # a reset: the proxy had closed already
                line = b""
            if line != ok(b"a"):
                break
            answered += 1
            time.sleep(0.2)
        assert answered >= 3
        assert line == b""
        assert time.monotonic() - began < 1.8


def test_timeout_covers_a_slow_literal(start):
    with greeted(start("timeout 500ms;")) as client:
        client.send(b"a LOGIN {10}\r\n")
        assert client.line() == CONTINUE_LITERAL
        client.send(b"abc")
        assert client.closed()


def test_client_eof_mid_command_ends_the_session_without_reply(start):
    proxy = start()
    for partial in (b"a NOO", b"a LOGIN {10}\r\nabc", b"a LOGIN joe"):
        with greeted(proxy) as client:
            client.send(partial)
            if b"{" in partial:
                assert client.line() == CONTINUE_LITERAL
            client.sock.shutdown(socket.SHUT_WR)
            assert client.closed(), partial
    assert proxy.log().count("client closed connection") == 3
    assert_serving(proxy)


def test_client_eof_in_a_sasl_step(start):
    proxy = start()
    with greeted(proxy) as client:
        client.send(b"a AUTHENTICATE LOGIN\r\n")
        assert client.line().startswith(b"+ ")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.closed()
    proxy.wait_log("client closed connection")
    assert_serving(proxy)


def test_auth_service_down_is_an_internal_error(start):
    proxy = start()
    with greeted(proxy) as client:
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == INTERNAL_ERROR
        assert client.closed()
    assert_serving(proxy)
