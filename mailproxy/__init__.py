"""mailproxy: an IMAP, POP3 and SMTP proxy in the mould of nginx's mail module.

One login, followed through the modules in the order it touches them:

    cli.py        `mailproxy -c mail.conf` reads the command line,
    config.py     reads the nginx-syntax file (directives.py is the table;
                  values.py and addresses.py parse the arguments),
    server.py     opens one listener per `listen` and hands each accepted
                  connection to a handler thread, which runs
    session.py    the protocol-independent dialogue: greet, read commands
                  under the `timeout` deadline, dispatch them to
    imap.py       the protocol's own verbs (pop3.py and smtp.py likewise),
    sasl.py       which decode credentials (PLAIN, LOGIN, CRAM-MD5, ...);
    auth_http.py  the auth service says yes (and to which backend) or no;
    backend.py    logs in to that backend on the client's behalf, and
    relay.py      copies bytes both ways, untouched, until one side closes.

stream.py is the bounded line reader under all of them (and waits on the
non-blocking sockets); threads.py keeps finished session threads for the
next session; log.py formats nginx-style log lines.  Everything but cli.py
is importable without click.

The rest is in two folders, and a first reading can skip both:

    ops/          the master process, counters and the status page, traces,
                  the PROXY protocol, the SMTP client's host name
    reference/    the reference auth service (`mailproxy auth-service`) and
                  `mailproxy demo` with its in-memory mail backends
"""

__version__ = "0.1.0"
NGINX_COMPAT = "nginx/1.31 mail compatible"
