"""Programs beside the proxy, never on its login path.

    authservice.py     `mailproxy auth-service`: the reference auth service
    demo.py            `mailproxy demo`: proxy, auth service and backends at once
    demo_backends.py   the demo's in-memory mail backends (start here), with
                       mailstore.py and backend_*.py, one module per protocol

The proxy talks to them only over the network, as to any auth service or
mail server; a first reader can skip this folder.
"""
