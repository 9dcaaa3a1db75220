"""Flow control of replies: stop reading from a client that does not read what it is sent.

A client that pipelines commands without reading the replies would make
the transport buffer them without end.  ``ReplyThrottle`` is a streaming
producer that the session registers on its transport only while the
transport holds output the kernel has not taken: then Twisted's own
accounting applies (past the transport's ``bufferSize``, 64 KiB, it
pauses the producer; when the buffer has drained it resumes it), and the
session stops reading while paused.  Once the output drains the throttle
unregisters itself, so a session that keeps up writes with ``write_now``'s
direct send again.

It is never registered during a TLS handshake (the TLS layer pauses its
producer until the handshake is done, so input would stop for good), and
the session releases it before STARTTLS and before closing (a transport
with a producer does not close until the producer goes).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer


def pending_output(transport: Any) -> int:
    """Octets written to ``transport`` that the kernel has not taken yet.

    Known for TCP transports, with or without TLS (STARTTLS or an
    implicit-TLS listener); 0 for any other transport and during a TLS
    handshake.
    """
    inner = transport
    if isinstance(inner, TLSMemoryBIOProtocol):
        if not inner._handshakeDone:
            return 0
        inner = inner.transport
    if not isinstance(inner, FileDescriptor):
        return 0
    if getattr(inner, "TLS", False):
        tls = getattr(inner, "protocol", None)
        if isinstance(tls, TLSMemoryBIOProtocol) and not tls._handshakeDone:
            return 0
    return len(inner.dataBuffer) - inner.offset + inner._tempDataLen


@implementer(IPushProducer)
class ReplyThrottle:
    """Pauses a session's input while its transport holds more output than it will buffer."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None],
                 pending: Callable[[Any], int] = pending_output) -> None:
        self._pause = pause
        self._resume = resume
        self._pending = pending
        self._transport: Optional[Any] = None
        self.paused = False

    @property
    def registered(self) -> bool:
        return self._transport is not None

    def unsent(self, transport: Any) -> int:
        """Octets ``transport`` holds that the kernel has not taken (see ``pending_output``)."""
        return self._pending(transport)

    def before_write(self, transport: Any) -> None:
        """Call before each write: register while output is backed up, let go once it is not."""
        if self._transport is None:
            if self._pending(transport) > 0:
                transport.registerProducer(self, True)
                self._transport = transport
        elif not self.paused and self._pending(transport) == 0:
            self._unregister()

    def release(self) -> None:
        """Unregister without resuming the session (it closes, or starts TLS)."""
        self.paused = False
        self._unregister()

    def _unregister(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.unregisterProducer()

    # -- IPushProducer, called by the transport ---------------------------------

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self._pause()

    def resumeProducing(self) -> None:
        self._unregister()
        if self.paused:
            self.paused = False
            self._resume()

    def stopProducing(self) -> None:
        self._transport = None
        self.paused = False
