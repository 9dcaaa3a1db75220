"""Delivery status notifications (RFC 3464): step 6 of the data flow.

This module owns what the sender is told when a message cannot be delivered
(``action="failed"``: a permanent failure or the end of the queue lifetime),
is still waiting (``action="delayed"``: a warning), or was handed to a next
hop without DSN while the sender asked for success notices
(``action="relayed"``, RFC 3461 5.2.2).  ``build_dsn`` is the
pure function that writes the notification, a ``multipart/report``
(RFC 6522) of three parts:

1. ``text/plain``: for people, which recipients failed and why;
2. ``message/delivery-status``: for programs, one per-message group and one
   group per recipient (Reporting-MTA, Final-Recipient, Action, Status,
   Remote-MTA, Diagnostic-Code, ...);
3. the original: its header section (``text/rfc822-headers``), or, for a
   failure whose sender asked ``RET=FULL``, the whole message
   (``message/rfc822``) up to ``MAX_RETURNED`` octets (headers only beyond).
   Without RET, and for delay and relayed notices, headers only.

What a recipient's group says comes from the facts of its last attempt
(``relay.envelope.Attempt``), never from parsing stored text: ``Status`` is
the attempt's enhanced status (4.4.7 when it expired while transient), and
"host X said", ``Remote-MTA`` and ``Diagnostic-Code: smtp`` appear only for a
reply a remote host really sent (``remote``); relay's own decisions get
``Diagnostic-Code: X-Relay``.  ``notification_due`` is the one rule that
decides whether the sender is told at all (never for ``<>``; NOTIFY).

``send_dsn`` reads the original header section from the spool (a bounded
read that stops at the end of the headers), builds the notification and
commits it through the spool's one door as a new message with the null
sender ``<>``, so nothing ever bounces a bounce.  The scheduler then delivers
it like any other message.

A notification to an address that is not ASCII is an SMTPUTF8 message and
uses the RFC 6533 types ``message/global-delivery-status`` and
``message/global-headers`` with raw UTF-8.  Every other notification is kept
7-bit clean (addresses as ``utf-8-addr-xtext``, text parts quoted-printable
where needed), so it can be relayed by any next hop.
"""

from __future__ import annotations

import binascii
import io
import re
import secrets
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import BinaryIO, Iterable, Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from relay.log import Logger
from twisted.python.failure import Failure

from relay.domains import DomainError, to_ascii
from relay.envelope import (
    OUTCOME_TRANSIENT,
    Attempt,
    ClientInfo,
    Envelope,
    Recipient,
    describe,
)
from relay.queue.store import Spool
from relay.smtp import dsn

log = Logger(namespace="relay.bounce")

ACTION_FAILED = "failed"
ACTION_DELAYED = "delayed"
ACTION_RELAYED = "relayed"
ACTIONS = (ACTION_FAILED, ACTION_DELAYED, ACTION_RELAYED)
_NOTIFY_WORD = {ACTION_FAILED: dsn.FAILURE, ACTION_DELAYED: dsn.DELAY, ACTION_RELAYED: dsn.SUCCESS}

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_RELAYED = "Successful Mail Delivery Report"
_SUBJECTS = {ACTION_FAILED: SUBJECT_FAILED, ACTION_DELAYED: SUBJECT_DELAYED, ACTION_RELAYED: SUBJECT_RELAYED}
STATUS_SUCCESS_DEFAULT = "2.0.0"
MAX_RETURNED = 10 * 1024 * 1024  # octets of the original a RET=FULL failure notice returns whole
FROM_NAME = "Mail Delivery System"
FROM_LOCAL = "MAILER-DAEMON"
AUTO_SUBMITTED = "auto-replied"  # RFC 3834
DSN_PROTOCOL = "local"  # ClientInfo.protocol of a notification we wrote ourselves

STATUS_EXPIRED = "4.4.7"  # delivery time expired (RFC 3463)
STATUS_PERMANENT_DEFAULT = "5.0.0"
STATUS_TRANSIENT_DEFAULT = "4.0.0"
DIAGNOSTIC_SMTP = "smtp"  # Diagnostic-Code type for a reply a remote host sent (RFC 3464 2.3.6)
DIAGNOSTIC_LOCAL = "X-Relay"  # Diagnostic-Code type for a reason relay decided itself (an "X-" type)

MAX_HEADER_OCTETS = 1024 * 1024  # never read more of the original than this
READ_CHUNK = 16 * 1024
MAX_LINE = 998  # octets, without the CRLF (RFC 5322 2.1.1)
FOLD_AT = 78  # preferred line length of the fields we write

CRLF = "\r\n"

_HEADER_END = re.compile(rb"\n\r?\n")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# QCHAR of RFC 6533: what utf-8-addr-xtext carries as itself.
_QCHAR = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}


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


# -- per-recipient facts ---------------------------------------------------------


def _last_attempt(recipient: Recipient) -> Optional[Attempt]:
    return recipient.history[-1] if recipient.history else None


def _said_by(attempt: Optional[Attempt]) -> str:
    """The host whose reply the last attempt recorded, "" when relay decided itself."""
    return attempt.host if attempt is not None and attempt.remote else ""


def _words(recipient: Recipient) -> str:
    """The final word about a recipient: a remote reply with its code, or relay's status and reason."""
    attempt = _last_attempt(recipient)
    if attempt is None:
        return recipient.last_error  # never attempted (or a version 1 entry without history)
    if attempt.remote:
        return attempt.reply
    return describe(0, attempt.status, attempt.text)


def recipient_status(recipient: Recipient, action: str = ACTION_FAILED) -> str:
    """The Status field of a recipient, from its last attempt's enhanced status code.

    A delayed recipient keeps the 4.x.x code of its last attempt (4.0.0 when
    there is none).  A failed recipient whose last attempt failed permanently
    keeps its 5.x.x code (5.0.0 when there is none); one whose last attempt
    was transient has expired: 4.4.7.
    """
    attempt = _last_attempt(recipient)
    status = attempt.status if attempt is not None else ""
    if action == ACTION_RELAYED:
        return status if status.startswith("2.") else STATUS_SUCCESS_DEFAULT
    if action == ACTION_DELAYED:
        return status if status.startswith("4.") else STATUS_TRANSIENT_DEFAULT
    if attempt is not None and attempt.outcome == OUTCOME_TRANSIENT:
        return STATUS_EXPIRED
    return status if status.startswith("5.") else STATUS_PERMANENT_DEFAULT


def _mta_name(host: str) -> str:
    """``mx.example`` from ``mx.example[192.0.2.1]``; ``192.0.2.1`` from ``[192.0.2.1]``."""
    name, bracket, rest = host.partition("[")
    if name:
        return name
    return rest.rstrip("]") if bracket else host


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


# -- encodings -----------------------------------------------------------------


def _utf8_addr_xtext(address: str) -> str:
    """An address as utf-8-addr-xtext (RFC 6533 3): ``\\x{HEX}`` for what is not QCHAR."""
    return "".join(c if c in _QCHAR else f"\\x{{{ord(c):X}}}" for c in address)


def _address_field(address: str, utf8: bool) -> str:
    """``rfc822; addr`` for ASCII, ``utf-8; addr`` (raw or xtext) otherwise (RFC 6533)."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address if utf8 else _utf8_addr_xtext(address)}"


def _field_text(text: str, utf8: bool) -> str:
    """Text for a field: one line, no controls, ASCII unless the notification is UTF-8."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    return text if utf8 else text.encode("ascii", "replace").decode("ascii")


def _date(when: float) -> str:
    """RFC 5322 date-time in UTC: ``Tue, 14 Nov 2023 22:13:20 +0000``."""
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))


def _fold(line: str) -> list[str]:
    """A field split into lines of at most ``FOLD_AT`` characters where it has spaces.

    Continuation lines start with a space; a run without spaces longer than
    ``MAX_LINE`` octets is cut, so no line ever exceeds it.
    """
    lines: list[str] = []
    current = ""
    for word in re.split(r"(?<=\S)(?= )", line):
        if current and len(current) + len(word) > FOLD_AT:
            lines.append(current)
            current = word if word.startswith(" ") else " " + word
        else:
            current += word
    lines.append(current)
    return [piece for long in lines for piece in _cut(long)]


def _cut(line: str) -> list[str]:
    """``line`` in pieces whose UTF-8 form fits ``MAX_LINE`` octets; later pieces start with a space."""
    pieces: list[str] = []
    while len(line.encode("utf-8")) > MAX_LINE:
        size = MAX_LINE
        while len(line[:size].encode("utf-8")) > MAX_LINE:
            size -= 1
        pieces.append(line[:size])
        line = " " + line[size:]
    pieces.append(line)
    return pieces


def _fields(pairs: Iterable[tuple[str, str]]) -> str:
    """Header fields, folded, each line ending in CRLF."""
    return "".join(CRLF.join(_fold(f"{name}: {value}")) + CRLF for name, value in pairs)


def _header_lines(headers: bytes) -> bytes:
    """The original header section with CRLF line ends and no line over ``MAX_LINE`` octets.

    Anything after an empty line (a body) is dropped.
    """
    out: list[bytes] = []
    for line in _LINE_BREAK.split(headers):
        if not line:
            break
        while len(line) > MAX_LINE:
            out.append(line[:MAX_LINE])
            line = b" " + line[MAX_LINE:]
        out.append(line)
    return b"".join(line + b"\r\n" for line in out)


def _text_part(content_type: str, data: bytes, utf8: bool) -> bytes:
    """A MIME part: 7bit when ASCII, 8bit in a UTF-8 notification, else quoted-printable."""
    if data.isascii():
        encoding = "7bit"
    elif utf8:
        encoding = "8bit"
    else:
        encoding, data = "quoted-printable", binascii.b2a_qp(data, istext=True)
    head = f"Content-Type: {content_type}{CRLF}Content-Transfer-Encoding: {encoding}{CRLF}{CRLF}"
    return head.encode("ascii") + data


def _message_part(message: bytes, smtputf8: bool) -> bytes:
    """The whole original as a ``message/rfc822`` part (``message/global`` for an SMTPUTF8 one).

    A message part may not be quoted-printable (RFC 2046 5.2.1): 8-bit
    content goes as 8bit, which makes the notification an 8BITMIME message.
    """
    content_type = "message/global" if smtputf8 else "message/rfc822"
    encoding = "7bit" if message.isascii() else "8bit"
    head = f"Content-Type: {content_type}{CRLF}Content-Transfer-Encoding: {encoding}{CRLF}{CRLF}"
    return head.encode("ascii") + message


def _ascii_host(hostname: str) -> str:
    """The host name as it goes in a field: A-labels when it has U-labels."""
    if hostname.isascii():
        return hostname
    try:
        return to_ascii(hostname)
    except DomainError:
        return hostname.encode("ascii", "replace").decode("ascii")


# -- the three parts -----------------------------------------------------------


def _human_text(
    envelope: Envelope,
    recipients: list[Recipient],
    hostname: str,
    action: str,
    retry_until: Optional[float],
    returned_whole: bool = False,
) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action == ACTION_DELAYED:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to the recipients below.",
            "The mail system will keep trying"
            + (f" until {_date(retry_until)}." if retry_until is not None else "."),
        ]
    elif action == ACTION_RELAYED:
        lines += [
            "Your message was successfully relayed to the recipients below.",
            "The next mail system does not offer delivery status notifications,",
            "so this is the last report you will get about them from here.",
        ]
    else:
        lines += [
            "Your message could not be delivered to one or more recipients.",
            "The reasons are given below; your message"
            + (" is attached." if returned_whole else "'s headers are attached."),
        ]
    lines += ["", f"Queue id of your message: {envelope.queue_id}"]
    if envelope.arrival > 0:
        lines.append(f"Arrived here: {_date(envelope.arrival)}")
    lines += [
        "",
        "For further assistance, send mail to postmaster.",
        "If you do so, please include this problem report.",
        "",
        "                   The mail system",
        "",
    ]
    for recipient in recipients:
        lines.append(f"<{recipient.address}>: {_reason(recipient, action)}")
    return CRLF.join(line for text in lines for line in _cut(text)) + CRLF


def _reason(recipient: Recipient, action: str) -> str:
    """Why a recipient is listed, in words: the remote reply or the local reason."""
    words = _field_text(_words(recipient), utf8=True) or "no reason recorded"
    host = _said_by(_last_attempt(recipient))
    said = f"host {host} said: {words}" if host else words
    if action == ACTION_FAILED and recipient_status(recipient, action) == STATUS_EXPIRED:
        return f"delivery time expired; last error: {said}"
    return said


def _per_message_fields(envelope: Envelope, hostname: str, utf8: bool) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    envid = dsn.param(envelope.mail_params, dsn.ENVID)
    if envid:
        fields.append(("Original-Envelope-Id", _field_text(dsn.xtext_decode(envid), utf8)))
    fields += [
        ("Reporting-MTA", f"dns; {_ascii_host(hostname)}"),
        ("X-Relay-Queue-ID", envelope.queue_id),
        ("X-Relay-Sender", _address_field(envelope.sender, utf8)),
    ]
    if envelope.arrival > 0:
        fields.append(("Arrival-Date", _date(envelope.arrival)))
    return fields


def _per_recipient_fields(
    recipient: Recipient, action: str, retry_until: Optional[float], utf8: bool
) -> list[tuple[str, str]]:
    fields = [("Final-Recipient", _address_field(recipient.address, utf8))]
    orcpt = dsn.param(recipient.params, dsn.ORCPT)
    if orcpt and ";" in orcpt:
        kind, _, original = dsn.xtext_decode(orcpt).partition(";")
        fields.append(("Original-Recipient", f"{kind.strip()}; {_field_text(original.strip(), utf8)}"))
    fields += [("Action", action), ("Status", recipient_status(recipient, action))]
    attempt = _last_attempt(recipient)
    host = _said_by(attempt)
    if host:
        fields.append(("Remote-MTA", f"dns; {_field_text(_mta_name(host), utf8)}"))
    words = _words(recipient)
    if words:
        kind = DIAGNOSTIC_SMTP if host else DIAGNOSTIC_LOCAL
        fields.append(("Diagnostic-Code", f"{kind}; {_field_text(words, utf8)}"))
    if attempt is not None:
        fields.append(("Last-Attempt-Date", _date(attempt.time)))
    if action == ACTION_DELAYED and retry_until is not None:
        fields.append(("Will-Retry-Until", _date(retry_until)))
    return fields


def _delivery_status(
    envelope: Envelope,
    recipients: list[Recipient],
    hostname: str,
    action: str,
    retry_until: Optional[float],
    utf8: bool,
) -> str:
    groups = [_fields(_per_message_fields(envelope, hostname, utf8))]
    groups += [_fields(_per_recipient_fields(r, action, retry_until, utf8)) for r in recipients]
    return CRLF.join(groups)


# -- the notification ----------------------------------------------------------


def new_message_id(hostname: str, now: float) -> str:
    """A unique Message-ID: ``<time.random@hostname>``."""
    return f"<{int(now)}.{secrets.token_hex(8)}@{_ascii_host(hostname)}>"


def _boundary(envelope: Envelope, hostname: str, parts: list[bytes]) -> str:
    """A boundary that none of the parts contains."""
    while True:
        boundary = f"{envelope.queue_id}.{secrets.token_hex(6)}/{_ascii_host(hostname)}"
        token = boundary.encode("ascii")
        if not any(token in part for part in parts):
            return boundary


def build_dsn(
    envelope: Envelope,
    recipients: list[Recipient],
    headers: bytes,
    hostname: str,
    now: float,
    action: str = ACTION_FAILED,
    retry_until: Optional[float] = None,
    message_id: Optional[str] = None,
    original: Optional[bytes] = None,
) -> bytes:
    """The notification about ``recipients`` of ``envelope`` as message bytes (CRLF lines).

    ``headers`` is the original header section (anything after an empty line
    is ignored); ``original``, when given, is the whole original message,
    returned as ``message/rfc822`` instead of the headers (RET=FULL);
    ``now`` dates the notification; ``retry_until`` is when a delayed message
    will be given up.  Pure apart from the random Message-ID and boundary.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    utf8 = not envelope.sender.isascii()
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    headers_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    parts = [
        _text_part(
            "text/plain; charset=utf-8",
            _human_text(envelope, recipients, hostname, action, retry_until, original is not None).encode("utf-8"),
            utf8,
        ),
        _text_part(
            status_type,
            _delivery_status(envelope, recipients, hostname, action, retry_until, utf8).encode("utf-8"),
            utf8,
        ),
        _message_part(original, envelope.smtputf8) if original is not None
        else _text_part(headers_type, _header_lines(headers), utf8),
    ]
    boundary = _boundary(envelope, hostname, parts)
    host = _ascii_host(hostname)
    top = _fields(
        [
            ("From", f"{FROM_NAME} <{FROM_LOCAL}@{host}>"),
            ("To", f"<{envelope.sender}>"),
            ("Subject", _SUBJECTS[action]),
            ("Date", _date(now)),
            ("Message-ID", message_id or new_message_id(hostname, now)),
            ("Auto-Submitted", AUTO_SUBMITTED),
            ("MIME-Version", "1.0"),
            (
                "Content-Type",
                f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
            ),
        ]
    )
    out = [
        top.encode("utf-8"),
        b"\r\nThis is a MIME-encapsulated message.\r\n",
    ]
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    for part in parts:
        out += [delimiter, part]
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


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
            message_id=f"<{incoming.queue_id}@{_ascii_host(hostname)}>",
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
        body=_body_type(message),
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
