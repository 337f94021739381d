"""The directive table: every directive mailproxy knows, as nginx spells it.

Each `Directive` says where it may appear (its contexts), how many arguments
it takes, how those arguments become a Python value, what the default is,
and whether mailproxy honours it yet.  `config.py` walks the parsed file and
consults this table for every line; nothing else in the program knows about
directive names.

Values are parsed the way nginx parses them: times such as `30s`, `5m`,
`1h30m` or bare seconds; sizes such as `4k` or `1m`; flags `on`/`off`.
Defaults are written as nginx text and parsed by the same functions, so
`mailproxy -T` can print every effective setting back in nginx syntax.

The table follows section 1 of the nginx mail reference
(`nginx-mail-spec.md`); the status column marks what is not built yet.
"""

import base64
import ipaddress
import re
import socket
from dataclasses import dataclass, field

from .ops.trace import Rule

# Statuses.  "later" directives are parsed and validated now, but a config
# that uses them is refused with a clear error until the feature exists.
# "gap" directives are nginx behaviour Python's ssl module cannot express:
# only their default is accepted, and docs/directives.md says why.
READY, NOOP, LATER, GAP = "ready", "noop", "later", "gap"

LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
PROTOCOLS = ("imap", "pop3", "smtp")
PROTOCOLS_READY = ("imap", "pop3", "smtp")
# nginx guesses a server's protocol from its first listen port.
PROTOCOL_BY_PORT = {143: "imap", 993: "imap", 110: "pop3", 995: "pop3",
                    25: "smtp", 465: "smtp", 587: "smtp"}
DEFAULT_BACKLOG = 511       # nginx's NGX_LISTEN_BACKLOG on Linux
UNIX_PREFIX = "unix:"
MAX_UNIX_PATH = 107         # sizeof(sun_path) - 1 on Linux: the path and its NUL must fit
TCP_ONLY_PARAMS = ("ipv6only", "multipath", "so_keepalive")   # meaningless on unix: sockets

_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400,
               "w": 604800, "M": 2592000, "y": 31536000}
_TIME_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w|M|y)?")
MAX_TIME = (2 ** 31 - 1) / 1000    # seconds: poll() takes a C int of milliseconds (~24.8 days)
_SIZE = re.compile(r"(\d+)([kKmMgG]?)")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


class BadValue(ValueError):
    """An argument that does not parse; config.py adds the file:line."""


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


TLS_VERSIONS = {"SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}


def ecdh_curve(text):
    """`auto` or one curve name: Python's ssl module sets a single curve."""
    if ":" in text:
        raise BadValue(f'invalid value "{text}": a list of curves is not supported, '
                       "give one curve or auto")
    return text


def verify_client(text):
    if text == "optional_no_ca":
        raise BadValue('"optional_no_ca" is not supported: Python\'s ssl module cannot '
                       "accept a certificate it has not verified")
    return one_of("on", "off", "optional")(text)


def pin(args):
    """`proxy_ssl_pin sha256:BASE64`: the SHA-256 of the backend's public key
    (SubjectPublicKeyInfo), as in HTTP public key pinning (RFC 7469)."""
    kind, _, value = args[0].partition(":")
    try:
        digest = base64.b64decode(value, validate=True)
    except ValueError:
        digest = b""
    if kind != "sha256" or len(digest) != 32:
        raise BadValue(f'invalid pin "{args[0]}", expected sha256:BASE64 of 32 bytes')
    return (digest,)


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


def worker_processes(args):
    if args[0] == "auto":
        return "auto"
    return parse_positive(args[0])


def error_log(args):
    """`error_log file|stderr|syslog:... [level]` -> ((destination, level),).
    A syslog destination's `severity=` is its level when no level is given."""
    dest = syslog(args[0]) if args[0].startswith("syslog:") else args[0]
    level = args[1] if len(args) > 1 else None
    if level is not None and level not in LEVELS:
        raise BadValue(f'invalid value "{level}"')
    severity = getattr(dest, "severity", None)
    if level and severity and level != severity:
        raise BadValue(f'level "{level}" and "severity={severity}" disagree')
    return ((dest, level or severity or "error"),)


# ------------------------------------------------------------------ syslog

# RFC 3164 4.1.1 facility codes, in order, with nginx's names ("intern" is
# syslogd's own, code 5).
SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "intern", "lpr", "news",
                     "uucp", "clock", "authpriv", "ftp", "ntp", "audit", "alert", "cron",
                     "local0", "local1", "local2", "local3", "local4", "local5", "local6",
                     "local7")
SYSLOG_PORT = 514
SYSLOG_TAG = re.compile(r"[A-Za-z0-9_]{1,32}")     # nginx: alphanumerics and _, 32 at most


@dataclass(frozen=True)
class Syslog:
    """An `error_log syslog:...` destination, its server address resolved
    now (as nginx does at start-up).  str() is the text of the config."""
    family: int                 # AF_INET, AF_INET6 or AF_UNIX (datagrams)
    address: object             # a sockaddr tuple, or the socket path
    facility: int = SYSLOG_FACILITIES.index("local7")
    severity: str = None        # the severity= parameter, if given
    tag: str = "mailproxy"      # nginx's default is "nginx"
    hostname: bool = True       # False with `nohostname`
    text: str = field(default="", compare=False)

    def __str__(self):
        return self.text


def syslog(text):
    """`syslog:server=ADDR[:PORT][,facility=F][,severity=S][,tag=T][,nohostname]`."""
    options, hostname = {}, True
    for param in text[len("syslog:"):].split(","):
        name, eq, value = param.partition("=")
        if param == "nohostname":
            hostname = False
        elif eq and name in ("server", "facility", "severity", "tag"):
            if name in options:
                raise BadValue(f'duplicate syslog "{name}"')
            options[name] = value
        else:
            raise BadValue(f'unknown syslog parameter "{param}"')
    if "server" not in options:
        raise BadValue("no syslog server specified")
    facility = options.get("facility", "local7")
    if facility not in SYSLOG_FACILITIES:
        raise BadValue(f'unknown syslog facility "{facility}"')
    severity = options.get("severity")
    if severity is not None and severity not in LEVELS:
        raise BadValue(f'unknown syslog severity "{severity}"')
    tag = options.get("tag", "mailproxy")
    if not SYSLOG_TAG.fullmatch(tag):
        raise BadValue(f'syslog "tag" "{tag}" must be 1-32 letters, digits or "_"')
    family, address = _syslog_address(options["server"])
    return Syslog(family, address, SYSLOG_FACILITIES.index(facility), severity, tag,
                  hostname, text)


def _syslog_address(text):
    """`unix:/dev/log`, `host`, `host:port`, `[v6]:port` -> (family, address)."""
    if text.startswith("unix:"):
        if not text[len("unix:"):].startswith("/"):
            raise BadValue(f'invalid syslog server "{text}"')
        return socket.AF_UNIX, text[len("unix:"):]
    host, port = split_host_port(text, default_port=SYSLOG_PORT)
    if not host or (":" in host and not text.startswith("[")):     # IPv6 needs [ ]
        raise BadValue(f'invalid syslog server "{text}"')
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_DGRAM)
    except socket.gaierror:
        raise BadValue(f'host not found in syslog server "{text}"') from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def trace(args):
    """`trace off|on|CIDR...|login:NAME...` -> None (off) or a trace.Rule:
    every session, or those from the networks or with the logins listed."""
    if args in (["off"], ["on"]):
        return Rule(everyone=True) if args == ["on"] else None
    networks, logins = [], []
    for arg in args:
        if arg.startswith("login:") and len(arg) > len("login:"):
            logins.append(arg[len("login:"):].encode())
            continue
        try:
            networks.append(ipaddress.ip_network(arg, strict=False))
        except ValueError:
            raise BadValue(f'invalid value "{arg}", expected on, off, an address or '
                           'CIDR, or login:NAME') from None
    return Rule(networks=tuple(networks), logins=tuple(logins))


def resolver(args):
    """`resolver off` -> None; otherwise the server addresses (IP literals,
    optional port) and the valid=/ipv4=/ipv6=/status_zone= parameters."""
    if args == ["off"]:
        return None
    for arg in args:
        name, eq, value = arg.partition("=")
        if eq and name in ("ipv4", "ipv6"):
            parse_flag(value)
        elif eq and name == "valid":
            parse_time(value)
        elif not (eq and name == "status_zone"):
            host, _ = split_host_port(arg, default_port=53)
            try:
                ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                raise BadValue(f'invalid resolver address "{arg}"') from None
    return tuple(args)


def auth_http_url(args):
    """`[http://]host[:port][/uri]` or `unix:/path[:/uri]` -> (host, port, uri)."""
    url = args[0]
    if url.startswith("https://"):
        raise BadValue("https protocol is not supported")
    if url.startswith("unix:"):
        raise BadValue(f'unix: auth_http addresses are not implemented yet: "{url}"')
    rest = url[len("http://"):] if url.startswith("http://") else url
    hostport, slash, uri = rest.partition("/")
    host, port = split_host_port(hostport, default_port=80)
    if not host:
        raise BadValue(f'invalid URL "{url}"')
    return (host, port, "/" + uri if slash else "/")


def real_ip_from(args):
    """`set_real_ip_from address|CIDR|hostname|unix:` -> a tuple of trusted
    peers: ipaddress networks, or "unix:" for every unix-domain peer.  A
    host name is resolved now, into one /32 or /128 per address (spec 1.5);
    a CIDR keeps only its network bits (see low_address_bits)."""
    text = args[0]
    if text == UNIX_PREFIX:
        return (UNIX_PREFIX,)
    try:
        return (ipaddress.ip_network(text, strict=False),)
    except ValueError:
        pass
    if "/" in text:
        raise BadValue(f'invalid network "{text}"')
    try:
        infos = socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise BadValue(f'host not found in "{text}"') from None
    networks = []
    for family, _, _, _, sockaddr in infos:
        network = ipaddress.ip_network(sockaddr[0].partition("%")[0])
        if family in (socket.AF_INET, socket.AF_INET6) and network not in networks:
            networks.append(network)
    return tuple(networks)


def low_address_bits(args):
    """nginx's warning for `set_real_ip_from 10.1.2.3/8`: the host bits are
    dropped, so the line does not mean what it seems to."""
    try:
        ipaddress.ip_network(args[0], strict=True)
    except ValueError:
        if "/" in args[0]:
            return f"low address bits of {args[0]} are meaningless"
    return None


def pair(args):
    """A two-argument list item, e.g. `auth_http_header X-Secret s3cr3t`."""
    return ((args[0], args[1]),)


def item(args):
    """A one-argument list item, e.g. `ssl_certificate rsa.pem`."""
    return (args[0],)


# ------------------------------------------------------------------ listen

@dataclass(frozen=True)
class Listen:
    """One listening address, after the hostname is resolved."""
    host: str                   # numeric address; "0.0.0.0" for "*"
    port: int
    family: int
    ssl: bool = False
    proxy_protocol: bool = False
    backlog: int = DEFAULT_BACKLOG
    rcvbuf: int = None
    sndbuf: int = None
    bind: bool = False
    ipv6only: bool = True
    multipath: bool = False
    so_keepalive: object = None  # None, True/False, or (idle, intvl, cnt)
    text: str = field(default="", compare=False)
    where: str = field(default="", compare=False)

    @property
    def wildcard(self):
        return self.host in ("0.0.0.0", "::")

    @property
    def name(self):
        """addr:port as nginx logs it; "unix:/path" for a unix: socket."""
        if self.family == socket.AF_UNIX:
            return UNIX_PREFIX + self.host
        host = f"[{self.host}]" if self.family == socket.AF_INET6 else self.host
        return f"{host}:{self.port}"


def split_host_port(text, default_port=None):
    """"host:port", "[v6]:port", "port", "host" -> (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.isdigit():
        host, port = "", text
    elif ":" in text:
        host, _, port = text.rpartition(":")
    else:
        host, port = text, None
    if port is None:
        if default_port is None:
            raise BadValue(f'no port in "{text}"')
        return host, default_port
    number = int(port) if port.isascii() and port.isdigit() else None
    if number is None or not 0 < number < 65536:
        raise BadValue(f'invalid port in "{text}"')
    return host, number


def _listen_ports(text):
    """The port part may be a range (nginx 1.15.10): "1143-1145"."""
    if text.startswith("["):
        head, _, rest = text.partition("]")
        addr, portspec = head + "]", rest[1:]
    elif ":" in text:
        addr, _, portspec = text.rpartition(":")
    else:
        addr, portspec = "*", text
    low, dash, high = portspec.partition("-")
    try:
        _, first = split_host_port(low)
        last = split_host_port(high)[1] if dash else first
    except BadValue:
        if ":" not in text and not dash:
            raise                       # a bare word: there is no port at all
        raise BadValue(f'invalid port in "{text}"') from None
    if last < first:
        raise BadValue(f'invalid port range in "{text}"')
    return addr, range(first, last + 1)


def _resolve(addr, port):
    """Numeric or named address -> [(family, numeric host)], duplicates dropped."""
    if addr in ("*", ""):
        return [(socket.AF_INET, "0.0.0.0")]
    host = addr[1:-1] if addr.startswith("[") else addr
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise BadValue(f'host not found in "{addr}:{port}"') from None
    found = []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr[0]) not in found and family in (socket.AF_INET, socket.AF_INET6):
            found.append((family, sockaddr[0]))
    return found


def _keepalive(text):
    if text in ("on", "off"):
        return text == "on"
    parts = text.split(":")
    if len(parts) != 3 or not any(parts):
        raise BadValue(f'invalid so_keepalive value: "so_keepalive={text}"')
    idle, intvl, cnt = parts
    return (parse_time(idle) if idle else None,
            parse_time(intvl) if intvl else None,
            parse_number(cnt) if cnt else None)


_LISTEN_PARAMS = {
    "backlog": lambda v: ("backlog", parse_positive(v)),
    "rcvbuf": lambda v: ("rcvbuf", parse_size(v)),
    "sndbuf": lambda v: ("sndbuf", parse_size(v)),
    "ipv6only": lambda v: ("ipv6only", parse_flag(v)),
    "so_keepalive": lambda v: ("so_keepalive", _keepalive(v)),
}


def listen(args):
    """`listen address:port [params]` -> a tuple of Listen entries."""
    options = _listen_options(args[1:])
    if args[0].startswith(UNIX_PREFIX):
        return (_unix_listen(args, options),)
    addr, ports = _listen_ports(args[0])
    entries = []
    for port in ports:
        for family, host in _resolve(addr, port):
            entry = Listen(host, port, family, text=" ".join(args), **options)
            if entry not in entries:
                entries.append(entry)
    return tuple(entries)


def _listen_options(params):
    """The listen parameters -> Listen keyword arguments."""
    options = {}
    for param in params:
        name, eq, value = param.partition("=")
        if eq and name in _LISTEN_PARAMS:
            key, parsed = _LISTEN_PARAMS[name](value)
            options[key] = parsed
            options["bind"] = True
        elif not eq and param in ("ssl", "proxy_protocol", "bind", "multipath"):
            options[param] = True
            if param == "multipath":
                options["bind"] = True
        else:
            raise BadValue(f'invalid parameter "{param}"')
    return options


def _unix_listen(args, options):
    """`listen unix:/path [params]`: a unix-domain socket (nginx 1.3.5).
    Its "port" is 0 and its name in the logs is "unix:/path"."""
    path = args[0][len(UNIX_PREFIX):]
    if not path:
        raise BadValue(f'no path in the unix domain socket "{args[0]}"')
    if len(path.encode()) > MAX_UNIX_PATH:
        raise BadValue(f'too long path in the unix domain socket "{args[0]}"')
    for name in TCP_ONLY_PARAMS:
        if name in options:
            raise BadValue(f'"{name}" is not supported on the unix domain socket "{args[0]}"')
    return Listen(path, 0, socket.AF_UNIX, text=" ".join(args), **options)


def status_listen(args):
    """`status_listen off | [address:]port` -> a Listen entry, or None.  A
    bare port means 127.0.0.1: the status page is private unless the
    configuration names another address."""
    if args[0] == "off":
        return None
    host, port = split_host_port(args[0])
    family, numeric = _resolve(host or "127.0.0.1", port)[0]
    return Listen(numeric, port, family, text=args[0])


# ------------------------------------------------------------------- table

@dataclass(frozen=True)
class Directive:
    """One row of the table.

    `nargs` is (min, max), max None for "any number".  `parse` turns the
    argument list into the value; `warn`, if set, returns the text of an
    nginx `[warn]` about the arguments, or None.  `repeat` is True for list directives:
    each occurrence appends at its own level, and a level that has any
    replaces the inherited list.  `default` is nginx text (a list of
    argument lists for list directives), parsed at start-up.  A list
    directive's `parse` returns a tuple of items; occurrences concatenate.
    """
    name: str
    contexts: tuple
    nargs: tuple
    parse: object = None
    default: object = None
    repeat: bool = False
    block: bool = False
    status: str = READY
    note: str = ""
    warn: object = None


MAIN, EVENTS, MAIL, SERVER = "main", "events", "mail", "server"
M_S = (MAIL, SERVER)

_ROWS = [
    # top level (nginx core)
    Directive("worker_processes", (MAIN,), (1, 1), worker_processes, ["1"]),
    Directive("error_log", (MAIN, MAIL, SERVER), (1, 2), error_log, [["stderr", "error"]],
              repeat=True),
    Directive("pid", (MAIN,), (1, 1), single(str)),
    Directive("user", (MAIN,), (1, 2), words),
    Directive("worker_rlimit_nofile", (MAIN,), (1, 1), single(parse_positive)),
    Directive("shutdown_timeout", (MAIN,), (1, 1), single(parse_time), ["0"]),
    Directive("worker_shutdown_timeout", (MAIN,), (1, 1), single(parse_time), ["0"],
              note="nginx's name for shutdown_timeout"),
    Directive("status_listen", (MAIN,), (1, 1), status_listen, ["off"],
              note="beyond nginx: the status endpoint (ops/status.py)"),
    Directive("events", (MAIN,), (0, 0), block=True),
    Directive("worker_connections", (EVENTS,), (1, 1), single(parse_positive), ["512"]),
    Directive("mail", (MAIN,), (0, 0), block=True),
    Directive("server", (MAIL,), (0, 0), block=True),
    # ngx_mail_core_module
    Directive("listen", (SERVER,), (1, None), listen, repeat=True),
    Directive("protocol", (SERVER,), (1, 1), single(one_of(*PROTOCOLS))),
    Directive("timeout", M_S, (1, 1), single(parse_time), ["60s"]),
    Directive("server_name", M_S, (1, 1), single(str)),
    Directive("resolver", M_S, (1, None), resolver, ["off"]),
    Directive("resolver_timeout", M_S, (1, 1), single(parse_time), ["30s"]),
    Directive("max_errors", M_S, (1, 1), single(parse_number), ["5"]),
    Directive("so_keepalive", M_S, (1, 1), single(parse_flag),
              note="legacy alias of the listen parameter so_keepalive="),
    # ngx_mail_auth_http_module
    Directive("auth_http", M_S, (1, 1), auth_http_url),
    Directive("auth_http_header", M_S, (2, 2), pair, repeat=True),
    Directive("auth_http_pass_client_cert", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("auth_http_timeout", M_S, (1, 1), single(parse_time), ["60s"]),
    # ngx_mail_proxy_module
    Directive("proxy", M_S, (1, 1), single(parse_flag), ["off"], status=NOOP,
              note="accepted and ignored, as in nginx"),
    Directive("proxy_buffer", M_S, (1, 1), single(parse_size), ["4k"]),
    Directive("proxy_pass_error_message", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("proxy_protocol", M_S, (1, 1), single(one_of("on", "off", "v2")), ["off"]),
    Directive("proxy_smtp_auth", M_S, (1, 1), single(one_of("on", "off", "plain", "login")),
              ["off"]),
    Directive("proxy_timeout", M_S, (1, 1), single(parse_time), ["24h"]),
    Directive("xclient", M_S, (1, 1), single(parse_flag), ["on"]),
    # ngx_mail_realip_module
    Directive("set_real_ip_from", M_S, (1, 1), real_ip_from, repeat=True,
              warn=low_address_bits),
    # ngx_mail_imap_module
    Directive("imap_auth", M_S, (1, None), methods({"plain", "login", "cram-md5", "external"}),
              ["plain"]),
    Directive("imap_capabilities", M_S, (1, None), words,
              [["IMAP4", "IMAP4rev1", "UIDPLUS"]], repeat=True),
    Directive("imap_client_buffer", M_S, (1, 1), single(parse_size), ["4k"]),
    # ngx_mail_pop3_module
    Directive("pop3_auth", M_S, (1, None), methods({"plain", "apop", "cram-md5", "external"}),
              ["plain"]),
    Directive("pop3_capabilities", M_S, (1, None), words, [["TOP", "USER", "UIDL"]],
              repeat=True),
    # ngx_mail_smtp_module
    Directive("smtp_auth", M_S, (1, None),
              methods({"plain", "login", "cram-md5", "external", "none"}), ["plain", "login"]),
    Directive("smtp_capabilities", M_S, (1, None), words, [], repeat=True),
    Directive("smtp_client_buffer", M_S, (1, 1), single(parse_size), ["4k"]),
    Directive("smtp_greeting_delay", M_S, (1, 1), single(parse_time), ["0"]),
    # ngx_mail_ssl_module
    Directive("starttls", M_S, (1, 1), single(one_of("on", "off", "only")), ["off"]),
    Directive("ssl_certificate", M_S, (1, 1), item, repeat=True),
    Directive("ssl_certificate_key", M_S, (1, 1), item, repeat=True),
    Directive("ssl_password_file", M_S, (1, 1), single(str)),
    Directive("ssl_certificate_compression", M_S, (1, 1), single(parse_flag), ["off"],
              status=GAP, note="Python's ssl module cannot turn it on"),
    Directive("ssl_dhparam", M_S, (1, 1), single(str)),
    Directive("ssl_ecdh_curve", M_S, (1, 1), single(ecdh_curve), ["auto"]),
    Directive("ssl_protocols", M_S, (1, None), methods(TLS_VERSIONS), ["TLSv1.2", "TLSv1.3"]),
    Directive("ssl_ciphers", M_S, (1, 1), single(str), ["HIGH:!aNULL:!MD5"]),
    Directive("ssl_prefer_server_ciphers", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("ssl_session_cache", M_S, (1, 3), words, ["none"], status=GAP,
              note="Python's ssl module keeps OpenSSL's built-in per-process cache"),
    Directive("ssl_session_tickets", M_S, (1, 1), single(parse_flag), ["on"]),
    Directive("ssl_session_ticket_key", M_S, (1, 1), item, repeat=True, status=GAP,
              note="Python's ssl module cannot load ticket keys"),
    Directive("ssl_session_timeout", M_S, (1, 1), single(parse_time), ["5m"], status=GAP,
              note="Python's ssl module keeps OpenSSL's session lifetime, 2 hours"),
    Directive("ssl_verify_client", M_S, (1, 1), single(verify_client), ["off"]),
    Directive("ssl_verify_depth", M_S, (1, 1), single(parse_positive), ["1"], status=GAP,
              note="Python's ssl module cannot limit the chain depth"),
    Directive("ssl_client_certificate", M_S, (1, 1), single(str)),
    Directive("ssl_trusted_certificate", M_S, (1, 1), single(str)),
    Directive("ssl_crl", M_S, (1, 1), single(str)),
    Directive("ssl_conf_command", M_S, (2, 2), pair, repeat=True, status=GAP,
              note="Python's ssl module has no SSL_CONF interface"),
    # beyond nginx: TLS toward the backend
    Directive("proxy_ssl", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("proxy_starttls", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("proxy_ssl_verify", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("proxy_ssl_trusted_certificate", M_S, (1, 1), single(str)),
    Directive("proxy_ssl_verify_depth", M_S, (1, 1), single(parse_positive), ["1"],
              status=GAP, note="Python's ssl module cannot limit the chain depth"),
    Directive("proxy_ssl_name", M_S, (1, 1), single(str)),
    Directive("proxy_ssl_server_name", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("proxy_ssl_protocols", M_S, (1, None), methods(TLS_VERSIONS),
              ["TLSv1.2", "TLSv1.3"]),
    Directive("proxy_ssl_ciphers", M_S, (1, 1), single(str), ["DEFAULT"]),
    Directive("proxy_ssl_certificate", M_S, (1, 1), single(str)),
    Directive("proxy_ssl_certificate_key", M_S, (1, 1), single(str)),
    Directive("proxy_ssl_pin", M_S, (1, 1), pin, repeat=True),
    # beyond nginx: redacted protocol traces (ops/trace.py)
    Directive("trace", M_S, (1, None), trace, ["off"]),
]

TABLE = {row.name: row for row in _ROWS}

# Names nginx once had, with the reason they are refused.
REMOVED = {
    "ssl": 'the "ssl" directive was removed in nginx 1.25.1, '
           'use the "listen ... ssl" parameter instead',
    "imap": 'the "imap" block was renamed "mail" in nginx 0.5.15',
}
