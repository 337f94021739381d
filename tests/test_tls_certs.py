"""Client certificates described as nginx describes them (issue 15, item 8).

OpenSSL is the oracle: `openssl x509 -nameopt RFC2253` prints the subject
and issuer nginx would send, `-serial` the serial.  The certificates are
the unusual ones real CAs have issued: multi-valued RDNs, attribute types
OpenSSL has no name for, and a PrintableString holding an "@" (an old
CAs' encoding bug that stricter parsers refuse); the last one also logs
in through a server with `ssl_verify_client on`.
"""

import datetime
import shutil
import ssl
import subprocess
import urllib.parse

import pytest

pytest.register_assert_rewrite("certs")
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from certs import Peer, client_context
from harness import free_port
from mailproxy import imap
from mailproxy.tls_certs import describe_certificate, escape_component, serial

pytest_plugins = ("proxying", "certs")

OPENSSL = shutil.which("openssl")
NOW = datetime.datetime.now(datetime.timezone.utc)


def issue(subject, certs, directory, stem, patch=None):
    """A client certificate for `subject` (an x509.Name), signed by the test
    CA; `patch` (old, new) replaces bytes of the signed part, which is
    then signed again: how to make an encoding cryptography refuses."""
    with open(certs.ca.key, "rb") as file:
        ca_key = serialization.load_pem_private_key(file.read(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(certs.ca.x509.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .sign(ca_key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    if patch:
        der = resign(cert, patch, ca_key)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_text(ssl.DER_cert_to_PEM_cert(der))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def resign(cert, patch, ca_key):
    """The certificate's DER with `patch` applied to its signed part, and
    the CA's signature over the result (RFC 5280 4.1)."""
    tbs = cert.tbs_certificate_bytes.replace(*patch)
    algorithm = der_item(cert.public_bytes(serialization.Encoding.DER), 1)
    signature = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return der_sequence(tbs + algorithm + b"\x03" + der_length(len(signature) + 1)
                        + b"\x00" + signature)


def der_item(der, index):
    """The index-th TLV inside the outer SEQUENCE of `der`."""
    pos = 1 + der_size(der, 1)[1]
    for _ in range(index + 1):
        start = pos
        length, size = der_size(der, pos + 1)
        pos += 1 + size + length
    return der[start:pos]


def der_size(der, pos):
    """(content length, bytes the length takes) at `pos`."""
    if der[pos] < 0x80:
        return der[pos], 1
    count = der[pos] & 0x7F
    return int.from_bytes(der[pos + 1:pos + 1 + count], "big"), 1 + count


def der_length(length):
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_sequence(content):
    return b"\x30" + der_length(len(content)) + content


def openssl_prints(path, what):
    done = subprocess.run([OPENSSL, "x509", "-noout", f"-{what}", "-nameopt", "RFC2253",
                           "-in", path], capture_output=True, text=True, timeout=10)
    return done.stdout.rstrip("\n").split("=", 1)[1]


def load(path):
    """A PEM certificate's DER."""
    with open(path) as file:
        return ssl.PEM_cert_to_DER_cert(file.read())   # cryptography refuses some


NAMES = {
    "multi-valued": x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE")]),
        x509.RelativeDistinguishedName([
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Mail"),
            x509.NameAttribute(NameOID.COMMON_NAME, "joe")])]),
    "unknown type": x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "joe"),
        x509.NameAttribute(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), "x+y")]),
    "printable @": x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        x509.NameAttribute(NameOID.COMMON_NAME, "joeXexample.org",
                           _type=_ASN1Type.PrintableString)]),
    "escapes": x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ' #Acme, "Inc" <a>; b\\c= '),
        x509.NameAttribute(NameOID.COMMON_NAME, "Zoë\x01")]),
}


# cryptography will not write a PrintableString with "@": the name is made
# with an "X" in its place, and the signed bytes are changed afterwards.
PATCHES = {"printable @": (b"joeXexample.org", b"joe@example.org")}


@pytest.mark.skipif(OPENSSL is None, reason="needs openssl")
@pytest.mark.parametrize("kind", sorted(NAMES))
def test_names_are_printed_as_openssl_prints_rfc2253(certs, tmp_path, kind):
    path, _ = issue(NAMES[kind], certs, tmp_path, "client", PATCHES.get(kind))
    headers = dict(describe_certificate(load(path)))
    assert headers["Auth-SSL-Subject"] == openssl_prints(path, "subject")
    assert headers["Auth-SSL-Issuer"] == openssl_prints(path, "issuer")


@pytest.mark.skipif(OPENSSL is None, reason="needs openssl")
def test_the_serial_is_printed_as_openssl_prints_it(certs):
    headers = dict(describe_certificate(load(certs.client.cert)))
    assert headers["Auth-SSL-Serial"] == openssl_prints(certs.client.cert, "serial")
    assert serial(-0x1234) == "-1234" and serial(0xABCDE) == "0ABCDE" and serial(0) == "00"


def test_the_pem_is_escaped_as_a_uri_component():
    assert escape_component(b"a+b/c=d e\n-._~") == "a%2Bb%2Fc%3Dd%20e%0A-._~"
    assert urllib.parse.unquote(escape_component(b"+/=")) == "+/="


def test_a_printable_string_with_an_at_sign_logs_in_with_verify_on(start_proxy, auth_service,
                                                                   certs, tmp_path):
    """A CA-signed certificate whose CN is a PrintableString holding "@":
    OpenSSL accepts it, so the session and the auth request work."""
    cert, key = issue(NAMES["printable @"], certs, tmp_path, "odd", PATCHES["printable @"])
    port = free_port()
    start_proxy([f"protocol imap; listen 127.0.0.1:{port} ssl;"], auth=auth_service.url,
                mail=f"ssl_certificate {certs.rsa.cert};\nssl_certificate_key {certs.rsa.key};\n"
                     f"ssl_verify_client on;\nssl_client_certificate {certs.ca.cert};\n")
    context = client_context(certs)
    context.load_cert_chain(cert, key)
    with Peer.connect(port) as peer:
        peer.starttls(context)
        assert peer.line() == imap.GREETING
        peer.send(b"a LOGIN joe secret\r\n")
        assert peer.line() == b"a NO no reply scripted\r\n"
    [request] = auth_service.requests
    assert request.header("Auth-SSL-Verify") == "SUCCESS"
    assert request.header("Auth-SSL-Subject") == "CN=joe@example.org,C=DE"
