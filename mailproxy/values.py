"""nginx's value syntax, for the directive table: times, sizes, numbers,
flags and fixed choices, and the converters that turn a directive's
argument list into its value.

Values are parsed the way nginx parses them: times such as `30s`, `5m`,
`1h30m` or bare seconds; sizes such as `4k` or `1m`; flags `on`/`off`.
A value that does not parse raises `BadValue`, and config.py adds the
file:line.
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
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_number(text):
    if not (text.isascii() and text.isdigit()):
        raise BadValue(f'invalid number "{text}"')
    return int(text)


def parse_positive(text):
    number = parse_number(text)
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
