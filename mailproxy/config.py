"""Reading an nginx-syntax configuration into frozen settings objects.

conffile.py reads the text (crossplane lexes it; `include` is followed
against the configuration's folder); this module walks the directives,
checks each against the table in `directives.py` (name, context, argument
count, value), and builds one `ServerConfig` per `server {}` with every
mail setting filled in: the server's own value, else the `mail {}` value,
else the default.  Lists (capabilities, `auth_http_header`, ...) are
replaced as a whole, never merged.

Paths follow nginx's two prefixes.  Files read with the configuration (the
TLS certificates, keys and the other `directives.CONF_FILES`, and
`include`) are taken from the configuration file's folder, nginx's conf
prefix; `pid` and log files from the prefix, `-p`, which defaults to that
same folder (mailproxy has no compiled-in prefix).  So `mailproxy -t` gives
the same answer from any working directory.

Every mistake is a `ConfigError` naming file:line in nginx's words, e.g.
`unknown directive "foo" in /etc/mailproxy/mail.conf:12`, and nothing starts.
"""

import grp
import os
import pwd
import socket
from dataclasses import dataclass, replace

from . import conffile
from . import directives as d
from . import names, tls_context
from .conffile import COMMAND_LINE, ConfigError, Where
from .values import BadDirective, BadValue, plain_text

SKIPPED_BLOCK = 'the "{}" block is skipped: mailproxy serves only "mail {{}}"'
# Files nginx opens while it reads the configuration, so that one it cannot
# open fails -t at its line: the logs (kept, as nginx creates them), and
# with -t the pid file (removed again if the check created it).
OPENED_FILES = {"error_log": True, "pid": False}
# Certificate and key values that name no file, as nginx reads them.
NOT_FILES = ("data:", "engine:")


@dataclass(frozen=True)
class Setting:
    """A directive's effective value, the arguments it came from, and where."""
    value: object
    args: tuple
    where: Where = None         # None for a default


class Level:
    """The directives set directly in one block (main, events, mail, server)."""

    def __init__(self, context, where=None, warnings=None):
        self.context = context
        self.where = where
        self.settings = {}
        # nginx's [warn] lines, "text in file:line": one list for the whole
        # file, shared by its levels, so they come out in the file's order
        self.warnings = [] if warnings is None else warnings

    def warn(self, text, where):
        self.warnings.append(f"{text} in {where}")

    def set(self, row, args, where):
        try:
            value = row.parse(args) if row.parse else None
        except BadDirective as exc:
            raise ConfigError(str(exc), where) from None
        except BadValue as exc:
            raise ConfigError(f'{exc} in "{row.name}" directive', where) from None
        if row.name == "listen":
            value = tuple(replace(entry, where=str(where)) for entry in value)
        warning = row.warn(args) if row.warn else None
        if warning:
            self.warn(warning, where)
        old = self.settings.get(row.name)
        if row.repeat and old:
            value, args = old.value + value, old.args + (tuple(args),)
        elif row.repeat:
            args = (tuple(args),)
        elif old:
            raise ConfigError(f'"{row.name}" directive is duplicate', where)
        self.settings[row.name] = Setting(value, tuple(args), where)


class ServerConfig:
    """Effective settings of one `server {}`: read-only attributes named
    after the directives (`config.timeout`, `config.imap_capabilities`),
    plus `listens`, `protocol`, `where`, and `settings` for `-T`."""

    def __init__(self, settings, listens, protocol, where):
        values = {name: setting.value for name, setting in settings.items()}
        values.update(settings=settings, listens=listens, protocol=protocol, where=where)
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError("ServerConfig is read-only")

    def __repr__(self):
        return f"<ServerConfig {self.protocol} {self.where}>"


@dataclass(frozen=True)
class Config:
    """The whole file: top-level settings and the servers."""
    path: str
    prefix: str
    worker_processes: int
    worker_connections: int
    error_logs: tuple           # ((dest, level), ...) of the main level
    pid: str
    servers: tuple
    user: tuple = None          # (user, group) for worker processes, or None
    rlimit_nofile: int = None
    shutdown_timeout: float = 0     # 0: a graceful stop waits for ever
    status_listen: object = None    # a Listen entry for the status endpoint, or None
    warnings: tuple = ()            # "text in file:line", for the CLI to print as [warn]

    @property
    def conf_prefix(self):
        """nginx's conf prefix: the configuration file's folder, where
        included and TLS files are read from."""
        return os.path.dirname(self.path)

    def resolve(self, path):
        """A pid or log path from the file, made absolute against the prefix."""
        if path in ("stderr",) or os.path.isabs(path):
            return path
        return os.path.join(self.prefix, path)


def load(path, prefix=None, extra=None):
    """Read `path` (and `extra`, the -g directives); return a Config.
    `prefix` (-p) defaults to the configuration file's folder."""
    path = os.path.abspath(path)
    conf_prefix = os.path.dirname(path)
    prefix = os.path.abspath(prefix) if prefix else conf_prefix
    levels = {d.MAIN: Level(d.MAIN), "mail": None, "servers": [], "prefix": prefix}
    if extra:
        _walk(conffile.read_text(extra, conf_prefix), levels[d.MAIN], levels)
    _walk(conffile.read(path, conf_prefix), levels[d.MAIN], levels)
    return _build(path, prefix, levels)


def override(config, name, args):
    """`config` with `name args;` said in every server (the CLI's `--trace`
    is `trace on;` everywhere, over what the file says)."""
    row = d.TABLE[name]
    setting = Setting(row.parse(args), tuple(args), Where(COMMAND_LINE, 0))
    servers = tuple(ServerConfig({**server.settings, name: setting}, server.listens,
                                 server.protocol, server.where) for server in config.servers)
    return replace(config, servers=servers)


# ----------------------------------------------------------------- walking

def _walk(block, level, levels):
    """Check each directive of one block and record it on `level`."""
    for entry, where in block:
        name, args = entry["directive"], entry["args"]
        row = _check(name, args, "block" in entry, level.context, where)
        if name == "include":
            for included in block.include(args[0], where):
                _walk(included, level, levels)
        elif row.status == d.SKIPPED:
            _open_block(row, where, level, levels)      # a second one is still a duplicate
            level.warn(SKIPPED_BLOCK.format(name), where)
        elif row.block:
            _walk(block.inside(entry), _open_block(row, where, level, levels), levels)
        else:
            level.set(row, args, where)
            if name in OPENED_FILES and args[0] != "stderr" and \
                    not args[0].startswith("syslog:"):
                conffile.check_writable(os.path.join(levels["prefix"], args[0]), where,
                                        keep=OPENED_FILES[name])


def _check(name, args, has_block, context, where):
    row = d.TABLE.get(name)
    if row is None:
        reason = d.REMOVED.get(name)
        raise ConfigError(reason or f'unknown directive "{name}"', where)
    if context not in row.contexts:
        raise ConfigError(f'"{name}" directive is not allowed here', where)
    if row.block and not has_block:
        raise ConfigError(f'directive "{name}" has no opening "{{"', where)
    if has_block and not row.block:
        raise ConfigError(f'directive "{name}" is not terminated by ";"', where)
    low, high = row.nargs
    if len(args) < low or (high is not None and len(args) > high):
        raise ConfigError(f'invalid number of arguments in "{name}" directive', where)
    try:
        for arg in args:
            plain_text(arg)
    except BadValue as exc:
        raise ConfigError(f'{exc} in "{name}" directive', where) from None
    return row


def _open_block(row, where, parent, levels):
    """The Level that the block's directives go into."""
    if row.name == "server":
        level = Level(d.SERVER, where, parent.warnings)
        levels["servers"].append(level)
        return level
    if row.name in parent.settings:
        raise ConfigError(f'"{row.name}" directive is duplicate', where)
    parent.settings[row.name] = Setting(None, (), where)
    level = Level(row.name, where, parent.warnings)
    levels[row.name] = level
    return level


# ---------------------------------------------------------------- building

def _default(row):
    """The Setting of a directive nobody set: its default, or an empty one."""
    if row.default is None:
        return Setting(() if row.repeat else None, ())
    if row.repeat:
        value = ()
        for args in row.default:
            value += row.parse(args)
        return Setting(value, tuple(tuple(args) for args in row.default))
    return Setting(row.parse(row.default), tuple(row.default))


def _effective(name, *levels):
    """The first level that sets `name`, else the default."""
    for level in levels:
        if level and name in level.settings:
            return level.settings[name]
    return _default(d.TABLE[name])


def _build(path, prefix, levels):
    main, mail = levels[d.MAIN], levels["mail"]
    if mail is None:
        raise ConfigError(f'no "mail" block is defined in {path}')
    if not levels["servers"]:
        raise ConfigError('no "server" block is defined', mail.where)
    _refuse_later(main, mail, levels.get("events"), *levels["servers"])
    servers = tuple(_server(level, mail, main, os.path.dirname(path))
                    for level in levels["servers"])
    names.shared_addresses(servers)        # servers sharing an address must agree
    workers = _effective("worker_processes", main).value
    if workers == "auto":
        workers = os.cpu_count() or 1
    shutdown = main.settings.get("shutdown_timeout") or _effective("worker_shutdown_timeout",
                                                                     main)
    return Config(
        path=path, prefix=prefix, worker_processes=workers,
        worker_connections=_effective("worker_connections", levels.get("events")).value,
        error_logs=_effective("error_log", main).value,
        pid=_effective("pid", main).value, servers=servers,
        user=_user(main.settings.get("user")),
        rlimit_nofile=_effective("worker_rlimit_nofile", main).value,
        shutdown_timeout=shutdown.value,
        status_listen=_effective("status_listen", main).value,
        warnings=tuple(main.warnings))


def _user(setting):
    """`user name [group];` -> (name, group); the group defaults to the name's.
    None when not set, or ignored (not root: see directives.user)."""
    if setting is None or setting.value is None:
        return None
    name, group = (setting.value + (None,))[:2]
    for lookup, value in ((pwd.getpwnam, name), (grp.getgrnam, group)):
        try:
            if value is not None:
                lookup(value)
        except KeyError:
            raise ConfigError(f'{lookup.__name__}("{value}") failed', setting.where) from None
    return (name, group)


def _server(level, mail, main, conf_prefix):
    settings = {}
    for row in d.TABLE.values():
        if d.SERVER in row.contexts and not row.block and \
                row.name not in ("listen", "protocol", "include"):
            settings[row.name] = _effective(row.name, level, mail, main)
    for name in d.CONF_FILES:
        settings[name] = _in_folder(settings[name], conf_prefix)
    if settings["server_name"].value is None:
        settings["server_name"] = Setting(socket.gethostname(), ())
    listens = _effective("listen", level)
    if not listens.value:
        raise ConfigError('no "listen" is defined for server', level.where)
    if settings["auth_http"].value is None:
        raise ConfigError('no "auth_http" is defined for server', level.where)
    listens = _apply_legacy_keepalive(listens.value, settings["so_keepalive"])
    protocol = _protocol(level, listens)
    server = ServerConfig(settings, listens, protocol, level.where)
    names.check_names(server)
    level.warnings += [f"{text} in {settings[name].where or level.where}"
                       for name, text in _check_tls(server) + _check_mx(server)]
    return server


def _check_mx(server):
    """[(directive, text)]: an MX listener (`smtp_auth none`) with `starttls
    only` refuses mail in clear text, as the operator asked (smtp.py), but
    RFC 3207 section 4 says a publicly referenced MX must not require it."""
    if server.protocol != "smtp" or "none" not in server.smtp_auth or \
            server.starttls != "only":
        return []
    return [("starttls", '"starttls only" with "smtp_auth none" refuses mail in clear text; '
             "RFC 3207 section 4: a publicly referenced MX must not require STARTTLS")]


def _in_folder(setting, folder):
    """A file setting with its relative names taken from `folder`, in the
    value and in the arguments (so -T prints the files that are read)."""
    def under(value):
        if isinstance(value, tuple):
            return tuple(under(item) for item in value)
        if value is None or value.startswith(NOT_FILES):
            return value
        return os.path.join(folder, value)      # an absolute name stays as it is
    return replace(setting, value=under(setting.value), args=under(setting.args))


def _check_tls(server):
    """nginx's TLS configuration checks, then the contexts themselves are
    built once as a trial (a missing file or bad cipher list is an error
    now, as `nginx -t` reports it, not at the first client); the ones the
    sessions use are built again where they are served.  Returns the
    [warn]s as (directive, text)."""
    settings = server.settings
    # (what needs a certificate, where it was said): nginx names that line
    users = [(f'"{name}"', where) for name, where in
             (("listen ... ssl", next((e.where for e in server.listens if e.ssl), None)),
              ("starttls", server.starttls in ("on", "only") and settings["starttls"].where))
             if where]
    if users and not server.ssl_certificate:
        raise ConfigError(f'no "ssl_certificate" is defined for the {users[0][0]} directive',
                          users[0][1])
    if len(server.ssl_certificate_key) < len(server.ssl_certificate):
        raise ConfigError(f'no "ssl_certificate_key" is defined for certificate '
                          f'"{server.ssl_certificate[-1]}"', settings["ssl_certificate"].where)
    if server.ssl_verify_client in ("on", "optional") and \
            not (server.ssl_client_certificate or server.ssl_trusted_certificate):
        raise ConfigError("no ssl_client_certificate or ssl_trusted_certificate for "
                          "ssl_verify_client", settings["ssl_verify_client"].where)
    if server.proxy_ssl and server.proxy_starttls:
        raise ConfigError('"proxy_ssl" and "proxy_starttls" cannot both be on',
                          settings["proxy_starttls"].where)
    if not (server.proxy_ssl or server.proxy_starttls):
        for name, setting in settings.items():
            if name.startswith("proxy_ssl_") and setting.value != _default(d.TABLE[name]).value:
                raise ConfigError(f'"{name}" has no effect without "proxy_ssl on" or '
                                  '"proxy_starttls on"', setting.where)
    try:
        if users:
            tls_context.server_context(server)
        if server.proxy_ssl or server.proxy_starttls:
            tls_context.backend_context(server)
    except tls_context.TlsSetupError as exc:
        raise ConfigError(str(exc) + f' in "{exc.directive}" directive',
                          settings[exc.directive].where or server.where) from None
    return tls_context.warnings(server) if users or server.proxy_ssl or server.proxy_starttls \
        else []


def _apply_legacy_keepalive(listens, legacy):
    """`so_keepalive on|off;` is the pre-1.1.11 spelling of the listen parameter."""
    if legacy.value is None:
        return listens
    return tuple(entry if entry.so_keepalive is not None
                 else replace(entry, so_keepalive=legacy.value) for entry in listens)


def _protocol(level, listens):
    setting = level.settings.get("protocol")
    guesses = (d.PROTOCOL_BY_PORT[e.port] for e in listens if e.port in d.PROTOCOL_BY_PORT)
    protocol = setting.value if setting else next(guesses, None)
    if protocol is None:
        raise ConfigError("unknown mail protocol for server", level.where)
    if protocol not in d.PROTOCOLS_READY:
        raise ConfigError(f'protocol "{protocol}" is not implemented yet '
                          "(it arrives with a later release)",
                          setting.where if setting else level.where)
    return protocol


def _refuse_later(*levels):
    """A directive or listen parameter we cannot honour (yet) is an error,
    unless it only restates the default (`proxy_protocol off;`)."""
    for level in filter(None, levels):
        for name, setting in level.settings.items():
            row = d.TABLE[name]
            if row.status not in (d.LATER, d.GAP) or setting.value == _default(row).value:
                continue
            if row.status == d.LATER:
                raise ConfigError(f'"{name}" directive is not implemented yet ({row.note})',
                                  setting.where)
            raise ConfigError(f'"{name}" directive is not supported ({row.note}); '
                              "see docs/directives.md", setting.where)


# ----------------------------------------------------------------- dumping

def dump(config):
    """The effective configuration in nginx syntax, defaults filled in (-T)."""
    lines = [f"# effective configuration of {config.path}",
             f"# conf prefix {os.path.join(config.conf_prefix, '')} (included and TLS files), "
             f"prefix {os.path.join(config.prefix, '')} (pid and log files)",
             f"worker_processes {config.worker_processes};"]
    lines += [f"error_log {dest} {level};" for dest, level in config.error_logs]
    if config.pid:
        lines.append(f"pid {config.pid};")
    lines.append(f"status_listen {config.status_listen.name if config.status_listen else 'off'};")
    lines += ["events {", f"    worker_connections {config.worker_connections};", "}",
              "mail {"]
    for server in config.servers:
        lines.append(f"    server {{  # {server.where}")
        lines += [f"        listen {entry.text};" for entry in _unique_texts(server.listens)]
        lines.append(f"        protocol {server.protocol};")
        for name, setting in server.settings.items():
            lines += [f"        {name}{_render(args)};" for args in _occurrences(setting)]
        lines += [f"        # {text}" for text in tls_context.summary(server)]
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _occurrences(setting):
    """The argument lists to print for one setting (several for a list)."""
    if setting.args and isinstance(setting.args[0], tuple):
        return list(setting.args)
    if setting.args:
        return [setting.args]
    if setting.value is None or isinstance(setting.value, tuple):
        return []                           # not set, no default
    return [(str(setting.value),)]          # a computed default: server_name


def _render(args):
    """Arguments as nginx reads them back: quoted when they hold a space or
    a character nginx's lexer treats apart, escapes undone (conffile.ESCAPES)."""
    return "".join(" " + _quoted(arg) for arg in args)


def _quoted(arg):
    if arg and not any(char in arg for char in ' \t"\'\\;{}#$'):
        return arg
    text = arg.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")
    return f'"{text}"'


def _unique_texts(listens):
    seen, out = set(), []
    for entry in listens:
        if entry.text not in seen:
            seen.add(entry.text)
            out.append(entry)
    return out
