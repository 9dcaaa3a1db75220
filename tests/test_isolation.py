"""Destination isolation, suspension, connection reuse limits and the TLS fallback of delivery.

All on a Clock with the fakes of test_delivery (a real RouterChain, a fake
resolver and connector); the scheduler's early recording with the fakes of
test_scheduler.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred

from deferreds import no_result, success
from relay.config import QueueConfig, load_config
from relay.config_values import ConfigError
from relay.delivery import TEXT_SUSPENDED
from relay.outcome import Reason
from relay.envelope import DELIVERED, OUTCOME_DELIVERED, OUTCOME_TRANSIENT, PENDING, Route, NextHop
from relay.smtp.connect import source_for
from relay.smtp.transaction import STAGE_STARTTLS, ClientOptions, SessionError
from relay.smtp.replies import Reply
from test_delivery import FakeConnector, Harness, envelope, refused
from test_scheduler import FakeSpool, delivered, scheduler, transient
from test_scheduler import envelope as scheduler_envelope


STALLED = "127.0.0.4"  # b.test's only MX host in test_delivery's targets


class StallingConnector(FakeConnector):
    """Connections to ``stalled`` addresses never complete (a host that never greets) until failed by hand."""

    def __init__(self, stalled: set[str], **kw: Any) -> None:
        super().__init__(**kw)
        self.stalled = stalled
        self.hanging: list[Deferred] = []

    def __call__(self, reactor: Any, address: str, port: int, host: str, options: ClientOptions) -> Deferred:
        if address in self.stalled:
            self.calls.append((address, port, host, options))
            d: Deferred = Deferred()
            self.hanging.append(d)
            return d
        return super().__call__(reactor, address, port, host, options)

    def calls_to(self, address: str) -> int:
        return sum(1 for call in self.calls if call[0] == address)


# -- isolation ---------------------------------------------------------------------------


def test_stalled_destination_holds_only_its_own_connections():
    """Mail for a healthy destination is delivered while a stalled one keeps its per_destination connections hanging."""
    connector = StallingConnector({STALLED})
    h = Harness(connector=connector, per_destination=2, concurrency=10)
    stalled = [h.attempt(envelope("u@b.test", queue_id=f"S{i}")) for i in range(20)]
    healthy = h.attempt(envelope("u@a.test", queue_id="H1"))
    [outcome] = success(healthy)
    assert outcome.kind == OUTCOME_DELIVERED
    assert connector.calls_to(STALLED) == 2
    assert h.delivery.pool.waiting == 18
    for d in stalled:
        no_result(d)


def test_waiting_message_reads_its_bytes_only_when_a_connection_is_ready():
    """A message waiting for a stalled destination has not read its bytes; a delivered one read them once."""
    connector = StallingConnector({STALLED})
    h = Harness(connector=connector, per_destination=1)
    read: list[str] = []
    message_opener = h.spool.message_opener
    h.spool.message_opener = lambda queue_id: read.append(queue_id) or message_opener(queue_id)
    h.attempt(envelope("u@b.test", queue_id="S1"))
    assert read == []
    success(h.attempt(envelope("u@a.test", queue_id="H2")))
    assert read == ["H2"]


def test_destination_that_failed_is_suspended_until_its_retry():
    """After no host of a destination answered, its next mail is deferred without a connection until min_retry passed."""
    connector = FakeConnector(failures={"127.0.0.2": refused("127.0.0.2"), "127.0.0.3": refused("127.0.0.3")})
    h = Harness(connector=connector)
    [first] = success(h.attempt(envelope("u@a.test", queue_id="Q1")))
    assert first.kind == OUTCOME_TRANSIENT and len(connector.calls) == 2
    [second] = success(h.attempt(envelope("v@a.test", queue_id="Q2")))
    assert second.kind == OUTCOME_TRANSIENT
    assert second.text == f"{TEXT_SUSPENDED}: {first.text}"
    assert second.host == first.host and second.status == "4.4.1"
    assert len(connector.calls) == 2
    h.clock.advance(QueueConfig().min_retry)
    success(h.attempt(envelope("w@a.test", queue_id="Q3")))
    assert len(connector.calls) == 4


def test_suspension_is_per_destination():
    """A suspended destination does not defer mail for another one."""
    connector = FakeConnector(failures={"127.0.0.2": refused("127.0.0.2"), "127.0.0.3": refused("127.0.0.3")})
    h = Harness(connector=connector)
    success(h.attempt(envelope("u@a.test", queue_id="Q1")))
    [other] = success(h.attempt(envelope("u@b.test", queue_id="Q2")))
    assert other.kind == OUTCOME_DELIVERED


def test_flush_ignores_a_suspension():
    """A forced attempt (a flush) connects to a suspended destination."""
    connector = FakeConnector(failures={"127.0.0.2": refused("127.0.0.2"), "127.0.0.3": refused("127.0.0.3")})
    h = Harness(connector=connector)
    success(h.attempt(envelope("u@a.test", queue_id="Q1")))
    success(h.attempt(envelope("u@a.test", queue_id="Q2"), forced=True))
    assert len(connector.calls) == 4


def test_waiting_work_is_deferred_at_once_when_its_destination_is_suspended():
    """Transactions waiting for a place at a destination that just failed are deferred without connecting."""
    connector = StallingConnector({STALLED})
    h = Harness(connector=connector, per_destination=1)
    results = [h.attempt(envelope("u@b.test", queue_id=f"Q{i}")) for i in range(4)]
    assert connector.calls_to(STALLED) == 1 and h.delivery.pool.waiting == 3
    connector.hanging[0].errback(refused(STALLED))
    h.clock.advance(0)
    outcomes = [success(d)[0] for d in results]
    assert all(o.kind == OUTCOME_TRANSIENT for o in outcomes)
    assert [o.text.startswith(TEXT_SUSPENDED) for o in outcomes] == [False, True, True, True]
    assert connector.calls_to(STALLED) == 1
    assert h.delivery.pool.waiting == 0 and h.delivery.pool.open_connections == 0


def test_each_destination_reports_its_outcomes_when_its_transaction_ends():
    """progress hears a destination's outcomes while the message's other destination is still running."""
    connector = FakeConnector(manual=True)
    h = Harness(connector=connector)
    heard: list[list[str]] = []
    d = h.delivery.attempt(envelope("u@a.test", "u@b.test"), progress=lambda outcomes: heard.append([o.recipient for o in outcomes]))
    assert len(connector.held) == 2
    connector.release_one()
    assert heard == [["u@a.test"]]
    no_result(d)
    connector.release_one()
    assert [o.kind for o in success(d)] == [OUTCOME_DELIVERED, OUTCOME_DELIVERED]
    assert heard == [["u@a.test"]], "the last destination's outcomes come with the attempt's result"


# -- connection reuse ------------------------------------------------------------------


def test_connection_carries_at_most_reuse_count_transactions():
    """After connection_reuse_count transactions a connection is closed and a new one opened."""
    h = Harness(connection_reuse_count=2)
    for i in range(5):
        success(h.attempt(envelope("u@b.test", queue_id=f"Q{i}")))
    assert [len(c.sent) for c in h.connector.connections] == [2, 2, 1]
    assert [c.quits for c in h.connector.connections[:2]] == [1, 1]


def test_connection_older_than_reuse_time_is_not_reused():
    """A connection opened connection_reuse_time ago is closed instead of carrying the next transaction."""
    h = Harness(connection_reuse_time=30.0)
    success(h.attempt(envelope("u@b.test", queue_id="Q1")))
    h.clock.advance(10)
    success(h.attempt(envelope("u@b.test", queue_id="Q2")))
    h.clock.advance(25)
    success(h.attempt(envelope("u@b.test", queue_id="Q3")))
    assert [len(c.sent) for c in h.connector.connections] == [2, 1]


def test_transaction_with_every_recipient_refused_is_not_followed_on_that_connection():
    """A session whose every recipient got 451 is ended, so peers do not count errors against relay."""
    connector = FakeConnector(replies=lambda address, rcpt: Reply(451, "4.7.1", "greylisted"))
    h = Harness(connector=connector)
    success(h.attempt(envelope("u@b.test", queue_id="Q1")))
    success(h.attempt(envelope("v@b.test", queue_id="Q2")))
    assert [len(c.sent) for c in connector.connections] == [1, 1]
    assert connector.connections[0].quits == 1


# -- opportunistic TLS --------------------------------------------------------------


class HandshakeFails(FakeConnector):
    """Every session that tries STARTTLS fails in the handshake; sessions in clear work."""

    def __call__(self, reactor: Any, address: str, port: int, host: str, options: ClientOptions) -> Deferred:
        if options.starttls:
            self.calls.append((address, port, host, options))
            return defer.fail(SessionError(None, True, STAGE_STARTTLS, "TLS: handshake failed", reason=Reason.TLS_HANDSHAKE))
        return super().__call__(reactor, address, port, host, options)


def test_failed_handshake_with_tls_may_is_retried_in_clear_at_once():
    """tls = "may": a failed STARTTLS handshake is followed by a session in clear, and the outcome says so."""
    h = Harness(connector=HandshakeFails())
    [outcome] = success(h.attempt(envelope("u@b.test")))
    assert outcome.kind == OUTCOME_DELIVERED and outcome.tls_fallback and outcome.tls == ""
    assert [c[3].starttls for c in h.connector.calls] == [True, False]


@pytest.mark.parametrize("tls", ["require", "verify"])
def test_failed_handshake_is_never_retried_in_clear_when_tls_is_required(tls):
    """tls = "require" or "verify": a failed handshake defers the mail; nothing goes in clear."""
    route = Route(kind="mx", hosts=(NextHop("b.test", mx=True),), tls=tls)
    h = Harness(routes={"u@b.test": route}, connector=HandshakeFails())
    [outcome] = success(h.attempt(envelope("u@b.test")))
    assert outcome.kind == OUTCOME_TRANSIENT and not outcome.tls_fallback
    assert all(c[3].starttls for c in h.connector.calls) and len(h.connector.connections) == 0


# -- source address -----------------------------------------------------------------


def test_source_address_follows_the_ip_version_of_the_target():
    """The local address is the configured one of the target's IP version, or the system's choice."""
    sources = ("192.0.2.25", "2001:db8::25")
    assert source_for("127.0.0.1", sources) == "192.0.2.25"
    assert source_for("::1", sources) == "2001:db8::25"
    assert source_for("::1", ("192.0.2.25",)) == ""


def test_source_address_config(tmp_path):
    """[delivery] source_address takes one address or a list with at most one per IP version."""
    path = tmp_path / "relay.toml"
    path.write_text('[delivery]\nsource_address = ["127.0.0.2", "::1"]\n')
    assert load_config(str(path)).delivery.source_address == ("127.0.0.2", "::1")
    path.write_text('[delivery]\nsource_address = "127.0.0.2"\n')
    assert load_config(str(path)).delivery.source_address == ("127.0.0.2",)
    for bad in ('"mail.example.org"', '["127.0.0.2", "127.0.0.3"]'):
        path.write_text(f"[delivery]\nsource_address = {bad}\n")
        with pytest.raises(ConfigError, match="source_address"):
            load_config(str(path))


# -- the scheduler records each destination at once ----------------------------------


class TwoStepDelivery:
    """Reports the first recipient's outcome through progress, then waits to be released."""

    def __init__(self) -> None:
        self.finish: Deferred = Deferred()

    def attempt(self, env: Any, progress: Any = None, forced: bool = False) -> Deferred:
        first, second = env.pending()
        progress([delivered(first.address)])
        return self.finish.addCallback(lambda _: [delivered(first.address), transient(second.address)])


def test_scheduler_stores_a_destination_outcome_before_the_attempt_ends():
    """A recipient delivered by one destination is stored as delivered while another destination is still running."""
    env = envelope_for_scheduler("a@a.test", "b@b.test")
    spool = FakeSpool([env])
    delivery = TwoStepDelivery()
    s, clock = scheduler(spool, delivery)
    s.enqueue(env.queue_id)
    a, b = spool.envelopes[env.queue_id].recipients
    assert (a.status, a.attempts, b.status, b.attempts) == (DELIVERED, 1, PENDING, 0)
    delivery.finish.callback(None)
    a, b = spool.envelopes[env.queue_id].recipients
    assert (a.status, a.attempts, b.status, b.attempts) == (DELIVERED, 1, PENDING, 1)
    assert b.next_attempt is not None


def envelope_for_scheduler(*addresses: str) -> Any:
    return replace(scheduler_envelope(*addresses), queue_id="Q1")
