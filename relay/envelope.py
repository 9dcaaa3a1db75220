"""Frozen value types that travel along the data flow, and their JSON form.

This module owns the shape of what is stored about a message (``Envelope``,
``Recipient``, ``ClientInfo``, ``Attempt``) and what routing and delivery
say about a recipient (``Route``, ``NextHop``, ``Outcome``).  Nothing here
does I/O; the spool decides where the JSON goes.

The JSON carries ``"version": FORMAT_VERSION``.  A change of shape bumps the
version and keeps a reader for every older one; fixtures of old formats live
in ``tests/fixtures``.  Never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Optional

FORMAT_VERSION = 1

# Recipient states.
PENDING = "pending"  # still to be delivered (first attempt or retry)
DELIVERED = "delivered"  # a next hop accepted it; never attempted again
FAILED = "failed"  # failed permanently (or expired); bounced where due
RECIPIENT_STATES = (PENDING, DELIVERED, FAILED)

# Outcome kinds: the three buckets every delivery attempt falls into.
OUTCOME_DELIVERED = "delivered"
OUTCOME_TRANSIENT = "transient"
OUTCOME_PERMANENT = "permanent"
OUTCOME_KINDS = (OUTCOME_DELIVERED, OUTCOME_TRANSIENT, OUTCOME_PERMANENT)

# Route kinds.
ROUTE_MX = "mx"
ROUTE_SMARTHOST = "smarthost"
ROUTE_SOURCE = "source-route"
ROUTE_REJECT = "reject"
ROUTE_KINDS = (ROUTE_MX, ROUTE_SMARTHOST, ROUTE_SOURCE, ROUTE_REJECT)

# Outbound TLS policies.
TLS_MAY = "may"
TLS_REQUIRE = "require"
TLS_VERIFY = "verify"
TLS_POLICIES = (TLS_MAY, TLS_REQUIRE, TLS_VERIFY)

Params = tuple[tuple[str, Optional[str]], ...]


class EnvelopeFormatError(ValueError):
    """Raised when stored JSON is not an envelope this version can read."""


def domain_of(address: str) -> str:
    """Return the domain part of ``local@domain`` (after the last ``@``)."""
    return address.rpartition("@")[2]


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt for one recipient, kept so operators see why."""

    time: float  # epoch seconds
    outcome: str  # one of OUTCOME_KINDS
    reply: str  # remote reply ("550 5.1.1 no such user") or local reason
    host: str = ""  # the remote host that answered, if any
    route: str = ""  # which rule or plugin chose the route
    tls: str = ""  # TLS version and cipher of the session, "" in clear or unknown
    tls_fallback: bool = False  # sent in clear after a failed STARTTLS handshake (tls = "may")


@dataclass(frozen=True)
class Recipient:
    """One recipient of a message with its own delivery state."""

    address: str  # final mailbox, "local@domain"; domain as received (U-labels allowed)
    source_route: tuple[str, ...] = ()  # inbound <@h1,@h2:...> hops, in order
    params: Params = ()  # RCPT ESMTP parameters kept for later (NOTIFY, ORCPT)
    status: str = PENDING
    attempts: int = 0
    last_error: str = ""
    next_attempt: Optional[float] = None  # epoch seconds; None: as soon as possible
    history: tuple[Attempt, ...] = ()
    reported: bool = False  # FAILED and its DSN spooled (or none due): never reported again
    warned: bool = False  # a "delayed" DSN was spooled for it: never warned again

    @property
    def domain(self) -> str:
        return domain_of(self.address)


@dataclass(frozen=True)
class ClientInfo:
    """Who handed the message to us."""

    address: str  # peer IP address ("" when unknown)
    port: int = 0
    helo: str = ""
    protocol: str = "ESMTP"  # SMTP, ESMTP, ESMTPS, ESMTPSA, UTF8SMTP...
    trusted: bool = False  # the peer was in trusted_networks
    auth_user: str = ""  # authenticated identity, "" when none
    tls: str = ""  # TLS version and cipher, "" in clear


@dataclass(frozen=True)
class Envelope:
    """Everything known about a queued message except its bytes."""

    queue_id: str
    sender: str  # "" for the null sender <>
    recipients: tuple[Recipient, ...]
    client: ClientInfo = field(default_factory=lambda: ClientInfo(address=""))
    arrival: float = 0.0  # epoch seconds
    size: int = 0  # octets of the stored message (with our Received header)
    body: str = "7BIT"  # "7BIT" or "8BITMIME"
    smtputf8: bool = False
    mail_params: Params = ()  # other MAIL parameters kept for later (RET, ENVID)
    held: bool = False  # an operator hold: never attempted while set
    version: int = FORMAT_VERSION

    # -- queries -----------------------------------------------------------

    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.status == PENDING)

    def recipient(self, address: str) -> Recipient:
        for r in self.recipients:
            if r.address == address:
                return r
        raise KeyError(address)

    # -- changes (new values, never mutation) ------------------------------

    def with_recipients(self, updated: Iterable[Recipient]) -> "Envelope":
        """Return a copy where recipients with the same address are replaced."""
        by_address = {r.address: r for r in updated}
        return replace(
            self,
            recipients=tuple(by_address.get(r.address, r) for r in self.recipients),
        )

    # -- JSON --------------------------------------------------------------

    def to_json(self) -> bytes:
        """The stored form: UTF-8 JSON, keys sorted (the same text ``dataclasses.asdict`` gave)."""
        return _ENCODER.encode(_envelope_fields(self)).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "Envelope":
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise EnvelopeFormatError(f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise EnvelopeFormatError("not a JSON object")
        version = raw.get("version")
        reader = _READERS.get(version)  # type: ignore[arg-type]
        if reader is None:
            raise EnvelopeFormatError(f"unknown envelope format version {version!r}")
        try:
            return reader(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise EnvelopeFormatError(f"bad envelope: {e!r}") from None


# -- writing JSON ------------------------------------------------------------------
#
# Direct field-by-field dictionaries instead of ``dataclasses.asdict``, which
# deep-copies every value through generic recursion (most of the cost of
# writing an envelope with a delivery history).  Field names come from the
# dataclasses, so a field added to a class is written without a change here;
# tuples are written as JSON arrays, as the lists asdict made were.

_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True)


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _plain(value: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(value, name) for name in names}


def _recipient_fields(recipient: "Recipient") -> dict[str, Any]:
    out = _plain(recipient, _RECIPIENT_NAMES)
    out["history"] = [_plain(a, _ATTEMPT_NAMES) for a in recipient.history]
    return out


def _envelope_fields(envelope: "Envelope") -> dict[str, Any]:
    out = _plain(envelope, _ENVELOPE_NAMES)
    out["recipients"] = [_recipient_fields(r) for r in envelope.recipients]
    out["client"] = _plain(envelope.client, _CLIENT_NAMES)
    return out


def _params(raw: Any) -> Params:
    return tuple((str(k), None if v is None else str(v)) for k, v in raw)


def _read_attempt(raw: dict) -> Attempt:
    """One history entry; ``tls`` was added later and is read when present."""
    return Attempt(
        time=float(raw["time"]),
        outcome=str(raw["outcome"]),
        reply=str(raw["reply"]),
        host=str(raw.get("host", "")),
        route=str(raw.get("route", "")),
        tls=str(raw.get("tls", "")),
        tls_fallback=bool(raw.get("tls_fallback", False)),
    )


def _read_v1(raw: dict) -> Envelope:
    recipients = []
    for r in raw["recipients"]:
        if r["status"] not in RECIPIENT_STATES:
            raise ValueError(f"unknown recipient status {r['status']!r}")
        recipients.append(
            Recipient(
                address=str(r["address"]),
                source_route=tuple(str(h) for h in r.get("source_route", ())),
                params=_params(r.get("params", ())),
                status=r["status"],
                attempts=int(r.get("attempts", 0)),
                last_error=str(r.get("last_error", "")),
                next_attempt=None if r.get("next_attempt") is None else float(r["next_attempt"]),
                history=tuple(_read_attempt(a) for a in r.get("history", ())),
                reported=bool(r.get("reported", False)),
                warned=bool(r.get("warned", False)),
            )
        )
    return Envelope(
        queue_id=str(raw["queue_id"]),
        sender=str(raw["sender"]),
        recipients=tuple(recipients),
        client=ClientInfo(**raw.get("client", {"address": ""})),
        arrival=float(raw.get("arrival", 0.0)),
        size=int(raw.get("size", 0)),
        body=str(raw.get("body", "7BIT")),
        smtputf8=bool(raw.get("smtputf8", False)),
        mail_params=_params(raw.get("mail_params", ())),
        held=bool(raw.get("held", False)),
        version=FORMAT_VERSION,
    )


_READERS = {1: _read_v1}

_ATTEMPT_NAMES = _names(Attempt)
_RECIPIENT_NAMES = _names(Recipient)
_CLIENT_NAMES = _names(ClientInfo)
_ENVELOPE_NAMES = _names(Envelope)


# -- routing and delivery ------------------------------------------------------


@dataclass(frozen=True)
class NextHop:
    """A host to hand mail to.

    ``mx=True`` means ``host`` is a mail domain whose MX records are looked up
    (direct MX delivery); otherwise ``host`` is a host name or an address
    literal resolved by A/AAAA only.  ``port`` None means ``[delivery] port``.
    """

    host: str
    port: Optional[int] = None
    mx: bool = False


@dataclass(frozen=True)
class Route:
    """Where one recipient goes next, as decided by a router.  Routers never connect.

    ``hosts`` are alternatives tried in order (smart host failover; for
    ``mx`` a single NextHop(domain, mx=True)).  ``rcpt_route`` are the hops
    that travel in the RCPT path (``<@h2,...,@hn:user@domain>``) for a source
    route.  ``rule`` names the rule or plugin that chose the route.
    """

    kind: str
    hosts: tuple[NextHop, ...] = ()
    rcpt_route: tuple[str, ...] = ()
    reason: str = ""  # for reject: the text after "550 5.7.1"
    rule: str = ""
    tls: str = TLS_MAY
    username: str = ""  # AUTH to the next hop when set
    password_file: str = ""  # where the password is read from at delivery time
    auth_in_clear: bool = False  # AUTH even when the session has no TLS

    def destination(self) -> tuple:
        """Recipients whose routes share this key share one transaction."""
        return (self.kind, self.hosts, self.tls, self.username, self.password_file, self.auth_in_clear)


@dataclass(frozen=True)
class Outcome:
    """The result of one delivery attempt for one recipient."""

    recipient: str  # the recipient address as in the envelope
    kind: str  # one of OUTCOME_KINDS
    code: int = 0  # SMTP reply code; 0 for a local or network failure
    status: str = ""  # enhanced status code, e.g. "5.1.1"
    text: str = ""  # the remote reply text or the local reason
    host: str = ""  # the remote host that answered
    rule: str = ""  # which rule or plugin chose the route ("" when none was chosen)
    tls: str = ""  # TLS version and cipher of the session that answered, "" in clear
    tls_fallback: bool = False  # sent in clear after a failed STARTTLS handshake (tls = "may")
    dsn_passed: bool = False  # the next hop advertised DSN and got the DSN parameters with the mail

    def describe(self) -> str:
        """One line for logs, queue listings and DSN diagnostic codes."""
        parts = [str(self.code) if self.code else "", self.status, self.text]
        return " ".join(p for p in parts if p)
