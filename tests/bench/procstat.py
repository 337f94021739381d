"""What the proxy's processes cost, read from /proc (Linux only).

A proxy is a process tree: mailproxy's launcher and its worker processes,
nginx's master and its workers, Dovecot's master and its helpers.  Every
figure here is summed over the whole tree of a root pid:

* CPU: utime + stime of each live process (all its threads, live or gone)
  plus cutime + cstime of the root (children it already reaped).  /proc/PID/stat
  gives these in clock ticks (10 ms here), too coarse for one 50 MB
  transfer, so a live process's own time is read from its CPU-time clock
  (clock_gettime on the process's CPUCLOCK_SCHED clock id: the same sum of
  all its threads' run time, in nanoseconds), and /proc/PID/stat is the
  fallback and the source of cutime/cstime.
* RSS: VmRSS of each process from /proc/PID/status, in bytes.  Pages shared
  between processes (a forked worker's copy-on-write pages) are counted
  once per process, as `ps` does: an upper bound.
* Threads: the Threads: line of each process, summed.
"""

import os
import time

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    """The fields after the command name of /proc/PID/stat (index 0 = state)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()


def children_map():
    """parent pid -> [child pids], for every process now."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(_stat_fields(entry)[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def tree(root):
    """The root pid and every process below it."""
    found, pending, children = [root], [root], children_map()
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def tree_cpu(root, pids=None):
    """CPU seconds used so far by the tree of `root` (see module doc).
    `pids` (from `tree()`) saves the walk over /proc when the tree is known
    not to change (nginx's and mailproxy's workers are forked once)."""
    ticks, seconds = 0, 0.0
    for pid in pids or tree(root):
        precise = process_clock(pid)
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue                # exited meanwhile: its parent's cutime has it
        if precise is None:
            ticks += int(fields[11]) + int(fields[12])      # utime, stime
        else:
            seconds += precise
        if pid == root:
            ticks += int(fields[13]) + int(fields[14])      # cutime, cstime
    return seconds + ticks / TICK


def tree_user_sys(pids):
    """(user, system) clock ticks of the live processes `pids` (their
    threads included): where the CPU went, Python or kernel."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def process_clock(pid):
    """CPU seconds of process `pid` (all threads) from its CPU-time clock,
    or None.  Linux encodes another process's clock id as
    ((~pid) << 3) | CPUCLOCK_SCHED (2), see clock_getcpuclockid(3)."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9
    except OSError:
        return None


def _status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss(root):
    """Resident bytes of the tree of `root`, summed over its processes."""
    return sum(_status(pid, "VmRSS:") for pid in tree(root)) * 1024


def tree_threads(root):
    return sum(_status(pid, "Threads:") for pid in tree(root))


def self_cpu():
    """CPU seconds of this process (user + system)."""
    times = os.times()
    return times.user + times.system


def machine_ticks():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]            # idle + iowait
    total = sum(values[:8])                 # guest time is already in user
    return total - idle, total


def machine_busy(before, after):
    """Fraction of all cores busy between two machine_ticks() readings."""
    busy = after[0] - before[0]
    total = after[1] - before[1]
    return busy / total if total else 0.0


def established(port):
    """TCP connections in ESTABLISHED state whose local port is `port`
    (IPv4, from /proc/net/tcp): how many sessions a server still holds."""
    wanted = f":{port:04X}"
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split(None, 4)
            if fields[1].endswith(wanted) and fields[3] == "01":
                count += 1
    return count
