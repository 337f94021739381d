"""The demo POP3 backend: POP3 (RFC 1939) with CAPA (RFC 2449)."""

import re

from .backend_common import CLOSED, CRLF, Conversation, Refused
from .mailstore import split_message

POP3_GREETING = b"+OK demo POP3 ready\r\n"
POP3_CAPA = (b"+OK capability list follows\r\nUSER\r\nUIDL\r\nTOP\r\nRESP-CODES\r\n"
             b"PIPELINING\r\nIMPLEMENTATION mailproxy-demo\r\n.\r\n")
POP3_BYE = b"+OK demo POP3 signing off\r\n"
POP3_TOO_LONG = b"-ERR line too long\r\n"
POP3_TIMED_OUT = b"-ERR timed out\r\n"
POP3_TOO_MANY_ERRORS = b"-ERR too many errors\r\n"
POP3_UNKNOWN = b"-ERR unknown command"
POP3_NOT_NOW = b"-ERR command not valid in this state"
POP3_LOGIN_FAILED = b"-ERR [AUTH] invalid user name or password"      # RFC 3206
POP3_NO_MESSAGE = b"-ERR no such message"


class Pop3Backend(Conversation):
    """POP3 (RFC 1939) with CAPA (RFC 2449).  The maildrop is the mailbox
    as it was at PASS; DELE marks, QUIT removes, RSET unmarks."""

    protocol = "pop3"
    GREETING, TOO_LONG, TIMED_OUT = POP3_GREETING, POP3_TOO_LONG, POP3_TIMED_OUT
    TOO_MANY_ERRORS, UNKNOWN, NOT_NOW = POP3_TOO_MANY_ERRORS, POP3_UNKNOWN, POP3_NOT_NOW
    STATES = {"authorization": {"USER", "PASS", "CAPA", "QUIT"},
              "transaction": {"STAT", "LIST", "RETR", "UIDL", "TOP", "DELE", "RSET",
                              "NOOP", "CAPA", "QUIT"}}
    state = "authorization"

    def setup(self):
        super().setup()
        self.login = self.user = None
        self.maildrop, self.deleted = [], set()

    def do_CAPA(self, command):
        self.send(POP3_CAPA)

    def do_USER(self, command):
        self.login = command.args.decode("utf-8", "replace")
        self.send(b"+OK send PASS\r\n")

    def do_PASS(self, command):
        login, self.login = self.login, None
        if login is None:
            raise Refused(b"-ERR send USER first")
        if not self.store.check_password(login, command.args.decode("utf-8", "replace")):
            raise Refused(POP3_LOGIN_FAILED)
        self.user, self.state = login, "transaction"
        self.maildrop = self.store.messages(login)
        self.send(b"+OK %d messages\r\n" % len(self.maildrop))

    def do_STAT(self, command):
        live = self.live()
        self.send(b"+OK %d %d\r\n" % (len(live), sum(len(m.data) for _, m in live)))

    def do_LIST(self, command):
        self.listing(command, lambda m: b"%d" % len(m.data))

    def do_UIDL(self, command):
        # RFC 1939 7: a unique-id stays the same across sessions.
        self.listing(command, lambda m: b"%d.%d" % (self.store.uidvalidity, m.uid))

    def listing(self, command, value):
        """LIST and UIDL: one message's line, or all as a multi-line reply."""
        if command.args:
            number, message = self.message(command.args)
            self.send(b"+OK %d %s\r\n" % (number, value(message)))
            return
        lines = [b"%d %s\r\n" % (number, value(m)) for number, m in self.live()]
        self.send(b"+OK %d messages\r\n" % len(lines) + b"".join(lines) + b".\r\n")

    def do_RETR(self, command):
        _, message = self.message(command.args)
        self.send(b"+OK %d octets\r\n" % len(message.data) + dot_stuff(message.data) + b".\r\n")

    def do_TOP(self, command):
        number, _, count = command.args.partition(b" ")
        _, message = self.message(number)
        if not count.strip().isdigit():
            raise Refused(b"-ERR usage: TOP message lines")
        header, text = split_message(message.data)
        lines = text.split(CRLF)[:-1] if text.endswith(CRLF) else text.split(CRLF)
        top = header + b"".join(line + CRLF for line in lines[:int(count)])
        self.send(b"+OK top of message follows\r\n" + dot_stuff(top) + b".\r\n")

    def do_DELE(self, command):
        number, _ = self.message(command.args)
        self.deleted.add(number)
        self.send(b"+OK message %d deleted\r\n" % number)

    def do_RSET(self, command):
        self.deleted.clear()
        self.send(b"+OK\r\n")

    def do_NOOP(self, command):
        self.send(b"+OK\r\n")

    def do_QUIT(self, command):
        """RFC 1939 6: QUIT in the transaction state removes the marked."""
        if self.state == "transaction":
            self.store.delete(self.user, [self.maildrop[n - 1].uid for n in self.deleted])
        self.send(POP3_BYE)
        self.state = CLOSED

    def live(self):
        return [(n, m) for n, m in enumerate(self.maildrop, 1) if n not in self.deleted]

    def message(self, argument):
        """(number, message) for a message-number argument not deleted."""
        text = argument.strip()
        number = int(text) if text.isdigit() else 0
        if not 1 <= number <= len(self.maildrop) or number in self.deleted:
            raise Refused(POP3_NO_MESSAGE)
        return number, self.maildrop[number - 1]


def dot_stuff(data):
    """RFC 1939 3: a line starting with "." gets another; ends with CRLF."""
    if data and not data.endswith(CRLF):
        data += CRLF
    return re.sub(rb"(?m)^\.", b"..", data)
