"""The status endpoint (`status_listen`) and the per-worker limits.

First in-process, as `worker_processes 1` serves it (a thread of the one
process): a known sequence of IMAP sessions, then /metrics parsed and every
counter checked exactly; sessions held in each phase show in the gauges;
`worker_connections 2` turns the third connection away, logs it and counts
it.  Then the real CLI in a subprocess with `worker_processes 2`: the page
comes from the master's status process, lists both workers and adds up
their counters; a reload keeps the counts and the status process; more
reloads than the table has slots, each leaving a session open, are all
counted (the table grows) and the log's `*N` numbers are shared by every
worker; the status process ignores HUP, USR1 and QUIT and ends on TERM; a
killed status process is replaced; a killed master takes it along (the port is
free again); a changed `status_listen` moves the page; a single process
serves the page itself; and `worker_rlimit_nofile` reaches the workers.
"""

import http.client
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import select
import threading
import time

import pytest

from fakes import ScriptedAuthService, ScriptedBackend, fail, ok
from harness import Client, RunningProxy, free_port, wait_until
from mailproxy import imap
from mailproxy.ops import metrics, status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "127.0.0.1"
# The backend's half of an IMAP login (LOGIN with two literals), then an echo.
BACKEND = [("send", b"* OK backend ready\r\n"), ("recv_line",), ("send", b"+ go\r\n"),
           ("recv_line",), ("send", b"+ go\r\n"), ("recv_line",),
           ("send", b"a OK done\r\n"), ("echo",)]
LOGGED_IN = b"a OK done\r\n"
RELAYED = 10_000            # bytes each good session sends and gets back
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')
NOFILE = 1000               # worker_rlimit_nofile in the subprocess tests
PROCESS_TIMEOUT = 30        # seconds for processes to start, stop or be replaced


# ------------------------------------------------------------- helpers

def eventually(predicate):
    """wait_until, bounded by PROCESS_TIMEOUT: a loaded machine starts
    processes slowly."""
    return wait_until(predicate, timeout=PROCESS_TIMEOUT)


def fetch(port, path="/metrics", method="GET"):
    """(status, Content-Type, body text) of one request to the status page."""
    conn = http.client.HTTPConnection(LOOPBACK, port)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


class Page:
    """A parsed /metrics page: value(name, **labels) and labels(name)."""

    def __init__(self, text):
        self.samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            match = SAMPLE.match(line)
            assert match, f"not an exposition line: {line!r}"
            name, labels, value = match.groups()
            self.samples.append((name, dict(LABEL.findall(labels or "")), float(value)))

    def value(self, name, **labels):
        found = [v for n, l, v in self.samples if n == name and l == labels]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def total(self, name, **labels):
        """The sum over every sample of `name` whose labels include `labels`."""
        return sum(v for n, l, v in self.samples
                   if n == name and labels.items() <= l.items())

    def labels(self, name):
        return [l for n, l, _ in self.samples if n == name]

    def worker_pids(self):
        return {int(l["pid"]) for l in self.labels("mailproxy_worker_info")}


def scrape(port):
    status, content_type, body = fetch(port)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return Page(body)


def answers(port):
    """The page, or None while nobody answers on `port`."""
    try:
        return scrape(port)
    except OSError:
        return None


def idle(port):
    """Once no session is open (the last one has finished and been counted)."""
    page = answers(port)
    return page if page and page.total("mailproxy_sessions_open") == 0 else None


def login(port, user):
    """A client that sent `a LOGIN user secret`; returns it and the reply."""
    client = Client(port)
    assert client.line() == imap.GREETING
    client.send(b"a LOGIN " + user + b" secret\r\n")
    return client, client.line()


def good_session(port, size=RELAYED):
    client, reply = login(port, b"joe")
    with client:
        assert reply == LOGGED_IN
        payload = os.urandom(size)
        client.send(payload)
        assert client.read(size) == payload


def by_login(replies):
    """An auth reply callable: the reply for each Auth-User."""
    return lambda request: replies[request.header("Auth-User")]


# ------------------------------------------- single process, in-process

@pytest.fixture
def peers():
    with ScriptedBackend(BACKEND) as backend, ScriptedAuthService() as auth:
        yield auth, backend


def start(tmp_path, auth, top=""):
    port = free_port()
    proxy = RunningProxy(tmp_path, mail=f"auth_http {auth.url};\ntimeout 10s;",
                         top=f"status_listen {port};\n{top}", level="info")
    return proxy, port


def test_counters_after_a_known_sequence_of_sessions(tmp_path, peers):
    """3 good logins relaying RELAYED bytes each way, 2 refused, 1 auth
    service error, 1 WAIT then OK, 1 backend nobody listens on."""
    auth, backend = peers
    replies = {"joe": ok(LOOPBACK, backend.port), "bad": fail(),
               "err": b"not HTTP at all\r\n\r\n", "gone": ok(LOOPBACK, free_port()),
               "patient": ok(LOOPBACK, backend.port)}
    waited = []

    def reply(request):
        user = request.header("Auth-User")
        if user == "patient" and not waited:
            waited.append(user)
            return {"Auth-Status": "WAIT", "Auth-Wait": "0"}
        return replies[user]
    auth.reply = reply
    proxy, port = start(tmp_path, auth)
    try:
        for _ in range(3):
            good_session(proxy.port)
        for user, expected in ((b"bad", b"a NO "), (b"bad", b"a NO "),
                               (b"err", imap.INTERNAL_ERROR), (b"gone", imap.INTERNAL_ERROR)):
            client, reply = login(proxy.port, user)
            with client:
                assert reply.startswith(expected) and client.closed()
        client, reply = login(proxy.port, b"patient")
        with client:
            assert reply == LOGGED_IN
        page = eventually(lambda: idle(port))
        assert page, "sessions still open"
    finally:
        proxy.stop()
    assert page.value("mailproxy_sessions_total", protocol="imap") == 8
    assert page.value("mailproxy_sessions_total", protocol="pop3") == 0
    assert page.total("mailproxy_sessions_open") == 0
    results = {result: page.value("mailproxy_auth_results_total", protocol="imap", result=result)
               for result in metrics.AUTH_RESULTS}
    assert results == {"ok": 5, "fail": 2, "wait": 1, "error": 1}
    assert page.value("mailproxy_auth_duration_seconds_count") == 9
    assert page.value("mailproxy_auth_duration_seconds_bucket", le="+Inf") == 9
    buckets = [page.value("mailproxy_auth_duration_seconds_bucket", le=repr(bound))
               for bound in metrics.LATENCY_BUCKETS]
    assert buckets == sorted(buckets) and buckets[-1] <= 9
    assert 0 < page.value("mailproxy_auth_duration_seconds_sum") < 9 * 10
    assert page.value("mailproxy_backend_connect_errors_total", protocol="imap") == 1
    assert page.value("mailproxy_relayed_bytes_total", protocol="imap",
                      direction="from_client") == 3 * RELAYED
    assert page.value("mailproxy_relayed_bytes_total", protocol="imap",
                      direction="from_backend") == 3 * RELAYED
    assert page.value("mailproxy_connections_dropped_total") == 0
    assert page.worker_pids() == {os.getpid()}
    assert page.value("mailproxy_worker_threads", pid=str(os.getpid())) >= 1
    assert page.value("mailproxy_worker_info", pid=str(os.getpid()), slot="0",
                      state="serving") == 1
    assert abs(page.value("process_start_time_seconds") - proxy_start(page)) < 1


def proxy_start(page):
    """The one worker's start time: in single-process mode it is the process's."""
    return page.value("mailproxy_worker_start_time_seconds", pid=str(os.getpid()))


def test_sessions_open_by_phase(tmp_path, peers):
    """One session held in each phase: greeting, auth service (it does not
    answer yet), backend login (a backend that does not greet), relay."""
    auth, backend = peers
    answer = threading.Event()
    silent = ScriptedBackend([("sleep", 30)])
    replies = {"joe": ok(LOOPBACK, backend.port), "mute": ok(LOOPBACK, silent.port)}

    def reply(request):
        if request.header("Auth-User") == "slow":
            answer.wait(10)
            return fail()
        return replies[request.header("Auth-User")]
    auth.reply = reply
    proxy, port = start(tmp_path, auth)
    clients = []
    try:
        relaying, reply = login(proxy.port, b"joe")
        clients.append(relaying)
        assert reply == LOGGED_IN
        clients.append(Client(proxy.port))
        assert clients[-1].line() == imap.GREETING
        for user in (b"slow", b"mute"):
            clients.append(Client(proxy.port))
            assert clients[-1].line() == imap.GREETING
            clients[-1].send(b"a LOGIN " + user + b" secret\r\n")
        page = eventually(lambda: one_in_each_phase(port))
        assert page, f"not one session in each phase: {answers(port).samples}"
        assert page.value("mailproxy_worker_sessions", pid=str(os.getpid())) == 4
        text = fetch(port, "/")[2]
        assert re.search(r"^imap\s+1\s+1\s+1\s+1\s+4$", text, re.MULTILINE), text
    finally:
        answer.set()
        for client in clients:
            client.close()
        silent.close()
        ended = eventually(lambda: idle(port))
        proxy.stop()
    assert ended, "sessions did not end"


def one_in_each_phase(port):
    page = answers(port)
    if page and all(page.value("mailproxy_sessions_open", protocol="imap", phase=phase) == 1
                    for phase in metrics.PHASES):
        return page
    return None


def test_the_page_for_people_and_what_is_refused(tmp_path, peers):
    auth, _ = peers
    proxy, port = start(tmp_path, auth)
    try:
        status, content_type, text = fetch(port, "/")
        assert status == 200 and content_type == "text/plain; charset=utf-8"
        assert text.startswith("mailproxy/") and f"master {os.getpid()}, up " in text
        for heading in ("worker", "sessions", "auth service", "bytes relayed"):
            assert re.search(rf"^{heading}\s", text, re.MULTILINE), heading
        assert fetch(port, "/metrics?x=1")[0] == 200
        assert fetch(port, "/nothing")[0] == 404
        assert fetch(port, "/metrics", method="POST")[0] == 501
        assert fetch(port, "/metrics", method="HEAD")[2] == ""
    finally:
        proxy.stop()
    with pytest.raises(OSError):
        fetch(port)                     # the page stops with the process


def test_worker_connections_turns_the_third_away_and_counts_it(tmp_path, peers):
    auth, _ = peers
    proxy, port = start(tmp_path, auth, top="events { worker_connections 2; }")
    clients = []
    try:
        for _ in range(2):
            clients.append(Client(proxy.port))
            assert clients[-1].line() == imap.GREETING
        with Client(proxy.port) as third:
            assert third.closed()
        proxy.wait_log("2 worker_connections are not enough, closing connection from 127.0.0.1")
        page = scrape(port)             # the status page is not one of the two
        assert page.value("mailproxy_connections_dropped_total") == 1
        assert page.value("mailproxy_sessions_total", protocol="imap") == 2
        assert page.value("mailproxy_sessions_open", protocol="imap", phase="greeting") == 2
        assert "connections dropped (worker_connections): 1" in fetch(port, "/")[2]
    finally:
        for client in clients:
            client.close()
        proxy.stop()


def test_a_bare_port_is_loopback_and_off_is_the_default(tmp_path):
    from mailproxy import config as configmod
    conf = tmp_path / "mail.conf"
    body = "mail { auth_http 127.0.0.1:9000; server { listen 127.0.0.1:1143; protocol imap; } }"
    conf.write_text(body)
    assert configmod.load(str(conf)).status_listen is None
    conf.write_text("status_listen 9101;\n" + body)
    listen = configmod.load(str(conf)).status_listen
    assert (listen.host, listen.port, listen.family) == ("127.0.0.1", 9101, socket.AF_INET)
    assert "status_listen 127.0.0.1:9101;" in configmod.dump(configmod.load(str(conf)))
    conf.write_text("mail { status_listen 9101; }\n" + body)
    with pytest.raises(configmod.ConfigError, match='"status_listen" directive is not '
                                                   'allowed here'):
        configmod.load(str(conf))


# ------------------------------------------------- the real CLI, 2 workers

CONFIG = """\
worker_processes {workers};
worker_rlimit_nofile {nofile};
error_log {log} info;
pid {pid};
status_listen {status};
mail {{
    auth_http {auth};
    timeout 10s;
    server {{ listen 127.0.0.1:{port}; protocol imap; imap_capabilities {caps}; }}
}}
"""


class Proxy:
    """`python mailproxy.py -c CONF` with a status page, and its children."""

    def __init__(self, tmp_path, auth_url, workers=2):
        self.tmp, self.auth, self.workers_wanted = tmp_path, auth_url, workers
        self.port, self.status_port = free_port(), free_port()
        self.log_path = tmp_path / "error.log"
        self.conf = tmp_path / "mail.conf"
        self.write()
        self.process = subprocess.Popen([sys.executable, "mailproxy.py", "-c", str(self.conf)],
                                        cwd=ROOT, stderr=subprocess.PIPE)
        children = 0 if workers == 1 else workers + 1       # + the status process
        if not eventually(lambda: len(self.children()) == children
                          and answers(self.status_port)):
            self.stop()
            raise AssertionError(f"no {children} children and a status page:\n{self.log()}")

    def write(self, caps="IMAP4rev1"):
        self.conf.write_text(CONFIG.format(
            workers=self.workers_wanted, nofile=NOFILE, log=self.log_path,
            pid=self.tmp / "mailproxy.pid", status=self.status_port, auth=self.auth,
            port=self.port, caps=caps))

    def children(self):
        path = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
        try:
            with open(path) as file:
                return {int(pid) for pid in file.read().split()}
        except OSError:
            return set()

    def status_pid(self):
        """The child that is not a worker on the page (None while unclear)."""
        page = answers(self.status_port)
        others = self.children() - page.worker_pids() if page else ()
        return others.pop() if len(others) == 1 else None

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def signal(self, signo):
        os.kill(self.process.pid, signo)

    def stop(self):
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=PROCESS_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture
def cli(tmp_path, peers):
    auth, backend = peers
    auth.reply = ok(LOOPBACK, backend.port)
    running = Proxy(tmp_path, auth.url[len("http://"):])
    yield running
    running.stop()


def gone(pid):
    """The process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def max_open_files(pid):
    with open(f"/proc/{pid}/limits") as file:
        line = next(line for line in file if line.startswith("Max open files"))
    return [int(word) for word in line.split()[3:5]]


def nofile_allowed():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard == resource.RLIM_INFINITY or hard >= NOFILE


def spread_over_both(cli, workers, limit=40, burst=8):
    """Idle connections until each worker holds at least one (bounded).
    They connect `burst` at a time before any greeting is read: both
    workers wake for a backlog of several, whereas one connection at a
    time may go to the same quick worker forty times in a row."""
    clients = []
    while len(clients) < limit:
        batch = [Client(cli.port) for _ in range(burst)]
        clients += batch
        for client in batch:
            assert client.line() == imap.GREETING
        page = scrape(cli.status_port)
        if all(page.value("mailproxy_worker_sessions", pid=str(pid)) for pid in workers):
            return clients, page
    return clients, scrape(cli.status_port)


@pytest.mark.skipif(not nofile_allowed(), reason=f"RLIMIT_NOFILE hard limit below {NOFILE}")
def test_the_status_process_adds_up_both_workers(cli):
    page = scrape(cli.status_port)
    workers = page.worker_pids()
    assert len(workers) == 2 and workers < cli.children()
    assert cli.process.pid not in workers
    assert page.value("process_start_time_seconds") > 0
    for pid in workers:
        assert max_open_files(pid) == [NOFILE, NOFILE]
    assert eventually(lambda: all(scrape(cli.status_port).value(
        "mailproxy_worker_threads", pid=str(pid)) >= 2 for pid in workers))
    status_pid = cli.status_pid()
    assert status_pid and f"start status process {status_pid} on http://127.0.0.1:" \
        f"{cli.status_port}/" in cli.log()
    before = eventually(lambda: idle(cli.status_port)).value("mailproxy_sessions_total",
                                                             protocol="imap")
    clients, page = spread_over_both(cli, workers)
    try:
        held = {pid: page.value("mailproxy_worker_sessions", pid=str(pid)) for pid in workers}
        assert all(held.values()), f"one worker got all {len(clients)} connections"
        assert sum(held.values()) == len(clients)
        assert page.value("mailproxy_sessions_open", protocol="imap", phase="greeting") == \
            len(clients)
        assert page.value("mailproxy_sessions_total", protocol="imap") == before + len(clients)
    finally:
        for client in clients:
            client.close()
    for _ in range(6):
        good_session(cli.port)
    page = eventually(lambda: idle(cli.status_port))
    assert page.value("mailproxy_auth_results_total", protocol="imap", result="ok") == 6
    assert page.value("mailproxy_relayed_bytes_total", protocol="imap",
                      direction="from_backend") == 6 * RELAYED
    assert page.value("mailproxy_sessions_total", protocol="imap") == before + len(clients) + 6


def test_reload_keeps_the_counts_and_the_status_process(cli):
    for _ in range(3):
        good_session(cli.port)
    old_workers = scrape(cli.status_port).worker_pids()
    status_pid = cli.status_pid()
    held, reply = login(cli.port, b"joe")         # keeps its old worker draining
    try:
        assert reply == LOGGED_IN
        before = eventually(lambda: answers(cli.status_port)).value(
            "mailproxy_auth_results_total", protocol="imap", result="ok")
        assert before == 4
        cli.write(caps="IMAP4rev1 SECOND")
        cli.signal(signal.SIGHUP)

        def reloaded():
            page = answers(cli.status_port)
            states = {int(l["pid"]): l["state"] for l in
                      page.labels("mailproxy_worker_info")} if page else {}
            old = {states[pid] for pid in set(states) & old_workers}
            return page if len(states) - len(old) == 2 and old == {"draining"} else None
        page = eventually(reloaded)
        assert page, cli.log()
        assert {l["state"] for l in page.labels("mailproxy_worker_info")
                if int(l["pid"]) not in old_workers} == {"serving"}
        assert page.value("mailproxy_auth_results_total", protocol="imap", result="ok") == 4
        assert cli.status_pid() == status_pid            # status_listen did not change
        good_session(cli.port)
        held.send(b"still here\r\n")
        assert held.line() == b"still here\r\n"
    finally:
        held.close()
    assert eventually(lambda: not old_workers & scrape(cli.status_port).worker_pids())
    page = eventually(lambda: idle(cli.status_port))
    assert page.value("mailproxy_auth_results_total", protocol="imap", result="ok") == 5
    assert page.value("mailproxy_relayed_bytes_total", protocol="imap",
                      direction="from_client") == 4 * RELAYED + len(b"still here\r\n")
    assert len(page.worker_pids()) == 2


def states(page):
    """{pid: state} of the workers a page lists."""
    return {int(l["pid"]): l["state"] for l in page.labels("mailproxy_worker_info")}


def connection_numbers(log):
    return [int(number) for number in re.findall(r" \*(\d+) client \S+ connected to ", log)]


def test_counters_survive_more_reloads_than_slots_with_sessions_held(cli):
    """Issue 17, item 8: before each reload a client logs in and stays (as
    an IMAP IDLE client would), so every reload leaves one old worker
    draining: more workers are alive at once than the table had slots.
    The table grows; the status process, forked before, still lists every
    worker and adds up every counter, exactly.  And the connection numbers
    of the log (`*N`) are shared by all the workers of every generation:
    none twice (each worker takes metrics.CONNECTION_BLOCK at a time)."""
    reloads = metrics.slots_for(2) - 1      # 2 serving + 3 draining > 4 slots
    held = []
    try:
        for generation in range(reloads):
            held.append(login(cli.port, b"joe"))
            assert held[-1][1] == LOGGED_IN
            before = states(eventually(lambda: answers(cli.status_port)))
            cli.signal(signal.SIGHUP)

            def reloaded():
                page = answers(cli.status_port)
                now = states(page) if page else {}
                fresh = [state for pid, state in now.items() if pid not in before]
                return fresh == ["serving", "serving"] and \
                    list(now.values()).count("draining") == generation + 1
            assert eventually(reloaded), cli.log()
        good_session(cli.port)
        page = scrape(cli.status_port)
        assert sorted(states(page).values()) == ["draining"] * reloads + ["serving"] * 2
        assert max(int(l["slot"]) for l in page.labels("mailproxy_worker_info")) >= \
            metrics.slots_for(2)            # a slot of the grown table, seen by the page
        assert page.value("mailproxy_sessions_total", protocol="imap") == reloads + 1
        assert page.value("mailproxy_sessions_open", protocol="imap", phase="relay") == reloads
        for client, _ in held:
            client.send(b"still here\r\n")
            assert client.line() == b"still here\r\n"
    finally:
        for client, _ in held:
            client.close()
    page = eventually(lambda: idle(cli.status_port) if len(states(scrape(cli.status_port))) == 2
                      else None)
    assert page, cli.log()
    assert page.value("mailproxy_auth_results_total", protocol="imap", result="ok") == reloads + 1
    assert page.value("mailproxy_relayed_bytes_total", protocol="imap", direction="from_client") \
        == RELAYED + reloads * len(b"still here\r\n")
    numbers = connection_numbers(cli.log())
    assert len(numbers) == reloads + 1 and len(set(numbers)) == len(numbers), numbers


def test_a_killed_status_process_is_replaced(cli):
    good_session(cli.port)
    victim = cli.status_pid()
    assert victim
    os.kill(victim, signal.SIGKILL)
    assert eventually(lambda: cli.status_pid() not in (None, victim)), cli.log()
    assert f"status process {victim} exited with code -9, starting a new one" in cli.log()
    page = eventually(lambda: idle(cli.status_port))
    assert page.value("mailproxy_auth_results_total", protocol="imap", result="ok") == 1
    assert len(page.worker_pids()) == 2


def test_the_status_process_ignores_hup_usr1_quit_and_ends_on_term(cli):
    """As docs/operations.md says: the signals the master passes on to its
    workers leave the status process serving; SIGTERM ends it, and the
    master starts another."""
    victim = cli.status_pid()
    assert victim
    for signo in (signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT):
        os.kill(victim, signo)
    assert scrape(cli.status_port) and cli.status_pid() == victim and not gone(victim)
    os.kill(victim, signal.SIGTERM)
    assert eventually(lambda: cli.status_pid() not in (None, victim)), cli.log()
    assert f"status process {victim} exited with code -15, starting a new one" in cli.log()


def test_the_status_process_leaves_with_a_killed_master(cli):
    """A master killed outright must not leave the status port bound.
    (Its workers stay, as nginx's do: this test ends them itself.)"""
    status_pid = cli.status_pid()
    workers = scrape(cli.status_port).worker_pids()
    cli.process.kill()
    cli.process.wait(timeout=PROCESS_TIMEOUT)
    try:
        assert eventually(lambda: gone(status_pid))
        with socket.create_server((LOOPBACK, cli.status_port)):
            pass                        # the port is free for the next master
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)


def test_a_changed_status_listen_moves_the_page(cli):
    old_port, old_pid = cli.status_port, cli.status_pid()
    cli.status_port = free_port()
    cli.write()
    cli.signal(signal.SIGHUP)
    assert eventually(lambda: answers(cli.status_port)), cli.log()
    assert eventually(lambda: answers(old_port) is None)
    assert eventually(lambda: cli.status_pid() not in (None, old_pid))
    assert f"status process {old_pid} exited" in cli.log()


@pytest.mark.skipif(not nofile_allowed(), reason=f"RLIMIT_NOFILE hard limit below {NOFILE}")
def test_a_single_process_serves_the_page_itself(tmp_path, peers):
    auth, backend = peers
    auth.reply = ok(LOOPBACK, backend.port)
    single = Proxy(tmp_path, auth.url[len("http://"):], workers=1)
    try:
        assert single.children() == set()
        good_session(single.port)
        page = eventually(lambda: idle(single.status_port))
        assert page.worker_pids() == {single.process.pid}
        assert page.value("mailproxy_auth_results_total", protocol="imap", result="ok") == 1
        assert max_open_files(single.process.pid) == [NOFILE, NOFILE]
    finally:
        assert single.stop() == 0


# ------------------------------------------------ one client cannot hold it

def test_idle_and_dripping_clients_do_not_hold_up_a_scrape(tmp_path, peers, monkeypatch):
    """Ten idle connections and one that drips a byte every DRIP: a scrape
    is still answered at once (each connection has its own thread), and
    the dripping one is cut when REQUEST_TIMEOUT is used up in all, not
    re-armed by every byte.  REQUEST_TIMEOUT is 1.5 s here (5 s in the
    product): the whole request takes 26 bytes, 6.5 s of drips."""
    monkeypatch.setattr(status, "REQUEST_TIMEOUT", 1.5)
    auth, _ = peers
    proxy, port = start(tmp_path, auth)
    idlers = [socket.create_connection((LOOPBACK, port), timeout=10) for _ in range(10)]
    dripper = socket.create_connection((LOOPBACK, port), timeout=10)
    try:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=1)    # < REQUEST_TIMEOUT
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 200
        conn.close()
        for count, byte in enumerate(b"GET /metrics HTTP/1.0\r\n\r\n"):
            if readable(dripper):           # the server ended it (EOF reads)
                break
            dripper.send(bytes([byte]))
            time.sleep(DRIP)
        assert dripper.recv(100) == b""     # cut, never answered
        assert count <= status.REQUEST_TIMEOUT / DRIP + 1
    finally:
        for sock in idlers + [dripper]:
            sock.close()
        proxy.stop()


DRIP = 0.25         # seconds between two bytes of the dripping client


def readable(sock):
    return bool(select.select([sock], [], [], 0)[0])
