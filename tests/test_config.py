"""config.py and directives.py (with values.py and addresses.py): nginx-syntax
files in, settings or errors out.

Every configuration mistake must be refused before anything starts, with
nginx's words and the file:line of the offending line, so each error test
writes a real file and compares the whole message.  `lines` are the file's
lines; `line_of()` finds the number of the line a test is about.
"""

import os
import re
import socket
from pathlib import Path

import pytest

from mailproxy import config as configmod
from mailproxy import directives as d
from mailproxy import values
from mailproxy.config import ConfigError

SPEC = Path(__file__).resolve().parents[2] / "shared" / "nginx-mail-spec.md"
AUTH = "auth_http 127.0.0.1:9000/auth;"
IMAP = ("listen 127.0.0.1:1143;", "protocol imap;")


# ----------------------------------------------------------------- helpers

def conf(*servers, mail=(AUTH,), top=()):
    """The lines of a config file: `top`, then `mail { mail; server {...} ... }`."""
    lines = list(top) + ["mail {"] + [f"    {line}" for line in mail]
    for body in servers or (IMAP,):
        lines += ["    server {"] + [f"        {line}" for line in body] + ["    }"]
    return lines + ["}"]


def write(tmp_path, lines, name="mail.conf"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def load(tmp_path, lines, extra=None):
    return configmod.load(str(write(tmp_path, lines)), prefix=str(tmp_path), extra=extra)


def server(tmp_path, *body, mail=(AUTH,), top=()):
    """The ServerConfig of a one-server file."""
    return load(tmp_path, conf(body or IMAP, mail=mail, top=top)).servers[0]


def error(tmp_path, lines, extra=None):
    """The ConfigError message, and the path of the file written."""
    path = write(tmp_path, lines)
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path), prefix=str(tmp_path), extra=extra)
    return str(info.value), path


def line_of(lines, text, occurrence=0):
    """1-based number of the line containing `text` (its n-th occurrence)."""
    return [n for n, line in enumerate(lines, 1) if text in line][occurrence]


def at(path, lines, text, occurrence=0):
    return f"{path}:{line_of(lines, text, occurrence)}"


# --------------------------------------------------- unknown / context / args

def test_unknown_directive_names_file_and_line(tmp_path):
    lines = ["# mailproxy test",
             "worker_processes 1;",
             "events {",
             "    worker_connections 64;",
             "}",
             "mail {",
             "    auth_http 127.0.0.1:9000/auth;",
             "    server {",
             "        listen 127.0.0.1:1143;",
             "        protocol imap;",
             "        timeout 5s;",
             "        foo bar;",
             "    }",
             "}"]
    message, path = error(tmp_path, lines)
    assert message == f'unknown directive "foo" in {path}:12'


def test_unknown_directive_inside_an_included_file_names_that_file(tmp_path):
    (tmp_path / "extra.conf").write_text("timeout 5s;\nbar;\n")
    lines = conf(IMAP, mail=(AUTH, "include extra.conf;"))
    message, _ = error(tmp_path, lines)
    assert message == f'unknown directive "bar" in {tmp_path / "extra.conf"}:2'


@pytest.mark.parametrize("where, text", [
    ("mail", "listen 127.0.0.1:1144;"),
    ("mail", "protocol imap;"),
    ("top", "timeout 5s;"),
    ("top", "auth_http 127.0.0.1:9000;"),
    ("server", "worker_processes 1;"),
    ("server", "pid x.pid;"),
    ("mail", "worker_connections 10;"),
    ("top", "server { }"),
    ("server", "mail { }"),
])
def test_directive_in_the_wrong_context(tmp_path, where, text):
    name = text.split()[0]
    lines = conf(IMAP + ((text,) if where == "server" else ()),
                 mail=(AUTH,) + ((text,) if where == "mail" else ()),
                 top=(text,) if where == "top" else ())
    message, path = error(tmp_path, lines)
    assert message == f'"{name}" directive is not allowed here in {at(path, lines, text)}'


@pytest.mark.parametrize("text, name", [
    ("timeout;", "timeout"),
    ("timeout 1s 2s;", "timeout"),
    ("server_name;", "server_name"),
    ("auth_http_header X-Only;", "auth_http_header"),
    ("auth_http_header X-A b c;", "auth_http_header"),
    ("imap_auth;", "imap_auth"),
    ("listen;", "listen"),
    ("error_log a.log info extra;", "error_log"),
])
def test_wrong_number_of_arguments(tmp_path, text, name):
    lines = conf(IMAP + (text,))
    message, path = error(tmp_path, lines)
    assert message == f'invalid number of arguments in "{name}" directive in ' \
                      f"{at(path, lines, text)}"


def test_block_directive_without_a_block(tmp_path):
    lines = conf(top=("events;",))
    message, path = error(tmp_path, lines)
    assert message == f'directive "events" has no opening "{{" in {at(path, lines, "events;")}'


def test_simple_directive_with_a_block(tmp_path):
    lines = conf(IMAP + ("timeout 5s { }",))
    message, path = error(tmp_path, lines)
    assert message == f'directive "timeout" is not terminated by ";" in ' \
                      f'{at(path, lines, "timeout 5s")}'


# -------------------------------------------------------------- bad values

@pytest.mark.parametrize("text, expected", [
    ("timeout 5x;", 'invalid value "5x" in "timeout" directive'),
    ("timeout 1.5s;", 'invalid value "1.5s" in "timeout" directive'),
    ("proxy_timeout -1;", 'invalid value "-1" in "proxy_timeout" directive'),
    ("proxy_buffer 4q;", 'invalid value "4q" in "proxy_buffer" directive'),
    ("imap_client_buffer 4kb;", 'invalid value "4kb" in "imap_client_buffer" directive'),
    ("xclient yes;",
     'invalid value "yes", it must be "on" or "off" in "xclient" directive'),
    ("proxy_pass_error_message 1;",
     'invalid value "1", it must be "on" or "off" in "proxy_pass_error_message" directive'),
    ("proxy_protocol maybe;", 'invalid value "maybe" in "proxy_protocol" directive'),
    ("starttls sometimes;", 'invalid value "sometimes" in "starttls" directive'),
    ("imap_auth plain digest-md5;", 'invalid value "digest-md5" in "imap_auth" directive'),
    ("imap_auth apop;", 'invalid value "apop" in "imap_auth" directive'),
    ("pop3_auth login;", 'invalid value "login" in "pop3_auth" directive'),
    ("smtp_auth apop;", 'invalid value "apop" in "smtp_auth" directive'),
    ("max_errors -1;", 'invalid number "-1" in "max_errors" directive'),
    ("max_errors five;", 'invalid number "five" in "max_errors" directive'),
    ("error_log x.log loud;", 'invalid value "loud" in "error_log" directive'),
    ("auth_http https://127.0.0.1/auth;",
     'https protocol is not supported in "auth_http" directive'),
    ("auth_http 127.0.0.1:99999/auth;",
     'invalid port in "127.0.0.1:99999" in "auth_http" directive'),
])
def test_bad_values(tmp_path, text, expected):
    lines = conf(("listen 127.0.0.1:1143;", text) if text.startswith("protocol")
                 else IMAP + (text,))
    message, path = error(tmp_path, lines)
    assert message == f"{expected} in {at(path, lines, text)}"


def test_bad_protocol_name(tmp_path):
    lines = conf(("listen 127.0.0.1:1143;", "protocol imap4;"))
    message, path = error(tmp_path, lines)
    assert message == f'invalid value "imap4" in "protocol" directive in ' \
                      f'{at(path, lines, "protocol imap4")}'


def test_flag_error_says_on_or_off(tmp_path):
    lines = conf(IMAP + ("xclient yes;",))
    message, path = error(tmp_path, lines)
    assert 'it must be "on" or "off"' in message
    assert message.endswith(f" in {at(path, lines, 'xclient yes')}")


def test_non_ascii_digit_is_a_config_error(tmp_path):
    lines = conf(IMAP + ("max_errors ²;",))
    message, path = error(tmp_path, lines)
    assert message == f'invalid number "²" in "max_errors" directive in ' \
                      f'{at(path, lines, "max_errors")}'


def test_non_ascii_digit_in_a_listen_port_is_a_config_error(tmp_path):
    lines = conf(("listen 127.0.0.1:¹¹⁴³;", "protocol imap;"))
    with pytest.raises(ConfigError):
        load(tmp_path, lines)


# ------------------------------------------------------------------ listen

@pytest.mark.parametrize("text, expected", [
    ("listen 127.0.0.1;", 'no port in "127.0.0.1" in "listen" directive'),
    ("listen 127.0.0.1:2002-2000;",
     'invalid port range in "127.0.0.1:2002-2000" in "listen" directive'),
    ("listen 127.0.0.1:1150 reuseport;", 'invalid parameter "reuseport" in "listen" directive'),
    ("listen 127.0.0.1:1150 deferred;", 'invalid parameter "deferred" in "listen" directive'),
    ("listen 127.0.0.1:1150 fastopen=3;",
     'invalid parameter "fastopen=3" in "listen" directive'),
    ("listen 127.0.0.1:1150 setfib=1;", 'invalid parameter "setfib=1" in "listen" directive'),
    ("listen 127.0.0.1:1150 accept_filter=dataready;",
     'invalid parameter "accept_filter=dataready" in "listen" directive'),
    ("listen 127.0.0.1:1150 1151;", 'invalid parameter "1151" in "listen" directive'),
    ("listen 127.0.0.1:1150 backlog=0;", 'invalid value "0" in "listen" directive'),
    ("listen 127.0.0.1:1150 backlog=many;", 'invalid number "many" in "listen" directive'),
    ("listen 127.0.0.1:1150 rcvbuf=lots;", 'invalid value "lots" in "listen" directive'),
    ("listen [::1]:1150 ipv6only=yes;",
     'invalid value "yes", it must be "on" or "off" in "listen" directive'),
    ("listen 127.0.0.1:1150 so_keepalive=::;",
     'invalid so_keepalive value: "so_keepalive=::" in "listen" directive'),
    ("listen 127.0.0.1:1150 so_keepalive=1m:2m;",
     'invalid so_keepalive value: "so_keepalive=1m:2m" in "listen" directive'),
    ("listen 127.0.0.1:1150 so_keepalive=x::;",
     'invalid so_keepalive value: "so_keepalive=x::" in "listen" directive'),
    ("listen nosuchhost.invalid:1150;",
     'host not found in "nosuchhost.invalid:1150" in "listen" directive'),
])
def test_bad_listen(tmp_path, text, expected):
    lines = conf(IMAP + (text,))
    message, path = error(tmp_path, lines)
    assert message == f"{expected} in {at(path, lines, text)}"


BAD_PORTS = ["127.0.0.1:99999", "127.0.0.1:0", "[::1]:65536", "127.0.0.1:abc",
             "127.0.0.1:1150-x"]


@pytest.mark.parametrize("address", BAD_PORTS)
def test_bad_listen_port_is_refused_with_its_line(tmp_path, address):
    lines = conf(IMAP + (f"listen {address};",))
    message, path = error(tmp_path, lines)
    assert re.fullmatch(r'(invalid|no) port in "[^"]+" in "listen" directive in ' +
                        re.escape(at(path, lines, address)), message)


@pytest.mark.parametrize("address", BAD_PORTS)
def test_bad_listen_port_message_quotes_the_whole_address(tmp_path, address):
    lines = conf(IMAP + (f"listen {address};",))
    message, path = error(tmp_path, lines)
    assert message == f'invalid port in "{address}" in "listen" directive in ' \
                      f'{at(path, lines, address)}'


def _listens(tmp_path, text):
    return [entry for entry in server(tmp_path, "listen 127.0.0.1:1143;", "protocol imap;",
                                      text).listens if entry.port != 1143]


def test_listen_port_only_is_the_ipv4_wildcard(tmp_path):
    [entry] = _listens(tmp_path, "listen 1150;")
    assert (entry.host, entry.port, entry.family) == ("0.0.0.0", 1150, socket.AF_INET)
    assert entry.wildcard
    assert entry.name == "0.0.0.0:1150"
    assert entry.text == "1150"


def test_listen_star_is_the_ipv4_wildcard(tmp_path):
    [entry] = _listens(tmp_path, "listen *:1150;")
    assert (entry.host, entry.port, entry.family) == ("0.0.0.0", 1150, socket.AF_INET)


def test_listen_ipv4_address(tmp_path):
    [entry] = _listens(tmp_path, "listen 127.0.0.1:1150;")
    assert (entry.host, entry.port, entry.family) == ("127.0.0.1", 1150, socket.AF_INET)
    assert not entry.wildcard
    assert entry.name == "127.0.0.1:1150"


def test_listen_ipv6_address(tmp_path):
    [entry] = _listens(tmp_path, "listen [::1]:1150;")
    assert (entry.host, entry.port, entry.family) == ("::1", 1150, socket.AF_INET6)
    assert entry.name == "[::1]:1150"
    assert entry.ipv6only is True


def test_listen_hostname_is_resolved_to_numeric_addresses(tmp_path):
    entries = _listens(tmp_path, "listen localhost:1150;")
    expected = {(info[0], info[4][0]) for info in
                socket.getaddrinfo("localhost", 1150, type=socket.SOCK_STREAM)
                if info[0] in (socket.AF_INET, socket.AF_INET6)}
    assert {(entry.family, entry.host) for entry in entries} == expected
    assert len(entries) == len(expected)         # duplicates dropped
    assert all(entry.port == 1150 and entry.text == "localhost:1150" for entry in entries)
    assert (socket.AF_INET, "127.0.0.1") in expected


def test_listen_port_range_gives_one_entry_per_port(tmp_path):
    entries = _listens(tmp_path, "listen 127.0.0.1:2000-2002;")
    assert [(entry.host, entry.port) for entry in entries] == \
        [("127.0.0.1", 2000), ("127.0.0.1", 2001), ("127.0.0.1", 2002)]


def test_listen_defaults(tmp_path):
    [entry] = _listens(tmp_path, "listen 127.0.0.1:1150;")
    assert entry.backlog == 511
    assert (entry.rcvbuf, entry.sndbuf, entry.so_keepalive) == (None, None, None)
    assert (entry.ssl, entry.proxy_protocol, entry.bind, entry.multipath) == \
        (False, False, False, False)


def test_listen_backlog_and_buffers_imply_bind(tmp_path):
    [entry] = _listens(tmp_path, "listen 127.0.0.1:1150 backlog=100 rcvbuf=4k sndbuf=8k;")
    assert (entry.backlog, entry.rcvbuf, entry.sndbuf, entry.bind) == (100, 4096, 8192, True)


def test_listen_bind_and_ipv6only(tmp_path):
    [entry] = _listens(tmp_path, "listen 127.0.0.1:1150 bind;")
    assert entry.bind
    [entry] = _listens(tmp_path, "listen [::1]:1150 ipv6only=off;")
    assert entry.ipv6only is False and entry.bind


@pytest.mark.parametrize("param, expected", [
    ("so_keepalive=on", True),
    ("so_keepalive=off", False),
    ("so_keepalive=30m::10", (1800, None, 10)),
    ("so_keepalive=1h:30s:", (3600, 30, None)),
    ("so_keepalive=::5", (None, None, 5)),
])
def test_listen_so_keepalive(tmp_path, param, expected):
    [entry] = _listens(tmp_path, f"listen 127.0.0.1:1150 {param};")
    assert entry.so_keepalive == expected
    assert entry.bind


def test_legacy_so_keepalive_directive_applies_to_listens(tmp_path):
    config = server(tmp_path, "listen 127.0.0.1:1143;", "listen 127.0.0.1:1150 so_keepalive=off;",
                    "protocol imap;", mail=(AUTH, "so_keepalive on;"))
    by_port = {entry.port: entry.so_keepalive for entry in config.listens}
    assert by_port == {1143: True, 1150: False}      # an explicit parameter wins


def test_listen_entries_remember_where_they_came_from(tmp_path):
    lines = conf(IMAP)
    config = load(tmp_path, lines).servers[0]
    assert config.listens[0].where == at(tmp_path / "mail.conf", lines, "listen")


# ------------------------------------------------- duplicates, required parts

def test_duplicate_directive_at_one_level(tmp_path):
    lines = conf(IMAP + ("timeout 5s;", "timeout 6s;"))
    message, path = error(tmp_path, lines)
    assert message == f'"timeout" directive is duplicate in {at(path, lines, "timeout 6s")}'


def test_duplicate_top_level_directive(tmp_path):
    lines = conf(top=("pid a.pid;", "pid b.pid;"))
    message, path = error(tmp_path, lines)
    assert message == f'"pid" directive is duplicate in {at(path, lines, "pid b.pid")}'


def test_second_mail_block_is_duplicate(tmp_path):
    lines = conf() + ["mail {", "}"]
    message, path = error(tmp_path, lines)
    assert message == f'"mail" directive is duplicate in {path}:{len(lines) - 1}'


def test_same_directive_at_mail_and_server_level_is_not_duplicate(tmp_path):
    assert server(tmp_path, *IMAP, "timeout 5s;", mail=(AUTH, "timeout 6s;")).timeout == 5


def test_duplicate_listen_across_servers(tmp_path):
    lines = conf(IMAP, IMAP)
    message, path = error(tmp_path, lines)
    assert message == f'duplicate "127.0.0.1:1143" address and port pair in ' \
                      f'{at(path, lines, "listen", 1)}'


def test_duplicate_listen_within_a_port_range(tmp_path):
    lines = conf(("listen 127.0.0.1:2000-2002;", "protocol imap;"),
                 ("listen 127.0.0.1:2002;", "protocol imap;"))
    message, path = error(tmp_path, lines)
    assert message == f'duplicate "127.0.0.1:2002" address and port pair in ' \
                      f'{at(path, lines, "127.0.0.1:2002;")}'


def test_duplicate_ipv6_listen(tmp_path):
    body = ("listen [::1]:1150;", "protocol imap;")
    lines = conf(body, body)
    message, path = error(tmp_path, lines)
    assert message == f'duplicate "[::1]:1150" address and port pair in ' \
                      f'{at(path, lines, "listen", 1)}'


def test_wildcard_and_specific_address_on_one_port_are_not_duplicates(tmp_path):
    config = load(tmp_path, conf(("listen 1150;", "protocol imap;"),
                                 ("listen 127.0.0.1:1150;", "protocol imap;")))
    assert [s.listens[0].host for s in config.servers] == ["0.0.0.0", "127.0.0.1"]


def test_server_without_listen(tmp_path):
    lines = conf(("protocol imap;",))
    message, path = error(tmp_path, lines)
    assert message == f'no "listen" is defined for server in {at(path, lines, "server {")}'


def test_server_without_auth_http(tmp_path):
    lines = conf(IMAP, ("listen 127.0.0.1:1144;", "protocol imap;", AUTH), mail=())
    message, path = error(tmp_path, lines)
    assert message == f'no "auth_http" is defined for server in {at(path, lines, "server {")}'


def test_no_mail_block(tmp_path):
    message, path = error(tmp_path, ["events {", "}"])
    assert message == f'no "mail" block is defined in {path}'


def test_no_server_block(tmp_path):
    lines = ["mail {", f"    {AUTH}", "}"]
    message, path = error(tmp_path, lines)
    assert message == f'no "server" block is defined in {path}:1'


# ---------------------------------------------------------------- protocol

def test_unknown_protocol_for_a_port(tmp_path):
    lines = conf(("listen 127.0.0.1:1143;",))
    message, path = error(tmp_path, lines)
    assert message == f"unknown mail protocol for server in {at(path, lines, 'server {')}"


@pytest.mark.parametrize("port, protocol", sorted(d.PROTOCOL_BY_PORT.items()))
def test_protocol_guessed_from_port(tmp_path, port, protocol):
    if protocol not in d.PROTOCOLS_READY:
        pytest.skip(f"{protocol} is not implemented yet")
    assert server(tmp_path, f"listen 127.0.0.1:{port};").protocol == protocol


def test_protocol_guessed_from_port_143(tmp_path):
    assert server(tmp_path, "listen 127.0.0.1:143;").protocol == "imap"


def test_protocol_directive_beats_the_port(tmp_path):
    assert server(tmp_path, "listen 127.0.0.1:143;", "protocol imap;").protocol == "imap"
    if "pop3" in d.PROTOCOLS_READY:
        assert server(tmp_path, "listen 127.0.0.1:143;", "protocol pop3;").protocol == "pop3"


def test_protocol_guessed_from_a_later_listen(tmp_path):
    assert server(tmp_path, "listen 127.0.0.1:1143;", "listen 127.0.0.1:143;").protocol == "imap"


# ------------------------------------------------------- removed, includes

def test_removed_ssl_directive(tmp_path):
    lines = conf(IMAP + ("ssl on;",))
    message, path = error(tmp_path, lines)
    assert message == 'the "ssl" directive was removed in nginx 1.25.1, use the ' \
                      f'"listen ... ssl" parameter instead in {at(path, lines, "ssl on")}'


def test_removed_imap_block(tmp_path):
    lines = ["imap {", "}"] + conf()
    message, path = error(tmp_path, lines)
    assert message == f'the "imap" block was renamed "mail" in nginx 0.5.15 in {path}:1'


def test_include_applies_at_the_including_level(tmp_path):
    (tmp_path / "extra.conf").write_text("timeout 7s;\nimap_capabilities IMAP4rev1;\n")
    config = server(tmp_path, *IMAP, mail=(AUTH, "include extra.conf;"))
    assert config.timeout == 7
    assert config.imap_capabilities == ("IMAP4rev1",)


def test_include_glob_without_matches_is_fine(tmp_path):
    assert server(tmp_path, *IMAP, mail=(AUTH, "include conf.d/*.conf;")).timeout == 60


def test_missing_include_file(tmp_path):
    lines = conf(IMAP, mail=(AUTH, "include missing.conf;"))
    message, path = error(tmp_path, lines)
    assert message == f'open() "{tmp_path / "missing.conf"}" failed ' \
                      f'(2: No such file or directory) in {at(path, lines, "include")}'


def test_missing_main_file(tmp_path):
    path = tmp_path / "absent.conf"
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path))
    assert str(info.value) == f'open() "{path}" failed (2: No such file or directory)'


def test_unbalanced_braces_missing_close(tmp_path):
    lines = conf()[:-1]                     # no final "}"
    message, path = error(tmp_path, lines)
    assert message == f'unexpected end of file, expecting "}}" in {path}:{len(lines)}'


def test_unbalanced_braces_extra_close(tmp_path):
    lines = conf() + ["}"]
    message, path = error(tmp_path, lines)
    assert message == f'unexpected "}}" in {path}:{len(lines)}'


def test_lexer_error_in_an_included_file_is_not_ignored(tmp_path):
    (tmp_path / "extra.conf").write_text("timeout 7s;\n}\n")
    lines = conf(IMAP, mail=(AUTH, "include extra.conf;"))
    message, _ = error(tmp_path, lines)
    assert message == f'unexpected "}}" in {tmp_path / "extra.conf"}:2'


# ------------------------------------------------------------ command line

@pytest.mark.parametrize("extra, expected", [
    ("foo;", 'unknown directive "foo" in command line'),
    ("timeout 5s;", '"timeout" directive is not allowed here in command line'),
    ("pid;", 'invalid number of arguments in "pid" directive in command line'),
    ("worker_processes none;", 'invalid number "none" in "worker_processes" directive in '
                               "command line"),
    ("pid a.pid; pid b.pid;", '"pid" directive is duplicate in command line'),
    pytest.param("user nosuchuser-mailproxy;",
                 'getpwnam("nosuchuser-mailproxy") failed in command line',
                 marks=pytest.mark.skipif(os.geteuid() != 0, reason="looked up only as root")),
])
def test_command_line_errors_say_command_line(tmp_path, extra, expected):
    message, _ = error(tmp_path, conf(), extra=extra)
    assert message == expected


def test_command_line_directive_then_the_same_in_the_file_is_duplicate(tmp_path):
    lines = conf(top=("pid b.pid;",))
    message, path = error(tmp_path, lines, extra="pid a.pid;")
    assert message == f'"pid" directive is duplicate in {at(path, lines, "pid b.pid")}'


def test_command_line_directives_apply(tmp_path):
    (tmp_path / "run").mkdir()
    config = load(tmp_path, conf(), extra="pid run/x.pid; error_log x.log info;")
    assert config.pid == "run/x.pid"
    assert config.error_logs == (("x.log", "info"),)
    assert config.servers[0].error_log == (("x.log", "info"),)


# ------------------------------------------------------- not implemented yet

def test_resolver_addresses_are_accepted(tmp_path):
    lines = conf(IMAP + ("resolver 127.0.0.1;",))
    assert load(tmp_path, lines).servers[0].resolver == ("127.0.0.1",)


def test_nothing_is_still_later():
    """Everything once refused as "not implemented yet" has arrived."""
    assert [name for name, row in d.TABLE.items() if row.status == d.LATER] == []


def test_worker_processes_above_one_and_auto(tmp_path):
    for text, expected in (("worker_processes 2;", 2), ("worker_processes auto;", os.cpu_count())):
        assert load(tmp_path, conf(top=(text,))).worker_processes == expected


def test_unix_auth_http(tmp_path):
    assert server(tmp_path, *IMAP, mail=("auth_http unix:/tmp/auth.sock:/a;",)).auth_http == \
        ("unix:/tmp/auth.sock", None, "/a", None)
    message, path = error(tmp_path, conf(mail=("auth_http unix:;",)))
    assert message == 'no path in the unix domain socket "unix:" in "auth_http" directive ' \
                      f'in {path}:2'


@pytest.mark.parametrize("text", [
    "starttls off;", "proxy on;", "proxy off;", "proxy_protocol off;", "resolver off;",
    "auth_http_pass_client_cert off;", "ssl_protocols TLSv1.3 TLSv1.2;",
    "ssl_verify_client off;", "worker_processes 1;",
])
def test_default_values_of_unimplemented_directives_are_accepted(tmp_path, text):
    top = (text,) if text.startswith("worker") else ()
    body = IMAP if top else IMAP + (text,)
    assert load(tmp_path, conf(body, top=top)).servers[0].protocol == "imap"


def test_proxy_is_accepted_and_stored(tmp_path):
    assert server(tmp_path, *IMAP, "proxy on;").proxy is True
    assert d.TABLE["proxy"].status == d.NOOP


# ------------------------------------------------------------ value parsers

@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("24h", 86400), ("1h30m", 5400),
    ("500ms", 0.5), ("90", 90), ("0", 0), ("1d", 86400), ("1w", 604800),
    ("1m30s", 90), ("2h0m5s", 7205),
])
def test_parse_time(text, seconds):
    assert values.parse_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5x", "1.5s", "-1", "5 m", "m5", "1h 30m"])
def test_parse_time_refuses(text):
    with pytest.raises(values.BadValue):
        values.parse_time(text)


@pytest.mark.parametrize("text, size", [
    ("4k", 4096), ("4K", 4096), ("1m", 1048576), ("1M", 1048576), ("4096", 4096), ("0", 0),
])
def test_parse_size(text, size):
    assert values.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "k", "4kb", "-1", "1.5k", "4 k"])
def test_parse_size_refuses(text):
    with pytest.raises(values.BadValue):
        values.parse_size(text)


def test_parse_flag():
    assert values.parse_flag("on") is True
    assert values.parse_flag("off") is False
    for text in ("On", "yes", "1", ""):
        with pytest.raises(values.BadValue, match='it must be "on" or "off"'):
            values.parse_flag(text)


# ------------------------------------------------------------- inheritance

def test_mail_level_value_is_inherited(tmp_path):
    config = load(tmp_path, conf(IMAP, ("listen 127.0.0.1:1144;", "protocol imap;",
                                        "timeout 9s;"), mail=(AUTH, "timeout 5s;")))
    assert [s.timeout for s in config.servers] == [5, 9]


def test_auth_http_inherited_and_overridden(tmp_path):
    config = load(tmp_path, conf(IMAP, ("listen 127.0.0.1:1144;", "protocol imap;",
                                        "auth_http 10.0.0.1:81/other;")))
    assert [s.auth_http for s in config.servers] == \
        [("127.0.0.1", 9000, "/auth", "127.0.0.1"), ("10.0.0.1", 81, "/other", "10.0.0.1")]


def test_auth_http_url_forms(tmp_path):
    """(host as written, port, uri, the address it resolved to at load)."""
    assert server(tmp_path, *IMAP, mail=("auth_http http://localhost/x/y;",)).auth_http == \
        ("localhost", 80, "/x/y", "127.0.0.1")
    assert server(tmp_path, *IMAP, mail=("auth_http 127.0.0.1;",)).auth_http == \
        ("127.0.0.1", 80, "/", "127.0.0.1")
    assert server(tmp_path, *IMAP, mail=("auth_http [::1]:8080;",)).auth_http == \
        ("::1", 8080, "/", "::1")


def test_capabilities_list_is_replaced_not_merged(tmp_path):
    config = load(tmp_path, conf(IMAP, ("listen 127.0.0.1:1144;", "protocol imap;",
                                        "imap_capabilities IMAP4rev1 IDLE;"),
                                 mail=(AUTH, "imap_capabilities IMAP4 LITERAL+;")))
    assert [s.imap_capabilities for s in config.servers] == \
        [("IMAP4", "LITERAL+"), ("IMAP4rev1", "IDLE")]


def test_repeating_a_list_directive_at_one_level_appends(tmp_path):
    config = server(tmp_path, *IMAP, mail=(AUTH, "imap_capabilities IMAP4 IMAP4rev1;",
                                           "imap_capabilities IDLE;"))
    assert config.imap_capabilities == ("IMAP4", "IMAP4rev1", "IDLE")


def test_auth_http_header_replaced_not_merged_and_appends_in_order(tmp_path):
    config = load(tmp_path, conf(
        IMAP,
        ("listen 127.0.0.1:1144;", "protocol imap;", "auth_http_header X-B 2;",
         'auth_http_header X-C "three words";'),
        mail=(AUTH, "auth_http_header X-Secret s3cr3t;", "auth_http_header X-A 1;")))
    assert [s.auth_http_header for s in config.servers] == [
        (("X-Secret", "s3cr3t"), ("X-A", "1")),
        (("X-B", "2"), ("X-C", "three words"))]


def test_smtp_capabilities_keep_quoted_spaces(tmp_path):
    config = server(tmp_path, *IMAP, 'smtp_capabilities PIPELINING "SIZE 1000" 8BITMIME;')
    assert config.smtp_capabilities == ("PIPELINING", "SIZE 1000", "8BITMIME")


def test_error_log_inherits_main_then_mail_then_server(tmp_path):
    servers = (IMAP,
               ("listen 127.0.0.1:1144;", "protocol imap;", "error_log server.log debug;",
                "error_log stderr;"))
    config = load(tmp_path, conf(*servers, top=("error_log main.log info;",)))
    assert config.error_logs == (("main.log", "info"),)
    assert [s.error_log for s in config.servers] == [
        (("main.log", "info"),), (("server.log", "debug"), ("stderr", "error"))]
    config = load(tmp_path, conf(*servers, top=("error_log main.log info;",),
                                 mail=(AUTH, "error_log mail.log warn;")))
    assert config.error_logs == (("main.log", "info"),)
    assert [s.error_log for s in config.servers] == [
        (("mail.log", "warn"),), (("server.log", "debug"), ("stderr", "error"))]


def test_error_log_default_is_stderr_at_error(tmp_path):
    config = load(tmp_path, conf())
    assert config.error_logs == (("stderr", "error"),)
    assert config.servers[0].error_log == (("stderr", "error"),)


# ---------------------------------------------------------------- defaults

def test_defaults_match_the_spec(tmp_path):
    config = server(tmp_path)
    expected = {
        "timeout": 60, "proxy_timeout": 86400, "max_errors": 5,
        "server_name": socket.gethostname(), "resolver": None, "resolver_timeout": 30,
        "auth_http": ("127.0.0.1", 9000, "/auth", "127.0.0.1"), "auth_http_header": (),
        "auth_http_timeout": 60, "auth_http_pass_client_cert": False,
        "proxy": False, "proxy_buffer": 4096, "proxy_pass_error_message": False,
        "proxy_protocol": "off", "proxy_smtp_auth": "off", "xclient": True,
        "set_real_ip_from": (),
        "imap_auth": frozenset({"plain"}),
        "imap_capabilities": ("IMAP4", "IMAP4rev1", "UIDPLUS"),
        "imap_client_buffer": 4096,
        "pop3_auth": frozenset({"plain"}), "pop3_capabilities": ("TOP", "USER", "UIDL"),
        "smtp_auth": frozenset({"plain", "login"}), "smtp_capabilities": (),
        "smtp_client_buffer": 4096, "smtp_greeting_delay": 0,
        "starttls": "off", "so_keepalive": None,
        "ssl_protocols": frozenset({"TLSv1.2", "TLSv1.3"}), "ssl_ciphers": "HIGH:!aNULL:!MD5",
        "ssl_prefer_server_ciphers": False, "ssl_session_cache": ("none",),
        "ssl_session_tickets": True, "ssl_session_timeout": 300, "ssl_verify_client": "off",
        "ssl_verify_depth": 1, "ssl_ecdh_curve": "auto", "ssl_certificate": (),
        "ssl_certificate_key": (), "ssl_certificate_compression": False,
        "error_log": (("stderr", "error"),),
    }
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.protocol == "imap"


def test_top_level_defaults(tmp_path):
    config = load(tmp_path, conf())
    assert (config.worker_processes, config.worker_connections, config.pid) == (1, 512, None)
    assert config.prefix == str(tmp_path)
    assert config.path == str(tmp_path / "mail.conf")


def test_top_level_settings(tmp_path):
    (tmp_path / "run").mkdir()      # nginx opens the pid file while it reads the file
    config = load(tmp_path, conf(top=("pid run/mailproxy.pid;", "events {",
                                      "    worker_connections 64;", "}")))
    assert (config.pid, config.worker_connections) == ("run/mailproxy.pid", 64)


def test_config_resolve_uses_the_prefix(tmp_path):
    config = load(tmp_path, conf())
    assert config.resolve("logs/error.log") == os.path.join(str(tmp_path), "logs/error.log")
    assert config.resolve("/var/log/x.log") == "/var/log/x.log"
    assert config.resolve("stderr") == "stderr"


def test_server_config_is_read_only(tmp_path):
    config = server(tmp_path)
    with pytest.raises(AttributeError):
        config.timeout = 5


def test_every_server_setting_has_a_value_or_is_none(tmp_path):
    config = server(tmp_path)
    names = {row.name for row in d.TABLE.values()
             if d.SERVER in row.contexts and not row.block} - {"listen", "protocol", "include"}
    assert names <= set(config.settings)     # include is followed, not a setting


# ------------------------------------------------------ the directive table

def _spec_directives():
    """Backticked names in the first column of section 1's directive tables."""
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is not there")
    section = SPEC.read_text().split("## 1. Directive table", 1)[1].split("\n## 2.", 1)[0]
    names, header = [], None
    for line in section.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif header[0] == "Directive" and not set(cells[0]) <= set("-: "):
            names.append(re.search(r"`([^`]+)`", cells[0]).group(1))
    return names


def test_the_table_covers_every_directive_of_spec_section_1():
    names = _spec_directives()
    assert len(names) > 50
    assert {"mail", "server", "listen", "so_keepalive", "ssl", "starttls"} <= set(names)
    missing = [name for name in names if name not in d.TABLE and name not in d.REMOVED]
    assert missing == []
    assert "so_keepalive" in d.TABLE
    assert "ssl" in d.REMOVED and "ssl" not in d.TABLE


def test_table_rows_are_consistent():
    for name, row in d.TABLE.items():
        assert row.name == name
        assert row.status in (d.READY, d.NOOP, d.LATER, d.GAP, d.IGNORED, d.SKIPPED), name
        low, high = row.nargs
        assert high is None or low <= high, name
        assert row.block or row.parse is not None, name
        if row.default is not None:
            configmod._default(row)         # every default parses
