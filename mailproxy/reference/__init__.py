"""Programs beside the proxy, never on its login path.

    authservice.py     `mailproxy auth-service`: the reference auth service,
                       with oauth_tokens.py, its OAuth 2.0 access tokens
    demo.py            `mailproxy demo`: proxy, auth service and backends at once
    demo_backends.py   the demo's in-memory mail backends (start here), with
                       mailstore.py and backend_*.py, one module per protocol
    demo_oauth.py      the demo's OAuth 2.0 provider: token endpoint, IMAP backend

The proxy talks to them only over the network, as to any auth service or
mail server; a first reader can skip this folder.
"""
