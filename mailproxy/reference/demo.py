"""`mailproxy demo`: a whole proxied mail setup in one process, on loopback.

Four pieces start, each the real thing except the last two:
1. the proxy itself, from an ordinary nginx-syntax configuration written to
   a temporary directory (IMAP, POP3 and SMTP listeners);
2. the reference auth service (authservice.py) with the demo users, one
   of whom may also log in with a bearer token (XOAUTH2, OAUTHBEARER);
3. small in-memory IMAP, POP3 and SMTP backends (demo_backends.py, one
   module per protocol): teaching aids, not mail servers, so nothing else
   needs installing;
4. a small OAuth 2.0 provider (demo_oauth.py): a token endpoint and an IMAP
   backend that takes access tokens only.  carol logs in to the proxy with a
   password, and the proxy logs in there with an access token the auth
   service got with her refresh token: the password-to-OAuth bridge.
dave's IMAP backends are a stopped one, then the demo backend: with
`proxy_backend_tries 2` the proxy asks the auth service again and gets the
second.  With `proxy_client_address on` the IMAP backends learn the
client's address from the proxy's ID command, and tell it to `ID NIL`.
STARTTLS is on for all three listeners, with a throwaway self-signed
certificate made at start (its path is printed for curl's --cacert).

Mail sent through the SMTP listener lands in the demo mailbox and can be
fetched through the IMAP or POP3 listener.  The terminal shows one line per
session; Ctrl-C stops everything.
"""

import datetime
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .. import config as configmod
from ..server import Worker
from .authservice import AuthService, plain_secret
from .demo_backends import start_backends
from .demo_oauth import CLIENT_ID, CLIENT_SECRET, DemoProvider
from .mailstore import Mailstore

USERS = {"alice": "wonderland", "bob": "builder"}
TOKENS = {"alice": "demo-token-alice"}     # bearer tokens for XOAUTH2/OAUTHBEARER logins
OAUTH_USER, OAUTH_PASSWORD = "carol", "meadow"     # her backend takes OAuth 2.0 tokens only
FAILOVER_USER, FAILOVER_PASSWORD = "dave", "diver"  # his first IMAP backend is stopped
PREFERRED_PORTS = {"imap": 1143, "pop3": 1110, "smtp": 1587, "auth": 9000}
SHOWN = ("session done:",)     # the summary line: one per session, whatever its end

CONFIG = """\
worker_processes 1;
error_log stderr info;
events {{ worker_connections 256; }}
mail {{
    server_name demo.test;
    auth_http 127.0.0.1:{auth}/auth;
    timeout 5m;
    proxy_backend_tries 2;             # dave's first IMAP backend is stopped
    proxy_client_address on;           # the IMAP backends learn it with ID
    starttls on;                       # with a throwaway certificate
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{ listen 127.0.0.1:{imap}; protocol imap;
             imap_capabilities IMAP4rev1 IDLE LITERAL+ UIDPLUS;
             imap_auth plain login cram-md5 xoauth2 oauthbearer; }}
    server {{ listen 127.0.0.1:{pop3}; protocol pop3;
             pop3_auth plain apop cram-md5 xoauth2 oauthbearer; }}
    server {{ listen 127.0.0.1:{smtp}; protocol smtp;
             smtp_auth plain login cram-md5 xoauth2 oauthbearer;
             smtp_capabilities PIPELINING 8BITMIME "SIZE 10485760"; }}
}}
"""

BANNER = """\
mailproxy demo: a proxy, an auth service and in-memory mail backends on 127.0.0.1

  IMAP  127.0.0.1:{imap:<5}  ->  demo backend 127.0.0.1:{b_imap}
  POP3  127.0.0.1:{pop3:<5}  ->  demo backend 127.0.0.1:{b_pop3}
  SMTP  127.0.0.1:{smtp:<5}  ->  demo backend 127.0.0.1:{b_smtp} (XCLIENT)
  auth service  http://127.0.0.1:{auth}/auth   users: alice/wonderland, bob/builder
                bearer token for alice: demo-token-alice (XOAUTH2, OAUTHBEARER)
  OAuth bridge  carol/meadow logs in with a password; the proxy logs in with an
                access token (XOAUTH2) to the OAuth-only IMAP backend 127.0.0.1:{b_oauth},
                the auth service gets it from the token endpoint {token_url}
  failover      dave/diver: IMAP backends 127.0.0.1:{b_stopped} (stopped), then 127.0.0.1:{b_imap}
  client address  the IMAP backends learn it with ID (proxy_client_address on)
  configuration {conf}
  STARTTLS on all three, certificate {cert} (throwaway)

Try, in another terminal:
  curl 'imap://alice:wonderland@127.0.0.1:{imap}/INBOX;UID=1'
  curl pop3://alice:wonderland@127.0.0.1:{pop3}/
  printf 'Subject: hello\\r\\n\\r\\nHi Alice!\\r\\n' | curl smtp://127.0.0.1:{smtp} \\
      --user bob:builder --mail-from bob@demo.test --mail-rcpt alice@demo.test -T -
  curl --ssl-reqd --cacert {cert} 'imap://alice:wonderland@localhost:{imap}/INBOX;UID=2'
  curl --oauth2-bearer demo-token-alice 'imap://alice@127.0.0.1:{imap}/INBOX;UID=1'
  curl 'imap://carol:meadow@127.0.0.1:{imap}/INBOX;UID=1'
  curl 'imap://dave:diver@127.0.0.1:{imap}/INBOX;UID=1'
  curl 'imap://alice:wonderland@127.0.0.1:{imap}/' -X 'ID NIL'
Ctrl-C stops everything.
"""


def run(echo=print, install_signals=True, ready=None):
    """Start everything, serve until a signal, clean up; the exit status.
    `ready(ports)` is called once listening (tests use it)."""
    workdir = tempfile.mkdtemp(prefix="mailproxy-demo-")
    # carol's password is the auth service's alone: her backend takes tokens
    store = Mailstore(users=dict(USERS, **{OAUTH_USER: secrets.token_urlsafe(),
                                           FAILOVER_USER: FAILOVER_PASSWORD}))
    for user, count in (("alice", 2), (OAUTH_USER, 1), (FAILOVER_USER, 1)):
        store.seed(user, count)
    refresh_token = "demo-refresh-" + secrets.token_urlsafe(16)
    backends = start_backends(store)
    auth = provider = None
    try:
        provider = DemoProvider(store, {OAUTH_USER: refresh_token})
        stopped = _free_or(0)               # nothing listens there: a stopped backend
        auth = _start_auth_service(workdir, backends, provider, refresh_token, stopped)
        ports = {name: _free_or(port) for name, port in PREFERRED_PORTS.items()
                 if name != "auth"}
        ports["auth"] = auth.server_address[1]
        conf = os.path.join(workdir, "mail.conf")
        cert, key = throwaway_certificate(workdir)
        with open(conf, "w") as file:
            file.write(CONFIG.format(cert=cert, key=key, **ports))
        worker = Worker(configmod.load(conf, prefix=workdir))
        worker.open()
        _one_line_per_session(worker)
        if install_signals:
            worker.install_signals()
        shown = dict(b_imap=backends.imap_port, b_pop3=backends.pop3_port,
                     b_smtp=backends.smtp_port, b_oauth=provider.imap_port,
                     token_url=provider.token_url, b_stopped=stopped, **ports)
        echo(BANNER.format(conf=conf, cert=cert, **shown))
        if ready:
            ready(ports, worker)
        return worker.serve()
    finally:
        if auth:
            auth.shutdown()
            auth.server_close()
        backends.close()
        if provider:
            provider.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _start_auth_service(workdir, backends, provider, refresh_token, stopped):
    """The reference auth service, with {PLAIN} users so CRAM-MD5 and APOP
    work (curl picks CRAM-MD5 when offered); carol is an OAuth account of
    the demo provider, dave's IMAP backends are `stopped`, then the demo's."""
    path = os.path.join(workdir, "users.conf")
    ports = f"pop3=127.0.0.1:{backends.pop3_port} smtp=127.0.0.1:{backends.smtp_port}"
    with open(path, "w") as file:
        for login, password in USERS.items():
            bearer = f" bearer={TOKENS[login]}" if login in TOKENS else ""
            file.write(f"{login} {plain_secret(password)} "
                       f"imap=127.0.0.1:{backends.imap_port} {ports}{bearer}\n")
        file.write(f"{OAUTH_USER} {plain_secret(OAUTH_PASSWORD)} "
                   f"imap=127.0.0.1:{provider.imap_port} token-url={provider.token_url} "
                   f"client-id={CLIENT_ID} client-secret={CLIENT_SECRET} "
                   f"refresh-token={refresh_token} backend-auth=xoauth2\n")
        file.write(f"{FAILOVER_USER} {plain_secret(FAILOVER_PASSWORD)} imap=127.0.0.1:{stopped},"
                   f"127.0.0.1:{backends.imap_port} {ports}\n")
    service = AuthService(("127.0.0.1", _free_or(PREFERRED_PORTS["auth"])), path)
    threading.Thread(target=service.serve_forever, name="demo auth service",
                     daemon=True).start()
    return service


def throwaway_certificate(workdir):
    """A self-signed certificate for localhost and 127.0.0.1, valid a week:
    enough for STARTTLS in a demo, and clearly not for anything else."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailproxy demo")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    with open(cert_path, "wb") as file:
        file.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as file:
        file.write(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cert_path, key_path


def _free_or(port):
    """`port` if nobody uses it on loopback, else any free port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _SessionLines(logging.Filter):
    """Only the line that ends a session (and problems) reach the terminal."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or \
            str(record.msg).startswith(SHOWN)


def _one_line_per_session(worker):
    for handler in worker.destinations.handlers.values():
        handler.addFilter(_SessionLines())
