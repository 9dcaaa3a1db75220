"""Frozen value types that travel along the data flow, and their JSON form.

This module owns the shape of what is stored about a message (``Envelope``,
``Recipient``, ``ClientInfo``, ``Attempt``) and what routing and delivery
say about a recipient (``Route``, ``NextHop``, ``Outcome``).  Nothing here
does I/O; the spool decides where the JSON goes.

The JSON carries ``"version": FORMAT_VERSION``.  A change of shape bumps the
version and keeps a reader for every older one; fixtures of old formats live
in ``tests/fixtures``.  Never pickle.

Version 2 records each ``Attempt`` as its facts (code, enhanced status,
text, host, whether the words came from the remote host, a typed reason);
version 1 kept one line of text (``reply``).  The version 1 reader parses
that line once, as relay wrote it (``Outcome.describe``: "CODE X.Y.Z text",
"X.Y.Z text" for a decision of relay's own, "X.Y.Z host said: REPLY (at
STAGE)" for a session refused by a peer), and the envelope is written back
in version 2 the next time it changes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Optional

FORMAT_VERSION = 2

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
    """One delivery attempt for one recipient, kept so operators (and DSNs) see why."""

    time: float  # epoch seconds
    outcome: str  # one of OUTCOME_KINDS
    code: int = 0  # SMTP reply code; 0 for a decision of relay's own
    status: str = ""  # enhanced status code ("5.1.1"), "" when there was none
    text: str = ""  # the reply text (one line) or relay's reason
    host: str = ""  # the host attempted or that answered, "mx.example[192.0.2.1]", if any
    remote: bool = False  # the words (code, status, text) came from ``host``, not from relay
    reason: str = ""  # why relay decided (relay.outcome.Reason values), "" for a plain reply
    rule: str = ""  # which [[routes]] rule or plugin chose the route (stored as "route")
    tls: str = ""  # TLS version and cipher of the session, "" in clear or unknown
    tls_fallback: bool = False  # sent in clear after a failed STARTTLS handshake (tls = "may")
    dsn_passed: bool = False  # the next hop advertised DSN and took the DSN request on

    @property
    def reply(self) -> str:
        """One line: ``"550 5.1.1 no such user"``, or ``"4.4.1 connect to ...: Connection refused"``."""
        return describe(self.code, self.status, self.text)


def describe(code: int, status: str, text: str) -> str:
    """One line for logs and listings: the code (when there is one), the status, the text."""
    parts = [str(code) if code else "", status, text]
    return " ".join(p for p in parts if p)


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
    # DELIVERED to a next hop without DSN while NOTIFY asked for SUCCESS: a "relayed" DSN
    # is owed until ``reported``.
    relayed_notice: bool = False

    @property
    def awaiting_report(self) -> bool:
        """Failed, or relayed with a success notice owed, and its notification not spooled yet."""
        if self.reported:
            return False
        return self.status == FAILED or (self.status == DELIVERED and self.relayed_notice)

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
    body_type: str = "7BIT"  # the BODY= parameter, "7BIT" or "8BITMIME" (stored as "body")
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


# Fields whose stored key is an older name: the key stays, so every queue
# written before the rename reads as it did (and relay-queue --json is unchanged).
_STORED_AS = {"rule": "route", "body_type": "body"}


def _names(cls: type) -> tuple[tuple[str, str], ...]:
    """(attribute, stored key) of each field of ``cls``."""
    return tuple((f.name, _STORED_AS.get(f.name, f.name)) for f in fields(cls))


def _plain(value: Any, names: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {key: getattr(value, name) for name, key in names}


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
    """One history entry of version 2."""
    return Attempt(
        time=float(raw["time"]),
        outcome=str(raw["outcome"]),
        code=int(raw.get("code", 0)),
        status=str(raw.get("status", "")),
        text=str(raw.get("text", "")),
        host=str(raw.get("host", "")),
        remote=bool(raw.get("remote", False)),
        reason=str(raw.get("reason", "")),
        rule=str(raw.get("route", "")),
        tls=str(raw.get("tls", "")),
        tls_fallback=bool(raw.get("tls_fallback", False)),
        dsn_passed=bool(raw.get("dsn_passed", False)),
    )


# Version 1 history: the one line ``Outcome.describe`` wrote.
_V1_LINE = re.compile(r"(?:(?P<code>[2-5][0-9][0-9])(?: |$))?(?:(?P<status>[245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$))?(?P<text>.*)", re.DOTALL)
_V1_SAID = re.compile(r"\S+ said: (?P<reply>[2-5][0-9][0-9](?: .*)?) \(at [a-z]+\)", re.DOTALL)
_V1_OWN_PREFIX = "relay: "  # the replies relay's client made up itself started so


def _v1_words(line: str) -> tuple[int, str, str]:
    match = _V1_LINE.fullmatch(line)
    assert match is not None  # the pattern matches any text
    return int(match["code"] or 0), match["status"] or "", match["text"]


def read_v1_attempt(raw: dict) -> Attempt:
    """A version 1 history entry, its ``reply`` line split into the facts of version 2 (once).

    "CODE [X.Y.Z] text" from a host is that host's reply, unless the text
    starts with "relay: " (what the client refused to send, such as a size
    over the peer's limit); "X.Y.Z host[addr]:port said: REPLY (at STAGE)" is
    the peer's REPLY; any other line is relay's own words.
    """
    host = str(raw.get("host", ""))
    code, status, text = _v1_words(str(raw["reply"]))
    remote = bool(code and host)
    if code and text.startswith(_V1_OWN_PREFIX):
        remote, text = False, text[len(_V1_OWN_PREFIX):]
    elif not code and (said := _V1_SAID.fullmatch(text)) is not None:
        code, status, text = _v1_words(said["reply"])
        remote = True
    return Attempt(
        time=float(raw["time"]),
        outcome=str(raw["outcome"]),
        code=code,
        status=status,
        text=text,
        host=host,
        remote=remote,
        rule=str(raw.get("route", "")),
        tls=str(raw.get("tls", "")),
    )


def _read_v2(raw: dict, read_attempt: Callable[[dict], Attempt] = _read_attempt) -> Envelope:
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
                history=tuple(read_attempt(a) for a in r.get("history", ())),
                reported=bool(r.get("reported", False)),
                warned=bool(r.get("warned", False)),
                relayed_notice=bool(r.get("relayed_notice", False)),
            )
        )
    return Envelope(
        queue_id=str(raw["queue_id"]),
        sender=str(raw["sender"]),
        recipients=tuple(recipients),
        client=ClientInfo(**raw.get("client", {"address": ""})),
        arrival=float(raw.get("arrival", 0.0)),
        size=int(raw.get("size", 0)),
        body_type=str(raw.get("body", "7BIT")),
        smtputf8=bool(raw.get("smtputf8", False)),
        mail_params=_params(raw.get("mail_params", ())),
        held=bool(raw.get("held", False)),
        version=FORMAT_VERSION,
    )


def _read_v1(raw: dict) -> Envelope:
    """Version 1: the shape of version 2 but for the history, whose lines are parsed once."""
    return _read_v2(raw, read_v1_attempt)


_READERS = {1: _read_v1, 2: _read_v2}

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
    remote: bool = False  # code, status and text are what ``host`` sent (False: relay decided)
    reason: str = ""  # a relay.outcome.Reason value: why relay decided, "" for a plain reply

    def describe(self) -> str:
        """One line for logs and queue listings."""
        return describe(self.code, self.status, self.text)
