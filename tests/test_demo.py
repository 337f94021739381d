"""`mailproxy demo` as a user runs it: a subprocess, real curl and stdlib clients.

The demo prints its listeners; the test waits for them (bounded), fetches
the seeded mail through the proxy's IMAP and POP3 listeners, sends a message
through its SMTP listener, finds that message through IMAP, logs carol in
with her password to her OAuth-only backend (the bridge), logs dave in past
his stopped first backend (failover), asks the backend who the client is
(ID), and stops the demo with Ctrl-C (SIGINT), which must end it cleanly.
"""

import imaplib
import os
import poplib
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 20


@pytest.fixture
def demo():
    process = subprocess.Popen([sys.executable, "mailproxy.py", "demo"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner.append(line)
        if line.startswith("Ctrl-C stops everything"):
            break
    text = "".join(banner)
    ports = dict(re.findall(r"^  (IMAP|POP3|SMTP)  127\.0\.0\.1:(\d+)", text, re.M))
    try:
        assert set(ports) == {"IMAP", "POP3", "SMTP"}, text
        yield process, {name: int(port) for name, port in ports.items()}, text
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        finally:
            process.kill()


def logged_in(port, user, password, subject):
    """imaplib logged in through the proxy, INBOX selected, its first
    message checked by `subject`."""
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    imap.login(user, password)
    imap.select("INBOX")
    status, data = imap.fetch("1", "(BODY[])")
    assert status == "OK" and b"Subject: " + subject in data[0][1]
    return imap


def test_demo_serves_all_three_protocols_end_to_end(demo):
    process, ports, banner = demo
    assert "curl 'imap://alice:wonderland@127.0.0.1:" in banner
    imap = logged_in(ports["IMAP"], "alice", "wonderland", b"Demo message 1 of 2")

    pop = poplib.POP3("127.0.0.1", ports["POP3"], timeout=10)
    pop.user("alice")
    pop.pass_("wonderland")
    assert pop.stat()[0] == 2
    pop.quit()

    smtp = smtplib.SMTP("127.0.0.1", ports["SMTP"], timeout=10)
    smtp.login("bob", "builder")
    smtp.sendmail("bob@demo.test", ["alice@demo.test"],
                  b"Subject: through the proxy\r\n\r\nHello Alice.\r\n")
    smtp.quit()

    imap.noop()
    status, data = imap.search(None, "ALL")
    assert data[0].split() == [b"1", b"2", b"3"]
    status, data = imap.fetch("3", "(BODY[])")
    assert b"Subject: through the proxy" in data[0][1]
    assert b"Authenticated sender: bob" in data[0][1]
    imap.logout()


def test_demo_bridges_a_password_login_to_its_oauth_only_backend(demo):
    """carol's password reaches the proxy; the proxy logs in to the demo
    provider's IMAP backend with an access token, as that takes no LOGIN."""
    process, ports, banner = demo
    backend_port = int(re.search(r"OAuth-only IMAP backend 127\.0\.0\.1:(\d+)", banner)[1])
    logged_in(ports["IMAP"], "carol", "meadow", b"Demo message 1 of 1").logout()
    direct = imaplib.IMAP4("127.0.0.1", backend_port, timeout=10)
    with pytest.raises(imaplib.IMAP4.error, match="OAuth 2.0 tokens only"):
        direct.login("carol", "meadow")
    direct.logout()


def test_demo_fails_over_and_tells_the_backend_the_client_address(demo):
    """dave's first IMAP backend is stopped (proxy_backend_tries 2); the
    backend learns the client's own address (proxy_client_address on)."""
    process, ports, banner = demo
    assert "dave/diver: IMAP backends 127.0.0.1:" in banner
    imap = logged_in(ports["IMAP"], "dave", "diver", b"Demo message 1 of 1")
    assert imap.xatom("ID", "NIL")[0] == "OK"
    assert imap.response("ID")[1] == [b'("name" "mailproxy demo" "client" "127.0.0.1:%d")'
                                      % imap.sock.getsockname()[1]]
    imap.logout()


@pytest.mark.skipif(shutil.which("curl") is None and not os.environ.get("CI"),
                    reason="curl is not installed")
def test_demo_commands_from_the_banner_work(demo):
    process, ports, banner = demo
    fetch = subprocess.run(["curl", "-sS", f"imap://alice:wonderland@127.0.0.1:{ports['IMAP']}"
                            "/INBOX;UID=1"], capture_output=True, timeout=20)
    assert b"Subject: Demo message 1 of 2" in fetch.stdout, fetch.stderr
    listing = subprocess.run(["curl", "-sS", f"pop3://alice:wonderland@127.0.0.1:{ports['POP3']}/"],
                             capture_output=True, timeout=20)
    assert re.fullmatch(rb"1 \d+\r\n2 \d+\r\n", listing.stdout), listing
    send = subprocess.run(["curl", "-sS", f"smtp://127.0.0.1:{ports['SMTP']}", "--user",
                           "bob:builder", "--mail-from", "bob@demo.test", "--mail-rcpt",
                           "alice@demo.test", "-T", "-"],
                          input=b"Subject: hello\r\n\r\nHi Alice!\r\n", capture_output=True,
                          timeout=20)
    assert send.returncode == 0, send.stderr
    fetch = subprocess.run(["curl", "-sS", f"imap://alice:wonderland@127.0.0.1:{ports['IMAP']}"
                            "/INBOX;UID=3"], capture_output=True, timeout=20)
    assert b"Hi Alice!" in fetch.stdout
    bearer = subprocess.run(["curl", "-sS", "--oauth2-bearer", "demo-token-alice",
                             f"imap://alice@127.0.0.1:{ports['IMAP']}/INBOX;UID=1"],
                            capture_output=True, timeout=20)
    assert b"Subject: Demo message 1 of 2" in bearer.stdout, bearer.stderr
    assert "curl --oauth2-bearer demo-token-alice 'imap://alice@127.0.0.1:" in banner
