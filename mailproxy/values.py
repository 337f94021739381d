"""nginx's value syntax, for the directive table: times, sizes, numbers,
flags and fixed choices, and the converters that turn a directive's
argument list into its value.

Values are parsed the way nginx parses them: times such as `30s`, `5m`,
`1h30m` or bare seconds; sizes such as `4k` or `1m`; flags `on`/`off`.
Every number and size has a range, nginx's where nginx has one (the MAX_*
constants below), so a value that cannot work fails `mailproxy -t` rather
than the start or a session.  A value that does not parse, or is out of its
range, raises `BadValue`, and config.py adds the file:line.
"""

import re

# error_log levels and syslog severities, as nginx names them, lowest first
LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")

_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400,
               "w": 604800, "M": 2592000, "y": 31536000}
_TIME_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w|M|y)?")
MAX_TIME = (2 ** 31 - 1) / 1000    # seconds: poll() takes a C int of milliseconds (~24.8 days)
_SIZE = re.compile(r"(\d+)([kKmMgG]?)")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
# nginx's ceilings: ngx_atoi refuses a number above NGX_MAX_INT_T_VALUE and
# ngx_parse_size a size above NGX_MAX_SIZE_T_VALUE (both 2**63 - 1 on 64 bits).
MAX_INT_T = 2 ** 63 - 1
MAX_SIZE_T = 2 ** 63 - 1
# A value handed to the kernel as a C int (listen()'s backlog, setsockopt()):
# Python refuses a larger one with OverflowError, so it cannot work here.
MAX_C_INT = 2 ** 31 - 1
# Buffers: one read returns at most Linux's MAX_RW_COUNT (INT_MAX rounded
# down to a page), so a larger buffer could never fill; nginx takes more,
# but here each read allocates its buffer, and a larger one only fails.
MAX_BUFFER = 0x7FFFF000
# Bytes no value may hold: every argument reaches the wire (greetings,
# capabilities, auth request headers), the logs or `-T`'s output, where a
# line end or a NUL would start a line of its own or cut one short.
LINE_BREAKERS = ("\0", "\r", "\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPES = {"\t": "\\t", "\r": "\\r", "\n": "\\n"}


class BadValue(ValueError):
    """An argument that does not parse; config.py adds the file:line."""


class BadDirective(BadValue):
    """A BadValue whose text already names its directive, as nginx words
    it (`host not found in auth_http "..."`): config.py adds only file:line."""


# ---------------------------------------------------------------- values

def parse_time(text):
    """nginx time: "90", "30s", "5m", "1h30m", "500ms" -> seconds (float)."""
    pos, total = 0, 0.0
    while pos < len(text):
        match = _TIME_PART.match(text, pos)
        if not match:
            raise BadValue(f'invalid value "{text}"')
        total += int(match.group(1)) * _TIME_UNITS[match.group(2) or "s"]
        pos = match.end()
    if not text or total > MAX_TIME:
        raise BadValue(f'invalid value "{text}"')
    return total


def parse_size(text):
    """nginx size: "4096", "4k", "1m" -> bytes."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise BadValue(f'invalid value "{text}"')
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size > MAX_SIZE_T:
        raise BadValue(f'invalid value "{text}"')
    return size


def parse_buffer(text):
    """A buffer size (`proxy_buffer`, `imap_client_buffer`): a size from 1
    byte to MAX_BUFFER."""
    size = parse_size(text)
    if not 0 < size <= MAX_BUFFER:
        raise BadValue(f'invalid value "{text}", a buffer must be 1 to {MAX_BUFFER} bytes')
    return size


def parse_number(text, high=MAX_INT_T):
    """A decimal number from 0 to `high` (nginx's ngx_atoi, at most 2**63 - 1)."""
    if not (text.isascii() and text.isdigit()) or int(text) > high:
        raise BadValue(f'invalid number "{text}"')
    return int(text)


def parse_positive(text, high=MAX_INT_T):
    number = parse_number(text, high)
    if number == 0:
        raise BadValue(f'invalid value "{text}"')
    return number


def parse_flag(text):
    if text not in ("on", "off"):
        raise BadValue(f'invalid value "{text}", it must be "on" or "off"')
    return text == "on"


def one_of(*choices):
    def parse(text):
        if text not in choices:
            raise BadValue(f'invalid value "{text}"')
        return text
    return parse


def plain_text(text):
    """`text` unchanged; BadValue if it holds a NUL, CR or LF, shown escaped
    so that the error stays one line."""
    if any(char in text for char in LINE_BREAKERS):
        raise BadValue(f'invalid value "{shown(text)}"')
    return text


def shown(text):
    """`text` with its control bytes written as escapes, for one log line."""
    return _CONTROL.sub(lambda match: _ESCAPES.get(match.group(), f"\\x{ord(match.group()):02x}"),
                        text)


# ---------------------------------------------------- argument converters
# Each takes the directive's argument list and returns its value.

def single(parse):
    return lambda args: parse(args[0])


def words(args):
    return tuple(args)


def methods(allowed):
    def parse(args):
        for arg in args:
            if arg not in allowed:
                raise BadValue(f'invalid value "{arg}"')
        return frozenset(args)
    return parse


def pair(args):
    """A two-argument list item, e.g. `auth_http_header X-Secret s3cr3t`."""
    return ((args[0], args[1]),)


def item(args):
    """A one-argument list item, e.g. `ssl_certificate rsa.pem`."""
    return (args[0],)
