"""The queue manager: which queued message is attempted when.

This module owns step 3 of the data flow and every retry: nothing else
tries a message again.

``Scheduler`` keeps the schedule: a heap of (due time, queue id) with one
timer on the injected clock for the earliest entry, and per queued message
only its due time and the domains of its pending recipients (for ETRN).
The schedule is a cache of the store: at start-up it is rebuilt from the
summaries the store keeps beside each envelope (one query in a reader
thread, then scheduled in batches, so the reactor keeps serving), and
after each attempt from the envelope as stored.  A new message's envelope
comes with the commit, so its first attempt reads nothing back.

An attempt takes the message's pending recipients that are due (every one
on a flush) and writes their outcomes back durably before anything else
happens (``relay.queue.attempts``; the rules are ``relay.queue.rules``,
the retry policy ``relay.queue.retry``).  Then the notifications that are
owed are spooled (``relay.queue.notices``: failure DSNs, "relayed" notices
and, with ``[queue] delay_warning``, "delayed" DSNs), each marked only once
it is durable.  A message is removed once nothing is pending and every
failure is reported.

Work is bounded: at most ``max_attempts`` (``[queue] active_limit``)
messages are attempted at once (the rest wait in the heap, oldest first).
The limit is a bound on memory, not the means of isolation: a message
waiting for a busy destination waits in that destination's line in
delivery, where it keeps no other destination from its connections.
Start-up reads ``pickup_batch`` envelopes per reactor turn.  Held messages
are never attempted; they are not in the schedule at all.
"""

from __future__ import annotations

import heapq
import random
from functools import lru_cache
from itertools import islice
from typing import Any, Iterator, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from relay.log import Logger
from twisted.python.failure import Failure

from relay.config import QueueConfig
from relay.domains import normalize_domain
from relay.envelope import Envelope, EnvelopeFormatError
from relay.queue.attempts import Attempts, clock_text
from relay.queue.notices import Notices, SendDSN
from relay.queue.retry import RandomSource
from relay.queue.rules import due_time, unreported
from relay.queue.schema import QueueSummary

log = Logger()

# Messages attempted at once, in all, unless ``[queue] active_limit`` says otherwise.
MAX_ATTEMPTS = QueueConfig.active_limit
# Envelopes read per reactor turn while the schedule is rebuilt at start-up.
PICKUP_BATCH = 500
# How long stopService waits for attempts in flight before leaving them queued.
STOP_GRACE = 10.0
# Recipients falling due within this many seconds of an attempt go with it.
DUE_SLACK = 1.0
# The heap is rebuilt when stale entries outnumber live ones by this much.
_COMPACT_SLACK = 1024

_normalized = lru_cache(maxsize=65536)(normalize_domain)


@lru_cache(maxsize=8192)
def _domain_key(domains: tuple[str, ...]) -> tuple[str, ...]:
    """The normalized, de-duplicated domains; equal inputs share one tuple (memory)."""
    return tuple(dict.fromkeys(map(_normalized, domains)))


# -- the scheduler -------------------------------------------------------------------


class _Entry:
    """One scheduled message: when it is due and which domains it waits for."""

    __slots__ = ("due", "domains", "forced")

    def __init__(self, due: float, domains: tuple[str, ...], forced: bool) -> None:
        self.due = due
        self.domains = domains
        self.forced = forced  # a flush: attempt every pending recipient, due or not


class Scheduler(Service):
    """Keeps every queued message scheduled, runs its attempts and writes their results back."""

    name = "scheduler"

    def __init__(
        self,
        spool: Any,
        delivery: Any,
        clock: IReactorTime,
        config: Optional[QueueConfig] = None,
        hostname: str = "localhost",
        rng: Optional[RandomSource] = None,
        send_dsn: Optional[SendDSN] = None,
        max_attempts: Optional[int] = None,
        pickup_batch: int = PICKUP_BATCH,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self.spool = spool
        self.delivery = delivery
        self.clock = clock
        self.config = config if config is not None else QueueConfig()
        self.hostname = hostname
        self.rng: RandomSource = rng if rng is not None else random.Random()
        self._attempts = Attempts(spool, delivery, clock, self.config, self.rng)
        self._notices = Notices(spool, self.config, hostname, send_dsn, self._attempts.record)
        self.max_attempts = max(1, max_attempts if max_attempts is not None else self.config.active_limit)
        self.pickup_batch = max(1, pickup_batch)
        self.stop_grace = stop_grace
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, str]] = []
        self._timer: Optional[IDelayedCall] = None
        self._in_flight: dict[str, Deferred] = {}
        self._recheck: set[str] = set()  # changed on disk during their attempt
        self._fresh: dict[str, Envelope] = {}  # envelopes of new messages, as committed
        self._dispatching = False
        self._dispatch_again = False
        self._stopping = False
        self._pickup: Optional[Deferred] = None

    # -- public: the queue's other parts call these --------------------------------

    def enqueue(self, queue_id: str, envelope: Optional[Envelope] = None) -> Deferred:
        """Attempt ``queue_id`` now (a new message, whose ``envelope`` as committed
        saves reading it back), within the attempt cap.

        Fires (with None, never an error) when the attempt started by this call
        is written back, or at once when the message is already being
        attempted, the cap made it wait, or the scheduler is stopping.
        """
        if self._stopping or queue_id in self._in_flight:
            return defer.succeed(None)
        if envelope is not None:
            self._fresh[queue_id] = envelope
        self._set_due(queue_id, self.clock.seconds())
        self._dispatch()
        running = self._in_flight.get(queue_id)
        return _watch(running) if running is not None else defer.succeed(None)

    def flush(self, domain: Optional[str] = None, subdomains: bool = False) -> int:
        """Make every scheduled message due now, or those with a pending recipient in ``domain``.

        With ``subdomains``, the subdomains of ``domain`` match too (ETRN
        ``@example.org``).  Every pending recipient of a flushed message is
        attempted, whatever its next attempt time.  Held messages stay held;
        messages being attempted right now are not counted.  Returns how many
        messages were made due; they start at once up to the attempt cap, the
        rest as attempts end.
        """
        if self._stopping:
            return 0
        now = self.clock.seconds()
        if domain is None:
            targets = list(self._entries)
        else:
            targets = self._matching(normalize_domain(domain), subdomains)
        for queue_id in targets:
            entry = self._entries[queue_id]
            entry.due, entry.forced = now, True
        if domain is None:
            self._heap = [(now, queue_id) for queue_id in self._entries]
            heapq.heapify(self._heap)
        else:
            for queue_id in targets:
                heapq.heappush(self._heap, (now, queue_id))
            self._compact()
        log.info(
            "flush{scope}: {count} message(s) due now",
            scope="" if domain is None else f" of {domain}{' and its subdomains' if subdomains else ''}",
            count=len(targets),
        )
        self._dispatch()
        return len(targets)

    def reschedule(self, queue_id: str) -> None:
        """The envelope changed on disk (release, operator edit): read it and schedule it again.

        A message that was not scheduled (a released one) becomes due now,
        every pending recipient with it; a scheduled one keeps its stored times.
        """
        if self._stopping:
            return
        if queue_id in self._in_flight:
            self._recheck.add(queue_id)
            return
        self._fresh.pop(queue_id, None)
        d = self.spool.summary(queue_id)
        d.addCallbacks(self._rescheduled, self._reschedule_failed, callbackArgs=(queue_id, queue_id in self._entries),
                       errbackArgs=(queue_id,))

    def _reschedule_failed(self, failure: Failure, queue_id: str) -> None:
        if failure.check(KeyError):
            self._drop(queue_id)
        else:
            log.failure("{queue_id}: cannot read the envelope to reschedule it", failure, queue_id=queue_id)

    def _rescheduled(self, summary: QueueSummary, queue_id: str, known: bool) -> None:
        if self._stopping:
            return
        if queue_id in self._in_flight:
            self._recheck.add(queue_id)
            return
        if summary.held:
            self._drop(queue_id)
            return
        now = self.clock.seconds()
        due = due_time(summary, now) if known else now
        self._set_due(queue_id, due, _domain_key(summary.domains), forced=not known)
        log.info("{queue_id}: rescheduled, due {when}", queue_id=queue_id, when=clock_text(due))
        self._dispatch()

    def forget(self, queue_id: str) -> None:
        """The message was deleted or held: drop it from the schedule."""
        if queue_id in self._in_flight:
            self._recheck.add(queue_id)
        self._fresh.pop(queue_id, None)
        self._drop(queue_id)

    def due(self, queue_id: str) -> Optional[float]:
        """When ``queue_id`` is due, or None when it is not scheduled (held, in flight, unknown)."""
        entry = self._entries.get(queue_id)
        return None if entry is None else entry.due

    @property
    def scheduled(self) -> int:
        """How many messages wait in the schedule (not counting those in flight)."""
        return len(self._entries)

    @property
    def in_flight(self) -> frozenset[str]:
        """Queue ids being attempted now."""
        return frozenset(self._in_flight)

    # -- service -------------------------------------------------------------------

    def startService(self) -> None:
        """Rebuild the schedule from the spool (restart), a batch of envelopes per reactor turn."""
        Service.startService(self)
        self._stopping = False
        self._pickup = self.pickup()

    def stopService(self) -> Deferred:
        """Start nothing new; wait up to ``stop_grace`` seconds for attempts in flight.

        What has not finished stays queued and is attempted after a restart.
        """
        Service.stopService(self)
        self._stopping = True
        self._cancel_timer()
        return self._drain(self.stop_grace)

    def pickup(self) -> Deferred:
        """Schedule every queued message that is not held; fires once all are scheduled."""
        done: Deferred = Deferred()
        counts = {"scheduled": 0, "held": 0}

        def failed(failure: Failure) -> None:
            log.failure("queue: cannot read the queue to schedule it", failure)
            done.callback(None)

        d = self.spool.summaries()
        d.addCallbacks(lambda summaries: self._pickup_step(iter(summaries), done, counts), failed)
        return done

    # -- start-up ------------------------------------------------------------------

    def _pickup_step(self, summaries: Iterator[QueueSummary], done: Deferred, counts: dict[str, int]) -> None:
        if self._stopping:
            done.callback(None)
            return
        batch = list(islice(summaries, self.pickup_batch))
        for summary in batch:
            self._pick(summary, counts)
        self._dispatch()
        if len(batch) == self.pickup_batch:
            self.clock.callLater(0, self._pickup_step, summaries, done, counts)
            return
        log.info(
            "queue: {scheduled} message(s) scheduled, {held} held",
            scheduled=counts["scheduled"],
            held=counts["held"],
        )
        done.callback(None)

    def _pick(self, summary: QueueSummary, counts: dict[str, int]) -> None:
        queue_id = summary.queue_id
        if queue_id in self._entries or queue_id in self._in_flight:
            return  # arrived or was rescheduled since start-up
        if summary.held:
            counts["held"] += 1
            return
        counts["scheduled"] += 1
        now = self.clock.seconds()
        self._set_due(queue_id, due_time(summary, now), _domain_key(summary.domains))

    # -- the schedule --------------------------------------------------------------

    def _set_due(
        self, queue_id: str, due: float, domains: Optional[tuple[str, ...]] = None, forced: bool = False
    ) -> None:
        entry = self._entries.get(queue_id)
        if entry is None:
            self._entries[queue_id] = _Entry(due, domains or (), forced)
        else:
            entry.due = due
            entry.forced = entry.forced or forced
            if domains is not None:
                entry.domains = domains
        heapq.heappush(self._heap, (due, queue_id))
        self._compact()

    def _compact(self) -> None:
        """Rebuild the heap when stale entries (rescheduled, forgotten) pile up."""
        if len(self._heap) > 2 * len(self._entries) + _COMPACT_SLACK:
            self._heap = [(e.due, q) for q, e in self._entries.items()]
            heapq.heapify(self._heap)

    def _drop(self, queue_id: str) -> None:
        self._entries.pop(queue_id, None)

    def _matching(self, name: str, subdomains: bool) -> list[str]:
        suffix = "." + name
        return [
            queue_id
            for queue_id, entry in self._entries.items()
            if any(d == name or (subdomains and d.endswith(suffix)) for d in entry.domains)
        ]

    def _live_top(self) -> Optional[tuple[float, str]]:
        """The earliest live heap entry, dropping stale ones on the way."""
        heap = self._heap
        while heap:
            due, queue_id = heap[0]
            entry = self._entries.get(queue_id)
            if entry is not None and entry.due == due:
                return due, queue_id
            heapq.heappop(heap)
        return None

    def _dispatch(self) -> None:
        """Start every due message the cap allows, then arm the timer.  Never re-entered."""
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            self._dispatch_again = True
            while self._dispatch_again:
                self._dispatch_again = False
                self._start_due()
        finally:
            self._dispatching = False
        self._arm_timer()

    def _start_due(self) -> None:
        now = self.clock.seconds()
        while not self._stopping and len(self._in_flight) < self.max_attempts:
            top = self._live_top()
            if top is None or top[0] > now:
                return
            heapq.heappop(self._heap)
            if top[1] in self._in_flight:
                continue  # scheduled again by its own attempt; pushed again when that ends
            entry = self._entries.pop(top[1])
            self._start(top[1], entry.forced)

    def _arm_timer(self) -> None:
        top = None if self._stopping or len(self._in_flight) >= self.max_attempts else self._live_top()
        if top is None:
            self._cancel_timer()
            return
        timer = self._timer
        if timer is not None and timer.active() and timer.getTime() == top[0]:
            return
        self._cancel_timer()
        self._timer = self.clock.callLater(max(0.0, top[0] - self.clock.seconds()), self._fire)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._dispatch()

    # -- one attempt ---------------------------------------------------------------

    def _start(self, queue_id: str, forced: bool) -> None:
        done: Deferred = Deferred()
        self._in_flight[queue_id] = done
        d = Deferred.fromCoroutine(self._run(queue_id, forced))
        d.addErrback(self._run_failed, queue_id)
        d.addBoth(self._ran, queue_id, done)

    async def _run(self, queue_id: str, forced: bool) -> None:
        envelope = self._fresh.pop(queue_id, None) or await self._load(queue_id)
        if envelope is None:
            return
        if envelope.held:
            log.debug("{queue_id}: held, not attempted", queue_id=queue_id)
            return
        now = self.clock.seconds()
        due = [r for r in envelope.pending() if forced or r.next_attempt is None or r.next_attempt <= now + DUE_SLACK]
        if due:
            attempted = await self._attempts.attempt(envelope, tuple(due), forced)
            if attempted is None:
                return
            envelope = attempted
        now = self.clock.seconds()
        envelope, report_at = await self._notices.send_owed(envelope, now)
        if envelope is None:
            return
        if not envelope.pending() and not unreported(envelope):
            await self._attempts.finished(envelope)
            return
        if envelope.held:
            return  # held by the operator during the attempt
        summary = QueueSummary.of(envelope)
        self._set_due(queue_id, due_time(summary, now, report_at), _domain_key(summary.domains))

    async def _load(self, queue_id: str) -> Optional[Envelope]:
        try:
            return await self.spool.read(queue_id)
        except KeyError:
            log.debug("{queue_id}: no longer queued", queue_id=queue_id)
        except EnvelopeFormatError as e:
            self._quarantine(queue_id, str(e))
        return None

    def _quarantine(self, queue_id: str, reason: str) -> None:
        log.error("{queue_id}: envelope cannot be read: {reason}", queue_id=queue_id, reason=reason)
        self._drop(queue_id)
        d = self.spool.quarantine(queue_id, reason)
        d.addErrback(lambda f: log.failure("{queue_id}: cannot quarantine", f, queue_id=queue_id))

    def _run_failed(self, failure: Failure, queue_id: str) -> None:
        retry = self.clock.seconds() + self.config.min_retry
        log.failure(
            "{queue_id}: attempt not recorded; the message stays queued, next try {when}",
            failure,
            queue_id=queue_id,
            when=clock_text(retry),
        )
        if not self._stopping:
            self._set_due(queue_id, retry)

    def _ran(self, _: Any, queue_id: str, done: Deferred) -> None:
        if self._in_flight.get(queue_id) is done:
            del self._in_flight[queue_id]
        entry = self._entries.get(queue_id)
        if entry is not None:
            heapq.heappush(self._heap, (entry.due, queue_id))
        done.callback(None)
        if queue_id in self._recheck:
            self._recheck.discard(queue_id)
            self.reschedule(queue_id)
        self._dispatch()

    # -- stopping ------------------------------------------------------------------

    def _drain(self, grace: float) -> Deferred:
        """Fire when every attempt in flight ended, or after ``grace`` seconds."""
        if not self._in_flight:
            return defer.succeed(None)
        result: Deferred = Deferred()
        waiting = [_watch(d) for d in self._in_flight.values()]

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


def _watch(d: Deferred) -> Deferred:
    """A Deferred that fires (with None) when ``d`` does, without taking its result."""
    watcher: Deferred = Deferred()

    def passthrough(result: Any) -> Any:
        if not watcher.called:
            watcher.callback(None)
        return result

    d.addBoth(passthrough)
    return watcher
