"""A quick look at mailproxy's login cost while changing it (not a test).

    python tests/bench/probe.py imap 64                 # rate, latency, CPU/session
    python tests/bench/probe.py smtp 1 --look strace    # system calls per login
    python tests/bench/probe.py imap 64 --look stat     # context switches
    python tests/bench/probe.py imap 64 --look pyspy    # where the GIL time goes
    python tests/bench/probe.py imap 1 --look perf      # where the CPU goes, kernel included

It starts what bench.py starts for the login scenario (Dovecot, smtp-sink,
nginx's http{} as the auth service, mailproxy with `--workers`), runs one
warm-up and one measured round of login cycles against mailproxy alone,
and prints one line.  `--look` runs a tool on mailproxy's processes during
the round and prints its summary: the tools slow the proxy down, so read
their counts per login, not the rate of that round.  Only bench.py's
interleaved runs compare targets; this is for a quick before/after.
"""

import argparse
import collections
import os
import signal
import subprocess
import sys
import time

import bench
import procstat
import pyspy
import stack

TOOL_START = 0.5            # seconds a tool gets to attach before the round


def tool(look, root, output):
    pids = list(procstat.tree(root))
    if look == "strace":
        args = ["strace", "-c", "-f", "-o", str(output)]
        for pid in pids:
            args += ["-p", str(pid)]
    elif look == "perf":
        args = ["perf", "record", "-F", "2000", "-o", str(output), "-p", ",".join(map(str, pids))]
    elif look == "stat":
        args = ["perf", "stat", "-e", "context-switches,cpu-migrations,task-clock,page-faults",
                "-o", str(output), "-p", ",".join(map(str, pids))]
    else:
        return pyspy.start(root, 4, output, rate=500)
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_tool(look, process):
    if look != "pyspy":
        process.send_signal(signal.SIGINT)
    process.wait(60)


def report(look, output, sessions):
    if look == "pyspy":
        summary = pyspy.summarize(output, top=25)
        total = summary["samples"] or 1
        print(f"py-spy: {total} GIL samples at 500 Hz; inclusive, then self:")
        for frame, count in summary["inclusive"] + [("--", 0)] + summary["self"]:
            print(f"  {100 * count / total:5.1f}%  {frame}")
        return
    if look == "perf":
        for sort in ("dso", "sym"):         # the kernel's share, then the hottest functions
            text = subprocess.run(["perf", "report", "-i", str(output), "--stdio", "--sort", sort,
                                   "--percent-limit", "0.7"], capture_output=True, text=True).stdout
            print("\n".join(line for line in text.splitlines() if line and line[0] != "#"))
        return
    text = output.read_text()
    if look == "stat":
        print(text)
        return
    counts = collections.Counter()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit():
            counts[fields[-1]] += int(fields[3])
    print(f"system calls per login ({sessions} logins under strace):")
    for name, count in counts.most_common(25):
        print(f"  {count / sessions:7.1f}  {name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=stack.PROTOCOLS)
    parser.add_argument("clients", type=int)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--look", choices=("strace", "stat", "pyspy", "perf"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it starts Dovecot, smtp-sink and nginx privately")
    bench.raise_nofile()
    workdir = stack.make_workdir()
    started = []
    try:
        cert, key, _, auth = stack.login_peers(workdir, started)
        free = stack.free_ports(6)
        proxy_ports = dict(zip(stack.PROTOCOLS, free[:3]))
        tls_ports = dict(zip(stack.PROTOCOLS, free[3:]))
        mail = stack.mail_block(cert, key, auth.port, proxy_ports, tls_ports)
        proxy = stack.Mailproxy(workdir, mail, proxy_ports, tls_ports, args.workers)
        started.append(proxy)
        proxy.start()
        target = bench.Target("mailproxy", proxy_ports, tls_ports, proxy.pid)
        bench.login_round(target, args.protocol, args.clients, 1.0, 1)     # warm-up
        watcher, output = None, workdir / f"probe.{args.look}"
        if args.look:
            watcher = tool(args.look, proxy.pid, output)
            time.sleep(TOOL_START)
        result = bench.login_round(target, args.protocol, args.clients, args.seconds, 2)
        if watcher:
            stop_tool(args.look, watcher)
        if "error" in result:
            sys.exit(result["error"])
        print(f"{args.protocol} c={args.clients} workers={proxy.workers}: "
              f"{result['sessions']} sessions, {result['rate']:.0f}/s, "
              f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
              f"CPU {result['proxy_cpu_ms']:.3f} ms/session "
              f"({100 * result['proxy_sys_share']:.0f}% kernel), errors {result['errors']}")
        if watcher:
            report(args.look, output, result["sessions"])
    finally:
        for piece in reversed(started):
            piece.stop()
        stack.remove_workdir(workdir)


if __name__ == "__main__":
    main()
