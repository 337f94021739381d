"""Small in-memory IMAP, POP3 and SMTP backends for `mailproxy demo`.

These are teaching aids, not mail servers.  They keep mail in memory and
lose it at exit, have one folder (INBOX), no TLS, no quotas and no locking
of a mailbox between sessions, trust XCLIENT from whoever connects, and
speak only the part of each protocol that curl, Python's imaplib, poplib
and smtplib, and a mail client's first steps need.  They exist so that
`mailproxy demo` can show a proxied login on a machine with nothing
installed; a real site puts Dovecot and Postfix behind the proxy.

The shape is the proxy's own, in miniature, one module per part:

- mailstore.py: a `Mailstore` holds every user's mailbox.  The three
  backends share one, so a message sent through SMTP can be read through
  IMAP or POP3.
- backend_common.py: `Conversation`, the common base of the handlers, owns
  what every line protocol needs: the greeting, a bounded line reader under
  a read timeout, a `do_VERB` table built when the class is made, the verbs
  legal in each state (one table per protocol, checked in one place), and
  one try/except funnel per connection.  A handler refuses a command by
  raising `Refused` with the reply; the funnel sends it.
- backend_imap.py (with backend_imap_items.py, the message items IMAP
  fetches, stores and searches), backend_pop3.py, backend_smtp.py: one
  handler class each, `ImapBackend`, `Pop3Backend`, `SmtpBackend`, whose
  instance is one conversation with one client.
- this module: each backend is a `socketserver.ThreadingTCPServer`
  (`BackendServer`); `start_backends()` serves the three on loopback from
  named threads and returns a `DemoBackends` whose `close()` ends
  listeners and connections.

The backends check the password the proxy replays at login (IMAP LOGIN,
POP3 USER/PASS), as a real backend would; the SMTP backend, like Postfix
behind the proxy, takes the login the proxy names in XCLIENT.
"""

import logging
import socket
import socketserver
import threading

from .backend_imap import ImapBackend
from .backend_pop3 import Pop3Backend
from .backend_smtp import SmtpBackend

log = logging.getLogger("mailproxy.demo")

POLL_INTERVAL = 0.1         # serve_forever's shutdown check: close() waits at most this per server


class BackendServer(socketserver.ThreadingTCPServer):
    """One demo backend's listener.  It knows the store, and the open
    connections, so that `end_connections()` can end them at close."""

    allow_reuse_address = True

    def __init__(self, address, handler, store):
        self.store = store
        # The accept thread adds connections, handler threads remove them,
        # and close() ends them all from yet another thread.
        self._connections_lock = threading.Lock()
        self._connections = set()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def end_connections(self):
        """Shut every open connection, so its handler thread sees EOF."""
        with self._connections_lock:
            live = list(self._connections)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.exception("demo %s backend: unexpected error with %s:%s",
                      self.RequestHandlerClass.protocol, *client_address[:2])


class DemoBackends:
    """The three backends, serving; `close()` stops them (also on `with` exit)."""

    def __init__(self, store, servers):
        self.store = store
        self.servers = servers          # {"imap": BackendServer, "pop3": ..., "smtp": ...}
        self.threads = [threading.Thread(target=server.serve_forever, name=f"demo {name} backend",
                                         kwargs={"poll_interval": POLL_INTERVAL})
                        for name, server in servers.items()]
        for thread in self.threads:
            thread.start()

    @property
    def imap_port(self):
        return self.servers["imap"].server_address[1]

    @property
    def pop3_port(self):
        return self.servers["pop3"].server_address[1]

    @property
    def smtp_port(self):
        return self.servers["smtp"].server_address[1]

    def close(self):
        """Stop accepting, end open conversations, join every thread."""
        for server in self.servers.values():
            server.shutdown()
        for server in self.servers.values():
            server.end_connections()
            server.server_close()       # joins the handler threads (block_on_close)
        for thread in self.threads:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_backends(store, host="127.0.0.1", ports=(0, 0, 0)):
    """Serve IMAP, POP3 and SMTP from `store` on (imap, pop3, smtp) `ports`
    (0: any free port); a DemoBackends with the ports and `close()`."""
    servers = {}
    try:
        for (name, handler), port in zip((("imap", ImapBackend), ("pop3", Pop3Backend),
                                          ("smtp", SmtpBackend)), ports):
            servers[name] = BackendServer((host, port), handler, store)
    except OSError:
        for server in servers.values():
            server.server_close()
        raise
    return DemoBackends(store, servers)
