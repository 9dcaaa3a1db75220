"""The queue's pure rules: what an attempt's outcomes do to a queued message, and when it is due.

No I/O and no clock: each function takes the envelope (or the store's
summary of it) and the time, and returns the new value.  ``apply_outcomes``
and ``settle`` turn delivery outcomes into recipient states (delivered,
failed, or pending with the time of its next attempt; expired past
``max_lifetime``); ``mark_notified`` records the notifications that are
durable; ``unreported``, ``first_arrival`` and ``due_time`` answer the
scheduler's questions about a message.  ``relay.queue.attempts``,
``relay.queue.notices`` and ``relay.queue.scheduler`` apply them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Optional

from relay.bounce import notification_due
from relay.dsn_report import ACTION_FAILED, ACTION_RELAYED
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
from relay.queue.schema import QueueSummary

_STATE_AFTER = {
    OUTCOME_DELIVERED: DELIVERED,
    OUTCOME_PERMANENT: FAILED,
    OUTCOME_TRANSIENT: PENDING,
}


def apply_outcome(recipient: Recipient, outcome: Outcome, now: float) -> Recipient:
    """``recipient`` after one attempt that ended with ``outcome`` at ``now``."""
    kind = outcome.kind if outcome.kind in _STATE_AFTER else OUTCOME_TRANSIENT
    attempt = Attempt(
        time=now,
        outcome=kind,
        code=outcome.code,
        status=outcome.status,
        text=outcome.text,
        host=outcome.host,
        remote=outcome.remote,
        reason=outcome.reason,
        rule=outcome.rule,
        tls=outcome.tls,
        tls_fallback=outcome.tls_fallback,
        dsn_passed=outcome.dsn_passed,
    )
    return replace(
        recipient,
        status=_STATE_AFTER[kind],
        attempts=recipient.attempts + 1,
        last_error="" if kind == OUTCOME_DELIVERED else attempt.reply,
        next_attempt=None,
        history=recipient.history + (attempt,),
    )


def apply_outcomes(envelope: Envelope, outcomes: list[Outcome], now: float) -> Envelope:
    """The envelope after an attempt: delivered -> DELIVERED, permanent -> FAILED, transient stays PENDING.

    Only pending recipients change; an outcome for a recipient that is not
    pending (or not in the envelope) is ignored, so nothing delivered is ever
    made pending again.
    """
    by_address = {outcome.recipient: outcome for outcome in outcomes}
    updated = [
        apply_outcome(r, by_address[r.address], now)
        for r in envelope.recipients
        if r.status == PENDING and r.address in by_address
    ]
    return envelope.with_recipients(updated)


def settle(
    envelope: Envelope, outcomes: list[Outcome], now: float, next_times: Mapping[str, Optional[float]]
) -> Envelope:
    """``apply_outcomes``, then each recipient deferred now gets its next attempt from ``next_times``.

    ``None`` there means the recipient has expired: it becomes FAILED and
    keeps its last error (its notification says 4.4.7, delivery time
    expired).  Failures nobody is to be told about (``notification_due``:
    the null sender, NOTIFY) are marked reported at once.  A recipient
    delivered to a next hop without DSN whose NOTIFY asks for SUCCESS owes
    its sender a "relayed" notice (RFC 3461 5.2.2): ``relayed_notice``.
    """
    after = apply_outcomes(envelope, outcomes, now)
    passed = {o.recipient for o in outcomes if o.kind == OUTCOME_DELIVERED and o.dsn_passed}
    delivered_now = {o.recipient for o in outcomes if o.kind == OUTCOME_DELIVERED}
    updated = []
    for r in after.recipients:
        if (r.status == DELIVERED and r.address in delivered_now and r.address not in passed
                and not r.reported and notification_due(envelope, r, ACTION_RELAYED)):
            r = replace(r, relayed_notice=True)
        if r.status == PENDING and r.address in next_times:
            when = next_times[r.address]
            r = replace(r, next_attempt=when) if when is not None else replace(r, status=FAILED)
        if r.status == FAILED and not r.reported and not notification_due(envelope, r, ACTION_FAILED):
            r = replace(r, reported=True)
        updated.append(r)
    return after.with_recipients(updated)


def mark_notified(envelope: Envelope, reported: frozenset[str], warned: frozenset[str]) -> Envelope:
    """Mark recipients in ``reported`` (failed or relayed) reported and pending ones in ``warned`` warned."""
    updated = []
    for r in envelope.recipients:
        if r.awaiting_report and r.address in reported:
            updated.append(replace(r, reported=True))
        elif r.status == PENDING and r.address in warned:
            updated.append(replace(r, warned=True))
    return envelope.with_recipients(updated)


def unreported(envelope: Envelope) -> list[Recipient]:
    """Recipients owed a notification (failed, or relayed with SUCCESS asked) not spooled yet."""
    return [r for r in envelope.recipients if r.awaiting_report]


def first_arrival(envelope: Envelope, now: float) -> float:
    """When the message arrived; its first attempt, or ``now``, when that is not recorded."""
    if envelope.arrival > 0:
        return envelope.arrival
    times = [r.history[0].time for r in envelope.recipients if r.history]
    return min(times) if times else now


def due_time(summary: QueueSummary, now: float, report_at: Optional[float] = None) -> float:
    """When a message is due: its earliest pending recipient, or ``now`` when it has
    nothing pending (it only needs finishing) or owes a notification (at ``report_at``)."""
    candidates = [now if summary.due is None else summary.due] if summary.domains else []
    if summary.unreported:
        candidates.append(now if report_at is None else report_at)
    return min(candidates) if candidates else now
