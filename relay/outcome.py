"""Outcomes of delivery attempts: which bucket, why, and whose words.

This module is the one place where an attempt is classified.  Every attempt
for a recipient ends in one of three buckets (``relay.envelope``'s
``OUTCOME_*``):

* delivered: a 2xx reply to the recipient;
* transient: a 4xx reply, no host reachable (connection refused or timed
  out, a 4xx greeting, TLS required but failed...), a DNS timeout or
  SERVFAIL, a router that failed, an unreadable password file, any
  unexpected local error;
* permanent: a 5xx reply, a 5.x.x decision of relay's own (NXDOMAIN, null
  MX, a reject route, a message the next hop cannot take).

``classify`` decides by reply code, ``status_kind`` by enhanced status code
(for what relay decides itself); ``kind_of`` picks the one that applies.

Why a connection or session failed is a typed ``Reason``, found from the
exception's type (``network_reason``), never from its text.  An ``Outcome``
says whether its words came from a remote host (``remote``: a reply the peer
really sent) or from relay itself (a local decision, such as a size refusal
before MAIL, a DNS failure, a connection failure); DSNs say "host X said"
and ``Diagnostic-Code: smtp`` only for the former.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Optional

from twisted.internet import error as neterror
from twisted.python.failure import Failure

from relay.envelope import OUTCOME_DELIVERED, OUTCOME_PERMANENT, OUTCOME_TRANSIENT, Outcome, Route
from relay.smtp.replies import Reply


class Reason(str, enum.Enum):
    """Why relay decided an outcome itself, or why a peer could not take the mail.

    The values are stored in the envelope (``Attempt.reason``); never rename one.
    """

    NONE = ""  # a reply to the transaction: the code, status and text say it all
    # the connection
    CONNECT_REFUSED = "connect-refused"
    CONNECT_TIMEOUT = "connect-timeout"
    NO_ROUTE = "no-route"
    CONNECT_FAILED = "connect-failed"
    LOST = "connection-lost"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol-error"
    SESSION_REFUSED = "session-refused"  # the greeting or EHLO/HELO refused
    # TLS
    TLS_UNAVAILABLE = "tls-unavailable"  # required, but not offered or refused
    TLS_HANDSHAKE = "tls-handshake"
    TLS_LOST = "tls-lost"  # the connection ended during the handshake
    TLS_UNTRUSTED = "tls-untrusted"
    TLS_NAME = "tls-name"  # the certificate does not name the host (or has no subjectAltName)
    TLS_SETUP = "tls-setup"  # relay could not set up TLS (a bad ca_file)
    # authentication
    AUTH_FAILED = "auth-failed"
    AUTH_UNAVAILABLE = "auth-unavailable"
    # what relay refuses to send to a next hop
    MESSAGE_TOO_BIG = "message-too-big"
    NO_SMTPUTF8 = "no-smtputf8"
    NO_8BITMIME = "no-8bitmime"
    UNSAFE_ADDRESS = "unsafe-address"
    NUL_CONTENT = "nul-in-content"  # a NUL in the message (queued before relay refused them)
    # decisions before any connection
    DNS = "dns"
    REJECT_ROUTE = "reject-route"
    ROUTING = "routing-failed"
    PASSWORD = "password-file"
    NO_TARGETS = "no-targets"
    MTA_STS = "mta-sts"
    NO_REPLY = "no-reply"
    MESSAGE_UNREADABLE = "message-unreadable"
    LOCAL_ERROR = "local-error"
    SUSPENDED = "destination-suspended"  # its hosts did not answer lately: deferred without connecting


# The session stage of a failure to connect at all.
STAGE_CONNECT = "connect"

# Local outcomes carry no SMTP code.
LOCAL_CODE = 0

# A reject route: the recipient is refused as at RCPT time.
REJECT_CODE = 550
REJECT_STATUS = "5.7.1"
REJECT_TEXT = "Delivery to this address is not permitted"

# Texts and statuses of local outcomes; they never carry exception text.
STATUS_TRANSIENT = "4.4.0"
STATUS_NO_ANSWER = "4.4.1"
STATUS_LOCAL_ERROR = "4.3.0"
STATUS_MTA_STS = "4.7.5"
TEXT_INTERNAL = "local error during delivery; will try again"
TEXT_ROUTING = "routing failed; will try again"
TEXT_NO_TARGETS = "no address to deliver to"
TEXT_NO_REPLY = "the remote host gave no reply for this recipient"
TEXT_MTA_STS_NO_MX = "MTA-STS: no MX host matches the policy"
DNS_PREFIX = "DNS: "

# Fixed words for each network reason (the exception's own text is never used).
NETWORK_TEXT = {
    Reason.CONNECT_REFUSED: "Connection refused",
    Reason.CONNECT_TIMEOUT: "Connection timed out",
    Reason.NO_ROUTE: "No route to host",
    Reason.LOST: "Connection lost",
    Reason.CONNECT_FAILED: "Connection failed",
}

# Exception types -> reasons, most specific first.
_NETWORK_TYPES: tuple[tuple[type, Reason], ...] = (
    (neterror.ConnectionRefusedError, Reason.CONNECT_REFUSED),
    (neterror.TCPTimedOutError, Reason.CONNECT_TIMEOUT),
    (neterror.TimeoutError, Reason.CONNECT_TIMEOUT),
    (neterror.NoRouteError, Reason.NO_ROUTE),
    (neterror.ConnectionLost, Reason.LOST),
    (neterror.ConnectionDone, Reason.LOST),
    (ConnectionRefusedError, Reason.CONNECT_REFUSED),
    (TimeoutError, Reason.CONNECT_TIMEOUT),
    (ConnectionError, Reason.LOST),
)
_NO_ROUTE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH})


@dataclass(frozen=True)
class LocalReply(Reply):
    """A reply relay made up itself for a recipient (never sent by a peer), and why."""

    reason: Reason = Reason.LOCAL_ERROR


# -- the buckets ---------------------------------------------------------------------


def classify(code: int) -> str:
    """The bucket of an SMTP reply code: 2xx delivered, 5xx permanent, anything else transient."""
    if 200 <= code < 300:
        return OUTCOME_DELIVERED
    if 500 <= code < 600:
        return OUTCOME_PERMANENT
    return OUTCOME_TRANSIENT


def status_kind(status: str) -> str:
    """The bucket of an enhanced status code (RFC 3463): 2.x.x, 5.x.x, else transient."""
    if status.startswith("2."):
        return OUTCOME_DELIVERED
    if status.startswith("5."):
        return OUTCOME_PERMANENT
    return OUTCOME_TRANSIENT


def kind_of(code: int, status: str) -> str:
    """The bucket of a reply (by ``code``) or of a decision of relay's own (code 0, by ``status``)."""
    return classify(code) if code else status_kind(status)


# -- typed reasons -------------------------------------------------------------------


class ReasonedError(Exception):
    """An exception that says why in a typed ``reason``, with the peer's ``reply`` when there was one."""

    reason: Reason = Reason.LOCAL_ERROR
    reply: Optional[Reply] = None
    stage: str = ""  # where in the session it happened ("connect", "greeting", ...)


def network_reason(error: BaseException) -> Reason:
    """The reason of a connection failure, from the exception's type (and errno), never its text."""
    if isinstance(error, ReasonedError):
        return error.reason
    for kind, reason in _NETWORK_TYPES:
        if isinstance(error, kind):
            return reason
    number = getattr(error, "errno", None)
    if number is None:  # twisted's ConnectError keeps the errno (or the OSError) it stands for
        wrapped = getattr(error, "osError", None)
        number = wrapped if isinstance(wrapped, int) else getattr(wrapped, "errno", None)
    if number in _NO_ROUTE_ERRNOS:
        return Reason.NO_ROUTE
    if number == errno.ECONNREFUSED:
        return Reason.CONNECT_REFUSED
    if number == errno.ETIMEDOUT:
        return Reason.CONNECT_TIMEOUT
    if isinstance(error, (neterror.ConnectError, OSError)):
        return Reason.CONNECT_FAILED
    return Reason.LOCAL_ERROR


# -- outcomes ------------------------------------------------------------------------


def reply_outcome(address: str, reply: Reply, host: str, rule: str) -> Outcome:
    """The Outcome of a recipient answered with ``reply``: by ``host``, or by relay for a LocalReply."""
    local = isinstance(reply, LocalReply)
    return Outcome(
        recipient=address,
        kind=classify(reply.code),
        code=reply.code,
        status=reply.status,
        text=" ".join(reply.text.split("\n")),
        host=host,
        rule=rule,
        remote=not local,
        reason=reply.reason.value if local else Reason.NONE.value,
    )


def local_outcome(address: str, reason: Reason, status: str, text: str, rule: str = "", host: str = "") -> Outcome:
    """An Outcome relay decided itself (code 0); its bucket follows ``status``."""
    return Outcome(address, status_kind(status), LOCAL_CODE, status, text, host=host, rule=rule,
                   remote=False, reason=reason.value)


def internal_outcome(address: str, rule: str = "", text: str = TEXT_INTERNAL,
                     reason: Reason = Reason.LOCAL_ERROR) -> Outcome:
    """A transient Outcome for a local error (4.3.0): the mail waits in the queue."""
    return local_outcome(address, reason, STATUS_LOCAL_ERROR, text, rule)


def resolution_outcome(address: str, status: str, text: str, rule: str) -> Outcome:
    """The Outcome of a next hop that could not be resolved (NXDOMAIN, null MX, a DNS timeout...)."""
    return local_outcome(address, Reason.DNS, status, text if text.startswith(DNS_PREFIX) else DNS_PREFIX + text, rule)


def reject_outcome(address: str, route: Route) -> Outcome:
    """A reject route: refused as at RCPT time, by relay itself."""
    return Outcome(address, OUTCOME_PERMANENT, REJECT_CODE, REJECT_STATUS, route.reason or REJECT_TEXT,
                   rule=route.rule, remote=False, reason=Reason.REJECT_ROUTE.value)


# -- hosts that could not take the transaction ---------------------------------------


@dataclass(frozen=True)
class Unreachable:
    """A host that could not take the transaction: why, and the reply it gave, if any."""

    text: str  # one line for the log
    host: str  # mx.example[192.0.2.1]
    reason: Reason
    reply: Optional[Reply] = None  # what the peer said (greeting, EHLO, STARTTLS, AUTH)


def unreachable(where: str, host: str, failure: Failure) -> Unreachable:
    """Why ``host`` (connected to as ``where``, "host[address]:port") could not carry the mail."""
    error = failure.value
    reason = network_reason(error)
    reasoned = isinstance(error, ReasonedError)
    reply = error.reply if reasoned else None
    if reply is not None:
        text = f"{where} said: {reply}" + (f" (at {error.stage})" if error.stage else "")
    elif reason in NETWORK_TEXT and (not reasoned or error.stage == STAGE_CONNECT):
        text = f"connect to {where}: {NETWORK_TEXT[reason]}"
    elif reasoned:
        text = f"{where}: {error}"
    else:
        text = f"{where}: {TEXT_INTERNAL}"
    return Unreachable(text, host, reason, reply)


def unreachable_outcome(address: str, last: Unreachable, rule: str) -> Outcome:
    """Every host failed: transient, in the last host's words when it said something, else relay's."""
    if last.reply is not None:
        reply = last.reply
        return Outcome(address, OUTCOME_TRANSIENT, reply.code, reply.status, " ".join(reply.text.split("\n")),
                       host=last.host, rule=rule, remote=True, reason=last.reason.value)
    return Outcome(address, OUTCOME_TRANSIENT, LOCAL_CODE, STATUS_NO_ANSWER, last.text, host=last.host, rule=rule,
                   remote=False, reason=last.reason.value)
