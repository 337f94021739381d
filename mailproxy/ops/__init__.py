"""Running the proxy in production: what a site needs beyond one login.

    master.py          worker processes, reload and nginx's signals
    metrics.py         counters the processes share; status.py serves them
    trace.py           redacted protocol traces (`trace on`)
    proxy_protocol.py  the PROXY header from a load balancer, and to the backend
    resolver.py        the SMTP client's host name (the `resolver` directive)
    splice.py          bulk relay inside the kernel (os.splice), beside relay.py

The login path (cli.py to relay.py, one level up) calls into these at a
few named points: it counts, traces, reads a PROXY header, looks up a host
name, moves a bulk burst.  A first reader can skip this folder.
"""
