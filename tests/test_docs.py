"""The docs and examples agree with the code.

docs/directives.md has one "### `name`" section per directive of
directives.TABLE and REMOVED, and no other; every mailproxy configuration in
examples/ loads; the users file example parses; every module docs/tour.md
names exists; and the README opens with exactly its two commands.
"""

import datetime
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailproxy import config, directives
from mailproxy.reference import authservice

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
# .conf files in examples/ that are not mailproxy configurations.
OTHER_CONFS = {"users.conf", "logrotate.conf"}
DIRECTIVE_HEADING = re.compile(r"^### `([a-z0-9_]+)`\s*$", re.MULTILINE)
MODULE_NAME = re.compile(r"\b((?:mailproxy/)?(?:(?:ops|reference)/)?[a-z_][a-z0-9_]*\.py)\b")
FENCE = re.compile(r"^```[a-z]*\n(.*?)\n```\n", re.DOTALL | re.MULTILINE)
# An example's certificate and key paths (/etc/mailproxy/...) do not exist
# here, and config.load opens them to build the TLS context.
CERT_LINE = re.compile(r"^(\s*)(ssl_certificate|ssl_certificate_key)(\s+)\S+;", re.MULTILINE)
# Nor do their log and pid folders (/var/log/mailproxy, /run/mailproxy), and
# config.load opens those files too, as nginx does.
FOLDER_LINE = re.compile(r"^(\s*(?:error_log|pid)\s+)/\S+/", re.MULTILINE)


def documented_directives():
    return DIRECTIVE_HEADING.findall((DOCS / "directives.md").read_text())


def test_every_directive_is_documented():
    documented = set(documented_directives())
    known = set(directives.TABLE) | set(directives.REMOVED)
    assert sorted(known - documented) == [], "directives without a section in docs/directives.md"


def test_every_documented_directive_is_known():
    known = set(directives.TABLE) | set(directives.REMOVED)
    assert sorted(set(documented_directives()) - known) == [], \
        "docs/directives.md documents names the directive table does not know"


def test_each_directive_is_documented_once():
    names = documented_directives()
    assert sorted(name for name in set(names) if names.count(name) > 1) == []


def example_configs():
    return sorted(path for path in EXAMPLES.glob("*.conf") if path.name not in OTHER_CONFS)


def test_there_are_example_configs():
    assert {path.name for path in example_configs()} >= {"mail.conf", "small-site.conf"}


@pytest.fixture(scope="module")
def throwaway_certificate(tmp_path_factory):
    """A self-signed certificate and its key, for any name: {directive: path}."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mail.example.org")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    paths = {"ssl_certificate": directory / "cert.pem", "ssl_certificate_key": directory / "key.pem"}
    paths["ssl_certificate"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["ssl_certificate_key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


@pytest.mark.parametrize("path", example_configs(), ids=lambda path: path.name)
def test_example_config_loads(path, tmp_path, throwaway_certificate):
    """Loaded from a copy, so relative paths land in tmp_path.  config.load
    opens the log and pid files and the certificates and keys of servers
    that use TLS: in the copy, the log and pid files are in tmp_path, and
    every ssl_certificate and ssl_certificate_key names a throwaway pair."""
    copy = tmp_path / path.name
    text = CERT_LINE.sub(lambda m: f"{m[1]}{m[2]}{m[3]}{throwaway_certificate[m[2]]};",
                         path.read_text())
    copy.write_text(FOLDER_LINE.sub(lambda m: f"{m[1]}{tmp_path}/", text))
    loaded = config.load(str(copy), prefix=str(tmp_path))
    assert loaded.servers
    for server in loaded.servers:
        assert server.listens and server.protocol in directives.PROTOCOLS


def test_small_site_example_uses_tls():
    """The small-site example is the one to copy: every client port has TLS."""
    text = (EXAMPLES / "small-site.conf").read_text()
    assert CERT_LINE.search(text)
    assert re.search(r"^\s*listen\s+993 ssl;", text, re.MULTILINE)
    assert re.search(r"^\s*starttls\s+only;", text, re.MULTILINE)


def test_example_users_file_parses():
    users = authservice.parse_users(EXAMPLES / "users.conf")
    assert users
    for user in users.values():
        assert user.secret.startswith(("{SCRYPT}", "{PLAIN}", "{PLAIN-B64}"))
        assert user.backends


def test_example_users_file_passwords_are_the_documented_ones():
    users = authservice.parse_users(EXAMPLES / "users.conf")
    assert all(authservice.check_password(user, b"change-me") for user in users.values())


def test_modules_named_in_the_tour_exist():
    names = set(MODULE_NAME.findall((DOCS / "tour.md").read_text()))
    assert names, "docs/tour.md names no module"
    missing = []
    for name in names:
        name = name.removeprefix("mailproxy/")
        path = ROOT / name if name == "mailproxy.py" else ROOT / "mailproxy" / name
        if not path.is_file():
            missing.append(name)
    assert sorted(missing) == []


def test_tour_has_a_section_per_main_module():
    """The data-flow modules each have a section (a "## `name.py`" heading)."""
    headings = (DOCS / "tour.md").read_text()
    for module in ("cli", "config", "server", "session", "imap", "pop3", "smtp", "sasl",
                   "auth_http", "backend", "relay"):
        assert re.search(rf"^## .*`{module}\.py`", headings, re.MULTILINE), module


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    title, _, rest = text.partition("\n")
    assert title.startswith("# ")
    rest = rest.lstrip("\n")
    first = FENCE.match(rest)
    assert first, "README must continue with a fenced command"
    rest = rest[first.end():].lstrip("\n")
    second = FENCE.match(rest)
    assert second, "README's second block must be a fenced command"
    install, test = first.group(1), second.group(1)
    assert "\n" not in install and "\n" not in test, "each block is one command line"
    assert install.startswith("pip install") and "mailproxy demo" in install
    assert test.startswith("pip install") and "pytest" in test


def test_docs_link_to_files_that_exist():
    link = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")
    broken = []
    for page in list(DOCS.glob("*.md")) + list(EXAMPLES.glob("*.md")):
        for target in link.findall(page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert broken == []
