"""The mail transaction of an inbound session (RFC 5321 3.3): what MAIL and RCPT build.

``read_mail`` and ``read_rcpt`` read a command's argument on its own: the
path (domains in A-label form), the ESMTP parameters (SIZE, BODY,
SMTPUTF8, AUTH) and the DSN ones (RFC 3461).  What the argument alone
refuses raises ``Refusal``, which carries the reply and, for the log, why.

``Transactions`` holds a session's current ``Transaction``: it asks the
policy whether an authenticated client may use its sender and about each
recipient, accepts ``<postmaster>`` from anyone, counts ``max_recipients``
and collects the recipients accepted.  The session decides when a command
is allowed at all (HELO first, AUTH on a submission listener, no nesting)
and when the transaction ends.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from twisted.internet.defer import Deferred, maybeDeferred

from relay.config import ServerConfig
from relay.domains import DomainError, to_ascii
from relay.envelope import ClientInfo, Recipient
from relay.log import Logger
from relay.seams import Policy
from relay.smtp import dsn
from relay.smtp.address import Path, UnsendableAddress, normalized_path, parse_params, parse_path, split_argument
from relay.smtp.replies import (
    BAD_BODY,
    BAD_IDN_RECIPIENT,
    BAD_IDN_SENDER,
    BAD_RECIPIENT,
    BAD_SENDER,
    BAD_SIZE,
    BAD_SMTPUTF8,
    INTERNAL_ERROR,
    NULL_RECIPIENT,
    RECIPIENT_OK,
    SENDER_OK,
    SIZE_EXCEEDED,
    SYNTAX_MAIL,
    SYNTAX_PARAMS,
    SYNTAX_RCPT,
    TOO_MANY_RECIPIENTS,
    UNSENDABLE_RECIPIENT,
    UNSENDABLE_SENDER,
    UNSUPPORTED_PARAM,
    Answer,
    Reply,
)

# The sessions' own namespace: operators filter the inbound listener's lines by it.
log = Logger(namespace="relay.smtp.server")

POSTMASTER = "postmaster"  # the one recipient accepted without a domain (RFC 5321 4.5.1)

BODY_7BIT = "7BIT"
BODY_8BITMIME = "8BITMIME"


class Transaction:
    """What MAIL and RCPT collected; cleared by RSET, HELO/EHLO, STARTTLS and end of DATA."""

    def __init__(self, sender: str, body_type: str, smtputf8: bool, params: tuple) -> None:
        self.sender = sender
        self.body_type = body_type  # the BODY= parameter
        self.smtputf8 = smtputf8
        self.params = params
        self.recipients: list[Recipient] = []


class Refusal(Exception):
    """A MAIL or RCPT argument refused: the reply, and why (for the log; "" when the reply says it all)."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        super().__init__(reply, reason)
        self.reply = reply
        self.reason = reason


class RcptRequest(NamedTuple):
    """A RCPT argument read: the path (None: the bare ``<postmaster>``) and the parameters kept."""

    path: Optional[Path]
    params: tuple


# -- the arguments -------------------------------------------------------------------


def read_mail(argument: str, esmtp: bool, auth_offered: bool, max_size: int) -> Transaction:
    """The transaction a ``MAIL`` argument opens; raises Refusal.

    ``esmtp``: the client said EHLO (parameters allowed); ``auth_offered``:
    the AUTH parameter is accepted (RFC 4954 5); ``max_size``: the SIZE limit.
    """
    if argument[:5].upper() != "FROM:":
        raise Refusal(SYNTAX_MAIL)
    path_text, params = _split(argument[5:], BAD_SENDER)
    if params and not esmtp:
        raise Refusal(UNSUPPORTED_PARAM)
    body, smtputf8, others = _mail_options(params, auth_offered, max_size)
    path = _parse_path(path_text, smtputf8, BAD_SENDER, BAD_IDN_SENDER, UNSENDABLE_SENDER)
    return Transaction(path.mailbox, body, smtputf8, others)


def read_rcpt(argument: str, smtputf8: bool) -> RcptRequest:
    """The recipient a ``RCPT`` argument asks for; raises Refusal."""
    if argument[:3].upper() != "TO:":
        raise Refusal(SYNTAX_RCPT)
    path_text, params = _split(argument[3:], BAD_RECIPIENT)
    checked = dsn.check_rcpt_params(params, smtputf8)
    if isinstance(checked, Reply):
        raise Refusal(checked)
    if path_text[1:-1].lower() == POSTMASTER:
        return RcptRequest(None, tuple(checked))
    path = _parse_path(path_text, smtputf8, BAD_RECIPIENT, BAD_IDN_RECIPIENT, UNSENDABLE_RECIPIENT)
    if path.is_null:
        raise Refusal(NULL_RECIPIENT)
    return RcptRequest(path, tuple(checked))


def _split(text: str, bad_path: Reply) -> tuple[str, list]:
    """The path text and the parsed parameters of a MAIL or RCPT argument (after the colon)."""
    try:
        path_text, params_text = split_argument(text)
    except ValueError as e:
        raise Refusal(bad_path, str(e)) from None
    try:
        return path_text, parse_params(params_text)
    except ValueError as e:
        raise Refusal(SYNTAX_PARAMS, str(e)) from None


def _mail_options(params: list, auth_offered: bool, max_size: int) -> tuple[str, bool, tuple]:
    """BODY, SMTPUTF8 and the DSN parameters kept of MAIL's parameters; raises Refusal."""
    body, smtputf8, others = BODY_7BIT, False, []
    for keyword, value in params:
        if keyword == "SIZE":
            if value is None or not value.isdigit() or not value.isascii():
                raise Refusal(BAD_SIZE)
            if int(value) > max_size:
                raise Refusal(SIZE_EXCEEDED)
        elif keyword == "BODY":
            if value is None or value.upper() not in (BODY_7BIT, BODY_8BITMIME):
                raise Refusal(BAD_BODY)
            body = value.upper()
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise Refusal(BAD_SMTPUTF8)
            smtputf8 = True
        elif keyword == "AUTH" and auth_offered:
            pass  # RFC 4954 5: accepted; the identity we pass on is our own
        elif keyword in dsn.MAIL_KEYWORDS:
            refusal = dsn.check_mail_param(keyword, value, others)
            if refusal is not None:
                raise Refusal(refusal)
            others.append((keyword, value))
        else:
            raise Refusal(UNSUPPORTED_PARAM)
    return body, smtputf8, tuple(others)


def _parse_path(text: str, smtputf8: bool, bad: Reply, bad_idn: Reply, unsendable: Reply) -> Path:
    """The path of MAIL or RCPT with its domains in normalised (A-label) form; raises Refusal."""
    try:
        return normalized_path(parse_path(text, smtputf8))
    except ValueError as e:
        if isinstance(e, DomainError):
            raise Refusal(bad_idn, str(e)) from None
        raise Refusal(unsendable if isinstance(e, UnsendableAddress) else bad, str(e)) from None


# -- the session's transaction ---------------------------------------------------------


class Transactions:
    """The current transaction of one session and the policy checks that fill it."""

    def __init__(self, config: ServerConfig, hostname: str, policy: Policy, peer: Callable[[], str]) -> None:
        self.config = config
        self.hostname = hostname
        self.policy = policy
        self._peer = peer
        self.current: Optional[Transaction] = None

    def begin(self, transaction: Transaction, auth_user: str,
              client_info: Callable[[bool], ClientInfo]) -> Answer:
        """Open ``transaction``: at once, or once the policy lets ``auth_user`` use its sender."""
        if not auth_user:
            self.current = transaction
            return SENDER_OK
        answer = maybeDeferred(self.policy.check_sender, client_info(transaction.smtputf8), transaction.sender)
        return answer.addCallback(self._sender_checked, transaction, auth_user)

    def _sender_checked(self, refusal: Optional[Reply], transaction: Transaction, auth_user: str) -> Reply:
        if refusal is not None and not isinstance(refusal, Reply):
            log.error("policy answered {answer!r} for sender <{sender}>, not a Reply",
                      answer=refusal, sender=transaction.sender)
            return INTERNAL_ERROR
        if refusal is not None and refusal.code >= 400:
            log.info("refused sender <{sender}> for user {user} from {peer}: {reply}",
                     sender=transaction.sender, user=auth_user, peer=self._peer(), reply=str(refusal),
                     event="rejected", stage="mail")
            return refusal
        self.current = transaction
        return SENDER_OK

    def add(self, request: RcptRequest, client_info: Callable[[], ClientInfo]) -> Answer:
        """Add the recipient of ``request`` to the current transaction, if the policy accepts it."""
        transaction = self.current
        assert transaction is not None
        if request.path is None:
            return self._postmaster(transaction, request.params)
        if len(transaction.recipients) >= self.config.max_recipients:
            return TOO_MANY_RECIPIENTS
        path = request.path
        recipient = Recipient(address=path.mailbox, source_route=path.source_route, params=request.params)
        # An answer the policy has at once is used at once (no Deferred per
        # recipient); an exception ends as 451 through the session's lineReceived.
        answer = self.policy.check_recipient(client_info(), transaction.sender, recipient)
        if isinstance(answer, Deferred):
            return answer.addCallback(self._recipient_checked, transaction, recipient)
        return self._recipient_checked(answer, transaction, recipient)

    def _postmaster(self, transaction: Transaction, params: tuple = ()) -> Reply:
        """``RCPT TO:<postmaster>`` (RFC 5321 4.5.1): accepted from anyone, delivered to ``[server] postmaster``."""
        address = self.config.postmaster or f"{POSTMASTER}@{to_ascii(self.hostname)}"
        if len(transaction.recipients) >= self.config.max_recipients:
            return TOO_MANY_RECIPIENTS
        if all(r.address != address for r in transaction.recipients):
            transaction.recipients.append(Recipient(address=address, params=params))
        return RECIPIENT_OK

    def _recipient_checked(self, refusal: Optional[Reply], transaction: Transaction,
                           recipient: Recipient) -> Reply:
        if refusal is not None and not isinstance(refusal, Reply):
            log.error("policy answered {answer!r} for <{recipient}>, not a Reply",
                      answer=refusal, recipient=recipient.address)
            return INTERNAL_ERROR
        if refusal is not None and refusal.code >= 400:
            log.info("refused recipient <{recipient}> from {peer}: {reply}",
                     recipient=recipient.address, peer=self._peer(), reply=str(refusal),
                     event="rejected", stage="rcpt")
            return refusal
        if transaction is self.current and all(
                r.address != recipient.address for r in transaction.recipients):
            transaction.recipients.append(recipient)
        return RECIPIENT_OK
