"""The demo IMAP backend's message items, with no I/O: what FETCH returns
(RFC 3501 6.4.5, 7.4.2), the flags STORE sets, the keys SEARCH knows, the
STATUS items, and sequence sets (RFC 3501 9).
"""

import datetime
import re
from functools import partial
from typing import NamedTuple

from .backend_common import CRLF, Refused
from .mailstore import split_message

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")   # RFC 3501 2.3.2

SET_PART = re.compile(rb"(\d+|\*)(?::(\d+|\*))?")          # RFC 3501 9: sequence-set
BODY_ITEM = re.compile(r"(BODY|BODY\.PEEK)\[([^\]]*)\](?:<(\d+)\.(\d+)>)?")
SECTION = re.compile(r"|HEADER|TEXT|HEADER\.FIELDS(\.NOT)? \(([^()]*)\)")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class FetchItem(NamedTuple):
    label: bytes                # the item's name in the reply, e.g. b"BODY[HEADER]"
    render: object              # message -> the value's bytes
    sets_seen: bool = False


SIMPLE_ITEMS = {
    "UID": lambda m: b"%d" % m.uid,
    "FLAGS": lambda m: flag_list(m.flags),
    "RFC822.SIZE": lambda m: b"%d" % len(m.data),
    "INTERNALDATE": lambda m: b'"%s"' % internaldate(m.arrived).encode(),
}
RFC822_ITEMS = {"RFC822": ("", True), "RFC822.HEADER": ("HEADER", False),
                "RFC822.TEXT": ("TEXT", True)}      # section, sets \Seen
FETCH_MACROS = {"FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]}


def _flag_test(flag, present):
    return lambda message: (flag in message.flags) == present


SEARCH_FLAGS = ("ANSWERED", "DELETED", "DRAFT", "FLAGGED", "SEEN")      # RFC 3501 6.4.4
SEARCH_KEYS = {"ALL": lambda message: True,
               **{word: _flag_test("\\" + word.title(), True) for word in SEARCH_FLAGS},
               **{"UN" + word: _flag_test("\\" + word.title(), False) for word in SEARCH_FLAGS}}
STATUS_ITEMS = {"MESSAGES": lambda store, user, msgs: len(msgs),
                "RECENT": lambda store, user, msgs: 0,
                "UIDNEXT": lambda store, user, msgs: store.uidnext(user),
                "UIDVALIDITY": lambda store, user, msgs: store.uidvalidity,
                "UNSEEN": lambda store, user, msgs: sum("\\Seen" not in m.flags for m in msgs)}


def fetch_item(name):
    """One FETCH item by name, or None if the demo does not do it."""
    if name in SIMPLE_ITEMS:
        return FetchItem(name.encode(), SIMPLE_ITEMS[name])
    if name in RFC822_ITEMS:
        section, sets_seen = RFC822_ITEMS[name]
        return FetchItem(name.encode(), partial(body_section, section=section), sets_seen)
    match = BODY_ITEM.fullmatch(name)
    if not match or not SECTION.fullmatch(match[2]):
        return None
    start, length = (int(match[3]), int(match[4])) if match[3] else (0, None)
    label = f"BODY[{match[2]}]" + (f"<{start}>" if match[3] else "")     # RFC 3501 7.4.2
    return FetchItem(label.encode(), partial(body_section, section=match[2], start=start,
                                             length=length), match[1] == "BODY")


def body_section(message, section, start=0, length=None):
    """A part of the message as an IMAP literal: `{N}` CRLF and the bytes."""
    header, text = split_message(message.data)
    if section == "":
        data = message.data
    elif section == "HEADER":
        data = header
    elif section == "TEXT":
        data = text
    else:
        data = header_fields(header, section)
    data = data[start:] if length is None else data[start:start + length]
    return b"{%d}\r\n%s" % (len(data), data)


def header_fields(header, section):
    """HEADER.FIELDS (A B): those fields, folded lines kept; .NOT: the others."""
    match = SECTION.fullmatch(section)
    names = {name.encode() for name in match[2].split()}
    fields = re.findall(rb"[^\r\n]+\r\n(?:[ \t][^\r\n]*\r\n)*", header)
    kept = [f for f in fields if (f.split(b":", 1)[0].strip().upper() in names) != bool(match[1])]
    return b"".join(kept) + CRLF


def parse_sequence_set(text, largest):
    """[(low, high)] from `1`, `2:3`, `4:*`, `1,3`; `*` is `largest`."""
    ranges = []
    for part in text.split(b","):
        match = SET_PART.fullmatch(part)
        if not match:
            raise Refused(b"BAD invalid message set")
        ends = [None if end == b"*" else int(end) for end in (match[1], match[2] or match[1])]
        if 0 in ends:
            raise Refused(b"BAD invalid message set")
        ends = [largest if end is None else end for end in ends]
        ranges.append((min(ends), max(ends)))
    return ranges


def parse_flags(args):
    """STORE's flags, a list or bare atoms, as the canonical system flags."""
    words = [word for arg in args for word in (arg if isinstance(arg, list) else [arg])]
    canonical = {flag.lower(): flag for flag in SYSTEM_FLAGS}
    flags = {canonical.get(word.decode("ascii", "replace").lower()) if isinstance(word, bytes)
             else None for word in words}
    if None in flags:
        raise Refused(b"BAD only system flags can be stored")
    return flags


def flag_list(flags):
    return b"(" + " ".join(sorted(flags)).encode() + b")"


def internaldate(seconds):
    """RFC 3501 9 date-time, in UTC: "17-Jul-1996 02:44:25 +0000"."""
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{when.day:02d}-{MONTHS[when.month - 1]}-{when:%Y %H:%M:%S} +0000"
