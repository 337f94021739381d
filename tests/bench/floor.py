"""The shape's floor: what a login costs in this design with nothing of
mailproxy's in it (not a test; issue 19's measured reason).

    python tests/bench/floor.py imap [CLIENTS ...]      # default 8 64
    python tests/bench/floor.py smtp 1 8 64

The design card fixes the shape: socketserver's ThreadingTCPServer hands
each connection to a handler thread, which talks with blocking reads under
a socket timeout, and after the login a pair of copy threads relays.  This
script runs the least a login can do in that shape, in two forked worker
processes sharing one listening socket (`worker_processes 2`), and in
front of what bench.py's login scenario uses (Dovecot, nginx's http{} as
the auth service), driven by the same load generator:

  IMAP: greeting; read `a LOGIN user pass`; one GET to the auth service
  with http.client on a kept connection; connect to the backend, read its
  greeting, send LOGIN, read its tagged reply; answer the client;
  SMTP: greeting; EHLO; AUTH PLAIN; the GET; connect to the backend and
  read its greeting, then EHLO, XCLIENT and the client's EHLO, each
  waiting for its reply (what nginx and mailproxy send, `xclient on`);
  answer 235;
  then the relay: one more thread copies backend -> client while the
  handler copies client -> backend, each waiting with poll() before it
  reads, until both ends close.

No configuration, no logs, no checks, no TLS, no metrics: each step is the
shortest Python can write it.  Its CPU per login (bench.py's figure, the
process tree's user and system time over the sessions) next to
mailproxy's and nginx's says how much of mailproxy's cost is the shape
itself.  Prints one line per target and client count.
"""

import base64
import http.client
import os
import select
import signal
import socket
import socketserver
import sys
import threading
import time

import bench
import procstat
import stack

TIMEOUT = 60.0


class Floor(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 511            # nginx's backlog, and mailproxy's

    def handle_error(self, request, client_address):
        pass                            # a load client cut at the end of a round

    def __init__(self, address, protocol, auth_port):
        super().__init__(address, Login)
        self.protocol, self.auth_port = protocol, auth_port
        self.idle = []                  # kept auth connections
        self.lock = threading.Lock()

    def ask(self, user, password):
        """(host, port) of the backend, from one GET on a kept connection."""
        with self.lock:
            conn = self.idle.pop() if self.idle else None
        if conn is None:
            conn = http.client.HTTPConnection(stack.LOOPBACK, self.auth_port, timeout=TIMEOUT)
        conn.request("GET", "/" + self.protocol, headers={
            "Host": "localhost", "Auth-Method": "plain", "Auth-User": user,
            "Auth-Pass": password, "Auth-Protocol": self.protocol, "Auth-Login-Attempt": "1",
            "Client-IP": "127.0.0.1"})
        reply = conn.getresponse()
        reply.read()
        with self.lock:
            self.idle.append(conn)
        return reply.getheader("Auth-Server"), int(reply.getheader("Auth-Port"))


class Login(socketserver.BaseRequestHandler):
    def handle(self):
        client = self.request
        client.settimeout(TIMEOUT)
        login = self.imap if self.server.protocol == "imap" else self.smtp
        backend = login(client, client.makefile("rb"))
        other = threading.Thread(target=copy, args=(backend, client), daemon=True)
        other.start()
        copy(client, backend)
        other.join()
        backend.close()

    def imap(self, client, reader):
        client.sendall(b"* OK ready\r\n")
        tag, _, user, password = reader.readline().split()
        backend = socket.create_connection(self.server.ask(user.decode(), password.decode()),
                                           timeout=TIMEOUT)
        lines = backend.makefile("rb")
        lines.readline()                                    # the greeting
        backend.sendall(b"x LOGIN " + user + b" " + password + b"\r\n")
        while not lines.readline().startswith(b"x "):      # the tagged reply
            pass
        client.sendall(tag + b" OK logged in\r\n")
        return backend

    def smtp(self, client, reader):
        client.sendall(b"220 floor ESMTP\r\n")
        helo = reader.readline().rstrip()
        client.sendall(b"250-floor\r\n250 AUTH PLAIN LOGIN\r\n")
        _, user, password = base64.b64decode(reader.readline().split()[2]).split(b"\0")
        backend = socket.create_connection(self.server.ask(user.decode(), password.decode()),
                                           timeout=TIMEOUT)
        lines = backend.makefile("rb")
        for command in (None, b"EHLO floor", b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]", helo):
            if command:
                backend.sendall(command + b"\r\n")
            while lines.readline()[3:4] == b"-":           # to the reply's last line
                pass
        client.sendall(b"235 2.0.0 OK\r\n")
        return backend


def copy(source, target):
    """One direction of the relay: wait, read what came, pass it on."""
    poller = select.poll()
    poller.register(source, select.POLLIN)
    while poller.poll(TIMEOUT * 1000):
        try:
            data = source.recv(65536)
        except OSError:
            data = b""
        if not data:
            break
        target.sendall(data)
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def serve(port, protocol, auth_port, workers=2):
    """Fork `workers` processes serving one listening socket; returns the
    first one's pid, whose process tree bench.py measures."""
    server = Floor((stack.LOOPBACK, port), protocol, auth_port)
    pid = os.fork()
    if pid:
        server.socket.close()
        return pid
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    for _ in range(workers - 1):
        if os.fork() == 0:
            break
    server.serve_forever()
    os._exit(0)


def main():
    protocol = sys.argv[1] if len(sys.argv) > 1 else "imap"
    counts = [int(arg) for arg in sys.argv[2:]] or [8, 64]
    if os.geteuid() != 0:
        sys.exit("run as root: it starts Dovecot, smtp-sink and nginx privately")
    bench.raise_nofile()
    workdir = stack.make_workdir()
    started, floor_pid = [], None
    try:
        _, _, _, auth = stack.login_peers(workdir, started)
        port, = stack.free_ports(1)
        floor_pid = serve(port, protocol, auth.port)
        time.sleep(0.5)
        target = bench.Target("floor", {protocol: port}, {}, floor_pid)
        bench.login_round(target, protocol, 8, 1.0, 1)     # warm-up
        for clients in counts:
            result = bench.login_round(target, protocol, clients, 3.0, 2)
            if "error" in result:
                sys.exit(result["error"])
            print(f"floor {protocol} c={clients} workers=2: {result['sessions']} sessions, "
                  f"{result['rate']:.0f}/s, p50 {result['p50_ms']:.2f} ms, "
                  f"p99 {result['p99_ms']:.2f} ms, CPU {result['proxy_cpu_ms']:.3f} ms/session "
                  f"({100 * result['proxy_sys_share']:.0f}% kernel), errors {result['errors']}")
    finally:
        if floor_pid:
            for pid in reversed(procstat.tree(floor_pid)):
                os.kill(pid, signal.SIGTERM)
            os.waitpid(floor_pid, 0)
        for piece in reversed(started):
            piece.stop()
        stack.remove_workdir(workdir)


if __name__ == "__main__":
    main()
