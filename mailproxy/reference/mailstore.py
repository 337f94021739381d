"""The demo backends' mail: every user's mailbox, in memory, shared by the
IMAP, POP3 and SMTP backends (so mail sent through SMTP can be read through
IMAP or POP3), and the small messages `mailproxy demo` starts with.
"""

import email.utils
import hmac
import re
import threading
import time
from dataclasses import dataclass, field, replace

from .backend_common import CRLF, HOSTNAME


@dataclass
class Message:
    """One stored message: UID, IMAP flags, and the bytes (CRLF line ends)."""
    uid: int
    flags: set
    data: bytes
    arrived: float = field(default_factory=time.time)     # IMAP INTERNALDATE


class Mailstore:
    """Every user's mailbox, in memory.

    `users` maps a login to its clear-text password (set it up before
    serving).  Readers get copies (`messages()`), so nothing outside holds
    a reference into a mailbox.  UIDs only grow, and `uidvalidity` is fixed
    for the store's life, so clients may cache by UID (RFC 3501 2.3.1.1).
    """

    def __init__(self, users=None):
        self.users = dict(users or {})
        self.uidvalidity = int(time.time())
        # One lock for all mailboxes: handler threads of all three backends
        # deliver, read, flag and delete at once, and each operation is a few
        # list steps, so finer locks would buy nothing but deadlock risks.
        self._lock = threading.Lock()
        self._boxes = {}
        self._next_uid = {}

    def check_password(self, user, password):
        expected = self.users.get(user)
        return expected is not None and hmac.compare_digest(expected.encode(), password.encode())

    def deliver(self, user, message_bytes):
        """Append a message (line ends made CRLF) to `user`'s mailbox; its UID."""
        if user not in self.users:
            raise KeyError(f"no such user: {user}")
        data = re.sub(rb"\r?\n", CRLF, message_bytes)
        with self._lock:
            uid = self._next_uid.get(user, 1)
            self._next_uid[user] = uid + 1
            self._boxes.setdefault(user, []).append(Message(uid, set(), data))
        return uid

    def messages(self, user):
        """A snapshot of `user`'s mailbox, oldest first."""
        with self._lock:
            return [replace(m, flags=set(m.flags)) for m in self._boxes.get(user, ())]

    def uids(self, user):
        with self._lock:
            return [m.uid for m in self._boxes.get(user, ())]

    def uidnext(self, user):
        with self._lock:
            return self._next_uid.get(user, 1)

    def change_flags(self, user, uids, flags, how="+"):
        """Add ("+"), remove ("-") or set ("=") flags; {uid: flags after}."""
        wanted, after = set(uids), {}
        with self._lock:
            for message in self._boxes.get(user, ()):
                if message.uid in wanted:
                    message.flags = _apply_flags(message.flags, set(flags), how)
                    after[message.uid] = set(message.flags)
        return after

    def delete(self, user, uids):
        """Remove messages by UID; the UIDs that were there."""
        doomed = set(uids)
        with self._lock:
            box = self._boxes.get(user, [])
            self._boxes[user] = [m for m in box if m.uid not in doomed]
            return [m.uid for m in box if m.uid in doomed]

    def seed(self, user, count):
        """Deliver `count` small demo messages to `user`; their UIDs."""
        return [self.deliver(user, demo_message(user, n, count)) for n in range(1, count + 1)]


def _apply_flags(current, flags, how):
    if how == "+":
        return current | flags
    if how == "-":
        return current - flags
    return flags


def demo_message(user, number, count):
    """A small RFC 5322 message; its dotted line shows POP3/SMTP dot-stuffing."""
    return (f"From: Mailproxy Demo <demo@{HOSTNAME}>\r\n"
            f"To: {user}@{HOSTNAME}\r\n"
            f"Subject: Demo message {number} of {count}\r\n"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: {email.utils.make_msgid('demo', HOSTNAME)}\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n"
            f"\r\n"
            f"Hello {user}, this is demo message {number}.\r\n"
            f".This line starts with a dot.\r\n").encode()


def split_message(data):
    """(header with its blank line, body) of a CRLF message."""
    end = data.find(b"\r\n\r\n")
    return (data, b"") if end < 0 else (data[:end + 4], data[end + 4:])
