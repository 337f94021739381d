"""mailproxy: an IMAP, POP3 and SMTP proxy in the mould of nginx's mail module.

One login, followed through the modules in the order it touches them:

    cli.py        `mailproxy -c mail.conf` reads the command line,
    config.py     reads the nginx-syntax file (conffile.py lexes it and
                  follows include; directives.py is the table; values.py
                  and addresses.py parse the arguments),
    server.py     opens one socketserver.ThreadingTCPServer-style listener
                  per `listen`, which starts a handler thread per
                  connection (names.py: several server{} blocks on one
                  address, picked by the TLS server name that hello.py
                  reads from the ClientHello), which runs
    session.py    the protocol-independent dialogue: greet, read commands
                  under the `timeout` deadline, dispatch them to
    imap.py       the protocol's own verbs (pop3.py and smtp.py likewise;
                  words.py says, once for parsers, traces and logs, what
                  separates words, what ends a line, what a literal is),
    sasl.py       which decode credentials (PLAIN, LOGIN, CRAM-MD5, ...);
    login.py      then takes the credentials on:
    auth_http.py  the auth service says yes (and to which backend) or no;
    backend.py    logs in to that backend on the client's behalf (with
                  backend_sasl.py when the auth service names a SASL
                  mechanism, an OAuth 2.0 token's XOAUTH2 too), and
    relay.py      a pair of copy threads moves bytes both ways, untouched,
                  until one side closes.

stream.py is the bounded line reader under all of them (blocking sockets,
each read and write under what is left of the phase's deadline); tls.py
gives a TLS connection the same face; ops/splice.py moves bulk bytes inside
the kernel beside relay.py's copy loop; auth_transport.py carries
auth_http.py's requests under one deadline; listening.py opens the listening
sockets; log.py formats nginx-style log lines.  Everything but cli.py is
importable without click.

The rest is in two folders, and a first reading can skip both:

    ops/          the master process, counters and the status page, traces,
                  the PROXY protocol, the SMTP client's host name
    reference/    the reference auth service (`mailproxy auth-service`) and
                  `mailproxy demo` with its in-memory mail backends
"""

__version__ = "0.1.0"
NGINX_COMPAT = "nginx/1.31 mail compatible"
