"""Directive arguments that name an address: `listen` and `status_listen`,
the syslog server of `error_log`, `auth_http`, `resolver` and
`set_real_ip_from`.

Where nginx resolves a host name at start-up (`listen`, the syslog server,
`auth_http`, `set_real_ip_from`), this module resolves it when the
configuration loads, so a name that does not resolve fails `mailproxy -t`
with its file:line.
`listen` makes one frozen `Listen` per address, with its parameters (`ssl`,
`proxy_protocol`, a `unix:` path, ...).
"""

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import NamedTuple

from .values import (LEVELS, MAX_C_INT, BadDirective, BadValue, parse_flag, parse_number,
                     parse_positive, parse_size, parse_time)

DEFAULT_BACKLOG = 511       # nginx's NGX_LISTEN_BACKLOG on Linux
UNIX_PREFIX = "unix:"
MAX_UNIX_PATH = 107         # sizeof(sun_path) - 1 on Linux: the path and its NUL must fit
TCP_ONLY_PARAMS = ("ipv6only", "multipath", "so_keepalive")   # meaningless on unix: sockets
# so_keepalive=idle:intvl:cnt.  nginx takes any number and logs the kernel's
# refusal when it sets up the socket; Linux refuses more than these
# (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT), so such a value
# cannot work here and -t says so.  0 (or nothing) leaves the kernel's own.
KEEPALIVE_LIMITS = (32767, 32767, 127)


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
    except (socket.gaierror, UnicodeError):     # a name IDNA cannot encode is not found
        raise BadValue(f'host not found in syslog server "{text}"') from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


# -------------------------------------------- resolver, auth_http, real_ip

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


class AuthHttp(NamedTuple):
    """Where the auth service is: `host` as written (nginx's Host header),
    `port`, `uri`, and `address`, what the host resolved to at load (None:
    connect to `host` as it is)."""
    host: str
    port: int
    uri: str
    address: str = None


def auth_http_url(args):
    """`[http://]host[:port][/uri]` or `unix:/path[:/uri]` -> an AuthHttp;
    a unix: address gives AuthHttp("unix:/path", None, uri)."""
    url = args[0]
    if url.startswith("https://"):
        raise BadValue("https protocol is not supported")
    rest = url[len("http://"):] if url.startswith("http://") else url
    if rest.startswith(UNIX_PREFIX):
        return _unix_auth_http(rest)
    hostport, slash, uri = rest.partition("/")
    host, port = split_host_port(hostport, default_port=80)
    if not host:
        raise BadValue(f'invalid URL "{url}"')
    return AuthHttp(host, port, "/" + uri if slash else "/", _first_address(host, port, rest))


def _first_address(host, port, text):
    """nginx resolves the auth service's name once, at load, and uses the
    first address, IPv4 ones before IPv6 ones (ngx_inet_resolve_host)."""
    found = sorted(_lookup(host, port) or [], key=lambda item: item[0] != socket.AF_INET)
    if not found:
        raise BadDirective(f'host not found in auth_http "{text}"')
    return found[0][1]


def _lookup(host, port):
    """`host` resolved -> [(family, numeric address)], IPv4 and IPv6 only,
    in the resolver's order, without duplicates; None if it is not found
    (a name IDNA cannot encode is not found either)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return None
    found = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0]) not in found:
            found.append((family, sockaddr[0]))
    return found


def _unix_auth_http(text):
    """`unix:/path[:/uri]` as nginx's ngx_parse_unix_domain_url reads it:
    the URI follows the first colon after the path (default "/").  nginx
    would send a URI without its leading "/" as it is, in a request line no
    HTTP server takes; here it is an error."""
    path, _, uri = text[len(UNIX_PREFIX):].partition(":")
    if not path:
        raise BadValue(f'no path in the unix domain socket "{text}"')
    if len(path.encode()) > MAX_UNIX_PATH:
        raise BadValue(f'too long path in the unix domain socket "{text}"')
    if uri and not uri.startswith("/"):
        raise BadValue(f'invalid URI "{uri}" in "{text}"')
    return AuthHttp(UNIX_PREFIX + path, None, uri or "/")


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
    found = _lookup(text, None)
    if found is None:
        raise BadValue(f'host not found in "{text}"')
    networks = []
    for _, address in found:
        network = ipaddress.ip_network(address.partition("%")[0])
        if network not in networks:
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
    found = _lookup(host, port)
    if found is None:
        raise BadValue(f'host not found in "{addr}:{port}"')
    return found


def _keepalive(text):
    if text in ("on", "off"):
        return text == "on"
    parts = text.split(":")
    if len(parts) != 3 or not any(parts):
        raise BadValue(f'invalid so_keepalive value: "so_keepalive={text}"')
    try:
        return tuple(_keepalive_part(*job) for job in zip(parts, KEEPALIVE_LIMITS,
                                                         (True, True, False)))
    except BadValue:
        raise BadValue(f'invalid so_keepalive value: "so_keepalive={text}"') from None


def _keepalive_part(text, high, seconds):
    """One of idle, intvl (whole seconds, as nginx's ngx_parse_time(, 1)) or
    cnt; None when empty or 0."""
    value = parse_time(text) if seconds and text else parse_number(text) if text else 0
    if value != int(value) or value > high:
        raise BadValue(text)
    return int(value) or None


def _socket_buffer(text):
    """rcvbuf=/sndbuf=: setsockopt() takes a C int."""
    size = parse_size(text)
    if size > MAX_C_INT:
        raise BadValue(f'invalid value "{text}"')
    return size


_LISTEN_PARAMS = {
    "backlog": lambda v: ("backlog", parse_positive(v, MAX_C_INT)),   # listen() takes an int
    "rcvbuf": lambda v: ("rcvbuf", _socket_buffer(v)),
    "sndbuf": lambda v: ("sndbuf", _socket_buffer(v)),
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

