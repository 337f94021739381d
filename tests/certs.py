"""Certificates for the TLS tests, made fresh for each test run.

A pytest plugin (test modules name it in `pytest_plugins`): the
session-scoped fixture `certs` writes, with the `cryptography` package, a
small PKI into a temporary directory and returns a `Certs` with the paths:

* `ca` and `other_ca`: two self-signed CAs (the second signs what must be
  refused);
* `rsa` and `ecdsa`: server certificates (RSA 2048 and ECDSA P-256) for
  `localhost` and `127.0.0.1`, signed by `ca`; `rsa_encrypted` is the RSA key
  encrypted with `PASSPHRASE`;
* `other_server`: a server certificate for the same names, signed by
  `other_ca` (a backend whose CA the proxy does not trust);
* `client`, `expired_client`, `stranger_client`: client certificates (CN joe)
  signed by `ca`, by `ca` but expired, and by `other_ca`; `named_client`, by
  `ca`, has a subject with non-ASCII letters and an emailAddress (how nginx
  prints a DN is OpenSSL's business, see UNUSUAL_SUBJECT); `revoked_client`
  is listed in `crl`, the CA's revocation list.

Each certificate is a `Pair` of PEM files (`cert`, `key`) with the parsed
certificate beside them, so tests compare headers with what was issued.

The TLS test modules share three small tools that go with the certificates:
`client_context` / `server_context` (how a test peer trusts this PKI),
`Peer` (a line-oriented test client or backend connection that can switch
to TLS in the middle, and notices any byte sent in clear text after the
STARTTLS reply) and `pump` (send and receive large payloads at once on ONE
thread: an SSL object must not be used by two threads, which is the very
rule the proxy's TlsChannel exists to keep).
"""

import base64
import datetime
import hashlib
import ipaddress
import select
import socket
import ssl
import time
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PASSPHRASE = "correct horse"
CLIENT_SERIAL = 0xC0FFEE123    # odd hex length: OpenSSL prints "0C0FFEE123", upper case
RSA_BITS = 2048
VALIDITY = datetime.timedelta(days=30)
NOW = datetime.datetime.now(datetime.timezone.utc)
IO_TIMEOUT = 10         # seconds any one read of a Peer may block
CHUNK = 65536           # bytes per send/recv of pump()
SELECT_STEP = 0.5       # seconds between two deadline checks in pump()


@dataclass(frozen=True)
class Pair:
    """A certificate and its key as PEM files, plus the parsed certificate."""
    cert: str
    key: str
    x509: x509.Certificate

    @property
    def der(self):
        return self.x509.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self):
        return self.x509.public_bytes(serialization.Encoding.PEM)

    def spki_sha256(self):
        """The proxy_ssl_pin value of this certificate's public key."""
        digest = hashes.Hash(hashes.SHA256())
        digest.update(self.x509.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        return "sha256:" + base64.b64encode(digest.finalize()).decode()


@dataclass(frozen=True)
class Certs:
    directory: str
    ca: Pair
    other_ca: Pair
    rsa: Pair
    rsa_encrypted: str          # the RSA key file, encrypted with PASSPHRASE
    ecdsa: Pair
    other_server: Pair
    client: Pair
    named_client: Pair
    expired_client: Pair
    stranger_client: Pair
    revoked_client: Pair
    crl: str                    # PEM CRL of `ca` that revokes `revoked_client`


def _unusual_subject():
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "PL"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Zażółć, Gęślą"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Łukasz"),
                      x509.NameAttribute(NameOID.EMAIL_ADDRESS, "lukasz@example.org")])


# How OpenSSL (and so nginx) prints that subject with XN_FLAG_RFC2253.
UNUSUAL_SUBJECT = (r"emailAddress=lukasz@example.org,CN=\C5\81ukasz,"
                   r"O=Za\C5\BC\C3\B3\C5\82\C4\87\, G\C4\99\C5\9Bl\C4\85,C=PL")


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Mailproxy Tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject, key, issuer=None, issuer_key=None, ca=False, server=False,
           not_before=NOW - datetime.timedelta(days=1), not_after=NOW + VALIDITY,
           serial=None):
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(serial or x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    elif server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if issuer:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(
        key.public_key()), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(directory, stem, cert, key, password=None):
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption = serialization.BestAvailableEncryption(password.encode()) if password \
        else serialization.NoEncryption()
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL
                                           if not password else
                                           serialization.PrivateFormat.PKCS8, encryption))
    return Pair(str(cert_path), str(key_path), cert)


def make_certs(directory):
    """Write the whole set into `directory` (a pathlib.Path); return Certs."""
    def ec_key():
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, other_ca_key = ec_key(), ec_key()
    ca = _issue(_name("Mailproxy Test CA"), ca_key, ca=True)
    other_ca = _issue(_name("Some Other CA"), other_ca_key, ca=True)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    server_key, other_key = ec_key(), ec_key()
    client_key = ec_key()
    rsa_cert = _issue(_name("localhost"), rsa_key, ca, ca_key, server=True)
    pairs = dict(
        ca=_write(directory, "ca", ca, ca_key),
        other_ca=_write(directory, "other-ca", other_ca, other_ca_key),
        rsa=_write(directory, "server-rsa", rsa_cert, rsa_key),
        ecdsa=_write(directory, "server-ecdsa",
                     _issue(_name("localhost"), server_key, ca, ca_key, server=True),
                     server_key),
        other_server=_write(directory, "other-server",
                            _issue(_name("localhost"), other_key, other_ca, other_ca_key,
                                   server=True), other_key),
        client=_write(directory, "client", _issue(_name("joe"), client_key, ca, ca_key,
                                                  serial=CLIENT_SERIAL), client_key),
        named_client=_write(directory, "named-client",
                            _issue(_unusual_subject(), client_key, ca, ca_key), client_key),
        expired_client=_write(directory, "expired-client",
                              _issue(_name("joe"), client_key, ca, ca_key,
                                     not_before=NOW - 2 * VALIDITY,
                                     not_after=NOW - VALIDITY), client_key),
        stranger_client=_write(directory, "stranger-client",
                               _issue(_name("joe"), client_key, other_ca, other_ca_key),
                               client_key))
    pairs["revoked_client"] = _write(directory, "revoked-client",
                                     _issue(_name("joe"), client_key, ca, ca_key), client_key)
    encrypted = _write(directory, "server-rsa-encrypted", rsa_cert, rsa_key, PASSPHRASE)
    crl = directory / "ca.crl"
    crl.write_bytes(_revocation_list(ca, ca_key, pairs["revoked_client"].x509)
                    .public_bytes(serialization.Encoding.PEM))
    return Certs(directory=str(directory), rsa_encrypted=encrypted.key, crl=str(crl), **pairs)


def issue_chain(certs, directory, server=False):
    """A certificate two intermediate CAs below `certs.ca` (for a server:
    localhost's): (the file with it and both intermediates, the key file)."""
    with open(certs.ca.key, "rb") as file:
        ca_key = serialization.load_pem_private_key(file.read(), None)
    upper_key, lower_key, key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    upper = _issue(_name("Mailproxy Upper CA"), upper_key, certs.ca.x509, ca_key, ca=True)
    lower = _issue(_name("Mailproxy Lower CA"), lower_key, upper, upper_key, ca=True)
    leaf = _write(directory, "leaf", _issue(_name("localhost" if server else "joe"), key,
                                            lower, lower_key, server=server), key)
    chain = directory / "chain.crt"
    chain.write_bytes(leaf.pem + b"".join(ca.public_bytes(serialization.Encoding.PEM)
                                          for ca in (lower, upper)))
    return str(chain), leaf.key


def issue_named(certs, directory, common_name, dns_names):
    """A server certificate signed by `certs.ca` for `common_name`, whose
    subjectAltName lists `dns_names`: the Pair (files in `directory`)."""
    with open(certs.ca.key, "rb") as file:
        ca_key = serialization.load_pem_private_key(file.read(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(certs.ca.x509.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)
                                                        for name in dns_names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _write(directory, common_name.replace("*", "star"), cert, key)


def _revocation_list(ca, ca_key, revoked):
    entry = (x509.RevokedCertificateBuilder().serial_number(revoked.serial_number)
             .revocation_date(NOW - datetime.timedelta(hours=1)).build())
    return (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
            .last_update(NOW - datetime.timedelta(hours=1)).next_update(NOW + VALIDITY)
            .add_revoked_certificate(entry).sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """The test PKI (see the module docstring), made once per run."""
    return make_certs(tmp_path_factory.mktemp("certs"))


# ------------------------------------------------------------ contexts

def client_context(certs, cert=None, maximum=None, ciphers=None, alpn=None):
    """A client's SSLContext that trusts `certs.ca` and checks the name;
    `cert` (a Pair) is the client certificate to offer."""
    context = ssl.create_default_context(cafile=certs.ca.cert)
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def server_context(pair, client_ca=None):
    """A test backend's SSLContext serving `pair`; with `client_ca` it asks
    for (and requires) a client certificate signed by that CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        context.load_verify_locations(client_ca.cert)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# ------------------------------------------------------------ peers

class Peer:
    """One end of a test conversation: lines in and out, then TLS.

    Reads go through our own buffer, so `starttls()` can prove that
    nothing at all followed the STARTTLS reply in clear text (an injected
    command that was answered would show up there)."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    @classmethod
    def connect(cls, port, host="127.0.0.1", timeout=IO_TIMEOUT):
        return cls(socket.create_connection((host, port), timeout=timeout))

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        """One line, LF included; what is left (b"" at once) at EOF."""
        while b"\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                rest, self.buffer = self.buffer, b""
                return rest
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def lines(self, count):
        return [self.line() for _ in range(count)]

    def closed(self):
        """True if the other end closed (EOF, reset or a TLS alert)."""
        try:
            return self.line() == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def starttls(self, context, hostname="localhost", server_side=False):
        """Handshake on this connection; nothing may be buffered before it."""
        assert self.buffer == b"", f"clear-text bytes before the handshake: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_side=server_side,
                                        server_hostname=None if server_side else hostname)
        return self.sock

    def take_buffer(self):
        data, self.buffer = self.buffer, b""
        return data

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pump(sock, outgoing, expected, timeout, received=b""):
    """Send `outgoing` and receive `expected` bytes at the same time, on
    one thread (select + non-blocking I/O: an SSLSocket must not be shared
    between threads).  `received` is what arrived before (a Peer's buffer).
    Returns the SHA-256 hex digest of everything received."""
    deadline = time.monotonic() + timeout
    digest = hashlib.sha256(received)
    count, sent, view = len(received), 0, memoryview(outgoing)
    sock.setblocking(False)
    try:
        while sent < len(view) or count < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pump: sent {sent} of {len(view)}, "
                                   f"received {count} of {expected}")
            writers = [sock] if sent < len(view) else []
            buffered = getattr(sock, "pending", lambda: 0)()
            readable, writable, _ = select.select([sock], writers, [],
                                                  0 if buffered else SELECT_STEP)
            if (readable or buffered) and count < expected:
                data = _nonblocking(sock.recv, CHUNK)
                if data == b"":
                    raise EOFError(f"pump: EOF after {count} of {expected} bytes")
                if data:
                    digest.update(data)
                    count += len(data)
            if writable:
                sent += _nonblocking(sock.send, view[sent:sent + CHUNK]) or 0
    finally:
        sock.settimeout(IO_TIMEOUT)
    return digest.hexdigest()


def _nonblocking(call, argument):
    try:
        return call(argument)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return None
