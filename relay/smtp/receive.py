"""The message of an inbound transaction as it arrives, until the queue has it.

``MessageReceiver`` is the session's helper for DATA and BDAT (RFC 3030):
it opens the queued message with our Received header, feeds the octets to
a ``relay.smtp.data.DataReader`` (DATA) or ``ChunkReader`` (BDAT chunks),
keeps the chunk bookkeeping and the DATA deadline (``min_data_rate``),
completes a submitted message's header, and at the end of the message
either refuses it (nothing is kept) or commits it with its envelope.  The
answer to the end of data is a Deferred that fires with ``250`` only once
the spool's commit has fired (the message is durable), ``451`` when the
commit fails.

The session drives it: it says when DATA or a chunk starts, hands it the
raw octets, and gets back an ``Ending`` (the answer, the octets that
followed, whether the transaction is over) when a stream or chunk is read.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from twisted.python.failure import Failure

from relay.envelope import ClientInfo, Envelope
from relay.log import Logger
from relay.seams import IncomingMessage
from relay.smtp import trace
from relay.smtp.data import ChunkReader, DataReader, HeaderCompleter
from relay.smtp.replies import (
    NEED_MAIL,
    NEED_RCPT,
    QUEUE_WRITE_ERROR,
    Answer,
    Reply,
    chunk_received,
    queued,
)
from relay.smtp.inbound import Transaction

if TYPE_CHECKING:
    from relay.smtp.factory import SMTPServerFactory

# The sessions' own namespace: operators filter the inbound listener's lines by it.
log = Logger(namespace="relay.smtp.server")


class Ending(NamedTuple):
    """A DATA stream or BDAT chunk read to its end."""

    answer: Answer
    rest: bytes  # the octets that followed it: command lines again
    ended: bool  # the message is complete or refused: the transaction is over


class MessageReceiver:
    """The message of one session's current transaction, from DATA or the first BDAT to the queue."""

    def __init__(self, factory: "SMTPServerFactory", client_info: Callable[[bool], ClientInfo],
                 peer: Callable[[], str]) -> None:
        self.factory = factory
        self.config = factory.config
        self.clock = factory.clock
        self._client_info = client_info
        self._peer = peer
        self.reader: Optional[DataReader] = None  # during DATA
        self.chunks: Optional[ChunkReader] = None  # the BDAT message of this transaction
        self.chunk_left = 0  # octets of the current BDAT chunk still to read
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_refusal: Optional[Reply] = None  # the chunk is read and dropped, then refused
        self.time_left = 0.0  # the session's timeout while the message streams in
        self._deadline = 0.0  # when the stream must have progressed (clock time)
        self._message: Optional[IncomingMessage] = None
        self._transaction: Optional[Transaction] = None
        self._client: Optional[ClientInfo] = None
        self._completer: Optional[HeaderCompleter] = None
        self._stored = 0  # octets written for the current message
        self._write_failed = False

    @property
    def reading(self) -> bool:
        """Raw octets are expected: a DATA stream or the rest of a BDAT chunk."""
        return self.reader is not None or self.chunk_left > 0

    @property
    def in_chunks(self) -> bool:
        """A BDAT message is under way (or the octets of a chunk are being read)."""
        return self.chunks is not None or self.chunk_left > 0

    # -- starting ----------------------------------------------------------------

    def start_data(self, transaction: Transaction) -> None:
        """The 354 is sent: the DATA stream of ``transaction`` follows."""
        self.reader = self._begin_message(transaction, DataReader)
        self._restart_deadline()

    def start_chunk(self, transaction: Optional[Transaction], size: int, last: bool) -> None:
        """``BDAT size [LAST]``: the next ``size`` octets are a chunk (read and dropped when it cannot be taken)."""
        refusal = NEED_MAIL if transaction is None else (NEED_RCPT if not transaction.recipients else None)
        if refusal is None and self.chunks is None:
            assert transaction is not None
            self.chunks = self._begin_message(transaction, ChunkReader)
        self._chunk_refusal = refusal
        self.chunk_left, self._chunk_size, self._chunk_last = size, size, last
        self._restart_deadline()

    def _begin_message(self, transaction: Transaction, reader: type) -> Any:
        """Start the queued message of ``transaction`` (its Received header first); the reader that fills it."""
        message = self.factory.spool.new_message()
        self._message, self._transaction = message, transaction
        self._client = self._client_info(transaction.smtputf8)
        sink = self._store
        self._completer = None
        if self.factory.submission:
            self._completer = HeaderCompleter(self._store, self._missing_fields(message.queue_id))
            sink = self._completer.write
        self._stored = 0
        self._write_failed = False
        self._store(self._received_header(message.queue_id, transaction, self._client))
        return reader(sink, self.config.max_message_size)

    def _missing_fields(self, queue_id: str) -> Callable[[set[bytes]], bytes]:
        """The Message-ID and Date fields a submitted message lacks, given its field names."""
        def missing(names: set[bytes]) -> bytes:
            fields = b""
            if b"message-id" not in names:
                moment = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
                fields += f"Message-ID: <{moment:%Y%m%d%H%M%S}.{queue_id}@{self.factory.hostname}>\r\n".encode("ascii")
            if b"date" not in names:
                fields += f"Date: {self._date()}\r\n".encode("ascii")
            return fields
        return missing

    def _received_header(self, queue_id: str, transaction: Transaction, client: ClientInfo) -> bytes:
        comments = trace.received_comments(client.tls, client.auth_user if self.config.received_auth else "")
        return trace.received_header(client.helo, client.address, self.factory.hostname, client.protocol,
                                     queue_id, [r.address for r in transaction.recipients], self._date(), comments)

    def _date(self) -> str:
        return self.factory.date_text(self.clock.seconds())

    # -- the octets ----------------------------------------------------------------

    def feed(self, data: bytes) -> Optional[Ending]:
        """Raw octets of the message; an Ending when the DATA stream or the chunk is read to its end."""
        if self.chunk_left:
            return self._chunk_data(data)
        reader = self.reader
        assert reader is not None
        self._progress(len(data))
        rest = reader.feed(data)
        if rest is None:
            return None
        self.reader = None
        return Ending(self._end_of_data(reader), rest, True)

    def _chunk_data(self, data: bytes) -> Optional[Ending]:
        """Octets of a BDAT chunk: to the message (or dropped); the chunk's answer once it is complete."""
        take, rest = data[: self.chunk_left], data[self.chunk_left:]
        self.chunk_left -= len(take)
        self._progress(len(take))
        if self._chunk_refusal is None and self.chunks is not None:
            self.chunks.feed_chunk(take)
        if self.chunk_left:
            return None
        ending = self.chunk_done()
        return ending._replace(rest=rest)

    def chunk_done(self) -> Ending:
        """The current BDAT chunk is read: its answer (the message's, for the last one)."""
        self.chunk_left = 0
        if self._chunk_refusal is not None:
            refusal, self._chunk_refusal = self._chunk_refusal, None
            return Ending(refusal, b"", False)
        if not self._chunk_last:
            return Ending(chunk_received(self._chunk_size), b"", False)
        reader, self.chunks = self.chunks, None
        assert reader is not None
        reader.finish()
        return Ending(self._end_of_data(reader), b"", True)

    def _restart_deadline(self) -> None:
        timeout = self.factory.timeout()
        self._deadline = self.clock.seconds() + timeout
        self.time_left = timeout

    def _progress(self, octets: int) -> None:
        """Move the DATA deadline (Postfix's smtpd_min_data_rate): ``octets`` more earn octets / min_data_rate s.

        The time since the last chunk is spent from what is left, and what
        is left never exceeds the timeout (idle_timeout, shorter under load):
        a stream slower than min_data_rate octets per second times out,
        however it is split.
        """
        now = self.clock.seconds()
        earned = octets / self.config.min_data_rate
        self.time_left = min(self.factory.timeout(), max(0.0, self._deadline - now) + earned)
        self._deadline = now + self.time_left

    def _store(self, data: bytes) -> None:
        self._stored += len(data)
        if self._write_failed:
            return
        assert self._message is not None
        try:
            self._message.write(data)
        except Exception:
            log.failure("{queue_id}: cannot write the queue file", queue_id=self._message.queue_id)
            self._write_failed = True

    # -- the end -------------------------------------------------------------------

    def _end_of_data(self, reader: DataReader) -> Answer:
        refusal: Optional[Reply] = reader.refusal()
        completer, self._completer = self._completer, None
        if refusal is None and completer is not None:
            self._complete_header(completer)
        message, transaction, client = self._message, self._transaction, self._client
        self._message, self._transaction, self._client = None, None, None
        assert message is not None and transaction is not None and client is not None
        queue_id = message.queue_id
        if refusal is None and self._write_failed:
            refusal = QUEUE_WRITE_ERROR
        if refusal is not None:
            message.abort()
            log.info("{queue_id}: refused message from {peer} <{sender}>: {reply}",
                     queue_id=queue_id, peer=self._peer(), sender=transaction.sender, reply=str(refusal),
                     event="rejected", stage="data")
            return refusal
        envelope = self._envelope(queue_id, transaction, client, self._stored)
        try:
            committed = message.commit(envelope)
        except Exception:
            log.failure("{queue_id}: commit failed", queue_id=queue_id)
            return QUEUE_WRITE_ERROR
        return committed.addCallbacks(self._committed, self._commit_failed,
                                      callbackArgs=(envelope,), errbackArgs=(envelope,))

    def _complete_header(self, completer: HeaderCompleter) -> None:
        """Write what the completer held back, with the fields it adds (submission only)."""
        completer.finish()
        if completer.added:
            assert self._message is not None
            names = [field.partition(b":")[0].decode("ascii") for field in completer.added.splitlines()]
            log.info("{queue_id}: added {fields}", queue_id=self._message.queue_id, fields=" and ".join(names))

    def _envelope(self, queue_id: str, transaction: Transaction, client: ClientInfo, size: int) -> Envelope:
        return Envelope(
            queue_id=queue_id, sender=transaction.sender,
            recipients=tuple(transaction.recipients), client=client,
            arrival=self.clock.seconds(), size=size, body_type=transaction.body_type,
            smtputf8=transaction.smtputf8, mail_params=transaction.params,
        )

    def _committed(self, result: Any, envelope: Envelope) -> Reply:
        log.info("{queue_id}: accepted from {peer} <{sender}>, {count} recipients, {size} octets",
                 queue_id=envelope.queue_id, peer=self._peer(), sender=envelope.sender,
                 count=len(envelope.recipients), size=envelope.size, event="accepted")
        return queued(envelope.queue_id)

    def _commit_failed(self, failure: Failure, envelope: Envelope) -> Reply:
        log.failure("{queue_id}: queue file write error, message refused", failure,
                    queue_id=envelope.queue_id)
        return QUEUE_WRITE_ERROR

    def drop_chunks(self) -> None:
        """The transaction is reset: a BDAT message begun in it is dropped."""
        if self.chunks is not None:
            self.abort()

    def abort(self) -> None:
        """Drop the message in progress, if any (the session ends or the transaction is reset)."""
        message, self._message, self.reader = self._message, None, None
        self.chunks = None
        self._transaction = self._client = None
        if message is not None:
            try:
                message.abort()
            except Exception:
                log.failure("{queue_id}: abort failed", queue_id=message.queue_id)
