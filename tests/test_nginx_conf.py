"""nginx's path rules and the core of a whole nginx.conf (issue 15, items 1 and 3).

Paths: files read with the configuration (`include`, the TLS files of
`directives.CONF_FILES`) come from the configuration file's folder, nginx's
conf prefix; `pid` and log files from the prefix (-p), which defaults to the
same folder.  So the working directory never matters: these tests load from
`/` (monkeypatch.chdir) and run `mailproxy.py -t` with cwd=/.

Core: nginx's top-level and events directives are accepted, those with no
meaning here with one [warn] each; `http {}` and `stream {}` are lexed and
skipped with one [warn]; `auth_http` names a host that is resolved at load.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from certs import PASSPHRASE
from fakes import ScriptedAuthService, fail
from harness import RunningProxy
from mailproxy import config as configmod
from mailproxy import directives as d
from mailproxy.config import ConfigError

pytest_plugins = ("certs",)     # certs: a small PKI, made once per run

ROOT = Path(__file__).resolve().parent.parent
AUTH = "auth_http 127.0.0.1:9000/auth;"
IMAP = "server { listen 127.0.0.1:1143; protocol imap; }"


def write(folder, text, name="mail.conf"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def mail(body="", top="", server=IMAP):
    return f"{top}\nmail {{\n    {AUTH}\n{body}\n    {server}\n}}\n"


def line_of(path, text):
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture
def elsewhere(monkeypatch):
    """Run the test from `/`, far from every configuration file."""
    monkeypatch.chdir("/")


@pytest.fixture
def tls_folder(tmp_path, certs):
    """conf/ with cert.pem, key.pem (encrypted), password and tls.conf, all
    named relative to conf/mail.conf."""
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "cert.pem").write_bytes(Path(certs.rsa.cert).read_bytes())
    (folder / "key.pem").write_bytes(Path(certs.rsa_encrypted).read_bytes())
    (folder / "ca.pem").write_bytes(Path(certs.ca.cert).read_bytes())
    (folder / "password").write_text(f"wrong\n{PASSPHRASE}\n")
    (folder / "tls.conf").write_text("ssl_certificate cert.pem;\nssl_certificate_key key.pem;\n"
                                     "ssl_password_file password;\n")
    return folder


# ------------------------------------------------------------------ paths

def test_tls_files_are_read_from_the_configuration_folder(tls_folder, elsewhere):
    path = write(tls_folder, mail("    include tls.conf;\n    starttls on;"))
    server = configmod.load(str(path)).servers[0]
    assert server.ssl_certificate == (str(tls_folder / "cert.pem"),)
    assert server.ssl_certificate_key == (str(tls_folder / "key.pem"),)
    assert server.ssl_password_file == str(tls_folder / "password")


def test_every_conf_file_directive_is_in_the_table():
    assert set(d.CONF_FILES) <= set(d.TABLE)


def test_backend_side_files_are_read_from_the_configuration_folder(tls_folder, certs,
                                                                    elsewhere):
    (tls_folder / "client.key").write_bytes(Path(certs.rsa.key).read_bytes())
    path = write(tls_folder, mail("    proxy_ssl on;\n    proxy_ssl_verify on;\n"
                                  "    proxy_ssl_trusted_certificate ca.pem;\n"
                                  "    proxy_ssl_certificate cert.pem;\n"
                                  "    proxy_ssl_certificate_key client.key;"))
    server = configmod.load(str(path)).servers[0]
    assert server.proxy_ssl_trusted_certificate == str(tls_folder / "ca.pem")
    assert server.proxy_ssl_certificate == str(tls_folder / "cert.pem")
    assert server.proxy_ssl_certificate_key == str(tls_folder / "client.key")


def test_an_absolute_file_name_stays_as_it_is(tmp_path, certs, elsewhere):
    path = write(tmp_path / "conf", mail(f"    ssl_certificate {certs.ecdsa.cert};\n"
                                         f"    ssl_certificate_key {certs.ecdsa.key};\n"
                                         "    starttls on;"))
    server = configmod.load(str(path)).servers[0]
    assert server.ssl_certificate == (certs.ecdsa.cert,)


def test_a_missing_relative_file_is_named_in_the_configuration_folder(tls_folder, elsewhere):
    (tls_folder / "password").unlink()
    path = write(tls_folder, mail("    include tls.conf;\n    starttls on;"))
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path))
    assert f'"{tls_folder / "password"}"' in str(info.value)


def test_pid_and_logs_use_the_prefix_which_defaults_to_the_folder(tmp_path, elsewhere):
    path = write(tmp_path / "conf", mail(top="pid run/mailproxy.pid;"))
    for folder in ("conf", "var"):
        (tmp_path / folder / "run").mkdir(parents=True)
    config = configmod.load(str(path))
    assert (config.prefix, config.conf_prefix) == (str(tmp_path / "conf"),) * 2
    assert config.resolve(config.pid) == str(tmp_path / "conf" / "run" / "mailproxy.pid")
    other = configmod.load(str(path), prefix=str(tmp_path / "var"))
    assert other.resolve("logs/error.log") == str(tmp_path / "var" / "logs" / "error.log")
    assert other.conf_prefix == str(tmp_path / "conf")


def test_the_prefix_does_not_move_the_tls_files(tls_folder, tmp_path, elsewhere):
    path = write(tls_folder, mail("    include tls.conf;\n    starttls on;"))
    server = configmod.load(str(path), prefix=str(tmp_path / "var")).servers[0]
    assert server.ssl_certificate == (str(tls_folder / "cert.pem"),)


def test_a_nested_include_is_read_from_the_configuration_folder_too(tmp_path, elsewhere):
    """nginx takes every include from the conf prefix, not from the folder
    of the file that says it."""
    folder = tmp_path / "conf"
    write(folder / "mail.d", "include timeouts.conf;\n", name="main.conf")
    write(folder, "timeout 7s;\n", name="timeouts.conf")
    path = write(folder, mail("    include mail.d/*.conf;"))
    assert configmod.load(str(path)).servers[0].timeout == 7


def test_an_include_of_itself_ends_with_an_error(tmp_path, elsewhere):
    folder = tmp_path / "conf"
    write(folder, "include loop.conf;\n", name="loop.conf")
    path = write(folder, mail("    include loop.conf;"))
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path))
    assert str(info.value).startswith("includes nested more than 32 deep in ")


def test_a_command_line_include_is_read_from_the_configuration_folder(tmp_path, elsewhere):
    folder = tmp_path / "conf"
    write(folder, "pid from-g.pid;\n", name="extra.conf")
    path = write(folder, mail())
    assert configmod.load(str(path), extra="include extra.conf;").pid == "from-g.pid"


def test_minus_t_from_root_reads_relative_files(tls_folder):
    path = write(tls_folder, mail("    include tls.conf;\n    starttls on;"))
    results = [subprocess.run([sys.executable, str(ROOT / "mailproxy.py"), "-t", "-c",
                               str(path)], cwd=cwd, capture_output=True, text=True, timeout=30)
               for cwd in ("/", tls_folder)]
    assert results[0].returncode == 0, results[0].stderr
    assert results[0].stderr == results[1].stderr


def test_minus_T_prints_the_prefixes_and_the_files_read(tls_folder):
    path = write(tls_folder, mail("    include tls.conf;\n    starttls on;"))
    done = subprocess.run([sys.executable, str(ROOT / "mailproxy.py"), "-T", "-c", str(path)],
                          cwd="/", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert f"# conf prefix {tls_folder}/ (included and TLS files), prefix {tls_folder}/ " \
           "(pid and log files)" in lines
    assert f"ssl_certificate {tls_folder}/cert.pem;" in lines
    assert f"ssl_password_file {tls_folder}/password;" in lines


# ------------------------------------------------------------ core, events

IGNORED = [
    ("pcre_jit on;", 'the "pcre_jit" directive is ignored: mailproxy matches no regular '
                     "expressions"),
    ('load_module "modules/ngx_mail_module.so";',
     'the "load_module" directive is ignored: the mail modules are built into mailproxy'),
    ("daemon on;", 'the "daemon" directive is ignored: mailproxy always runs in the '
                   "foreground"),
    ("master_process off;", 'the "master_process" directive is ignored: a master process '
                            "runs when worker_processes is 2 or more"),
    ("worker_cpu_affinity auto;", 'the "worker_cpu_affinity" directive is ignored: the '
                                  "kernel places mailproxy's workers"),
    ("worker_priority -5;", 'the "worker_priority" directive is ignored: set the priority '
                            "with nice or systemd's Nice="),
    ("env TZ;", 'the "env" directive is ignored: mailproxy\'s workers keep the whole '
                "environment"),
    ("thread_pool default threads=32 max_queue=65536;",
     'the "thread_pool" directive is ignored: each mailproxy session has its own thread'),
    ("timer_resolution 100ms;", 'the "timer_resolution" directive is ignored: mailproxy '
                                "reads the clock when it needs it"),
    ("lock_file logs/nginx.lock;", 'the "lock_file" directive is ignored: each mailproxy '
                                   "worker's threads block in accept()"),
    ("working_directory /var/tmp;", 'the "working_directory" directive is ignored: '
                                    "mailproxy stays in the directory it was started in"),
    ("worker_rlimit_core 500m;", 'the "worker_rlimit_core" directive is ignored: set the '
                                 "limit with ulimit -c or systemd's LimitCORE="),
    ("events { use epoll; }", 'the "use" directive is ignored: mailproxy has one blocking '
                              "thread per session, no event method"),
    ("events { multi_accept on; }", 'the "multi_accept" directive is ignored: each '
                                    "mailproxy worker's threads block in accept()"),
    ("events { accept_mutex on; }", 'the "accept_mutex" directive is ignored: each '
                                    "mailproxy worker's threads block in accept()"),
    ("events { accept_mutex_delay 100ms; }", 'the "accept_mutex_delay" directive is '
                                             "ignored: each mailproxy worker's threads "
                                             "block in accept()"),
    ("events { worker_aio_requests 64; }", 'the "worker_aio_requests" directive is '
                                           "ignored: mailproxy does no asynchronous I/O"),
    ("events { debug_connection 192.0.2.1; }", 'the "debug_connection" directive is '
                                               "ignored: use error_log ... debug"),
    ("http { include /etc/nginx/mime.types; server { listen 80; } }",
     'the "http" block is skipped: mailproxy serves only "mail {}"'),
    ("stream { upstream dns { server 192.0.2.1:53; } server { listen 53 udp; } }",
     'the "stream" block is skipped: mailproxy serves only "mail {}"'),
]


@pytest.mark.parametrize("text, warning", IGNORED, ids=[text for text, _ in IGNORED])
def test_core_directives_without_meaning_here_warn_once(tmp_path, text, warning):
    path = write(tmp_path, mail(top=f"\n{text}"))
    assert configmod.load(str(path)).warnings == (f"{warning} in {path}:2",)


@pytest.mark.parametrize("text", ["daemon off;", "master_process on;",
                                  "events { multi_accept off; accept_mutex off; }"])
def test_restating_what_mailproxy_does_warns_nothing(tmp_path, text):
    assert configmod.load(str(write(tmp_path, mail(top=text)))).warnings == ()


def test_warnings_come_in_the_order_of_the_file(tmp_path):
    path = write(tmp_path, mail(top="pcre_jit on;\nevents { use epoll; }\nhttp { }\n"
                                    "env A;\nenv B;"))
    found = [warning.split('"')[1] for warning in configmod.load(str(path)).warnings]
    assert found == ["pcre_jit", "use", "http", "env", "env"]


def test_core_directives_are_still_checked(tmp_path):
    path = write(tmp_path, mail(top="pcre_jit maybe;"))
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path))
    assert str(info.value) == f'invalid value "maybe", it must be "on" or "off" in ' \
                              f'"pcre_jit" directive in {path}:1'


def test_a_syntax_error_inside_http_is_still_an_error(tmp_path):
    path = write(tmp_path, mail(top="http {\n    server { listen 80 }\n}"))
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path))
    assert str(info.value) == f'unexpected "}}" in {path}:2'


@pytest.mark.parametrize("top, message", [
    ("http { }\nhttp { }", '"http" directive is duplicate'),
    ("http;", 'directive "http" has no opening "{"'),
    ("events { pcre_jit on; }", '"pcre_jit" directive is not allowed here'),
])
def test_core_mistakes_in_nginx_words(tmp_path, top, message):
    path = write(tmp_path, mail(top=top))
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path))
    assert str(info.value).startswith(f"{message} in {path}:")


def test_http_inside_mail_is_not_allowed(tmp_path):
    path = write(tmp_path, mail("    http { }"))
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path))
    assert str(info.value) == f'"http" directive is not allowed here in {path}:4'


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives its rights away")
def test_user_with_a_group_and_worker_processes_auto(tmp_path):
    path = write(tmp_path, mail(top="user nobody nogroup;\nworker_processes auto;"))
    config = configmod.load(str(path))
    assert (config.user, config.worker_processes) == (("nobody", "nogroup"), os.cpu_count())


def test_user_is_ignored_with_nginx_s_warning_unless_root(tmp_path, monkeypatch):
    """As ngx_set_user: not root, the names are not even looked up."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    path = write(tmp_path, mail(top="user no-such-user-here no-such-group;"))
    config = configmod.load(str(path))
    assert config.user is None
    assert config.warnings == ('the "user" directive makes sense only if the master process '
                               f"runs with super-user privileges, ignored in {path}:1",)


# ------------------------------------------------------------- auth_http

def test_auth_http_host_name_is_resolved_at_load(tmp_path):
    path = write(tmp_path, mail().replace(AUTH, "auth_http http://localhost:9000/auth;"))
    assert configmod.load(str(path)).servers[0].auth_http.address == "127.0.0.1"


def test_auth_http_host_that_does_not_resolve_is_an_error(tmp_path):
    path = write(tmp_path, mail().replace(AUTH, "auth_http no-such-host.invalid:9000/auth;"))
    with pytest.raises(ConfigError) as info:
        configmod.load(str(path))
    assert str(info.value) == 'host not found in auth_http "no-such-host.invalid:9000/auth" ' \
                              f"in {path}:3"


def test_a_named_auth_service_gets_its_name_as_host(tmp_path):
    """The request goes to the address resolved at load; Host names the name."""
    with ScriptedAuthService(fail()) as auth:
        proxy = RunningProxy(tmp_path, mail=f"auth_http localhost:{auth.port}/auth;")
        try:
            with proxy.client() as client:
                client.line()
                client.send(b"a LOGIN joe secret\r\n")
                auth.wait_requests(1)
        finally:
            proxy.stop()
    assert auth.requests[0].header("Host") == "localhost"
