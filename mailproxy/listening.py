"""Listening sockets: which to open, opening them, and their unix: files.

`socket_plan()` turns the `listen` lines of every server{} into the sockets
to open: as in nginx, a specific address on a port that also has a
wildcard is served by the wildcard's socket unless it says `bind`, and
several servers may share one address (names.py tells them apart).
`open_socket()` applies the `listen` parameters (backlog, buffers,
keepalive, ipv6only, multipath).  The worker (server.py) opens them when
it runs alone; the master process (ops/master.py) opens them before it
forks, and keeps them open across a reload (`open_sockets(existing=)`).
"""

import os
import socket
import stat

from .names import shared_addresses

UNIX_SOCKET_MODE = 0o666    # nginx's: the directory, not the socket, says who may connect
STALE_PROBE_TIMEOUT = 1.0   # a live unix: listener accepts a probe at once


def socket_plan(config):
    """[(Listen entry, default route, routes)] for the sockets to open, a
    route being (server indexes, Listen entry): the servers on one address,
    the first being its default (names.py).  A wildcard socket also serves
    the same port's specific addresses that do not ask for `bind` (nginx's
    rule, spec 1.2)."""
    groups = [(tuple(index for index, _ in members), members[0][1])
              for members in shared_addresses(config.servers).values()]
    wildcards = {(e.family, e.port): (i, e) for i, e in groups if e.wildcard}
    plan = {}
    for indexes, entry in groups:
        owner = wildcards.get((entry.family, entry.port))
        if owner and owner[1] is not entry and not entry.bind:
            plan.setdefault(owner[1], [owner, {}])[1][(entry.host, entry.port)] = \
                (indexes, entry)
        else:
            plan.setdefault(entry, [(indexes, entry), {}])
    return [(entry, default, routes) for entry, (default, routes) in plan.items()]


def socket_key(entry):
    """What makes two listening sockets the same one (reload reuses it)."""
    return (entry.family, entry.host, entry.port)


def open_sockets(plan, existing=None):
    """{socket_key: listening socket} for a plan, reusing `existing` ones
    (a reload keeps its ports open); OSError names the failing address."""
    sockets = {}
    for entry, _, _ in plan:
        key = socket_key(entry)
        if existing and key in existing:
            sockets[key] = existing[key]
            continue
        try:
            sockets[key] = open_socket(entry)
        except OSError as exc:
            for sock in sockets.values():
                if not existing or sock not in existing.values():
                    sock.close()
            raise OSError(exc.errno, f"bind() to {entry.name} failed "
                                     f"({exc.errno}: {exc.strerror})") from None
    return sockets


def open_socket(entry):
    """A listening socket with the `listen` parameters applied."""
    if entry.family == socket.AF_UNIX:
        _remove_stale_socket(entry.host)
    proto = socket.IPPROTO_MPTCP if entry.multipath else 0
    sock = socket.socket(entry.family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if entry.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(entry.ipv6only))
        if entry.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, entry.rcvbuf)
        if entry.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, entry.sndbuf)
        _set_keepalive(sock, entry.so_keepalive)
        if entry.family == socket.AF_UNIX:
            sock.bind(entry.host)
            os.chmod(entry.host, UNIX_SOCKET_MODE)
        else:
            sock.bind((entry.host, entry.port))
        sock.listen(entry.backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path):
    """A `listen unix:` path left behind by a process that died is removed,
    as nginx does.  Unlike nginx, a socket that still accepts (another
    running proxy) and a file that is not a socket are left alone, so
    bind() fails with "Address already in use", as on a busy port."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(STALE_PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        except OSError:
            pass


def remove_socket_file(key):
    """After a clean stop: a unix: listener's socket file goes (socket_key)."""
    family, path, _ = key
    if family != socket.AF_UNIX:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def close_sockets(sockets):
    """Close listening sockets ({socket_key: socket}) for good, their
    unix: socket files removed."""
    for key, sock in sockets.items():
        sock.close()
        remove_socket_file(key)


def _set_keepalive(sock, setting):
    """`so_keepalive=on|off|idle:intvl:cnt` (Linux TCP_KEEP* options)."""
    if setting is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(bool(setting)))
    if isinstance(setting, tuple):
        idle, interval, count = setting
        for option, value in ((socket.TCP_KEEPIDLE, idle), (socket.TCP_KEEPINTVL, interval),
                              (socket.TCP_KEEPCNT, count)):
            if value is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, int(value))
