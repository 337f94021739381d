"""The SMTP client's host name: a PTR lookup confirmed by a forward lookup.

Only SMTP uses it (spec 3.3.1): the name goes to the auth service as
`Client-Host` and to the backend as `XCLIENT NAME=`.  The answer is the PTR
name only if one of its A/AAAA addresses is the client's own; otherwise one
of Postfix's two placeholders:

    [UNAVAILABLE]   no name (resolver off, NXDOMAIN, no match)
    [TEMPUNAVAIL]   the lookup failed (timeout, SERVFAIL, a unix client), or
                    the name holds characters outside [A-Za-z0-9.-], which
                    could smuggle text into headers (CVE-2026-28753)

dnspython queries the servers named by the `resolver` directive, never the
system resolver, and every query is bounded by `resolver_timeout`.  It is
imported by the first HostResolver, so a proxy with no `resolver` never
loads it; the placeholders above need no dnspython.
"""

import ipaddress
import re

UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"
VALID_NAME = re.compile(r"[A-Za-z0-9.-]+")


class HostResolver:
    """Built once per server from `resolver ADDR[:PORT] ... [ipv4=] [ipv6=]`."""

    def __init__(self, args, timeout):
        # Here, not at the top: a proxy without `resolver` never loads dnspython.
        import dns.exception
        import dns.resolver
        self.no_name = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)    # -> [UNAVAILABLE]
        self.failure = dns.exception.DNSException                      # -> [TEMPUNAVAIL]
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.lifetime = timeout
        self.resolver.timeout = timeout
        self.resolver.cache = None
        self.families = {"A": True, "AAAA": True}
        servers, ports = [], {}
        for arg in args:
            name, eq, value = arg.partition("=")
            if eq and name in ("ipv4", "ipv6"):
                self.families["A" if name == "ipv4" else "AAAA"] = value == "on"
            elif not eq:
                host, port = _server(arg)
                servers.append(host)
                ports[host] = port
        self.resolver.nameservers = servers
        self.resolver.nameserver_ports = ports

    def lookup(self, address):
        """The confirmed host name of `address`, or a placeholder; the
        second value is a reason to log, or None."""
        try:
            answer = self.resolver.resolve_address(address)
        except self.no_name:
            return UNAVAILABLE, None
        except self.failure as exc:
            return TEMPUNAVAIL, f"PTR lookup of {address} failed: {type(exc).__name__}"
        name = str(answer[0].target).rstrip(".")
        if not VALID_NAME.fullmatch(name):
            return TEMPUNAVAIL, f"PTR lookup of {address} gave an invalid name {name!r}"
        return self.confirm(name, ipaddress.ip_address(address))

    def confirm(self, name, address):
        """Forward-confirm `name`: one of its addresses must be the client's."""
        failed = False
        for rdtype, enabled in self.families.items():
            if not enabled:
                continue
            try:
                answer = self.resolver.resolve(name, rdtype)
            except self.no_name:
                continue
            except self.failure:
                failed = True
                continue
            if any(ipaddress.ip_address(record.address) == address for record in answer):
                return name, None
        if failed:
            return TEMPUNAVAIL, f"forward lookup of {name!r} failed"
        return UNAVAILABLE, None


def _server(text):
    """"127.0.0.1", "127.0.0.1:5353", "[::1]:5353" -> (address, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 53
