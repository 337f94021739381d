"""The status endpoint: `status_listen 127.0.0.1:9101;` (beyond nginx).

Two read-only pages over HTTP, made from the counters in metrics.py:

    GET /metrics    Prometheus text exposition format (version 0.0.4)
    GET /           the same numbers as a plain-text page for people

Where it runs.  With `worker_processes N` the master forks a small *status
process* for it, as it forks workers: the master itself must stay a single
thread (it forks), and a worker is the wrong owner (there are N of them,
and they come and go on every reload).  The status process only reads the
shared table the master made before forking, so it needs nothing from the
configuration but the address: a reload replaces it only when
`status_listen` changes, and the master restarts it if it dies.  With
`worker_processes 1` there is no master, and the page is served by a
thread of the one process (`server.Worker`).

The server is a ThreadingMixIn HTTPServer: each connection in a daemon
thread, at most MAX_CLIENTS at once (more are closed at once), so one slow
or idle client cannot hold up a scrape; and each request, reading and
writing, has REQUEST_TIMEOUT in all, not per read: a watchdog shuts the
connection down when it is used up, so a client dripping a byte at a time
cannot keep its slot.  Only GET and HEAD are
answered (http.server replies 501 to anything else).  The address is
loopback unless the directive names another one.  A status process whose
master has died (SIGKILL, the OOM killer) exits within POLL_INTERVAL, so
it does not keep the port from the next master.
"""

import http.server
import os
import socket
import socketserver
import threading
import time
from urllib.parse import urlsplit

from .. import __version__
from . import metrics as m

REQUEST_TIMEOUT = 5.0       # seconds one status request may take, reading and writing
MAX_CLIENTS = 16            # connections served at once; a scraper or two, and people
POLL_INTERVAL = 0.5         # how often serve_forever looks for shutdown()
BACKLOG = 16                # a scraper or two, and a person with curl
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
DIRECTIONS = (("from_client", m.FROM_CLIENT), ("from_backend", m.FROM_BACKEND))


class StatusHandler(http.server.BaseHTTPRequestHandler):
    """GET or HEAD one of the pages; 404 for any other path."""

    server_version = f"mailproxy/{__version__}"
    sys_version = ""
    timeout = REQUEST_TIMEOUT

    def setup(self):
        super().setup()
        self.watchdog = threading.Timer(REQUEST_TIMEOUT, self.cut)
        self.watchdog.daemon = True
        self.watchdog.start()

    def finish(self):
        self.watchdog.cancel()
        super().finish()

    def cut(self):
        """REQUEST_TIMEOUT is over: end the connection, whatever it waits for."""
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self):
        body = self.send_page()
        if body:
            self.wfile.write(body)

    def do_HEAD(self):
        self.send_page()

    def send_page(self):
        """The status line and headers; the body, or None after an error."""
        page = PAGES.get(urlsplit(self.path).path)
        if page is None:
            self.send_error(404, "Not Found", "the pages are / and /metrics")
            return None
        render, content_type = page
        body = render(self.server.table).encode()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        return body

    def log_message(self, format, *args):
        """A scrape every few seconds is not news: no access log."""


class MasterGone(Exception):
    """The status process's parent is no longer the master."""


class StatusServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """The pages, served on a socket opened elsewhere (by the master,
    before it forked us, or by a single-process Worker).  `master`, in a
    status process, is the pid it must outlive no longer.  Daemon threads,
    not waited for at close: each ends within REQUEST_TIMEOUT anyway."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock, table, master=None):
        socketserver.BaseServer.__init__(self, sock.getsockname()[:2], StatusHandler)
        self.socket = sock
        self.table = table
        self.master = master
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)      # MAX_CLIENTS are being served
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def service_actions(self):
        """serve_forever calls this between polls."""
        if self.master and os.getppid() != self.master:
            raise MasterGone


def open_socket(listen):
    """The listening socket for a `status_listen` address (a Listen entry);
    OSError names the address, as listening.open_sockets does."""
    try:
        return socket.create_server((listen.host, listen.port), family=listen.family,
                                    backlog=BACKLOG)
    except OSError as exc:
        raise OSError(exc.errno, f"bind() to {listen.name} failed "
                                 f"({exc.errno}: {exc.strerror})") from None


def serve_process(sock, table):
    """The status process's whole life: serve until a signal ends it,
    or until the master is gone."""
    try:
        StatusServer(sock, table, master=table.master_pid).serve_forever(POLL_INTERVAL)
    except MasterGone:
        pass


# ------------------------------------------------------------ /metrics

def render_metrics(table):
    """The Prometheus page: HELP and TYPE, then the samples, per family."""
    totals, workers = table.totals(), table.workers()
    out = []
    for name, kind, text, samples in (_session_families(totals)
                                      + _process_families(workers, table.started)):
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples)
    return "\n".join(out) + "\n"


def _session_families(totals):
    """(name, type, help, samples) of the counters summed over every worker."""
    return [
        ("mailproxy_sessions_open", "gauge", "Sessions open now, by protocol and phase.",
         [({"protocol": p, "phase": phase}, totals[_open(i, j)])
          for i, p in enumerate(m.PROTOCOLS) for j, phase in enumerate(m.PHASES)]),
        ("mailproxy_sessions_total", "counter", "Sessions accepted, by protocol.",
         [({"protocol": p}, totals[m.TOTAL + i]) for i, p in enumerate(m.PROTOCOLS)]),
        ("mailproxy_auth_results_total", "counter",
         "Auth service answers: ok, fail (refused), wait (Auth-Status: WAIT), "
         "error (no usable answer).",
         [({"protocol": p, "result": result}, totals[_auth(i, j)])
          for i, p in enumerate(m.PROTOCOLS) for j, result in enumerate(m.AUTH_RESULTS)]),
        ("mailproxy_auth_duration_seconds", "histogram",
         "How long the auth service took to answer.", _histogram(totals)),
        ("mailproxy_backend_connect_errors_total", "counter",
         "Backend connections that failed (TCP connect or TLS handshake).",
         [({"protocol": p}, totals[m.BACKEND_ERRORS + i]) for i, p in enumerate(m.PROTOCOLS)]),
        ("mailproxy_relayed_bytes_total", "counter",
         "Bytes relayed after login, counted when a session ends.",
         [({"protocol": p, "direction": name}, totals[offset + i])
          for i, p in enumerate(m.PROTOCOLS) for name, offset in DIRECTIONS]),
        ("mailproxy_connections_dropped_total", "counter",
         "Connections closed at once because worker_connections were all in use.",
         [({}, totals[m.DROPPED])]),
    ]


def _process_families(workers, started):
    """(name, type, help, samples) of each worker, and of the master."""
    return [
        ("mailproxy_worker_info", "gauge", "One per worker process, with its state.",
         [({"pid": w.pid, "slot": w.slot, "state": w.state}, 1) for w in workers]),
        ("mailproxy_worker_sessions", "gauge", "Sessions open in each worker.",
         [({"pid": w.pid}, w.sessions) for w in workers]),
        ("mailproxy_worker_threads", "gauge", "Threads in each worker.",
         [({"pid": w.pid}, w.threads) for w in workers]),
        ("mailproxy_worker_start_time_seconds", "gauge",
         "When each worker started, in Unix time.",
         [({"pid": w.pid}, w.started) for w in workers]),
        ("process_start_time_seconds", "gauge",
         "When the master (or the single process) started, in Unix time.",
         [({}, started)]),
    ]


def _histogram(totals):
    """The _bucket (cumulative), _sum and _count samples; names carry the suffix."""
    samples, running = [], 0
    bounds = [_number(bound) for bound in m.LATENCY_BUCKETS] + ["+Inf"]
    for index, bound in enumerate(bounds):
        running += totals[m.LATENCY + index]
        samples.append(({"__suffix": "_bucket", "le": bound}, running))
    samples.append(({"__suffix": "_sum"}, totals[m.LATENCY_SUM] / 1_000_000))
    samples.append(({"__suffix": "_count"}, running))
    return samples


def _labels(labels):
    """`{name="value",...}`; a "__suffix" pseudo-label extends the metric name."""
    suffix = labels.get("__suffix", "")
    pairs = ",".join(f'{name}="{value}"' for name, value in labels.items()
                     if name != "__suffix")
    return f"{suffix}{{{pairs}}}" if pairs else suffix


def _number(value):
    return repr(value) if isinstance(value, float) else str(value)


def _open(protocol, phase):
    return m.OPEN + protocol * len(m.PHASES) + phase


def _auth(protocol, result):
    return m.AUTH + protocol * len(m.AUTH_RESULTS) + result


# ------------------------------------------------------------------- /

def render_text(table):
    """The page for people: the same numbers, as small tables."""
    totals, workers, now = table.totals(), table.workers(), time.time()
    out = [f"mailproxy/{__version__} status",
           f"master {table.master_pid}, up {_duration(now - table.started)} "
           f"(since {_clock(table.started)})", ""]
    out += _table(["worker", "state", "sessions", "threads", "up"],
                  [[w.pid, w.state, w.sessions, w.threads, _duration(now - w.started)]
                   for w in workers])
    out += _table(["sessions"] + list(m.PHASES) + ["total"],
                  [[p] + [totals[_open(i, j)] for j in range(len(m.PHASES))]
                   + [totals[m.TOTAL + i]] for i, p in enumerate(m.PROTOCOLS)])
    out += _table(["auth service"] + list(m.AUTH_RESULTS) + ["backend errors"],
                  [[p] + [totals[_auth(i, j)] for j in range(len(m.AUTH_RESULTS))]
                   + [totals[m.BACKEND_ERRORS + i]] for i, p in enumerate(m.PROTOCOLS)])
    out += [_latency_line(totals), ""]
    out += _table(["bytes relayed", "from client", "from backend"],
                  [[p] + [totals[offset + i] for _, offset in DIRECTIONS]
                   for i, p in enumerate(m.PROTOCOLS)])
    out.append(f"connections dropped (worker_connections): {totals[m.DROPPED]}")
    return "\n".join(out) + "\n"


def _table(header, rows):
    """Left-aligned first column, right-aligned numbers, a blank line after."""
    cells = [[str(cell) for cell in row] for row in [header] + rows]
    widths = [max(len(row[col]) for row in cells) for col in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if col == 0 else cell.rjust(width)
                       for col, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in cells]
    return lines + [""]


def _latency_line(totals):
    count = sum(totals[m.LATENCY:m.LATENCY + len(m.LATENCY_BUCKETS) + 1])
    if not count:
        return "auth service latency: no answers yet"
    mean = totals[m.LATENCY_SUM] / 1_000_000 / count
    names = [f"<={bound}s" for bound in m.LATENCY_BUCKETS] + [f">{m.LATENCY_BUCKETS[-1]}s"]
    buckets = ", ".join(f"{name} {totals[m.LATENCY + i]}" for i, name in enumerate(names)
                        if totals[m.LATENCY + i])
    return f"auth service latency: {count} answers, mean {mean:.3f}s ({buckets})"


def _duration(seconds):
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    text = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {text}" if days else text


def _clock(stamp):
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(stamp))


# The pages by path: (renderer, Content-Type).  Defined last: it names the renderers.
PAGES = {"/metrics": (render_metrics, PROMETHEUS_TYPE), "/": (render_text, TEXT_TYPE)}
