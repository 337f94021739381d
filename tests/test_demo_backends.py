"""The demo backends, spoken to by real clients over loopback.

imaplib, poplib and smtplib do the ordinary conversations; curl does what
the demo prints for its users to copy; a raw socket does what must be
byte-exact (the greeting, the LOGIN literals a proxy sends, IDLE).  One set
of backends serves the whole module; each test that changes a mailbox gets
a fresh user of its own.
"""

import imaplib
import itertools
import poplib
import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from mailproxy.reference import backend_common, backend_imap, backend_pop3, backend_smtp
from mailproxy.reference.demo_backends import start_backends
from mailproxy.reference.mailstore import Mailstore

PASSWORD = "secret"
TIMEOUT = 5
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def store():
    store = Mailstore({"joe": PASSWORD})
    store.seed("joe", 3)
    return store


@pytest.fixture(scope="module")
def backends(store):
    with start_backends(store) as running:
        yield running


@pytest.fixture
def user(store):
    """A new user with three seeded messages."""
    name = f"user{next(_numbers)}"
    store.users[name] = PASSWORD
    store.seed(name, 3)
    return name


class Raw:
    """A line-at-a-time client for conversations that must be exact."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        return self.file.readline()

    def until(self, prefix, limit=50):
        """Lines up to and including the first that starts with `prefix`."""
        lines = []
        for _ in range(limit):
            lines.append(self.line())
            if lines[-1].startswith(prefix) or not lines[-1]:
                return lines
        raise AssertionError(f"no {prefix!r} in {lines!r}")

    def close(self):
        self.file.close()
        self.sock.close()


def imap_session(backends, user):
    imap = imaplib.IMAP4("127.0.0.1", backends.imap_port, timeout=TIMEOUT)
    imap.login(user, PASSWORD)
    return imap


def raw_imap_selected(backends, user):
    raw = Raw(backends.imap_port)
    raw.line()
    raw.send(b"a LOGIN %s %s\r\nb SELECT INBOX\r\n" % (user.encode(), PASSWORD.encode()))
    raw.until(b"b OK")
    return raw


# ===================================================================== IMAP

def test_imap_greets_with_its_capabilities(backends):
    raw = Raw(backends.imap_port)
    assert raw.line() == backend_imap.IMAP_GREETING
    raw.send(b"a CAPABILITY\r\n")
    assert raw.until(b"a ") == [backend_imap.IMAP_CAPABILITY, b"a OK CAPABILITY completed\r\n"]
    raw.close()


def test_imap_id_names_the_client_a_proxy_reports(backends):
    """RFC 2971 with Dovecot's x-originating-* fields, as mailproxy's
    proxy_client_address sends them; without them, the peer's address."""
    raw = Raw(backends.imap_port)
    raw.line()
    raw.send(b"a ID NIL\r\n")
    assert raw.until(b"a ") == [b'* ID ("name" "mailproxy demo" "client" "127.0.0.1:%d")\r\n'
                                % raw.sock.getsockname()[1], b"a OK ID completed\r\n"]
    raw.send(b'b ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "4242" '
             b'"x-session-id" "9")\r\nc ID NIL\r\nd ID (\"odd\")\r\n')
    assert raw.until(b"d ") == [b'* ID ("name" "mailproxy demo" "client" "192.0.2.7:4242")\r\n',
                                b"b OK ID completed\r\n",
                                b'* ID ("name" "mailproxy demo" "client" "192.0.2.7:4242")\r\n',
                                b"c OK ID completed\r\n", b"d BAD syntax error\r\n"]
    raw.close()


def test_imap_login_with_literals_exactly_as_the_proxy_sends_it(backends):
    raw = Raw(backends.imap_port)
    raw.line()
    raw.send(b"a LOGIN {3}\r\n")
    assert raw.line() == backend_imap.IMAP_CONTINUE
    raw.send(b"joe {6}\r\n")
    assert raw.line() == backend_imap.IMAP_CONTINUE
    raw.send(b"secret\r\n")
    assert raw.line().startswith(b"a OK ")
    raw.close()


def test_imap_login_with_non_synchronizing_literals(backends):
    raw = Raw(backends.imap_port)
    raw.line()
    raw.send(b'a LOGIN {3+}\r\njoe {6+}\r\nsecret\r\nb LOGOUT\r\n')
    assert raw.line().startswith(b"a OK ")
    assert raw.until(b"b ") == [backend_imap.IMAP_BYE, b"b OK LOGOUT completed\r\n"]
    raw.close()


def test_imap_wrong_password_is_refused(backends):
    imap = imaplib.IMAP4("127.0.0.1", backends.imap_port, timeout=TIMEOUT)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap.login("joe", "wrong")
    imap.logout()


def test_imap_unknown_and_untimely_commands(backends):
    raw = Raw(backends.imap_port)
    raw.line()
    raw.send(b"a FROBNICATE\r\nb FETCH 1 FLAGS\r\nc LOGIN joe\r\n")
    assert raw.line() == b"a " + backend_imap.IMAP_UNKNOWN + b"\r\n"
    assert raw.line() == b"b " + backend_imap.IMAP_NOT_NOW + b"\r\n"
    assert raw.line() == b"c " + backend_imap.IMAP_SYNTAX + b"\r\n"
    raw.close()


def test_imap_select_and_fetch_body_gives_the_delivered_bytes(backends, store, user):
    with imap_session(backends, user) as imap:
        assert imap.select("INBOX") == ("OK", [b"3"])
        assert imap.response("UIDVALIDITY")[1] == [b"%d" % store.uidvalidity]
        typ, data = imap.fetch("1", "(BODY[])")
        assert typ == "OK"
        assert data[0][1] == store.messages(user)[0].data
        assert b"FLAGS (\\Seen)" in data[0][0]                  # reading it set \Seen
        assert store.messages(user)[0].flags == {"\\Seen"}


def test_imap_uid_fetch_names_messages_by_uid(backends, store, user):
    store.delete(user, [1])                  # now sequence 1 is UID 2
    with imap_session(backends, user) as imap:
        imap.select("INBOX")
        typ, data = imap.uid("FETCH", "3", "(RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK"
        message = store.messages(user)[1]
        assert data[0][0] == b"2 (UID 3 RFC822.SIZE %d BODY[] {%d}" % (
            len(message.data), len(message.data))
        assert data[0][1] == message.data
        assert message.flags == set()                           # PEEK leaves \Seen alone


def test_imap_message_sets(backends, user):
    with imap_session(backends, user) as imap:
        imap.select("INBOX")

        def numbers(message_set):
            typ, data = imap.fetch(message_set, "(UID)")
            return [int(line.split()[0]) for line in data]
        assert numbers("1") == [1]
        assert numbers("2:3") == [2, 3]
        assert numbers("3:2") == [2, 3]
        assert numbers("1,3") == [1, 3]
        assert numbers("1:*") == [1, 2, 3]
        assert numbers("*") == [3]
        assert numbers("2:9") == [2, 3]                         # past the end: up to the end
        assert imap.uid("FETCH", "2:*", "(FLAGS)")[1] == [b"2 (UID 2 FLAGS ())",
                                                          b"3 (UID 3 FLAGS ())"]
        with pytest.raises(imaplib.IMAP4.error, match="no such message"):
            imap.fetch("4", "(UID)")
        with pytest.raises(imaplib.IMAP4.error, match="invalid message set"):
            imap.fetch("0:2", "(UID)")


def test_imap_fetch_header_items(backends, store, user):
    with imap_session(backends, user) as imap:
        imap.select("INBOX")
        typ, data = imap.fetch(
            "1", "(BODY[HEADER] INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        header = store.messages(user)[0].data.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        assert data[0][1] == header
        date = rb'INTERNALDATE "\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d \+0000"'
        assert re.search(date, data[1][0])
        assert data[1][1] == b"Subject: Demo message 1 of 3\r\n\r\n"
        assert imap.fetch("1", "(BODY.PEEK[]<0.5>)")[1][0][1] == b"From:"
        assert imaplib.Internaldate2tuple(data[1][0]) is not None


def test_imap_store_and_expunge(backends, store, user):
    with imap_session(backends, user) as imap:
        imap.select("INBOX")
        assert imap.store("1,3", "+FLAGS", "(\\Deleted)") == (
            "OK", [b"1 (FLAGS (\\Deleted))", b"3 (FLAGS (\\Deleted))"])
        assert imap.store("1", "-FLAGS.SILENT", "(\\Deleted)") == ("OK", [None])
        assert imap.expunge() == ("OK", [b"3"])
        assert store.uids(user) == [1, 2]
        assert imap.uid("STORE", "2", "+FLAGS", "(\\Seen \\Deleted)")[1] == [
            b"2 (UID 2 FLAGS (\\Deleted \\Seen))"]
        imap.close()                                            # CLOSE expunges silently
        assert store.uids(user) == [1]


def test_imap_examine_is_read_only(backends, store, user):
    with imap_session(backends, user) as imap:
        assert imap.select("INBOX", readonly=True) == ("OK", [b"3"])
        imap.fetch("1", "(BODY[])")
        assert store.messages(user)[0].flags == set()
        assert imap.store("1", "+FLAGS", "(\\Deleted)") == (
            "NO", [backend_imap.IMAP_READ_ONLY[3:]])


def test_imap_list_status_and_search(backends, store, user):
    with imap_session(backends, user) as imap:
        assert imap.list() == ("OK", [b'(\\HasNoChildren) "/" INBOX'])
        assert imap.list('""', "INBOX") == ("OK", [b'(\\HasNoChildren) "/" INBOX'])
        assert imap.list('""', "Sent") == ("OK", [None])
        assert imap.status("INBOX", "(MESSAGES UIDNEXT UNSEEN)") == (
            "OK", [b"INBOX (MESSAGES 3 UIDNEXT 4 UNSEEN 3)"])
        assert imap.select("Sent") == ("NO", [backend_imap.IMAP_NO_MAILBOX[3:]])
        imap.select("INBOX")
        store.delete(user, [1])
        assert imap.search(None, "ALL") == ("OK", [b"2 3"])    # the client still sees 3
        assert imap.noop() == ("OK", [b"NOOP completed"])     # ... until told
        assert imap.search(None, "ALL") == ("OK", [b"1 2"])
        assert imap.uid("SEARCH", "ALL") == ("OK", [b"2 3"])


def test_imap_idle_reports_new_mail_until_done(backends, store, user):
    raw = raw_imap_selected(backends, user)
    raw.send(b"c IDLE\r\n")
    assert raw.line() == backend_imap.IMAP_IDLING
    store.deliver(user, b"Subject: while you wait\r\n\r\nhi\r\n")
    assert raw.line() == b"* 4 EXISTS\r\n"
    raw.send(b"DONE\r\n")
    assert raw.line() == b"c OK IDLE terminated\r\n"
    raw.send(b"d FETCH 4 (BODY.PEEK[TEXT])\r\n")
    assert raw.until(b"d ") == [b"* 4 FETCH (BODY[TEXT] {4}\r\n", b"hi\r\n", b")\r\n",
                                b"d OK FETCH completed\r\n"]
    raw.close()


def test_imap_too_long_a_line_ends_the_conversation(backends):
    raw = Raw(backends.imap_port)
    raw.line()
    raw.send(b"a " + b"x" * backend_common.LINE_LIMIT + b"\r\n")
    assert raw.line() == backend_imap.IMAP_TOO_LONG
    assert raw.line() == b""
    raw.close()


# ===================================================================== POP3

def pop3_session(backends, user):
    pop = poplib.POP3("127.0.0.1", backends.pop3_port, timeout=TIMEOUT)
    pop.user(user)
    pop.pass_(PASSWORD)
    return pop


def test_pop3_stat_list_and_retr_give_the_stored_bytes(backends, store, user):
    messages = store.messages(user)
    pop = pop3_session(backends, user)
    assert pop.getwelcome() == backend_pop3.POP3_GREETING.rstrip()
    assert pop.stat() == (3, sum(len(m.data) for m in messages))
    assert pop.list()[1] == [b"%d %d" % (n, len(m.data)) for n, m in enumerate(messages, 1)]
    assert pop.list(2) == b"+OK 2 %d" % len(messages[1].data)
    response, lines, octets = pop.retr(1)
    assert b".This line starts with a dot." in lines           # stuffed on the wire
    assert b"\r\n".join(lines) + b"\r\n" == messages[0].data
    pop.quit()


def test_pop3_uidl_top_and_capa(backends, store, user):
    pop = pop3_session(backends, user)
    assert pop.uidl()[1] == [b"%d %d.%d" % (n, store.uidvalidity, n) for n in (1, 2, 3)]
    assert pop.uidl(3) == b"+OK 3 %d.3" % store.uidvalidity
    header, body = store.messages(user)[0].data.split(b"\r\n\r\n", 1)
    assert pop.top(1, 1)[1] == header.split(b"\r\n") + [b"", body.split(b"\r\n")[0]]
    assert set(pop.capa()) >= {"USER", "UIDL", "TOP"}
    pop.quit()


def test_pop3_dele_takes_effect_at_quit_and_rset_undoes_it(backends, store, user):
    pop = pop3_session(backends, user)
    pop.dele(1)
    pop.rset()
    pop.dele(2)
    assert pop.stat()[0] == 2
    with pytest.raises(poplib.error_proto, match="no such message"):
        pop.retr(2)
    assert store.uids(user) == [1, 2, 3]                        # not yet
    pop.quit()
    assert store.uids(user) == [1, 3]


def test_pop3_wrong_password_and_order(backends):
    pop = poplib.POP3("127.0.0.1", backends.pop3_port, timeout=TIMEOUT)
    pop.user("joe")
    refusal = re.escape(backend_pop3.POP3_LOGIN_FAILED.decode())
    with pytest.raises(poplib.error_proto, match=refusal):
        pop.pass_("wrong")
    with pytest.raises(poplib.error_proto, match="not valid in this state"):
        pop.stat()
    pop.quit()


# ===================================================================== SMTP

MESSAGE = (b"From: ann@example.org\r\nTo: someone\r\nSubject: through the demo\r\n\r\n"
           b"first line\r\n.a line that starts with a dot\r\n")


def test_smtp_ehlo_advertises_xclient_and_the_rest(backends):
    with smtplib.SMTP("127.0.0.1", backends.smtp_port, timeout=TIMEOUT) as smtp:
        assert smtp.ehlo("proxy.example")[0] == 250
        assert smtp.esmtp_features["xclient"].split() == ["ADDR", "NAME", "LOGIN"]
        assert smtp.has_extn("pipelining") and smtp.has_extn("8bitmime")
        assert int(smtp.esmtp_features["size"]) == backend_smtp.MAX_MESSAGE


def test_smtp_mail_after_xclient_arrives_in_the_imap_mailbox(backends, store, user):
    with smtplib.SMTP("127.0.0.1", backends.smtp_port, timeout=TIMEOUT) as smtp:
        smtp.ehlo("proxy.example")
        code, text = smtp.docmd("XCLIENT", f"ADDR=192.0.2.7 LOGIN={user} NAME=client.example")
        assert (code, text) == (220, backend_smtp.SMTP_GREETING[4:].strip())
        smtp.sendmail("ann@example.org", [f"{user}@demo.backend"], MESSAGE)
    with imap_session(backends, user) as imap:
        assert imap.select("INBOX") == ("OK", [b"4"])
        data = imap.fetch("4", "(BODY[])")[1][0][1]
    received, rest = data.split(b"\r\n\t", 1)
    assert received == b"Received: from unknown (client.example [192.0.2.7])"
    assert rest.startswith(b"by demo.backend (mailproxy demo backend) with ESMTPA "
                           b"(Authenticated sender: %s)\r\n\tfor <%s@demo.backend>; "
                           % (user.encode(), user.encode()))
    assert data.endswith(b"\r\n" + MESSAGE)


def test_smtp_xclient_values_are_xtext_and_cannot_add_header_lines(backends, store, user):
    with smtplib.SMTP("127.0.0.1", backends.smtp_port, timeout=TIMEOUT) as smtp:
        smtp.ehlo("proxy.example")
        assert smtp.docmd("XCLIENT", "LOGIN=a+2Bb+0D+0AX-Evil:+20yes ADDR=[UNAVAILABLE]")[0] == 220
        assert smtp.docmd("XCLIENT", "PORT=25")[0] == 501
        smtp.sendmail("", [user], MESSAGE)
    data = store.messages(user)[-1].data
    assert b"(Authenticated sender: a+b??X-Evil: yes)" in data
    assert b"\r\nX-Evil" not in data
    assert b" [127.0.0.1])" in data                             # no ADDR: the peer's


def test_smtp_refuses_unknown_recipients_and_wrong_order(backends):
    with smtplib.SMTP("127.0.0.1", backends.smtp_port, timeout=TIMEOUT) as smtp:
        smtp.ehlo("client.example")
        assert smtp.docmd("RCPT TO:<joe@demo.backend>") == (503, backend_smtp.SMTP_NOT_NOW[4:])
        assert smtp.docmd("MAIL FROM:<ann@example.org> SIZE=100 BODY=8BITMIME")[0] == 250
        assert smtp.docmd("DATA") == (503, backend_smtp.SMTP_NOT_NOW[4:])
        assert smtp.docmd("RCPT TO:<nobody@demo.backend>") == (550, backend_smtp.SMTP_NO_USER[4:])
        assert smtp.docmd("MAIL FROM:<ann@example.org>")[0] == 503
        assert smtp.docmd("RSET")[0] == 250
        assert smtp.docmd("MAIL FROM:<a@b> SIZE=%d" % (backend_smtp.MAX_MESSAGE + 1)) == (
            552, backend_smtp.SMTP_TOO_BIG[4:])
        assert smtp.docmd("VRFY joe") == (502, backend_smtp.SMTP_UNKNOWN[4:])


def test_smtp_whole_address_users_and_pipelining(backends, store):
    store.users["ann@example.org"] = PASSWORD
    raw = Raw(backends.smtp_port)
    assert raw.line() == backend_smtp.SMTP_GREETING
    raw.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n")
    lines = raw.until(b"354")
    assert lines[-3:] == [backend_smtp.SMTP_SENDER_OK, backend_smtp.SMTP_RECIPIENT_OK,
                          backend_smtp.SMTP_GO_AHEAD]
    raw.send(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
    assert [raw.line(), raw.line()] == [backend_smtp.SMTP_QUEUED, backend_smtp.SMTP_BYE]
    assert store.messages("ann@example.org")[0].data.endswith(b"\r\n\r\n.dot\r\n")
    raw.close()


# ================================================================= serving

def test_sessions_run_in_named_threads(backends):
    raw = Raw(backends.pop3_port)
    raw.line()
    name = "demo pop3 127.0.0.1:%d" % raw.sock.getsockname()[1]
    assert name in [thread.name for thread in threading.enumerate()]
    raw.send(b"QUIT\r\n")
    assert raw.line() == backend_pop3.POP3_BYE
    raw.close()


def test_close_ends_open_conversations_and_joins_threads():
    store = Mailstore({"joe": PASSWORD})
    running = start_backends(store)
    raw = raw_imap_selected(running, "joe")
    raw.send(b"c IDLE\r\n")
    assert raw.line() == backend_imap.IMAP_IDLING
    started = time.monotonic()
    running.close()
    running.close()                                             # a second close is harmless
    assert time.monotonic() - started < 2
    assert raw.line() == b""
    assert not any(thread.is_alive() for thread in running.threads)
    client_port = raw.sock.getsockname()[1]
    assert not [t for t in threading.enumerate() if t.name.endswith(f":{client_port}")]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", running.imap_port), timeout=1)
    raw.close()


def test_store_is_shared_and_normalises_line_ends():
    store = Mailstore({"joe": PASSWORD})
    assert store.deliver("joe", b"Subject: x\n\nbody\n") == 1
    assert store.messages("joe")[0].data == b"Subject: x\r\n\r\nbody\r\n"
    assert store.seed("joe", 2) == [2, 3]
    assert store.uidnext("joe") == 4
    assert store.change_flags("joe", [2, 9], {"\\Seen"}) == {2: {"\\Seen"}}
    assert store.delete("joe", [1, 9]) == [1]
    with pytest.raises(KeyError):
        store.deliver("nobody", b"x")
    assert store.check_password("joe", PASSWORD) and not store.check_password("joe", "x")


# ===================================================================== curl

def curl(*args):
    return subprocess.run([CURL, "-sS", "--max-time", str(TIMEOUT), *args],
                          capture_output=True, check=True, timeout=TIMEOUT * 2).stdout


@needs_curl
def test_curl_imap_examine(backends):
    out = curl(f"imap://joe:{PASSWORD}@127.0.0.1:{backends.imap_port}/INBOX", "-X", "EXAMINE INBOX")
    assert b"* 3 EXISTS" in out
    assert b"UIDVALIDITY" in out


@needs_curl
def test_curl_imap_fetch_by_uid(backends, store):
    out = curl(f"imap://joe:{PASSWORD}@127.0.0.1:{backends.imap_port}/INBOX;UID=1")
    assert out == store.messages("joe")[0].data


@needs_curl
def test_curl_pop3_list_and_retr(backends, store):
    url = f"pop3://joe:{PASSWORD}@127.0.0.1:{backends.pop3_port}/"
    messages = store.messages("joe")
    assert curl(url) == b"".join(b"%d %d\r\n" % (n, len(m.data)) for n, m in enumerate(messages, 1))
    assert curl(url + "1") == messages[0].data


@needs_curl
def test_curl_smtp_send(backends, store, user, tmp_path):
    path = tmp_path / "message.eml"
    path.write_bytes(MESSAGE)
    curl(f"smtp://127.0.0.1:{backends.smtp_port}", "--mail-from", "ann@example.org",
         "--mail-rcpt", f"{user}@demo.backend", "-T", str(path))
    data = store.messages(user)[-1].data
    assert data.startswith(b"Received: from ")
    assert data.endswith(b"\r\n" + MESSAGE)
