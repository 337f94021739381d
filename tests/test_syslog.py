"""`error_log syslog:...`: RFC 3164 datagrams, checked by a receiver in the test.

A UDP socket on 127.0.0.1 (or ::1, or a unix datagram socket) plays the
syslog daemon.  Every datagram must be exactly `<PRI>Mmm dd HH:MM:SS
hostname TAG: ` followed by the very line the file log got, with PRI the
facility times 8 plus the record's own severity.  Then the parameters
(facility, severity as the level threshold, tag, nohostname), the rule that
a slow or absent syslog never blocks the proxy, and the config errors.
"""

import logging
import re
import socket
import time

import pytest

from harness import RunningProxy, free_port
from mailproxy import addresses, directives
from mailproxy import config as configmod
from mailproxy import log as logmod
from mailproxy.imap import GREETING

MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
SEVERITY = {"emerg": 0, "alert": 1, "crit": 2, "error": 3, "warn": 4, "notice": 5,
            "info": 6, "debug": 7}
LOCAL7, MAIL = 23, 2
HEADER = re.compile(r"<(\d+)>([A-Z][a-z]{2}) ([ \d]\d) (\d\d:\d\d:\d\d) (?:(\S+) )?(\w+): ")
FILE_LINE = re.compile(r"(\d{4})/(\d\d)/(\d\d) (\d\d:\d\d:\d\d) \[(\w+)\] ")


class Receiver:
    """A syslog daemon for one test: keeps every datagram."""

    def __init__(self, family=socket.AF_INET, address=("127.0.0.1", 0)):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages = []

    @property
    def port(self):
        return self.sock.getsockname()[1]

    def collect(self, until, timeout=5):
        end = time.monotonic() + timeout
        while time.monotonic() < end and not until(self.messages):
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except socket.timeout:
                pass
        return self.messages

    def close(self):
        self.sock.close()


@pytest.fixture
def receiver():
    started = []

    def start(*args):
        started.append(Receiver(*args))
        return started[-1]

    yield start
    for item in started:
        item.close()


def expected_header(file_line, facility, hostname, tag):
    """The RFC 3164 header a file line must come with, built independently."""
    match = FILE_LINE.match(file_line)
    _year, month, day, clock, level = match.groups()
    pri = facility * 8 + SEVERITY[level]
    host = f" {hostname}" if hostname else ""
    return f"<{pri}>{MONTHS[int(month) - 1]} {int(day):2d} {clock}{host} {tag}: "


def one_session(proxy):
    with proxy.client() as client:
        assert client.line() == GREETING
        client.send(b"a LOGOUT\r\n")
        assert client.lines(2) == [b"* BYE\r\n", b"a OK completed\r\n"]
    proxy.wait_log("session done:")


def test_datagrams_are_the_file_lines_behind_an_rfc3164_header(tmp_path, receiver):
    syslog = receiver()
    proxy = RunningProxy(tmp_path, level="info", mail="auth_http 127.0.0.1:9/auth;",
                         top=f"error_log syslog:server=127.0.0.1:{syslog.port},tag=mp info;")
    one_session(proxy)
    proxy.stop()
    lines = proxy.log().splitlines()
    messages = syslog.collect(lambda got: len(got) >= len(lines))
    assert len(lines) >= 6          # version, listening, connected, summary, stopping, exit
    assert [HEADER.sub("", message, count=1) for message in messages] == lines
    hostname = socket.gethostname()
    for message, line in zip(messages, lines):
        assert message == expected_header(line, LOCAL7, hostname, "mp") + line
    assert messages[0].startswith("<189>")          # the [notice] version line: 23*8+5
    assert any(m.startswith("<190>") and "session done:" in m for m in messages)


def test_facility_severity_and_nohostname(tmp_path, receiver):
    """severity= is the threshold: notice and above only; the PRI still
    carries each record's own severity."""
    syslog = receiver()
    proxy = RunningProxy(tmp_path, level="info", mail="auth_http 127.0.0.1:9/auth;",
                         top=f"error_log syslog:server=127.0.0.1:{syslog.port},facility=mail,"
                             "severity=notice,nohostname;")
    one_session(proxy)
    proxy.stop()
    expected = [line for line in proxy.log().splitlines()
                if FILE_LINE.match(line).group(5) in ("notice", "warn", "error")]
    messages = syslog.collect(lambda got: len(got) >= len(expected))
    assert expected and not any("[info]" in message for message in messages)
    assert messages == [expected_header(line, MAIL, None, "mailproxy") + line
                        for line in expected]
    assert all(re.match(r"<21>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d mailproxy: \d{4}/", m)
               for m in messages)
    time.sleep(0.3)
    assert syslog.collect(lambda got: False, timeout=0.3) == messages   # nothing more came


def test_ipv6_server(tmp_path, receiver):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        syslog = receiver(socket.AF_INET6, ("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    proxy = RunningProxy(tmp_path, level="notice", mail="auth_http 127.0.0.1:9/auth;",
                         top=f"error_log syslog:server=[::1]:{syslog.port} notice;")
    proxy.stop()
    lines = proxy.log().splitlines()
    messages = syslog.collect(lambda got: len(got) >= len(lines))
    assert messages == [expected_header(line, LOCAL7, socket.gethostname(), "mailproxy") + line
                        for line in lines]


def test_unix_datagram_server(tmp_path, receiver):
    path = str(tmp_path / "log.sock")
    syslog = receiver(socket.AF_UNIX, path)
    proxy = RunningProxy(tmp_path, level="notice", mail="auth_http 127.0.0.1:9/auth;",
                         top=f"error_log syslog:server=unix:{path},nohostname notice;")
    proxy.stop()
    lines = proxy.log().splitlines()
    messages = syslog.collect(lambda got: len(got) >= len(lines))
    assert messages == [expected_header(line, LOCAL7, None, "mailproxy") + line
                        for line in lines]


def test_a_syslog_that_is_not_there_costs_nothing(tmp_path):
    """No socket at the path: every message is dropped, sessions go on."""
    missing = tmp_path / "nobody-here.sock"
    proxy = RunningProxy(tmp_path, level="info", mail="auth_http 127.0.0.1:9/auth;",
                         top=f"error_log syslog:server=unix:{missing} info;")
    one_session(proxy)
    handlers = [h for h in proxy.worker.destinations.handlers.values()
                if isinstance(h, logmod.SyslogHandler)]
    proxy.stop()
    assert len(handlers) == 1 and handlers[0].dropped >= 4


def test_a_full_syslog_queue_never_blocks(tmp_path):
    """A daemon that stops reading: sends would block, so they are dropped."""
    path = str(tmp_path / "stuck.sock")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.bind(path)
    handler = logmod.SyslogHandler(addresses.syslog(f"syslog:server=unix:{path}"))
    handler.setFormatter(logmod.Formatter())
    handler.addFilter(logmod._ThreadId())
    logger = logging.Logger("syslog-test")
    logger.addHandler(handler)
    try:
        started = time.monotonic()
        for number in range(2000):
            logger.error("message %d %s", number, "x" * 500)
        assert time.monotonic() - started < 5
        assert handler.dropped > 0
    finally:
        handler.close()
        stuck.close()


def test_reopen_leaves_syslog_alone(tmp_path, receiver):
    syslog = receiver()
    proxy = RunningProxy(tmp_path, level="info", mail="auth_http 127.0.0.1:9/auth;",
                         top=f"error_log syslog:server=127.0.0.1:{syslog.port} info;")
    proxy.worker.destinations.reopen()              # what SIGUSR1 does
    one_session(proxy)
    proxy.stop()
    messages = syslog.collect(lambda got: any("session done:" in m for m in got))
    assert any("session done:" in m for m in messages)


# ------------------------------------------------------------------ config

def test_parameters_and_defaults():
    target = addresses.syslog("syslog:server=127.0.0.1")
    assert (target.family, target.address) == (socket.AF_INET, ("127.0.0.1", 514))
    assert (target.facility, target.severity, target.tag, target.hostname) == \
        (LOCAL7, None, "mailproxy", True)
    target = addresses.syslog("syslog:server=[::1]:5514,facility=auth,severity=warn,"
                               "tag=mail_proxy1,nohostname")
    assert target.family == socket.AF_INET6 and target.address[:2] == ("::1", 5514)
    assert (target.facility, target.severity, target.tag, target.hostname) == \
        (4, "warn", "mail_proxy1", False)
    assert str(target) == "syslog:server=[::1]:5514,facility=auth,severity=warn," \
                          "tag=mail_proxy1,nohostname"
    assert directives.error_log(["syslog:server=127.0.0.1,severity=info"])[0][1] == "info"
    assert directives.error_log(["syslog:server=127.0.0.1"])[0][1] == "error"
    assert directives.error_log(["syslog:server=127.0.0.1,severity=info", "info"])[0][1] \
        == "info"


def write(tmp_path, error_log):
    path = tmp_path / "mail.conf"
    path.write_text(f"{error_log}\nmail {{\n    auth_http 127.0.0.1:9/auth;\n"
                    f"    server {{ listen 127.0.0.1:{free_port()}; protocol imap; }}\n}}\n")
    return path


@pytest.mark.parametrize("value, message", [
    ("syslog:", 'unknown syslog parameter ""'),
    ("syslog:facility=mail", "no syslog server specified"),
    ("syslog:server=127.0.0.1,foo=bar", 'unknown syslog parameter "foo=bar"'),
    ("syslog:server=127.0.0.1,hostname", 'unknown syslog parameter "hostname"'),
    ("syslog:server=127.0.0.1,server=127.0.0.2", 'duplicate syslog "server"'),
    ("syslog:server=127.0.0.1,facility=local8", 'unknown syslog facility "local8"'),
    ("syslog:server=127.0.0.1,severity=loud", 'unknown syslog severity "loud"'),
    ("syslog:server=127.0.0.1,tag=my-proxy", 'syslog "tag" "my-proxy" must be 1-32 letters, '
                                             'digits or "_"'),
    ("syslog:server=127.0.0.1,tag=" + "t" * 33, f'syslog "tag" "{"t" * 33}" must be 1-32'),
    ("syslog:server=127.0.0.1:99999", 'invalid port in "127.0.0.1:99999"'),
    ("syslog:server=::1", 'invalid syslog server "::1"'),
    ("syslog:server=unix:dev/log", 'invalid syslog server "unix:dev/log"'),
    ("syslog:server=no-such-host.invalid", 'host not found in syslog server '
                                           '"no-such-host.invalid"'),
    ("syslog:server=127.0.0.1,severity=info warn", 'level "warn" and "severity=info" disagree'),
])
def test_bad_syslog_destinations_name_file_and_line(tmp_path, value, message):
    path = write(tmp_path, f"error_log {value};")
    with pytest.raises(configmod.ConfigError) as info:
        configmod.load(str(path))
    assert str(info.value).startswith(message)
    assert str(info.value).endswith(f' in "error_log" directive in {path}:1')


def test_dump_prints_the_destination_as_written(tmp_path):
    path = write(tmp_path, "error_log syslog:server=127.0.0.1:5514,tag=mp,nohostname "
                           "notice;\nerror_log stderr;")
    config = configmod.load(str(path))
    dumped = configmod.dump(config)
    assert "error_log syslog:server=127.0.0.1:5514,tag=mp,nohostname notice;" in dumped
    again = tmp_path / "again.conf"
    again.write_text(dumped)
    assert configmod.load(str(again)).error_logs == config.error_logs


def test_severity_alone_is_the_level(tmp_path):
    path = write(tmp_path, "error_log syslog:server=127.0.0.1,severity=debug;")
    (dest, level), = configmod.load(str(path)).error_logs
    assert level == "debug" and dest.severity == "debug"
