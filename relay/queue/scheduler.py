"""The queue runner: which queued message is attempted when, and what its outcome does to it.

This module owns step 3 of the data flow.  ``apply_outcomes`` is the pure
rule that turns delivery outcomes into recipient states; ``Scheduler`` runs
attempts (one in flight per message), writes their results back to the spool
durably, removes finished messages, and picks up every queued message at
start-up.  It owns every retry: nothing else tries a message again.

This first version attempts a message when it is enqueued (a new message, a
restart, a flush).  Retry timers and bounces plug in at the seams
``_deferred`` (some recipients still pending) and ``_finished`` (none left).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

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

log = Logger()

# Messages attempted at once while walking the queue at start-up.
PICKUP_CONCURRENCY = 20
# How long stopService waits for attempts in flight before leaving them queued.
STOP_GRACE = 10.0

_STATE_AFTER = {
    OUTCOME_DELIVERED: DELIVERED,
    OUTCOME_PERMANENT: FAILED,
    OUTCOME_TRANSIENT: PENDING,
}


# -- the pure rule ------------------------------------------------------------------


def apply_outcome(recipient: Recipient, outcome: Outcome, now: float) -> Recipient:
    """``recipient`` after one attempt that ended with ``outcome`` at ``now``."""
    kind = outcome.kind if outcome.kind in _STATE_AFTER else OUTCOME_TRANSIENT
    reply = outcome.describe()
    attempt = Attempt(time=now, outcome=kind, reply=reply, host=outcome.host, route=outcome.rule)
    return replace(
        recipient,
        status=_STATE_AFTER[kind],
        attempts=recipient.attempts + 1,
        last_error="" if kind == OUTCOME_DELIVERED else reply,
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


# -- the runner ---------------------------------------------------------------------


class Scheduler(Service):
    """Runs delivery attempts for queued messages and writes their results back."""

    name = "scheduler"

    def __init__(
        self,
        spool: Any,
        delivery: Any,
        clock: IReactorTime,
        pickup_concurrency: int = PICKUP_CONCURRENCY,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self.spool = spool
        self.delivery = delivery
        self.clock = clock
        self.pickup_concurrency = max(1, pickup_concurrency)
        self.stop_grace = stop_grace
        self._in_flight: dict[str, Deferred] = {}
        self._stopping = False
        self._pickup: Optional[Deferred] = None

    # -- public ----------------------------------------------------------------

    def enqueue(self, queue_id: str) -> Deferred:
        """Attempt ``queue_id`` now unless it is held or already in flight.

        Fires (with None) once the result is written back or the message was
        skipped; never errbacks.
        """
        running = self._in_flight.get(queue_id)
        if running is not None:
            log.debug("{queue_id}: attempt already in flight", queue_id=queue_id)
            return defer.succeed(None)
        if self._stopping:
            log.debug("{queue_id}: not attempted, stopping", queue_id=queue_id)
            return defer.succeed(None)
        done: Deferred = Deferred()
        self._in_flight[queue_id] = done
        d = Deferred.fromCoroutine(self._run(queue_id))
        d.addErrback(self._run_failed, queue_id)
        d.addBoth(self._ran, queue_id, done)
        return done

    @property
    def in_flight(self) -> frozenset[str]:
        """Queue ids being attempted now."""
        return frozenset(self._in_flight)

    def startService(self) -> None:
        """Pick up every queued message (restart), a bounded number at a time."""
        Service.startService(self)
        self._stopping = False
        self._pickup = self.pickup()

    def stopService(self) -> Deferred:
        """Stop starting attempts; wait up to ``stop_grace`` seconds for those in flight."""
        Service.stopService(self)
        self._stopping = True
        return self._drain(self.stop_grace)

    def pickup(self) -> Deferred:
        """Enqueue every message of the spool, walking ids lazily; fires when all were tried."""
        ids = iter(self.spool.ids())
        workers = [Deferred.fromCoroutine(self._pickup_worker(ids)) for _ in range(self.pickup_concurrency)]
        d = defer.gatherResults(workers, consumeErrors=True)
        d.addCallback(lambda _: None)
        d.addErrback(lambda f: log.failure("queue pickup failed", f))
        return d

    # -- one message -----------------------------------------------------------

    async def _pickup_worker(self, ids: Iterator[str]) -> None:
        for queue_id in ids:
            if self._stopping:
                return
            await self.enqueue(queue_id)

    async def _run(self, queue_id: str) -> None:
        envelope = self._load(queue_id)
        if envelope is None:
            return
        if envelope.held:
            log.debug("{queue_id}: held, not attempted", queue_id=queue_id)
            return
        if not envelope.pending():
            await self._finished(envelope)
            return
        outcomes = await self.delivery.attempt(envelope)
        now = self.clock.seconds()
        if apply_outcomes(envelope, outcomes, now).pending():
            stored = await self._record(queue_id, outcomes, now)
            if stored is None:
                return
            envelope = stored
        else:
            envelope = apply_outcomes(envelope, outcomes, now)
        if envelope.pending():
            self._deferred(envelope)
        else:
            await self._finished(envelope)

    async def _record(self, queue_id: str, outcomes: list[Outcome], now: float) -> Optional[Envelope]:
        """Durably apply ``outcomes`` to the stored envelope; None when it was removed meanwhile.

        The outcomes are applied to the envelope as stored now, read under the
        spool's lock, so an operator's change during the attempt (a hold) is kept.
        """
        try:
            return await self.spool.modify(queue_id, lambda current: apply_outcomes(current, outcomes, now))
        except KeyError:
            log.info("{queue_id}: removed while being attempted", queue_id=queue_id)
            return None

    def _load(self, queue_id: str) -> Optional[Envelope]:
        try:
            return self.spool.load(queue_id)
        except KeyError:
            log.debug("{queue_id}: no longer queued", queue_id=queue_id)
        except Exception:
            log.failure("{queue_id}: cannot read the envelope", queue_id=queue_id)
        return None

    def _deferred(self, envelope: Envelope) -> None:
        """Some recipients are still pending: the place where their retry gets scheduled."""
        log.info(
            "{queue_id}: deferred, {count} recipient(s) pending",
            queue_id=envelope.queue_id,
            count=len(envelope.pending()),
        )

    async def _finished(self, envelope: Envelope) -> None:
        """No recipient is pending: remove the message.

        Bouncing the FAILED recipients belongs here, before the removal (and
        after the envelope with their final states is stored).
        """
        await self.spool.remove(envelope.queue_id)
        delivered = sum(1 for r in envelope.recipients if r.status == DELIVERED)
        failed = sum(1 for r in envelope.recipients if r.status == FAILED)
        log.info(
            "{queue_id}: done ({delivered} delivered, {failed} failed), removed",
            queue_id=envelope.queue_id,
            delivered=delivered,
            failed=failed,
        )

    def _run_failed(self, failure: Failure, queue_id: str) -> None:
        log.failure("{queue_id}: attempt not recorded; the message stays queued", failure, queue_id=queue_id)

    def _ran(self, _: Any, queue_id: str, done: Deferred) -> None:
        if self._in_flight.get(queue_id) is done:
            del self._in_flight[queue_id]
        done.callback(None)

    # -- stopping --------------------------------------------------------------

    def _drain(self, grace: float) -> Deferred:
        """Fire when every attempt in flight ended, or after ``grace`` seconds."""
        if not self._in_flight:
            return defer.succeed(None)
        result: Deferred = Deferred()
        waiting = [self._watch(d) for d in self._in_flight.values()]

        def fire(_: Any = None) -> None:
            if not result.called:
                if timer.active():
                    timer.cancel()
                else:
                    log.info("{count} delivery attempt(s) still running; left queued", count=len(self._in_flight))
                result.callback(None)

        timer = self.clock.callLater(grace, fire)
        defer.gatherResults(waiting).addBoth(fire)
        return result

    @staticmethod
    def _watch(d: Deferred) -> Deferred:
        """A Deferred that fires when ``d`` does, without taking its result."""
        watcher: Deferred = Deferred()

        def passthrough(result: Any) -> Any:
            if not watcher.called:
                watcher.callback(None)
            return result

        d.addBoth(passthrough)
        return watcher
