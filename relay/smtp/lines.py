"""The length of inbound command lines (RFC 5321 4.5.3.1.4), and the dropping of an overlong one.

A command line is at most ``MAX_COMMAND_LINE`` octets with its CRLF; an
AUTH command and the responses of a SASL exchange may be longer (up to
``relay.smtp.sasl.MAX_AUTH_LINE``, the session's LineReceiver limit).  A
line is refused as soon as it is known to be too long, even unfinished;
``OverlongLine`` then drops it up to its CRLF however many reads that
takes, and what follows is read as the next commands.
"""

from __future__ import annotations

from typing import Optional

MAX_COMMAND_LINE = 512  # octets including CRLF (RFC 5321 4.5.3.1.4)


def too_long(line: bytes, in_exchange: bool) -> bool:
    """A complete command line (without its CRLF) over the limit; AUTH lines may be longer."""
    return len(line) > MAX_COMMAND_LINE - 2 and not _may_be_long(line, in_exchange)


def too_long_unfinished(buffer: bytes, in_exchange: bool) -> bool:
    """Buffered input without CRLF that is already over the limit for a command line."""
    return len(buffer) >= MAX_COMMAND_LINE and not _may_be_long(buffer, in_exchange) and b"\r\n" not in buffer


def _may_be_long(line: bytes, in_exchange: bool) -> bool:
    """An AUTH command or a response in a SASL exchange."""
    return in_exchange or line[:5].upper() == b"AUTH "


class OverlongLine:
    """The rest of a refused overlong line, dropped up to its CRLF across reads."""

    def __init__(self) -> None:
        self.discarding = False  # the line's CRLF has not come yet
        self._cr = False  # the last read ended in CR: an LF first ends the line

    def refused(self, line: bytes) -> Optional[bytes]:
        """``line`` (the input that was too long) is refused: what follows its CRLF, or None until that comes."""
        end = line.find(b"\r\n")
        if end >= 0:
            return line[end + 2:]
        self.discarding = True
        self._cr = line.endswith(b"\r")
        return None

    def feed(self, data: bytes) -> bytes:
        """Drop ``data`` up to the line's CRLF; what follows it (b"" while the line goes on)."""
        if self._cr and data.startswith(b"\n"):
            rest = data[1:]
        else:
            end = data.find(b"\r\n")
            if end < 0:
                self._cr = data.endswith(b"\r")
                return b""
            rest = data[end + 2:]
        self.discarding = self._cr = False
        return rest
