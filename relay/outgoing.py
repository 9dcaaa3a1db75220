"""The message as the SMTP client gets it: its bytes, loaded once per attempt, and its Transaction.

This module owns what delivery hands the client of the message itself.
``MessageBody`` reads the stored bytes from the spool once per attempt, when
the first connection is ready for them (a destination that fails first
never waits for the disk), and every group of the attempt opens the same
bytes; ``BodyUnavailable`` says they could not be read.
``transaction_for`` builds the ``Transaction`` of one group of recipients:
the envelope's sender, size and parameters, each recipient's source route,
and only the DSN parameters (RFC 3461) among those received.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relay.envelope import Envelope, Recipient, Route
from relay.smtp import dsn
from relay.smtp.transaction import Transaction


class MessageBody:
    """The message bytes of one attempt, read once, when the first connection is ready for them."""

    def __init__(self, spool: Any, queue_id: str) -> None:
        self._spool = spool
        self._queue_id = queue_id
        self._loading: Optional[Deferred] = None
        self._opener: Optional[Callable[[], Any]] = None

    def load(self) -> Deferred:
        """Fire once the bytes can be opened; errback when the message cannot be read."""
        if self._opener is not None:
            return defer.succeed(None)
        if self._loading is None:
            self._loading = defer.maybeDeferred(self._spool.message_opener, self._queue_id)
            self._loading.addCallback(self._loaded)
            if self._opener is not None:  # the bytes were in memory: no waiting
                return defer.succeed(None)
        waiter: Deferred = Deferred()
        self._loading.addBoth(_relay_to, waiter)
        return waiter

    def _loaded(self, opener: Callable[[], Any]) -> None:
        self._opener = opener

    @property
    def loaded(self) -> bool:
        return self._opener is not None

    def open(self) -> Any:
        assert self._opener is not None, "the message is opened before it was loaded"
        return self._opener()


def _relay_to(result: Any, waiter: Deferred) -> Any:
    """Fire ``waiter`` with a copy of ``result`` and pass ``result`` on unchanged."""
    if isinstance(result, Failure):
        waiter.errback(result)
        return None  # each waiter reports the failure; the shared Deferred keeps none
    waiter.callback(result)
    return result


class BodyUnavailable(Exception):
    """The queued message could not be read for sending."""


def transaction_for(envelope: Envelope, members: Sequence[tuple[Recipient, Route]], body: MessageBody) -> Transaction:
    """The Transaction of ``members`` (recipients with the route each takes): the DSN parameters only, the bytes from ``body``."""
    return Transaction(
        sender=envelope.sender,
        recipients=tuple((recipient.address, tuple(route.rcpt_route)) for recipient, route in members),
        size=envelope.size,
        body_type=envelope.body_type,
        smtputf8=envelope.smtputf8,
        open_message=body.open,
        queue_id=envelope.queue_id,
        crlf_only=True,  # the server refuses bare CR and LF: the store holds CRLF text only
        mail_params=_only(envelope.mail_params, dsn.MAIL_KEYWORDS),
        rcpt_params=tuple(_only(recipient.params, dsn.RCPT_KEYWORDS) for recipient, _ in members),
    )


def _only(params: tuple, keywords: tuple[str, ...]) -> tuple:
    """The parameters among ``params`` whose keyword is one of ``keywords``."""
    return tuple((k, v) for k, v in params if k.upper() in keywords)
