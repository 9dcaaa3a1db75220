"""The notifications a queued message owes its sender, and their spooling.

After each attempt the scheduler asks ``Notices.send_owed`` for what is
owed: one failure DSN for the recipients that failed (permanently or by
expiry), one "relayed" notice for those delivered to a next hop without
DSN whose NOTIFY asks for SUCCESS, and, with ``[queue] delay_warning``, one
"delayed" DSN per pending recipient.  Each is spooled as a new message
(``relay.bounce.send_dsn``); a recipient is marked ``reported`` (or
``warned``) only after its DSN is durable, so a crash in between can send
a DSN twice, never lose one.  A DSN that cannot be spooled is tried again
``min_retry`` seconds later.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from twisted.internet.defer import Deferred

from relay.bounce import notification_due
from relay.dsn_report import ACTION_DELAYED, ACTION_FAILED, ACTION_RELAYED
from relay.config import QueueConfig
from relay.envelope import DELIVERED, FAILED, Envelope, Recipient
from relay.log import Logger
from relay.queue.retry import deadline
from relay.queue.rules import first_arrival, mark_notified, unreported

log = Logger(namespace="relay.queue.scheduler")  # the scheduler's lines, as operators filter them

_NOTICE = {ACTION_FAILED: "bounce", ACTION_DELAYED: "delay warning", ACTION_RELAYED: "success notice"}

# send_dsn(spool, envelope, recipients, hostname, now, **options) -> Deferred[str | None]
SendDSN = Callable[..., Deferred]
# record(queue_id, change) -> the envelope as stored after change, None when it was removed meanwhile
Record = Callable[[str, Callable[[Envelope], Envelope]], Awaitable[Optional[Envelope]]]


class Notices:
    """Decides which notifications a message owes, spools them and marks them sent."""

    def __init__(
        self, spool: Any, config: QueueConfig, hostname: str, send_dsn: Optional[SendDSN], record: Record
    ) -> None:
        self.spool = spool
        self.config = config
        self.hostname = hostname
        self._send_dsn = send_dsn
        self._record = record

    async def send_owed(self, envelope: Envelope, now: float) -> tuple[Optional[Envelope], Optional[float]]:
        """Spool the failure and delay notifications that are owed, then mark them.

        Returns the envelope (None when it was removed meanwhile) and, when a
        notification could not be spooled, when to try again.
        """
        owed = unreported(envelope)
        failed = [r for r in owed if r.status == FAILED]
        relayed = [r for r in owed if r.status == DELIVERED]
        delayed = self._delayed(envelope, now)
        if not owed and not delayed:
            return envelope, None
        reported: frozenset[str] = frozenset()
        warned: frozenset[str] = frozenset()
        report_at = None
        for action, recipients in ((ACTION_FAILED, failed), (ACTION_RELAYED, relayed)):
            if not recipients:
                continue
            if await self._notify(envelope, recipients, now, action):
                reported |= frozenset(r.address for r in recipients)
            else:
                report_at = now + self.config.min_retry
        if delayed and await self._notify(envelope, delayed, now, ACTION_DELAYED):
            warned = frozenset(r.address for r in delayed)
        if not reported and not warned:
            return envelope, report_at
        marked = mark_notified(envelope, reported, warned)
        if not marked.pending() and not unreported(marked):
            return marked, report_at  # removed next: the removal is the durable mark
        stored = await self._record(envelope.queue_id, lambda current: mark_notified(current, reported, warned))
        return stored, report_at

    def _delayed(self, envelope: Envelope, now: float) -> list[Recipient]:
        """Pending recipients owed their one delay warning."""
        threshold = self.config.delay_warning
        if threshold <= 0 or now - first_arrival(envelope, now) < threshold:
            return []
        return [r for r in envelope.pending() if not r.warned and notification_due(envelope, r, ACTION_DELAYED)]

    async def _notify(self, envelope: Envelope, recipients: list[Recipient], now: float, action: str) -> bool:
        """Spool one notification; True once it is durable (or none was due)."""
        queue_id = envelope.queue_id
        options: dict[str, Any] = {} if action == ACTION_FAILED else {"action": action}
        if action == ACTION_DELAYED:
            options = {"action": ACTION_DELAYED, "retry_until": deadline(first_arrival(envelope, now), self.config)}
        try:
            dsn_id = await self._dsn_sender()(self.spool, envelope, list(recipients), self.hostname, now, **options)
        except Exception as e:
            log.error(
                "{queue_id}: cannot spool the {notice} ({error}); will try again",
                queue_id=queue_id,
                notice=_NOTICE[action],
                error=type(e).__name__ if not str(e) else " ".join(str(e).split()),
            )
            return False
        addresses = ", ".join(f"<{r.address}>" for r in recipients)
        if dsn_id is None:
            log.info(
                "{queue_id}: no {notice} due for {recipients} (null sender or NOTIFY)",
                queue_id=queue_id,
                notice=_NOTICE[action],
                recipients=addresses,
            )
        else:
            log.info(
                "{queue_id}: {notice} spooled as {dsn_id} to <{sender}> for {recipients}",
                queue_id=queue_id,
                notice=_NOTICE[action],
                dsn_id=dsn_id,
                sender=envelope.sender,
                recipients=addresses,
                event="dsn",
                action=action,
            )
        return True

    def _dsn_sender(self) -> SendDSN:
        if self._send_dsn is None:
            from relay.bounce import send_dsn

            self._send_dsn = send_dsn
        return self._send_dsn
