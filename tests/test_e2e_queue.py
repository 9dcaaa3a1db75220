"""End-to-end queue management: retries, bounces, expiry, restart, flush, ETRN, hold.

The relay runs as a real ``twistd -n relay`` process with retry timers of
seconds; a twisted.names DNS server on loopback serves the test zone and
aiosmtpd servers on distinct 127.0.0.x addresses (one shared port, set by
``[delivery] port``) play the recipients' and the senders' MX hosts.  An MX
that is "down" is an address nobody listens on.  ``relay-queue`` runs as a
real subprocess against the relay's spool.  Every wait is bounded.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib
import subprocess
import sys
import threading
from typing import Callable, Optional

import pytest

from dnsserver import start_dns_server
from relayproc import RelayProcess, free_port, relay_env, wait_until
from smtpsink import Received, SMTPSink

SENDER_MX = "127.0.0.30"
RETRY_MX = "127.0.0.31"
REJECT_MX = "127.0.0.32"
EXPIRE_MX = "127.0.0.33"  # never listened on
EXPIRE_SENDER_MX = "127.0.0.34"
NULL_REJECT_MX = "127.0.0.35"
NULL_SENDER_MX = "127.0.0.36"
BULK_MX = "127.0.0.37"
FLUSH_MX = "127.0.0.38"
ETRN_MX = "127.0.0.39"
HOLD_MX = "127.0.0.40"
ORIGIN_MX = "127.0.0.41"  # never listened on: notifications about the other tests stay queued
SMALL_MX = "127.0.0.42"  # advertises SIZE 200
SMALL_SENDER_MX = "127.0.0.43"

ZONE = {
    "sender.test": {"MX": [[10, "mx.sender.test"]]},
    "mx.sender.test": {"A": [SENDER_MX]},
    "retry.test": {"MX": [[10, "mx.retry.test"]]},
    "mx.retry.test": {"A": [RETRY_MX]},
    "reject.test": {"MX": [[10, "mx.reject.test"]]},
    "mx.reject.test": {"A": [REJECT_MX]},
    "expire.test": {"MX": [[10, "mx.expire.test"]]},
    "mx.expire.test": {"A": [EXPIRE_MX]},
    "expiresender.test": {"MX": [[10, "mx.expiresender.test"]]},
    "mx.expiresender.test": {"A": [EXPIRE_SENDER_MX]},
    "nullreject.test": {"MX": [[10, "mx.nullreject.test"]]},
    "mx.nullreject.test": {"A": [NULL_REJECT_MX]},
    "nullsender.test": {"MX": [[10, "mx.nullsender.test"]]},
    "mx.nullsender.test": {"A": [NULL_SENDER_MX]},
    "bulk.test": {"MX": [[10, "mx.bulk.test"]]},
    "mx.bulk.test": {"A": [BULK_MX]},
    "flush.test": {"MX": [[10, "mx.flush.test"]]},
    "mx.flush.test": {"A": [FLUSH_MX]},
    "etrn.test": {"MX": [[10, "mx.etrn.test"]]},
    "mx.etrn.test": {"A": [ETRN_MX]},
    "hold.test": {"MX": [[10, "mx.hold.test"]]},
    "mx.hold.test": {"A": [HOLD_MX]},
    "origin.test": {"MX": [[10, "mx.origin.test"]]},
    "small.test": {"MX": [[10, "mx.small.test"]]},
    "mx.small.test": {"A": [SMALL_MX]},
    "smallsender.test": {"MX": [[10, "mx.smallsender.test"]]},
    "mx.smallsender.test": {"A": [SMALL_SENDER_MX]},
    "mx.origin.test": {"A": [ORIGIN_MX]},
}

ORIGIN = "app@origin.test"
QUEUED_AS = re.compile(rb"queued as (\S+)")
CLI_TIMEOUT = 30.0
NULL_SENDER = ("", "<>")  # how aiosmtpd records MAIL FROM:<>


# -- the world ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """The DNS server and the shared MX port for the module; the server is stopped by its PID."""
    tmp = tmp_path_factory.mktemp("queue-world")
    dns_port, stop_dns = start_dns_server(ZONE, tmp)
    request.addfinalizer(stop_dns)
    return {"dns_port": dns_port, "port": free_port(RETRY_MX)}


@pytest.fixture
def start_sink(world, request) -> Callable[..., SMTPSink]:
    """Start an aiosmtpd MX on an address at the shared port; stopped when the test ends."""

    def start(host: str, **kwargs) -> SMTPSink:
        sink = SMTPSink(host, world["port"], **kwargs)
        sink.start()
        request.addfinalizer(sink.stop)
        return sink

    return start


@pytest.fixture
def start_relay(world, tmp_path, request) -> Callable[..., RelayProcess]:
    """Start a relay in this test's directory with the given [queue] timers; killed by its PID at the end.

    Called again, it starts a new daemon on the same directory and spool.
    """

    def start(min_retry: str = "1s", max_retry: str = "2s", max_lifetime: str = "60s") -> RelayProcess:
        relay = RelayProcess(tmp_path / "relay", f'''
hostname = "relay-q.test"

[queue]
min_retry = "{min_retry}"
max_retry = "{max_retry}"
max_lifetime = "{max_lifetime}"

[delivery]
port = {world["port"]}
nameservers = ["127.0.0.1:{world["dns_port"]}"]
''')
        request.addfinalizer(relay.kill)
        relay.start()
        return relay

    return start


# -- helpers -----------------------------------------------------------------------


def message(subject: str, message_id: Optional[str] = None) -> bytes:
    mid = message_id or f"<{subject.replace(' ', '.')}@origin.test>"
    return (
        f"From: {ORIGIN}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n\r\nbody of {subject}\r\n"
    ).encode("ascii")


def submit(s: smtplib.SMTP, sender: str, recipients: list[str], data: bytes) -> str:
    """One transaction on an open session; the queue id from the 250 reply."""
    code, text = s.mail(sender)
    assert code == 250, text
    for rcpt in recipients:
        code, text = s.rcpt(rcpt)
        assert code == 250, text
    code, text = s.data(data)
    assert code == 250, text
    found = QUEUED_AS.search(text)
    assert found, text
    return found.group(1).decode("ascii")


def send(relay: RelayProcess, sender: str, recipients: list[str], data: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
        s.ehlo("client.origin.test")
        return submit(s, sender, recipients, data)


def relay_queue(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli.queue", "--queue", str(relay.queue_dir), *args],
        capture_output=True, text=True, env=relay_env(), timeout=CLI_TIMEOUT,
    )


def queue_list(relay: RelayProcess) -> list[dict]:
    done = relay_queue(relay, "list", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def queued(relay: RelayProcess, queue_id: str) -> Optional[dict]:
    return next((m for m in queue_list(relay) if m["id"] == queue_id), None)


def flush(relay: RelayProcess, *args: str) -> int:
    done = relay_queue(relay, "flush", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["scheduled"]


def wait_attempted(relay: RelayProcess, queue_id: str, attempts: int = 1) -> dict:
    """Wait until every recipient of ``queue_id`` has at least ``attempts`` attempts recorded."""
    def attempted():
        entry = queued(relay, queue_id)
        if entry and all(r["attempts"] >= attempts for r in entry["recipients"]):
            return entry
        return None
    return wait_until(attempted, what=f"attempt {attempts} of {queue_id}\n{relay.log()[-3000:]}")


def wait_gone(relay: RelayProcess, queue_id: str, timeout: float = 20.0) -> None:
    wait_until(lambda: queued(relay, queue_id) is None, timeout=timeout,
               what=f"{queue_id} to leave the queue\n{relay.log()[-3000:]}")


def wait_logged(relay: RelayProcess, text: str) -> None:
    """Wait (bounded) for ``text`` in the relay's log file."""
    wait_until(lambda: text in relay.log(), what=f"{text!r} in the log\n{relay.log()[-3000:]}")


def messages_to(sink: SMTPSink, address: str) -> list[Received]:
    with sink.lock:
        return [m for m in sink.messages if address in m.recipients]


def wait_message(sink: SMTPSink, address: str, timeout: float = 20.0) -> list[Received]:
    return wait_until(lambda: messages_to(sink, address), timeout=timeout, what=f"{address} at {sink.host}")


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def dsn_groups(dsn: email.message.EmailMessage) -> list:
    """The field groups of the message/delivery-status part (per-message first)."""
    parts = list(dsn.iter_parts())
    assert len(parts) == 3, [p.get_content_type() for p in parts]
    assert parts[1].get_content_type() == "message/delivery-status"
    return parts[1].get_payload()


def recipient_group(dsn: email.message.EmailMessage, address: str):
    for group in dsn_groups(dsn)[1:]:
        if address in str(group.get("Final-Recipient", "")):
            return group
    raise AssertionError(f"no delivery-status group for {address}")


class Counter:
    """A scripted reply for the first ``times`` calls, then acceptance; counts every call."""

    def __init__(self, reply: str, times: int) -> None:
        self.reply, self.times, self.calls = reply, times, 0
        self.lock = threading.Lock()

    def __call__(self, *_: object) -> Optional[str]:
        with self.lock:
            self.calls += 1
            return self.reply if self.calls <= self.times else None


# -- scenarios ---------------------------------------------------------------------


def test_two_temporary_failures_then_one_delivery(start_relay, start_sink):
    """An MX answering 451 twice and then 250 gets the message exactly once, at the third attempt."""
    data_reply = Counter("451 4.3.0 try again later", 2)
    sink = start_sink(RETRY_MX, data_reply=data_reply)
    relay = start_relay()
    queue_id = send(relay, ORIGIN, ["user@retry.test"], message("retry twice"))
    wait_message(sink, "user@retry.test")
    wait_gone(relay, queue_id)
    assert len(messages_to(sink, "user@retry.test")) == 1
    assert data_reply.calls == 3
    wait_logged(relay, f"{queue_id}: done (1 delivered, 0 failed), removed")
    log = relay.log()
    assert log.count(f"{queue_id}: deferred") == 2, log


def test_permanent_failure_sends_a_dsn_to_the_sender(start_relay, start_sink):
    """A 550 from the MX makes a multipart/report DSN from <> reach the sender's MX, with the original headers."""
    start_sink(REJECT_MX, rcpt_reply=lambda address: "550 5.1.1 no such user here")
    sender_mx = start_sink(SENDER_MX)
    relay = start_relay()
    queue_id = send(relay, "alice@sender.test", ["nobody@reject.test"],
                    message("doomed", "<doomed.1@sender.test>"))
    arrived = wait_message(sender_mx, "alice@sender.test")
    assert len(arrived) == 1
    assert arrived[0].sender in NULL_SENDER  # the DSN's envelope sender is <>
    dsn = parse(arrived[0].data)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    group = recipient_group(dsn, "nobody@reject.test")
    assert str(group["Action"]).strip().lower() == "failed"
    assert re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", str(group["Status"]).strip())
    assert "550" in str(group.get("Diagnostic-Code", ""))
    headers = list(dsn.iter_parts())[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    original = headers.get_payload(decode=True) or headers.get_content().encode()
    assert b"Message-ID: <doomed.1@sender.test>" in original
    assert b"Subject: doomed" in original
    assert b"body of doomed" not in original
    wait_gone(relay, queue_id)


def test_expiry_sends_a_4_4_7_dsn(start_relay, start_sink):
    """A recipient whose MX never answers expires after max_lifetime and its sender gets a DSN with 4.4.7."""
    sender_mx = start_sink(EXPIRE_SENDER_MX)
    relay = start_relay(min_retry="1s", max_retry="1s", max_lifetime="3s")
    queue_id = send(relay, "bob@expiresender.test", ["late@expire.test"], message("too late"))
    arrived = wait_message(sender_mx, "bob@expiresender.test", timeout=20)
    assert len(arrived) == 1 and arrived[0].sender in NULL_SENDER
    group = recipient_group(parse(arrived[0].data), "late@expire.test")
    assert str(group["Status"]).strip() == "4.4.7"
    assert str(group["Action"]).strip().lower() == "failed"
    wait_gone(relay, queue_id)
    wait_logged(relay, f"{queue_id}: to=<late@expire.test> expired after")


def test_size_refusal_dsn_is_relays_own_words(start_relay, start_sink):
    """A message over the MX's SIZE: never offered to it, and the DSN reports relay's decision, not "host said"."""
    small_mx = start_sink(SMALL_MX, data_size_limit=200)
    sender_mx = start_sink(SMALL_SENDER_MX)
    relay = start_relay()
    big = message("too big for mx.small.test") + b"x" * 300 + b"\r\n"
    queue_id = send(relay, "carol@smallsender.test", ["dest@small.test"], big)
    arrived = wait_message(sender_mx, "carol@smallsender.test")
    dsn = parse(arrived[0].data)
    group = recipient_group(dsn, "dest@small.test")
    assert str(group["Status"]).strip() == "5.3.4"
    assert str(group["Diagnostic-Code"]).startswith("X-Relay; 5.3.4 message size ")
    assert "Remote-MTA" not in group
    text = list(dsn.iter_parts())[0].get_content()
    assert "exceeds the remote server's limit of 200 octets" in text and " said: " not in text
    assert small_mx.raw_rcpts == [] and small_mx.messages == []  # the MX never saw MAIL or RCPT
    wait_gone(relay, queue_id)


def test_null_sender_failure_sends_no_dsn(start_relay, start_sink):
    """A message from <> that fails permanently is removed without any notification being sent."""
    reject_mx = start_sink(NULL_REJECT_MX, rcpt_reply=lambda address: "550 5.1.1 no such user here")
    sender_mx = start_sink(NULL_SENDER_MX)
    relay = start_relay()
    data = message("bounce of a bounce").replace(f"From: {ORIGIN}".encode(), b"From: MAILER-DAEMON@nullsender.test")
    queue_id = send(relay, "", ["gone@nullreject.test"], data)
    wait_until(lambda: any("gone@nullreject.test" in r for r in reject_mx.raw_rcpts), what="the refused RCPT")
    wait_gone(relay, queue_id)
    # A DSN would have been spooled before the original was removed: the queue holds nothing more.
    assert queue_list(relay) == []
    assert sender_mx.messages == [] and reject_mx.messages == []
    wait_logged(relay, f"{queue_id}: done (0 delivered, 1 failed), removed")


def test_fifty_deferred_messages_survive_sigkill_and_are_delivered_once(start_relay, start_sink):
    """Fifty messages deferred while the MX is down survive SIGKILL and, after a restart and a flush, arrive once each."""
    relay = start_relay(min_retry="1h", max_retry="2h", max_lifetime="1d")
    ids = []
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
        s.ehlo("client.origin.test")
        for n in range(50):
            ids.append(submit(s, ORIGIN, [f"user{n}@bulk.test"], message(f"bulk {n}", f"<bulk.{n}@origin.test>")))
    assert len(set(ids)) == 50

    def all_deferred():
        entries = queue_list(relay)
        ok = len(entries) == 50 and all(r["attempts"] >= 1 and r["status"] == "pending" and r["last_error"]
                                        for m in entries for r in m["recipients"])
        return entries if ok else None

    entries = wait_until(all_deferred, what=f"50 deferred messages\n{relay.log()[-3000:]}")
    assert sorted(m["id"] for m in entries) == sorted(ids)

    relay.kill()  # SIGKILL
    sink = start_sink(BULK_MX)
    relay = start_relay(min_retry="1h", max_retry="2h", max_lifetime="1d")
    assert len(queue_list(relay)) == 50
    wait_logged(relay, "queue: 50 message(s) scheduled, 0 held")  # the schedule is rebuilt

    assert flush(relay) == 50  # one flush makes every recovered message due

    def delivered_all():
        with sink.lock:
            return len(sink.messages) >= 50

    wait_until(delivered_all, timeout=30, what=f"50 deliveries after restart\n{relay.log()[-3000:]}")
    wait_until(lambda: queue_list(relay) == [], what="an empty queue")
    with sink.lock:
        ids_seen = [parse(m.data)["Message-ID"] for m in sink.messages]
    assert sorted(ids_seen) == sorted(f"<bulk.{n}@origin.test>" for n in range(50))


def test_flush_sends_a_deferred_message_at_once(start_relay, start_sink):
    """relay-queue flush makes a message deferred for an hour go out now."""
    relay = start_relay(min_retry="1h", max_retry="2h", max_lifetime="1d")
    queue_id = send(relay, ORIGIN, ["now@flush.test"], message("flush me"))
    entry = wait_attempted(relay, queue_id)
    assert entry["recipients"][0]["next_attempt"] is not None
    sink = start_sink(FLUSH_MX)
    assert flush(relay) >= 1
    assert len(wait_message(sink, "now@flush.test", timeout=10)) == 1
    wait_gone(relay, queue_id)


def test_etrn_sends_a_deferred_message_at_once(start_relay, start_sink):
    """ETRN for a domain from a trusted client answers 250 and delivers that domain's deferred mail now."""
    relay = start_relay(min_retry="1h", max_retry="2h", max_lifetime="1d")
    queue_id = send(relay, ORIGIN, ["now@etrn.test"], message("etrn me"))
    wait_attempted(relay, queue_id)
    sink = start_sink(ETRN_MX)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
        s.ehlo("client.origin.test")
        code, text = s.docmd("ETRN", "etrn.test")
    assert code == 250, text
    assert len(wait_message(sink, "now@etrn.test", timeout=10)) == 1
    wait_gone(relay, queue_id)


def test_held_message_waits_for_release(start_relay, start_sink):
    """A held message is skipped by flush while its neighbour goes; after release it is delivered."""
    relay = start_relay(min_retry="1h", max_retry="2h", max_lifetime="1d")
    held_id = send(relay, ORIGIN, ["kept@hold.test"], message("held one"))
    free_id = send(relay, ORIGIN, ["free@hold.test"], message("free one"))
    wait_attempted(relay, held_id)
    wait_attempted(relay, free_id)
    done = relay_queue(relay, "hold", held_id)
    assert done.returncode == 0, done.stderr
    assert queued(relay, held_id)["held"] is True
    sink = start_sink(HOLD_MX)
    assert flush(relay) == 1  # only the message that is not held
    wait_message(sink, "free@hold.test", timeout=10)
    wait_gone(relay, free_id)
    assert messages_to(sink, "kept@hold.test") == []
    assert queued(relay, held_id)["recipients"][0]["status"] == "pending"

    done = relay_queue(relay, "release", held_id)
    assert done.returncode == 0, done.stderr
    assert len(wait_message(sink, "kept@hold.test", timeout=10)) == 1
    wait_gone(relay, held_id)


def test_sigkill_under_load_loses_no_acknowledged_message(start_relay, start_sink):
    """kill -9 of the daemon while ten clients submit and it delivers: after a restart every message
    that got a 250 arrives intact, and nothing that was not acknowledged is ever delivered."""
    sink = start_sink(BULK_MX)
    relay = start_relay(min_retry="1h", max_retry="2h", max_lifetime="1d")
    acknowledged: set[str] = set()
    tried: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
                s.ehlo("client.origin.test")
                for i in range(400):  # bounded; the kill ends it sooner
                    if stop.is_set():
                        return
                    mid = f"<load.{n}.{i}@origin.test>"
                    with lock:
                        tried.add(mid)
                    submit(s, ORIGIN, [f"user{n}@bulk.test"], message(f"load {n} {i}", mid))
                    with lock:
                        acknowledged.add(mid)
        except (smtplib.SMTPException, OSError, AssertionError):
            return  # the daemon was killed under this session

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(10)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acknowledged) >= 300, timeout=60, what="300 acknowledged messages")
    relay.kill()  # SIGKILL, mid-transaction for some sessions
    stop.set()
    for t in threads:
        t.join(timeout=20)
    with lock:
        acked = set(acknowledged)
    relay = start_relay(min_retry="1h", max_retry="2h", max_lifetime="1d")

    def arrived() -> Optional[set[str]]:
        with sink.lock:
            seen = {parse(m.data)["Message-ID"] for m in sink.messages}
        if not acked <= seen:
            relay_queue(relay, "flush")
            return None
        return seen

    seen = wait_until(arrived, timeout=60, what=f"every acknowledged message delivered\n{relay.log()[-3000:]}")
    assert seen <= tried  # nothing half-received was delivered
    with sink.lock:
        for m in sink.messages:
            parsed = parse(m.data)
            n, i = parsed["Message-ID"][1:].split("@")[0].split(".")[1:]
            assert parsed.get_payload().strip() == f"body of load {n} {i}"
    wait_until(lambda: queue_list(relay) == [], what="an empty queue")
