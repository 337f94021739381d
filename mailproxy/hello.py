"""The server name a TLS client asks for, read before the handshake.

When several server{} blocks share an address (names.py), the client's
ClientHello says which one it wants (the server_name extension, RFC 6066
section 3), and that block's own TLS context must answer it.  Rather than
switch contexts in the middle of OpenSSL's handshake (SSL_set_SSL_CTX
keeps the first context's session cache, ticket keys, protocol versions,
ciphers and verify mode, so a session one name issued would resume under
another: nginx's CVE-2025-23419), the session reads the ClientHello
itself, picks the block, and gives the bytes read to a TlsChannel built on
that block's context: each block keeps its whole TLS configuration, and a
session or ticket of one block is unknown to every other.

`read_client_hello()` reads whole TLS records (RFC 8446 section 5.1) until
the ClientHello is complete, under the session's deadline, and parses only
what leads to the name.  Anything unexpected (not a handshake record, a
malformed message, a client that closes) ends the parsing with no name:
the bytes still go to OpenSSL, which then says what is wrong in its words.
"""

import time

HANDSHAKE = 22              # TLS record content type (RFC 8446 5.1)
CLIENT_HELLO = 1            # handshake message type (RFC 8446 4)
SERVER_NAME = 0             # extension type (RFC 6066 3)
HOST_NAME = 0               # server name type
RECORD_HEADER = 5
MAX_RECORD = 2 ** 14 + 2048     # the largest record a peer may send (RFC 8446 5.2)
MAX_HELLO = 65536           # a ClientHello longer than this is left to OpenSSL, unnamed


class _Incomplete(Exception):
    """The client closed before a whole record came."""


def read_client_hello(sock, deadline):
    """(the bytes read, the server name or None) from a client that is
    about to send its ClientHello.  TimeoutError after `deadline` (a
    time.monotonic() value, or None)."""
    received = bytearray()
    message = bytearray()
    try:
        while len(message) < 4 or len(message) < 4 + _length(message[1:4]):
            header = _read(sock, RECORD_HEADER, deadline)
            received += header
            size = int.from_bytes(header[3:5], "big")
            if header[0] != HANDSHAKE or not 0 < size <= MAX_RECORD:
                return bytes(received), None
            body = _read(sock, size, deadline)
            received += body
            message += body
            if message[0] != CLIENT_HELLO or len(message) > MAX_HELLO:
                return bytes(received), None
    except _Incomplete as exc:
        return bytes(received + exc.args[0]), None
    return bytes(received), _server_name(bytes(message[4:4 + _length(message[1:4])]))


def _length(three):
    return int.from_bytes(three, "big")


def _read(sock, size, deadline):
    """Exactly `size` bytes, under the deadline; _Incomplete at EOF."""
    data = bytearray()
    while len(data) < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(left)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise _Incomplete(bytes(data))
        data += chunk
    return bytes(data)


def _server_name(hello):
    """The host_name of a ClientHello body (RFC 8446 4.1.2), or None."""
    reader = _Reader(hello)
    reader.skip(2 + 32)                 # legacy_version, random
    reader.skip(reader.number(1))       # legacy_session_id
    reader.skip(reader.number(2))       # cipher_suites
    reader.skip(reader.number(1))       # legacy_compression_methods
    extensions = _Reader(reader.take(reader.number(2)))
    while extensions.left():
        kind, data = extensions.number(2), extensions.take(extensions.number(2))
        if kind == SERVER_NAME and data is not None:
            return _host_name(_Reader(data))
    return None


def _host_name(reader):
    names = _Reader(reader.take(reader.number(2)))
    while names.left():
        kind, name = names.number(1), names.take(names.number(2))
        if kind == HOST_NAME and name:
            try:
                return name.decode("ascii").lower()
            except UnicodeDecodeError:
                return None
    return None


class _Reader:
    """Bounds-checked reads from a message: past its end, numbers are 0
    and takes are None, so a malformed message just yields no name."""

    def __init__(self, data):
        self.data, self.at = data or b"", 0

    def left(self):
        return len(self.data) - self.at > 0 and self.at >= 0

    def take(self, size):
        if self.at < 0 or self.at + size > len(self.data):
            self.at = -1                # spoilt: everything after is missing
            return None
        part = self.data[self.at:self.at + size]
        self.at += size
        return part

    def skip(self, size):
        self.take(size)

    def number(self, size):
        part = self.take(size)
        return int.from_bytes(part, "big") if part is not None else 0
