"""Server names: several server{} blocks on one address, told apart by the
name a TLS client asks for (SNI, RFC 6066 section 3).

As in nginx's http module, `server_name` takes several names, and the
first is the server's own (the SMTP greeting, the APOP/CRAM-MD5 salt, the
EHLO sent to a backend).  A name is matched as nginx matches a Host:

    1. an exact name                          mail.example.org
    2. the longest leading wildcard           *.example.org (and .example.org,
                                              which also matches example.org)
    3. the longest trailing wildcard          mail.*
    4. else the first server on the address (also for a client without SNI)

nginx's regular expressions (`~...`) are not supported.

`shared_addresses()` groups the `listen` entries of all servers by the
address they open, and refuses, with nginx-style file:line errors, what
cannot work: servers on one address that speak different protocols, whose
`listen` parameters differ, that share a name, or that a client could
never reach (only a TLS client names the server it wants).  `NameTable`
is the lookup one address's sessions use.
"""

from .conffile import ConfigError

WILDCARD = "*"


class NameTable:
    """Names -> values (server{} blocks), looked up in nginx's order."""

    def __init__(self):
        self.exact = {}
        self.leading = {}           # "example.org" -> (value, matches the bare name too)
        self.trailing = {}          # "mail" -> value, for "mail.*"

    def add(self, name, value):
        """Add one name; returns the other value already holding it, if any."""
        name = name.lower()
        if name.startswith(("*.", ".")):
            table, key, entry = self.leading, name.partition(".")[2], (value, name[0] == ".")
        elif name.endswith(".*"):
            table, key, entry = self.trailing, name[:-2], value
        else:
            table, key, entry = self.exact, name, value
        held = table.get(key)
        if table is self.leading and held is not None and held[0] == value:
            entry = (value, held[1] or entry[1])    # "*.x" and ".x" of one server
        elif held is not None:
            return held[0] if table is self.leading else held
        table[key] = entry
        return None

    def pick(self, name, default):
        """The value for a client's server name (None: it sent none)."""
        if not name:
            return default
        name = name.lower().rstrip(".")
        if name in self.exact:
            return self.exact[name]
        labels = name.split(".")
        for start in range(len(labels)):            # longest suffix first
            held = self.leading.get(".".join(labels[start:]))
            if held and (start > 0 or held[1]):
                return held[0]
        for end in range(len(labels) - 1, 0, -1):   # longest prefix first
            held = self.trailing.get(".".join(labels[:end]))
            if held is not None:
                return held
        return default


def server_names(server):
    """The names of one server{} (ServerConfig), its own name first."""
    setting = server.settings["server_name"]
    return tuple(setting.args) or (setting.value,)


def check_names(server):
    """nginx's checks of each name: a wildcard only as a whole first or
    last label, and no regular expression."""
    where = server.settings["server_name"].where
    for name in server_names(server):
        if name.startswith("~"):
            raise ConfigError(f'regular expression server names are not supported: "{name}"',
                              where)
        stripped = name[2:] if name.startswith("*.") else \
            name[:-2] if name.endswith(".*") else name
        if WILDCARD in stripped or (name.startswith(".") and len(name) < 2):
            raise ConfigError(f'invalid server name or wildcard "{name}"', where)


def shared_addresses(servers):
    """{(family, host, port): [(server index, Listen entry), ...]} for every
    address some `listen` opens, in the file's order (the first server is
    the address's default); ConfigError for what cannot share it."""
    addresses = {}
    for index, server in enumerate(servers):
        for entry in server.listens:
            members = addresses.setdefault((entry.family, entry.host, entry.port), [])
            if any(held == index for held, _ in members):
                raise ConfigError(f'duplicate "{entry.name}" address and port pair',
                                  entry.where)
            members.append((index, entry))
    for members in addresses.values():
        if len(members) > 1:
            _check_shared(servers, members)
    return addresses


def _check_shared(servers, members):
    first_index, first = members[0]
    first_server = servers[first_index]
    clear = [entry for index, entry in members
             if not entry.ssl and servers[index].starttls not in ("on", "only")]
    if len(clear) == len(members):          # nginx's own case: no TLS, no names
        raise ConfigError(f'duplicate "{first.name}" address and port pair', members[1][1].where)
    if clear:
        raise ConfigError(f'a server{{}} without TLS shares "{first.name}": a client picks '
                          'one of the servers on an address by its TLS server name, so each '
                          'needs "listen ... ssl" or "starttls on|only"', clear[0].where)
    names = NameTable()
    for index, entry in members:
        server = servers[index]
        _check_alike(server, entry, first_server, first)
        for name in server_names(server):
            if names.add(name, index) not in (None, index):
                where = server.settings["server_name"].where or entry.where
                raise ConfigError(f'conflicting server name "{name}" on "{entry.name}"',
                                  where)


def _check_alike(server, entry, first_server, first):
    """What one socket, and the sessions it starts, must have in common."""
    if server.protocol != first_server.protocol:
        raise ConfigError(f'protocol "{server.protocol}" differs from "{first_server.protocol}"'
                          f' of the server{{}} at {first_server.where} on "{entry.name}"',
                          entry.where)
    for param in ("ssl", "proxy_protocol"):
        if getattr(entry, param) != getattr(first, param):
            raise ConfigError(f'the "{param}" parameter differs from "listen {first.text}" '
                              f'in {first.where}', entry.where)
    if entry != first:
        raise ConfigError(f'duplicate listen options for "{entry.name}" (the first is '
                          f'"listen {first.text}" in {first.where})', entry.where)
