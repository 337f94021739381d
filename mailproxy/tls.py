"""TLS: a connection object two threads may share, over pyOpenSSL.

Why a channel and not a TLS socket?  After login the relay runs two threads
over the client connection, one reading and one writing.  OpenSSL forbids
using one SSL object from two threads at once, and a TLS socket gives no way
to serialise the two without also serialising the blocking socket calls (a
reader waiting for the client would stall the writer).  So `TlsChannel`
keeps the SSL state machine in memory (an `OpenSSL.SSL.Connection` with
memory BIOs, as Twisted's TLS layer drives it), touches it only under
`lock`, and does the socket I/O outside the lock:

    reader: raw recv (no lock) -> [lock] feed the BIO, SSL_read [unlock]
    writer: [send_lock [lock] SSL_write, take the records [unlock] raw send]

`send_lock` makes TLS records leave in the order OpenSSL made them, even
when the reader produced some (a TLS 1.3 KeyUpdate answer, session
tickets); the reader never blocks on it (see `_flush`).

The channel looks like a blocking socket with a timeout to stream.py and
relay.py: recv, sendall, settimeout, fileno, shutdown, close, plus
`pending()` for decrypted bytes that poll() cannot see.  `settimeout()`
bounds each call as a whole, however many raw reads and writes it takes
(a handshake is many): one deadline per call, as a socket's timeout is
one per call, so a peer that trickles a ClientHello a byte at a time is
cut at `timeout` as a clear-text one is.  After login the relay's two
threads share one timeout (proxy_timeout) and each call has its own
deadline.

Why pyOpenSSL (the decision, on evidence).  The standard `ssl` module
cannot express nginx's session cache modes and lifetime, curve lists,
verification that completes the handshake and is judged afterwards
(`optional_no_ca`, nginx's certificate-error replies), the CA names of the
CertificateRequest, or a verify depth.  pyOpenSSL (pyca, the maintainers of
`cryptography`) publishes all of these: set_session_cache_mode,
set_timeout, set_verify with a callback, set_verify_depth,
set_client_ca_list/load_client_ca, load_tmp_dh, set_tls13_ciphersuites,
set_min/max_proto_version, and memory BIOs.  It publishes no groups list,
no verify result (nor its text) and no host name check for the client
side; those calls go through `cryptography`'s bindings, all in the one
commented place at the end of this module.  SSL_CONF and ticket keys are not in the
bindings at all: tls_context.py maps the SSL_CONF commands real
configurations use onto published calls, and ticket key files draw a
[warn].  pyOpenSSL uses the OpenSSL inside `cryptography`'s wheel, not the
system's libssl; nothing here mixes the two.  The same stack serves the
backend side (proxy_ssl), so one channel class serves both directions.
"""

import socket
import ssl
import threading
import time

import OpenSSL
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi, lib as _lib     # see "cryptography's bindings" below

from .stream import readable

CHUNK = 65536           # raw bytes per recv: up to four full TLS records
CLOSED = SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN
NO_ALPN = "no application protocol"     # the ALPN callback's mark (tls_context.py)


class TlsError(ssl.SSLError):
    """A TLS failure.  An `ssl.SSLError`, so callers that catch a TLS
    socket's errors catch the channel's; `reason` is OpenSSL's text."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class TlsVerifyError(ssl.SSLCertVerificationError):
    """The peer's certificate failed verification (client side)."""

    def __init__(self, message):
        super().__init__(message)
        self.reason = "certificate verify failed"
        self.verify_message = message


class TlsChannel:
    """TLS over a connected socket (server or client side).

    `received` is what was read from the peer before (hello.py reads a
    client's ClientHello to pick the context): OpenSSL reads it first.
    After the handshake, `verify_error` is None or (code, text): OpenSSL's
    verify result, which a resumed session (or ticket) carries too."""

    def __init__(self, sock, context, server_side, server_hostname=None, received=b""):
        self.sock = sock
        self.tls = SSL.Connection(context, None)        # None: memory BIOs
        if received:                # read from the peer already (hello.py)
            self.tls.bio_write(received)
        if server_side:
            self.tls.set_accept_state()
        else:
            self.tls.set_connect_state()
            if server_hostname:
                self.tls.set_tlsext_host_name(server_hostname.encode("idna"))
        self.lock = threading.Lock()        # the Connection: one thread at a time
        self.send_lock = threading.Lock()   # outgoing records keep their order
        self.out = bytearray()              # records made, not yet sent
        self.timeout = sock.gettimeout()
        self.raw_unread = bool(received)    # fed bytes OpenSSL may not have decrypted yet
        self.raw_eof = False                # the peer's FIN came (with or without close_notify)
        self.expected_host = None           # the backend name checked (expect_host)
        self.keep_session = True            # False: let OpenSSL forget the session

    # ------------------------------------------------------------ socket-like

    def settimeout(self, seconds):
        """Each later call (recv, sendall, handshake, shutdown) takes at
        most `seconds` in all (None: no limit)."""
        self.timeout = seconds

    def gettimeout(self):
        return self.timeout

    def fileno(self):
        return self.sock.fileno()

    def getsockname(self):
        return self.sock.getsockname()

    def setsockopt(self, *args):
        self.sock.setsockopt(*args)

    def close(self):
        """Close the socket.  Unless told to forget it, the session stays
        resumable: OpenSSL drops the session of a connection freed without
        a shutdown mark."""
        if self.keep_session:
            with self.lock:
                self.tls.set_shutdown(self.tls.get_shutdown() | CLOSED)
        self.sock.close()

    def handshake(self):
        """Run the handshake to the end, within the timeout."""
        deadline = self._deadline()
        while True:
            error, done = None, False
            with self.lock:
                try:
                    self.tls.do_handshake()
                    done = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as exc:
                    error = exc
                self._drain()
            self._flush(deadline)           # the alert too, when the handshake failed
            if error:
                raise self._failure(error)
            if done and self.tls.get_app_data() == NO_ALPN:
                raise TlsError(NO_ALPN)
            if done:
                return
            if not self._feed(deadline):
                raise ConnectionResetError("peer closed the connection during the TLS handshake")

    def recv(self, size):
        """Up to `size` decrypted bytes; b"" at the end of the stream: the
        peer's close_notify, or a bare FIN.  A bare FIN is not fed to
        OpenSSL, which would count it as an error and refuse to write: the
        way back stays open, as a clear-text half-close leaves it."""
        deadline = self._deadline()
        while True:
            with self.lock:
                try:
                    data = self._read(size)
                    error = None
                except SSL.Error as exc:
                    data, error = None, exc
                self._drain()
            self._flush(deadline)           # a read may have produced records to send
            if error:
                raise self._failure(error)
            if data is not None:
                return data
            if self.raw_eof or not self._feed(deadline):
                self.raw_eof = True
                return b""

    def _read(self, size):
        """SSL_read (with `lock` held): bytes, b"" at close_notify, None
        when OpenSSL needs more."""
        try:
            return self.tls.recv(size)
        except SSL.WantReadError:
            self.raw_unread = False
            return None
        except SSL.ZeroReturnError:
            return b""

    def sendall(self, data):
        deadline = self._deadline()
        with self.send_lock:
            with self.lock:
                try:
                    self.tls.sendall(data)  # a memory BIO never asks to wait
                except SSL.Error as exc:
                    raise self._failure(exc) from None
                self._drain()
                out = self._take()
            self._send_raw(out, deadline)
        self._flush(deadline)               # what a reader queued meanwhile

    def pending(self):
        """Decrypted bytes already received, which a poll() on the socket
        would miss.  Raw bytes OpenSSL has not looked at yet are peeked
        at first (SSL_peek): a record's tail still on its way is no byte."""
        with self.lock:
            if self.raw_unread:
                try:
                    self.tls.recv(1, socket.MSG_PEEK)
                except SSL.WantReadError:
                    self.raw_unread = False
                except SSL.Error:
                    pass                # the next recv() reports the end or the error
                self._drain()           # sent by the next call's flush
            return self.tls.pending() + int(self.raw_unread)

    def shutdown(self, how):
        """SHUT_WR is a half-close: close_notify (RFC 8446 6.1), sent in
        order with the other records and before the FIN, while the peer may
        still send: one SSL_shutdown call, which sends and does not read,
        so records already received stay readable.  SHUT_RDWR is a hard
        stop: no close_notify, and no waiting behind a blocked writer."""
        if how != socket.SHUT_WR:
            self.sock.shutdown(how)
            return
        deadline = self._deadline()
        with self.send_lock:
            with self.lock:
                try:
                    self.tls.shutdown()
                except SSL.Error:
                    pass                # a broken or unfinished connection: just the FIN
                self._drain()
                out = self._take()
            try:
                self._send_raw(out, deadline)
            except OSError:
                pass
            self.sock.shutdown(how)

    # ---------------------------------------------------------- the pumps

    def _deadline(self):
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _arm(self, deadline):
        """Give the socket what is left of `deadline` (TimeoutError if none)."""
        if deadline is None:
            self.sock.settimeout(None)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("TLS deadline passed")
        self.sock.settimeout(left)

    def _feed(self, deadline):
        """One raw recv into OpenSSL (within the deadline, else
        TimeoutError); False at EOF.  The bytes are waited for first:
        a recv() that blocks holds its CHUNK-byte buffer all the while."""
        self._arm(deadline)
        if not readable(self.sock, self.sock.gettimeout()):
            raise TimeoutError("TLS deadline passed")
        data = self.sock.recv(CHUNK)
        if data:
            with self.lock:
                self.tls.bio_write(data)
                self.raw_unread = True
        return bool(data)

    def _send_raw(self, data, deadline):
        if data:
            self._arm(deadline)
            self.sock.sendall(data)

    def _drain(self):
        """Move the records OpenSSL made into `out` (with `lock` held)."""
        while True:
            try:
                self.out += self.tls.bio_read(CHUNK)
            except SSL.WantReadError:
                return

    def _take(self):
        data = bytes(self.out)
        self.out.clear()
        return data

    def _flush(self, deadline):
        """Send what OpenSSL has queued, unless another thread is sending:
        that thread flushes again after letting go of `send_lock`, so a
        reader never waits behind a writer blocked on a full socket (two
        such waits, one per peer, would be a deadlock)."""
        while self._queued():
            if not self.send_lock.acquire(blocking=False):
                return
            try:
                with self.lock:
                    out = self._take()
                self._send_raw(out, deadline)
            finally:
                self.send_lock.release()

    def _queued(self):
        with self.lock:
            return len(self.out)

    def _failure(self, exc):
        """The ssl.SSLError to raise for a pyOpenSSL error."""
        reason = describe(exc)
        if reason == "certificate verify failed" and self.verify_error:
            return TlsVerifyError(self.verify_error[1])
        return TlsError(reason)

    @property
    def verify_error(self):
        code = verify_result(self)
        return None if code == 0 else (code, verify_error_text(code, self.expected_host))

    # ------------------------------------------------------- for the logs

    @property
    def version(self):
        name = self.tls.get_protocol_version_name()
        return None if name == "Unknown" else name

    @property
    def cipher(self):
        return self.tls.get_cipher_name()

    def peer_certificate(self, binary=True):
        """The peer's certificate as DER (None if it sent none)."""
        cert = self.tls.get_peer_certificate()
        return None if cert is None else crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)

    def peer_x509(self):
        """The peer's certificate as pyOpenSSL's X509 (OpenSSL's parse)."""
        return self.tls.get_peer_certificate()


def library_version():
    """What -V prints: the TLS library and the OpenSSL it runs on (the one
    in cryptography's wheel, not the system's), as nginx names its OpenSSL."""
    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    return f"pyOpenSSL {OpenSSL.__version__} with {openssl}"


def describe(exc):
    """OpenSSL's reason text for a pyOpenSSL error."""
    if isinstance(exc, SSL.SysCallError):
        return "unexpected eof while reading" if exc.args[0] == -1 else str(exc.args[-1])
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    return errors[-1][2] if errors and errors[-1][2] else str(exc) or "unknown error"


# -------------------------------------------- cryptography's bindings
# The one place that reaches past pyOpenSSL's published API, into the
# OpenSSL functions `cryptography` binds (`OpenSSL._util.lib`) and
# pyOpenSSL's own handles to them (`_context`, `_ssl`).  Calls that
# pyOpenSSL does not publish and nginx's directives need:
#   SSL_CTX_set1_curves_list       ssl_ecdh_curve lists, SSL_CONF Groups/Curves
#   SSL_CTX_set_verify             with nginx's callback, which always goes on
#                                  and keeps the error: pyOpenSSL's wrapper
#                                  clears it, so no resumed session would know
#   SSL_get_verify_result          the verdict after the handshake, also of a
#                                  resumed session (a callback sees only new ones)
#   X509_verify_cert_error_string  its text: FAILED:<reason> (Auth-SSL-Verify)
#   X509_VERIFY_PARAM_set1_host/ip proxy_ssl_verify's name check, in the handshake
# Nothing else in mailproxy imports `OpenSSL._util`.

def set_groups(context, groups):
    """The key exchange groups, a colon-separated list (SSL_CTX_set1_groups_list)."""
    if not _lib.SSL_CTX_set1_curves_list(context._context, groups.encode()):
        _lib.ERR_clear_error()          # or a later pyOpenSSL call would report it
        raise ValueError(f'SSL_CTX_set1_groups_list("{groups}") failed')


@_ffi.callback("int (*)(int, X509_STORE_CTX *)")
def _go_on(ok, store):
    return 1


def verify_and_go_on(context, mode):
    """Ask for the peer's certificate; whatever fails, the handshake goes
    on, and the failure stays the verify result (nginx's callback)."""
    _lib.SSL_CTX_set_verify(context._context, mode, _go_on)


def verify_result(channel):
    """OpenSSL's verify result code (0: none, or it verified)."""
    return _lib.SSL_get_verify_result(channel.tls._ssl)


def verify_error_text(code, host=None):
    """OpenSSL's text for a verify error code, as nginx logs and sends it;
    a host name mismatch in the words Python's ssl used for it."""
    if code == _lib.X509_V_ERR_HOSTNAME_MISMATCH and host:
        return f"Hostname mismatch, certificate is not valid for '{host}'."
    return _ffi.string(_lib.X509_verify_cert_error_string(code)).decode()


def expect_host(channel, name, is_address):
    """Make the handshake check that the peer's certificate is for `name`."""
    param = _lib.SSL_get0_param(channel.tls._ssl)
    if is_address:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, is_address, len(is_address))
    else:
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, name.encode(), len(name.encode()))
    if not ok:
        raise ValueError(f'cannot verify the name "{name}"')
    channel.expected_host = name
