"""Running mailproxy inside the test process, and talking to it.

`RunningProxy` loads a real configuration file, opens real loopback
listeners and serves them from a thread, exactly as `mailproxy -c` does
(minus the signal handlers, which only the main thread may install).
`Client` is a line-oriented test client: tests read like transcripts,

    client.send(b"a CAPABILITY\\r\\n")
    assert client.lines(2) == [b"* CAPABILITY ...\\r\\n", b"a OK completed\\r\\n"]

and every read is bounded by a timeout, so a test fails instead of hanging.
"""

import contextlib
import os
import socket
import textwrap
import threading
import time

from mailproxy import config as configmod
from mailproxy.server import Worker

READ_TIMEOUT = 10


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningProxy:
    """mailproxy serving `mail {}` settings on fresh loopback ports.

    `servers` is a list of server-block bodies; each gets `listen
    127.0.0.1:PORT;` added, and `self.ports[i]` is that port.
    """

    def __init__(self, tmp_path, mail="", servers=("protocol imap;",), top="",
                 level="debug"):
        self.ports = [free_port() for _ in servers]
        self.log_path = tmp_path / "error.log"
        blocks = "".join(f"    server {{\n        listen 127.0.0.1:{port};\n"
                         f"{textwrap.indent(body.strip(), '        ')}\n    }}\n"
                         for port, body in zip(self.ports, servers))
        text = (f"error_log {self.log_path} {level};\n{top}\n"
                f"mail {{\n{textwrap.indent(mail.strip(), '    ')}\n{blocks}}}\n")
        self.conf_path = tmp_path / "mail.conf"
        self.conf_path.write_text(text)
        self._serve(configmod.load(str(self.conf_path), prefix=str(tmp_path)))

    @classmethod
    def from_file(cls, conf_path, log_path=None):
        """mailproxy serving a configuration file as it is, as `mailproxy -c
        conf_path` would: no -p, so the prefix is the file's folder.  Its
        listeners are in `config.servers`; `log()` reads `log_path`."""
        proxy = cls.__new__(cls)
        proxy.conf_path, proxy.log_path = conf_path, log_path
        proxy._serve(configmod.load(str(conf_path)))
        proxy.ports = [server.listens[0].port for server in proxy.config.servers]
        return proxy

    def _serve(self, config):
        self.config = config
        self.worker = Worker(config)
        self.worker.open()
        self.thread = threading.Thread(target=self.worker.serve, name="test proxy")
        self.thread.start()

    @property
    def port(self):
        return self.ports[0]

    def client(self, index=0):
        return Client(self.ports[index])

    def log(self):
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text, timeout=5):
        """Wait until `text` appears in the error log (bounded)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.log():
                return True
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not in log:\n{self.log()}")

    def session_threads(self):
        return [t for t in threading.enumerate() if t.name.startswith("session ")]

    def stop(self, how="stop"):
        self.worker.stop(how)
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "proxy did not stop"


class Client:
    """A test client on a real socket; reads raise on timeout."""

    def __init__(self, port, host="127.0.0.1", timeout=READ_TIMEOUT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        return self.file.readline()

    def lines(self, count):
        return [self.file.readline() for _ in range(count)]

    def read(self, size):
        return self.file.read(size)

    def closed(self):
        """True if the proxy has closed the connection (EOF next)."""
        try:
            return self.file.readline() == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_until(predicate, timeout=5, interval=0.02):
    """Poll `predicate` until true (bounded); returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def reference_auth_service(users_path, poll=0.05):
    """mailproxy's own auth service for `users_path`, on a free loopback
    port, served from a named thread that is joined on the way out."""
    from mailproxy.reference.authservice import AuthService
    service = AuthService(("127.0.0.1", 0), str(users_path))
    thread = threading.Thread(target=service.serve_forever, args=(poll,),
                              name="test auth service")
    thread.start()
    try:
        yield service
    finally:
        service.shutdown()
        service.server_close()
        thread.join(10)
        assert not thread.is_alive()
