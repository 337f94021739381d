"""The demo IMAP backend: an IMAP4rev1 subset (RFC 3501) over one mailbox.

`ImapBackend` is one conversation; the commands it reads are tokenized
here (tags, atoms, quoted strings, literals), and the message items it
fetches, stores and searches are in backend_imap_items.py.
"""

import re
import time

from .backend_common import CLOSED, CRLF, Command, Conversation, Refused, TooLong
from .backend_imap_items import (FETCH_MACROS, SEARCH_KEYS, STATUS_ITEMS, SYSTEM_FLAGS,
                                 fetch_item, flag_list, parse_flags, parse_sequence_set)

COMMAND_LIMIT = 65536       # one IMAP command with its literals (only LOGIN sends literals here)
IDLE_LIMIT = 30 * 60        # RFC 2177 3: clients re-issue IDLE at least every 29 minutes
IDLE_POLL = 0.25            # seconds between two looks for new mail during IDLE

IMAP_CAPABILITIES = b"IMAP4rev1 ID IDLE LITERAL+ UIDPLUS"
IMAP_GREETING = b"* OK [CAPABILITY " + IMAP_CAPABILITIES + b"] demo IMAP ready\r\n"
IMAP_CAPABILITY = b"* CAPABILITY " + IMAP_CAPABILITIES + CRLF
IMAP_CONTINUE = b"+ Ready for literal data\r\n"
IMAP_IDLING = b"+ idling\r\n"
IMAP_BYE = b"* BYE demo IMAP signing off\r\n"
IMAP_TOO_LONG = b"* BYE command too long\r\n"
IMAP_TIMED_OUT = b"* BYE autologout: idle for too long\r\n"
IMAP_TOO_MANY_ERRORS = b"* BYE too many errors\r\n"
IMAP_UNKNOWN = b"BAD unknown command"
IMAP_NOT_NOW = b"BAD command not allowed now"
IMAP_SYNTAX = b"BAD syntax error"
IMAP_LOGIN_FAILED = b"NO [AUTHENTICATIONFAILED] invalid credentials"   # RFC 5530
IMAP_NO_MAILBOX = b"NO [NONEXISTENT] no such mailbox, only INBOX"
IMAP_READ_ONLY = b"NO [READ-ONLY] mailbox is read-only"
IMAP_NO_MESSAGE = b"BAD no such message"

LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}$")   # RFC 3501 4.3, RFC 7888 (LITERAL+)
TAG = re.compile(rb'[^\x00-\x20\x7f(){%*"\\+\]]{1,64}')  # RFC 3501 9: astring-chars but "+"
TOKEN = re.compile(rb"""\s*(?:
      (?P<paren>[()])
    | "(?P<quoted>(?:[^"\\\r\n]|\\["\\])*)"
    | (?P<atom>(?:[^\s()"\[\]]|\[[^\]\r\n]*\])+)   # BODY[HEADER.FIELDS (A B)] is one atom
    )""", re.X)
STORE_MODE = re.compile(r"([+-]?)FLAGS(\.SILENT)?")


class ImapBackend(Conversation):
    """An IMAP4rev1 subset (RFC 3501) over one mailbox, INBOX.

    `view` is the list of UIDs in sequence-number order as this client
    knows them; it changes only when the client is told (EXISTS, EXPUNGE).
    """

    protocol = "imap"
    GREETING, TOO_LONG, TIMED_OUT = IMAP_GREETING, IMAP_TOO_LONG, IMAP_TIMED_OUT
    TOO_MANY_ERRORS, UNKNOWN, NOT_NOW = IMAP_TOO_MANY_ERRORS, IMAP_UNKNOWN, IMAP_NOT_NOW
    ANY_STATE = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
    AUTHENTICATED = ANY_STATE | {"LIST", "LSUB", "SELECT", "EXAMINE", "STATUS", "IDLE"}
    STATES = {"not authenticated": ANY_STATE | {"LOGIN"},       # RFC 3501 3
              "authenticated": AUTHENTICATED,
              "selected": AUTHENTICATED | {"CHECK", "CLOSE", "EXPUNGE", "FETCH",
                                           "STORE", "SEARCH", "UID"}}
    UID_COMMANDS = {"FETCH": "fetch", "STORE": "store_flags", "SEARCH": "search",
                    "EXPUNGE": "expunge"}                        # RFC 3501 6.4.8, RFC 4315
    state = "not authenticated"
    user = None
    origin = None               # (ip, port) of the client, if a proxy named it in ID
    readonly = False
    view = ()

    # ----------------------------------------------------------- reading

    def read_command(self):
        """Tag, verb and tokens; literals {N} (after `+`) and {N+} are read
        into the token list as the strings they stand for."""
        line = self.reader.readline()
        total, tag, tokens = len(line), line.split(b" ", 1)[0], []
        while True:
            text = line.rstrip(b"\r\n")
            literal = LITERAL_AT_END.search(text)
            tokens += tokenize(text[:literal.start()] if literal else text, tag)
            if not literal:
                return command_from(tokens, tag)
            total += int(literal[1])
            if total > COMMAND_LIMIT:
                if literal[2]:
                    raise TooLong()             # {N+}: its bytes come anyway
                raise Refused(b"BAD literal too large", _valid_tag(tag))
            if not literal[2]:
                self.send(IMAP_CONTINUE)
            tokens.append(self.reader.read_exact(int(literal[1])))
            line = self.reader.readline()
            total += len(line)

    def refusal(self, refusal, command):
        tag = refusal.tag or (command.tag if command else b"*")
        return tag + b" " + refusal.reply + CRLF

    def ok(self, command, text):
        self.send(command.tag + b" OK " + text + CRLF)

    def untagged(self, text):
        self.send(b"* " + text + CRLF)

    # --------------------------------------------------- any state, login

    def do_CAPABILITY(self, command):
        self.send(IMAP_CAPABILITY)
        self.ok(command, b"CAPABILITY completed")

    def do_NOOP(self, command):
        self.report_changes()
        self.ok(command, b"NOOP completed")

    def do_CHECK(self, command):
        self.report_changes()
        self.ok(command, b"CHECK completed")

    def do_LOGOUT(self, command):
        self.send(IMAP_BYE)
        self.ok(command, b"LOGOUT completed")
        self.state = CLOSED

    def do_ID(self, command):
        """RFC 2971.  A proxy's `x-originating-ip`/`-port` (Dovecot's fields,
        mailproxy's `proxy_client_address`) name the client; this demo
        trusts them from anyone.  The answer says who the client is, as far
        as this backend knows."""
        if len(command.args) != 1:
            raise Refused(IMAP_SYNTAX)
        fields = command.args[0]
        if isinstance(fields, list) and len(fields) % 2 == 0 and \
                all(isinstance(item, bytes) for item in fields):
            given = {fields[i].lower(): fields[i + 1] for i in range(0, len(fields), 2)}
            if b"x-originating-ip" in given:
                self.origin = (given[b"x-originating-ip"].decode("ascii", "replace"),
                               given.get(b"x-originating-port", b"?").decode("ascii", "replace"))
        elif fields != b"NIL":
            raise Refused(IMAP_SYNTAX)
        host, port = self.origin or self.client_address[:2]
        self.untagged(b'ID ("name" "mailproxy demo" "client" "%s:%s")' % (
            host.encode(), str(port).encode()))
        self.ok(command, b"ID completed")

    def do_LOGIN(self, command):
        user, password = strings(command.args, 2)
        if not self.store.check_password(user, password):
            raise Refused(IMAP_LOGIN_FAILED)
        self.user, self.state = user, "authenticated"
        self.ok(command, b"[CAPABILITY " + IMAP_CAPABILITIES + b"] LOGIN completed")

    # ------------------------------------------------------ authenticated

    def do_LIST(self, command):
        self.list_inbox(command, b"LIST")

    def do_LSUB(self, command):
        self.list_inbox(command, b"LSUB")

    def list_inbox(self, command, verb):
        reference, pattern = strings(command.args, 2)
        if not pattern:             # RFC 3501 6.3.8: asks for the delimiter
            self.untagged(verb + b' (\\Noselect) "/" ""')
        elif mailbox_matches(reference + pattern):
            self.untagged(verb + b' (\\HasNoChildren) "/" INBOX')
        self.ok(command, verb + b" completed")

    def do_SELECT(self, command):
        self.select(command, readonly=False)

    def do_EXAMINE(self, command):
        self.select(command, readonly=True)

    def select(self, command, readonly):
        (name,) = strings(command.args, 1)
        self.state, self.view = "authenticated", []     # RFC 3501 6.3.1: even if it fails
        if name.upper() != "INBOX":
            raise Refused(IMAP_NO_MAILBOX)
        self.view, self.readonly = self.store.uids(self.user), readonly
        flags = b"()" if readonly else flag_list(SYSTEM_FLAGS)
        self.untagged(b"FLAGS " + flag_list(SYSTEM_FLAGS))
        self.untagged(b"OK [PERMANENTFLAGS " + flags + b"] flags permitted")
        self.untagged(b"%d EXISTS" % len(self.view))
        self.untagged(b"0 RECENT")
        self.untagged(b"OK [UIDVALIDITY %d] UIDs valid" % self.store.uidvalidity)
        self.untagged(b"OK [UIDNEXT %d] predicted next UID" % self.store.uidnext(self.user))
        self.state = "selected"
        self.ok(command, b"[READ-ONLY] EXAMINE completed" if readonly
                else b"[READ-WRITE] SELECT completed")

    def do_STATUS(self, command):
        if len(command.args) != 2 or not isinstance(command.args[1], list):
            raise Refused(IMAP_SYNTAX)
        (name,) = strings(command.args[:1], 1)
        if name.upper() != "INBOX":
            raise Refused(IMAP_NO_MAILBOX)
        messages = self.store.messages(self.user)
        values = []
        for item in command.args[1]:
            name = item.upper().decode("ascii", "replace") if isinstance(item, bytes) else ""
            if name not in STATUS_ITEMS:
                raise Refused(b"BAD unsupported status item")
            count = STATUS_ITEMS[name](self.store, self.user, messages)
            values.append(b"%s %d" % (name.encode(), count))
        self.untagged(b"STATUS INBOX (" + b" ".join(values) + b")")
        self.ok(command, b"STATUS completed")

    def do_IDLE(self, command):
        """RFC 2177: report new mail until the client says DONE."""
        self.send(IMAP_IDLING)
        deadline = time.monotonic() + IDLE_LIMIT
        while time.monotonic() < deadline:
            if self.reader.ready(IDLE_POLL):
                if self.reader.readline().rstrip(b"\r\n").upper() != b"DONE":
                    raise Refused(b"BAD expected DONE")
                self.ok(command, b"IDLE terminated")
                return
            self.report_changes()
        self.say_goodbye(IMAP_TIMED_OUT)
        self.state = CLOSED

    def report_changes(self):
        """Tell the client of messages gone (by other sessions) and new."""
        if self.state != "selected":
            return
        current = self.store.uids(self.user)
        self.forget(set(self.view) - set(current))
        known = set(self.view)
        new = [uid for uid in current if uid not in known]
        if new:
            self.view += new
            self.untagged(b"%d EXISTS" % len(self.view))

    def forget(self, uids):
        """Drop `uids` from the view with one EXPUNGE each, highest sequence
        number first, so every number sent is still valid (RFC 3501 7.4.1)."""
        for seq in range(len(self.view), 0, -1):
            if self.view[seq - 1] in uids:
                del self.view[seq - 1]
                self.untagged(b"%d EXPUNGE" % seq)

    # ----------------------------------------------------------- selected

    def do_FETCH(self, command):
        self.fetch(command.args, by_uid=False)
        self.ok(command, b"FETCH completed")

    def do_STORE(self, command):
        self.store_flags(command.args, by_uid=False)
        self.ok(command, b"STORE completed")

    def do_SEARCH(self, command):
        self.search(command.args, by_uid=False)
        self.ok(command, b"SEARCH completed")

    def do_EXPUNGE(self, command):
        self.expunge(command.args, by_uid=False)
        self.ok(command, b"EXPUNGE completed")

    def do_UID(self, command):
        if not command.args or not isinstance(command.args[0], bytes):
            raise Refused(IMAP_SYNTAX)
        name = command.args[0].upper()
        action = self.UID_COMMANDS.get(name.decode("ascii", "replace"))
        if action is None:
            raise Refused(IMAP_UNKNOWN)
        getattr(self, action)(command.args[1:], by_uid=True)
        self.ok(command, b"UID " + name + b" completed")

    def do_CLOSE(self, command):
        """RFC 3501 6.4.2: expunge silently (unless read-only), deselect."""
        if not self.readonly:
            deleted = [m.uid for m in self.store.messages(self.user) if "\\Deleted" in m.flags]
            self.store.delete(self.user, deleted)
        self.state, self.view = "authenticated", []
        self.ok(command, b"CLOSE completed")

    def fetch(self, args, by_uid):
        if len(args) != 2 or not isinstance(args[0], bytes):
            raise Refused(IMAP_SYNTAX)
        items = fetch_items(args[1])
        if by_uid and not any(item.label == b"UID" for item in items):
            items.insert(0, fetch_item("UID"))          # RFC 3501 6.4.8
        for seq, message in self.matching(args[0], by_uid):
            self.send(self.fetch_response(seq, message, items))

    def fetch_response(self, seq, message, items):
        """`* SEQ FETCH (...)`; reading a body sets \\Seen (RFC 3501 6.4.5),
        and then the new FLAGS go along with it."""
        if any(item.sets_seen for item in items) and not self.readonly \
                and "\\Seen" not in message.flags:
            after = self.store.change_flags(self.user, [message.uid], {"\\Seen"})
            message.flags = after.get(message.uid, message.flags)
            if not any(item.label == b"FLAGS" for item in items):
                items = [fetch_item("FLAGS")] + items
        parts = [item.label + b" " + item.render(message) for item in items]
        return b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts))

    def store_flags(self, args, by_uid):
        if self.readonly:
            raise Refused(IMAP_READ_ONLY)
        if len(args) < 3 or not all(isinstance(arg, bytes) for arg in args[:2]):
            raise Refused(IMAP_SYNTAX)
        mode = STORE_MODE.fullmatch(args[1].decode("ascii", "replace").upper())
        if not mode:
            raise Refused(IMAP_SYNTAX)
        targets = self.matching(args[0], by_uid)
        after = self.store.change_flags(self.user, [m.uid for _, m in targets],
                                        parse_flags(args[2:]), mode[1] or "=")
        if mode[2]:
            return                                      # .SILENT
        for seq, message in targets:
            if message.uid in after:
                uid = b"UID %d " % message.uid if by_uid else b""
                self.untagged(b"%d FETCH (%sFLAGS %s)" % (seq, uid, flag_list(after[message.uid])))

    def search(self, args, by_uid):
        keys = [arg.upper().decode("ascii", "replace") for arg in args if isinstance(arg, bytes)]
        if not keys or len(keys) != len(args) or not all(key in SEARCH_KEYS for key in keys):
            raise Refused(b"BAD unsupported search (ALL and flag keys only)")
        messages = {m.uid: m for m in self.store.messages(self.user)}
        hits = [uid if by_uid else seq for seq, uid in enumerate(self.view, 1)
                if uid in messages and all(SEARCH_KEYS[key](messages[uid]) for key in keys)]
        self.untagged(b"SEARCH" + b"".join(b" %d" % hit for hit in hits))

    def expunge(self, args, by_uid):
        if self.readonly:
            raise Refused(IMAP_READ_ONLY)
        if len(args) != (1 if by_uid else 0):
            raise Refused(IMAP_SYNTAX)
        candidates = [m for _, m in self.matching(args[0], True)] if by_uid \
            else self.store.messages(self.user)
        deleted = [m.uid for m in candidates if "\\Deleted" in m.flags]
        self.forget(set(self.store.delete(self.user, deleted)))

    def matching(self, text, by_uid):
        """[(seq, message)] named by a sequence set of numbers or UIDs."""
        if not isinstance(text, bytes):
            raise Refused(IMAP_SYNTAX)
        largest = (self.view[-1] if self.view else 0) if by_uid else len(self.view)
        ranges = parse_sequence_set(text, largest)
        if not by_uid and any(low > largest for low, _ in ranges):
            raise Refused(IMAP_NO_MESSAGE)      # wholly past the end; 2:9 means 2:*
        messages = {m.uid: m for m in self.store.messages(self.user)}
        return [(seq, messages[uid]) for seq, uid in enumerate(self.view, 1)
                if uid in messages and _in_ranges(uid if by_uid else seq, ranges)]


def fetch_items(arg):
    """The FETCH item list (or single item or macro) as FetchItems."""
    names = arg if isinstance(arg, list) else [arg]
    if not all(isinstance(name, bytes) for name in names):
        raise Refused(IMAP_SYNTAX)
    names = [name.decode("ascii", "replace").upper() for name in names]
    names = [word for name in names for word in FETCH_MACROS.get(name, [name])]
    items = [fetch_item(name) for name in names]
    if None in items:
        raise Refused(b"BAD unsupported fetch item " + names[items.index(None)].encode())
    return items


def tokenize(text, tag):
    """Atoms, quoted strings and parentheses ("(" and ")" as str) of one
    stretch of a command line between literals."""
    tokens, position = [], 0
    while position < len(text):
        match = TOKEN.match(text, position)
        if not match:
            if not text[position:].strip():
                break
            raise Refused(IMAP_SYNTAX, _valid_tag(tag))
        position = match.end()
        if match["paren"]:
            tokens.append(match["paren"].decode())
        elif match["quoted"] is not None:
            tokens.append(re.sub(rb'\\(["\\])', rb"\1", match["quoted"]))
        else:
            tokens.append(match["atom"])
    return tokens


def command_from(tokens, tag):
    """Nest the parenthesized lists; check tag and verb."""
    stack = [[]]
    for token in tokens:
        if token == "(":
            stack.append([])
        elif token == ")" and len(stack) > 1:
            inner = stack.pop()
            stack[-1].append(inner)
        elif token == ")":
            raise Refused(IMAP_SYNTAX, _valid_tag(tag))
        else:
            stack[-1].append(token)
    words = stack[0]
    if len(stack) > 1 or len(words) < 2 or not all(isinstance(w, bytes) for w in words[:2]) \
            or not TAG.fullmatch(words[0]):
        raise Refused(b"BAD missing tag or command", _valid_tag(tag))
    return Command(words[1].decode("ascii", "replace").upper(), words[2:], words[0])


def _valid_tag(tag):
    return tag if TAG.fullmatch(tag) else b"*"


def strings(args, count):
    """Exactly `count` string arguments (atom, quoted or literal), as text."""
    if len(args) != count or not all(isinstance(arg, bytes) for arg in args):
        raise Refused(IMAP_SYNTAX)
    return [arg.decode("utf-8", "replace") for arg in args]


def mailbox_matches(pattern):
    """Does the LIST pattern name INBOX?  (`*` and `%` are wildcards.)"""
    regex = "".join(".*" if ch in "*%" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, "INBOX", re.IGNORECASE) is not None


def _in_ranges(number, ranges):
    return any(low <= number <= high for low, high in ranges)
