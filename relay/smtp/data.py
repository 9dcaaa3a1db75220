"""The DATA stream of an inbound session: ``DataReader`` and ``HeaderCompleter``.

``DataReader`` reads one DATA stream after the 354, chunk by chunk with
bytes methods (no per-line Python loop): only CRLF.CRLF ends the data; bare
CR or LF, text lines over 1000 octets, streams over the size limit and more
than 100 Received headers are noticed, the stream is read to its real end and
then refused; nothing of a refused message is kept.  The outcome and the
stored bytes do not depend on how the stream is split into reads.

``HeaderCompleter`` adds the Message-ID and Date a submitted message lacks
(RFC 6409 8.2, 8.3).  Both know nothing of the session that feeds them.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from relay.smtp.replies import (
    BARE_NEWLINE_DATA,
    LINE_TOO_LONG_DATA,
    NUL_IN_DATA,
    SIZE_EXCEEDED,
    TOO_MANY_HOPS,
    Reply,
)

MAX_TEXT_LINE = 1000  # octets including CRLF (RFC 5321 4.5.3.1.6)
MAX_RECEIVED = 100  # more Received headers than this: a mail loop (RFC 5321 6.3)
MAX_HEADER_BUFFER = 1 << 20  # header section held to complete a submitted message
# A Received field: the name in any case, optional white space before the colon
# (RFC 5322 4.5 obsolete syntax, which many parsers still accept).
_RECEIVED_FIELD = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def _has_long_line(text: bytes) -> bool:
    """Whether a line of ``text`` (which starts a line) is longer than MAX_TEXT_LINE with its CRLF.

    Any MAX_TEXT_LINE octets in a row without a LF lie inside one line that
    is too long; otherwise the scan jumps to just after the last LF of each
    window, some MAX_TEXT_LINE octets a step (six times faster than
    splitting a 64 KiB chunk into lines).
    """
    start, end = 0, len(text)
    while end - start >= MAX_TEXT_LINE:
        newline = text.rfind(b"\n", start, start + MAX_TEXT_LINE)
        if newline < 0:
            return True
        start = newline + 1
    return False


class DataReader:
    """Reads one DATA stream after the 354, in chunks, to its CRLF.CRLF end.

    ``feed`` returns None while the end has not been seen, then the bytes
    that followed the end (pipelined commands).  Message bytes, dot-unstuffed,
    go to ``sink`` as long as nothing is wrong; after the first problem the
    reader stops storing but keeps every check running, so the verdict
    (``refusal``) is the same however the stream is split.

    Invariant: ``_pending`` starts at the beginning of a line (unless
    ``_midline``, after a too long line was dropped) and holds no CRLF.
    """

    dot_stuffed = True  # DATA: a leading "." of a line is transparency (RFC 5321 4.5.2)

    def __init__(self, sink: Callable[[bytes], None], max_size: int) -> None:
        self._sink = sink
        self._max_size = max_size
        self._pending = b""
        self._midline = False
        self._in_headers = True
        self.size = 0  # octets of the message after dot-unstuffing
        self.received_headers = 0
        self.bare_newline = False
        self.nul = False
        self.too_long = False
        self.oversize = False

    @property
    def failed(self) -> bool:
        return self.bare_newline or self.nul or self.too_long or self.oversize or self.received_headers > MAX_RECEIVED

    def refusal(self) -> Optional[Reply]:
        """The reply refusing the message, by fixed precedence; None when it is fine."""
        if self.bare_newline:
            return BARE_NEWLINE_DATA
        if self.nul:
            return NUL_IN_DATA
        if self.too_long:
            return LINE_TOO_LONG_DATA
        if self.oversize:
            return SIZE_EXCEEDED
        if self.received_headers > MAX_RECEIVED:
            return TOO_MANY_HOPS
        return None

    def feed(self, data: bytes) -> Optional[bytes]:
        """Consume ``data``; None until the end of data, then the bytes behind it."""
        buf = self._pending + data if self._pending else data
        last = buf.rfind(b"\r\n")
        if last < 0:
            self._pending = buf
            self._check_overlong()
            return None
        complete, self._pending = buf[: last + 2], buf[last + 2:]
        # One scan tells whether any line after the first starts with ".": in most
        # chunks none does, and then there is neither an end nor a dot to remove.
        dots = complete.find(b"\r\n.") >= 0
        end = self._find_end(complete) if dots or complete.startswith(b".") else -1
        if end >= 0:
            self._consume(complete[:end])
            rest = complete[end + 3:] + self._pending
            self._pending = b""
            return rest
        self._consume(complete, dots)
        self._check_overlong()
        return None

    def _find_end(self, complete: bytes) -> int:
        """Offset of the ``.CRLF`` end line in ``complete`` (which starts a line), or -1."""
        if not self._midline and complete.startswith(b".\r\n"):
            return 0
        i = complete.find(b"\r\n.\r\n")
        return -1 if i < 0 else i + 2

    def _consume(self, region: bytes, dots: bool = True) -> None:
        """Check and store whole lines (``region`` is empty or ends with CRLF).

        ``dots`` False: no line after the first starts with "." (nothing to unstuff there).
        """
        if not region:
            return
        lines = region.count(b"\r\n")
        if region.count(b"\r") != lines or region.count(b"\n") != lines:
            self.bare_newline = True
        if b"\0" in region:
            self.nul = True
        if self.dot_stuffed and not self._midline and region.startswith(b"."):
            region = region[1:]
        self._midline = False
        text = region.replace(b"\r\n.", b"\r\n") if dots else region
        if len(text) >= MAX_TEXT_LINE and _has_long_line(text):
            self.too_long = True
        if self._in_headers:
            self._count_received(text)
        self.size += len(text)
        if self.size > self._max_size:
            self.oversize = True
        if not self.failed:
            self._sink(text)

    def _count_received(self, text: bytes) -> None:
        if text.startswith(b"\r\n"):
            self._in_headers = False
            return
        end = text.find(b"\r\n\r\n")
        if end >= 0:
            self._in_headers = False
            text = text[: end + 2]
        self.received_headers += len(_RECEIVED_FIELD.findall(text))

    def _check_overlong(self) -> None:
        """A partial line already longer than any allowed line: note it and drop it."""
        pending = self._pending
        if len(pending) <= MAX_TEXT_LINE:
            return
        self.too_long = True
        if b"\n" in pending or b"\r" in pending[:-1]:
            self.bare_newline = True
        if b"\0" in pending:
            self.nul = True
        self.size += len(pending)
        if self.size > self._max_size:
            self.oversize = True
        self._pending = b"\r" if pending.endswith(b"\r") else b""
        self._midline = True


class ChunkReader(DataReader):
    """Reads a BDAT message (RFC 3030), chunk by chunk, with the checks of DATA.

    BDAT content is not dot-stuffed and has no end line: ``feed_chunk`` takes
    any part of it, ``finish`` ends it after the last chunk.  The same limits
    (size, line length, NUL, loop count) apply, and a bare CR or LF is
    refused as in DATA, so what is queued is CRLF text that a next hop
    speaking only DATA reads exactly as sent.  A message whose last line has
    no CRLF gets one.
    """

    dot_stuffed = False

    def feed_chunk(self, data: bytes) -> None:
        buf = self._pending + data if self._pending else data
        last = buf.rfind(b"\r\n")
        if last < 0:
            self._pending = buf
        else:
            complete, self._pending = buf[: last + 2], buf[last + 2:]
            self._consume(complete, dots=False)
        self._check_overlong()

    def finish(self) -> None:
        """The last chunk is in: a final line without CRLF is ended with one."""
        pending, self._pending = self._pending, b""
        if pending:
            self._consume(pending + b"\r\n", dots=False)


class HeaderCompleter:
    """Adds the Message-ID and Date fields a submitted message lacks (RFC 6409 8.2, 8.3).

    Sits between the DataReader and the queue file, which receive whole
    lines: the header section is held back (up to ``MAX_HEADER_BUFFER``
    octets) until its end is seen (an empty line, a line that is not a
    header field, or the end of data), then the missing fields are written
    before it, that is right after our Received header, and the rest
    streams through.  A header section longer than the limit is passed on
    unchanged.
    """

    def __init__(self, sink: Callable[[bytes], None], missing: Callable[[set[bytes]], bytes]) -> None:
        self._sink = sink
        self._missing = missing
        self._held: list[bytes] = []
        self._held_size = 0
        self._names: set[bytes] = set()
        self._done = False
        self.added = b""

    def write(self, text: bytes) -> None:
        if self._done:
            self._sink(text)
            return
        start = 0
        while start < len(text):
            end = text.find(b"\r\n", start)
            end = len(text) if end < 0 else end + 2
            line = text[start:end]
            if not self._header_line(line):
                self._held.append(text[:start])
                self.finish()
                self._sink(text[start:])
                return
            start = end
        self._held.append(text)
        self._held_size += len(text)
        if self._held_size > MAX_HEADER_BUFFER:
            self._release(b"")

    def finish(self) -> None:
        """The header section is complete: write the missing fields and what was held."""
        if not self._done:
            self.added = self._missing(self._names)
            self._release(self.added)

    def _release(self, prefix: bytes) -> None:
        self._done = True
        held, self._held = b"".join(self._held), []
        if prefix or held:
            self._sink(prefix + held)

    def _header_line(self, line: bytes) -> bool:
        if line[:1] in (b" ", b"\t"):
            return bool(self._names)  # a continuation of the previous field
        name, colon, _ = line.partition(b":")
        if not colon or not name or any(c <= 32 or c >= 127 for c in name):
            return False
        self._names.add(name.lower())
        return True
