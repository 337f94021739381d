"""The master process, as an operator meets it: the real CLI in a subprocess.

`worker_processes 2` makes `python mailproxy.py -c CONF` a master with two
workers.  These tests watch the process tree in /proc, kill a worker and
see it replaced, reload with a changed capability list while an IMAP
session relays (no byte lost), reload with a broken config (the old one
keeps serving), stop gracefully with a session open, and reopen logs on
SIGUSR1 after the log file was moved; as root with `user nobody`, also with
`worker_processes 1` (a master and one worker), the sessions run as nobody.
"""

import grp
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import Client, free_port, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """\
{top}worker_processes {workers};
error_log {log} info;
pid {pid};
mail {{
    auth_http {auth};
    server {{ listen 127.0.0.1:{port}; protocol imap; imap_capabilities {caps}; }}
}}
"""


class Master:
    """`python mailproxy.py -c CONF` with two workers, and its children."""

    def __init__(self, tmp_path, auth_url, caps="IMAP4rev1 FIRST", top="", workers=2):
        self.tmp, self.top, self.count = tmp_path, top, workers
        self.port = free_port()
        self.log_path = tmp_path / "error.log"
        self.pid_path = tmp_path / "mailproxy.pid"
        self.conf = tmp_path / "mail.conf"
        self.auth = auth_url
        self.write(caps)
        self.process = subprocess.Popen([sys.executable, "mailproxy.py", "-c", str(self.conf)],
                                        cwd=ROOT, stderr=subprocess.PIPE)
        assert wait_until(lambda: len(self.workers()) == workers and self.accepts(),
                          timeout=10), \
            self.log()

    def write(self, caps):
        self.conf.write_text(CONFIG.format(top=self.top, workers=self.count, log=self.log_path,
                                           pid=self.pid_path, auth=self.auth, port=self.port,
                                           caps=caps))

    def workers(self):
        children = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
        try:
            with open(children) as file:
                return [int(pid) for pid in file.read().split()]
        except OSError:
            return []

    def accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def signal(self, signo):
        os.kill(self.process.pid, signo)

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self):
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture
def master(tmp_path, echo_peers):
    auth, _ = echo_peers
    running = Master(tmp_path, auth.url[len("http://"):])
    yield running
    running.stop()


def capability(port):
    with Client(port) as client:
        client.line()
        client.send(b"a CAPABILITY\r\n")
        return client.line()


def logged_in(port):
    client = Client(port)
    assert client.line() == b"* OK IMAP4 ready\r\n"
    client.send(b"a LOGIN joe secret\r\n")
    assert client.line() == b"a OK logged in\r\n"
    return client


def echo_exactly(client, size):
    """Send `size` random bytes through the relay; the echo must match."""
    payload = os.urandom(size)
    client.send(payload)
    assert hashlib.sha256(client.read(size)).digest() == hashlib.sha256(payload).digest()


def test_two_workers_and_a_master_that_serves_nothing(master):
    workers = master.workers()
    assert len(workers) == 2 and master.process.pid not in workers
    assert int(master.pid_path.read_text()) == master.process.pid
    assert capability(master.port) == b"* CAPABILITY IMAP4rev1 FIRST AUTH=PLAIN\r\n"


def test_a_dead_worker_is_replaced(master):
    victim = master.workers()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(master.workers()) == 2 and victim not in master.workers(),
                      timeout=10)
    # The line may land a moment after the new worker shows (a loaded machine).
    line = f"worker process {victim} exited with code -9, starting a new one"
    assert wait_until(lambda: line in master.log()), master.log()
    assert capability(master.port).startswith(b"* CAPABILITY")


def test_reload_keeps_a_relayed_session_byte_exact(master):
    """The reload drill: a session in relay keeps flowing, new sessions see
    the new configuration, old workers leave once their sessions end."""
    old_workers = set(master.workers())
    client = logged_in(master.port)
    echo_exactly(client, 256 * 1024)
    master.write("IMAP4rev1 SECOND")
    master.signal(signal.SIGHUP)
    assert wait_until(lambda: len(set(master.workers()) - old_workers) == 2, timeout=10)
    assert wait_until(lambda: capability(master.port) ==
                      b"* CAPABILITY IMAP4rev1 SECOND AUTH=PLAIN\r\n", timeout=10)
    echo_exactly(client, 4 * 1024 * 1024)       # the old worker still relays it
    client.send(b"z LOGOUT\r\n")
    assert client.line() == b"z LOGOUT\r\n"     # the backend echoes
    client.close()
    assert wait_until(lambda: not old_workers & set(master.workers()), timeout=10)


def test_reload_with_a_broken_config_keeps_the_old_one(master):
    workers = set(master.workers())
    master.conf.write_text(master.conf.read_text().replace("protocol imap;", "protocol imap"))
    master.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload failed, keeping the old configuration" in master.log())
    assert set(master.workers()) == workers
    assert capability(master.port) == b"* CAPABILITY IMAP4rev1 FIRST AUTH=PLAIN\r\n"


def test_reload_logs_the_warnings_of_the_new_config(master):
    """nginx logs a reloaded file's [warn] lines; so does the master."""
    master.conf.write_text("pcre_jit on;\n" + master.conf.read_text())
    master.signal(signal.SIGHUP)
    warning = ': the "pcre_jit" directive is ignored: mailproxy matches no regular ' \
              f"expressions in {master.conf}:1"
    assert wait_until(lambda: any("[warn]" in line and line.endswith(warning)
                                  for line in master.log().splitlines())), master.log()


def test_reload_to_another_pid_file_writes_it_and_removes_the_old(master):
    """nginx writes the new pid file and deletes the old one (issue 17)."""
    moved = master.tmp / "moved.pid"
    master.conf.write_text(master.conf.read_text().replace(str(master.pid_path), str(moved)))
    master.signal(signal.SIGHUP)
    assert wait_until(lambda: moved.exists() and not master.pid_path.exists()), master.log()
    assert int(moved.read_text()) == master.process.pid


def test_reload_to_a_pid_file_that_cannot_be_written_keeps_the_old_config(master):
    master.conf.write_text(master.conf.read_text().replace(
        str(master.pid_path), str(master.tmp / "missing" / "x.pid")))
    master.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload failed, keeping the old configuration" in master.log())
    assert int(master.pid_path.read_text()) == master.process.pid
    assert capability(master.port) == b"* CAPABILITY IMAP4rev1 FIRST AUTH=PLAIN\r\n"


def test_reload_to_an_error_log_that_cannot_be_opened_keeps_the_old_config(master):
    """The master opens every log file of the new configuration before it
    commits to it; one that fails is a failed reload, not a dead master."""
    workers = set(master.workers())
    missing = master.tmp / "missing" / "error.log"
    master.conf.write_text(master.conf.read_text().replace(
        "mail {", f"mail {{\n    error_log {missing} info;", 1))
    master.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload failed, keeping the old configuration" in master.log())
    assert f'open() "{missing}" failed (2: No such file or directory)' in master.log()
    assert master.process.poll() is None and set(master.workers()) == workers
    assert int(master.pid_path.read_text()) == master.process.pid
    assert capability(master.port) == b"* CAPABILITY IMAP4rev1 FIRST AUTH=PLAIN\r\n"


def test_graceful_quit_waits_for_the_open_session(master):
    client = logged_in(master.port)
    master.signal(signal.SIGQUIT)
    assert wait_until(lambda: not master.accepts(), timeout=10)
    echo_exactly(client, 64 * 1024)             # still relaying while stopping
    assert master.process.poll() is None
    client.close()
    assert master.process.wait(timeout=15) == 0
    assert not master.pid_path.exists()


def writes_to(pid, path):
    """Does process `pid` hold `path` open?"""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"{fds}/{name}") == str(path):
                return True
        except OSError:
            pass
    return False


def test_usr1_reopens_the_log_after_it_was_moved(master):
    moved = master.tmp / "error.log.1"
    os.rename(master.log_path, moved)
    master.signal(signal.SIGUSR1)
    assert wait_until(lambda: master.log_path.exists(), timeout=10)
    # The master reopens first, then signals the workers: wait until no
    # worker still writes to the moved file, or a login may be logged there.
    assert wait_until(lambda: not any(writes_to(pid, moved) for pid in master.workers()),
                      timeout=10)
    capability(master.port)
    with logged_in(master.port):
        pass
    assert wait_until(lambda: "client logged in" in master.log(), timeout=10)
    assert "reopening logs" in moved.read_text()


def ids(pid):
    """The real uid and gid of a process."""
    with open(f"/proc/{pid}/status") as file:
        fields = dict(line.split(":", 1) for line in file)
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


@pytest.mark.skipif(os.geteuid() != 0, reason="workers run as another user only under root")
@pytest.mark.parametrize("workers", [1, 2])
def test_usr1_gives_the_reopened_log_to_the_worker_user(echo_peers, workers):
    """With `user nobody nogroup`, sessions run as nobody, even with
    `worker_processes 1` (as nginx, a master and one worker); the master
    recreates error.log as root on SIGUSR1 and gives it to nobody before
    the workers reopen it, as nginx's master does."""
    folder = Path(tempfile.mkdtemp(prefix="mp-user-", dir="/tmp"))
    folder.chmod(0o755)                 # the workers (nobody) must reach the file
    auth, _ = echo_peers
    running = Master(folder, auth.url[len("http://"):], top="user nobody nogroup;\n",
                     workers=workers)
    try:
        nobody = (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        # A worker drops root once it has set up, a moment after the fork.
        assert wait_until(lambda: [ids(pid) for pid in running.workers()] == [nobody] * workers,
                          timeout=10), [ids(pid) for pid in running.workers()]
        assert ids(running.process.pid) == (0, 0)
        moved = folder / "error.log.1"
        os.rename(running.log_path, moved)
        running.signal(signal.SIGUSR1)
        assert wait_until(lambda: not any(writes_to(pid, moved)
                                          for pid in running.workers()), timeout=10)
        assert running.log_path.stat().st_uid == pwd.getpwnam("nobody").pw_uid
        with logged_in(running.port):
            pass
        assert wait_until(lambda: "client logged in" in running.log(), timeout=10)
        assert "failed" not in moved.read_text().split("reopening logs")[-1]
    finally:
        running.stop()
        shutil.rmtree(folder, ignore_errors=True)
