"""What delivery and the outbound client exchange: options in, transactions in, results out.

This module owns the values on both sides of the client's interface: how to
talk to one next hop (``ClientOptions``, ``ClientTimeouts``), one message to
some recipients (``Transaction``), every recipient's final reply
(``TransactionResult``), the replies relay makes up itself when a peer
cannot take a message (``REPLY_*``, never reported as the peer's words), and
``SessionError`` with the stage at which a session failed.  The protocol
(``relay.smtp.client``) uses them; delivery builds them and reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Optional

from relay.outcome import STAGE_CONNECT, LocalReply, Reason, ReasonedError
from relay.smtp.replies import Reply
from relay.smtp.response import describe
from relay.trust import TrustStore

# Session stages named by SessionError.stage (STAGE_CONNECT: no connection at all).
STAGE_GREETING = "greeting"
STAGE_EHLO = "ehlo"
STAGE_STARTTLS = "starttls"
STAGE_AUTH = "auth"
STAGE_TIMEOUT = "timeout"
STAGE_LOST = "lost"
# Where a session is once it can carry mail: never a SessionError stage (a failure then is STAGE_LOST).
STAGE_READY = "ready"

# Replies this client makes up itself (LocalReply: never reported as the peer's words).
REPLY_NO_SMTPUTF8 = LocalReply(550, "5.6.7", "remote server does not support SMTPUTF8", Reason.NO_SMTPUTF8)
REPLY_NO_8BITMIME = LocalReply(
    554, "5.6.3",
    "remote server does not support 8BITMIME; conversion required but not supported",
    Reason.NO_8BITMIME,
)
REPLY_BAD_ADDRESS = LocalReply(553, "5.1.3", "address contains characters not allowed in SMTP", Reason.UNSAFE_ADDRESS)
TEXT_TOO_BIG = "message size {size} exceeds the remote server's limit of {limit} octets"
# NUL is never sent: a next hop that drops it could read a "\0." line as the end of the data.
REPLY_NUL = LocalReply(554, "5.6.0", "message contains a NUL character; not relayed", Reason.NUL_CONTENT)

# -- the values exchanged with the delivery module ------------------------------


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds to wait at each step; defaults from RFC 5321 4.5.3.2."""

    connect: float = 30
    greeting: float = 300
    ehlo: float = 300
    mail: float = 300
    rcpt: float = 300
    data_init: float = 120
    data_block: float = 180
    final_dot: float = 600
    idle: float = 60  # a pooled connection idle longer than this is closed


@dataclass(frozen=True)
class ClientOptions:
    """How to talk to one next hop.

    ``tls``: "may" starts TLS when offered, without a certificate check;
    "require" never sends mail in clear (no STARTTLS is a transient failure);
    "verify" is "require" plus a certificate verified against the system CA
    store (or ``ca_file``) for ``tls_hostname`` (the host name when empty).
    With ``username`` set, AUTH PLAIN (or LOGIN) follows, only after TLS
    unless ``auth_in_clear``.  ``starttls`` False skips STARTTLS (the retry in
    clear of "may" after a failed handshake).  ``source`` are the local
    addresses outbound connections are made from (one per IP version).  The password is never logged and never put in
    an exception text.
    """

    hostname: str
    tls: str = "may"
    tls_hostname: str = ""
    ca_file: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    auth_in_clear: bool = False
    timeouts: ClientTimeouts = ClientTimeouts()
    starttls: bool = True  # False: a session in clear after a failed handshake (tls = "may" only)
    source: tuple[str, ...] = ()  # local addresses to connect from, at most one per IP version
    trust: Optional[TrustStore] = field(default=None, compare=False, repr=False)  # ca_file loaded once


@dataclass(frozen=True)
class Transaction:
    """One message to some recipients of one destination.

    ``recipients`` are ``(address, rcpt_route)`` pairs; a non-empty route is
    sent as the source route ``<@h2,@h3:user@domain>``.  ``open_message``
    opens the stored message (CRLF line endings) for binary reading; it is
    called once per attempt (twice for an 8BITMIME message toward a server
    without 8BITMIME, to check whether it is 7-bit after all).
    """

    sender: str  # "" for <>
    recipients: tuple[tuple[str, tuple[str, ...]], ...]
    size: int
    body_type: str = "7BIT"  # the BODY= parameter: or "8BITMIME"
    smtputf8: bool = False
    open_message: Callable[[], BinaryIO] = field(kw_only=True)
    queue_id: str = field(default="", kw_only=True)  # for the logs
    crlf_only: bool = field(default=False, kw_only=True)  # no bare CR or LF in the message (queued mail)
    # DSN parameters (RFC 3461) as received: RET/ENVID, and NOTIFY/ORCPT per recipient (same order);
    # sent only to a next hop that advertises DSN.
    mail_params: tuple[tuple[str, Optional[str]], ...] = field(default=(), kw_only=True)
    rcpt_params: tuple[tuple[tuple[str, Optional[str]], ...], ...] = field(default=(), kw_only=True)


@dataclass(frozen=True)
class TransactionResult:
    """Every recipient's final reply, from the peer or synthesized here."""

    replies: dict[str, Reply]
    host: str
    tls: str  # "TLSv1.3 TLS_AES_256_GCM_SHA384", or "" in clear
    dsn: bool = False  # the peer advertised DSN: the DSN parameters went with the mail


# The reason of a session error when its creator names none, by stage.
_STAGE_REASONS = {
    STAGE_CONNECT: Reason.CONNECT_FAILED,
    STAGE_GREETING: Reason.SESSION_REFUSED,
    STAGE_EHLO: Reason.SESSION_REFUSED,
    STAGE_STARTTLS: Reason.TLS_UNAVAILABLE,
    STAGE_AUTH: Reason.AUTH_FAILED,
    STAGE_TIMEOUT: Reason.TIMEOUT,
    STAGE_LOST: Reason.LOST,
}


class SessionError(ReasonedError):
    """The connection or session could not carry mail.

    ``stage`` is one of "connect", "greeting", "ehlo", "starttls", "auth",
    "timeout", "lost"; ``reason`` (a ``relay.outcome.Reason``) says why in
    a type, never in the words of an exception.  ``reply`` is the peer's
    reply when there was one; ``transient`` says whether a later attempt may
    succeed.  An authentication failure is transient on purpose: it is a
    configuration problem, and mail waits in the queue while the operator
    fixes it.
    """

    def __init__(
        self, reply: Optional[Reply], transient: bool, stage: str, message: str = "", reason: Optional[Reason] = None
    ) -> None:
        self.reply = reply
        self.transient = transient
        self.stage = stage
        self.reason = reason if reason is not None else _STAGE_REASONS.get(stage, Reason.LOCAL_ERROR)
        self.message = message or (describe(reply) if reply else stage)
        super().__init__(self.message)

    def __str__(self) -> str:
        if self.reply is not None and self.message != describe(self.reply):
            return f"{self.message}: {describe(self.reply)}"
        return self.message
