"""The relay's small services: each runs one part and stops start-up with one line if it cannot.

This module owns the twistd services the composition root wraps parts in:
``Listener`` (one SMTP or metrics listener; failing to listen ends start-up
instead of running deaf, and stopping lets open sessions end),
``StoreService`` (runs the queue store; a store that cannot be opened ends
start-up), ``Closing`` (closes a part, such as pooled connections or a
thread, when the relay stops) and ``stop_start_up``, the one way start-up
ends on such a failure: a line on the original stderr, a critical log line
and exit status 1.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service

from relay.log import Logger

log = Logger(namespace="relay.tap")  # start-up failures are the composition root's lines

PROGRAM = "relay"
EXIT_FAILURE = 1  # could not start


def stop_start_up(why: str) -> NoReturn:
    """End start-up with one line on the original stderr (twistd has redirected
    sys.stderr to the log by then), a critical log line, and exit status 1."""
    line = f"{PROGRAM}: {why}"
    log.critical("{line}", line=line)
    stream = sys.__stderr__ or sys.stderr
    stream.write(line + "\n")
    stream.flush()
    raise SystemExit(EXIT_FAILURE) from None


class Listener(StreamServerEndpointService):
    """One SMTP listener; failing to listen stops start-up instead of running deaf.

    twistd only logs a listener that cannot bind and runs on; a relay that
    accepts nothing must not look healthy, so the failure is one line on the
    original stderr (twistd has redirected sys.stderr to the log by then),
    a critical log line, and exit status 1.
    """

    _raiseSynchronously = True

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            stop_start_up(f"cannot listen on {self.description}: {' '.join(str(e).split())}")

    def stopService(self) -> Any:
        """Stop accepting, then let the open sessions end (they get 421 4.3.2)."""
        from twisted.internet.defer import maybeDeferred

        d = maybeDeferred(super().stopService)
        stopping = getattr(self.factory, "stopping", None)
        if stopping is not None:
            d.addCallback(lambda _: stopping())
        return d


class StoreService(Service):
    """Runs the queue store; a store that cannot be opened stops start-up with one line."""

    def __init__(self, spool: Any) -> None:
        from relay.queue.store import SpoolService

        self.inner = SpoolService(spool)

    def startService(self) -> None:
        from relay.queue.schema import StoreError

        try:
            self.inner.startService()
        except (StoreError, OSError) as e:
            stop_start_up(f"cannot open the queue: {' '.join(str(e).split())}")
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.inner.stopService()


class Closing(Service):
    """Calls ``close()`` on a part when the relay stops (pooled connections, threads)."""

    def __init__(self, part: Any) -> None:
        self.part = part

    def stopService(self) -> Any:
        super().stopService()
        return self.part.close()
