"""CPU per auth request, in-process, while changing auth_http.py (not a test).

    python tests/bench/auth_cpu.py [COUNT]      # default 4,000 requests
    python tests/bench/auth_cpu.py 500 calls    # Python calls per request

One AuthClient asks a keep-alive auth service (http.server, HTTP/1.1, one
connection) COUNT times, one request at a time, after a warm-up.  The
service runs in a child process, so time.process_time() counts the
client's CPU alone.  Prints CPU and wall time per request; with `calls`,
the requests run under cProfile and it prints the Python function calls
per request instead, a count that, unlike CPU time on a shared machine,
does not move from run to run.
"""

import cProfile
import os
import pstats
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from mailproxy.auth_http import AuthClient, AuthRequest  # noqa: E402  (after the path)

WARM_UP = 200               # requests before the measured ones (connect, caches)
SERVICE = r'''
import http.server

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"           # keep the connection

    def do_GET(self):
        self.send_response(200)
        for name, value in (("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"),
                            ("Auth-Port", "1143"), ("Content-Length", "0")):
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
'''


def measure(count, calls=False):
    service = subprocess.Popen([sys.executable, "-c", SERVICE], stdout=subprocess.PIPE,
                               text=True)
    try:
        port = int(service.stdout.readline())
        client = AuthClient(("127.0.0.1", port, "/auth"), 5.0, (("X-Secret", "s3cr3t"),))
        request = AuthRequest("plain", b"joe", b"secret", b"", "imap", 1, "127.0.0.1")
        for _ in range(WARM_UP):
            assert client.ask(request).ok
        profile = cProfile.Profile() if calls else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profile:
            profile.enable()
        for _ in range(count):
            client.ask(request)
        if profile:
            profile.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        client.close()
    finally:
        service.kill()
        service.wait()
    if profile:
        calls = pstats.Stats(profile).total_calls
        print(f"{count} auth requests: {calls / count:.0f} Python function calls per request")
        return
    print(f"{count} auth requests: {cpu / count * 1e3:.3f} ms CPU, "
          f"{wall / count * 1e3:.3f} ms wall per request")


if __name__ == "__main__":
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 4000, "calls" in sys.argv[2:])
