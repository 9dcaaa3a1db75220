"""Tests for relay.queue.scheduler: outcomes applied, results written back, pickup, stop."""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relay.envelope import (
    DELIVERED,
    FAILED,
    OUTCOME_DELIVERED,
    OUTCOME_PERMANENT,
    OUTCOME_TRANSIENT,
    PENDING,
    Attempt,
    Envelope,
    Outcome,
    Recipient,
)
from relay.queue.scheduler import Scheduler, apply_outcomes
from relay.queue.spool import Spool

NOW = 1_700_000_000.0

_t = SynchronousTestCase()
success = _t.successResultOf
no_result = _t.assertNoResult


def envelope(*addresses: str, queue_id: str = "Q1", **kw: Any) -> Envelope:
    return Envelope(queue_id=queue_id, sender="s@origin.test", recipients=tuple(Recipient(a) for a in addresses), **kw)


def delivered(address: str) -> Outcome:
    return Outcome(address, OUTCOME_DELIVERED, 250, "2.0.0", "Ok", host="mx[127.0.0.2]", rule="routes[0]")


def transient(address: str) -> Outcome:
    return Outcome(address, OUTCOME_TRANSIENT, 451, "4.3.0", "try later", host="mx[127.0.0.2]", rule="routes[0]")


def permanent(address: str) -> Outcome:
    return Outcome(address, OUTCOME_PERMANENT, 550, "5.1.1", "no such user", host="mx[127.0.0.2]", rule="routes[0]")


# -- apply_outcomes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "outcome,status,last_error",
    [
        (delivered("u@a.test"), DELIVERED, ""),
        (transient("u@a.test"), PENDING, "451 4.3.0 try later"),
        (permanent("u@a.test"), FAILED, "550 5.1.1 no such user"),
        (Outcome("u@a.test", OUTCOME_TRANSIENT, 0, "4.4.1", "connect to mx[127.0.0.2]:25: Connection refused"), PENDING,
         "4.4.1 connect to mx[127.0.0.2]:25: Connection refused"),
    ],
)
def test_apply_outcomes_table(outcome, status, last_error):
    """Each bucket maps to its state, counts the attempt, keeps the last error and appends the history."""
    env = envelope("u@a.test")
    [r] = apply_outcomes(env, [outcome], NOW).recipients
    assert (r.status, r.attempts, r.last_error) == (status, 1, last_error)
    assert r.history == (Attempt(time=NOW, outcome=outcome.kind, reply=outcome.describe(), host=outcome.host, route=outcome.rule),)


def test_apply_outcomes_accumulates_attempts_and_history():
    """A second attempt adds to the counters and history instead of replacing them."""
    env = apply_outcomes(envelope("u@a.test"), [transient("u@a.test")], NOW)
    env = apply_outcomes(env, [delivered("u@a.test")], NOW + 60)
    [r] = env.recipients
    assert r.attempts == 2 and r.status == DELIVERED and r.last_error == ""
    assert [a.time for a in r.history] == [NOW, NOW + 60]


def test_apply_outcomes_leaves_others_alone():
    """Recipients without an outcome and recipients no longer pending are unchanged."""
    env = envelope("a@a.test", "b@a.test", "c@a.test").with_recipients([Recipient("c@a.test", status=DELIVERED, attempts=1)])
    new = apply_outcomes(env, [delivered("a@a.test"), transient("c@a.test"), permanent("nobody@a.test")], NOW)
    a, b, c = new.recipients
    assert a.status == DELIVERED
    assert b == env.recipients[1]
    assert c == env.recipients[2]
    assert new.queue_id == env.queue_id and new.sender == env.sender


# -- fakes ---------------------------------------------------------------------------------


class FakeSpool:
    """In memory: envelopes by id, with modify/remove Deferreds that may be held back."""

    def __init__(self, envelopes: list[Envelope] = ()) -> None:
        self.envelopes = {e.queue_id: e for e in envelopes}
        self.loads: list[str] = []
        self.writes: list[tuple[str, Any]] = []

    def ids(self) -> list[str]:
        return sorted(self.envelopes)

    def load(self, queue_id: str) -> Envelope:
        self.loads.append(queue_id)
        return self.envelopes[queue_id]

    def modify(self, queue_id: str, change: Callable[[Envelope], Envelope]) -> Deferred:
        if queue_id not in self.envelopes:
            return defer.fail(KeyError(queue_id))
        new = change(self.envelopes[queue_id])
        self.envelopes[queue_id] = new
        self.writes.append(("modify", new))
        return defer.succeed(new)

    def update(self, envelope: Envelope) -> Deferred:
        return self.modify(envelope.queue_id, lambda _: envelope)

    def remove(self, queue_id: str) -> Deferred:
        self.envelopes.pop(queue_id, None)
        self.writes.append(("remove", queue_id))
        return defer.succeed(None)


class FakeDelivery:
    """Answers outcomes by a function of the envelope, immediately or when released."""

    def __init__(self, decide: Callable[[Envelope], list[Outcome]], manual: bool = False) -> None:
        self.decide = decide
        self.manual = manual
        self.attempts: list[Envelope] = []
        self.waiting: list[tuple[Envelope, Deferred]] = []

    def attempt(self, env: Envelope) -> Deferred:
        self.attempts.append(env)
        if self.manual:
            d: Deferred = Deferred()
            self.waiting.append((env, d))
            return d
        return defer.succeed(self.decide(env))

    def release_all(self) -> None:
        while self.waiting:
            env, d = self.waiting.pop(0)
            d.callback(self.decide(env))


def all_delivered(env: Envelope) -> list[Outcome]:
    return [delivered(r.address) for r in env.pending()]


def scheduler(spool: Any, delivery: Any, **kw: Any) -> tuple[Scheduler, Clock]:
    clock = Clock()
    clock.advance(NOW)
    return Scheduler(spool, delivery, clock, **kw), clock


# -- enqueue --------------------------------------------------------------------------------


def test_enqueue_delivered_message_is_removed():
    """A message whose recipients are all delivered is removed from the spool."""
    spool = FakeSpool([envelope("u@a.test", "v@b.test")])
    s, _ = scheduler(spool, FakeDelivery(all_delivered))
    success(s.enqueue("Q1"))
    assert spool.writes == [("remove", "Q1")]
    assert s.in_flight == frozenset()


def test_enqueue_partial_result_is_written_back():
    """Mixed outcomes are stored durably: delivered, failed and still pending recipients."""
    spool = FakeSpool([envelope("ok@a.test", "bad@a.test", "later@b.test")])
    decide = lambda env: [delivered("ok@a.test"), permanent("bad@a.test"), transient("later@b.test")]
    s, _ = scheduler(spool, FakeDelivery(decide))
    success(s.enqueue("Q1"))
    [(kind, stored)] = spool.writes
    assert kind == "modify"
    assert [(r.address, r.status, r.attempts) for r in stored.recipients] == [
        ("ok@a.test", DELIVERED, 1), ("bad@a.test", FAILED, 1), ("later@b.test", PENDING, 1)]
    assert stored.recipient("later@b.test").history[0].time == NOW


def test_all_failed_message_goes_to_finished():
    """When every recipient failed permanently the message reaches the finishing step (removed for now)."""
    spool = FakeSpool([envelope("bad@a.test")])
    finished: list[Envelope] = []
    s, _ = scheduler(spool, FakeDelivery(lambda env: [permanent("bad@a.test")]))
    original = s._finished

    async def spy(env: Envelope) -> None:
        finished.append(env)
        await original(env)

    s._finished = spy
    success(s.enqueue("Q1"))
    assert [r.status for r in finished[0].recipients] == [FAILED]
    assert spool.writes == [("remove", "Q1")]


def test_held_message_is_skipped():
    """A held message is not attempted and not written."""
    spool = FakeSpool([envelope("u@a.test", held=True)])
    delivery = FakeDelivery(all_delivered)
    s, _ = scheduler(spool, delivery)
    success(s.enqueue("Q1"))
    assert delivery.attempts == [] and spool.writes == []


def test_unknown_message_is_skipped():
    """Enqueueing an id that is no longer queued does nothing and does not fail."""
    delivery = FakeDelivery(all_delivered)
    s, _ = scheduler(FakeSpool(), delivery)
    success(s.enqueue("GONE"))
    assert delivery.attempts == []


def test_message_without_pending_recipients_is_removed_without_attempt():
    """A stored message with nothing pending (crash before its removal) is removed at once."""
    env = envelope("u@a.test").with_recipients([Recipient("u@a.test", status=DELIVERED)])
    spool = FakeSpool([env])
    delivery = FakeDelivery(all_delivered)
    s, _ = scheduler(spool, delivery)
    success(s.enqueue("Q1"))
    assert delivery.attempts == [] and spool.writes == [("remove", "Q1")]


def test_one_attempt_in_flight_per_message():
    """A second enqueue while the first attempt runs does not start another attempt."""
    spool = FakeSpool([envelope("u@a.test")])
    delivery = FakeDelivery(all_delivered, manual=True)
    s, _ = scheduler(spool, delivery)
    first = s.enqueue("Q1")
    second = s.enqueue("Q1")
    success(second)
    no_result(first)
    assert len(delivery.attempts) == 1 and s.in_flight == {"Q1"}
    delivery.release_all()
    success(first)
    assert s.in_flight == frozenset()
    success(s.enqueue("Q1"))  # removed now: nothing more happens
    assert len(delivery.attempts) == 1


def test_hold_set_during_attempt_is_kept():
    """Outcomes are applied to the envelope as stored, so an operator's hold during the attempt survives."""
    spool = FakeSpool([envelope("u@a.test", "v@a.test")])
    delivery = FakeDelivery(lambda env: [delivered("u@a.test"), transient("v@a.test")], manual=True)
    s, _ = scheduler(spool, delivery)
    d = s.enqueue("Q1")
    spool.envelopes["Q1"] = spool.envelopes["Q1"].__class__(**{**spool.envelopes["Q1"].__dict__, "held": True})
    delivery.release_all()
    success(d)
    stored = spool.envelopes["Q1"]
    assert stored.held and stored.recipient("u@a.test").status == DELIVERED


def test_removed_during_attempt_is_not_resurrected():
    """A message deleted by the operator during its attempt stays deleted."""
    spool = FakeSpool([envelope("u@a.test")])
    delivery = FakeDelivery(lambda env: [transient("u@a.test")], manual=True)
    s, _ = scheduler(spool, delivery)
    d = s.enqueue("Q1")
    del spool.envelopes["Q1"]
    delivery.release_all()
    success(d)
    assert spool.envelopes == {}


def test_failed_write_leaves_message_queued_and_never_errbacks():
    """A spool error while recording is logged; enqueue still fires and the message may be attempted again."""
    spool = FakeSpool([envelope("u@a.test")])
    spool.modify = lambda queue_id, change: defer.fail(OSError(28, "No space left on device"))
    s, _ = scheduler(spool, FakeDelivery(lambda env: [transient("u@a.test")]))
    assert success(s.enqueue("Q1")) is None
    assert s.in_flight == frozenset()


# -- start and stop --------------------------------------------------------------------------


def test_startup_picks_up_pending_messages():
    """startService attempts every queued message with pending recipients and skips held ones."""
    envs = [envelope("u@a.test", queue_id=f"Q{i}") for i in range(5)]
    envs.append(envelope("u@a.test", queue_id="QH", held=True))
    spool = FakeSpool(envs)
    delivery = FakeDelivery(all_delivered)
    s, _ = scheduler(spool, delivery)
    s.startService()
    assert sorted(e.queue_id for e in delivery.attempts) == [f"Q{i}" for i in range(5)]
    assert list(spool.envelopes) == ["QH"]


def test_startup_pickup_is_bounded():
    """At start-up only pickup_concurrency messages are loaded and in flight at once."""
    spool = FakeSpool([envelope("u@a.test", queue_id=f"Q{i:03d}") for i in range(50)])
    delivery = FakeDelivery(all_delivered, manual=True)
    s, _ = scheduler(spool, delivery, pickup_concurrency=3)
    s.startService()
    assert len(delivery.waiting) == 3 and len(spool.loads) == 3
    for _ in range(5):
        env, d = delivery.waiting.pop(0)
        d.callback(all_delivered(env))
        assert len(s.in_flight) <= 3
    assert len(spool.loads) == 8
    delivery.manual = False
    delivery.release_all()
    assert spool.envelopes == {}
    assert len(delivery.attempts) == 50


def test_startup_pickup_of_many_skipped_messages_does_not_recurse():
    """Walking thousands of held messages completes without exhausting the stack."""
    spool = FakeSpool([envelope("u@a.test", queue_id=f"Q{i:05d}", held=True) for i in range(3000)])
    s, _ = scheduler(spool, FakeDelivery(all_delivered), pickup_concurrency=2)
    s.startService()
    success(s._pickup)
    assert len(spool.loads) == 3000


def test_stop_waits_for_in_flight_attempts():
    """stopService fires once the attempts in flight are recorded."""
    spool = FakeSpool([envelope("u@a.test")])
    delivery = FakeDelivery(all_delivered, manual=True)
    s, _ = scheduler(spool, delivery)
    s.startService()
    stopping = s.stopService()
    no_result(stopping)
    delivery.release_all()
    success(stopping)
    assert spool.writes == [("remove", "Q1")]


def test_stop_gives_up_after_grace_and_leaves_message_queued():
    """An attempt that does not end within the grace period is left queued; stop still returns."""
    spool = FakeSpool([envelope("u@a.test")])
    delivery = FakeDelivery(all_delivered, manual=True)
    s, clock = scheduler(spool, delivery, stop_grace=10.0)
    s.startService()
    stopping = s.stopService()
    clock.advance(9)
    no_result(stopping)
    clock.advance(1)
    success(stopping)
    assert "Q1" in spool.envelopes
    success(s.enqueue("Q1"))  # stopped: no new attempts
    assert len(delivery.attempts) == 1


# -- with the real spool ----------------------------------------------------------------------


def sync_runner(f: Callable[..., Any], *args: Any) -> Deferred:
    return defer.maybeDeferred(f, *args)


def store(spool: Spool, env: Envelope, data: bytes = b"Subject: t\r\n\r\nhi\r\n") -> str:
    message = spool.new_message()
    message.write(data)
    env = Envelope(**{**env.__dict__, "queue_id": message.queue_id})
    return success(message.commit(env))


def real_spool(tmp_path) -> Spool:
    spool = Spool(str(tmp_path / "q"), clock=Clock(), runner=sync_runner)
    spool.recover()
    return spool


def test_real_spool_delivered_message_is_removed(tmp_path):
    """With the on-disk spool, a delivered message's files are gone afterwards."""
    spool = real_spool(tmp_path)
    queue_id = store(spool, envelope("u@a.test"))
    s, _ = scheduler(spool, FakeDelivery(all_delivered))
    success(s.enqueue(queue_id))
    assert spool.ids() == []
    assert not os.path.exists(spool.message_path(queue_id))


def test_real_spool_partial_result_is_durable_and_picked_up_after_restart(tmp_path):
    """A deferred recipient is stored on disk and attempted again by a new scheduler at start-up."""
    spool = real_spool(tmp_path)
    queue_id = store(spool, envelope("ok@a.test", "later@b.test"))
    decide = lambda env: [delivered("ok@a.test") if r.address == "ok@a.test" else transient(r.address) for r in env.pending()]
    s, _ = scheduler(spool, FakeDelivery(decide))
    success(s.enqueue(queue_id))
    stored = Spool(spool.directory, clock=Clock(), runner=sync_runner).load(queue_id)
    assert [(r.status, r.attempts) for r in stored.recipients] == [(DELIVERED, 1), (PENDING, 1)]
    assert stored.recipient("later@b.test").last_error == "451 4.3.0 try later"

    restarted = Spool(spool.directory, clock=Clock(), runner=sync_runner)
    restarted.recover()
    delivery = FakeDelivery(all_delivered)
    s2, _ = scheduler(restarted, delivery)
    s2.startService()
    [attempted] = delivery.attempts
    assert [r.address for r in attempted.pending()] == ["later@b.test"]
    assert restarted.ids() == []
