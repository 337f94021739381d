"""Reading nginx-syntax text: files, `include`, and nginx's lexing errors.

crossplane (nginx's own Python parser) lexes and parses one file at a time;
this module follows `include` itself, as nginx does: a relative pattern is
taken from the configuration file's folder (nginx's conf prefix), whichever
file says it, and a pattern with wildcards may match nothing.  Following
includes here, not inside crossplane, lets config.py decide per block: the
blocks mailproxy skips (`http {}`, `stream {}`) are still lexed, so a syntax
error there is an error, but their includes are never opened, and their
files need not exist on a mail proxy.  Every argument then has nginx's
escapes processed, here and only here (`unescape`).  The log and pid files
are opened as nginx opens them while it reads the configuration
(`check_writable`), so a missing folder fails `-t`.

Every mistake is a ConfigError naming file:line in nginx's words, e.g.
`unexpected "}" in /etc/mailproxy/mail.conf:12`.
"""

import glob
import os
import re
import tempfile
from dataclasses import dataclass

import crossplane

COMMAND_LINE = "<command line>"
# An include that includes itself (directly or not) would recurse for ever;
# real configurations nest two or three deep.
MAX_INCLUDE_DEPTH = 32
WILDCARDS = "*?["       # nginx's ngx_conf_include: a name with one of these is a mask
# nginx's ngx_conf_read_token rewrites these pairs in every word, quoted or
# not; any other backslash stays as written.  crossplane's lexer only turns
# a quote's own escape (\" inside "...") into the quote, so the rest is
# done here, once, for every argument (see `unescape`).
ESCAPES = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


class ConfigError(Exception):
    """A configuration mistake; str() is the nginx-style message."""

    def __init__(self, message, where=None):
        super().__init__(f"{message} in {where}" if where else message)


@dataclass(frozen=True)
class Where:
    file: str
    line: int

    def __str__(self):
        return "command line" if self.file == COMMAND_LINE else f"{self.file}:{self.line}"


class Block:
    """The directives of one block of one file, for config.py to walk:
    iterating gives (crossplane entry, Where); `inside()` and `include()`
    give the Blocks a block entry and an `include` lead to."""

    def __init__(self, file, entries, conf_prefix, depth=0):
        self.file, self.entries = file, entries
        self.conf_prefix, self.depth = conf_prefix, depth

    def __iter__(self):
        for entry in self.entries:
            yield entry, Where(self.file, entry["line"])

    def inside(self, entry):
        return Block(self.file, entry["block"], self.conf_prefix, self.depth)

    def include(self, pattern, where):
        """The Blocks of the files `include pattern;` names, in name order."""
        if self.depth >= MAX_INCLUDE_DEPTH:
            raise ConfigError(f"includes nested more than {MAX_INCLUDE_DEPTH} deep", where)
        path = os.path.join(self.conf_prefix, pattern)     # an absolute pattern stays
        if any(char in path for char in WILDCARDS):
            paths = sorted(glob.glob(path))
        else:
            _check_readable(path, where)
            paths = [path]
        return [Block(name, parse_file(name), self.conf_prefix, self.depth + 1)
                for name in paths]


def read(path, conf_prefix):
    """The top-level Block of the file at `path` (an absolute path)."""
    return Block(path, parse_file(path), conf_prefix)


def read_text(text, conf_prefix):
    """The -g string, parsed as if it were a file of its own."""
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as tmp:
        tmp.write(text)
        tmp.flush()
        entries = parse_file(tmp.name)
    return Block(COMMAND_LINE, entries, conf_prefix)


def _check_readable(path, where):
    """nginx opens an include named without wildcards before reading it."""
    try:
        open(path, "rb").close()
    except OSError as exc:
        raise ConfigError(f'open() "{path}" failed ({exc.errno}: {exc.strerror})',
                          where) from None


def check_writable(path, where, keep=True):
    """Open `path` for appending, as nginx opens a log or pid file named in
    the configuration; a file this created is removed unless `keep`."""
    existed = os.path.lexists(path)
    try:
        open(path, "a").close()
    except OSError as exc:
        raise ConfigError(f'open() "{path}" failed ({exc.errno}: {exc.strerror})',
                          where) from None
    if not (keep or existed):
        os.unlink(path)


# ----------------------------------------------------------------- one file

def parse_file(path):
    """crossplane's entries for the one file `path`; lexing errors raised."""
    payload = crossplane.parse(path, catch_errors=False, single=True, check_ctx=False,
                               check_args=False, strict=False, comments=False,
                               onerror=lambda exc: exc)
    for error in payload["errors"]:     # crossplane records, not raises, the first one
        _raise(error)
    _check_terminators(path)
    entries = payload["config"][0]["parsed"]
    _unescape_all(entries)
    return entries


def unescape(word):
    """One word as nginx reads it: `\\t`, `\\r`, `\\n`, `\\"`, `\\'` and
    `\\\\` become the byte they name."""
    return _ESCAPE.sub(lambda match: ESCAPES.get(match.group(1), match.group()), word)


def _unescape_all(entries):
    for entry in entries:
        entry["args"] = [unescape(arg) for arg in entry["args"]]
        _unescape_all(entry.get("block", ()))


def _raise(error):
    """crossplane's record of an error -> nginx's message."""
    exc = error["callback"]
    if isinstance(exc, crossplane.errors.NgxParserBaseException):
        raise ConfigError(exc.strerror, Where(exc.filename, exc.lineno))
    if isinstance(exc, StopIteration):      # crossplane's lexer ran out inside a directive
        raise ConfigError('unexpected end of file, expecting ";" or "}"',
                          Where(error["file"], _line_count(error["file"])))
    where = Where(error["file"], error["line"]) if error["line"] else None
    if isinstance(exc, OSError):
        raise ConfigError(f'open() "{exc.filename}" failed ({exc.errno}: {exc.strerror})',
                          where)
    raise ConfigError(error["error"], where)


def _check_terminators(path):
    """crossplane takes `name args }` as a whole directive; nginx says
    `unexpected "}"`, and so do we."""
    previous = None
    try:
        for token, line, quoted in crossplane.lex(path):
            if token.startswith("#") and not quoted:
                continue                            # a comment
            if token == "}" and not quoted and previous is not None and \
                    (previous[1] or previous[0] not in (";", "{", "}")):
                raise ConfigError('unexpected "}"', Where(path, line))
            previous = (token, quoted)
    except crossplane.errors.NgxParserBaseException as exc:
        # braces crossplane's parser let pass (a block with no name before
        # it) are still counted by its lexer
        end = "end of file" in exc.strerror         # nginx names the last line
        raise ConfigError(exc.strerror, Where(path, _line_count(path) if end else exc.lineno)) \
            from None


def _line_count(path):
    """The number of the file's last line, where nginx reports an
    unexpected end of file."""
    with open(path, "rb") as file:
        return file.read().count(b"\n") + 1
