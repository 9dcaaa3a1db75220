"""The typed seams between relay's parts: what each side may call on the other.

These are ``typing.Protocol`` classes, checked by type checkers and, being
``runtime_checkable``, by the tests against every fake that stands in for a
real part (a fake that loses a method fails its test).  Unlike
``relay.interfaces.IRouter`` they are not plugin points: each has one real
provider, named in its docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from relay.envelope import ClientInfo, Envelope, Recipient, Route
    from relay.policy import PolicyAnswer
    from relay.smtp.transaction import Transaction


@runtime_checkable
class IncomingMessage(Protocol):
    """One message being received (``relay.queue.incoming.IncomingMessage``, ``relay.dkim.SigningMessage``)."""

    queue_id: str

    def write(self, data: bytes) -> None: ...

    def commit(self, envelope: "Envelope") -> Deferred:
        """Fires once the message and ``envelope`` are durable; errbacks when they could not be stored."""

    def abort(self) -> None: ...


@runtime_checkable
class MessageSpool(Protocol):
    """The one door in: where the SMTP server puts messages (``relay.queue.store.Spool``)."""

    def new_message(self) -> IncomingMessage: ...


@runtime_checkable
class MessageSource(Protocol):
    """Where delivery reads a queued message from (``relay.queue.store.Spool``)."""

    def message_opener(self, queue_id: str) -> Deferred:
        """Fires with a callable that opens the message's bytes (a BinaryIO)."""


@runtime_checkable
class Policy(Protocol):
    """What the SMTP server asks about a client and its addresses (``relay.policy.RelayPolicy``)."""

    def is_trusted(self, ip: str) -> bool: ...

    def check_sender(self, client: "ClientInfo", sender: str) -> PolicyAnswer:
        """Whether an authenticated client may use ``sender`` as MAIL FROM."""

    def check_recipient(self, client: "ClientInfo", sender: str, recipient: "Recipient") -> PolicyAnswer: ...


@runtime_checkable
class OutboundConnection(Protocol):
    """An SMTP session to a next hop as the pool holds it (``relay.smtp.client.SMTPClientProtocol``)."""

    busy: bool  # a transaction is running
    closed: bool  # the connection cannot carry another transaction

    def send(self, transaction: "Transaction") -> Deferred: ...

    def quit(self) -> Deferred: ...


@runtime_checkable
class Resolver(Protocol):
    """Turns a route's next hops into addresses to connect to (``relay.routing.mx.MXResolver``)."""

    def targets(self, route: "Route", default_port: int) -> Deferred:
        """Fires with the Targets in the order to try them; errbacks with a ResolutionError."""

