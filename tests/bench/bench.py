#!/usr/bin/env python3
"""mailproxy's benchmark: direct-to-backend, mailproxy and nginx, side by side.

    python tests/bench/bench.py [--targets direct,mailproxy,nginx] [--quick]
                                [--json FILE] [--workers N] [--profile]

Everything runs on loopback, privately (see stack.py): Dovecot with
generated messages, smtp-sink, a static auth service, mailproxy and nginx's
mail module with the same `mail {}` block.  The targets run interleaved
(A B C A B C ...) and every figure is the median over the rounds, shown
with its ratios to direct and to nginx.  Scenarios (docs/benchmark.md has
the details):

* login: connect, greeting, login, logout, at 8 and 64 concurrent clients
  per protocol: sessions/s, p50/p99 latency, proxy CPU per session;
* bulk: IMAP FETCH and POP3 RETR of the big message, SMTP DATA, plaintext
  and TLS: MB/s and proxy CPU s/GB;
* idle: N authenticated IMAP sessions held: RSS per session, all alive.

Not a pytest module on purpose (the name does not start with test_).
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loadgen      # noqa: E402
import procstat     # noqa: E402
import pyspy        # noqa: E402
import stack        # noqa: E402

MB = 1_000_000
KB = 1024
FORK = multiprocessing.get_context("fork")
ALL_TARGETS = ("direct", "mailproxy", "nginx")
OUR_ROOTS = []              # pids of every process tree we started (backends, auth, proxies)
RESULT_SLACK = 30.0         # seconds beyond a child's own bounds before we give up on it

# Two sets of sizes: the (full) and a quick one for development.
MODES = {
    "full": dict(sizes=(1000, 1_000_000, 50_000_000), smtp_size=20_000_000,
                 login_rounds=3, login_seconds=3.0, bulk_rounds=5,
                 idle_counts=(1000, 5000, 10000), idle_hold=10.0, warmup=0.5,
                 profile_seconds=8),
    "quick": dict(sizes=(1000, 1_000_000, 10_000_000), smtp_size=5_000_000,
                  login_rounds=2, login_seconds=1.0, bulk_rounds=2,
                  idle_counts=(1000,), idle_hold=2.0, warmup=0.3,
                  profile_seconds=3),
}


# ------------------------------------------------------------------ helpers

class Target:
    """One thing the clients talk to: its ports and the pid whose process
    tree is the proxy (None for direct)."""

    def __init__(self, name, ports, tls_ports, pid):
        self.name, self.ports, self.tls_ports, self.pid = name, ports, tls_ports, pid

    def __repr__(self):
        return self.name


def say(text=""):
    print(text, flush=True)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run_child(target, args):
    """Start `target(pipe, *args)` in a forked process: (process, our end)."""
    ours, theirs = FORK.Pipe()
    process = FORK.Process(target=target, args=(theirs, *args), daemon=True)
    process.start()
    return process, ours


def collect(process, pipe, timeout):
    try:
        if pipe.poll(timeout):
            return pipe.recv()
        return {"error": f"no result within {timeout:.0f}s"}
    except EOFError:
        return {"error": "load process died"}
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


def percentile(values, fraction):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- scenarios

def login_round(target, protocol, clients, seconds, procs):
    """One measured run of login cycles against one target."""
    procs = max(1, min(procs, clients))
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start_at = time.monotonic() + 0.2
    stop_at = start_at + seconds
    children = [run_child(loadgen.login_cycles,
                          (target.ports[protocol], protocol, stack.USER, stack.PASSWORD,
                           share, start_at, stop_at)) for share in shares]
    time.sleep(max(0.0, start_at - time.monotonic()))
    pids = procstat.tree(target.pid) if target.pid else None
    cpu0 = procstat.tree_cpu(target.pid, pids) if target.pid else None
    split0 = procstat.tree_user_sys(pids) if pids else None
    ours0 = sum(procstat.tree_cpu(pid) for pid in OUR_ROOTS) + procstat.self_cpu()
    machine0 = procstat.machine_ticks()
    results = [collect(p, pipe, seconds + loadgen.TAIL_TIMEOUT + RESULT_SLACK)
               for p, pipe in children]
    machine1 = procstat.machine_ticks()
    cpu1 = procstat.tree_cpu(target.pid, pids) if target.pid else None
    split1 = procstat.tree_user_sys(pids) if pids else None
    ours1 = sum(procstat.tree_cpu(pid) for pid in OUR_ROOTS) + procstat.self_cpu()
    broken = [r["error"] for r in results if "error" in r]
    if broken:
        return {"error": "; ".join(broken)}
    latencies = [lat for r in results for lat in r["latencies"]]
    begin = min(r["start"] for r in results)
    end = max(r["last_done"] for r in results)
    sessions = len(latencies)
    busy_seconds = (machine1[0] - machine0[0]) / procstat.TICK
    loadgen_cpu = sum(r["cpu"] for r in results)
    wall = max(r["wall"] for r in results) or 1.0
    # CPU the machine spent on processes that are not part of this benchmark
    # (other jobs on a shared machine), in cores: how noisy the round was.
    foreign = max(0.0, busy_seconds - (ours1 - ours0) - loadgen_cpu) / wall
    return {
        "sessions": sessions,
        "errors": sum(r["errors"] for r in results),
        "unfinished": sum(r["unfinished"] for r in results),
        "error_samples": [s for r in results for s in r["error_samples"]][:3],
        "rate": sessions / (end - begin) if sessions and end > begin else 0.0,
        "p50_ms": 1000 * percentile(latencies, 0.50) if latencies else None,
        "p99_ms": 1000 * percentile(latencies, 0.99) if latencies else None,
        "proxy_cpu_ms": 1000 * (cpu1 - cpu0) / sessions if target.pid and sessions else None,
        "proxy_sys_share": _share(split0, split1),
        "loadgen_busiest": max(r["cpu"] / r["wall"] for r in results if r["wall"]),
        "loadgen_share": loadgen_cpu / busy_seconds if busy_seconds else None,
        "machine_busy": procstat.machine_busy(machine0, machine1),
        "foreign_cores": foreign,
    }


def _share(before, after):
    """Kernel share of the proxy's CPU between two (user, sys) readings."""
    if not before:
        return None
    user, system = after[0] - before[0], after[1] - before[1]
    return system / (user + system) if user + system else None


def run_login(targets, mode, procs, results):
    say(f"\n== login cycles: {mode['login_rounds']} rounds x {mode['login_seconds']}s "
        f"per target, {procs} load processes")
    for protocol in stack.PROTOCOLS:
        for target in targets:          # warm-up, not recorded
            login_round(target, protocol, 8, mode["warmup"], procs)
        for clients in (8, 64):
            key = f"login/{protocol}/{clients}"
            for round_ in range(mode["login_rounds"]):
                for target in targets:
                    result = login_round(target, protocol, clients, mode["login_seconds"], procs)
                    results.setdefault(key, {}).setdefault(target.name, []).append(result)
                    say(f"  {key:16} round {round_ + 1} {target.name:9} " + _brief_login(result))


def _brief_login(result):
    if "error" in result:
        return f"ERROR {result['error']}"
    if not result["sessions"]:
        return f"NO SESSION COMPLETED: errors {result['errors']} {result['error_samples']}"
    cpu = f" cpu {result['proxy_cpu_ms']:.2f} ms" if result["proxy_cpu_ms"] is not None else ""
    errors = f" errors {result['errors']} {result['error_samples'][:1]}" \
        if result["errors"] else ""
    return (f"{result['rate']:7.0f}/s p50 {result['p50_ms']:.2f} ms p99 "
            f"{result['p99_ms']:.2f} ms{cpu}{errors}")


def bulk_round(target, protocol, tls, size, smtp_body):
    ports = target.tls_ports if tls else target.ports
    if protocol not in ports:
        return None                     # e.g. smtp-sink has no TLS
    process, pipe = run_child(loadgen.bulk, (ports[protocol], protocol, tls, size, stack.USER,
                                             stack.PASSWORD, target.pid, smtp_body))
    result = collect(process, pipe, loadgen.IO_TIMEOUT * 3 + RESULT_SLACK)
    if "error" in result:
        return result
    seconds = result["seconds"]
    result["mb_s"] = result["bytes"] / MB / seconds if seconds else None
    result["cpu_s_gb"] = result["proxy_cpu"] / (result["bytes"] / 1e9) if target.pid else None
    result["client_busy"] = result["client_cpu"] / result["wall"] if result["wall"] else None
    return result


def run_bulk(targets, mode, results):
    big = mode["sizes"][-1]
    smtp_size = mode["smtp_size"]
    smtp_body = stack.smtp_body(smtp_size)
    say(f"\n== bulk: FETCH/RETR {big / MB:g} MB, DATA {smtp_size / MB:g} MB, "
        f"{mode['bulk_rounds']} rounds")
    for protocol in stack.PROTOCOLS:
        size = smtp_size if protocol == "smtp" else big
        for tls in (False, True):
            key = f"bulk/{protocol}/{'tls' if tls else 'plain'}"
            for round_ in range(mode["bulk_rounds"]):
                for target in targets:
                    result = bulk_round(target, protocol, tls, size, smtp_body)
                    if result is None:
                        continue
                    results.setdefault(key, {}).setdefault(target.name, []).append(result)
                    if "error" in result:
                        brief = f"ERROR {result['error']}"
                    else:
                        cpu = f" cpu {result['cpu_s_gb']:.2f} s/GB" \
                            if result["cpu_s_gb"] is not None else ""
                        brief = f"{result['mb_s']:7.1f} MB/s{cpu}"
                    say(f"  {key:16} round {round_ + 1} {target.name:9} {brief}")


def wait_drained(target, backends, baseline_threads, timeout=60.0):
    """After an idle round: wait until the proxy has let go of its sessions
    and Dovecot holds no IMAP connection, so rounds do not overlap."""
    imap_port = backends.dovecot.imap_port

    def drained():
        if procstat.established(imap_port) > 0:
            return False
        if target.pid and procstat.tree_threads(target.pid) > baseline_threads + 4:
            return False
        return True
    started = time.monotonic()
    return stack.wait_until(drained, timeout, 0.2) and time.monotonic() - started


def idle_round(target, count, hold, procs, backends):
    procs = max(1, min(procs, count))
    shares = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
    threads0 = procstat.tree_threads(target.pid) if target.pid else 0
    rss0 = procstat.tree_rss(target.pid) if target.pid else None
    login_timeout = 60.0 + count / 50.0
    started = time.monotonic()
    children = [run_child(loadgen.idle, (target.ports["imap"], share, 64, stack.USER,
                                         stack.PASSWORD, login_timeout))
                for share in shares]
    opened = [collect_keep(pipe, login_timeout + RESULT_SLACK) for _, pipe in children]
    ready = sum(r.get("ready", 0) for r in opened)
    failed = sum(r.get("failed", count) for r in opened)
    samples = [s for r in opened for s in r.get("samples", [])][:3]
    login_seconds = time.monotonic() - started
    time.sleep(hold)
    rss1 = procstat.tree_rss(target.pid) if target.pid else None
    threads1 = procstat.tree_threads(target.pid) if target.pid else None
    for _, pipe in children:
        _send(pipe, "check")
    checked = [collect_keep(pipe, login_timeout + RESULT_SLACK) for _, pipe in children]
    alive = sum(r.get("alive", 0) for r in checked)
    for _, pipe in children:
        _send(pipe, "close")
    for process, pipe in children:
        collect(process, pipe, RESULT_SLACK)
    # 10,000 sessions of a threaded proxy take a while to wind down on 2 cores.
    drained = wait_drained(target, backends, threads0, timeout=60.0 + count / 50.0)
    result = {"count": count, "ready": ready, "failed": failed, "alive": alive,
              "dropped": count - alive, "samples": samples,
              "login_seconds": login_seconds, "drained": drained is not False,
              "drain_seconds": drained if drained is not False else None}
    if target.pid:
        result.update(rss_before=rss0, rss_held=rss1, threads_held=threads1,
                      rss_kb_per_session=(rss1 - rss0) / KB / ready if ready else None,
                      rss_total_mb=rss1 / MB)
    return result


def collect_keep(pipe, timeout):
    try:
        if pipe.poll(timeout):
            return pipe.recv()
    except EOFError:
        pass
    return {"error": "no answer"}


def _send(pipe, message):
    try:
        pipe.send(message)
    except OSError:
        pass


def run_idle(targets, mode, procs, backends, results):
    say(f"\n== idle: {', '.join(str(c) for c in mode['idle_counts'])} IMAP sessions held "
        f"{mode['idle_hold']}s each")
    for count in mode["idle_counts"]:
        key = f"idle/{count}"
        for target in targets:
            result = idle_round(target, count, mode["idle_hold"], procs, backends)
            results.setdefault(key, {}).setdefault(target.name, []).append(result)
            rss = f" RSS {result['rss_kb_per_session']:.1f} KB/session " \
                  f"({result['rss_total_mb']:.0f} MB total, {result['threads_held']} threads)" \
                if result.get("rss_kb_per_session") is not None else ""
            note = f" {result['samples'][:1]}" if result["failed"] else ""
            say(f"  {key:16} {target.name:9} held {result['ready']}/{count} "
                f"alive {result['alive']} in {result['login_seconds']:.1f}s{rss}{note}"
                f"{'' if result['drained'] else ' (not drained!)'}")


def run_profile(target, mode, procs, workdir, results):
    """py-spy on mailproxy while it serves IMAP login cycles at 64 clients."""
    if not pyspy.available():
        say("\n(py-spy not installed: no profile; pip install py-spy)")
        return None
    seconds = mode["profile_seconds"]
    output = workdir / "pyspy.raw"
    say(f"\n== profile: py-spy on mailproxy, IMAP login cycles at 64 clients, {seconds}s")
    spy = pyspy.start(target.pid, seconds, output)
    time.sleep(0.3)
    result = login_round(target, "imap", 64, seconds, procs)
    try:
        spy.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    if not output.exists():
        say(f"  py-spy wrote nothing: {spy.stdout.read().decode(errors='replace')[-500:]}")
        return None
    summary = pyspy.summarize(output)
    summary["login"] = result
    results["profile"] = summary
    return summary


# ------------------------------------------------------------------ report

def fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.{digits}f}"


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def summary_rows(results, names):
    """[(label, unit, {target: median})] for the table."""
    rows = []

    def med(key, field, name):
        runs = [r for r in results.get(key, {}).get(name, []) if r and "error" not in r]
        return median([r.get(field) for r in runs])

    for protocol in stack.PROTOCOLS:
        for clients in (8, 64):
            key = f"login/{protocol}/{clients}"
            if key not in results:
                continue
            for field, label, unit in (("rate", "sessions/s", "1/s"), ("p50_ms", "p50", "ms"),
                                       ("p99_ms", "p99", "ms"),
                                       ("proxy_cpu_ms", "proxy CPU/session", "ms")):
                rows.append((f"login {protocol} c={clients} {label}", unit,
                             {n: med(key, field, n) for n in names}))
    for protocol in stack.PROTOCOLS:
        for mode in ("plain", "tls"):
            key = f"bulk/{protocol}/{mode}"
            if key not in results:
                continue
            what = {"imap": "FETCH", "pop3": "RETR", "smtp": "DATA"}[protocol]
            rows.append((f"bulk {protocol} {what} {mode}", "MB/s",
                         {n: med(key, "mb_s", n) for n in names}))
            rows.append((f"bulk {protocol} {what} {mode} proxy CPU", "s/GB",
                         {n: med(key, "cpu_s_gb", n) for n in names}))
    for key in sorted((k for k in results if k.startswith("idle/")),
                      key=lambda k: int(k.split("/")[1])):
        count = key.split("/")[1]
        rows.append((f"idle {count} held+alive", "sessions",
                     {n: med(key, "alive", n) for n in names}))
        rows.append((f"idle {count} proxy RSS/session", "KB",
                     {n: med(key, "rss_kb_per_session", n) for n in names}))
    return rows


def table(rows, names):
    ratio_columns = []
    if "direct" in names:
        ratio_columns += [(n, "direct") for n in names if n != "direct"]
    if "nginx" in names and "mailproxy" in names:
        ratio_columns.append(("mailproxy", "nginx"))
    header = ["metric", "unit"] + list(names) + [f"{a}/{b}" for a, b in ratio_columns]
    lines = [header]
    for label, unit, values in rows:
        lines.append([label, unit] + [fmt(values.get(n)) for n in names] +
                     [fmt(ratio(values.get(a), values.get(b))) for a, b in ratio_columns])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
                                     for i, cell in enumerate(line)) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":"
                                      for i, w in enumerate(widths)) + "|")
    return "\n".join(out)


def check_targets(rows, names, idle_max):
    """Issue 19's targets as (text, met: True/False/None)."""
    values = {label: vals for label, _, vals in rows}
    checks = []
    if "mailproxy" not in names:
        return checks

    def get(label, name):
        return values.get(label, {}).get(name)

    def check(text, value, limit, higher=True):
        if value is None:
            scenario = text.split()[0]
            if any(label.startswith(scenario) for label in values):
                checks.append((f"{text}: not measured", None))
            return
        met = value >= limit if higher else value <= limit
        checks.append((f"{text}: {fmt(value)} ({'>=' if higher else '<='} {limit})", met))

    for protocol in stack.PROTOCOLS:
        if "nginx" in names:
            label = f"login {protocol} c=64 sessions/s"
            check(f"login {protocol} 64 clients sessions/s vs nginx",
                  ratio(get(label, "mailproxy"), get(label, "nginx")), 0.5)
    for protocol in stack.PROTOCOLS:
        check(f"login {protocol} 64 clients proxy CPU ms/session",
              get(f"login {protocol} c=64 proxy CPU/session", "mailproxy"), 1.0, higher=False)
    for protocol in stack.PROTOCOLS:
        if "nginx" in names:
            label = f"login {protocol} c=8 p99"
            check(f"login {protocol} 8 clients p99 vs nginx",
                  ratio(get(label, "mailproxy"), get(label, "nginx")), 2.5, higher=False)
    for protocol, what in (("imap", "FETCH"), ("pop3", "RETR"), ("smtp", "DATA")):
        label = f"bulk {protocol} {what} plain"
        if "direct" in names:
            check(f"bulk {protocol} plaintext MB/s vs direct",
                  ratio(get(label, "mailproxy"), get(label, "direct")), 1.0)
        if "nginx" in names:
            check(f"bulk {protocol} plaintext MB/s vs nginx",
                  ratio(get(label, "mailproxy"), get(label, "nginx")), 1.5)
            label = f"bulk {protocol} {what} tls"
            check(f"bulk {protocol} TLS MB/s vs nginx",
                  ratio(get(label, "mailproxy"), get(label, "nginx")), 1.0)
    label = f"idle {idle_max} proxy RSS/session"
    if label in values:
        check(f"idle {idle_max} sessions RSS KB/session", get(label, "mailproxy"), 40,
              higher=False)
        held = get(f"idle {idle_max} held+alive", "mailproxy")
        check(f"idle {idle_max} sessions held and alive", held, idle_max)
        if idle_max < 10000:
            checks.append((f"(idle target is 10,000 sessions; this run held {idle_max})",
                           None))
    return checks


def loadgen_verdict(results):
    """Was the load generator the bottleneck?  From the login rounds (its
    busiest process's CPU share of a core) and the bulk clients."""
    busiest, shares, machine, foreign = [], [], [], []
    for key, per_target in results.items():
        if not key.startswith("login/"):
            continue
        for runs in per_target.values():
            for r in runs:
                if "error" not in r:
                    busiest.append(r["loadgen_busiest"])
                    if r["loadgen_share"] is not None:
                        shares.append(r["loadgen_share"])
                    machine.append(r["machine_busy"])
                    foreign.append(r.get("foreign_cores", 0.0))
    bulk_busy = [r["client_busy"] for key, per_target in results.items()
                 if key.startswith("bulk/") for runs in per_target.values() for r in runs
                 if "error" not in r and r.get("client_busy") is not None]
    lines = []
    if busiest:
        top = max(busiest)
        lines.append(f"login rounds: busiest load process used {100 * median(busiest):.0f}% "
                     f"of a core (median; max {100 * top:.0f}%); the load generator took "
                     f"{100 * median(shares):.0f}% of the machine's busy CPU time; machine "
                     f"{100 * median(machine):.0f}% busy (median)")
        lines.append(f"other jobs on the machine took {median(foreign):.2f} cores during the "
                     f"login rounds (median; max {max(foreign):.2f}) -- figures are only "
                     f"comparable within this run")
        if top > 0.9:
            lines.append("  -> a load process was saturated in some rounds: the load "
                         "generator WAS a bottleneck there")
        else:
            lines.append("  -> no load process was saturated: the load generator was not "
                         "the bottleneck (it does compete for the same cores)")
    if bulk_busy:
        lines.append(f"bulk clients: {100 * median(bulk_busy):.0f}% of a core (median; max "
                     f"{100 * max(bulk_busy):.0f}%)" +
                     ("; a client near 100% means a client-bound figure"
                      if max(bulk_busy) > 0.9 else ""))
    return lines


def profile_text(summary):
    """The py-spy summary as text: per frame, its share of the GIL samples
    and the GIL time it costs per login (samples / rate / sessions)."""
    login = summary["login"]
    sessions = login.get("sessions") or 0
    total, rate = summary["samples"], summary["rate"]
    lines = [f"\npy-spy profile of mailproxy during IMAP login cycles at 64 clients "
             f"(--nonblocking --gil, {rate} Hz, {total} samples, {sessions} sessions"
             + (f", {login['rate']:.0f}/s while profiled, proxy CPU "
                f"{login['proxy_cpu_ms']:.2f} ms/session of which "
                f"{100 * login['proxy_sys_share']:.0f}% in the kernel" if sessions else "")
             + ")"]
    if sessions and total:
        lines.append(f"  GIL held per session: {1000 * total / rate / sessions:.2f} ms")
        auth = summary.get("auth_request", 0)
        lines.append(f"  of which the auth_http request through requests (AuthClient.ask): "
                     f"{1000 * auth / rate / sessions:.2f} ms ({100 * auth / total:.0f}%)")

    def cost(count):
        return f"{1000 * count / rate / sessions:6.3f} ms" if sessions else ""
    lines.append("  top inclusive frames (share of GIL samples, GIL ms per session)")
    for frame, count in summary["inclusive"]:
        lines.append(f"    {100 * count / total:5.1f}% {cost(count)}  {frame}")
    lines.append("  top self frames")
    for frame, count in summary["self"]:
        lines.append(f"    {100 * count / total:5.1f}% {cost(count)}  {frame}")
    return "\n".join(lines)


def report(results, names, meta, checks, profile_summary):
    rows = summary_rows(results, names)
    say("\n" + "=" * 78)
    say(f"mailproxy benchmark, {meta['date']}, mode {meta['mode']}")
    for line in meta["notes"]:
        say(f"  {line}")
    say("\nMedians over the rounds; ratio columns divide the medians.\n")
    say(table(rows, names))
    say("\nIssue 19 targets:")
    for text, met in checks:
        mark = {True: "MET    ", False: "NOT MET", None: "       "}[met]
        say(f"  [{mark}] {text}")
    say("\nLoad generator:")
    for line in loadgen_verdict(results):
        say(f"  {line}")
    if profile_summary:
        say(profile_text(profile_summary))
    return rows


# --------------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help="comma-separated subset of direct,mailproxy,nginx")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and counts: under 2 minutes")
    parser.add_argument("--json", default=os.path.join(tempfile.gettempdir(),
                                                       "mailproxy-bench.json"),
                        help="where to write the results (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker_processes for both proxies (mailproxy falls back to 1 "
                             "if its config refuses more); default %(default)s")
    parser.add_argument("--scenarios", default="login,bulk,idle",
                        help="comma-separated subset of login,bulk,idle")
    parser.add_argument("--load-procs", type=int, default=2,
                        help="load generator processes (default %(default)s)")
    parser.add_argument("--idle", default=None,
                        help="idle session counts, comma-separated (overrides the mode)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds for login and bulk (overrides the mode)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds per login round (overrides the mode)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, py-spy mailproxy during IMAP login cycles")
    parser.add_argument("--mailproxy", default=str(stack.REPO), metavar="DIR",
                        help="the checkout whose mailproxy.py runs (default: this one)")
    parser.add_argument("--mail-directive", action="append", default=[], metavar="'NAME ARGS'",
                        help="add a directive to the shared mail {} block, e.g. "
                             "'proxy_buffer 64k' (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = set(names) - set(ALL_TARGETS)
    if unknown:
        sys.exit(f"unknown target(s): {', '.join(sorted(unknown))}")
    scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    mode = dict(MODES["quick" if args.quick else "full"])
    if args.idle:
        mode["idle_counts"] = tuple(int(c) for c in args.idle.split(","))
    if args.rounds:
        mode["login_rounds"] = mode["bulk_rounds"] = args.rounds
    if args.seconds:
        mode["login_seconds"] = args.seconds
    if os.geteuid() != 0:
        sys.exit("the benchmark runs Dovecot, smtp-sink and nginx privately: run it as root")

    began = time.monotonic()
    nofile = raise_nofile()
    notes = [f"command: {' '.join(shlex.quote(a) for a in [sys.executable] + sys.argv)}",
             f"machine: {os.cpu_count()} CPUs, {platform.platform()}, "
             f"Python {platform.python_version()}, RLIMIT_NOFILE {nofile}"]
    if "nginx" in names and not stack.nginx_available():
        notes.append("nginx or its mail module is not installed: target nginx skipped "
                     "(apt-get install nginx-light libnginx-mod-mail)")
        names.remove("nginx")
    workdir = stack.make_workdir()
    started = []                        # everything to stop, in start order
    # A signal ends the run through the finally below, so nothing is left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    results, profile_summary = {}, None
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full", "notes": notes,
            "workers_requested": args.workers}
    try:
        say(f"setting up in {workdir} ...")
        cert, key = stack.make_certificate(workdir)
        idle_max = max(mode["idle_counts"]) if "idle" in scenarios else 1000
        backends = stack.Backends(workdir, cert, key, mode["sizes"], idle_max)
        started.append(backends)
        backends.start()
        direct_ports, direct_tls = backends.ports()
        auth_class = stack.NginxAuth if stack.nginx_available() else stack.StaticAuth
        auth = auth_class(workdir, direct_ports)
        started.append(auth)
        auth.start()
        notes.append(f"auth service: {auth.kind}")
        if args.mail_directive:
            notes.append("added to mail {}: " + "; ".join(args.mail_directive))
        notes.append("backends: Dovecot "
                     f"{_version(['dovecot', '--version'])} (IMAP/POP3, also serves the idle "
                     f"scenario), smtp-sink (SMTP; no TLS, so no direct SMTP TLS figure)")
        targets = []
        if "direct" in names:
            targets.append(Target("direct", direct_ports, direct_tls, None))
        proxy_ports = {}
        for name in ("mailproxy", "nginx"):
            if name in names:
                ports = stack.free_ports(6)
                proxy_ports[name] = (dict(zip(stack.PROTOCOLS, ports[:3])),
                                     dict(zip(stack.PROTOCOLS, ports[3:])))
        for name in ("mailproxy", "nginx"):
            if name not in names:
                continue
            ports, tls_ports = proxy_ports[name]
            mail = stack.mail_block(cert, key, auth.port, ports, tls_ports,
                                    args.mail_directive)
            cls = stack.Mailproxy if name == "mailproxy" else stack.NginxMail
            extra = {"checkout": args.mailproxy} if name == "mailproxy" else {}
            proxy = cls(workdir, mail, ports, tls_ports, args.workers, **extra)
            started.append(proxy)
            proxy.start()
            if name == "mailproxy":
                meta["mailproxy_workers"] = proxy.workers
                notes.append(f"mailproxy: {args.mailproxy} ({_git_describe(args.mailproxy)}), "
                             f"worker_processes {proxy.workers}"
                             + (f" -- NOTE: {proxy.note}" if proxy.note else ""))
            else:
                meta["nginx_workers"] = proxy.workers
                notes.append(f"nginx: {proxy.version()}, worker_processes {proxy.workers}")
            targets.append(Target(name, ports, tls_ports, proxy.pid))
        # Interleaving order follows --targets.
        targets.sort(key=lambda t: names.index(t.name))
        names = [t.name for t in targets]
        OUR_ROOTS[:] = [pid for pid in (backends.dovecot_pid, backends.sink.pid,
                                        getattr(auth.process, "pid", None))
                        + tuple(t.pid for t in targets) if pid]
        foreign = background_load()
        notes.append(f"other jobs on this machine before the run: {foreign:.2f} cores busy "
                     "(measured over 1s)")
        say(f"ready in {time.monotonic() - began:.1f}s; targets: {', '.join(names)}")
        for line in notes:
            say(f"  {line}")
        if "login" in scenarios:
            run_login(targets, mode, args.load_procs, results)
        if "bulk" in scenarios:
            run_bulk(targets, mode, results)
        if "idle" in scenarios:
            run_idle(targets, mode, args.load_procs, backends, results)
        if args.profile and "mailproxy" in names:
            profile_summary = run_profile(next(t for t in targets if t.name == "mailproxy"),
                                          mode, args.load_procs, workdir, results)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything")
        notes.append("INTERRUPTED: partial results")
    except stack.StartError as exc:
        say(f"\nsetup failed: {exc}")
        notes.append(f"SETUP FAILED: {exc}")
    except Exception:
        traceback.print_exc()
        notes.append("CRASHED: partial results")
    finally:
        for piece in reversed(started):
            try:
                piece.stop()
            except Exception:
                traceback.print_exc()
        if args.keep:
            say(f"work directory kept: {workdir}")
        else:
            stack.remove_workdir(workdir)
    for name, pids in stack.STRAGGLERS:
        notes.append(f"WARNING: {name}: process(es) {', '.join(map(str, pids))} still ran "
                     f"{stack.CHILD_GRACE:.0f}s after SIGTERM to the master; killed (SIGKILL)")
    meta["seconds"] = round(time.monotonic() - began, 1)
    notes.append(f"run took {meta['seconds']}s")
    idle_max = max((int(k.split("/")[1]) for k in results if k.startswith("idle/")),
                   default=None)
    rows = summary_rows(results, names)
    checks = check_targets(rows, names, idle_max)
    report(results, names, meta, checks, profile_summary)
    document = {"meta": meta, "mode": {k: list(v) if isinstance(v, tuple) else v
                                       for k, v in mode.items()},
                "targets": names,
                "table": [{"metric": label, "unit": unit, "medians": values}
                          for label, unit, values in rows],
                "issue19_targets": [{"check": text, "met": met} for text, met in checks],
                "loadgen": loadgen_verdict(results),
                "runs": results}
    with open(args.json, "w") as out:
        json.dump(document, out, indent=1, default=str)
    say(f"\nJSON written to {args.json}")
    return 0 if results else 1


def _interrupt(*_):
    raise KeyboardInterrupt


def background_load(seconds=1.0):
    """Cores kept busy by processes that are not ours, over `seconds`."""
    ours0 = sum(procstat.tree_cpu(pid) for pid in OUR_ROOTS) + procstat.self_cpu()
    machine0 = procstat.machine_ticks()
    time.sleep(seconds)
    machine1 = procstat.machine_ticks()
    ours1 = sum(procstat.tree_cpu(pid) for pid in OUR_ROOTS) + procstat.self_cpu()
    busy = (machine1[0] - machine0[0]) / procstat.TICK
    return max(0.0, busy - (ours1 - ours0)) / seconds


def _git_describe(checkout):
    """The commit a checkout is at, and whether its files differ from it."""
    try:
        head = subprocess.run(["git", "-C", checkout, "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", checkout, "status", "--porcelain", "mailproxy",
                                "mailproxy.py"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if not head:
        return "not a git checkout"
    return f"commit {head.split()[0]}" + (" + uncommitted changes" if dirty else "")


def _version(command):
    try:
        return subprocess.run(command, capture_output=True, text=True,
                              timeout=10).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
