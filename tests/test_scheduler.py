"""Tests for relay.queue.scheduler: outcomes, retry timers, expiry, notifications, flush/hold, restart, limits."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from deferreds import no_result, success
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
from relay.dsn_report import recipient_status
from relay.config import QueueConfig, load_config
from relay.config_values import ConfigError
from relay.queue.rules import apply_outcomes, settle
from relay.queue.scheduler import Scheduler
from relay.queue.schema import QueueSummary
from relay.queue.store import Spool

NOW = 1_700_000_000.0
CONFIG = QueueConfig(min_retry=300.0, max_retry=3600.0, max_lifetime=86400.0)



def envelope(*addresses: str, queue_id: str = "Q1", sender: str = "s@origin.test", **kw: Any) -> Envelope:
    kw.setdefault("arrival", NOW)
    return Envelope(queue_id=queue_id, sender=sender, recipients=tuple(Recipient(a) for a in addresses), **kw)


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
    assert r.history == (Attempt(time=NOW, outcome=outcome.kind, code=outcome.code, status=outcome.status, text=outcome.text,
                                 host=outcome.host, remote=outcome.remote, reason=outcome.reason, rule=outcome.rule),)
    assert r.history[0].reply == outcome.describe()


def test_apply_outcomes_accumulates_attempts_and_history():
    """A second attempt adds to the counters and history instead of replacing them."""
    env = apply_outcomes(envelope("u@a.test"), [transient("u@a.test")], NOW)
    env = apply_outcomes(env, [delivered("u@a.test")], NOW + 60)
    [r] = env.recipients
    assert r.attempts == 2 and r.status == DELIVERED and r.last_error == ""
    assert [a.time for a in r.history] == [NOW, NOW + 60]


def test_apply_outcomes_records_tls_of_the_session():
    """The TLS version and cipher of the session that answered are kept in the attempt history."""
    tls = "TLSv1.3 TLS_AES_256_GCM_SHA384"
    outcome = replace(delivered("u@a.test"), tls=tls)
    [r] = apply_outcomes(envelope("u@a.test"), [outcome], NOW).recipients
    assert r.history[-1].tls == tls


def test_apply_outcomes_leaves_others_alone():
    """Recipients without an outcome and recipients no longer pending are unchanged."""
    env = envelope("a@a.test", "b@a.test", "c@a.test").with_recipients([Recipient("c@a.test", status=DELIVERED, attempts=1)])
    new = apply_outcomes(env, [delivered("a@a.test"), transient("c@a.test"), permanent("nobody@a.test")], NOW)
    a, b, c = new.recipients
    assert a.status == DELIVERED
    assert b == env.recipients[1]
    assert c == env.recipients[2]
    assert new.queue_id == env.queue_id and new.sender == env.sender


def test_settle_sets_next_attempt_and_expires():
    """Deferred recipients get their next attempt time; None expires them (FAILED, last error kept)."""
    env = envelope("a@a.test", "b@a.test")
    new = settle(env, [transient("a@a.test"), transient("b@a.test")], NOW, {"a@a.test": NOW + 300, "b@a.test": None})
    a, b = new.recipients
    assert (a.status, a.next_attempt) == (PENDING, NOW + 300)
    assert (b.status, b.last_error, b.reported) == (FAILED, "451 4.3.0 try later", False)


def test_settle_marks_null_sender_failures_reported():
    """Failures of a message from <> are reported at once: nothing is ever sent about them."""
    env = envelope("a@a.test", sender="")
    [a] = settle(env, [permanent("a@a.test")], NOW, {}).recipients
    assert a.status == FAILED and a.reported


def test_settle_marks_failures_nobody_is_told_about_reported():
    """NOTIFY=NEVER failures and expiries of a message from <> are reported at once, by the one rule."""
    env = envelope("a@a.test", "b@a.test")
    env = env.with_recipients([replace(env.recipients[0], params=(("NOTIFY", "NEVER"),))])
    a, b = settle(env, [permanent("a@a.test"), permanent("b@a.test")], NOW, {}).recipients
    assert (a.status, a.reported) == (FAILED, True)
    assert (b.status, b.reported) == (FAILED, False)
    [expired] = settle(envelope("c@a.test", sender=""), [transient("c@a.test")], NOW, {"c@a.test": None}).recipients
    assert (expired.status, expired.reported) == (FAILED, True)


# -- fakes ---------------------------------------------------------------------------------


class FakeSpool:
    """In memory: envelopes by id, with modify/remove answering at once."""

    def __init__(self, envelopes: list[Envelope] = ()) -> None:
        self.envelopes = {e.queue_id: e for e in envelopes}
        self.loads: list[str] = []
        self.peeks: list[str] = []
        self.writes: list[tuple[str, Any]] = []
        self.quarantined: list[str] = []

    def ids(self) -> list[str]:
        return sorted(self.envelopes)

    def load(self, queue_id: str) -> Envelope:
        self.loads.append(queue_id)
        return self.envelopes[queue_id]

    def peek(self, queue_id: str) -> QueueSummary:
        self.peeks.append(queue_id)
        return QueueSummary.of(self.envelopes[queue_id])

    def read(self, queue_id: str) -> Deferred:
        return defer.maybeDeferred(self.load, queue_id)

    def summary(self, queue_id: str) -> Deferred:
        return defer.maybeDeferred(self.peek, queue_id)

    def summaries(self) -> Deferred:
        return defer.succeed([self.peek(queue_id) for queue_id in self.ids()])

    def modify(self, queue_id: str, change: Callable[[Envelope], Envelope]) -> Deferred:
        if queue_id not in self.envelopes:
            return defer.fail(KeyError(queue_id))
        new = change(self.envelopes[queue_id])
        self.envelopes[queue_id] = new
        self.writes.append(("modify", new))
        return defer.succeed(new)

    def remove(self, queue_id: str) -> Deferred:
        self.envelopes.pop(queue_id, None)
        self.writes.append(("remove", queue_id))
        return defer.succeed(None)

    def quarantine(self, queue_id: str, reason: str) -> Deferred:
        self.quarantined.append(queue_id)
        return defer.succeed(True)

    def hold(self, queue_id: str, held: bool = True) -> None:
        self.envelopes[queue_id] = replace(self.envelopes[queue_id], held=held)


class FakeDelivery:
    """Answers outcomes by a function of the envelope, immediately or when released."""

    def __init__(self, decide: Callable[[Envelope], list[Outcome]], manual: bool = False) -> None:
        self.decide = decide
        self.manual = manual
        self.attempts: list[Envelope] = []
        self.waiting: list[tuple[Envelope, Deferred]] = []

    def attempt(self, env: Envelope, **options: Any) -> Deferred:
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

    def attempted(self) -> list[list[str]]:
        """The recipient addresses of each attempt, in order."""
        return [[r.address for r in env.recipients] for env in self.attempts]


class FakeDSN:
    """Stands in for relay.bounce.send_dsn: records each call, answers a new queue id."""

    def __init__(self, spool: Any = None, fail: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.spool = spool

    def __call__(self, spool: Any, env: Envelope, recipients: list[Recipient], hostname: str, now: float, **options: Any) -> Deferred:
        stored = spool.envelopes.get(env.queue_id) if isinstance(spool, FakeSpool) else None
        self.calls.append(dict(envelope=env, recipients=[r.address for r in recipients], statuses=[r.status for r in recipients],
                               hostname=hostname, now=now, stored=stored, **options))
        if self.fail:
            self.fail -= 1
            return defer.fail(OSError(28, "No space left on device"))
        if env.sender == "":
            return defer.succeed(None)
        return defer.succeed(f"DSN{len(self.calls)}")


def all_delivered(env: Envelope) -> list[Outcome]:
    return [delivered(r.address) for r in env.pending()]


def all_transient(env: Envelope) -> list[Outcome]:
    return [transient(r.address) for r in env.pending()]


class NoJitter:
    def random(self) -> float:
        return 0.0


def scheduler(spool: Any, delivery: Any, **kw: Any) -> tuple[Scheduler, Clock]:
    clock = Clock()
    clock.advance(NOW)
    kw.setdefault("config", CONFIG)
    kw.setdefault("rng", NoJitter())
    kw.setdefault("send_dsn", FakeDSN())
    kw.setdefault("hostname", "relay.test")
    return Scheduler(spool, delivery, clock, **kw), clock


# -- enqueue --------------------------------------------------------------------------------


def test_enqueue_delivered_message_is_removed():
    """A message whose recipients are all delivered is removed from the spool."""
    spool = FakeSpool([envelope("u@a.test", "v@b.test")])
    s, _ = scheduler(spool, FakeDelivery(all_delivered))
    success(s.enqueue("Q1"))
    assert spool.writes == [("remove", "Q1")]
    assert s.in_flight == frozenset() and s.scheduled == 0


def test_enqueue_partial_result_is_written_back():
    """Mixed outcomes are stored durably: delivered, failed and still pending recipients."""
    spool = FakeSpool([envelope("ok@a.test", "bad@a.test", "later@b.test")])
    decide = lambda env: [delivered("ok@a.test"), permanent("bad@a.test"), transient("later@b.test")]
    s, _ = scheduler(spool, FakeDelivery(decide))
    success(s.enqueue("Q1"))
    kind, stored = spool.writes[0]
    assert kind == "modify"
    assert [(r.address, r.status, r.attempts) for r in stored.recipients] == [
        ("ok@a.test", DELIVERED, 1), ("bad@a.test", FAILED, 1), ("later@b.test", PENDING, 1)]
    assert stored.recipient("later@b.test").history[0].time == NOW


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
    assert delivery.attempts == [] and s.scheduled == 0


def test_message_without_pending_recipients_is_removed_without_attempt():
    """A stored message with nothing pending and nothing to report (crash before its removal) is removed."""
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


def test_hold_set_during_attempt_is_kept_and_not_scheduled():
    """Outcomes are applied to the envelope as stored, so a hold during the attempt survives and stops retries."""
    spool = FakeSpool([envelope("u@a.test", "v@a.test")])
    delivery = FakeDelivery(lambda env: [delivered("u@a.test"), transient("v@a.test")], manual=True)
    s, clock = scheduler(spool, delivery)
    d = s.enqueue("Q1")
    spool.hold("Q1")
    s.forget("Q1")
    delivery.release_all()
    success(d)
    stored = spool.envelopes["Q1"]
    assert stored.held and stored.recipient("u@a.test").status == DELIVERED
    assert s.due("Q1") is None
    clock.advance(CONFIG.max_retry)
    assert len(delivery.attempts) == 1


def test_removed_during_attempt_is_not_resurrected():
    """A message deleted by the operator during its attempt stays deleted and unscheduled."""
    spool = FakeSpool([envelope("u@a.test")])
    delivery = FakeDelivery(lambda env: [transient("u@a.test")], manual=True)
    s, _ = scheduler(spool, delivery)
    d = s.enqueue("Q1")
    del spool.envelopes["Q1"]
    delivery.release_all()
    success(d)
    assert spool.envelopes == {} and s.scheduled == 0


def test_failed_write_leaves_message_queued_and_retried_later():
    """A spool error while recording is logged; enqueue still fires and the message is tried again after min_retry."""
    spool = FakeSpool([envelope("u@a.test")])
    original = spool.modify
    spool.modify = lambda queue_id, change: defer.fail(OSError(28, "No space left on device"))
    delivery = FakeDelivery(lambda env: [transient("u@a.test")])
    s, clock = scheduler(spool, delivery)
    assert success(s.enqueue("Q1")) is None
    assert s.in_flight == frozenset() and s.due("Q1") == NOW + CONFIG.min_retry
    spool.modify = original
    clock.advance(CONFIG.min_retry)
    assert len(delivery.attempts) == 2
    assert spool.envelopes["Q1"].recipients[0].attempts == 1


# -- retry timers ---------------------------------------------------------------------------


def test_transient_failure_is_retried_on_the_backoff_schedule():
    """A deferred recipient is attempted again at min_retry, then after the doubled delay, and not before."""
    spool = FakeSpool([envelope("u@a.test")])
    outcomes = iter([transient, transient, delivered])
    delivery = FakeDelivery(lambda env: [next(outcomes)("u@a.test")])
    s, clock = scheduler(spool, delivery)
    success(s.enqueue("Q1"))
    stored = spool.envelopes["Q1"].recipients[0]
    assert (stored.attempts, stored.next_attempt) == (1, NOW + 300)
    assert s.due("Q1") == NOW + 300
    clock.advance(299)
    assert len(delivery.attempts) == 1
    clock.advance(1)
    assert len(delivery.attempts) == 2
    assert spool.envelopes["Q1"].recipients[0].next_attempt == NOW + 300 + 600
    clock.advance(599)
    assert len(delivery.attempts) == 2
    clock.advance(1)
    assert len(delivery.attempts) == 3
    assert spool.envelopes == {}
    assert clock.getDelayedCalls() == []


def test_jitter_comes_from_the_injected_source():
    """The next attempt is shortened by the random part drawn from the injected source."""
    class Half:
        def random(self) -> float:
            return 0.5

    spool = FakeSpool([envelope("u@a.test")])
    s, _ = scheduler(spool, FakeDelivery(all_transient), rng=Half())
    success(s.enqueue("Q1"))
    assert spool.envelopes["Q1"].recipients[0].next_attempt == NOW + 300 * 0.95


def test_recipients_are_retried_independently():
    """One delivered, one deferred: only the pending one is attempted again."""
    spool = FakeSpool([envelope("ok@a.test", "later@b.test")])
    delivery = FakeDelivery(lambda env: [delivered(r.address) if r.address == "ok@a.test" or len(delivery_log) > 1 else transient(r.address)
                                         for r in env.recipients])
    delivery_log = delivery.attempts
    s, clock = scheduler(spool, delivery)
    success(s.enqueue("Q1"))
    clock.advance(300)
    assert delivery.attempted() == [["ok@a.test", "later@b.test"], ["later@b.test"]]
    assert spool.envelopes == {}


def test_only_due_recipients_go_and_due_ones_go_together():
    """Recipients with different stored next attempts are attempted at their own times; those due together share one attempt."""
    env = envelope("a@a.test", "b@a.test", "c@b.test")
    env = env.with_recipients([
        replace(env.recipients[0], attempts=1, next_attempt=NOW + 100),
        replace(env.recipients[1], attempts=1, next_attempt=NOW + 100),
        replace(env.recipients[2], attempts=1, next_attempt=NOW + 500),
    ])
    spool = FakeSpool([env])
    delivery = FakeDelivery(all_delivered)
    s, clock = scheduler(spool, delivery)
    s.startService()
    assert delivery.attempts == [] and s.due("Q1") == NOW + 100
    clock.advance(100)
    assert delivery.attempted() == [["a@a.test", "b@a.test"]]
    assert s.due("Q1") == NOW + 500
    clock.advance(400)
    assert delivery.attempted() == [["a@a.test", "b@a.test"], ["c@b.test"]]
    assert spool.envelopes == {}


def test_recipients_deferred_together_stay_together():
    """Recipients deferred in one attempt with the same history share one next attempt time despite jitter."""
    import random

    spool = FakeSpool([envelope("a@a.test", "b@a.test")])
    delivery = FakeDelivery(all_transient)
    s, _ = scheduler(spool, delivery, rng=random.Random(5))
    success(s.enqueue("Q1"))
    a, b = spool.envelopes["Q1"].recipients
    assert a.next_attempt == b.next_attempt and NOW + 270 < a.next_attempt <= NOW + 300


def test_earlier_entry_rearms_the_single_timer():
    """A message due earlier than the armed timer moves the one timer forward."""
    spool = FakeSpool([envelope("u@a.test", queue_id="Q1"), envelope("v@a.test", queue_id="Q2")])
    delivery = FakeDelivery(all_transient)
    s, clock = scheduler(spool, delivery)
    success(s.enqueue("Q1"))
    clock.advance(100)
    success(s.enqueue("Q2"))  # due at +400 now; Q1 at +300
    assert [c.getTime() for c in clock.getDelayedCalls()] == [NOW + 300]
    clock.advance(200)
    assert [e.queue_id for e in delivery.attempts] == ["Q1", "Q2", "Q1"]
    assert [c.getTime() for c in clock.getDelayedCalls()] == [NOW + 400]


# -- expiry and notifications --------------------------------------------------------------


def test_expiry_fails_the_recipient_with_4_4_7_and_bounces_once():
    """Past max_lifetime a deferred recipient fails (4.4.7, last error kept), one DSN is spooled, the message removed."""
    spool = FakeSpool([envelope("u@a.test", arrival=NOW - CONFIG.max_lifetime + 200)])
    delivery = FakeDelivery(all_transient)
    dsn = FakeDSN()
    s, clock = scheduler(spool, delivery, send_dsn=dsn)
    success(s.enqueue("Q1"))
    assert spool.envelopes["Q1"].recipients[0].next_attempt == NOW + 200  # the deadline, not +300
    assert dsn.calls == []
    clock.advance(200)
    assert len(delivery.attempts) == 2
    [call] = dsn.calls
    assert call["recipients"] == ["u@a.test"] and call["statuses"] == [FAILED]
    assert "action" not in call and call["hostname"] == "relay.test" and call["now"] == NOW + 200
    failed = call["envelope"].recipient("u@a.test")
    assert failed.last_error == "451 4.3.0 try later"
    assert recipient_status(failed) == "4.4.7"
    assert call["stored"].recipient("u@a.test").status == FAILED  # stored before the DSN
    assert spool.envelopes == {} and spool.writes[-1] == ("remove", "Q1")
    clock.advance(CONFIG.max_lifetime)
    assert len(dsn.calls) == 1 and len(delivery.attempts) == 2


def test_message_past_its_lifetime_is_attempted_once_more_before_expiring():
    """A message found past its lifetime (relay was down) gets one last attempt, which may deliver it."""
    spool = FakeSpool([envelope("u@a.test", arrival=NOW - 2 * CONFIG.max_lifetime)])
    delivery = FakeDelivery(all_delivered)
    dsn = FakeDSN()
    s, _ = scheduler(spool, delivery, send_dsn=dsn)
    s.startService()
    assert len(delivery.attempts) == 1 and dsn.calls == [] and spool.envelopes == {}


def test_permanent_failure_bounces_once_then_removes():
    """A permanent failure is stored, one DSN is spooled for it, and then the message is removed."""
    spool = FakeSpool([envelope("bad@a.test", "ok@b.test")])
    dsn = FakeDSN()
    s, clock = scheduler(spool, FakeDelivery(lambda env: [permanent("bad@a.test"), delivered("ok@b.test")]), send_dsn=dsn)
    success(s.enqueue("Q1"))
    [call] = dsn.calls
    assert call["recipients"] == ["bad@a.test"]
    assert call["stored"].recipient("bad@a.test").status == FAILED
    assert call["stored"].recipient("ok@b.test").status == DELIVERED
    assert [w[0] for w in spool.writes] == ["modify", "remove"]
    clock.advance(CONFIG.max_lifetime)
    assert len(dsn.calls) == 1


def test_failure_with_recipients_still_pending_is_reported_once():
    """A failure is reported at once and marked, even while other recipients are still retried."""
    spool = FakeSpool([envelope("bad@a.test", "later@b.test")])
    answers = iter([lambda: [permanent("bad@a.test"), transient("later@b.test")], lambda: [delivered("later@b.test")]])
    dsn = FakeDSN()
    s, clock = scheduler(spool, FakeDelivery(lambda env: next(answers)()), send_dsn=dsn)
    success(s.enqueue("Q1"))
    assert [c["recipients"] for c in dsn.calls] == [["bad@a.test"]]
    stored = spool.envelopes["Q1"]
    assert stored.recipient("bad@a.test").reported and not stored.recipient("later@b.test").reported
    clock.advance(300)
    assert len(dsn.calls) == 1 and spool.envelopes == {}


def test_null_sender_failure_sends_nothing_and_removes():
    """A failed message from <> produces no DSN at all and is removed."""
    spool = FakeSpool([envelope("bad@a.test", sender="")])
    dsn = FakeDSN()
    s, _ = scheduler(spool, FakeDelivery(lambda env: [permanent("bad@a.test")]), send_dsn=dsn)
    success(s.enqueue("Q1"))
    assert dsn.calls == [] and spool.envelopes == {}


def test_dsn_that_cannot_be_spooled_is_tried_again_later():
    """When the DSN cannot be stored the failure stays unreported, the message stays, and the DSN is retried after min_retry."""
    spool = FakeSpool([envelope("bad@a.test")])
    dsn = FakeDSN(fail=1)
    delivery = FakeDelivery(lambda env: [permanent("bad@a.test")])
    s, clock = scheduler(spool, delivery, send_dsn=dsn)
    success(s.enqueue("Q1"))
    assert len(dsn.calls) == 1 and not spool.envelopes["Q1"].recipients[0].reported
    assert s.due("Q1") == NOW + CONFIG.min_retry
    clock.advance(CONFIG.min_retry)
    assert len(dsn.calls) == 2 and spool.envelopes == {}
    assert len(delivery.attempts) == 1  # the failed recipient is never attempted again


def test_unreported_failure_found_at_start_up_is_reported():
    """A crash after storing a failure but before its DSN: the DSN is sent at start-up, before the next attempt is due."""
    env = envelope("bad@a.test", "later@b.test")
    env = env.with_recipients([
        replace(env.recipients[0], status=FAILED, attempts=1, last_error="550 5.1.1 no such user"),
        replace(env.recipients[1], attempts=1, next_attempt=NOW + 1000),
    ])
    spool = FakeSpool([env])
    dsn = FakeDSN()
    delivery = FakeDelivery(all_delivered)
    s, _ = scheduler(spool, delivery, send_dsn=dsn)
    s.startService()
    assert [c["recipients"] for c in dsn.calls] == [["bad@a.test"]] and delivery.attempts == []
    assert spool.envelopes["Q1"].recipient("bad@a.test").reported
    assert s.due("Q1") == NOW + 1000


def test_delay_warning_is_sent_once():
    """With delay_warning set, one "delayed" DSN goes out once a recipient waited that long, and never again."""
    config = replace(CONFIG, delay_warning=600.0)
    spool = FakeSpool([envelope("u@a.test")])
    dsn = FakeDSN()
    s, clock = scheduler(spool, FakeDelivery(all_transient), send_dsn=dsn, config=config)
    success(s.enqueue("Q1"))
    assert dsn.calls == []
    clock.advance(300)  # second attempt, 300 s old: not yet
    assert dsn.calls == []
    clock.advance(600)  # third attempt, 900 s old
    [call] = dsn.calls
    assert call["action"] == "delayed" and call["recipients"] == ["u@a.test"]
    assert call["retry_until"] == NOW + CONFIG.max_lifetime
    assert spool.envelopes["Q1"].recipients[0].warned
    clock.advance(1200)
    clock.advance(2400)
    assert len(dsn.calls) == 1


def test_no_delay_warning_by_default_or_for_null_sender():
    """delay_warning 0 (the default) sends no warning; nor does a message from <>."""
    for config, sender in ((CONFIG, "s@origin.test"), (replace(CONFIG, delay_warning=1.0), "")):
        spool = FakeSpool([envelope("u@a.test", sender=sender)])
        dsn = FakeDSN()
        s, clock = scheduler(spool, FakeDelivery(all_transient), send_dsn=dsn, config=config)
        success(s.enqueue("Q1"))
        clock.advance(300)
        assert dsn.calls == []


# -- flush, hold, release, forget ------------------------------------------------------------


def deferred_queue() -> tuple[FakeSpool, FakeDelivery, Scheduler, Clock]:
    """Four messages deferred until +1000, one of them held."""
    envs = []
    for queue_id, address, held in (("QA", "u@a.test", False), ("QB", "u@b.test", False),
                                    ("QS", "u@mx.sub.b.test", False), ("QH", "u@b.test", True)):
        env = envelope(address, queue_id=queue_id, held=held)
        envs.append(env.with_recipients([replace(env.recipients[0], attempts=1, next_attempt=NOW + 1000)]))
    spool = FakeSpool(envs)
    delivery = FakeDelivery(all_delivered)
    s, clock = scheduler(spool, delivery)
    s.startService()
    assert delivery.attempts == [] and s.scheduled == 3
    return spool, delivery, s, clock


def test_flush_all_attempts_every_deferred_message_now():
    """flush() makes every scheduled message due now, attempts every pending recipient, and leaves held ones held."""
    spool, delivery, s, _ = deferred_queue()
    assert s.flush() == 3
    assert sorted(e.queue_id for e in delivery.attempts) == ["QA", "QB", "QS"]
    assert list(spool.envelopes) == ["QH"] and spool.envelopes["QH"].held


def test_flush_by_domain_only_starts_that_domain():
    """flush("b.test") starts the messages with a pending recipient in b.test only, case-insensitively."""
    spool, delivery, s, clock = deferred_queue()
    assert s.flush("B.Test") == 1
    assert [e.queue_id for e in delivery.attempts] == ["QB"]
    assert s.flush("nothing.test") == 0
    clock.advance(1000)
    assert sorted(e.queue_id for e in delivery.attempts) == ["QA", "QB", "QS"]


def test_flush_with_subdomains_matches_them_too():
    """flush("b.test", subdomains=True) (ETRN @b.test) also starts messages for its subdomains."""
    spool, delivery, s, _ = deferred_queue()
    assert s.flush("b.test", subdomains=True) == 2
    assert sorted(e.queue_id for e in delivery.attempts) == ["QB", "QS"]
    assert "QH" in spool.envelopes


def test_flush_is_bounded_by_the_attempt_cap():
    """A flush of many messages starts at most max_attempts at once; the rest follow as attempts end."""
    envs = [envelope("u@a.test", queue_id=f"Q{i:03d}") for i in range(20)]
    envs = [e.with_recipients([replace(e.recipients[0], attempts=1, next_attempt=NOW + 1000)]) for e in envs]
    spool = FakeSpool(envs)
    delivery = FakeDelivery(all_delivered, manual=True)
    s, _ = scheduler(spool, delivery, max_attempts=4)
    s.startService()
    assert s.flush() == 20
    assert len(delivery.waiting) == 4 and len(s.in_flight) == 4 and len(spool.loads) == 4
    delivery.manual = False
    delivery.release_all()
    assert spool.envelopes == {} and len(delivery.attempts) == 20


def test_flush_skips_a_message_being_attempted():
    """A message in flight is not counted by flush nor started a second time."""
    spool = FakeSpool([envelope("u@a.test")])
    delivery = FakeDelivery(all_transient, manual=True)
    s, _ = scheduler(spool, delivery)
    s.enqueue("Q1")
    assert s.flush() == 0 and s.flush("a.test") == 0
    delivery.release_all()
    assert len(delivery.attempts) == 1 and s.due("Q1") == NOW + 300


def test_repeated_rescheduling_keeps_the_heap_small():
    """Stale heap entries left by rescheduling are compacted away."""
    spool, delivery, s, clock = deferred_queue()
    for _ in range(5000):
        s.reschedule("QA")
    assert len(s._heap) <= 2 * s.scheduled + 1024
    clock.advance(1000)
    assert sorted(e.queue_id for e in delivery.attempts) == ["QA", "QB", "QS"]


def test_reschedule_after_release_makes_the_message_due_now():
    """A released message (held when picked up) is attempted at once after reschedule."""
    spool, delivery, s, _ = deferred_queue()
    assert s.due("QH") is None
    spool.hold("QH", held=False)
    s.reschedule("QH")
    assert [e.queue_id for e in delivery.attempts] == ["QH"]
    assert "QH" not in spool.envelopes


def test_reschedule_of_a_scheduled_message_keeps_its_stored_times():
    """After an operator edit, a scheduled message is due at its stored next attempt."""
    spool, delivery, s, _ = deferred_queue()
    env = spool.envelopes["QA"]
    spool.envelopes["QA"] = env.with_recipients([replace(env.recipients[0], next_attempt=NOW + 50)])
    s.reschedule("QA")
    assert s.due("QA") == NOW + 50 and delivery.attempts == []


def test_reschedule_of_a_held_or_deleted_message_drops_it():
    """reschedule of a message now held, or gone, leaves it unscheduled without error."""
    spool, delivery, s, clock = deferred_queue()
    spool.hold("QA")
    s.reschedule("QA")
    del spool.envelopes["QB"]
    s.reschedule("QB")
    assert s.due("QA") is None and s.due("QB") is None
    clock.advance(1000)
    assert [e.queue_id for e in delivery.attempts] == ["QS"]


def test_forget_drops_the_timer_entry():
    """A forgotten message is not attempted when its time comes."""
    spool, delivery, s, clock = deferred_queue()
    s.forget("QA")
    s.forget("UNKNOWN")
    clock.advance(1000)
    assert sorted(e.queue_id for e in delivery.attempts) == ["QB", "QS"]
    assert "QA" in spool.envelopes


# -- start-up, limits, stop --------------------------------------------------------------------


def test_startup_schedules_pending_messages_and_skips_held_ones():
    """startService attempts every queued message that is due and skips held ones."""
    envs = [envelope("u@a.test", queue_id=f"Q{i}") for i in range(5)]
    envs.append(envelope("u@a.test", queue_id="QH", held=True))
    spool = FakeSpool(envs)
    delivery = FakeDelivery(all_delivered)
    s, _ = scheduler(spool, delivery)
    s.startService()
    success(s._pickup)
    assert sorted(e.queue_id for e in delivery.attempts) == [f"Q{i}" for i in range(5)]
    assert list(spool.envelopes) == ["QH"]
    assert "QH" not in spool.loads


def test_startup_reads_in_batches_per_reactor_turn():
    """Pickup schedules pickup_batch messages per turn, so the reactor keeps serving while the schedule fills."""
    later = lambda env: env.with_recipients([replace(r, next_attempt=NOW + 1000) for r in env.recipients])
    spool = FakeSpool([later(envelope("u@a.test", queue_id=f"Q{i}")) for i in range(5)])
    s, clock = scheduler(spool, FakeDelivery(all_delivered), pickup_batch=2)
    s.startService()
    assert s.scheduled == 2
    no_result(s._pickup)
    assert sorted(c.getTime() for c in clock.getDelayedCalls()) == [NOW, NOW + 1000]  # the next batch, on the next turn
    clock.advance(0)
    success(s._pickup)
    assert s.scheduled == 5 and spool.loads == []


def test_global_attempt_cap_is_respected():
    """At most max_attempts messages are in flight at once; envelopes are loaded only for them."""
    spool = FakeSpool([envelope("u@a.test", queue_id=f"Q{i:03d}") for i in range(50)])
    delivery = FakeDelivery(all_delivered, manual=True)
    s, _ = scheduler(spool, delivery, max_attempts=3)
    s.startService()
    success(s._pickup)
    assert len(delivery.waiting) == 3 and len(spool.loads) == 3
    for _ in range(5):
        env, d = delivery.waiting.pop(0)
        d.callback(all_delivered(env))
        assert len(s.in_flight) <= 3
    assert len(spool.loads) == 8
    new = s.enqueue("Q049")  # a new message waits its turn too
    assert len(s.in_flight) == 3
    success(new)
    delivery.manual = False
    delivery.release_all()
    assert spool.envelopes == {}
    assert len(delivery.attempts) == 50


def test_startup_pickup_of_many_skipped_messages_does_not_recurse():
    """Walking thousands of held messages completes without exhausting the stack."""
    spool = FakeSpool([envelope("u@a.test", queue_id=f"Q{i:05d}", held=True) for i in range(3000)])
    s, clock = scheduler(spool, FakeDelivery(all_delivered))
    s.startService()
    clock.advance(0)
    clock.advance(0)
    success(s._pickup)
    assert len(spool.peeks) == 3000 and spool.loads == []


def test_many_synchronous_attempts_do_not_recurse():
    """Thousands of attempts that end at once run one after another without deep recursion."""
    spool = FakeSpool([envelope("u@a.test", queue_id=f"Q{i:05d}") for i in range(3000)])
    s, clock = scheduler(spool, FakeDelivery(all_delivered), max_attempts=2, pickup_batch=5000)
    s.startService()
    assert spool.envelopes == {}


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
    """An attempt that does not end within the grace period is left queued; stop still returns; nothing new starts."""
    spool = FakeSpool([envelope("u@a.test", queue_id="Q1"), envelope("u@a.test", queue_id="Q2")])
    delivery = FakeDelivery(all_delivered, manual=True)
    s, clock = scheduler(spool, delivery, stop_grace=10.0, max_attempts=1)
    s.startService()
    stopping = s.stopService()
    clock.advance(9)
    no_result(stopping)
    clock.advance(1)
    success(stopping)
    assert set(spool.envelopes) == {"Q1", "Q2"}
    success(s.enqueue("Q2"))  # stopped: no new attempts
    assert s.flush() == 0
    delivery.release_all()  # the late attempt ends: nothing else starts
    assert len(delivery.attempts) == 1 and "Q2" in spool.envelopes
    assert clock.getDelayedCalls() == []


# -- with the real spool ----------------------------------------------------------------------


def sync_runner(f: Callable[..., Any], *args: Any) -> Deferred:
    return defer.maybeDeferred(f, *args)


def store(spool: Spool, env: Envelope, data: bytes = b"Subject: t\r\n\r\nhi\r\n") -> str:
    message = spool.new_message()
    message.write(data)
    env = replace(env, queue_id=message.queue_id)
    return success(message.commit(env))


def real_spool(tmp_path: Path) -> Spool:
    spool = Spool(str(tmp_path / "q"), clock=Clock(), runner=sync_runner)
    spool.recover()
    return spool


def test_real_spool_delivered_message_is_removed(tmp_path):
    """With the on-disk store, a delivered message's envelope and bytes are gone afterwards."""
    spool = real_spool(tmp_path)
    queue_id = store(spool, envelope("u@a.test"))
    s, _ = scheduler(spool, FakeDelivery(all_delivered))
    success(s.enqueue(queue_id))
    assert spool.ids() == []
    with pytest.raises(KeyError):
        spool.open_message(queue_id)


def test_restart_rebuilds_the_schedule_from_the_spool(tmp_path):
    """A new scheduler over the same directory restores each message's stored next attempt and skips held ones."""
    spool = real_spool(tmp_path)
    first = store(spool, envelope("ok@a.test", "later@b.test"))
    second = store(spool, envelope("x@c.test"))
    held = store(spool, envelope("h@c.test", held=True))
    decide = lambda env: [delivered(r.address) if r.address == "ok@a.test" else transient(r.address) for r in env.pending()]
    s, clock = scheduler(spool, FakeDelivery(decide))
    success(s.enqueue(first))
    clock.advance(100)
    success(s.enqueue(second))
    stored = Spool(spool.directory, runner=sync_runner).load(first)
    assert [(r.status, r.attempts, r.next_attempt) for r in stored.recipients] == [
        (DELIVERED, 1, None), (PENDING, 1, NOW + 300)]
    assert stored.recipient("later@b.test").last_error == "451 4.3.0 try later"

    restarted = Spool(spool.directory, clock=Clock(), runner=sync_runner)
    restarted.recover()
    delivery = FakeDelivery(all_delivered)
    s2, clock2 = scheduler(restarted, delivery)
    clock2.advance(200)
    s2.startService()
    success(s2._pickup)
    assert (s2.due(first), s2.due(second), s2.due(held)) == (NOW + 300, NOW + 400, None)
    assert delivery.attempts == []
    clock2.advance(100)
    assert delivery.attempted() == [["later@b.test"]]
    clock2.advance(100)
    assert delivery.attempted() == [["later@b.test"], ["x@c.test"]]
    assert restarted.ids() == [held]


def test_flush_by_domain_after_restart_uses_stored_domains(tmp_path):
    """After a restart, ETRN-style flushes find messages by the domains read at pickup (U-labels match A-labels)."""
    spool = real_spool(tmp_path)
    env = envelope("u@bücher.test", "v@other.test")
    env = env.with_recipients([replace(r, attempts=1, next_attempt=NOW + 900) for r in env.recipients])
    queue_id = store(spool, env)
    delivery = FakeDelivery(all_delivered)
    s, _ = scheduler(spool, delivery)
    s.startService()
    assert s.flush("xn--bcher-kva.test") == 1
    assert delivery.attempted() == [["u@bücher.test", "v@other.test"]]
    assert spool.ids() == []
    assert queue_id not in s.in_flight


def test_unreadable_envelope_is_quarantined_when_first_read(tmp_path):
    """A stored envelope that cannot be read is moved to corrupt/ when its attempt reads it; the others go on."""
    spool = real_spool(tmp_path)
    bad = store(spool, envelope("v@a.test"), b"body")
    good = store(spool, envelope("u@a.test"))
    with sqlite3.connect(tmp_path / "q" / "queue.db") as db:
        db.execute("UPDATE envelope SET data = ? WHERE id = ?", (b"{not json", bad))
    spool = real_spool(tmp_path)
    assert sorted(spool.ids()) == sorted([bad, good])
    delivery = FakeDelivery(all_delivered)
    s, _ = scheduler(spool, delivery)
    s.startService()
    assert spool.ids() == []
    assert sorted(os.listdir(tmp_path / "q" / "corrupt")) == [bad + ".json", bad + ".msg", bad + ".reason"]
    assert (tmp_path / "q" / "corrupt" / (bad + ".msg")).read_bytes() == b"body"
    assert delivery.attempted() == [["u@a.test"]]


def test_peek_summarizes_without_building_an_envelope(tmp_path):
    """Spool.peek reads held, the earliest pending next attempt, domains and unreported failures from columns."""
    spool = real_spool(tmp_path)
    env = envelope("a@a.test", "b@B.test", "c@c.test", "d@d.test", held=True)
    env = env.with_recipients([
        replace(env.recipients[0], next_attempt=NOW + 5),
        replace(env.recipients[2], status=FAILED),
        replace(env.recipients[3], status=DELIVERED),
    ])
    queue_id = store(spool, env)
    summary = spool.peek(queue_id)
    assert summary == QueueSummary.of(spool.load(queue_id))
    assert (summary.held, summary.due, summary.domains, summary.unreported) == (True, None, ("a.test", "B.test"), 1)
    later = store(spool, envelope("a@a.test", "b@b.test").with_recipients(
        [Recipient("a@a.test", next_attempt=NOW + 9), Recipient("b@b.test", next_attempt=NOW + 5)]))
    assert spool.peek(later).due == NOW + 5
    try:
        spool.peek("0000000000000000")
    except KeyError:
        pass
    else:
        raise AssertionError("peek of a missing id must raise KeyError")


def test_v1_envelope_without_new_fields_loads_with_defaults():
    """Stored v1 JSON written before reported/warned existed loads with both False."""
    data = (Path(__file__).parent / "fixtures" / "envelope-v1.json").read_bytes()
    env = Envelope.from_json(data)
    assert all(not r.reported and not r.warned for r in env.recipients)
    assert Envelope.from_json(env.to_json()) == env


# -- configuration ------------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("value,seconds", [('"4h"', 14400.0), ("0", 0.0), ('"0s"', 0.0), ("90", 90.0)])
def test_delay_warning_key_is_parsed(tmp_path, value, seconds):
    """[queue] delay_warning takes a duration; 0 turns it off."""
    assert load_config(write_config(tmp_path, f"[queue]\ndelay_warning = {value}\n")).queue.delay_warning == seconds


def test_delay_warning_defaults_to_off(tmp_path):
    """Without the key there is no delay warning."""
    assert load_config(write_config(tmp_path, "[queue]\n")).queue.delay_warning == 0.0


@pytest.mark.parametrize("value", ['"soon"', "-5", "true"])
def test_bad_delay_warning_is_one_line_naming_the_key(tmp_path, value):
    """A bad delay_warning is one ConfigError line naming the file and queue.delay_warning."""
    path = write_config(tmp_path, f"[queue]\ndelay_warning = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: queue.delay_warning: ")


def test_real_bounce_is_spooled_once_and_the_original_removed(tmp_path):
    """With the real spool and relay.bounce, a permanent failure leaves exactly one DSN from <> to the sender."""
    from relay.bounce import send_dsn

    spool = real_spool(tmp_path)
    queue_id = store(spool, envelope("bad@a.test"), b"From: s@origin.test\r\nSubject: hello\r\n\r\nbody\r\n")
    s, clock = scheduler(spool, FakeDelivery(lambda env: [permanent("bad@a.test")]), send_dsn=send_dsn)
    success(s.enqueue(queue_id))
    [dsn_id] = spool.ids()
    assert dsn_id != queue_id
    dsn = spool.load(dsn_id)
    assert dsn.sender == "" and [r.address for r in dsn.recipients] == ["s@origin.test"]
    with spool.open_message(dsn_id) as f:
        text = f.read().decode("utf-8", "replace")
    assert "bad@a.test" in text and "5.1.1" in text
    clock.advance(CONFIG.max_lifetime)
    assert spool.ids() == [dsn_id]


def test_real_spool_never_bounces_the_null_sender(tmp_path):
    """With the real spool and relay.bounce, a message from <> that fails or expires leaves nothing queued."""
    from relay.bounce import send_dsn

    spool = real_spool(tmp_path)
    config = replace(CONFIG, delay_warning=1.0)
    body = b"From: MAILER-DAEMON@origin.test\r\nSubject: bounce\r\n\r\nbody\r\n"
    failed = store(spool, envelope("bad@a.test", sender=""), body)
    waiting = store(spool, replace(envelope("later@b.test", sender=""), queue_id="Q2"), body)
    outcomes = {"bad@a.test": permanent("bad@a.test"), "later@b.test": transient("later@b.test")}
    s, clock = scheduler(spool, FakeDelivery(lambda env: [outcomes[r.address] for r in env.pending()]),
                         send_dsn=send_dsn, config=config)
    success(s.enqueue(failed))
    success(s.enqueue(waiting))
    assert spool.ids() == [waiting]  # the failure is gone without a DSN; no delay warning either
    for _ in range(40):  # retries until the lifetime ends, bounded
        if not spool.ids():
            break
        clock.advance(CONFIG.max_retry)
    assert spool.ids() == []
