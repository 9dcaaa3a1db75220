"""The trace of an inbound message: our Received header (RFC 5321 4.4) and its parts.

Pure functions of what the session knows (client name and address, TLS,
authenticated user, queue id, recipients, time); the session calls them and
writes the result first into the queue file.
"""

from __future__ import annotations

import datetime
from email.utils import format_datetime
from typing import Optional, Sequence


def protocol_name(esmtp: bool, smtputf8: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 / RFC 6531 ``with`` keyword: SMTP, ESMTP, ESMTPS, ESMTPSA, UTF8SMTPS..."""
    if not esmtp:
        return "SMTP"
    name = "UTF8SMTP" if smtputf8 else "ESMTP"
    return name + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(helo: Optional[str], peer_host: str, hostname: str, protocol: str, queue_id: str,
                    recipients: Sequence[str], date: str, comments: str) -> bytes:
    """Our Received field; ``for <...>`` only with one recipient (the others stay private)."""
    # RFC 5321 4.4: "from" Domain "(" TCP-info ")", where TCP-info is the
    # peer's address literal (no reverse lookup: it would block).
    ip = peer_host or "unknown"
    literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
    line = (f"Received: from {helo} ({literal})\r\n"
            f"{comments}"
            f"\tby {hostname} (relay) with {protocol}"
            f" id {queue_id}\r\n")
    if len(recipients) == 1:
        return (line + f"\tfor <{recipients[0]}>; {date}\r\n").encode("utf-8")
    return (line[:-2] + f";\r\n\t{date}\r\n").encode("utf-8")


def received_comments(tls: str, auth_user: str) -> str:
    """The TLS (``tls`` "version cipher", empty: none) and authenticated-sender comments of Received."""
    comments = ""
    if tls:
        version, _, cipher = tls.partition(" ")
        comments += f"\t(using {version} with cipher {cipher})\r\n" if cipher else f"\t(using {version})\r\n"
    if auth_user:
        comments += f"\t(Authenticated sender: {comment_text(auth_user)})\r\n"
    return comments


def comment_text(text: str) -> str:
    """``text`` safe inside a header comment: printable, parentheses and backslashes quoted."""
    safe = "".join(c if c.isprintable() else "?" for c in text)
    return safe.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


class TraceDate:
    """RFC 5322 date-time in UTC, as trace fields carry it, made once per second."""

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            moment = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
            self._second, self._text = second, format_datetime(moment)
        return self._text
