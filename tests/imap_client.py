"""What the IMAP test modules share: the proxy's tagged OK, a client past
the greeting, and a check that the proxy still serves."""

from mailproxy.imap import GREETING, OK


def ok(tag):
    return tag + b" " + OK + b"\r\n"


def greeted(proxy):
    """A client that has read the greeting (use it in a `with`)."""
    client = proxy.client()
    assert client.line() == GREETING
    return client


def assert_serving(proxy):
    """The proxy still greets and answers a new client."""
    with greeted(proxy) as client:
        client.send(b"z NOOP\r\n")
        assert client.line() == ok(b"z")
