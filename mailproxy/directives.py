"""The directive table: every directive mailproxy knows, as nginx spells it.

Each `Directive` says where it may appear (its contexts), how many arguments
it takes, how those arguments become a Python value, what the default is,
and whether mailproxy honours it yet.  `config.py` walks the parsed file and
consults this table for every line; nothing else in the program knows about
directive names.

The arguments are parsed the way nginx parses them, by the functions each
row names: values.py has the value syntax (times such as `30s`, `5m`,
`1h30m` or bare seconds; sizes such as `4k` or `1m`; flags `on`/`off`),
addresses.py the arguments that name an address (`listen` and the rest),
and this module the few that belong to one directive.  Defaults are written
as nginx text and parsed by the same functions, so `mailproxy -T` can print
every effective setting back in nginx syntax.

The table follows section 1 of the nginx mail reference
(`nginx-mail-spec.md`); the status column marks what is not built yet.
"""

import base64
import ipaddress
import os
import re
from dataclasses import dataclass

from .addresses import (auth_http_url, listen, low_address_bits, real_ip_from, resolver,
                        status_listen, syslog)
from .ops.trace import Rule
from .values import (LEVELS, BadValue, item, methods, one_of, pair, parse_buffer, parse_flag,
                     parse_number, parse_positive, parse_size, parse_time, shown, single, words)

# Statuses.  "later" directives are parsed and validated now, but a config
# that uses them is refused with a clear error until the feature exists.
# "gap" directives are nginx behaviour mailproxy cannot express: only their
# default is accepted, and docs/directives.md says why (none is left today).
# "ignored" are nginx core directives with no meaning in mailproxy: checked,
# then passed over with a [warn] (see `ignored`).  "skipped" blocks
# (`http {}`, `stream {}`) are lexed and passed over with a [warn].
READY, NOOP, LATER, GAP, IGNORED, SKIPPED = "ready", "noop", "later", "gap", "ignored", \
    "skipped"

PROTOCOLS = ("imap", "pop3", "smtp")
PROTOCOLS_READY = ("imap", "pop3", "smtp")
# nginx guesses a server's protocol from its first listen port.
PROTOCOL_BY_PORT = {143: "imap", 993: "imap", 110: "pop3", 995: "pop3",
                    25: "smtp", 465: "smtp", 587: "smtp"}


# ---------------------------------------------- arguments of one directive

TLS_VERSIONS = {"SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}
SHARED_CACHE_MINIMUM = 8 * 4096     # nginx: a shared zone of at least 8 pages
# RFC 9110 5.1: a field name is a token; 5.5: a field value holds no control
# byte but HTAB (a CR or LF would end the header early, a NUL cut it).
HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
FIELD_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def http_header(args):
    """`auth_http_header Name value` -> ((name, value),), both fit to send."""
    name, value = args
    if not HTTP_TOKEN.fullmatch(name):
        raise BadValue(f'invalid header name "{shown(name)}"')
    if FIELD_CONTROL.search(value):
        raise BadValue(f'invalid header value "{shown(value)}"')
    return ((name, value),)


def session_cache(args):
    """`ssl_session_cache off | none | [builtin[:size]] [shared:name:size]`,
    checked as nginx checks it; the words are the value (tls_context.py)."""
    for arg in args:
        kind, _, rest = arg.partition(":")
        if arg in ("off", "none", "builtin") or \
                (kind == "builtin" and rest.isdigit() and int(rest) > 0):
            continue
        name, _, size = rest.partition(":")
        if kind != "shared" or not name or not size:
            raise BadValue(f'invalid session cache "{arg}"')
        try:
            too_small = parse_size(size) < SHARED_CACHE_MINIMUM
        except BadValue:
            raise BadValue(f'invalid session cache "{arg}"') from None
        if too_small:
            raise BadValue(f'session cache "{arg}" is too small')
    return tuple(args)


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


# nginx spawns at most NGX_MAX_PROCESSES (1024) processes, and says "no
# more than 1024 processes can be spawned" when started with more; here
# -t says it.
MAX_PROCESSES = 1024


def worker_processes(args):
    if args[0] == "auto":
        return "auto"
    return parse_positive(args[0], MAX_PROCESSES)


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


USER_IGNORED = ('the "user" directive makes sense only if the master process runs with '
                'super-user privileges, ignored')


def user(args):
    """`user name [group]` -> the words, or None: as nginx's ngx_set_user,
    only a master running as root gives its rights away, so only then are
    the names looked up (config.py) and used (server.drop_privileges)."""
    return tuple(args) if os.geteuid() == 0 else None


def user_ignored(args):
    return None if os.geteuid() == 0 else USER_IGNORED


def ignored(reason, unless=None):
    """The `warn` of a directive mailproxy accepts without effect: nginx's
    [warn] line, or none when the arguments are `unless`, which restates
    what mailproxy does anyway (`daemon off;`)."""
    def warn(args):
        return None if args == unless else reason
    return warn


def whole(args):
    """A repeatable directive's occurrence, kept as written."""
    return (tuple(args),)


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
ANYWHERE = (MAIN, EVENTS, MAIL, SERVER)

_FOREGROUND = "mailproxy always runs in the foreground"
_NO_ACCEPT_LOCK = "each mailproxy worker's threads block in accept()"
# nginx core and events directives that have no meaning here (spec: nginx's
# core module); each line that uses one gets one [warn] at -t and at start.
_CORE_IGNORED = [
    Directive("daemon", (MAIN,), (1, 1), single(parse_flag), status=IGNORED,
              warn=ignored(f'the "daemon" directive is ignored: {_FOREGROUND}', ["off"])),
    Directive("master_process", (MAIN,), (1, 1), single(parse_flag), status=IGNORED,
              warn=ignored('the "master_process" directive is ignored: a master process '
                           'runs when worker_processes is 2 or more', ["on"])),
    Directive("pcre_jit", (MAIN,), (1, 1), single(parse_flag), status=IGNORED,
              warn=ignored('the "pcre_jit" directive is ignored: mailproxy matches no '
                           'regular expressions')),
    Directive("load_module", (MAIN,), (1, 1), whole, repeat=True, status=IGNORED,
              warn=ignored('the "load_module" directive is ignored: the mail modules are '
                           'built into mailproxy')),
    Directive("env", (MAIN,), (1, 1), whole, repeat=True, status=IGNORED,
              warn=ignored('the "env" directive is ignored: mailproxy\'s workers keep the '
                           'whole environment')),
    Directive("thread_pool", (MAIN,), (2, 3), whole, repeat=True, status=IGNORED,
              warn=ignored('the "thread_pool" directive is ignored: each mailproxy session '
                           'has its own thread')),
    Directive("worker_cpu_affinity", (MAIN,), (1, None), words, status=IGNORED,
              warn=ignored('the "worker_cpu_affinity" directive is ignored: the kernel '
                           'places mailproxy\'s workers')),
    Directive("worker_priority", (MAIN,), (1, 1), single(str), status=IGNORED,
              warn=ignored('the "worker_priority" directive is ignored: set the '
                           'priority with nice or systemd\'s Nice=')),
    Directive("worker_rlimit_core", (MAIN,), (1, 1), single(parse_size), status=IGNORED,
              warn=ignored('the "worker_rlimit_core" directive is ignored: set the '
                           'limit with ulimit -c or systemd\'s LimitCORE=')),
    Directive("working_directory", (MAIN,), (1, 1), single(str), status=IGNORED,
              warn=ignored('the "working_directory" directive is ignored: mailproxy '
                           'stays in the directory it was started in')),
    Directive("timer_resolution", (MAIN,), (1, 1), single(parse_time), status=IGNORED,
              warn=ignored('the "timer_resolution" directive is ignored: mailproxy '
                           'reads the clock when it needs it')),
    Directive("lock_file", (MAIN,), (1, 1), single(str), status=IGNORED,
              warn=ignored(f'the "lock_file" directive is ignored: {_NO_ACCEPT_LOCK}')),
    Directive("use", (EVENTS,), (1, 1), single(str), status=IGNORED,
              warn=ignored('the "use" directive is ignored: mailproxy has one blocking '
                           'thread per session, no event method')),
    Directive("multi_accept", (EVENTS,), (1, 1), single(parse_flag), status=IGNORED,
              warn=ignored(f'the "multi_accept" directive is ignored: {_NO_ACCEPT_LOCK}',
                           ["off"])),
    Directive("accept_mutex", (EVENTS,), (1, 1), single(parse_flag), status=IGNORED,
              warn=ignored(f'the "accept_mutex" directive is ignored: {_NO_ACCEPT_LOCK}',
                           ["off"])),
    Directive("accept_mutex_delay", (EVENTS,), (1, 1), single(parse_time), status=IGNORED,
              warn=ignored(f'the "accept_mutex_delay" directive is ignored: '
                           f'{_NO_ACCEPT_LOCK}')),
    Directive("worker_aio_requests", (EVENTS,), (1, 1), single(parse_positive),
              status=IGNORED, warn=ignored('the "worker_aio_requests" directive is '
                                           'ignored: mailproxy does no asynchronous I/O')),
    Directive("debug_connection", (EVENTS,), (1, 1), whole, repeat=True, status=IGNORED,
              warn=ignored('the "debug_connection" directive is ignored: use '
                           'error_log ... debug')),
]

_ROWS = [
    # top level (nginx core)
    Directive("worker_processes", (MAIN,), (1, 1), worker_processes, ["1"]),
    Directive("error_log", (MAIN, MAIL, SERVER), (1, 2), error_log, [["stderr", "error"]],
              repeat=True),
    Directive("pid", (MAIN,), (1, 1), single(str)),
    Directive("user", (MAIN,), (1, 2), user, warn=user_ignored),
    Directive("worker_rlimit_nofile", (MAIN,), (1, 1), single(parse_positive)),
    Directive("shutdown_timeout", (MAIN,), (1, 1), single(parse_time), ["0"]),
    Directive("worker_shutdown_timeout", (MAIN,), (1, 1), single(parse_time), ["0"],
              note="nginx's name for shutdown_timeout"),
    Directive("status_listen", (MAIN,), (1, 1), status_listen, ["off"],
              note="beyond nginx: the status endpoint (ops/status.py)"),
    Directive("include", ANYWHERE, (1, 1), single(str), note="followed by conffile.py"),
    Directive("events", (MAIN,), (0, 0), block=True),
    Directive("worker_connections", (EVENTS,), (1, 1), single(parse_positive), ["512"]),
    Directive("mail", (MAIN,), (0, 0), block=True),
    Directive("http", (MAIN,), (0, 0), block=True, status=SKIPPED),
    Directive("stream", (MAIN,), (0, 0), block=True, status=SKIPPED),
    *_CORE_IGNORED,
    Directive("server", (MAIL,), (0, 0), block=True),
    # ngx_mail_core_module
    Directive("listen", (SERVER,), (1, None), listen, repeat=True),
    Directive("protocol", (SERVER,), (1, 1), single(one_of(*PROTOCOLS))),
    Directive("timeout", M_S, (1, 1), single(parse_time), ["60s"]),
    Directive("server_name", M_S, (1, None), single(str)),    # the first is its own name
    Directive("resolver", M_S, (1, None), resolver, ["off"]),
    Directive("resolver_timeout", M_S, (1, 1), single(parse_time), ["30s"]),
    Directive("max_errors", M_S, (1, 1), single(parse_number), ["5"]),
    Directive("max_commands", M_S, (1, 1), single(parse_number), ["1000"],
              note="freenginx: commands before login"),
    Directive("so_keepalive", M_S, (1, 1), single(parse_flag),
              note="legacy alias of the listen parameter so_keepalive="),
    # ngx_mail_auth_http_module
    Directive("auth_http", M_S, (1, 1), auth_http_url),
    Directive("auth_http_header", M_S, (2, 2), http_header, repeat=True),
    Directive("auth_http_pass_client_cert", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("auth_http_timeout", M_S, (1, 1), single(parse_time), ["60s"]),
    # ngx_mail_proxy_module
    Directive("proxy", M_S, (1, 1), single(parse_flag), ["off"], status=NOOP,
              note="accepted and ignored, as in nginx"),
    Directive("proxy_buffer", M_S, (1, 1), single(parse_buffer), ["4k"]),
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
    Directive("imap_auth", M_S, (1, None),
              methods({"plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer"}),
              ["plain"]),
    Directive("imap_capabilities", M_S, (1, None), words,
              [["IMAP4", "IMAP4rev1", "UIDPLUS"]], repeat=True),
    Directive("imap_client_buffer", M_S, (1, 1), single(parse_buffer), ["4k"]),
    # ngx_mail_pop3_module
    Directive("pop3_auth", M_S, (1, None),
              methods({"plain", "apop", "cram-md5", "external", "xoauth2", "oauthbearer"}),
              ["plain"]),
    Directive("pop3_capabilities", M_S, (1, None), words, [["TOP", "USER", "UIDL"]],
              repeat=True),
    Directive("pop3_client_buffer", M_S, (1, 1), single(parse_buffer), ["4k"],
              note="freenginx; nginx's is a fixed 128 bytes"),
    # ngx_mail_smtp_module
    Directive("smtp_auth", M_S, (1, None),
              methods({"plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer",
                       "none"}), ["plain", "login"]),
    Directive("smtp_capabilities", M_S, (1, None), words, [], repeat=True),
    Directive("smtp_client_buffer", M_S, (1, 1), single(parse_buffer), ["4k"]),
    Directive("smtp_greeting_delay", M_S, (1, 1), single(parse_time), ["0"]),
    # ngx_mail_ssl_module
    Directive("starttls", M_S, (1, 1), single(one_of("on", "off", "only")), ["off"]),
    Directive("ssl_certificate", M_S, (1, 1), item, repeat=True),
    Directive("ssl_certificate_key", M_S, (1, 1), item, repeat=True),
    Directive("ssl_password_file", M_S, (1, 1), single(str)),
    Directive("ssl_certificate_compression", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("ssl_dhparam", M_S, (1, 1), single(str)),
    Directive("ssl_ecdh_curve", M_S, (1, 1), single(str), ["auto"]),
    Directive("ssl_protocols", M_S, (1, None), methods(TLS_VERSIONS), ["TLSv1.2", "TLSv1.3"]),
    Directive("ssl_ciphers", M_S, (1, 1), single(str), ["HIGH:!aNULL:!MD5"]),
    Directive("ssl_prefer_server_ciphers", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("ssl_session_cache", M_S, (1, None), session_cache, ["none"]),
    Directive("ssl_session_tickets", M_S, (1, 1), single(parse_flag), ["on"]),
    Directive("ssl_session_ticket_key", M_S, (1, 1), item, repeat=True),
    Directive("ssl_session_timeout", M_S, (1, 1), single(parse_time), ["5m"]),
    Directive("ssl_verify_client", M_S, (1, 1),
              single(one_of("on", "off", "optional", "optional_no_ca")), ["off"]),
    Directive("ssl_verify_depth", M_S, (1, 1), single(parse_positive), ["1"]),
    Directive("ssl_client_certificate", M_S, (1, 1), single(str)),
    Directive("ssl_trusted_certificate", M_S, (1, 1), single(str)),
    Directive("ssl_crl", M_S, (1, 1), single(str)),
    Directive("ssl_conf_command", M_S, (2, 2), pair, repeat=True),
    # beyond nginx: TLS toward the backend
    Directive("proxy_ssl", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("proxy_starttls", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("proxy_ssl_verify", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("proxy_ssl_trusted_certificate", M_S, (1, 1), single(str)),
    Directive("proxy_ssl_verify_depth", M_S, (1, 1), single(parse_positive), ["1"]),
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
    # beyond nginx: the backend learns the client's address; failover
    Directive("proxy_client_address", M_S, (1, 1), single(parse_flag), ["off"]),
    Directive("proxy_backend_tries", M_S, (1, 1), single(parse_positive), ["1"]),
]

TABLE = {row.name: row for row in _ROWS}

# Files read with the configuration: as nginx does, a relative name is taken
# from the configuration file's folder (its conf prefix), not from the
# prefix (-p) that pid and log files use, nor from the working directory.
CONF_FILES = ("ssl_certificate", "ssl_certificate_key", "ssl_password_file", "ssl_dhparam",
              "ssl_client_certificate", "ssl_trusted_certificate", "ssl_crl",
              "ssl_session_ticket_key", "proxy_ssl_trusted_certificate",
              "proxy_ssl_certificate", "proxy_ssl_certificate_key")

# Names nginx once had, with the reason they are refused.
REMOVED = {
    "ssl": 'the "ssl" directive was removed in nginx 1.25.1, '
           'use the "listen ... ssl" parameter instead',
    "imap": 'the "imap" block was renamed "mail" in nginx 0.5.15',
}
