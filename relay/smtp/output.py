"""The inbound session's output: its replies written in order, and the close after them.

Pipelining (RFC 2920): the session hands its replies to a ``ReplyWriter``
as it answers the commands of one read; they are collected and written
together when the read is done (or when the session waits for an answer
that is not ready), so they always leave in command order.  Past
``MAX_PENDING_REPLIES`` collected octets they are written at once, so one
read of many pipelined commands never builds one large buffer.

Before each write the writer's ``relay.smtp.flow.ReplyThrottle`` looks at
what the transport still holds: while the client does not read, the
session's input is paused (``blocked``) and resumed once it has drained.

Closing writes what is collected, lets the throttle go and asks the
transport to close after its buffer; a client that leaves its last replies
unread for ``CLOSE_GRACE`` seconds has the connection cut.  The session
injects the clock, how to pause and resume its input and how to name the
peer in the log.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from relay.log import Logger
from relay.smtp import write_now
from relay.smtp.flow import ReplyThrottle

log = Logger(namespace="relay.smtp.server")

MAX_PENDING_REPLIES = 1 << 16  # octets of replies collected before they are written out
CLOSE_GRACE = 30.0  # seconds a closed session's last replies may wait to be read before the connection is cut


class ReplyWriter:
    """Collects a session's replies, writes them in order under flow control, and closes after them."""

    def __init__(self, clock: IReactorTime, pause: Callable[[], None], resume: Callable[[], None],
                 peer: Callable[[], str]) -> None:
        self._clock = clock
        self._pause = pause  # stop reading from the client
        self._resume = resume  # reading may go on, as far as the output is concerned
        self._peer = peer
        self.transport: Any = None  # set when the connection is made
        self.closed = False  # closing (or lost): nothing more is read, what is collected is still written
        self.blocked = False  # input paused until the client reads its replies
        self._out: list[bytes] = []
        self._out_size = 0
        self._throttle = ReplyThrottle(self._backed_up, self._drained)
        self._cut: Optional[IDelayedCall] = None  # the timer cutting a closed connection whose replies are not read

    def queue(self, data: bytes) -> None:
        """Collect a reply; written at the end of the read, or now when many are collected."""
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= MAX_PENDING_REPLIES:
            self.flush()

    def flush(self) -> None:
        """Write what is collected, in one write."""
        if self._out:
            data, self._out, self._out_size = b"".join(self._out), [], 0
            if self.transport is not None:
                if not self.closed:
                    self._throttle.before_write(self.transport)
                write_now(self.transport, data)

    def _backed_up(self) -> None:
        """The transport holds more replies than it buffers: read nothing until they drain."""
        if not self.blocked and not self.closed:
            self.blocked = True
            self._pause()

    def _drained(self) -> None:
        if self.blocked:
            self.blocked = False
            self._resume()

    def release(self) -> None:
        """Stop the flow control (before STARTTLS); reading goes on if it was held for it."""
        self._throttle.release()
        self._drained()

    def close(self) -> None:
        """Write what is collected and close after it; cut the connection if it stays unread."""
        self.flush()
        if not self.closed:
            self.closed = True
            self._throttle.release()
            self.transport.loseConnection()
            if self._throttle.unsent(self.transport) > 0:
                self._cut = self._clock.callLater(CLOSE_GRACE, self._cut_connection)

    def cut(self) -> None:
        """Cut now a closed connection whose last replies are still unread (no grace any more)."""
        if self._cut is not None:
            self._cut.cancel()
            self._cut_connection()

    def lost(self) -> None:
        """The connection is gone: no cut to make; the session counts as closed."""
        if self._cut is not None:
            self._cut.cancel()
            self._cut = None
        self.closed = True

    def _cut_connection(self) -> None:
        self._cut = None
        log.info("cutting the connection from {peer}: its last replies were not read", peer=self._peer())
        self.transport.abortConnection()
