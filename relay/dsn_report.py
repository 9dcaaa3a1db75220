"""The delivery status notification as a message (RFC 3464, RFC 6522, RFC 6533).

This module owns how a notification is written: ``build_dsn`` is the pure
function that renders it, a ``multipart/report`` of three parts:

1. ``text/plain``: for people, which recipients failed and why;
2. ``message/delivery-status``: for programs, one per-message group and one
   group per recipient (Reporting-MTA, Final-Recipient, Action, Status,
   Remote-MTA, Diagnostic-Code, ...);
3. the original: its header section (``text/rfc822-headers``), or, when the
   caller hands over the whole message (a RET=FULL failure), the whole of it
   (``message/rfc822``).

It also owns the vocabulary of a notification: the ``Action`` values
(``failed``, ``delayed``, ``relayed``), the subjects, and the Status of each
recipient (``recipient_status``).  What a recipient's group says comes from
the facts of its last attempt (``relay.envelope.Attempt``), never from
parsing stored text: ``Status`` is the attempt's enhanced status (4.4.7 when
it expired while transient), and "host X said", ``Remote-MTA`` and
``Diagnostic-Code: smtp`` appear only for a reply a remote host really sent
(``remote``); relay's own decisions get ``Diagnostic-Code: X-Relay``.

A notification to an address that is not ASCII is an SMTPUTF8 message and
uses the RFC 6533 types ``message/global-delivery-status`` and
``message/global-headers`` with raw UTF-8.  Every other notification is kept
7-bit clean (addresses as ``utf-8-addr-xtext``, text parts quoted-printable
where needed), so it can be relayed by any next hop.

Whether a notification is due, and reading the original and spooling the
notification, are ``relay.bounce``'s.
"""

from __future__ import annotations

import binascii
import re
import secrets
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Iterable, Optional

from relay.domains import DomainError, to_ascii
from relay.envelope import OUTCOME_TRANSIENT, Attempt, Envelope, Recipient, describe
from relay.smtp import dsn

ACTION_FAILED = "failed"
ACTION_DELAYED = "delayed"
ACTION_RELAYED = "relayed"
ACTIONS = (ACTION_FAILED, ACTION_DELAYED, ACTION_RELAYED)

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_RELAYED = "Successful Mail Delivery Report"
_SUBJECTS = {ACTION_FAILED: SUBJECT_FAILED, ACTION_DELAYED: SUBJECT_DELAYED, ACTION_RELAYED: SUBJECT_RELAYED}
STATUS_SUCCESS_DEFAULT = "2.0.0"
FROM_NAME = "Mail Delivery System"
FROM_LOCAL = "MAILER-DAEMON"
AUTO_SUBMITTED = "auto-replied"  # RFC 3834

STATUS_EXPIRED = "4.4.7"  # delivery time expired (RFC 3463)
STATUS_PERMANENT_DEFAULT = "5.0.0"
STATUS_TRANSIENT_DEFAULT = "4.0.0"
DIAGNOSTIC_SMTP = "smtp"  # Diagnostic-Code type for a reply a remote host sent (RFC 3464 2.3.6)
DIAGNOSTIC_LOCAL = "X-Relay"  # Diagnostic-Code type for a reason relay decided itself (an "X-" type)

MAX_LINE = 998  # octets, without the CRLF (RFC 5322 2.1.1)
FOLD_AT = 78  # preferred line length of the fields we write

CRLF = "\r\n"

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# QCHAR of RFC 6533: what utf-8-addr-xtext carries as itself.
_QCHAR = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}


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


def ascii_host(hostname: str) -> str:
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
        ("Reporting-MTA", f"dns; {ascii_host(hostname)}"),
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
    return f"<{int(now)}.{secrets.token_hex(8)}@{ascii_host(hostname)}>"


def _boundary(envelope: Envelope, hostname: str, parts: list[bytes]) -> str:
    """A boundary that none of the parts contains."""
    while True:
        boundary = f"{envelope.queue_id}.{secrets.token_hex(6)}/{ascii_host(hostname)}"
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
    host = ascii_host(hostname)
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
