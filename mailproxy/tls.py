"""TLS: a connection object two threads may share, and the ssl contexts.

Why not `ssl.SSLSocket`?  After login the relay runs two threads over the
client connection, one reading and one writing.  OpenSSL forbids using one
SSL object from two threads at once, and an SSLSocket gives no way to
serialise the two without also serialising the blocking socket calls (a
reader waiting for the client would stall the writer).  So `TlsChannel`
keeps the SSL state machine in memory (`ssl.SSLObject` between two
`MemoryBIO`s), touches it only under `lock`, and does the socket I/O
outside the lock:

    reader: raw recv (no lock) -> [lock] feed incoming BIO, SSL_read [unlock]
    writer: [send_lock [lock] SSL_write, take outgoing BIO [unlock] raw send]

`send_lock` makes TLS records leave in the order OpenSSL made them, even
when the reader produced some (a TLS 1.3 KeyUpdate answer, session
tickets); the reader never blocks on it (see `_flush`).

The channel looks like a blocking socket with a timeout to stream.py and
relay.py: recv, sendall, settimeout, fileno, shutdown, close, plus
`pending()` for decrypted bytes that poll() cannot see.  The socket under
it is a blocking socket too, and `settimeout()` is passed on to it: every
raw recv and send waits at most that long, and raises TimeoutError.  After
login the relay's two threads share that one timeout (proxy_timeout).
"""

import base64
import hashlib
import socket
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .auth_http import escape

CHUNK = 65536           # raw bytes per recv: up to four full TLS records
# OpenSSL's short names where RFC 4514 has none: nginx prints DNs with
# X509_NAME_print_ex(XN_FLAG_RFC2253), and auth services match that text.
OPENSSL_NAMES = {NameOID.EMAIL_ADDRESS: "emailAddress", NameOID.SERIAL_NUMBER: "serialNumber",
                 NameOID.STREET_ADDRESS: "street", NameOID.GIVEN_NAME: "GN",
                 NameOID.SURNAME: "SN", NameOID.TITLE: "title",
                 NameOID.POSTAL_CODE: "postalCode", NameOID.PSEUDONYM: "pseudonym",
                 NameOID.INITIALS: "initials", NameOID.DN_QUALIFIER: "dnQualifier",
                 NameOID.GENERATION_QUALIFIER: "generationQualifier",
                 NameOID.BUSINESS_CATEGORY: "businessCategory",
                 NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionC",
                 NameOID.UNSTRUCTURED_NAME: "unstructuredName",
                 NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier"}


class TlsChannel:
    """TLS over a connected socket (server or client side)."""

    def __init__(self, sock, context, server_side, server_hostname=None):
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.lock = threading.Lock()        # the SSLObject: one thread at a time
        self.send_lock = threading.Lock()   # outgoing records keep their order
        self.plain = bytearray()            # decrypted early by shutdown(), not yet read

    # ------------------------------------------------------------ socket-like

    def settimeout(self, seconds):
        self.sock.settimeout(seconds)

    def gettimeout(self):
        return self.sock.gettimeout()

    def fileno(self):
        return self.sock.fileno()

    def getsockname(self):
        return self.sock.getsockname()

    def setsockopt(self, *args):
        self.sock.setsockopt(*args)

    def close(self):
        self.sock.close()

    def handshake(self):
        """Run the handshake to the end (each wait at most the timeout)."""
        while True:
            error = None
            with self.lock:
                try:
                    self.tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLError as exc:
                    error = exc
            self._flush()               # the alert too, when the handshake failed
            if error:
                raise error
            if done:
                return
            if not self._feed():
                raise ConnectionResetError("peer closed the connection during the TLS handshake")

    def recv(self, size):
        """Up to `size` decrypted bytes; b"" at the end of the stream."""
        while True:
            with self.lock:
                if self.plain:          # set aside by shutdown(): these come first
                    data = bytes(self.plain[:size])
                    del self.plain[:size]
                    return data
                try:
                    data = self.tls.read(size)
                except ssl.SSLWantReadError:
                    data = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""          # close_notify, or EOF without one
            self._flush()               # a read may have produced records to send
            if data is not None:
                return data
            if not self._feed():
                with self.lock:
                    self.incoming.write_eof()

    def sendall(self, data):
        with self.send_lock:
            with self.lock:
                self.tls.write(data)    # a memory BIO never asks to wait
                out = self.outgoing.read()
            self.sock.sendall(out)
        self._flush()                   # what a reader queued meanwhile

    def pending(self):
        """Bytes already received that a poll() on the socket would miss."""
        with self.lock:
            return len(self.plain) + self.tls.pending() + self.incoming.pending

    def shutdown(self, how):
        """SHUT_WR is a half-close: close_notify (RFC 8446 6.1), sent in
        order with the other records and before the FIN, while the peer may
        still send.  OpenSSL's shutdown fails on application data it finds
        already received, and that data would be lost: so complete records
        are decrypted first and kept for recv(), and the bytes of a partial
        record are set aside around it.  SHUT_RDWR is a hard stop: no
        close_notify, and no waiting behind a blocked writer."""
        if how != socket.SHUT_WR:
            self.sock.shutdown(how)
            return
        with self.send_lock:
            with self.lock:
                self._decrypt_received()
                partial = self.incoming.read()
                try:
                    self.tls.unwrap()
                except (ssl.SSLError, ValueError):
                    pass                # want-read: the peer's close_notify is not awaited
                if partial:
                    self.incoming.write(partial)
                out = self.outgoing.read()
            try:
                self.sock.sendall(out)
            except OSError:
                pass
            self.sock.shutdown(how)

    def _decrypt_received(self):
        """Move every complete record already received into `plain`
        (called with `lock` held)."""
        while True:
            try:
                data = self.tls.read(CHUNK)
            except ssl.SSLError:
                return                  # want-read, or the stream has ended
            if not data:
                return
            self.plain += data

    # ---------------------------------------------------------- the pumps

    def _feed(self):
        """One raw recv into the incoming BIO (at most the timeout, else
        TimeoutError); False at EOF."""
        data = self.sock.recv(CHUNK)
        with self.lock:
            if data:
                self.incoming.write(data)
        return bool(data)

    def _flush(self):
        """Send what OpenSSL has queued, unless another thread is sending:
        that thread flushes again after letting go of `send_lock`, so a
        reader never waits behind a writer blocked on a full socket (two
        such waits, one per peer, would be a deadlock)."""
        while self._queued():
            if not self.send_lock.acquire(blocking=False):
                return
            try:
                with self.lock:
                    out = self.outgoing.read()
                self.sock.sendall(out)
            finally:
                self.send_lock.release()

    def _queued(self):
        with self.lock:
            return self.outgoing.pending

    # ------------------------------------------------------- for the logs

    @property
    def version(self):
        return self.tls.version()

    @property
    def cipher(self):
        cipher = self.tls.cipher()
        return cipher[0] if cipher else None

    def peer_certificate(self, binary=True):
        return self.tls.getpeercert(binary_form=binary)


# ---------------------------------------------------------------- contexts

VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
            "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsSetupError(Exception):
    """A TLS setting cannot be applied; `directive` names the culprit."""

    def __init__(self, directive, message):
        super().__init__(message)
        self.directive = directive


def server_context(config):
    """The listener-side SSLContext of one server{} (spec 1.9, 5)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _versions(context, config.ssl_protocols, "ssl_protocols")
    _ciphers(context, config.ssl_ciphers, "ssl_ciphers")
    passwords = _passwords(config.ssl_password_file)
    for cert, key in zip(config.ssl_certificate, config.ssl_certificate_key):
        _load_chain(context, cert, key, passwords)
    if config.ssl_prefer_server_ciphers:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:                       # Python turns it on by default; nginx's default is off
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if not config.ssl_session_tickets:
        context.options |= ssl.OP_NO_TICKET
    if config.ssl_dhparam:
        _apply("ssl_dhparam", context.load_dh_params, config.ssl_dhparam)
    if config.ssl_ecdh_curve != "auto":
        _apply("ssl_ecdh_curve", context.set_ecdh_curve, config.ssl_ecdh_curve)
    context.set_alpn_protocols([config.protocol])
    _client_verification(context, config)
    return context


def _client_verification(context, config):
    """ssl_verify_client: the handshake asks for a certificate; the session
    refuses afterwards if `on` and none came (spec 5.3)."""
    if config.ssl_verify_client == "off":
        return
    for directive in ("ssl_client_certificate", "ssl_trusted_certificate"):
        path = getattr(config, directive)
        if path:
            _apply(directive, context.load_verify_locations, path)
    if config.ssl_crl:
        _apply("ssl_crl", context.load_verify_locations, config.ssl_crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN    # as nginx: every certificate
    context.verify_mode = ssl.CERT_OPTIONAL


def _versions(context, names, directive):
    unknown = [name for name in names if name not in VERSIONS]
    if unknown:
        raise TlsSetupError(directive, f'"{unknown[0]}" is not supported by this OpenSSL')
    chosen = sorted(VERSIONS[name] for name in names)
    if chosen[-1] - chosen[0] != len(chosen) - 1:
        raise TlsSetupError(directive, "versions with a gap between them are not supported "
                            "(Python's ssl module sets only the lowest and the highest)")
    try:
        context.minimum_version, context.maximum_version = chosen[0], chosen[-1]
    except (ValueError, ssl.SSLError) as exc:
        raise TlsSetupError(directive, str(exc)) from None


def _ciphers(context, ciphers, directive):
    _apply(directive, context.set_ciphers, ciphers)


def _passwords(path):
    """ssl_password_file: one passphrase per line, tried in turn.  Without
    one, an empty passphrase: with None OpenSSL would ask on the terminal,
    which nginx never does."""
    if not path:
        return [""]
    try:
        with open(path, encoding="utf-8") as file:
            return [line.rstrip("\r\n") for line in file if line.rstrip("\r\n")] or [""]
    except OSError as exc:
        raise TlsSetupError("ssl_password_file", f'open() "{path}" failed ({exc.strerror})') \
            from None


def _load_chain(context, cert, key, passwords):
    for password in passwords:
        try:
            context.load_cert_chain(cert, key, password=password)
            return
        except ssl.SSLError as exc:
            error = exc
        except OSError as exc:
            raise TlsSetupError("ssl_certificate", f'cannot load certificate "{cert}" or key '
                                f'"{key}": {exc.strerror}') from None
    raise TlsSetupError("ssl_certificate_key", f'cannot load certificate "{cert}" with key '
                        f'"{key}": {error.reason or error}')


def _apply(directive, method, *args):
    try:
        method(*args)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or \
            (exc.args[-1] if exc.args else exc)
        raise TlsSetupError(directive, f'"{args[0]}": {reason}') from None


# ----------------------------------------------------- certificate details

def certificate_headers(channel, verify_mode, pass_cert):
    """The Auth-SSL-* request headers for a TLS client (spec 2.2)."""
    headers = [("Auth-SSL", "on")]
    if channel.version:
        headers.append(("Auth-SSL-Protocol", channel.version))
    if channel.cipher:
        headers.append(("Auth-SSL-Cipher", channel.cipher))
    if verify_mode == "off":
        return headers
    der = channel.peer_certificate()
    headers.append(("Auth-SSL-Verify", "SUCCESS" if der else "NONE"))
    if der:
        headers += describe_certificate(der, pass_cert)
    return headers


def describe_certificate(der, pass_cert=False):
    """Subject, Issuer (RFC 2253/4514), Serial (hex), Fingerprint (SHA-1),
    and with auth_http_pass_client_cert the PEM (escaped by auth_http)."""
    cert = x509.load_der_x509_certificate(der)
    headers = [("Auth-SSL-Subject", _rfc2253(cert.subject)),
               ("Auth-SSL-Issuer", _rfc2253(cert.issuer)),
               ("Auth-SSL-Serial", _serial(cert.serial_number)),
               ("Auth-SSL-Fingerprint", hashlib.sha1(der).hexdigest())]
    if pass_cert:
        headers.append(("Auth-SSL-Cert", escape(ssl.DER_cert_to_PEM_cert(der).encode())))
    return headers


def _rfc2253(name):
    """A DN as OpenSSL prints it for nginx: RFC 4514 order and escapes,
    OpenSSL's attribute names, and each byte of a control or non-ASCII
    character as \\XX (ASN1_STRFLGS_ESC_CTRL | ESC_MSB), so the header
    is plain ASCII whatever the certificate holds."""
    text = name.rfc4514_string(OPENSSL_NAMES)
    return "".join(char if " " <= char < "\x7f" else
                   "".join(f"\\{byte:02X}" for byte in char.encode()) for char in text)


def _serial(number):
    """The serial as OpenSSL prints it (i2a_ASN1_INTEGER): upper-case hex,
    two digits per byte, so 0xABCDE is "0ABCDE" as nginx sends it."""
    digits = format(number, "X")
    return digits.zfill(len(digits) + len(digits) % 2)


def backend_context(config):
    """The SSLContext toward backends (beyond nginx): proxy_ssl_* settings."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _versions(context, config.proxy_ssl_protocols, "proxy_ssl_protocols")
    _ciphers(context, config.proxy_ssl_ciphers, "proxy_ssl_ciphers")
    if config.proxy_ssl_verify:
        if config.proxy_ssl_trusted_certificate:
            _apply("proxy_ssl_trusted_certificate", context.load_verify_locations,
                   config.proxy_ssl_trusted_certificate)
        else:
            context.load_default_certs()
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.proxy_ssl_certificate:
        key = config.proxy_ssl_certificate_key or config.proxy_ssl_certificate
        try:
            context.load_cert_chain(config.proxy_ssl_certificate, key)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or \
            (exc.args[-1] if exc.args else exc)
            raise TlsSetupError("proxy_ssl_certificate", f'cannot load certificate '
                                f'"{config.proxy_ssl_certificate}": {reason}') from None
    return context


class BackendTls:
    """How one server{} talks TLS to its backends: the context, the name to
    verify (and send as SNI), and the public-key pins."""

    def __init__(self, config):
        self.context = backend_context(config)
        self.implicit = config.proxy_ssl            # else STARTTLS (proxy_starttls)
        self.verify = config.proxy_ssl_verify
        self.name = config.proxy_ssl_name
        self.sni = config.proxy_ssl_server_name
        self.pins = set(config.proxy_ssl_pin)

    def channel(self, sock, address):
        """A client-side TlsChannel for a backend at `address`."""
        name = self.name or address
        hostname = name if (self.verify or self.sni) else None
        return TlsChannel(sock, self.context, server_side=False, server_hostname=hostname)

    def check_pin(self, channel):
        """proxy_ssl_pin: the backend's public key must be one of the pins;
        a small site's self-signed backend stays protected this way."""
        if not self.pins:
            return None
        cert = x509.load_der_x509_certificate(channel.peer_certificate())
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        if hashlib.sha256(spki).digest() in self.pins:
            return None
        return "upstream SSL certificate does not match proxy_ssl_pin (key sha256:" \
               f"{base64.b64encode(hashlib.sha256(spki).digest()).decode()})"
