"""What a word is: the tokenizing rules of the three client protocols, said once.

The parsers (imap.py, pop3.py, smtp.py), the trace redactor (ops/trace.py)
and the logs all read client bytes through these definitions, so no two of
them can disagree on where a word, a line or a literal ends: a redactor
that split differently from a parser would show, as a harmless word, bytes
the parser takes as a password.

* A line ends at LF; one CR right before it is part of the line end.  A CR
  anywhere else makes the command invalid (spec 3.0, as nginx).
* Words are separated by SP (0x20) only, and a run of SPs is one separator.
  IMAP: RFC 3501 9 (`SP`), as nginx.  POP3 and SMTP: nginx's parsers
  (spec 3.2, 3.3.3: "split on spaces"); TAB, VT and FF are ordinary bytes
  of a word, so `AUTH PLAIN<TAB>x` names a mechanism "PLAIN<TAB>x".
* An IMAP literal is `{N}` or `{N+}` (RFC 7888) at the very end of a line;
  its N bytes follow the line end.

Which arguments of which verb are secret is said by each protocol module
(its SECRETS table of `Secret` entries), next to the verbs themselves.
"""

import re
from dataclasses import dataclass

SP = b" "
LF = b"\n"
CR = b"\r"
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}")           # RFC 3501 9, RFC 7888
LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}$")
# The SASL mechanisms a client may name (sasl.EXCHANGES): only these are
# shown in a trace; any other "mechanism" may be a credential in disguise.
MECHANISMS = frozenset({b"PLAIN", b"LOGIN", b"CRAM-MD5", b"EXTERNAL", b"XOAUTH2",
                        b"OAUTHBEARER"})


@dataclass(frozen=True)
class Secret:
    """Which arguments of one verb prove an identity.  The first `public`
    arguments may be shown, and only when the command has one of the
    argument counts in `counts` (with another count a password may sit
    inside a "public" word); with `mechanism`, the first argument is shown
    only if it names a known SASL mechanism."""
    public: int = 0
    counts: tuple = ()
    mechanism: bool = False

    def shown_arguments(self, args):
        """How many leading arguments of `args` a trace may show."""
        if self.counts and len(args) not in self.counts:
            return 0
        if self.mechanism and args and args[0].upper() not in MECHANISMS:
            return 0
        return min(self.public, len(args))


def line_body(line):
    """The line without its end: LF, or CR LF."""
    line = line[:-1] if line.endswith(LF) else line
    return line[:-1] if line.endswith(CR) else line


def lines(data):
    """`data` cut after each LF (the last piece may lack one)."""
    pieces = data.split(LF)
    found = [piece + LF for piece in pieces[:-1]]
    return found + [pieces[-1]] if pieces[-1] else found


def has_bare_cr(body):
    """A CR that is not part of the line end (refused by every parser)."""
    return CR in body


def has_control(body):
    """A control byte other than TAB (a bare CR included): SMTP refuses
    the line, since its words reach the auth service's headers, where RFC
    9110 5.5 forbids them (issue 16)."""
    return CONTROL.search(body) is not None


def first_word(text):
    """(the first word, what follows its separator) of `text`."""
    word, _, rest = text.partition(SP)
    return word, rest.lstrip(SP)


def split_words(text):
    """Every word of `text`: runs of SP are one separator."""
    return [word for word in text.split(SP) if word]


def ends_with_literal(body):
    """The `{N}` or `{N+}` that ends an IMAP line body, as a match, or None."""
    return LITERAL_AT_END.search(body)
