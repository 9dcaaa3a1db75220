"""Delivery status notifications (RFC 3464): step 6 of the data flow, when and how they are sent.

This module owns what the sender is told when a message cannot be delivered
(``action="failed"``: a permanent failure or the end of the queue lifetime),
is still waiting (``action="delayed"``: a warning), or was handed to a next
hop without DSN while the sender asked for success notices
(``action="relayed"``, RFC 3461 5.2.2) -- the decision and the spooling.
``notification_due`` is the one rule that decides whether the sender is told
at all (never for ``<>``; NOTIFY).  The notification itself is written by
``relay.dsn_report.build_dsn``.

``send_dsn`` reads the original header section from the spool (a bounded
read that stops at the end of the headers) or, for a failure whose sender
asked ``RET=FULL``, the whole message up to ``MAX_RETURNED`` octets (headers
only beyond); without RET, and for delay and relayed notices, headers only.
It builds the notification and commits it through the spool's one door as a
new message with the null sender ``<>``, so nothing ever bounces a bounce.
The scheduler then delivers it like any other message.
"""

from __future__ import annotations

import io
import re
from typing import BinaryIO, Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from relay.log import Logger
from twisted.python.failure import Failure

from relay.dsn_report import ACTION_DELAYED, ACTION_FAILED, ACTION_RELAYED, ascii_host, build_dsn
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.queue.store import Spool
from relay.smtp import dsn

log = Logger(namespace="relay.bounce")

_NOTIFY_WORD = {ACTION_FAILED: dsn.FAILURE, ACTION_DELAYED: dsn.DELAY, ACTION_RELAYED: dsn.SUCCESS}
MAX_RETURNED = 10 * 1024 * 1024  # octets of the original a RET=FULL failure notice returns whole
DSN_PROTOCOL = "local"  # ClientInfo.protocol of a notification we wrote ourselves

MAX_HEADER_OCTETS = 1024 * 1024  # never read more of the original than this
READ_CHUNK = 16 * 1024

_HEADER_END = re.compile(rb"\n\r?\n")


# -- reading the original ------------------------------------------------------


def read_header_section(f: BinaryIO, limit: int = MAX_HEADER_OCTETS) -> bytes:
    """Read the header section of a message from ``f``, without the blank line ending it.

    Reads in small chunks and stops at the first empty line, so the body is
    never read (beyond the last chunk).  At most ``limit`` octets are read;
    a header section longer than that is cut after its last complete line.
    """
    buffer = bytearray()
    while len(buffer) < limit:
        chunk = f.read(min(READ_CHUNK, limit - len(buffer)))
        if not chunk:
            return bytes(buffer)  # a message without a body
        start = max(0, len(buffer) - 2)
        buffer += chunk
        end = _header_end(buffer, start)
        if end is not None:
            return bytes(buffer[:end])
    cut = buffer.rfind(b"\n")
    return bytes(buffer[: cut + 1]) if cut >= 0 else b""


def _header_end(buffer: bytearray, start: int) -> Optional[int]:
    """Offset just after the last header line, once the empty line is in ``buffer``."""
    if buffer.startswith(b"\r\n") or buffer.startswith(b"\n"):
        return 0
    match = _HEADER_END.search(buffer, start)
    return None if match is None else match.start() + 1


class _Whole:
    """The whole original message, read for a RET=FULL failure notice."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def _read_original(spool: Spool, queue_id: str) -> Union[bytes, _Whole]:
    """The whole original (RET=FULL), or its header section when it cannot be read whole."""
    try:
        with spool.open_message(queue_id) as f:
            data = f.read(MAX_RETURNED + 1)
    except (KeyError, OSError):
        return _read_original_headers(spool, queue_id)
    if len(data) > MAX_RETURNED:
        return read_header_section(io.BytesIO(data))
    return _Whole(data)


def _read_original_headers(spool: Spool, queue_id: str) -> bytes:
    """The original header section, or b"" when the message cannot be read."""
    try:
        with spool.open_message(queue_id) as f:
            return read_header_section(f)
    except KeyError:
        log.warn("{queue_id}: message bytes gone; notification without original headers", queue_id=queue_id)
    except OSError as e:
        log.error(
            "{queue_id}: cannot read the original headers ({error}); notification without them",
            queue_id=queue_id,
            error=e.strerror or type(e).__name__,
        )
    return b""


# -- whether the sender is told --------------------------------------------------


def wants_notification(recipient: Recipient, action: str) -> bool:
    """Whether the recipient's NOTIFY parameter (RFC 3461) asks for this kind of notice.

    Without NOTIFY, failures and delays are reported and successes are not;
    NOTIFY=NEVER reports nothing.
    """
    words = dsn.notify_words(recipient.params)
    if words is None:
        return action != ACTION_RELAYED
    return _NOTIFY_WORD[action] in words


def notification_due(envelope: Envelope, recipient: Recipient, action: str) -> bool:
    """Whether the sender is told about ``recipient`` (``action`` failed or delayed).

    The one place this is decided: never for the null sender ``<>`` (nothing
    ever bounces a bounce), otherwise as the recipient's NOTIFY asks.
    """
    return envelope.sender != "" and wants_notification(recipient, action)


def _body_type(message: bytes) -> str:
    return "7BIT" if message.isascii() else "8BITMIME"


def send_dsn(
    spool: Spool,
    envelope: Envelope,
    recipients: list[Recipient],
    hostname: str,
    now: float,
    action: str = ACTION_FAILED,
    retry_until: Optional[float] = None,
) -> Deferred:
    """Spool a notification about ``recipients`` to the sender of ``envelope``.

    Fires with the queue id of the new message (sender ``<>``, its only
    recipient the original sender), or with None when nothing is due: a
    null sender (never bounce a bounce) or no recipient whose NOTIFY asks for
    this notice.  Errbacks when the spool cannot store it.
    """
    queue_id = envelope.queue_id
    wanted = [r for r in recipients if notification_due(envelope, r, action)]
    if not wanted:
        why = "null sender" if envelope.sender == "" else "NOTIFY asks for none"
        log.info("{queue_id}: no {action} notification ({why})", queue_id=queue_id, action=action, why=why)
        return defer.succeed(None)
    whole = action == ACTION_FAILED and dsn.ret_value(envelope.mail_params) == dsn.RET_FULL and envelope.size <= MAX_RETURNED
    read = _read_original if whole else _read_original_headers
    d = spool.call_reading(read, spool, queue_id)  # off the reactor thread
    d.addCallback(_spool_dsn, spool, envelope, wanted, hostname, now, action, retry_until)
    return d


def _spool_dsn(
    original: Union[bytes, "_Whole"],
    spool: Spool,
    envelope: Envelope,
    recipients: list[Recipient],
    hostname: str,
    now: float,
    action: str,
    retry_until: Optional[float],
) -> Deferred:
    incoming = spool.new_message()
    whole = original.data if isinstance(original, _Whole) else None
    try:
        message = build_dsn(
            envelope,
            recipients,
            b"" if whole is not None else original,
            hostname,
            now,
            action,
            retry_until,
            message_id=f"<{incoming.queue_id}@{ascii_host(hostname)}>",
            original=whole,
        )
        incoming.write(message)
    except Exception:
        incoming.abort()
        raise
    notification = Envelope(
        queue_id=incoming.queue_id,
        sender="",
        recipients=(Recipient(address=envelope.sender),),
        client=ClientInfo(address="", helo=hostname, protocol=DSN_PROTOCOL),
        arrival=now,
        size=len(message),
        body_type=_body_type(message),
        smtputf8=not envelope.sender.isascii(),
    )
    d = incoming.commit(notification)
    d.addCallbacks(
        _spooled,
        _not_spooled,
        callbackArgs=(envelope, notification, recipients, action),
        errbackArgs=(envelope.queue_id, action),
    )
    return d


def _spooled(
    dsn_id: str, envelope: Envelope, notification: Envelope, recipients: list[Recipient], action: str
) -> str:
    log.info(
        "{queue_id}: sender {action} notification: {dsn_id} to <{sender}> for {count} recipient(s)",
        queue_id=envelope.queue_id,
        action="non-delivery" if action == ACTION_FAILED else "delay",
        dsn_id=dsn_id,
        sender=envelope.sender,
        count=len(recipients),
    )
    log.info(
        "{queue_id}: {action} notification for {original}, from=<> to=<{sender}>, {size} octets",
        queue_id=dsn_id,
        action=action,
        original=envelope.queue_id,
        sender=notification.recipients[0].address,
        size=notification.size,
    )
    return dsn_id


def _not_spooled(failure: Failure, queue_id: str, action: str) -> Failure:
    log.failure("{queue_id}: cannot spool the {action} notification", failure, queue_id=queue_id, action=action)
    return failure
