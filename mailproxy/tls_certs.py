"""The client certificate, described to the auth service as nginx does.

The Auth-SSL-* request headers (spec 2.2): the verdict of
`ssl_verify_client`, then Subject and Issuer as OpenSSL prints them with
XN_FLAG_RFC2253 (what nginx sends and auth services match), the serial
as OpenSSL's hex, the SHA-1 fingerprint, and with
auth_http_pass_client_cert the PEM, escaped as nginx escapes a URI
component.  The fields are read from the certificate's DER as OpenSSL
handed it over, with no parser of our own beyond tag and length: any
certificate OpenSSL accepted is described, including the old CAs' odd
encodings that stricter parsers refuse (a PrintableString with an "@").
"""

import hashlib
import ssl
import urllib.parse

from .tls_context import verify_outcome

# OpenSSL's short names (OBJ_nid2sn) of the attribute types names use, by
# dotted OID; a type not here is printed as OpenSSL prints one it has no
# name for: the OID, and the value as #DER-hex.
SHORT_NAMES = {"2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
               "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.9": "street", "2.5.4.5": "serialNumber",
               "2.5.4.12": "title", "2.5.4.42": "GN", "2.5.4.4": "SN", "2.5.4.43": "initials",
               "2.5.4.44": "generationQualifier", "2.5.4.46": "dnQualifier",
               "2.5.4.65": "pseudonym", "2.5.4.17": "postalCode", "2.5.4.15": "businessCategory",
               "2.5.4.97": "organizationIdentifier", "0.9.2342.19200300.100.1.25": "DC",
               "0.9.2342.19200300.100.1.1": "UID", "1.2.840.113549.1.9.1": "emailAddress",
               "1.2.840.113549.1.9.2": "unstructuredName",
               "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionC",
               "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionST",
               "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionL", "2.5.4.41": "name",
               "2.5.4.13": "description", "2.5.4.20": "telephoneNumber",
               "2.5.4.16": "postalAddress", "2.5.4.18": "postOfficeBox",
               "2.5.4.45": "x500UniqueIdentifier", "2.5.4.72": "role",
               "2.5.4.54": "dmdName", "2.5.4.51": "houseIdentifier",
               "0.9.2342.19200300.100.1.3": "mail",
               "1.2.840.113549.1.9.8": "unstructuredAddress"}
# Characters per code of each ASN.1 string type OpenSSL prints as text
# (its tag2nbyte table; 0: UTF-8); any other type is dumped as #DER-hex.
WIDTHS = {12: 0, 18: 1, 19: 1, 20: 1, 22: 1, 23: 1, 24: 1, 26: 1, 28: 4, 30: 2}
ENCODINGS = {0: "utf-8", 1: "latin-1", 2: "utf-16-be", 4: "utf-32-be"}
RFC2253_SPECIAL = ',+"\\<>;'


def certificate_headers(channel, verify_mode, pass_cert):
    """The Auth-SSL-* request headers for a TLS client (spec 2.2)."""
    headers = [("Auth-SSL", "on")]
    if channel.version:
        headers.append(("Auth-SSL-Protocol", channel.version))
    if channel.cipher:
        headers.append(("Auth-SSL-Cipher", channel.cipher))
    if verify_mode == "off":
        return headers
    headers.append(("Auth-SSL-Verify", verify_outcome(channel, verify_mode)[2]))
    der = channel.peer_certificate()
    if der is not None:
        headers += describe_certificate(der, pass_cert)
    return headers


def describe_certificate(der, pass_cert=False):
    """Subject, Issuer, Serial, Fingerprint of a DER certificate, and with
    auth_http_pass_client_cert the PEM, escaped."""
    number, issuer, subject = tbs_fields(der)
    headers = [("Auth-SSL-Subject", rfc2253(subject)),
               ("Auth-SSL-Issuer", rfc2253(issuer)),
               ("Auth-SSL-Serial", serial(number)),
               ("Auth-SSL-Fingerprint", hashlib.sha1(der).hexdigest())]
    if pass_cert:
        pem = ssl.DER_cert_to_PEM_cert(der).encode()    # PEM_write_bio_X509's layout
        headers.append(("Auth-SSL-Cert", escape_component(pem)))
    return headers


def tbs_fields(der):
    """(serial, issuer Name DER, subject Name DER) of a certificate (RFC
    5280 4.1: the [0] version, if present, comes first)."""
    (_, certificate, _), _ = _tlv(der, 0)
    (_, tbs, _), _ = _tlv(certificate, 0)
    fields = list(_items(tbs))
    if fields[0][0] == 0xA0:
        fields = fields[1:]
    number = int.from_bytes(fields[0][1], "big", signed=True)
    return number, fields[2][2], fields[4][2]


def escape_component(data):
    """nginx's NGX_ESCAPE_URI_COMPONENT: every byte but letters, digits and
    -._~ as %XX, so "+", "/" and "=" survive a form-decoding auth service."""
    return urllib.parse.quote(data, safe="")


def serial(number):
    """The serial as OpenSSL prints it (i2a_ASN1_INTEGER): a sign if
    negative, then upper-case hex, two digits per byte."""
    digits = format(abs(number), "X")
    return ("-" if number < 0 else "") + digits.zfill(len(digits) + len(digits) % 2)


# ------------------------------------------------------------ RFC 2253

def rfc2253(name):
    """A Name (its DER) as X509_NAME_print_ex(XN_FLAG_RFC2253) prints
    it: attributes last to first, "+" inside a multi-valued RDN, ","
    between RDNs; OpenSSL's short names; unknown attribute types as their
    OID with the value as #DER-hex; RFC 2253 escapes, and each byte of a
    control or non-ASCII character as \\XX."""
    entries = []                    # (RDN index, OID, value TLV), in DER order
    (_, names, _), _ = _tlv(name, 0)
    for index, (_, rdn, _) in enumerate(_items(names)):
        for _, attribute, _ in _items(rdn):
            (_, oid, _), value = list(_items(attribute))[:2]
            entries.append((index, _dotted(oid), value))
    out, previous = [], None
    for index, oid, value in reversed(entries):
        if out:
            out.append("+" if index == previous else ",")
        out.append(_field(oid, SHORT_NAMES.get(oid), value))
        previous = index
    return "".join(out)


def _field(oid, short, value):
    tag, content, whole = value
    if short is None:
        return f"{oid}=#{whole.hex().upper()}"
    if tag not in WIDTHS:
        return f"{short}=#{whole.hex().upper()}"
    text = content.decode(ENCODINGS[WIDTHS[tag]], errors="replace")
    return f"{short}={_escape(text)}"


def _escape(text):
    out = []
    for position, char in enumerate(text):
        edge = (position == 0 and char in " #") or (position == len(text) - 1 and char == " ")
        if char in RFC2253_SPECIAL or edge:
            out.append("\\" + char)
        elif " " <= char < "\x7f":
            out.append(char)
        else:
            out.append("".join(f"\\{byte:02X}" for byte in char.encode()))
    return "".join(out)


# ------------------------------------------------------------ DER

def _tlv(data, pos):
    """(tag, content, whole TLV) at `pos`, and where the next one starts."""
    start, tag, length = pos, data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    return (tag, data[pos:pos + length], data[start:pos + length]), pos + length


def _items(content):
    """The TLVs one after another in `content`."""
    pos = 0
    while pos < len(content):
        item, pos = _tlv(content, pos)
        yield item


def _dotted(oid):
    """A DER OBJECT IDENTIFIER's content as "1.2.840..."."""
    arcs, value = [], 0
    for byte in oid:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])
