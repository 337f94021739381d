"""Configurations fail at -t or never (issue 16, finding 6).

Each value that used to pass `mailproxy -t` and then break the start, the
relay or every login is now refused at its file:line in nginx's words;
values nginx accepts and only the kernel may refuse at run time
(`worker_rlimit_nofile`) are logged by the worker, which carries on.  Some
tests run the real command (`python mailproxy.py -t -c FILE`), as an
operator would; the rest load the file in-process, as -t does.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import free_port
from mailproxy import conffile, values
from mailproxy.config import ConfigError
from mailproxy.ops.master import Master
from mailproxy.relay import Relay
from mailproxy.server import Worker
from mailproxy import config as configmod
from test_config import at, conf, error, load, server, write

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "mailproxy.py"
AUTH = "auth_http 127.0.0.1:9000/auth;"


def run_test(path):
    """`mailproxy -t -c path`: (exit status, stderr)."""
    done = subprocess.run([sys.executable, str(SCRIPT), "-t", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stderr


def imap(*lines, listen="listen 127.0.0.1:1143;"):
    return (listen, "protocol imap;", *lines)


# ------------------------------------------------------------ include loops

def test_an_include_loop_is_a_file_line_error_not_a_traceback(tmp_path):
    write(tmp_path, ["include a.conf;"], name="b.conf")
    write(tmp_path, ["include b.conf;"], name="a.conf")
    path = write(tmp_path, ["include a.conf;"])
    status, stderr = run_test(path)
    assert status == 1 and "Traceback" not in stderr
    assert (f"[emerg] includes nested more than {conffile.MAX_INCLUDE_DEPTH} deep in "
            f"{tmp_path}/") in stderr
    assert f"configuration file {path} test failed" in stderr


# -------------------------------------------------------- numbers and sizes

@pytest.mark.parametrize("param, message", [
    ("backlog=99999999999999999999", 'invalid number "99999999999999999999"'),
    ("backlog=2147483648", 'invalid number "2147483648"'),
    ("rcvbuf=99999999999g", 'invalid value "99999999999g"'),
    ("sndbuf=2g", 'invalid value "2g"'),
    ("so_keepalive=1s:1s:99999999999",
     'invalid so_keepalive value: "so_keepalive=1s:1s:99999999999"'),
    ("so_keepalive=1s:1s:128", 'invalid so_keepalive value: "so_keepalive=1s:1s:128"'),
    ("so_keepalive=32768::", 'invalid so_keepalive value: "so_keepalive=32768::"'),
    ("so_keepalive=500ms::", 'invalid so_keepalive value: "so_keepalive=500ms::"'),
])
def test_listen_numbers_beyond_what_the_kernel_takes_fail_the_test(tmp_path, param, message):
    lines = conf(imap(listen=f"listen 127.0.0.1:1143 {param};"))
    text, path = error(tmp_path, lines)
    assert text == f'{message} in "listen" directive in {at(path, lines, "listen")}'


def test_listen_numbers_at_their_limits_are_accepted(tmp_path):
    entry = server(tmp_path, *imap(listen="listen 127.0.0.1:1143 backlog=2147483647 "
                                          "rcvbuf=2147483647 so_keepalive=32767:32767:127;")
                   ).listens[0]
    assert (entry.backlog, entry.rcvbuf, entry.so_keepalive) == \
        (2 ** 31 - 1, 2 ** 31 - 1, (32767, 32767, 127))


def test_listen_with_huge_numbers_used_to_pass_and_then_fail_to_start(tmp_path):
    path = write(tmp_path, conf(imap(listen="listen 127.0.0.1:1143 "
                                            "backlog=99999999999999999999;")))
    status, stderr = run_test(path)
    assert status == 1 and "Traceback" not in stderr
    assert f'in "listen" directive in {path}:' in stderr


@pytest.mark.parametrize("line, message", [
    ("proxy_buffer 99999999999999999999g;", 'invalid value "99999999999999999999g"'),
    ("imap_client_buffer 100g;",
     f'invalid value "100g", a buffer must be 1 to {values.MAX_BUFFER} bytes'),
    ("smtp_client_buffer 0;", f'invalid value "0", a buffer must be 1 to '
                              f'{values.MAX_BUFFER} bytes'),
    ("max_errors 9223372036854775808;", 'invalid number "9223372036854775808"'),
])
def test_sizes_and_numbers_beyond_their_range_fail_the_test(tmp_path, line, message):
    assert_refused(tmp_path, line, message)


def test_more_workers_than_nginx_can_spawn_fail_the_test(tmp_path):
    assert load(tmp_path, ["worker_processes 1024;"] + conf()).worker_processes == 1024
    lines = ["worker_processes 1025;"] + conf()
    text, path = error(tmp_path, lines)
    assert text == f'invalid number "1025" in "worker_processes" directive in {path}:1'


def assert_refused(tmp_path, line, message):
    """`line` in an IMAP server fails with `message`, naming its directive
    and file:line."""
    lines = conf(imap(line))
    text, path = error(tmp_path, lines)
    name = line.split()[0]
    assert text == f'{message} in "{name}" directive in {at(path, lines, name)}'


def test_nginx_sized_values_are_accepted(tmp_path):
    config = server(tmp_path, *imap("proxy_buffer 2097148k;", "max_errors 9223372036854775807;"))
    assert (config.proxy_buffer, config.max_errors) == (values.MAX_BUFFER, 2 ** 63 - 1)


def test_a_size_above_nginx_size_t_is_refused():
    with pytest.raises(values.BadValue):
        values.parse_size(str(2 ** 63))
    assert values.parse_size("8589934591g") == 8589934591 * 2 ** 30


# ------------------------------------------------------ worker_rlimit_nofile

def test_a_refused_rlimit_is_logged_by_the_worker_which_carries_on(tmp_path):
    """nginx accepts any number; the kernel refuses one above the hard
    limit (without the rights) and the worker says so in nginx's words."""
    port = free_port()
    lines = ["worker_rlimit_nofile 99999999999;", "error_log stderr info;"]
    path = write(tmp_path, lines + conf(imap(listen=f"listen 127.0.0.1:{port};")))
    assert run_test(path)[0] == 0
    proxy = subprocess.Popen([sys.executable, str(SCRIPT), "-c", str(path)],
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(100).startswith(b"* OK")
    finally:
        proxy.terminate()
        stderr = proxy.communicate(timeout=30)[1]
    assert "[alert]" in stderr and "Traceback" not in stderr
    assert "setrlimit(RLIMIT_NOFILE, 99999999999) failed (1: Operation not permitted)" in stderr


def _wait_for_port(port, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


# ------------------------------------------------ values that reach the wire

@pytest.mark.parametrize("line, shown", [
    ('server_name "mx\\n220 evil";', "mx\\n220 evil"),
    ('server_name "mx\n220 evil";', "mx\\n220 evil"),
    ("server_name mx\x00.test;", "mx\\x00.test"),
    ('imap_capabilities IMAP4rev1 "X\\r\\n* BYE";', "X\\r\\n* BYE"),
    ('trace "login:a\\nb";', "login:a\\nb"),
])
def test_nul_cr_and_lf_in_values_fail_the_test(tmp_path, line, shown):
    assert_refused(tmp_path, line, f'invalid value "{shown}"')


# ------------------------------------------------------------ error_log, pid

@pytest.mark.parametrize("line", ["error_log {dir}/nodir/error.log info;",
                                  "pid {dir}/nodir/mailproxy.pid;"])
def test_a_log_or_pid_file_in_a_missing_folder_fails_the_test(tmp_path, line):
    lines = [line.format(dir=tmp_path)] + conf()
    path = write(tmp_path, lines)
    status, stderr = run_test(path)
    assert status == 1 and "Traceback" not in stderr
    name = lines[0].split()[1].rstrip(";")
    assert (f'[emerg] open() "{name}" failed (2: No such file or directory) in {path}:1'
            in stderr)


def test_a_server_error_log_is_opened_too(tmp_path):
    lines = conf(imap("error_log nodir/x.log;"))
    text, path = error(tmp_path, lines)
    assert text == (f'open() "{tmp_path}/nodir/x.log" failed (2: No such file or directory) '
                    f'in {at(path, lines, "error_log")}')


def test_the_pid_check_leaves_no_pid_file_behind(tmp_path):
    load(tmp_path, ["pid mailproxy.pid;"] + conf())
    assert not (tmp_path / "mailproxy.pid").exists()


# --------------------------------------------------------- auth_http_header

@pytest.mark.parametrize("args, message", [
    ('"X Bad:" v', 'invalid header name "X Bad:"'),
    ('"" v', 'invalid header name ""'),
    ('X-Key "a\\nb"', 'invalid value "a\\nb"'),
    ('X-Key "a\\rX-Evil: 1"', 'invalid value "a\\rX-Evil: 1"'),
    ("X-Key \"a\x01b\"", 'invalid header value "a\\x01b"'),
    ("X-Key \"a\x7fb\"", 'invalid header value "a\\x7fb"'),
])
def test_auth_http_header_names_and_values_are_checked(tmp_path, args, message):
    lines = conf(imap(f"auth_http_header {args};"))
    text, path = error(tmp_path, lines)
    assert text == f'{message} in "auth_http_header" directive in ' \
                   f'{at(path, lines, "auth_http_header")}'


def test_a_header_value_may_hold_a_tab(tmp_path):
    config = server(tmp_path, *imap('auth_http_header X-Key "a\\tb c";'))
    assert config.auth_http_header == (("X-Key", "a\tb c"),)


# ------------------------------------------------ values that reach the wire

# ---------------------------------------------------------------- escapes

@pytest.mark.parametrize("written, value", [
    ('"a\\tb"', "a\tb"),
    ("'a\\tb'", "a\tb"),
    ("a\\tb", "a\tb"),                  # nginx rewrites escapes in bare words too
    ('"a\\"b"', 'a"b'),
    ("'a\\'b'", "a'b"),
    ('"a\\\\tb"', "a\\tb"),
    ('"a\\\\"', "a\\"),
    ('"a\\xb"', "a\\xb"),               # not one of nginx's escapes: kept
])
def test_escapes_are_processed_as_nginx_does(tmp_path, written, value):
    assert server(tmp_path, *imap(f"server_name {written};")).server_name == value


def test_the_dump_reads_back_to_the_same_values(tmp_path):
    lines = conf(imap('server_name "a\\tb\\\\c\\"d;e";', 'auth_http_header X-K "x y";'))
    dumped = configmod.dump(load(tmp_path, lines))
    again = tmp_path / "again"
    again.mkdir()
    reread = configmod.load(str(write(again, dumped.splitlines())), prefix=str(again))
    assert reread.servers[0].server_name == 'a\tb\\c"d;e'
    assert reread.servers[0].auth_http_header == (("X-K", "x y"),)


# ---------------------------------------------------------------- buffers

def test_a_buffer_the_machine_cannot_give_ends_the_relay_at_once():
    """Each read allocates its buffer: a size malloc() refuses (1 TB here,
    far above MAX_BUFFER) stops both directions instead of killing one copy
    thread and leaving the session to hang until proxy_timeout."""
    client, client_peer = socket.socketpair()
    backend, backend_peer = socket.socketpair()
    with client, client_peer, backend, backend_peer:
        client_peer.sendall(b"a NOOP\r\n")
        started = time.monotonic()
        outcome = Relay(client, backend, idle_timeout=30, linger=30,
                        buffers=(2 ** 40, 4096)).run()
        assert outcome.closed_by == "error"
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("workers", [1, 2])
def test_a_pid_folder_gone_since_the_check_ends_the_start_cleanly(tmp_path, workers):
    """-t opened the pid file; if its folder goes before the start, the
    proxy says nginx's [emerg] line, closes its ports and exits 1 (it used
    to end in a traceback after the ports were open)."""
    (tmp_path / "run").mkdir()
    port = free_port()
    lines = [f"worker_processes {workers};", "pid run/mailproxy.pid;",
             f"error_log {tmp_path}/error.log info;"]
    config = load(tmp_path, lines + conf(imap(listen=f"listen 127.0.0.1:{port};")))
    (tmp_path / "run").rmdir()
    if workers == 1:
        worker = Worker(config)
        worker.open()
        assert worker.serve() == 1
    else:
        assert Master(config, None).run() == 1
    said = (tmp_path / "error.log").read_text()
    assert (f'[emerg] {os.getpid()}#' in said and
            f'open() "{tmp_path}/run/mailproxy.pid" failed (2: No such file or directory)'
            in said)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("text, line, message", [
    ("x 1;\n{ worker_connections 512; }\nmail\n    server_name mx.test;\n}\n", 5,
     'unexpected "}"'),
    ("x 1;\n{ worker_connections 512; }\nmail {'\n    server_name mx.test;\n}\n", 6,
     'unexpected end of file, expecting "}"'),
])
def test_unbalanced_braces_after_a_nameless_block_are_a_file_line_error(tmp_path, text, line,
                                                                         message):
    """Found by test_fuzz.py: crossplane's parser let these pass and its
    lexer raised its own exception, a traceback at -t."""
    path = tmp_path / "mail.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path), prefix=str(tmp_path))
    assert str(info.value) == f"{message} in {path}:{line}"


@pytest.mark.parametrize("line", ["listen \x80127.0.0.1:1143;", "set_real_ip_from \x80x;"])
def test_a_name_idna_cannot_encode_is_not_found(tmp_path, line):
    """Found by test_fuzz.py: getaddrinfo's IDNA step raised UnicodeError,
    a traceback at -t."""
    lines = conf(("protocol imap;", line) if "listen" in line else imap(line))
    text, path = error(tmp_path, lines)
    name = line.split()[0]
    assert text.startswith("host not found in ")
    assert text.endswith(f'in "{name}" directive in {at(path, lines, name)}')
