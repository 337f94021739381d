"""The PROXY protocol, versions 1 and 2: in from a load balancer, out to a backend.

A load balancer in TCP mode (HAProxy's `send-proxy-v2`) hides the client:
every connection comes from the balancer's address.  It therefore writes
one header in front of the client's bytes, saying who the client is:

    v1, text:    PROXY TCP4 203.0.113.7 192.0.2.1 51234 143\\r\\n
    v2, binary:  a 12-byte signature, version/command, family/transport,
                 a length, then the addresses and ports (and TLVs)

(both defined in HAProxy's doc/proxy-protocol.txt).  On a `listen ...
proxy_protocol` socket the session reads that header first, before TLS
and the greeting, under the `timeout` deadline (spec 5.6):

    receive()  read_header() -> parse() -> ProxyHeader, or None when the
               header carries no address (PROXY UNKNOWN, v2 LOCAL, UNSPEC)

A header that does not parse is logged as "broken header" and the session
ends without a reply.  The reader consumes exactly the header and never a
byte of what follows: v1 up to its LF (peeked first, then taken), v2 its
16 fixed bytes and then the length they give.

The addresses go to the auth service as the Proxy-Protocol-* headers.  The
client address itself is replaced by the header's source only when the TCP
peer is trusted (`set_real_ip_from`, nginx's realip module): a client that
connects directly cannot claim another address.

Toward the backend, `proxy_protocol on|v2` makes `outgoing()` build the
same header for it (spec 4.7): the client's address after realip, and the
local address of the client's connection.  backend.connect() sends it in
one write before anything else.
"""

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass

from ..addresses import UNIX_PREFIX
from ..stream import Closed

V1_PREFIX = b"PROXY "
V1_MAX = 107                # the longest v1 line, CRLF included (proxy-protocol.txt 2.1)
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_FAMILIES = {b"TCP4": 4, b"TCP6": 6}
V1_MAX_PORT_DIGITS = 5      # "65535"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16               # signature, version/command, family/transport, length
V2_MAX = 4096               # a whole v2 header, TLVs included: what nginx peeks
FIRST_READ = 8              # enough to tell v1 ("PROXY " and more) from v2, and
                            # shorter than the shortest header ("PROXY UNKNOWN\r\n")
# The v2 fields (proxy-protocol.txt 2.2).
V2_VERSION = 0x2
LOCAL, PROXY = 0x0, 0x1
UNSPEC, INET, INET6, UNIX = 0x0, 0x1, 0x2, 0x3
STREAM, DGRAM = 0x1, 0x2
V2_ADDRESSES = {INET: "!4s4sHH", INET6: "!16s16sHH"}    # src, dst, src port, dst port


class BrokenHeader(Exception):
    """The client's first bytes are not a valid PROXY header; the message
    says what is wrong (never the bytes: a client that forgot the balancer
    may have sent its password)."""


@dataclass(frozen=True)
class ProxyHeader:
    """The addresses a PROXY header carried: the client's (source) and the
    one it connected to on the balancer (destination), as text and ints."""
    source: str
    source_port: int
    destination: str
    destination_port: int


# ------------------------------------------------------------- the session

def receive(sock, deadline):
    """The header on a `listen ... proxy_protocol` connection, read from
    `sock` before anything else: a ProxyHeader, or None when it carries no
    client address.  Raises BrokenHeader; a timeout or a close propagates
    to the session's funnel like any other read."""
    return parse(read_header(sock, deadline))


def real_client(header, peer, networks):
    """The client's address for logs and the auth service: the header's
    source when the TCP peer is trusted (`set_real_ip_from`), else `peer`."""
    if header is not None and trusted(peer, networks):
        return (header.source, header.source_port)
    return peer


def real_server(header, peer, networks):
    """The address the client connected to, as a trusted header (see
    real_client) says: the header's destination, or None when the header
    is absent or not trusted (the listening socket's address then holds)."""
    if header is not None and trusted(peer, networks):
        return (header.destination, header.destination_port)
    return None


def trusted(peer, networks):
    """Does the TCP peer (an accept() address; '' for a unix-domain peer)
    match `set_real_ip_from`?  An IPv4-mapped IPv6 peer matches as IPv4."""
    if not peer:
        return UNIX_PREFIX in networks
    address = _ip(peer[0])
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks if network != UNIX_PREFIX)


def auth_headers(header, extra):
    """`extra` (the protocol's request headers) with Proxy-Protocol-* put
    in nginx's place: after Client-Host, before Auth-SMTP-* (spec 2.2).
    Only a header that carried addresses adds them."""
    if header is None:
        return tuple(extra)
    ours = (("Proxy-Protocol-Addr", header.source),
            ("Proxy-Protocol-Port", str(header.source_port)),
            ("Proxy-Protocol-Server-Addr", header.destination),
            ("Proxy-Protocol-Server-Port", str(header.destination_port)))
    split = next((index for index, (name, _) in enumerate(extra) if name != "Client-Host"),
                 len(extra))
    return tuple(extra[:split]) + ours + tuple(extra[split:])


def outgoing(mode, client_address, local_address):
    """The header `proxy_protocol on|v2` (`mode`) sends the backend for a
    client at `client_address` that connected to `local_address`, or b""
    (off)."""
    build = BUILDERS.get(mode)
    if build is None:
        return b""
    return build(client_address, local_address)


# ----------------------------------------------------------------- reading

def read_header(sock, deadline):
    """The raw bytes of one PROXY header from `sock`, and not one byte more:
    the TLS handshake or the client's first command follows it.  `deadline`
    is a time.monotonic() value (None: no limit)."""
    reader = _Reader(sock, deadline)
    start = reader.exact(FIRST_READ)
    if start == V2_SIGNATURE[:FIRST_READ]:
        fixed = start + reader.exact(V2_FIXED - FIRST_READ)
        return fixed + reader.exact(_v2_length(fixed))
    if not start.startswith(V1_PREFIX):
        raise BrokenHeader("no PROXY protocol signature")
    if b"\n" in start:
        return start                    # too short to be valid; parse() says why
    return start + reader.line(V1_MAX - FIRST_READ)


class _Reader:
    """Bounded reads of a raw socket under one deadline."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline

    def _recv(self, size, flags=0):
        left = None
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(size, flags)
        except ConnectionError:
            raise Closed() from None
        if not data:
            raise Closed()
        return data

    def exact(self, size):
        data = b""
        while len(data) < size:
            data += self._recv(size - len(data))
        return data

    def line(self, limit):
        """Up to and including LF, at most `limit` bytes: peek to find the
        LF, then take only what comes before it and the LF itself."""
        data = b""
        while len(data) < limit:
            peeked = self._recv(limit - len(data), socket.MSG_PEEK)
            end = peeked.find(b"\n")
            data += self.exact(end + 1 if end >= 0 else len(peeked))
            if end >= 0:
                return data
        raise BrokenHeader(f"no end of line within {V1_MAX} bytes")


def _v2_length(fixed):
    """The length field of a v2 header, after the signature and version are
    checked: nothing more is read for a header that is already broken."""
    if len(fixed) < V2_FIXED:
        raise BrokenHeader(f"v2 header shorter than {V2_FIXED} bytes")
    if fixed[:len(V2_SIGNATURE)] != V2_SIGNATURE:
        raise BrokenHeader("bad v2 signature")
    if fixed[12] >> 4 != V2_VERSION:
        raise BrokenHeader(f"unknown PROXY protocol version {fixed[12] >> 4}")
    (length,) = struct.unpack("!H", fixed[14:16])
    if V2_FIXED + length > V2_MAX:
        raise BrokenHeader(f"v2 header of {V2_FIXED + length} bytes, more than {V2_MAX}")
    return length


# ----------------------------------------------------------------- parsing

def parse(data):
    """One whole header (v1 line or v2 block) -> ProxyHeader, or None when
    it carries no client address.  Raises BrokenHeader."""
    if data.startswith(V2_SIGNATURE):
        return parse_v2(data)
    if data.startswith(V1_PREFIX):
        return parse_v1(data)
    raise BrokenHeader("no PROXY protocol signature")


def parse_v1(line):
    """`PROXY TCP4|TCP6 src dst sport dport\\r\\n` or `PROXY UNKNOWN...\\r\\n`."""
    if len(line) > V1_MAX:
        raise BrokenHeader(f"v1 line longer than {V1_MAX} bytes")
    if not line.endswith(b"\r\n"):
        raise BrokenHeader("v1 line does not end in CRLF")
    words = line[:-2].split(b" ")
    if len(words) > 1 and words[1] == b"UNKNOWN":
        return None             # the balancer knows nothing; the rest is ignored
    if len(words) != 6 or words[1] not in V1_FAMILIES:
        raise BrokenHeader("v1 line is not PROXY TCP4|TCP6 src dst sport dport")
    version = V1_FAMILIES[words[1]]
    source, destination = (_v1_address(word, version) for word in words[2:4])
    source_port, destination_port = (_v1_port(word) for word in words[4:6])
    return ProxyHeader(source, source_port, destination, destination_port)


def _v1_address(word, version):
    try:
        address = ipaddress.ip_address(word.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BrokenHeader("bad address in v1 line") from None
    if address.version != version or "%" in str(address):
        raise BrokenHeader(f"address in v1 line is not IPv{version}")
    return str(address)


def _v1_port(word):
    if not (word.isdigit() and len(word) <= V1_MAX_PORT_DIGITS and int(word) <= 65535):
        raise BrokenHeader("bad port in v1 line")
    return int(word)


def parse_v2(data):
    """The binary header: 16 fixed bytes, then `length` bytes of addresses
    and TLVs (which are skipped).  LOCAL (a health check from the balancer
    itself), UNSPEC, UNIX and DGRAM carry no client address: None."""
    length = _v2_length(data[:V2_FIXED])
    if len(data) != V2_FIXED + length:
        raise BrokenHeader(f"v2 header says {V2_FIXED + length} bytes, has {len(data)}")
    version_command, family_transport = data[12], data[13]
    command, family, transport = version_command & 0xF, family_transport >> 4, \
        family_transport & 0xF
    if command not in (LOCAL, PROXY) or family > UNIX or transport > DGRAM:
        raise BrokenHeader("unknown v2 command, family or transport")
    if command == LOCAL or transport != STREAM or family not in V2_ADDRESSES:
        return None
    layout = V2_ADDRESSES[family]
    if length < struct.calcsize(layout):
        raise BrokenHeader("v2 address block too short")
    source, destination, source_port, destination_port = \
        struct.unpack_from(layout, data, V2_FIXED)
    return ProxyHeader(str(ipaddress.ip_address(source)), source_port,
                       str(ipaddress.ip_address(destination)), destination_port)


# ---------------------------------------------------------------- building

def v1_line(client, local):
    """`PROXY TCP4|TCP6 client local cport lport\\r\\n`; `PROXY UNKNOWN\\r\\n`
    when either end is not an IP address (a unix: socket)."""
    ends = _inet_ends(client, local)
    if ends is None:
        return V1_UNKNOWN
    (source, source_port), (destination, destination_port) = ends
    family = b"TCP4" if source.version == 4 else b"TCP6"
    return b"PROXY %s %s %s %d %d\r\n" % (family, str(source).encode(),
                                         str(destination).encode(), source_port,
                                         destination_port)


def v2_header(client, local):
    """The binary equivalent of v1_line: PROXY over TCP with the addresses,
    or PROXY with family UNSPEC and no addresses (v1's UNKNOWN)."""
    ends = _inet_ends(client, local)
    if ends is None:
        return V2_SIGNATURE + bytes((V2_VERSION << 4 | PROXY, UNSPEC)) + struct.pack("!H", 0)
    (source, source_port), (destination, destination_port) = ends
    family = INET if source.version == 4 else INET6
    block = struct.pack(V2_ADDRESSES[family], source.packed, destination.packed,
                        source_port, destination_port)
    return (V2_SIGNATURE + bytes((V2_VERSION << 4 | PROXY, family << 4 | STREAM))
            + struct.pack("!H", len(block)) + block)


BUILDERS = {"on": v1_line, "v2": v2_header}


def _inet_ends(client, local):
    """((client ip, port), (local ip, port)) of one IP version, or None when
    either is not an IP address.  A header names one family for both ends,
    so an IPv4-mapped address is unmapped, and if the versions still differ
    the IPv4 one is mapped into IPv6 (as HAProxy does)."""
    if not (isinstance(client, tuple) and isinstance(local, tuple)):
        return None
    ends = [[_unmapped(_ip(address[0])), address[1]] for address in (client, local)]
    if ends[0][0].version != ends[1][0].version:
        for end in ends:
            if end[0].version == 4:
                end[0] = ipaddress.IPv6Address(f"::ffff:{end[0]}")
    return tuple(map(tuple, ends))


def _ip(text):
    """An ipaddress object for a socket address's host (any %scope dropped)."""
    return ipaddress.ip_address(text.partition("%")[0])


def _unmapped(address):
    return address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address
