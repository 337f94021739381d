"""A configuration fuzzer: `-t` refuses a file at its file:line, or the
proxy starts and serves a login (issue 16: configurations fail at -t or
never).

Each example is a working IMAP configuration with a few directives added,
their values drawn from what breaks parsers: numbers and sizes at and past
every ceiling, times, quoted text with control bytes and nginx's escapes,
header names, log and pid files in folders that do not exist.  The file is
loaded as `mailproxy -t` loads it (cli calls config.load), and then either

* it is refused with a ConfigError naming this file and a line, or
* a real worker opens its listener, and `a LOGIN joe secret` through a
  scripted auth service and backend is answered `a OK`; the error log has
  no traceback.

Values that are legal and stop a login by design (a 10-byte command buffer,
a 1 ms timeout, `starttls only`) are not drawn.  `worker_rlimit_nofile` is
read but not applied here: the worker runs in the test process, whose own
limit must not move (tests/bench/config_fuzz.py runs the real command).

The CI form tries EXAMPLES files (a few seconds); `MAILPROXY_FUZZ_SCALE`
multiplies it, and tests/bench/config_fuzz.py counts the outcomes of a
longer run.
"""

import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import IMAP_LOGIN_THEN_ECHO, ScriptedAuthService, ScriptedBackend, ok
from harness import Client, RunningProxy, free_port
from mailproxy.config import ConfigError

EXAMPLES = 60 * int(os.environ.get("MAILPROXY_FUZZ_SCALE", "1"))
FILE_LINE = re.compile(r" in (/\S+/fuzz\.conf):(\d+)$")
CRASH = re.compile(r"Traceback|unexpected error|session crashed")

# ------------------------------------------------------------------ values

INTERESTING_NUMBERS = ["0", "1", "-1", "127", "128", "32767", "32768", "2147483647",
                       "2147483648", "9223372036854775807", "9223372036854775808",
                       "99999999999999999999", "1e3", "0x10", "", " 1"]
number = st.sampled_from(INTERESTING_NUMBERS) | st.integers(0, 2 ** 70).map(str)
unit = st.sampled_from(["k", "K", "m", "M", "g", "G", "x", "kb"])     # a bare number is above
# at least 1k, or past every limit: a smaller buffer stops a login by design
size = st.one_of(st.integers(1024, 2 ** 40).map(str),
                 st.tuples(st.integers(1, 2 ** 70), unit).map(lambda parts: f"{parts[0]}{parts[1]}"),
                 st.sampled_from(["99999999999999999999g", "100g", "2g", "2097148k", "0",
                                  "-1k", "1.5k"]))
time_unit = st.sampled_from(["", "ms", "s", "m", "h", "d", "w", "M", "y", "x"])
# at least 5 s, or past every limit: a shorter timeout may cut a login
duration = st.one_of(st.integers(5, 10 ** 9).map(str),
                     st.tuples(st.integers(5, 2 ** 70), time_unit).map(
                         lambda parts: f"{parts[0] * (1000 if parts[1] == 'ms' else 1)}"
                                       f"{parts[1]}"),
                     st.sampled_from(["24.9d", "25d", "1h30m", "-5s", "5s5", ""]))
# pieces of quoted text: raw control bytes, nginx escapes, lexer characters
PIECES = list("abz09.-:/_=@ ;{}#$'") + ["\t", "\n", "\r", "\x00", "\x01", "\x1b", "\x7f",
                                         "\u00e9", "\\t", "\\n", "\\r", "\\\\", '\\"',
                                         "\\'", "\\x"]
text = st.lists(st.sampled_from(PIECES), max_size=10).map("".join)
quoted = text.map(lambda value: f'"{value}"')
word = quoted | st.from_regex(r"[A-Za-z0-9.:_-]{1,12}", fullmatch=True)


def keepalive(parts):
    return "so_keepalive=" + ":".join(parts)


# Lines for the server block, then for the top level.
server_line = st.one_of(
    word.map(lambda value: f"server_name {value};"),
    st.lists(word, min_size=1, max_size=3).map(
        lambda words: f"imap_capabilities {' '.join(words)};"),
    st.tuples(word, word).map(lambda pair: f"auth_http_header {pair[0]} {pair[1]};"),
    st.tuples(st.sampled_from(["proxy_buffer", "imap_client_buffer", "smtp_client_buffer"]),
              size).map(lambda pair: f"{pair[0]} {pair[1]};"),
    st.tuples(st.sampled_from(["timeout", "proxy_timeout", "auth_http_timeout"]),
              duration).map(lambda pair: f"{pair[0]} {pair[1]};"),
    number.map(lambda value: f"max_errors {value};"),
    quoted.map(lambda value: f'trace "login:{value[1:-1]}";'),
)
listen_param = st.one_of(
    number.map(lambda value: f"backlog={value}"),
    size.map(lambda value: f"rcvbuf={value}"),
    size.map(lambda value: f"sndbuf={value}"),
    st.tuples(duration | number | st.just(""), duration | number | st.just(""), number).map(
        keepalive),
)
top_line = st.one_of(
    number.map(lambda value: f"worker_rlimit_nofile {value};"),
    st.sampled_from(["x.log", "nodir/x.log", "/nonexistent/x.log", "logs/"]).map(
        lambda name: f"error_log {name} info;"),
    st.sampled_from(["x.pid", "nodir/x.pid", "/nonexistent/x.pid"]).map(
        lambda name: f"pid {name};"),
    number.map(lambda value: f"events {{ worker_connections {value}; }}"),
)


@st.composite
def configuration(draw):
    """(top lines, listen parameters, server lines) of one file."""
    return (draw(st.lists(top_line, max_size=2)),
            draw(st.lists(listen_param, max_size=2, unique=True)),
            draw(st.lists(server_line, max_size=4)))


# ---------------------------------------------------------------- checking

def write_config(folder, drawn, auth_url, port):
    top, params, body = drawn
    mail_events = [line for line in top if line.startswith("events")]
    lines = [line for line in top if not line.startswith("events")] + mail_events
    lines += [f"error_log {folder}/error.log info;", "mail {", f"    auth_http {auth_url};",
              "    server {", f"        listen 127.0.0.1:{port} {' '.join(params)};",
              "        protocol imap;"]
    lines += [f"        {line}" for line in body] + ["    }", "}"]
    path = Path(folder) / "fuzz.conf"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n")
    return path


def check(drawn, auth_url):
    """One file: "refused" (a file:line error) or "served" (a login went
    through); an AssertionError otherwise."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_config(folder, drawn, auth_url, free_port())
        try:
            proxy = RunningProxy.from_file(path, Path(folder) / "error.log")
        except ConfigError as exc:
            match = FILE_LINE.search(str(exc))
            assert match and match.group(1) == str(path), str(exc)
            assert 0 < int(match.group(2)) <= len(path.read_bytes().splitlines())
            return "refused"
        try:
            serve_one_login(proxy.port)
        finally:
            proxy.stop()
        assert not CRASH.search(proxy.log()), proxy.log()
        return "served"


def serve_one_login(port):
    with Client(port) as client:
        assert client.line().startswith(b"* OK")
        client.send(b"a LOGIN joe secret\r\n")
        assert client.line() == b"a OK logged in\r\n"


@pytest.fixture(scope="module")
def peers():
    """A backend that accepts joe's login and echoes, and an auth service
    that sends every login there; shared by all the examples."""
    with ScriptedBackend(IMAP_LOGIN_THEN_ECHO) as backend, ScriptedAuthService() as auth:
        auth.reply = ok(backend.host, backend.port)
        yield auth


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(drawn=configuration())
def test_a_config_is_refused_at_a_line_or_serves_a_login(peers, drawn):
    check(drawn, peers.url)
