"""sasl.py alone: the mechanisms as I/O-free generators, no sockets.

Each exchange is driven the way a session drives it: `next()` for the first
challenge, `send(line)` for each client line, until StopIteration carries
the Credentials.  Replies and challenges are spec 3.0's byte-exact texts.
"""

import base64
import hashlib
import hmac
import re

import pytest
from hypothesis import given, strategies as st

from mailproxy import sasl
from mailproxy.sasl import Credentials, SaslError

SALT = b"<1896.697170952@mx.test>"


def b64(data):
    return base64.b64encode(data)


def drive(exchange, *lines):
    """Run an exchange; return (challenges seen, Credentials)."""
    challenges = []
    try:
        challenges.append(next(exchange))
        for line in lines:
            challenges.append(exchange.send(line))
    except StopIteration as done:
        return challenges, done.value
    raise AssertionError(f"exchange still wants input after {challenges}")


# ------------------------------------------------------------------ PLAIN

def test_plain_with_initial_response_needs_no_challenge():
    challenges, creds = drive(sasl.plain(b64(b"\0joe\0secret")))
    assert challenges == []
    assert creds == Credentials("plain", b"joe", b"secret")


def test_plain_without_initial_response_sends_an_empty_challenge():
    challenges, creds = drive(sasl.plain(), b64(b"\0joe\0secret") + b"\r\n")
    assert challenges == [""]
    assert creds == Credentials("plain", b"joe", b"secret")


def test_plain_drops_the_authzid():
    _, creds = drive(sasl.plain(b64(b"admin\0joe\0secret")))
    assert creds.login == b"joe"
    assert creds.password == b"secret"
    assert creds.method == "plain"


def test_plain_keeps_spaces_and_utf8_in_both_fields():
    _, creds = drive(sasl.plain(b64("\0jo e\0pä ss".encode())))
    assert (creds.login, creds.password) == ("jo e".encode(), "pä ss".encode())


@pytest.mark.parametrize("decoded", [b"joe\0secret", b"joesecret", b"a\0joe\0secret\0x", b""],
                         ids=["one-nul", "no-nul", "three-nuls", "empty"])
def test_plain_needs_exactly_two_nul_separators(decoded):
    with pytest.raises(SaslError):
        drive(sasl.plain(b64(decoded)))


def test_plain_continuation_with_bad_base64_is_an_error():
    exchange = sasl.plain()
    assert next(exchange) == ""
    with pytest.raises(SaslError):
        exchange.send(b"*\r\n")


# ------------------------------------------------------------------ LOGIN

def test_login_asks_username_then_password():
    challenges, creds = drive(sasl.login(), b64(b"joe") + b"\r\n", b64(b"secret") + b"\r\n")
    assert challenges == ["VXNlcm5hbWU6", "UGFzc3dvcmQ6"]
    assert creds == Credentials("plain", b"joe", b"secret")


def test_login_challenges_are_base64_of_the_prompts():
    assert base64.b64decode(sasl.USERNAME_CHALLENGE) == b"Username:"
    assert base64.b64decode(sasl.PASSWORD_CHALLENGE) == b"Password:"


def test_login_with_initial_response_asks_only_the_password():
    challenges, creds = drive(sasl.login(b64(b"joe")), b64(b"secret"))
    assert challenges == ["UGFzc3dvcmQ6"]
    assert creds == Credentials("plain", b"joe", b"secret")


def test_login_method_is_plain_toward_the_auth_service():
    # spec 2.2: there is no Auth-Method "login"
    _, creds = drive(sasl.login(), b64(b"u"), b64(b"p"))
    assert creds.method == "plain"


def test_login_bad_username_base64_is_an_error():
    exchange = sasl.login()
    next(exchange)
    with pytest.raises(SaslError):
        exchange.send(b"%%%\r\n")


def test_login_bad_password_base64_is_an_error():
    exchange = sasl.login(b64(b"joe"))
    assert next(exchange) == "UGFzc3dvcmQ6"
    with pytest.raises(SaslError):
        exchange.send(b"A\r\n")


# --------------------------------------------------------------- CRAM-MD5

def test_cram_md5_challenge_is_base64_of_the_salt():
    exchange = sasl.cram_md5(None, SALT)
    assert next(exchange) == b64(SALT).decode()


def test_cram_md5_response_gives_user_digest_and_salt():
    digest = hmac.new(b"secret", SALT, hashlib.md5).hexdigest().encode()
    challenges, creds = drive(sasl.cram_md5(None, SALT), b64(b"joe " + digest) + b"\r\n")
    assert challenges == [b64(SALT).decode()]
    assert creds == Credentials("cram-md5", b"joe", digest, SALT)
    assert len(creds.password) == 32


def test_cram_md5_digest_length_only_is_checked():
    # nginx checks 32 characters, not that they are hex (spec 7.15)
    _, creds = drive(sasl.cram_md5(None, SALT), b64(b"joe " + b"z" * 32))
    assert creds.password == b"z" * 32


@pytest.mark.parametrize("response", [b"joe " + b"a" * 31, b"joe " + b"a" * 33,
                                      b"joe" + b"a" * 32, b"joe"],
                         ids=["31-chars", "33-chars", "no-space", "user-only"])
def test_cram_md5_malformed_response_is_an_error(response):
    exchange = sasl.cram_md5(None, SALT)
    next(exchange)
    with pytest.raises(SaslError):
        exchange.send(b64(response))


def test_cram_md5_user_ends_at_the_first_space():
    exchange = sasl.cram_md5(None, SALT)
    next(exchange)
    with pytest.raises(SaslError):          # "er " + 32 chars is 35 chars of digest
        exchange.send(b64(b"us er " + b"a" * 32))


# --------------------------------------------------------------- EXTERNAL

def test_external_with_initial_response():
    challenges, creds = drive(sasl.external(b64(b"joe@example.test")))
    assert challenges == []
    assert creds == Credentials("external", b"joe@example.test", b"")


def test_external_without_initial_response_asks_username():
    challenges, creds = drive(sasl.external(), b64(b"joe") + b"\r\n")
    assert challenges == ["VXNlcm5hbWU6"]
    assert creds == Credentials("external", b"joe")
    assert creds.password == b""


def test_apop_passes_the_digest_on_unchecked():
    creds = sasl.apop(b"joe", b"not-a-digest", SALT)
    assert creds == Credentials("apop", b"joe", b"not-a-digest", SALT)


def test_exchanges_table_names_every_mechanism():
    assert set(sasl.EXCHANGES) == set(sasl.MECHANISMS)
    assert sasl.MECHANISMS == ("PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL", "XOAUTH2",
                               "OAUTHBEARER")


# ------------------------------------------------- XOAUTH2 and OAUTHBEARER

XOAUTH2 = b"user=joe@example.com\x01auth=Bearer ya29.token-_~+/=\x01\x01"
OAUTHBEARER = b"n,a=joe@example.com,\x01host=mx.test\x01port=143\x01auth=Bearer tok\x01\x01"


@pytest.mark.parametrize("mechanism, decoded, login, token", [
    (sasl.xoauth2, XOAUTH2, b"joe@example.com", b"ya29.token-_~+/="),
    (sasl.xoauth2, b"user=joe\x01AUTH=bearer T\x01\x01", b"joe", b"T"),
    (sasl.oauthbearer, OAUTHBEARER, b"joe@example.com", b"tok"),
    (sasl.oauthbearer, b"y,a=j=2Coe=3D,\x01auth=Bearer T\x01\x01", b"j,oe=", b"T"),
])
def test_oauth_user_and_token_come_from_the_response(mechanism, decoded, login, token):
    """The login is the named user; the password is the bearer token only."""
    for challenges, creds in (drive(mechanism(b64(decoded))),
                              drive(mechanism(), b64(decoded) + b"\r\n")):
        assert creds == Credentials(mechanism.__name__, login, token)
    assert challenges == [""]      # without an initial response: one empty challenge


@pytest.mark.parametrize("mechanism, decoded", [
    (sasl.xoauth2, b"user=joe\x01auth=Bearer T\x01"),      # one ^A at the end
    (sasl.xoauth2, b"user=joe\x02auth=Bearer T\x02\x02"),  # not ^A
    (sasl.xoauth2, b"auth=Bearer T\x01\x01"),              # no user
    (sasl.xoauth2, b"user=\x01auth=Bearer T\x01\x01"),     # an empty user
    (sasl.xoauth2, b"user=joe\x01auth=Basic T\x01\x01"),   # not Bearer
    (sasl.xoauth2, b"user=joe\x01auth=Bearer \x01\x01"),   # no token
    (sasl.xoauth2, b"user=joe\x01auth=Bearer a b\x01\x01"),
    (sasl.xoauth2, b"user=joe\x01\x01"),
    (sasl.xoauth2, b"user=joe\x01auth=Bearer T\x01auth=Bearer U\x01\x01"),
    (sasl.xoauth2, b""),
    (sasl.oauthbearer, b"n,,\x01auth=Bearer T\x01\x01"),        # no user
    (sasl.oauthbearer, b"n,a=,\x01auth=Bearer T\x01\x01"),
    (sasl.oauthbearer, b"p=tls-unique,a=joe,\x01auth=Bearer T\x01\x01"),
    (sasl.oauthbearer, b"n,a=joe\x01auth=Bearer T\x01\x01"),    # no closing comma
    (sasl.oauthbearer, b"n,a=jo=41e,\x01auth=Bearer T\x01\x01"),
    (sasl.oauthbearer, b"n,a=joe,\x01host=mx\x01\x01"),
    (sasl.oauthbearer, b"n,a=joe,auth=Bearer T\x01\x01"),
])
def test_malformed_oauth_responses_are_errors(mechanism, decoded):
    with pytest.raises(SaslError):
        drive(mechanism(b64(decoded)))


def test_an_oauth_response_that_is_not_base64_is_an_error():
    with pytest.raises(SaslError):
        drive(sasl.xoauth2(b"not*base64"))


@pytest.mark.parametrize("text, allowed", [
    ("eyJzdGF0dXMiOiI0MDEifQ==", True), ("", True), ("a b", False), ("x\r\n", False),
    ("%%", False)])
def test_an_auth_error_sasl_value_must_be_base64(text, allowed):
    assert sasl.is_challenge(text) is allowed


# ----------------------------------------------------------------- decode

@pytest.mark.parametrize("line, decoded", [
    (b"am9l", b"joe"),
    (b"am9l\r\n", b"joe"),
    (b"am9lMQ==", b"joe1"),
    (b"am9lMQ", b"joe1"),                   # padding missing: accepted
    (b"am9lMTI=", b"joe12"),
    (b"am9lMTI", b"joe12"),
    (b"  am9l  \r\n", b"joe"),
    (b"am9l extra words", b"joe"),          # the first token only
    (b"", b""),
    (b"\r\n", b""),
    (b"=", b""),                            # RFC 4959 empty initial response
])
def test_decode_accepts(line, decoded):
    assert sasl.decode(line) == decoded


@pytest.mark.parametrize("line", [
    b"*", b"*\r\n",                         # cancel is just bad base64 (spec 3.0)
    b"am9l!", b"am9-", b"am9_", b"a\tb",
    b"a", b"am9lM", b"am9lMTIzN",           # length % 4 == 1
    "am9lé".encode(), b"am9l\x00",
])
def test_decode_refuses(line):
    with pytest.raises(SaslError):
        sasl.decode(line)


@given(st.binary(max_size=200))
def test_decode_raises_nothing_but_sasl_error(data):
    try:
        result = sasl.decode(data)
    except SaslError:
        return
    assert isinstance(result, bytes)


@given(st.binary(max_size=300))
def test_decode_round_trips_base64(data):
    encoded = base64.b64encode(data)
    assert sasl.decode(encoded) == data
    assert sasl.decode(encoded + b"\r\n") == data
    assert sasl.decode(encoded.rstrip(b"=")) == data


# ------------------------------------------------------------ salt, repr

def test_make_salt_format():
    salt = sasl.make_salt("mx.test")
    assert isinstance(salt, bytes)
    assert re.fullmatch(rb"<\d+\.\d+@mx\.test>", salt)


def test_make_salt_differs_between_calls():
    assert len({sasl.make_salt("mx.test") for _ in range(20)}) > 1


def test_credentials_repr_masks_the_password():
    creds = Credentials("plain", b"joe", b"hunter2-secret")
    assert repr(creds) == "Credentials(method='plain', login=b'joe', password=***)"
    assert "hunter2" not in str(creds)
    assert "hunter2" not in f"{creds!r} {[creds]}"


def test_credentials_repr_masks_a_digest_and_salt():
    creds = Credentials("cram-md5", b"joe", b"0123456789abcdef" * 2, SALT)
    assert "0123456789abcdef" not in repr(creds)
