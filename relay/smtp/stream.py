"""The outbound message stream: dot-stuffing and the pull producer that sends a message.

``DotStuffer`` applies SMTP transparency (RFC 5321 4.5.2) over a stream cut
into arbitrary chunks; ``MessageProducer`` streams a stored message through
it to the transport, one chunk per request, and ends it with the
end-of-data line.  A NUL in the message stops the stream (``NulInMessage``)
before the data is ended, so nothing is delivered.
"""

from __future__ import annotations

import io
import re
from typing import BinaryIO, Callable, Optional

from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from relay.smtp import write_now

CRLF = b"\r\n"
END_OF_DATA = b".\r\n"

# Chunk size of the message producer; tests make it small to move the chunk
# boundaries around.
CHUNK_SIZE = 64 * 1024

_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class DotStuffer:
    """Transparency (RFC 5321 4.5.2) over a stream cut into arbitrary chunks.

    A line starting with "." gets one more ".".  The state "at the start of a
    line" and a trailing CR are carried from one chunk to the next, so a "."
    line is stuffed wherever the chunk boundaries fall.  Bare CR and bare LF
    become CRLF: only CRLF ever goes on the wire.  With ``crlf_only`` the
    source is known to hold no bare CR or LF (the queue store holds nothing
    else: the server refuses them), and the scan for them is skipped.
    """

    def __init__(self, crlf_only: bool = False) -> None:
        self._at_line_start = True
        self._pending_cr = False
        self._crlf_only = crlf_only

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        if not self._crlf_only:
            crlf = chunk.count(b"\r\n")
            if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
                chunk = _BARE_LINE_END.sub(b"\r\n", chunk)
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        """The end of the data: a CRLF if the last line lacks one, then ".\\r\\n"."""
        tail = b""
        if self._pending_cr:
            tail = CRLF
            self._pending_cr = False
            self._at_line_start = True
        if not self._at_line_start:
            tail += CRLF
        self._at_line_start = True
        return tail + END_OF_DATA


class NulInMessage(Exception):
    """A NUL in a message being streamed: the data must not be ended (nothing is delivered)."""


@implementer(IPullProducer)
class MessageProducer:
    """Streams a message file to a consumer, dot-stuffed, one chunk per request.

    Registered as a pull producer, so the transport asks for the next chunk
    only when its buffer drained: a slow server slows the reading down.
    ``progress`` is called on every chunk (the DATA block timer);
    ``done`` once the end-of-data has been written, ``failed`` with the
    exception when the file cannot be read (nothing more is written then).
    With ``whole``, a message already in memory (``io.BytesIO``, as the queue
    store hands out all but large messages) goes out in one write with its
    end-of-data, without a reactor turn per chunk.
    """

    def __init__(
        self,
        source: BinaryIO,
        consumer,
        progress: Callable[[], None],
        done: Callable[[], None],
        failed: Callable[[BaseException], None],
        chunk_size: Optional[int] = None,
        crlf_only: bool = False,
        whole: bool = False,
    ) -> None:
        self._source = source
        self._consumer = consumer
        self._progress = progress
        self._done = done
        self._failed = failed
        self._chunk_size = chunk_size or CHUNK_SIZE
        self._stuffer = DotStuffer(crlf_only)
        self._finished = False
        self._registered = False
        self._whole = whole

    def start(self) -> None:
        if isinstance(self._source, io.BytesIO) and self._whole:  # in memory: one write, no reactor turns
            self._end(self._stuffer.feed(self._source.getvalue()))
            return
        self._registered = True
        self._consumer.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self._finished:
            return
        self._progress()
        try:
            while True:
                chunk = self._source.read(self._chunk_size)
                if not chunk:
                    self._end()
                    return
                if b"\0" in chunk:
                    raise NulInMessage()
                data = self._stuffer.feed(chunk)
                if len(chunk) < self._chunk_size:  # a short read is the end: one write with the dot
                    self._end(data)
                    return
                if data:
                    self._consumer.write(data)
                    return
        except (OSError, NulInMessage) as e:
            self._stop()
            self._registered = False
            self._consumer.unregisterProducer()
            self._failed(e)

    def stopProducing(self) -> None:
        self._stop()

    def _end(self, data: bytes = b"") -> None:
        self._stop()
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()
        write_now(self._consumer, data + self._stuffer.finish())
        self._done()

    def _stop(self) -> None:
        if not self._finished:
            self._finished = True
            try:
                self._source.close()
            except OSError:
                pass
