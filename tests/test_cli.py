"""cli.py: nginx's flags (-c -t -T -p -g -s -v -V), and the program as a process.

Most tests run the click command in-process with CliRunner; the messages go
to stderr as nginx's do.  The last tests start `python mailproxy.py` as a
real process from the source checkout, to prove the launcher runs without an
install, answers clients, quits on SIGQUIT and reports a port in use.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import OpenSSL
import OpenSSL.SSL
import pytest
from click.testing import CliRunner

from mailproxy import NGINX_COMPAT, __version__
from mailproxy import config as configmod
from mailproxy.cli import main
from mailproxy.imap import GREETING

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 15          # seconds for the process to listen or to exit
POLL = 0.05


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_conf(directory, port=None, top="", mail="", name="mail.conf"):
    port = port or free_port()
    path = directory / name
    path.write_text(f"{top}\n"
                    "mail {\n"
                    "    auth_http 127.0.0.1:9000/auth;\n"
                    f"{mail}\n"
                    "    server {\n"
                    f"        listen 127.0.0.1:{port};\n"
                    "        protocol imap;\n"
                    "    }\n"
                    "}\n")
    return path


def run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def said(result):
    """stderr as lines."""
    return result.stderr.splitlines()


# -------------------------------------------------------------------- -t

def test_test_ok(tmp_path):
    path = write_conf(tmp_path)
    result = run("-t", "-c", str(path))
    assert result.exit_code == 0
    assert said(result) == [f"mailproxy: the configuration file {path} syntax is ok",
                            f"mailproxy: configuration file {path} test is successful"]
    assert result.stdout == ""


def test_test_failure(tmp_path):
    path = write_conf(tmp_path, mail="    foo bar;")
    result = run("-t", "-c", str(path))
    assert result.exit_code == 1
    assert said(result) == [f'mailproxy: [emerg] unknown directive "foo" in {path}:4',
                            f"mailproxy: configuration file {path} test failed"]


def test_test_failure_with_relative_path_names_the_file_absolutely(tmp_path, monkeypatch):
    write_conf(tmp_path, mail="    foo bar;")
    monkeypatch.chdir(tmp_path)
    result = run("-t", "-c", "mail.conf")
    assert result.exit_code == 1
    assert said(result)[0] == \
        f'mailproxy: [emerg] unknown directive "foo" in {tmp_path / "mail.conf"}:4'


def test_test_failure_line_names_the_file_that_was_read(tmp_path, monkeypatch):
    write_conf(tmp_path, mail="    foo bar;")
    monkeypatch.chdir(tmp_path.parent)
    result = run("-p", str(tmp_path), "-t", "-c", "mail.conf")
    assert result.exit_code == 1
    assert said(result)[-1] == \
        f"mailproxy: configuration file {tmp_path / 'mail.conf'} test failed"


def test_test_missing_file(tmp_path):
    path = tmp_path / "absent.conf"
    result = run("-t", "-c", str(path))
    assert result.exit_code == 1
    assert said(result)[-1] == f"mailproxy: configuration file {path} test failed"
    assert said(result)[0].startswith("mailproxy: [emerg] ")


def test_launcher_runs_from_a_checkout_without_install():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "mailproxy.py", "-t", "-c", "examples/mail.conf"],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    path = REPO / "examples" / "mail.conf"
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"mailproxy: the configuration file {path} syntax is ok",
        f"mailproxy: configuration file {path} test is successful"]


# -------------------------------------------------------------------- -T

def test_dump_shows_defaults_per_server(tmp_path):
    path = write_conf(tmp_path, port=1143)
    result = run("-T", "-c", str(path))
    assert result.exit_code == 0
    assert said(result)[-1] == f"mailproxy: configuration file {path} test is successful"
    lines = [line.strip() for line in result.stdout.splitlines()]
    for expected in ("listen 127.0.0.1:1143;", "protocol imap;", "timeout 60s;",
                     "proxy_timeout 24h;", "max_errors 5;", "auth_http_timeout 60s;",
                     "imap_capabilities IMAP4 IMAP4rev1 UIDPLUS;", "imap_auth plain;",
                     "proxy_buffer 4k;", "xclient on;", "smtp_auth plain login;",
                     "starttls off;", "error_log stderr error;", "worker_processes 1;",
                     "worker_connections 512;", "auth_http 127.0.0.1:9000/auth;",
                     f"server_name {socket.gethostname()};"):
        assert expected in lines


def test_dump_has_one_block_per_server(tmp_path):
    path = tmp_path / "mail.conf"
    path.write_text("mail {\n    auth_http 127.0.0.1:9000;\n    timeout 5s;\n"
                    "    server {\n        listen 127.0.0.1:1143;\n        protocol imap;\n    }\n"
                    "    server {\n        listen 127.0.0.1:1144;\n        protocol imap;\n"
                    "        timeout 7s;\n    }\n}\n")
    result = run("-T", "-c", str(path))
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert [line for line in lines if line.startswith("timeout")] == ["timeout 5s;",
                                                                      "timeout 7s;"]
    assert f"server {{  # {path}:4" in lines and f"server {{  # {path}:8" in lines


def test_dump_is_itself_a_loadable_config(tmp_path):
    path = tmp_path / "mail.conf"
    path.write_text("worker_processes 1;\n"
                    "mail {\n    auth_http 127.0.0.1:9000/auth;\n"
                    '    auth_http_header X-Secret "two words";\n'
                    "    imap_capabilities IMAP4rev1 IDLE;\n    so_keepalive on;\n"
                    "    server {\n        listen 127.0.0.1:2000-2001 backlog=64;\n"
                    "        protocol imap;\n        error_log err.log info;\n    }\n}\n")
    first = run("-T", "-c", str(path))
    assert first.exit_code == 0
    dumped = tmp_path / "dumped.conf"
    dumped.write_text(first.stdout)
    original = configmod.load(str(path), prefix=str(tmp_path))
    reloaded = configmod.load(str(dumped), prefix=str(tmp_path))
    for before, after in zip(original.servers, reloaded.servers, strict=True):
        assert before.listens == after.listens
        assert before.protocol == after.protocol
        names = set(before.settings) | set(after.settings)
        assert {n: getattr(before, n) for n in names} == {n: getattr(after, n) for n in names}
    second = run("-T", "-c", str(dumped))
    strip = [line for line in second.stdout.splitlines() if "#" not in line]
    assert strip == [line for line in first.stdout.splitlines() if "#" not in line]


def test_dump_not_printed_when_the_test_fails(tmp_path):
    path = write_conf(tmp_path, mail="    timeout never;")
    result = run("-T", "-c", str(path))
    assert result.exit_code == 1
    assert result.stdout == ""


# ------------------------------------------------------------------ -v -V

def test_version():
    result = run("-v")
    assert result.exit_code == 0
    assert said(result) == [f"mailproxy version: mailproxy/{__version__} ({NGINX_COMPAT})"]


def test_version_and_build_details():
    """No compiled-in prefix: -V names the configuration file's folder."""
    result = run("-V")
    assert result.exit_code == 0
    version = sys.version.split()[0]
    assert said(result) == [
        f"mailproxy version: mailproxy/{__version__} ({NGINX_COMPAT})",
        f"built with Python {version}, pyOpenSSL {OpenSSL.__version__} with "
        f"{OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode()}",
        "configuration file: /etc/mailproxy/mail.conf",
        "conf prefix: /etc/mailproxy/ (included and TLS files; the configuration file's "
        "folder)",
        "prefix: /etc/mailproxy/ (pid and log files; -p, else the configuration file's folder)"]


def test_build_details_name_the_prefixes_of_the_file_given(tmp_path):
    result = run("-V", "-p", str(tmp_path / "run"), "-c", str(tmp_path / "conf" / "x.conf"))
    assert said(result)[2:] == [
        f"configuration file: {tmp_path}/conf/x.conf",
        f"conf prefix: {tmp_path}/conf/ (included and TLS files; the configuration file's "
        "folder)",
        f"prefix: {tmp_path}/run/ (pid and log files; -p, else the configuration file's "
        "folder)"]


def test_version_with_test_still_tests(tmp_path):
    path = write_conf(tmp_path)
    result = run("-v", "-t", "-c", str(path))
    assert result.exit_code == 0
    assert said(result)[0].startswith("mailproxy version: ")
    assert said(result)[-1] == f"mailproxy: configuration file {path} test is successful"


# ---------------------------------------------------------------- -p  -g

def test_prefix_for_a_relative_config_path(tmp_path, monkeypatch):
    write_conf(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    result = run("-p", str(tmp_path), "-t", "-c", "mail.conf")
    assert result.exit_code == 0
    assert said(result)[-1] == \
        f"mailproxy: configuration file {tmp_path / 'mail.conf'} test is successful"


def test_prefix_for_a_relative_pid_path(tmp_path, monkeypatch):
    write_conf(tmp_path, top="pid run/mailproxy.pid;")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mailproxy.pid").write_text("not-a-pid\n")
    monkeypatch.chdir(tmp_path.parent)
    result = run("-p", str(tmp_path), "-c", "mail.conf", "-s", "reopen")
    assert result.exit_code == 1
    assert f'"{tmp_path / "run" / "mailproxy.pid"}"' in said(result)[0]


def test_extra_directives_appear_in_the_dump(tmp_path):
    path = write_conf(tmp_path)
    result = run("-g", "pid x.pid;", "-T", "-c", str(path))
    assert result.exit_code == 0
    assert "pid x.pid;" in result.stdout.splitlines()


def test_bad_extra_directive_names_the_command_line(tmp_path):
    path = write_conf(tmp_path)
    result = run("-g", "foo;", "-t", "-c", str(path))
    assert result.exit_code == 1
    assert said(result) == ['mailproxy: [emerg] unknown directive "foo" in command line',
                            f"mailproxy: configuration file {path} test failed"]


def test_extra_directive_in_the_wrong_context(tmp_path):
    path = write_conf(tmp_path)
    result = run("-g", "timeout 5s;", "-t", "-c", str(path))
    assert result.exit_code == 1
    assert said(result)[0] == \
        'mailproxy: [emerg] "timeout" directive is not allowed here in command line'


# --------------------------------------------------------------- usage

def test_unknown_option_is_a_usage_error():
    result = run("-z")
    assert result.exit_code == 2
    assert "-z" in result.stderr


def test_unknown_signal_name_is_a_usage_error(tmp_path):
    result = run("-s", "explode", "-c", str(write_conf(tmp_path)))
    assert result.exit_code == 2
    assert "explode" in result.stderr


def test_help():
    result = run("-h")
    assert result.exit_code == 0
    for flag in ("-c", "-t", "-T", "-p", "-g", "-s", "-v", "-V"):
        assert f"  {flag} " in result.stdout or f"  {flag}," in result.stdout


# ---------------------------------------------------------------------- -s

def test_signal_without_pid_directive(tmp_path):
    result = run("-s", "quit", "-c", str(write_conf(tmp_path)))
    assert result.exit_code == 1
    assert said(result) == [
        'mailproxy: [error] no "pid" directive in the configuration, cannot signal']


def test_signal_with_a_missing_pid_file(tmp_path):
    path = write_conf(tmp_path, top=f"pid {tmp_path / 'absent.pid'};")
    result = run("-s", "quit", "-c", str(path))
    assert result.exit_code == 1
    assert said(result)[0].startswith(
        f'mailproxy: [error] signal "quit" to the process in "{tmp_path / "absent.pid"}" '
        "failed (")


def test_signal_with_a_bad_config_fails_before_signalling(tmp_path):
    path = write_conf(tmp_path, mail="    foo;")
    result = run("-s", "quit", "-c", str(path))
    assert result.exit_code == 1
    assert said(result) == [f'mailproxy: [emerg] unknown directive "foo" in {path}:4']


@pytest.mark.parametrize("name, number", [("stop", signal.SIGTERM), ("quit", signal.SIGQUIT)])
def test_signal_reaches_the_process_in_the_pid_file(tmp_path, name, number):
    child = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "mailproxy.pid").write_text(f"{child.pid}\n")
        path = write_conf(tmp_path, top="pid mailproxy.pid;")
        result = run("-p", str(tmp_path), "-s", name, "-c", str(path))
        assert result.exit_code == 0, result.stderr
        assert child.wait(timeout=5) == -number
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=5)


# ------------------------------------------------------- the real process

def _wait_listening(port, process):
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(POLL)
    return False


def _wait_file(path, timeout=START_TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not path.exists():
        time.sleep(POLL)
    return path.exists()


def _start(*args):
    return subprocess.Popen([sys.executable, "mailproxy.py", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
    """Make sure the process is gone; return (exit status, stdout, stderr)."""
    try:
        out, err = process.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=5)
    return process.returncode, out, err


def test_process_greets_and_quits_gracefully(tmp_path):
    port = free_port()
    (tmp_path / "logs").mkdir()
    write_conf(tmp_path, port=port, top="pid mailproxy.pid;\nerror_log logs/error.log info;")
    process = _start("-p", str(tmp_path), "-c", "mail.conf")
    try:
        assert _wait_listening(port, process), _finish(process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            assert reader.readline() == GREETING == b"* OK IMAP4 ready\r\n"
            sock.sendall(b"a LOGOUT\r\n")
            assert reader.readline() == b"* BYE\r\n"
            assert reader.readline() == b"a OK completed\r\n"
            reader.close()
        pid_file = tmp_path / "mailproxy.pid"
        assert _wait_file(pid_file)
        assert pid_file.read_text() == f"{process.pid}\n"
        process.send_signal(signal.SIGQUIT)
        status, _, err = _finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    assert status == 0, err
    assert not pid_file.exists()
    log = (tmp_path / "logs" / "error.log").read_text()
    assert f"[notice] {process.pid}#" in log
    assert f"mailproxy/{__version__} ({NGINX_COMPAT})" in log


def test_process_stops_on_the_stop_signal_from_the_cli(tmp_path):
    port = free_port()
    write_conf(tmp_path, port=port, top="pid mailproxy.pid;")
    process = _start("-p", str(tmp_path), "-c", "mail.conf")
    try:
        assert _wait_listening(port, process), _finish(process)
        assert _wait_file(tmp_path / "mailproxy.pid")
        result = run("-p", str(tmp_path), "-c", "mail.conf", "-s", "stop")
        assert result.exit_code == 0, result.stderr
        status, _, err = _finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    assert status == 0, err
    assert not (tmp_path / "mailproxy.pid").exists()


def test_process_reports_a_port_in_use(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        write_conf(tmp_path, port=port, top="pid mailproxy.pid;")
        process = _start("-p", str(tmp_path), "-c", "mail.conf")
        status, _, err = _finish(process)
    assert status == 1
    assert f"bind() to 127.0.0.1:{port} failed (98: Address already in use)" in err
    assert "[emerg]" in err
    assert not (tmp_path / "mailproxy.pid").exists()
