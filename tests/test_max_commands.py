"""`max_commands` (freenginx; issue 18 item 2): at most N commands before
login, then the protocol's error and the close, pipelined or not.

One proxy serves the three protocols with `max_commands 3`; each
transcript sends three harmless commands and a fourth.
"""

import pytest

from mailproxy import imap, pop3, smtp
from mailproxy.config import load

pytest_plugins = ("proxying",)     # shared_proxy, start_proxy

LIMIT = 3
SERVERS = [f"protocol {protocol}; max_commands {LIMIT};" for protocol in ("imap", "pop3", "smtp")]
# (protocol, its index in SERVERS, a harmless command and its reply, the 4th's reply)
CASES = {
    "imap": (0, lambda n: (b"t%d NOOP\r\n" % n, b"t%d OK completed\r\n" % n),
             b"t3 " + imap.TOO_MANY + b"\r\n"),
    "pop3": (1, lambda n: (b"NOOP\r\n", pop3.OK), pop3.TOO_MANY),
    "smtp": (2, lambda n: (b"NOOP\r\n", smtp.OK), smtp.TOO_MANY),
}


@pytest.mark.parametrize("protocol", CASES)
@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
def test_the_command_after_the_limit_gets_the_error_and_the_close(shared_proxy, protocol,
                                                                  pipelined):
    index, harmless, too_many = CASES[protocol]
    commands = [harmless(n) for n in range(LIMIT + 1)]
    with shared_proxy(SERVERS).client(index) as client:
        client.line()
        if pipelined:
            client.send(b"".join(line for line, _ in commands))
        else:
            for line, reply in commands[:LIMIT]:
                client.send(line)
                assert client.line() == reply
            client.send(commands[LIMIT][0])
        replies = [reply for _, reply in commands[:LIMIT]] if pipelined else []
        assert client.lines(len(replies) + 1) == replies + [too_many]
        assert client.closed()


@pytest.mark.parametrize("protocol, line, refused", [
    ("imap", b"t3 SELECT INBOX\r\n", b"t3 " + imap.INVALID + b"\r\n"),
    ("pop3", b"STATS\r\n", pop3.INVALID),
    ("smtp", b"NO\x01OP\r\n", smtp.INVALID),
])
def test_a_refused_command_after_the_limit_closes_too(shared_proxy, protocol, line, refused):
    """A line the parser refuses gets its own reply, then the close."""
    index, harmless, _ = CASES[protocol]
    with shared_proxy(SERVERS).client(index) as client:
        client.line()
        client.send(b"".join(harmless(n)[0] for n in range(LIMIT)) + line)
        assert client.lines(LIMIT + 1)[-1] == refused
        assert client.closed()


def test_sasl_answers_are_part_of_their_command(shared_proxy):
    """AUTHENTICATE and its answer are one command: the NOOP is the 2nd."""
    with shared_proxy(["protocol imap; max_commands 2;"]).client() as client:
        client.line()
        client.send(b"a AUTHENTICATE PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        client.send(b"*\r\nb NOOP\r\nc NOOP\r\n")
        assert client.lines(3) == [b"a " + imap.INVALID + b"\r\n", b"b OK completed\r\n",
                                   b"c " + imap.TOO_MANY + b"\r\n"]
        assert client.closed()


def test_the_log_says_why(start_proxy):
    proxy = start_proxy(["protocol pop3; max_commands 1;"])
    with proxy.client() as client:
        client.line()
        client.send(b"NOOP\r\nNOOP\r\n")
        assert client.lines(2) == [pop3.OK, pop3.TOO_MANY]
    proxy.wait_log("client sent too many commands")


def test_the_default_is_1000(tmp_path):
    conf = tmp_path / "mail.conf"
    conf.write_text("mail { auth_http 127.0.0.1:9/auth; server { listen 127.0.0.1:1143; "
                    "protocol imap; } server { listen 127.0.0.1:1144; protocol pop3; "
                    "max_commands 7; } }\n")
    assert [server.max_commands for server in load(str(conf)).servers] == [1000, 7]
