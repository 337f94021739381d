"""The TLS contexts: nginx's ssl_* (and our proxy_ssl_*) directives made
into pyOpenSSL `Context` objects.

`server_context(config)` is the client-facing context of one server{},
`BackendTls(config)` what one server{} uses toward its backends.  A server
context is built once per configuration read (`server_context` keeps it
for that ServerConfig), and the master builds them before it forks
(`prepare`): every worker then holds the same SSL_CTX, and so the same
session ticket key, so a ticket one worker issued resumes on another.  The
built-in session cache is per process (copy-on-write after the fork).

Each directive becomes one call, named in the function that makes it; a
value OpenSSL refuses is a `TlsSetupError` naming the directive, which
config.py turns into nginx's "in file:line".  `warnings(config)` is the
list of nginx-style [warn] lines for what is accepted but not honoured.
"""

import base64
import hashlib
import ipaddress
import weakref

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from . import tls

VERSIONS = {"TLSv1": SSL.TLS1_VERSION, "TLSv1.1": SSL.TLS1_1_VERSION,
            "TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}
ORDER = ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
SESSION_ID_CONTEXT = b"MAIL"        # nginx's, for the mail module; each server{} adds
                                    # its own mark (session_id_context)
OPENSSL_CACHE_SIZE = 20480          # sessions OpenSSL's built-in cache holds (its default)
# nginx's verify errors that optional_no_ca lets through (ngx_ssl_verify_error_optional)
NO_CA_ERRORS = {2, 18, 19, 20, 21}
# SSL_CONF "Options" values mailproxy maps: name -> (option bit, the bit means "off")
OPTIONS = {"SessionTicket": (SSL.OP_NO_TICKET, True),
           "ServerPreference": (SSL.OP_CIPHER_SERVER_PREFERENCE, False),
           "NoRenegotiation": (SSL.OP_NO_RENEGOTIATION, False),
           "IgnoreUnexpectedEOF": (SSL.OP_IGNORE_UNEXPECTED_EOF, False),
           "PrioritizeChaCha": (1 << 21, False)}   # SSL_OP_PRIORITIZE_CHACHA
TX_CERT_COMPRESSION_OFF = 1 << 32   # SSL_OP_NO_TX_CERTIFICATE_COMPRESSION (OpenSSL 3.2+)

_BUILT = weakref.WeakKeyDictionary()    # ServerConfig -> its server Context


class TlsSetupError(Exception):
    """A TLS setting cannot be applied; `directive` names the culprit."""

    def __init__(self, directive, message):
        super().__init__(message)
        self.directive = directive


def prepare(config):
    """Build every server's context now (the master, before it forks)."""
    for server in config.servers:
        if needs_tls(server):
            server_context(server)


def needs_tls(server):
    return server.starttls != "off" or any(entry.ssl for entry in server.listens)


def server_context(config):
    """The client-facing Context of one server{} (spec 1.9, 5), built once."""
    context = _BUILT.get(config)
    if context is None:
        context = _BUILT[config] = _server_context(config)
    return context


def _server_context(config):
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    flags = {"SessionTicket": config.ssl_session_tickets,
             "ServerPreference": config.ssl_prefer_server_ciphers}
    _versions(context, config.ssl_protocols, "ssl_protocols")
    _apply("ssl_ciphers", context.set_cipher_list, config.ssl_ciphers.encode())
    passwords = _passwords(config.ssl_password_file)
    for cert, key in zip(config.ssl_certificate, config.ssl_certificate_key):
        _load_pair(context, cert, key, passwords)
    if config.ssl_dhparam:
        _apply("ssl_dhparam", context.load_tmp_dh, config.ssl_dhparam)
    if config.ssl_ecdh_curve != "auto":
        _apply("ssl_ecdh_curve", tls.set_groups, context, config.ssl_ecdh_curve)
    context.set_alpn_select_callback(_alpn(config.protocol.encode()))
    _session_cache(context, config)
    _check_ticket_keys(config.ssl_session_ticket_key)
    _client_verification(context, config)
    for name, value in config.ssl_conf_command:
        _conf_command(context, flags, name, value)
    _options(context, flags, config.ssl_certificate_compression)
    return context


def _options(context, flags, compression):
    """The option bits, set once: pyOpenSSL can set bits but not clear
    them, so ssl_conf_command's +/- are settled in `flags` first."""
    bits = 0 if compression else TX_CERT_COMPRESSION_OFF
    for name, wanted in flags.items():
        bit, means_off = OPTIONS[name]
        if wanted != means_off:
            bits |= bit
    context.set_options(bits)


def _alpn(protocol):
    """ALPN (spec 5.4): offer exactly the mail protocol's name.  A client
    whose list lacks it is marked (the Connection's app data), and the
    channel ends the connection after the handshake; raising here would
    send nginx's fatal alert, but pyOpenSSL keeps a raised error on the
    shared Context and may report it to another client's handshake."""
    def select(connection, offered):
        if protocol in offered:
            return protocol
        connection.set_app_data(tls.NO_ALPN)
        return SSL.NO_OVERLAPPING_PROTOCOLS
    return select


# ------------------------------------------------------------- sessions

def cache_mode(config):
    """"off", "none" or "on" from ssl_session_cache's values."""
    values = config.ssl_session_cache
    if "off" in values:
        return "off"
    if any(value.startswith(("builtin", "shared:")) for value in values):
        return "on"
    return "none"


def _session_cache(context, config):
    """ssl_session_cache, ssl_session_timeout, ssl_session_tickets (with the
    SSL_CONF Options, in _options).  `none`, as in nginx: session ids are
    issued but never stored, so only a ticket can resume."""
    context.set_session_id(session_id_context(config))
    context.set_timeout(max(1, int(config.ssl_session_timeout)))
    mode = cache_mode(config)
    if mode == "off":
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    elif mode == "none":
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER | SSL.SESS_CACHE_NO_INTERNAL_STORE)
    else:
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)


def session_id_context(config):
    """nginx's "MAIL" and a mark of the server{} (where it is written), so
    that no block resumes a session another block issued, even where they
    share an address (names.py), and beside their separate caches and
    ticket keys."""
    return SESSION_ID_CONTEXT + hashlib.sha256(str(config.where).encode()).digest()[:16]


def _check_ticket_keys(paths):
    """ssl_session_ticket_key files are checked as nginx checks them, though
    not loaded (see warnings())."""
    for path in paths:
        try:
            with open(path, "rb") as file:
                size = len(file.read(81))
        except OSError as exc:
            raise TlsSetupError("ssl_session_ticket_key",
                                f'open() "{path}" failed ({exc.strerror})') from None
        if size not in (48, 80):
            raise TlsSetupError("ssl_session_ticket_key",
                                f'"{path}" must be 48 or 80 bytes')


# -------------------------------------------------------- verification

def _client_verification(context, config):
    """ssl_verify_client: ask for a certificate, OpenSSL keeps what failed; the
    handshake always completes, and the session judges afterwards (spec
    5.3), as nginx's callback that always says yes."""
    mode = config.ssl_verify_client
    if mode == "off":
        return
    if config.ssl_client_certificate:       # trusted, and named in the CertificateRequest
        _apply("ssl_client_certificate", context.load_verify_locations,
               config.ssl_client_certificate)
        _apply("ssl_client_certificate", context.load_client_ca,
               config.ssl_client_certificate.encode())
    if config.ssl_trusted_certificate:      # trusted only
        _apply("ssl_trusted_certificate", context.load_verify_locations,
               config.ssl_trusted_certificate)
    if config.ssl_crl:
        _apply("ssl_crl", context.load_verify_locations, config.ssl_crl)
        context.get_cert_store().set_flags(crypto.X509StoreFlags.CRL_CHECK |
                                           crypto.X509StoreFlags.CRL_CHECK_ALL)
    context.set_verify_depth(config.ssl_verify_depth)
    tls.verify_and_go_on(context, SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE)


def _check(connection, cert, code, depth, ok):
    """The backend-side verify callback: OpenSSL's own verdict."""
    return bool(ok)


def verify_outcome(channel, mode):
    """After the handshake: (reply, log text, Auth-SSL-Verify value).
    `reply` is "no certificate", "certificate error" or None (go on)."""
    if mode == "off":
        return None, None, None
    sent = channel.peer_x509() is not None
    if not sent:
        return ("no certificate" if mode == "on" else None), None, "NONE"
    if channel.verify_error is None:
        return None, None, "SUCCESS"
    code, text = channel.verify_error
    if mode == "optional_no_ca" and code in NO_CA_ERRORS:
        return None, None, f"FAILED:{text}"
    return "certificate error", f"client SSL certificate verify error: ({code}:{text})", \
        f"FAILED:{text}"


# ------------------------------------------------------------ commands

def _conf_command(context, flags, name, value):
    """ssl_conf_command: the SSL_CONF commands real configurations use,
    mapped onto pyOpenSSL's calls (it has no SSL_CONF)."""
    where = "ssl_conf_command"
    if name == "Options":
        for item in filter(None, (part.strip() for part in value.split(","))):
            sign, option = (item[0], item[1:]) if item[0] in "+-" else ("+", item)
            if option not in OPTIONS:
                raise TlsSetupError(where, f'SSL_CONF_cmd("Options", "{value}") failed: '
                                    f'option "{option}" is not supported by mailproxy')
            flags[option] = sign == "+"
        return
    calls = {"Ciphersuites": lambda: context.set_tls13_ciphersuites(value.encode()),
             "CipherString": lambda: context.set_cipher_list(value.encode()),
             "Groups": lambda: tls.set_groups(context, value),
             "Curves": lambda: tls.set_groups(context, value),
             "MinProtocol": lambda: context.set_min_proto_version(_version(value)),
             "MaxProtocol": lambda: context.set_max_proto_version(_version(value)),
             "Certificate": lambda: context.use_certificate_chain_file(value),
             "PrivateKey": lambda: context.use_privatekey_file(value)}
    if name not in calls:
        raise TlsSetupError(where, f'SSL_CONF_cmd("{name}", "{value}") failed: the command '
                            f'is not supported by mailproxy (it maps {", ".join(calls)} '
                            'and Options)')
    try:
        calls[name]()
    except (SSL.Error, ValueError, OSError) as exc:
        raise TlsSetupError(where, f'SSL_CONF_cmd("{name}", "{value}") failed: '
                            f'{_reason(exc)}') from None


def _version(text):
    if text == "None":
        return 0
    if text not in VERSIONS:
        raise ValueError(f'unknown protocol "{text}"')
    return VERSIONS[text]


def _versions(context, names, directive):
    unknown = [name for name in names if name not in VERSIONS]
    if unknown:
        raise TlsSetupError(directive, f'"{unknown[0]}" is not supported by this OpenSSL')
    chosen = sorted(ORDER.index(name) for name in names)
    if chosen[-1] - chosen[0] != len(chosen) - 1:
        raise TlsSetupError(directive, "versions with a gap between them are not supported "
                            "(OpenSSL would ignore every version above the gap)")
    context.set_min_proto_version(VERSIONS[ORDER[chosen[0]]])
    context.set_max_proto_version(VERSIONS[ORDER[chosen[-1]]])


# ----------------------------------------------------------- key files

def _passwords(path, directive="ssl_password_file"):
    """ssl_password_file: one passphrase per line, tried in turn.  Without
    one, an empty passphrase: OpenSSL would otherwise ask on the terminal,
    which nginx never does."""
    if not path:
        return [b""]
    try:
        with open(path, encoding="utf-8") as file:
            return [line.rstrip("\r\n").encode() for line in file
                    if line.rstrip("\r\n")] or [b""]
    except OSError as exc:
        raise TlsSetupError(directive, f'open() "{path}" failed ({exc.strerror})') from None


def _load_pair(context, cert, key, passwords, directive="ssl_certificate"):
    """One certificate chain and its key.  OpenSSL keeps one per key type,
    so an RSA and an ECDSA pair both stay, and each client gets the one its
    signature algorithms accept."""
    try:
        with open(cert, "rb"), open(key, "rb") as file:
            pem = file.read()
        context.use_certificate_chain_file(cert)
    except OSError as exc:
        raise TlsSetupError(directive, f'cannot load certificate "{cert}" or key "{key}": '
                            f'{exc.strerror}') from None
    except SSL.Error as exc:
        raise TlsSetupError(directive, f'cannot load certificate "{cert}": '
                            f'{_reason(exc)}') from None
    for password in passwords:
        try:
            context.use_privatekey(serialization.load_pem_private_key(pem, password or None))
            context.check_privatekey()
            return
        except (SSL.Error, ValueError, TypeError) as exc:
            error = exc
    raise TlsSetupError(f"{directive}_key", f'cannot load certificate "{cert}" with key '
                        f'"{key}": {_reason(error)}')


def _apply(directive, method, *args):
    try:
        method(*args)
    except (SSL.Error, crypto.Error, OSError, ValueError) as exc:
        shown = next((arg for arg in args if isinstance(arg, (str, bytes))), "")
        shown = shown.decode() if isinstance(shown, bytes) else shown
        raise TlsSetupError(directive, f'"{shown}": {_reason(exc)}') from None


def _reason(exc):
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, (SSL.Error, crypto.Error)):
        return tls.describe(exc)
    return str(exc.args[-1] if exc.args else exc)


# ------------------------------------------------------------ backends

def backend_context(config):
    """The Context toward backends (beyond nginx): proxy_ssl_* settings."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    _versions(context, config.proxy_ssl_protocols, "proxy_ssl_protocols")
    _apply("proxy_ssl_ciphers", context.set_cipher_list, config.proxy_ssl_ciphers.encode())
    if config.proxy_ssl_verify:
        if config.proxy_ssl_trusted_certificate:
            _apply("proxy_ssl_trusted_certificate", context.load_verify_locations,
                   config.proxy_ssl_trusted_certificate)
        else:
            context.set_default_verify_paths()
        context.set_verify_depth(config.proxy_ssl_verify_depth)
        context.set_verify(SSL.VERIFY_PEER, _check)
    if config.proxy_ssl_certificate:
        _load_pair(context, config.proxy_ssl_certificate,
                   config.proxy_ssl_certificate_key or config.proxy_ssl_certificate, [b""],
                   "proxy_ssl_certificate")
    return context


class BackendTls:
    """How one server{} talks TLS to its backends: the context, the name to
    verify and to send as SNI (each only when asked for), and the pins."""

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
        packed = _packed(name)
        channel = tls.TlsChannel(sock, self.context, server_side=False,
                                 server_hostname=name if self.sni and not packed else None)
        if self.verify:
            tls.expect_host(channel, name, packed)
        return channel

    def check_pin(self, channel):
        """proxy_ssl_pin: the backend's public key must be one of the pins;
        a small site's self-signed backend stays protected this way."""
        if not self.pins:
            return None
        spki = crypto.dump_publickey(crypto.FILETYPE_ASN1, channel.peer_x509().get_pubkey())
        digest = hashlib.sha256(spki).digest()
        if digest in self.pins:
            return None
        return "upstream SSL certificate does not match proxy_ssl_pin (key sha256:" \
               f"{base64.b64encode(digest).decode()})"


def _packed(name):
    """The address bytes of an IP literal, else None."""
    try:
        return ipaddress.ip_address(name).packed
    except ValueError:
        return None


# ---------------------------------------------------- -t and -T words

def warnings(config):
    """[(directive, text)]: nginx-style [warn]s for what this server says
    and OpenSSL or pyOpenSSL will not do as written."""
    found = []
    for protocols, ciphers in (("ssl_protocols", "ssl_ciphers"),
                               ("proxy_ssl_protocols", "proxy_ssl_ciphers")):
        old = [name for name in ("TLSv1", "TLSv1.1") if name in getattr(config, protocols)]
        if old and "@SECLEVEL=0" not in getattr(config, ciphers):
            found.append((protocols, f'{" and ".join(old)} need "@SECLEVEL=0" in "{ciphers}": '
                          f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()} refuses them "
                          "at its default security level"))
    if config.ssl_session_ticket_key:
        found.append(("ssl_session_ticket_key", '"ssl_session_ticket_key" is not honoured: '
                      "pyOpenSSL cannot load ticket keys; tickets use OpenSSL's own random "
                      "key, shared by the workers of one master"))
    if config.ssl_certificate_compression:
        found.append(("ssl_certificate_compression",
                      '"ssl_certificate_compression" ignored, not supported'))
    for value in config.ssl_session_cache:
        if value.startswith("builtin:") and int(value[8:]) != OPENSSL_CACHE_SIZE:
            found.append(("ssl_session_cache", f'the size of "{value}" is not honoured: '
                          f"OpenSSL's built-in cache holds {OPENSSL_CACHE_SIZE} sessions"))
    return found


def summary(config):
    """The effective TLS settings of a server, in words, for -T."""
    if not needs_tls(config):
        return []
    mode = cache_mode(config)
    cache = {"off": "off (no session is stored)",
             "none": "none (session ids are issued, never stored)",
             "on": "on (OpenSSL's built-in cache, one per worker process)"}[mode]
    tickets = "on (OpenSSL's key, shared by the workers of one master)" \
        if config.ssl_session_tickets else "off"
    return [f"TLS: protocols {' '.join(sorted(config.ssl_protocols, key=ORDER.index))}; "
            f"ciphers {config.ssl_ciphers}; groups {config.ssl_ecdh_curve}",
            f"TLS: session cache {cache}; tickets {tickets}; "
            f"timeout {int(config.ssl_session_timeout)}s",
            f"TLS: verify client {config.ssl_verify_client}, depth {config.ssl_verify_depth}",
            "TLS: certificates " + ", ".join(f"{cert} ({_key_type(cert)})"
                                             for cert in config.ssl_certificate)]


def _key_type(path):
    try:
        with open(path, "rb") as file:
            key = crypto.load_certificate(crypto.FILETYPE_PEM, file.read()).get_pubkey()
    except (OSError, crypto.Error):
        return "unreadable"
    return {crypto.TYPE_RSA: "RSA", crypto.TYPE_EC: "ECDSA",
            crypto.TYPE_DSA: "DSA"}.get(key.type(), "other")
