"""The `mailproxy` command, with nginx's flags.

    mailproxy -c mail.conf          run (in the foreground)
    mailproxy -t -c mail.conf       test the configuration
    mailproxy -T -c mail.conf       test it and print the effective settings
    mailproxy -s quit               signal the running proxy (pid file)
    mailproxy -v | -V               version (and build details)
    mailproxy -c mail.conf --trace  run, tracing every session (ops/trace.py)

Exit status: 0 ok, 1 configuration or start-up error, 2 usage error.  This
is the only module that imports click; everything it calls is plain Python.
"""

import os
import signal
import sys

import click

from . import NGINX_COMPAT, __version__, config as configmod, server, tls
from .ops import master

DEFAULT_CONF = "/etc/mailproxy/mail.conf"
SIGNALS = {"stop": signal.SIGTERM, "quit": signal.SIGQUIT, "reopen": signal.SIGUSR1,
           "reload": signal.SIGHUP}


def _say(text):
    click.echo(f"mailproxy: {text}", err=True)


def _read(path, prefix, directives, trace):
    """The Config; `--trace` is `trace on;` in every server."""
    config = configmod.load(path, prefix=prefix, extra=directives)
    return configmod.override(config, "trace", ["on"]) if trace else config


def _load(path, prefix, directives, trace=False):
    """The Config (its [warn] lines printed), or None after printing
    nginx's [emerg] line."""
    try:
        config = _read(path, prefix, directives, trace)
    except configmod.ConfigError as exc:
        _say(f"[emerg] {exc}")
        return None
    for warning in config.warnings:
        _say(f"[warn] {warning}")
    return config


@click.group(invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "-?", "--help"]})
@click.option("-c", "conf", default=DEFAULT_CONF, metavar="FILE", show_default=True,
              help="Configuration file.")
@click.option("-t", "test", is_flag=True, help="Test the configuration and exit.")
@click.option("-T", "dump", is_flag=True,
              help="Test the configuration, print the effective settings, and exit.")
@click.option("-p", "prefix", metavar="PREFIX",
              help="Prefix for relative pid and log paths (default: the configuration "
                   "file's folder).")
@click.option("-g", "directives", metavar="DIRECTIVES",
              help="Extra top-level directives, e.g. 'pid /run/mailproxy.pid;'.")
@click.option("-s", "signal_name", type=click.Choice(sorted(SIGNALS)),
              help="Send a signal to the running proxy (its pid file).")
@click.option("-v", "version", is_flag=True, help="Show the version and exit.")
@click.option("-V", "build", is_flag=True, help="Show the version and build details.")
@click.option("--trace", "trace", is_flag=True,
              help="Log every session's lines before login, secrets hidden "
                   "(as 'trace on;' in every server; needs error_log at info).")
@click.pass_context
def main(ctx, conf, test, dump, prefix, directives, signal_name, version, build, trace):
    """An IMAP, POP3 and SMTP proxy configured like nginx's mail module."""
    if ctx.invoked_subcommand:
        return
    path = os.path.abspath(conf if os.path.isabs(conf) or not prefix
                           else os.path.join(prefix, conf))
    if version or build:
        _show_version(path, prefix, build)
        if not (test or dump):
            return
    config = _load(path, prefix, directives, trace)
    if test or dump:
        ctx.exit(_report_test(config, path, dump))
    if config is None:
        ctx.exit(1)
    if signal_name:
        ctx.exit(_send_signal(config, signal_name))
    if master.needed(config):
        ctx.exit(master.Master(config, lambda: _read(path, prefix, directives, trace)).run())
    ctx.exit(server.run(config))


def _show_version(path, prefix, build):
    """-v, and with -V the build and the two prefixes: mailproxy has no
    compiled-in prefix, so both follow the configuration file."""
    click.echo(f"mailproxy version: mailproxy/{__version__} ({NGINX_COMPAT})", err=True)
    if not build:
        return
    folder = os.path.join(os.path.dirname(path), "")
    click.echo(f"built with Python {sys.version.split()[0]}, {tls.library_version()}", err=True)
    click.echo(f"configuration file: {path}", err=True)
    click.echo(f"conf prefix: {folder} (included and TLS files; the configuration "
               "file's folder)", err=True)
    click.echo(f"prefix: {os.path.join(os.path.abspath(prefix), '') if prefix else folder} "
               "(pid and log files; -p, else the configuration file's folder)", err=True)


def _report_test(config, path, dump):
    if config is None:
        _say(f"configuration file {path} test failed")
        return 1
    for block in config.servers:
        if dump and not (block.proxy_ssl or block.proxy_starttls):
            _say(f"[warn] the server at {block.where} sends passwords to its backends in "
                 "clear text (no proxy_ssl or proxy_starttls): keep them on loopback")
    _say(f"the configuration file {path} syntax is ok")
    _say(f"configuration file {path} test is successful")
    if dump:
        click.echo(configmod.dump(config), nl=False)
    return 0


def _send_signal(config, name):
    """`-s NAME`: signal the pid in the configured pid file, as nginx does."""
    if not config.pid:
        _say('[error] no "pid" directive in the configuration, cannot signal')
        return 1
    path = config.resolve(config.pid)
    try:
        with open(path) as file:
            pid = int(file.read().strip())
        os.kill(pid, SIGNALS[name])
    except (OSError, ValueError) as exc:
        _say(f'[error] signal "{name}" to the process in "{path}" failed ({exc})')
        return 1
    return 0


# ------------------------------------------------------------ auth service

@main.group("auth-service", invoke_without_command=True)
@click.option("-u", "--users", "users_path", default="users.conf", show_default=True,
              type=click.Path(dir_okay=False), help="The users file.")
@click.option("--listen", default="127.0.0.1:9000", show_default=True, metavar="HOST:PORT",
              help="Address to serve auth_http on.")
@click.pass_context
def auth_service(ctx, users_path, listen):
    """Run the reference auth service (see mailproxy/reference/authservice.py)."""
    from .reference import authservice
    ctx.obj = users_path
    if ctx.invoked_subcommand:
        return
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {listen!r}", param_hint="--listen")
    try:
        authservice.Users(users_path)
    except (OSError, authservice.UsersFileError) as exc:
        _say(f"[emerg] {exc}")
        ctx.exit(1)
    _say(f"auth service for {users_path} listening on {listen}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # stop cleanly, as on Ctrl-C
    try:
        authservice.serve(users_path, host.strip("[]") or "127.0.0.1", int(port))
    except KeyboardInterrupt:
        pass


@auth_service.command("passwd")
@click.argument("login")
@click.option("--plain", is_flag=True,
              help="Store the clear text ({PLAIN}), needed for CRAM-MD5 and APOP.")
@click.password_option("--password", prompt="Password", help="The new password.")
@click.pass_obj
def passwd(users_path, login, plain, password):
    """Add LOGIN to the users file or change its password."""
    from .reference import authservice
    try:
        authservice.set_password(users_path, login, password, plain=plain)
    except (OSError, ValueError) as exc:
        _say(f"[emerg] {exc}")
        raise SystemExit(1) from None
    _say(f'password for "{login}" written to {users_path}')


# -------------------------------------------------------------------- demo

@main.command("demo")
@click.pass_context
def demo(ctx):
    """Run a proxied mail setup on loopback: proxy, auth service, backends."""
    from .reference import demo as demomod
    ctx.exit(demomod.run(echo=lambda text: click.echo(text, err=True)))
