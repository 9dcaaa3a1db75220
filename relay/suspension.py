"""Suspended destinations: where no host answered, mail waits for the next retry without a connection.

This module owns delivery's per-destination memory of failure.  When no
host of a destination (``Route.destination()``) answered, ``Suspensions``
marks it suspended until ``min_retry`` seconds later: its mail, new or
already waiting for a place in the connection pool, is deferred at once
instead of trying hosts that just failed.  Delivery parks every pool
checkout while it waits, so a suspension can cancel the waits of its
destination (they end in ``DestinationSuspended``); a host that takes a
transaction lifts the suspension.  A flush does not ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from relay.log import Logger
from relay.outcome import Reason, Unreachable

log = Logger()


@dataclass(frozen=True)
class Suspension:
    """A destination that failed to answer: until when its mail is deferred without a connection."""

    until: float
    text: str
    host: str
    reason: Reason = Reason.SUSPENDED  # why the destination failed


class DestinationSuspended(Exception):
    """The wait for a connection ended because the destination was suspended meanwhile."""


class Suspensions:
    """The destinations suspended now, and the pool checkouts parked on each destination."""

    def __init__(self, clock: IReactorTime, min_retry: float) -> None:
        self._clock = clock
        self._min_retry = min_retry
        self._suspended: dict[tuple, Suspension] = {}
        self._parked: dict[tuple, set[Deferred]] = {}  # destination -> checkouts waiting for a place

    def get(self, destination: tuple) -> Optional[Suspension]:
        """The suspension in force for a destination (``Route.destination()``), if any."""
        suspension = self._suspended.get(destination)
        if suspension is not None and suspension.until <= self._clock.seconds():
            del self._suspended[destination]
            return None
        return suspension

    def suspend(self, queue_id: str, destination: tuple, last: Unreachable) -> None:
        """No host of ``destination`` answered: defer its mail without connecting until the next retry."""
        now = self._clock.seconds()
        for expired in [d for d, s in self._suspended.items() if s.until <= now]:
            del self._suspended[expired]  # destinations not asked for since: nothing else would drop them
        self._suspended[destination] = Suspension(now + self._min_retry, last.text, last.host, last.reason)
        parked = self._parked.pop(destination, set())
        log.info(
            "{queue_id}: delivery to {host} temporarily suspended for {seconds:.0f}s: {error}{waiting}",
            queue_id=queue_id,
            host=last.host,
            seconds=self._min_retry,
            error=last.text,
            waiting=f"; {len(parked)} waiting transaction(s) deferred" if parked else "",
            event="suspended",
        )
        for d in list(parked):
            d.cancel()

    def lift(self, destination: tuple) -> None:
        """A host of ``destination`` took a transaction: its mail goes again."""
        self._suspended.pop(destination, None)

    def park(self, destination: tuple, checkout: Deferred) -> None:
        """``checkout`` waits for a connection to ``destination``: a suspension cancels it."""
        self._parked.setdefault(destination, set()).add(checkout)

    def unpark(self, destination: tuple, checkout: Deferred) -> None:
        """``checkout`` no longer waits."""
        parked = self._parked.get(destination)
        if parked is None:
            return
        parked.discard(checkout)
        if not parked:
            del self._parked[destination]
