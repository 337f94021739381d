"""The test peers themselves work, before any proxy stands between them.

If one of these fails, every proxy test built on that peer would fail for a
reason that has nothing to do with the proxy; these tests say so first.
"""

import base64
import hashlib
import imaplib
import os
import poplib
import smtplib
import socket
import time

import pytest
import requests

import fakes
import peers
from conftest import USERS

SEED_TIMEOUT = 5.0      # seconds for an asynchronous effect (log line, delivery)


def make_message(size, subject, extra_lines=()):
    """A CRLF message of about *size* bytes: headers, then base64 lines.

    Lines starting with a dot are mixed in so that SMTP dot-stuffing and
    POP3 byte-stuffing are exercised on the way.
    """
    body_lines = list(extra_lines)
    noise = base64.b64encode(os.urandom(size * 3 // 4))
    body_lines += [noise[i:i + 76] for i in range(0, len(noise), 76)]
    body_lines[len(body_lines) // 2:len(body_lines) // 2] = [b'.', b'..dots', b'.leading dot']
    headers = [b'From: joe@client.test', b'To: ann@backend.test',
               b'Subject: ' + subject.encode(), b'Message-ID: <' + subject.encode() + b'@test>']
    return b'\r\n'.join(headers + [b''] + body_lines) + b'\r\n'


def wait_until(condition, timeout=SEED_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


# --- Dovecot -----------------------------------------------------------------

def test_dovecot_imap_login_and_fetch_3mb_byte_exact(dovecot):
    message = make_message(3 * 1024 * 1024, 'imap-3mb')
    dovecot.add_message('joe', message)
    client = imaplib.IMAP4(peers.LOOPBACK, dovecot.imap_port)
    try:
        assert client.login('joe', USERS['joe'])[0] == 'OK'
        client.select('INBOX', readonly=True)
        status, found = client.uid('SEARCH', 'HEADER', 'Message-ID', '<imap-3mb@test>')
        assert status == 'OK' and len(found[0].split()) == 1
        status, data = client.uid('FETCH', found[0], '(BODY.PEEK[])')
        assert status == 'OK'
        fetched = data[0][1]
        assert hashlib.sha256(fetched).hexdigest() == hashlib.sha256(message).hexdigest()
    finally:
        client.logout()


def test_dovecot_imap_login_quotes_password_with_spaces(dovecot):
    client = imaplib.IMAP4(peers.LOOPBACK, dovecot.imap_port)
    try:
        assert client.login('ann', USERS['ann'])[0] == 'OK'
    finally:
        client.logout()


def test_dovecot_rejects_wrong_password_at_once(dovecot):
    client = imaplib.IMAP4(peers.LOOPBACK, dovecot.imap_port)
    started = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match='AUTHENTICATIONFAILED'):
        client.login('joe', 'wrong')
    assert time.monotonic() - started < 1.0     # auth_failure_delay = 0
    client.shutdown()


def test_dovecot_pop3_login_and_retr(dovecot):
    message = make_message(64 * 1024, 'pop3-retr', extra_lines=[b'.starts with a dot'])
    dovecot.add_message('ann', message)
    client = poplib.POP3(peers.LOOPBACK, dovecot.pop3_port)
    try:
        client.user('ann')
        assert client.pass_(USERS['ann']).startswith(b'+OK')
        count, _ = client.stat()
        _, lines, _ = client.retr(count)          # the newest message is last
        assert b'\r\n'.join(lines) + b'\r\n' == message
    finally:
        client.quit()


def test_dovecot_start_failure_quotes_its_log():
    broken = peers.Dovecot(None, users={'joe': 'secret'}, extra_config='no_such_setting = 1')
    with pytest.raises(peers.PeerStartError, match='no_such_setting'):
        broken.start()
    broken.stop()


def test_dovecot_stop_leaves_no_process():
    with peers.Dovecot(None, users={'joe': 'secret'}) as dovecot:
        master = dovecot._process.pid
        tree = [master] + peers._descendants(master)
        assert len(tree) > 1
    assert not any(os.path.exists(f'/proc/{pid}') for pid in tree)   # reaped too
    assert not dovecot.workdir.exists()


# --- Postfix -----------------------------------------------------------------

def test_postfix_accepts_xclient_and_delivers_byte_exact(postfix):
    message = make_message(2 * 1024 * 1024, 'smtp-xclient')
    before = len(postfix.deliveries())
    with smtplib.SMTP(peers.LOOPBACK, postfix.port, local_hostname='client.test') as client:
        client.ehlo()
        assert client.has_extn('xclient')
        code, _ = client.docmd('XCLIENT', 'ADDR=127.0.0.9 LOGIN=joe NAME=[UNAVAILABLE]')
        assert code == 220                      # XCLIENT restarts the session
        client.ehlo()
        client.sendmail('joe@client.test', ['ann@backend.test'], message)

    delivery = postfix.wait_delivered(before + 1)[before]
    assert delivery.sender == 'joe@client.test'
    assert delivery.recipients == ['ann@backend.test']
    assert delivery.data.startswith(b'Received: ')
    assert delivery.data.endswith(message)
    assert delivery.body == message.partition(b'\r\n\r\n')[2]
    assert wait_until(lambda: 'sasl_username=joe' in postfix.maillog_text())
    assert 'client=unknown[127.0.0.9]' in postfix.maillog_text()


def test_postfix_stop_leaves_no_process_and_unregisters_its_config():
    with peers.Postfix() as postfix:
        master = postfix._master_pid
        tree = [master] + peers._descendants(master)
        assert len(tree) > 1
        assert str(postfix.config_dir) in peers._alternate_dirs()
    assert not any(os.path.exists(f'/proc/{pid}') for pid in tree)   # reaped too
    assert str(postfix.config_dir) not in peers._alternate_dirs()
    assert not postfix.workdir.exists()


# --- helpers -------------------------------------------------------------------

def test_free_port_is_free_and_wait_port_times_out():
    port = peers.free_port()
    with pytest.raises(TimeoutError):
        peers.wait_port(peers.LOOPBACK, port, timeout=0.2)
    with socket.create_server((peers.LOOPBACK, port)):
        peers.wait_port(peers.LOOPBACK, port, timeout=1.0)


# --- ScriptedAuthService -----------------------------------------------------

def test_auth_service_records_raw_requests_over_one_keepalive_connection():
    with fakes.ScriptedAuthService(fakes.ok('127.0.0.1', 1143, Auth_Pass='x')) as auth:
        session = requests.Session()
        for user in ('joe', 'ann'):
            reply = session.get(auth.url, headers={
                'Auth-Method': 'plain', 'Auth-User': user, 'Auth-Pass': 'pa ss%20'})
            assert reply.status_code == 200
            assert reply.headers['Auth-Server'] == '127.0.0.1'
            assert reply.headers['Auth-Port'] == '1143'
            assert reply.headers['Auth-Pass'] == 'x'
        session.close()
        first, second = auth.wait_requests(2)
    assert auth.connections == 1
    assert (first.method, first.target, first.version) == ('GET', '/auth', 'HTTP/1.1')
    names = [name for name, _ in first.headers]
    assert names.index('Auth-Method') < names.index('Auth-User') < names.index('Auth-Pass')
    assert first.header('auth-pass') == 'pa ss%20'
    assert b'\r\nAuth-User: joe\r\nAuth-Pass: pa ss%20\r\n' in first.raw
    assert first.raw.startswith(b'GET /auth HTTP/1.1\r\n') and first.raw.endswith(b'\r\n\r\n')
    assert second.header('Auth-User') == 'ann'


def test_auth_service_http10_request_gets_http10_reply_and_close():
    with fakes.ScriptedAuthService(fakes.fail('Bad login', wait=3)) as auth:
        reply = exchange(auth.port, b'GET /auth HTTP/1.0\r\nAuth-User: joe\r\n\r\n')
    assert reply == (b'HTTP/1.0 200 OK\r\nAuth-Status: Bad login\r\nAuth-Wait: 3\r\n'
                     b'Content-Length: 0\r\nConnection: close\r\n\r\n')


def test_auth_service_raw_reply_is_sent_verbatim_then_closed():
    garbage = b'HTTP/1.0 200 OK\r\nAuth_Status: OK\r\nAuth-Server: ' + b'x' * 5000 + b'\r\n'
    with fakes.ScriptedAuthService(garbage) as auth:
        assert exchange(auth.port, b'GET /auth HTTP/1.0\r\n\r\n') == garbage


def test_auth_service_status_tuple_and_sequence():
    replies = fakes.sequence(('503 Service Unavailable', {}),
                             fakes.fail(wait=0), fakes.ok('127.0.0.1', 110))
    with fakes.ScriptedAuthService(replies) as auth, requests.Session() as session:
        got = [session.get(auth.url) for _ in range(4)]
    assert [r.status_code for r in got] == [503, 200, 200, 200]
    assert [r.headers.get('Auth-Status') for r in got] == [
        None, 'Invalid login or password', 'OK', 'OK']
    assert got[1].headers['Auth-Wait'] == '0'


def test_auth_service_hang_is_cut_short_by_close():
    auth = fakes.ScriptedAuthService(fakes.Hang(60))
    with pytest.raises(requests.Timeout):
        requests.get(auth.url, timeout=0.3)
    started = time.monotonic()
    auth.close()
    assert time.monotonic() - started < 2.0


# --- ScriptedBackend ---------------------------------------------------------

def test_backend_runs_script_and_echoes():
    script = [('send', b'* OK ready\r\n'), ('expect', b'a LOGIN {3}\r\n'),
              ('send', b'+ go\r\n'), ('expect', b'joe'), ('recv_line',),
              ('send', b'a OK in\r\n'), ('echo',)]
    payload = os.urandom(1024 * 1024)
    with fakes.ScriptedBackend(script) as backend:
        with socket.create_connection((backend.host, backend.port), timeout=5) as client:
            reader = client.makefile('rb')
            assert reader.readline() == b'* OK ready\r\n'
            client.sendall(b'a LOGIN {3}\r\n')
            assert reader.readline() == b'+ go\r\n'
            client.sendall(b'joe secret\r\n')
            assert reader.readline() == b'a OK in\r\n'
            echoed = relay_through(client, reader, payload)
        record, = backend.wait_connections(1)
    assert echoed == payload
    assert backend.errors == []
    assert record.reads == [b'a LOGIN {3}\r\n', b'joe', b' secret\r\n']
    assert backend.received == [b'a LOGIN {3}\r\njoe secret\r\n' + payload]


def test_backend_sink_records_size_and_sha256():
    payload = os.urandom(2 * 1024 * 1024 + 7)
    with fakes.ScriptedBackend([('send', b'+OK\r\n'), ('sink',)]) as backend:
        with socket.create_connection((backend.host, backend.port), timeout=5) as client:
            assert client.recv(16) == b'+OK\r\n'
            client.sendall(payload)
        record, = backend.wait_connections(1)
    assert record.sink_size == len(payload)
    assert record.sink_sha256 == hashlib.sha256(payload).hexdigest()


def test_backend_records_expect_mismatch_and_closes():
    with fakes.ScriptedBackend([('expect', b'a LOGIN\r\n'), ('send', b'never\r\n')]) as backend:
        with socket.create_connection((backend.host, backend.port), timeout=5) as client:
            client.sendall(b'b NOPE\r\n')
            assert client.recv(16) == b''
        backend.wait_connections(1)
    assert backend.errors == ["connection 0: expected b'a LOGIN\\r\\n', got b'b NOPE\\r\\n'"]


def test_backend_per_connection_script_reset_and_sleep_cut_by_close():
    # The reset waits for the client's line: an RST that overtakes unread
    # bytes makes the kernel drop them, and recv() would see only the reset.
    scripts = {0: [('send', b'first\r\n'), ('recv_line',), ('reset',)]}
    backend = fakes.ScriptedBackend(lambda index: scripts.get(index, [('sleep', 60)]))
    with socket.create_connection((backend.host, backend.port), timeout=5) as client:
        assert client.recv(16) == b'first\r\n'
        client.sendall(b'read it\r\n')
        with pytest.raises(ConnectionResetError):
            client.recv(16)
    sleeper = connect_retrying(backend)
    backend.wait_connections(2, finished=False)
    started = time.monotonic()
    backend.close()
    sleeper.close()
    assert time.monotonic() - started < 2.0
    assert all(r.done.is_set() for r in backend.connections)


def connect_retrying(backend, attempts=3):
    """Right after a reset, a busy CI machine once refused the next connect
    with a reset of its own; that is not what this test is about."""
    for attempt in range(attempts):
        try:
            return socket.create_connection((backend.host, backend.port), timeout=5)
        except ConnectionResetError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)


def exchange(port, request):
    """Send *request* on a fresh connection; read the reply until EOF."""
    with socket.create_connection((peers.LOOPBACK, port), timeout=5) as client:
        client.sendall(request)
        return read_to_eof(client)


def relay_through(client, reader, payload):
    """Send *payload*, half-close, and return everything read back."""
    client.sendall(payload)
    client.shutdown(socket.SHUT_WR)
    return reader.read()


def read_to_eof(sock):
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b''.join(chunks)
