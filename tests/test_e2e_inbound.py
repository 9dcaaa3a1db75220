"""End-to-end: ``twistd -n relay`` accepts mail from real clients into the spool.

The relay runs as a real process on a loopback port; Python's smtplib (and a
raw socket, for pipelining) are the clients; the spool is read back through
its own API.  Outbound delivery points at a loopback port where nothing
listens, so accepted messages stay queued for inspection.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest

from relay.queue.store import Spool
from relayproc import TWISTD, RelayProcess, free_port, relay_env, wait_for_port


def config_text() -> str:
    # Deliveries go nowhere (refused), so messages stay in the spool.
    return f'hostname = "relay.test"\n\n[[routes]]\ndomains = ["*"]\nsmarthost = "127.0.0.1:{free_port()}"\n'


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    proc = RelayProcess(tmp_path_factory.mktemp("inbound"), config_text()).start()
    yield proc
    proc.kill()


def queued(queue_dir: Path) -> dict[str, tuple]:
    """Map queue id -> (envelope, message bytes), read through the spool's API."""
    spool = Spool(str(queue_dir))
    out = {}
    for qid in spool.ids():
        with spool.open_message(qid) as f:
            out[qid] = (spool.load(qid), f.read())
    return out


def queue_id_of(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[-1]


def test_smtplib_message_lands_in_spool_with_exact_bytes(relay):
    """A message sent with smtplib is queued with its envelope and the exact bytes behind one Received header."""
    body = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: t\r\n\r\nline one\r\n.leading dot\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
        s.ehlo("client.example.org")
        code, reply = s.docmd("MAIL FROM:<a@example.org>")
        assert code == 250
        assert s.docmd("RCPT TO:<b@example.net>")[0] == 250
        assert s.docmd("DATA")[0] == 354
        s.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        code, reply = s.getreply()
    assert code == 250, reply
    qid = queue_id_of(reply)
    envelope, data = queued(relay.queue_dir)[qid]
    assert envelope.sender == "a@example.org"
    assert [r.address for r in envelope.recipients] == ["b@example.net"]
    assert envelope.client.helo == "client.example.org"
    assert envelope.client.address == "127.0.0.1"
    assert data.startswith(b"Received: from client.example.org")
    assert data.count(b"Received:") == 1
    assert f"id {qid}".encode() in data.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    assert data.endswith(body)
    assert envelope.size == len(data)


def test_eight_bit_and_smtputf8_message_is_stored_unchanged(relay):
    """An 8-bit body with an SMTPUTF8 envelope keeps every byte and the UTF-8 addresses."""
    body = "From: jörg@bücher.example\r\nSubject: grüße\r\n\r\nÄrger mit Umlauten: äöü ß\r\n".encode()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
        s.command_encoding = "utf-8"
        s.ehlo("client.example.org")
        assert s.has_extn("smtputf8") and s.has_extn("8bitmime")
        code, reply = s.docmd("MAIL FROM:<jörg@bücher.example> BODY=8BITMIME SMTPUTF8")
        assert code == 250, reply
        assert s.docmd("RCPT TO:<empfänger@example.net>")[0] == 250
        assert s.docmd("DATA")[0] == 354
        s.send(body + b".\r\n")
        code, reply = s.getreply()
    assert code == 250, reply
    envelope, data = queued(relay.queue_dir)[queue_id_of(reply)]
    assert envelope.sender == "jörg@bücher.example"
    assert envelope.recipients[0].address == "empfänger@example.net"
    assert envelope.smtputf8 and envelope.body_type == "8BITMIME"
    assert data.endswith(body)


def test_pipelined_transactions_are_answered_in_order(relay):
    """Two whole transactions written in one send get their replies in order and both are queued."""
    msg = b"Subject: pipelined\r\n\r\nhello\r\n.\r\n"
    batch = (
        b"EHLO pipe.example.org\r\n"
        b"MAIL FROM:<p1@example.org>\r\nRCPT TO:<x@example.net>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n" + msg +
        b"MAIL FROM:<p2@example.org>\r\nRCPT TO:<z@example.net>\r\nDATA\r\n" + msg + b"QUIT\r\n"
    )
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        sock.sendall(batch)
        replies = []
        while True:
            line = f.readline()
            if not line:
                break
            if line[3:4] == b" ":
                replies.append(line[:3])
    assert replies == [b"250", b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221"]


def test_open_relay_is_refused_for_untrusted_client(tmp_path):
    """A client outside trusted_networks cannot relay to a foreign domain (554 5.7.1) but may send to relay_domains."""
    config = (
        'hostname = "relay.test"\n[server]\ntrusted_networks = ["10.99.0.0/16"]\n'
        'relay_domains = ["ours.example"]\n'
    )
    with RelayProcess(tmp_path, config) as proc:
        with smtplib.SMTP("127.0.0.1", proc.port, timeout=10) as s:
            s.ehlo("outsider.example")
            assert s.docmd("MAIL FROM:<x@outsider.example>")[0] == 250
            code, reply = s.docmd("RCPT TO:<victim@elsewhere.example>")
            assert (code, reply[:5]) == (554, b"5.7.1")
            assert s.docmd("RCPT TO:<postmaster@ours.example>")[0] == 250


def test_sigkill_right_after_250_leaves_a_complete_entry(tmp_path):
    """Killing the daemon with SIGKILL right after the 250 leaves a complete, loadable spool entry."""
    body = b"Subject: durable\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100
    proc = RelayProcess(tmp_path, config_text()).start()
    try:
        with smtplib.SMTP("127.0.0.1", proc.port, timeout=10) as s:
            s.ehlo("client.example.org")
            s.mail("d@example.org")
            s.rcpt("e@example.net")
            code, reply = s.data(body)
            os.kill(proc.proc.pid, signal.SIGKILL)
        assert code == 250
        proc.proc.wait(10)
    finally:
        proc.kill()
    spool = Spool(str(proc.queue_dir))
    spool.recover()
    qid = queue_id_of(reply)
    assert qid in spool.ids()
    with spool.open_message(qid) as f:
        assert f.read().endswith(body)
    assert spool.load(qid).recipients[0].address == "e@example.net"


def test_twistd_relay_with_no_configuration_listens_on_2525(tmp_path):
    """``twistd -n relay`` with no options listens on 127.0.0.1:2525 and spools to ./relay-queue."""
    try:
        with socket.socket() as probe:  # as the relay binds: TIME_WAIT leftovers do not count
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", 2525))
    except OSError:
        pytest.skip("127.0.0.1:2525 is in use on this machine")
    proc = subprocess.Popen(
        [*TWISTD, "-n", "--logfile", "relay.log", "--pidfile", "", "relay"],
        cwd=tmp_path, env=relay_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", 2525, 20, proc)
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as s:
            code, _ = s.ehlo("client.example.org")
            assert code == 250
            assert s.has_extn("pipelining") and s.has_extn("enhancedstatuscodes")
            s.mail("a@example.org")
            # An address literal on loopback: delivery, which may already be under way, never
            # asks the system resolver nor leaves the machine.
            s.rcpt("b@[127.0.0.1]")
            code, reply = s.data(b"Subject: default\r\n\r\nhi\r\n")
        assert code == 250
        # The spool directory and the log tell where it went.
        assert (tmp_path / "relay-queue" / "queue.db").is_file()
        wait_until_logged = queue_id_of(reply)
        assert wait_until_logged in (tmp_path / "relay.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
