"""Reading a peer's replies: the reply-line grammar, multi-line replies, EHLO keywords.

This module owns what the outbound client reads off the wire before it acts
on it: ``ReplyReader`` takes the reply lines one at a time (RFC 5321 4.2:
``NNN-text`` continues a reply, ``NNN text`` ends it), refuses a malformed
line, a multi-line reply whose codes disagree, or one beyond
``MAX_REPLY_LENGTH``, and hands back each complete reply as a ``Response``;
``parse_capabilities`` reads the EHLO keywords of one.  The reply is parsed
once, here: ``Response.reply()`` builds the ``Reply`` from the lines already
split off the wire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from relay.metrics import reply_out
from relay.smtp.replies import Reply

# A reply line is 512 octets in RFC 5321 4.5.3.1.5; tolerate far longer ones,
# and drop the connection beyond this (for one line and for a whole reply).
MAX_REPLY_LENGTH = 64 * 1024

_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])(?:([ -])(.*))?$", re.DOTALL)


def describe(reply: Reply) -> str:
    """``"550 5.1.1 no such user"``: one line for logs and errors."""
    return str(reply)


@dataclass(frozen=True)
class Response:
    """A complete (possibly multi-line) reply as read off the wire."""

    code: int
    lines: tuple[str, ...]  # the text after "NNN-" / "NNN " of each line

    def reply(self) -> Reply:
        """The ``Reply``: enhanced status split out, lines joined with "\\n" (the lines are not parsed again)."""
        return Reply.from_texts(self.code, self.lines)


class MalformedReply(Exception):
    """The peer broke the reply grammar; the text says how (for the log and the SessionError)."""


class ReplyReader:
    """Assembles reply lines into ``Response`` values, one peer's replies in order."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._code = 0
        self._size = 0

    def line(self, line: bytes) -> Optional[Response]:
        """Take one line (without its LF): the ``Response`` it completes, or None while the reply goes on.

        Raises ``MalformedReply`` for a line that is not a reply line, a code
        that differs from the earlier lines of the reply, or a reply longer
        than ``MAX_REPLY_LENGTH``.
        """
        line = line.rstrip(b"\r")
        m = _REPLY_LINE.match(line)
        if m is None:
            raise MalformedReply("malformed reply line")
        code = int(m.group(1))
        if m.group(2) != b"-":
            reply_out(code)
        if self._lines and code != self._code:
            raise MalformedReply("inconsistent codes in a multi-line reply")
        self._size += len(line)
        if self._size > MAX_REPLY_LENGTH:
            raise MalformedReply("reply too long")
        self._code = code
        self._lines.append((m.group(3) or b"").decode("utf-8", "replace"))
        if m.group(2) == b"-":
            return None
        response = Response(code, tuple(self._lines))
        self._lines = []
        self._size = 0
        return response


def parse_capabilities(lines: tuple[str, ...]) -> dict[str, str]:
    """EHLO keywords (upper-cased) -> their parameters, from the lines after the first."""
    capabilities: dict[str, str] = {}
    for line in lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword.upper().startswith("AUTH="):  # the pre-RFC 4954 form
            keyword, params = "AUTH", keyword[5:] + " " + params
            params = " ".join((capabilities.get("AUTH", "") + " " + params).split())
        if keyword:
            capabilities[keyword.upper()] = params.strip()
    return capabilities
