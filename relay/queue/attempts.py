"""One attempt of a queued message, and what it leaves in the store.

The scheduler decides when a message is attempted; ``Attempts`` runs the
attempt: delivery tries the due recipients, their outcomes are settled
into the envelope (``relay.queue.rules.settle``, with each deferred
recipient's next attempt from ``relay.queue.retry``) and written back
durably before anything else happens, so a delivered recipient is never
attempted again.  The outcomes of a destination that finished while the
message's other destinations are still being tried are written at once.
Every write applies its change to the envelope as stored at that moment
(``record``), so an operator's change during the attempt (a hold) is kept.
A message with nothing pending and every failure reported is removed
(``finished``).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from relay.config import QueueConfig
from relay.envelope import (
    DELIVERED,
    FAILED,
    OUTCOME_DELIVERED,
    OUTCOME_PERMANENT,
    OUTCOME_TRANSIENT,
    Envelope,
    Outcome,
    Recipient,
)
from relay.log import Logger
from relay.queue.retry import RandomSource, next_attempt
from relay.queue.rules import first_arrival, settle, unreported

log = Logger(namespace="relay.queue.scheduler")  # the scheduler's lines, as operators filter them

# What an expired recipient's notification says (RFC 3463).
STATUS_EXPIRED = "4.4.7"
TEXT_EXPIRED = "delivery time expired"


def clock_text(when: float) -> str:
    """``when`` as a time of day in UTC, for the log."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration_text(seconds: float) -> str:
    """A delay as the log says it: ``42s``, ``5m07s``, ``3h20m``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Attempts:
    """Runs the attempts of queued messages through delivery and writes their results to the spool."""

    def __init__(self, spool: Any, delivery: Any, clock: IReactorTime, config: QueueConfig, rng: RandomSource) -> None:
        self.spool = spool
        self.delivery = delivery
        self.clock = clock
        self.config = config
        self.rng = rng

    async def attempt(self, envelope: Envelope, due: tuple[Recipient, ...], forced: bool = False) -> Optional[Envelope]:
        """Attempt the due recipients and store the outcome; None when the message is gone.

        The outcomes of a destination whose transaction ended while the
        message's other destinations are still being tried are stored at
        once, so a crash meanwhile does not send what was delivered again.
        """
        queue_id = envelope.queue_id
        early: list[Deferred] = []
        recorded: set[str] = set()

        def progress(outcomes: list[Outcome]) -> None:
            at = self.clock.seconds()
            times = self._next_times(envelope, outcomes, at)
            recorded.update(o.recipient for o in outcomes)
            early.append(Deferred.fromCoroutine(self.record(queue_id, lambda current: settle(current, outcomes, at, times))))

        outcomes = await self.delivery.attempt(replace(envelope, recipients=due), progress=progress, forced=forced)
        stored_early = await defer.gatherResults(early) if early else []
        if any(e is None for e in stored_early):
            return None
        now = self.clock.seconds()
        next_times = self._next_times(envelope, outcomes, now)
        result = settle(envelope, outcomes, now, next_times)
        if result.pending() or unreported(result):
            rest = [o for o in outcomes if o.recipient not in recorded]
            stored = await self.record(queue_id, lambda current: settle(current, rest, now, next_times))
            if stored is None:
                return None
            result = stored
        self._log_result(envelope, result, now)
        return result

    def _next_times(self, envelope: Envelope, outcomes: list[Outcome], now: float) -> dict[str, Optional[float]]:
        """The next attempt of each recipient deferred now; recipients with as many
        attempts behind them share one time, so they go together again."""
        arrival = first_arrival(envelope, now)
        by_attempts: dict[int, Optional[float]] = {}
        times: dict[str, Optional[float]] = {}
        for outcome in outcomes:
            if outcome.kind in (OUTCOME_DELIVERED, OUTCOME_PERMANENT):
                continue
            try:
                attempts = envelope.recipient(outcome.recipient).attempts + 1
            except KeyError:
                continue
            if attempts not in by_attempts:
                by_attempts[attempts] = next_attempt(attempts, arrival, now, self.config, self.rng)
            times[outcome.recipient] = by_attempts[attempts]
        return times

    async def record(self, queue_id: str, change: Callable[[Envelope], Envelope]) -> Optional[Envelope]:
        """Durably apply ``change`` to the stored envelope; None when it was removed meanwhile.

        The change is applied to the envelope as stored now, read under the
        spool's lock, so an operator's change during the attempt (a hold) is kept.
        """
        try:
            return await self.spool.modify(queue_id, change)
        except KeyError:
            log.info("{queue_id}: removed while being attempted", queue_id=queue_id)
            return None

    async def finished(self, envelope: Envelope) -> None:
        """Nothing is pending and every failure is reported: remove the message."""
        await self.spool.remove(envelope.queue_id)
        delivered = sum(1 for r in envelope.recipients if r.status == DELIVERED)
        failed = sum(1 for r in envelope.recipients if r.status == FAILED)
        log.info(
            "{queue_id}: done ({delivered} delivered, {failed} failed), removed",
            queue_id=envelope.queue_id,
            delivered=delivered,
            failed=failed,
            event="finished",
        )

    def _log_result(self, before: Envelope, after: Envelope, now: float) -> None:
        queue_id = after.queue_id
        was_pending = {r.address for r in before.pending()}
        for r in after.recipients:
            if r.address in was_pending and r.status == FAILED and r.history and r.history[-1].outcome == OUTCOME_TRANSIENT:
                log.info(
                    "{queue_id}: to=<{recipient}> expired after {attempts} attempt(s): "
                    "{status} {text}; last error: {error}",
                    queue_id=queue_id,
                    recipient=r.address,
                    attempts=r.attempts,
                    status=STATUS_EXPIRED,
                    text=TEXT_EXPIRED,
                    error=r.last_error,
                    event="expired",
                )
        pending = after.pending()
        times = [r.next_attempt for r in pending if r.next_attempt is not None]
        if pending and times:
            when = min(times)
            log.info(
                "{queue_id}: deferred, {count} recipient(s) pending, next attempt {when} (in {delay})",
                queue_id=queue_id,
                count=len(pending),
                when=clock_text(when),
                delay=duration_text(when - now),
                event="retry",
            )
