"""The inbound ESMTP server: one ``SMTPServerProtocol`` per connection, and its factory.

The protocol parses commands, enforces the limits, asks the relay policy
(``relay.policy.RelayPolicy``) about each recipient and hands each message to
the spool; it knows nothing of storage or routing.  It is a LineReceiver that
dispatches per state (command lines, DATA stream) and per verb (``do_MAIL``,
``do_RCPT`` ...).

Pipelining (RFC 2920): replies are collected while one read is processed and
written together.  When an answer is not ready (an asynchronous policy check,
the spool's commit), line delivery and the transport are paused until it is
written, so replies always come in command order.

DATA is read in raw mode by ``DataReader``, chunk by chunk with bytes methods
(no per-line Python loop): only CRLF.CRLF ends the data; bare CR or LF, text
lines over 1000 octets, streams over the size limit and more than 100
Received headers are noticed, the stream is read to its real end and then
refused; nothing of a refused message is kept.  The outcome and the stored
bytes do not depend on how the stream is split into reads.

A ``250`` to the end of DATA is sent only when the spool's commit has fired
(the message is durable); a failed commit answers ``451``.
"""

from __future__ import annotations

import datetime
from email.utils import format_datetime
from typing import Any, Callable, Optional, Union

from twisted.internet import address as _address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from relay.config import ServerConfig
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.policy import RelayPolicy
from relay.smtp import replies as R
from relay.smtp.address import parse_params, parse_path, split_argument
from relay.smtp.replies import Reply

log = Logger(namespace="relay.smtp.server")

MAX_COMMAND_LINE = 512  # octets including CRLF (RFC 5321 4.5.3.1.4)
MAX_TEXT_LINE = 1000  # octets including CRLF (RFC 5321 4.5.3.1.6)
MAX_RECEIVED = 100  # more Received headers than this: a mail loop (RFC 5321 6.3)

BODY_7BIT = "7BIT"
BODY_8BITMIME = "8BITMIME"

Answer = Union[Optional[Reply], Deferred]


# -- the DATA stream ---------------------------------------------------------------


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

    def __init__(self, sink: Callable[[bytes], None], max_size: int) -> None:
        self._sink = sink
        self._max_size = max_size
        self._pending = b""
        self._midline = False
        self._in_headers = True
        self.size = 0  # octets of the message after dot-unstuffing
        self.received_headers = 0
        self.bare_newline = False
        self.too_long = False
        self.oversize = False

    @property
    def failed(self) -> bool:
        return self.bare_newline or self.too_long or self.oversize or self.received_headers > MAX_RECEIVED

    def refusal(self) -> Optional[Reply]:
        """The reply refusing the message, by fixed precedence; None when it is fine."""
        if self.bare_newline:
            return R.BARE_NEWLINE_DATA
        if self.too_long:
            return R.LINE_TOO_LONG_DATA
        if self.oversize:
            return R.SIZE_EXCEEDED
        if self.received_headers > MAX_RECEIVED:
            return R.TOO_MANY_HOPS
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
        end = self._find_end(complete)
        if end >= 0:
            self._consume(complete[:end])
            rest = complete[end + 3:] + self._pending
            self._pending = b""
            return rest
        self._consume(complete)
        self._check_overlong()
        return None

    def _find_end(self, complete: bytes) -> int:
        """Offset of the ``.CRLF`` end line in ``complete`` (which starts a line), or -1."""
        if not self._midline and complete.startswith(b".\r\n"):
            return 0
        i = complete.find(b"\r\n.\r\n")
        return -1 if i < 0 else i + 2

    def _consume(self, region: bytes) -> None:
        """Check and store whole lines (``region`` is empty or ends with CRLF)."""
        if not region:
            return
        lines = region.count(b"\r\n")
        if region.count(b"\r") != lines or region.count(b"\n") != lines:
            self.bare_newline = True
        if not self._midline and region.startswith(b"."):
            region = region[1:]
        self._midline = False
        text = region.replace(b"\r\n.", b"\r\n")
        if len(text) >= MAX_TEXT_LINE and max(map(len, text.split(b"\r\n"))) > MAX_TEXT_LINE - 2:
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
        head = text.lower()
        self.received_headers += head.count(b"\r\nreceived:") + head.startswith(b"received:")

    def _check_overlong(self) -> None:
        """A partial line already longer than any allowed line: note it and drop it."""
        pending = self._pending
        if len(pending) <= MAX_TEXT_LINE:
            return
        self.too_long = True
        if b"\n" in pending or b"\r" in pending[:-1]:
            self.bare_newline = True
        self.size += len(pending)
        if self.size > self._max_size:
            self.oversize = True
        self._pending = b"\r" if pending.endswith(b"\r") else b""
        self._midline = True


# -- the session ---------------------------------------------------------------------


class _Transaction:
    """What MAIL and RCPT collected; cleared by RSET, HELO/EHLO, STARTTLS and end of DATA."""

    def __init__(self, sender: str, body: str, smtputf8: bool, params: tuple) -> None:
        self.sender = sender
        self.body = body
        self.smtputf8 = smtputf8
        self.params = params
        self.recipients: list[Recipient] = []


class SMTPServerProtocol(LineReceiver, TimeoutMixin):
    """One inbound SMTP session."""

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_COMMAND_LINE - 2  # LineReceiver counts without the delimiter

    factory: "SMTPServerFactory"

    def __init__(self, factory: "SMTPServerFactory") -> None:
        self.factory = factory
        self.hostname = factory.hostname
        self.config: ServerConfig = factory.config
        self.clock: IReactorTime = factory.clock
        self.callLater = self.clock.callLater  # TimeoutMixin schedules on the injected clock
        self.helo: Optional[str] = None
        self.esmtp = False
        self.tls = False
        self.auth_user = ""
        self.peer_host = ""
        self.peer_port = 0
        self.trusted = False
        self.errors = 0
        self._transaction: Optional[_Transaction] = None
        self._message: Any = None  # the spool's IncomingMessage during DATA
        self._reader: Optional[DataReader] = None
        self._out: list[bytes] = []
        self._closed = False
        self._counted = False
        self._discarding = False  # dropping the rest of an overlong command line
        self._discard_cr = False
        self._reprocess = False
        self._waiting = False
        self._reason = ""  # why the current command is refused, for the log
        self._stored = 0  # octets written for the current message
        self._write_failed = False

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        if isinstance(peer, (_address.IPv4Address, _address.IPv6Address)):
            self.peer_host, self.peer_port = peer.host, peer.port
        self.trusted = self.factory.policy.is_trusted(self.peer_host) if self.peer_host else False
        if not self.factory.session_opened(self):
            log.warn("refused connection from {peer}: too many sessions", peer=self._peer())
            self._send(R.too_many_connections(self.hostname))
            self._close()
            return
        self._counted = True
        log.info("connect from {peer}", peer=self._peer())
        self.setTimeout(self.config.idle_timeout)
        self._send(R.greeting(self.hostname))
        self._flush()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        self._abort_message()
        self._closed = True
        if self._counted:
            self._counted = False
            self.factory.session_closed(self)
            log.info("disconnect from {peer}", peer=self._peer())

    def timeoutConnection(self) -> None:
        log.info("timeout after {state} from {peer}", state=self._state_name(), peer=self._peer())
        self._abort_message()
        self._send(R.idle_timeout(self.hostname))
        self._close()

    def _peer(self) -> str:
        return f"[{self.peer_host}]:{self.peer_port}" if self.peer_host else "unknown"

    def _state_name(self) -> str:
        if self._reader is not None:
            return "DATA"
        if self._transaction is not None:
            return "MAIL"
        return "HELO" if self.helo else "CONNECT"

    # -- output --------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes())
        if reply.code in R.PROTOCOL_ERROR_CODES:
            self.errors += 1
            if self.errors >= self.config.max_errors and not self._closed:
                log.warn("too many errors from {peer}", peer=self._peer())
                self._out.append(R.too_many_errors(self.hostname).to_bytes())
                self._close()

    def _flush(self) -> None:
        if self._out:
            data, self._out = b"".join(self._out), []
            if self.transport is not None:
                self.transport.write(data)

    def _close(self) -> None:
        self._flush()
        if not self._closed:
            self._closed = True
            self.setTimeout(None)
            self.clearLineBuffer()
            self.transport.loseConnection()

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            if data:
                self.resetTimeout()
            if self._discarding and data:
                data = self._discard_overlong(data)
            super().dataReceived(data)
            while self._reprocess and not self.paused and not self._closed:
                self._reprocess = False
                super().dataReceived(b"")
        except Exception:
            log.failure("unexpected error from {peer}", peer=self._peer())
            self._abort_message()
            self._send(R.INTERNAL_ERROR)
            self._close()
        finally:
            self._flush()

    def lineLengthExceeded(self, line: bytes) -> None:
        """Answer 500 5.5.6 and drop the overlong line up to its CRLF; go on after it."""
        log.info("line too long from {peer}", peer=self._peer())
        self._send(R.LINE_TOO_LONG)
        end = line.find(b"\r\n")
        if end < 0:
            self._discarding = True
            self._discard_cr = line.endswith(b"\r")
        else:
            self._buffer = line[end + 2:]
            self._reprocess = True

    def _discard_overlong(self, data: bytes) -> bytes:
        if self._discard_cr and data.startswith(b"\n"):
            rest = data[1:]
        else:
            end = data.find(b"\r\n")
            if end < 0:
                self._discard_cr = data.endswith(b"\r")
                return b""
            rest = data[end + 2:]
        self._discarding = self._discard_cr = False
        return rest

    def lineReceived(self, line: bytes) -> None:
        if self._closed:
            return
        self._reason = ""
        try:
            answer = self._command(line)
        except Exception:
            log.failure("error handling a command from {peer}", peer=self._peer())
            answer = R.INTERNAL_ERROR
        if isinstance(answer, Reply) and answer.code >= 400:
            self._log_refusal(line, answer)
        self._answer(answer)

    def _log_refusal(self, line: bytes, reply: Reply) -> None:
        verb = line[:12].split(b" ", 1)[0].decode("ascii", "replace").upper() or "empty line"
        log.info("{verb} refused from {peer}: {reply}{reason}", verb=verb, peer=self._peer(),
                 reply=str(reply), reason=f" ({self._reason})" if self._reason else "")

    def _answer(self, answer: Answer) -> None:
        """Send a reply now, or pause input until a Deferred reply has been sent."""
        if not isinstance(answer, Deferred):
            if answer is not None:
                self._send(answer)
            return
        fired: list[bool] = []

        def deliver(reply: Optional[Reply]) -> None:
            fired.append(True)
            if self._closed:
                return
            if reply is not None:
                self._send(reply if isinstance(reply, Reply) else R.INTERNAL_ERROR)
            if self._waiting:
                self._waiting = False
                self._flush()
                self.resumeProducing()

        def failed(failure: Failure) -> Reply:
            log.failure("error answering {peer}", failure, peer=self._peer())
            return R.INTERNAL_ERROR

        answer.addErrback(failed).addCallback(deliver).addErrback(
            lambda f: log.failure("error replying to {peer}", f, peer=self._peer()))
        if not fired and not self._closed:
            self._waiting = True
            self._flush()
            self.pauseProducing()

    def resumeProducing(self) -> None:
        if self._closed:
            return
        super().resumeProducing()

    def _command(self, line: bytes) -> Answer:
        if b"\r" in line or b"\n" in line:
            return R.BARE_NEWLINE_COMMAND
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return R.BAD_UTF8_COMMAND
        verb, _, argument = text.partition(" ")
        handler = getattr(self, "do_" + verb.upper(), None) if verb.isascii() and verb.isalpha() else None
        if handler is None:
            return R.UNKNOWN_COMMAND
        return handler(argument)

    # -- verbs ---------------------------------------------------------------

    def do_HELO(self, argument: str) -> Answer:
        name = argument.strip()
        if not _valid_helo(name):
            return R.SYNTAX_HELO
        self._greeted(name, esmtp=False)
        return R.helo_reply(self.hostname)

    def do_EHLO(self, argument: str) -> Answer:
        name = argument.strip()
        if not _valid_helo(name):
            return R.SYNTAX_EHLO
        self._greeted(name, esmtp=True)
        return R.ehlo_reply(self.hostname, self._extensions())

    def _greeted(self, name: str, esmtp: bool) -> None:
        self.helo = name
        self.esmtp = esmtp
        self._transaction = None

    def _extensions(self) -> list[str]:
        extensions = ["PIPELINING", f"SIZE {self.config.max_message_size}"]
        if self.factory.tls_context is not None and not self.tls:
            extensions.append("STARTTLS")
        extensions += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        return extensions

    def do_MAIL(self, argument: str) -> Answer:
        if self.helo is None:
            return R.NEED_HELO
        if self.factory.submission and not self.auth_user:
            return R.AUTH_REQUIRED
        if self._transaction is not None:
            return R.NESTED_MAIL
        if argument[:5].upper() != "FROM:":
            return R.SYNTAX_MAIL
        try:
            path_text, params_text = split_argument(argument[5:])
        except ValueError as e:
            self._reason = str(e)
            return R.BAD_SENDER
        try:
            params = parse_params(params_text)
        except ValueError as e:
            self._reason = str(e)
            return R.SYNTAX_PARAMS
        if params and not self.esmtp:
            return R.UNSUPPORTED_PARAM
        options = self._mail_options(params)
        if isinstance(options, Reply):
            return options
        body, smtputf8, others = options
        try:
            path = parse_path(path_text, smtputf8)
        except ValueError as e:
            self._reason = str(e)
            return R.BAD_SENDER
        self._transaction = _Transaction(path.mailbox, body, smtputf8, others)
        return R.SENDER_OK

    def _mail_options(self, params: list) -> Union[Reply, tuple[str, bool, tuple]]:
        body, smtputf8, others = BODY_7BIT, False, []
        for keyword, value in params:
            if keyword == "SIZE":
                if value is None or not value.isdigit() or not value.isascii():
                    return R.BAD_SIZE
                if int(value) > self.config.max_message_size:
                    return R.SIZE_EXCEEDED
            elif keyword == "BODY":
                if value is None or value.upper() not in (BODY_7BIT, BODY_8BITMIME):
                    return R.BAD_BODY
                body = value.upper()
            elif keyword == "SMTPUTF8":
                if value is not None:
                    return R.BAD_SMTPUTF8
                smtputf8 = True
            else:
                return R.UNSUPPORTED_PARAM
        return body, smtputf8, tuple(others)

    def do_RCPT(self, argument: str) -> Answer:
        transaction = self._transaction
        if transaction is None:
            return R.NEED_MAIL
        if argument[:3].upper() != "TO:":
            return R.SYNTAX_RCPT
        try:
            path_text, params_text = split_argument(argument[3:])
            params = parse_params(params_text)
        except ValueError as e:
            self._reason = str(e)
            return R.BAD_RECIPIENT
        if params:
            return R.UNSUPPORTED_PARAM
        try:
            path = parse_path(path_text, transaction.smtputf8)
        except ValueError as e:
            self._reason = str(e)
            return R.BAD_RECIPIENT
        if path.is_null:
            return R.NULL_RECIPIENT
        if len(transaction.recipients) >= self.config.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        recipient = Recipient(address=path.mailbox, source_route=path.source_route, params=tuple(params))
        answer = maybeDeferred(
            self.factory.policy.check_recipient, self.client_info(), transaction.sender, recipient)
        answer.addCallback(self._recipient_checked, transaction, recipient)
        return answer

    def _recipient_checked(self, refusal: Optional[Reply], transaction: _Transaction,
                           recipient: Recipient) -> Reply:
        if refusal is not None and not isinstance(refusal, Reply):
            log.error("policy answered {answer!r} for <{recipient}>, not a Reply",
                      answer=refusal, recipient=recipient.address)
            return R.INTERNAL_ERROR
        if refusal is not None and refusal.code >= 400:
            log.info("refused recipient <{recipient}> from {peer}: {reply}",
                     recipient=recipient.address, peer=self._peer(), reply=str(refusal))
            return refusal
        if transaction is self._transaction and all(
                r.address != recipient.address for r in transaction.recipients):
            transaction.recipients.append(recipient)
        return R.RECIPIENT_OK

    def do_DATA(self, argument: str) -> Answer:
        transaction = self._transaction
        if transaction is None:
            return R.NEED_MAIL
        if not transaction.recipients:
            return R.NEED_RCPT
        if argument:
            return R.SYNTAX_DATA
        message = self.factory.spool.new_message()
        self._message = message
        self._reader = DataReader(self._store, self.config.max_message_size)
        self._stored = 0
        self._write_failed = False
        self._store(self._received_header(message.queue_id, transaction))
        self.setRawMode()
        return R.START_DATA

    def do_RSET(self, argument: str) -> Answer:
        if argument.strip():
            return R.SYNTAX_RSET
        self._transaction = None
        return R.OK

    def do_NOOP(self, argument: str) -> Answer:
        return R.OK

    def do_VRFY(self, argument: str) -> Answer:
        return R.VRFY_REPLY

    def do_HELP(self, argument: str) -> Answer:
        return R.HELP_REPLY

    def do_QUIT(self, argument: str) -> Answer:
        self._send(R.BYE)
        self._close()
        return None

    def do_STARTTLS(self, argument: str) -> Answer:
        if self.factory.tls_context is None:
            return R.NOT_IMPLEMENTED
        if self.tls:
            return R.ALREADY_TLS
        if argument:
            return R.SYNTAX_STARTTLS
        # Anything pipelined behind STARTTLS arrived in clear: never execute it.
        discarded = self.clearLineBuffer()
        if discarded:
            log.warn("discarded {count} octets sent behind STARTTLS by {peer}",
                     count=len(discarded), peer=self._peer())
        self._send(R.READY_TLS)
        self._flush()
        self.transport.startTLS(self.factory.tls_context)
        self.tls = True
        self.helo = None
        self.esmtp = False
        self._transaction = None
        return None

    # -- DATA ----------------------------------------------------------------

    def rawDataReceived(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:  # not reached: raw mode is only set with a reader
            self.setLineMode(data)
            return
        rest = reader.feed(data)
        if rest is None:
            return
        self._reader = None
        answer = self._end_of_data(reader)
        self._answer(answer)
        # Back to commands: what followed the end of data is read as command
        # lines by LineReceiver's loop (once the reply is out, if it pauses).
        self.line_mode = 1
        self._buffer = rest + self._buffer

    def _store(self, data: bytes) -> None:
        self._stored += len(data)
        if self._write_failed:
            return
        try:
            self._message.write(data)
        except Exception:
            log.failure("{queue_id}: cannot write the queue file", queue_id=self._message.queue_id)
            self._write_failed = True

    def _end_of_data(self, reader: DataReader) -> Answer:
        message, transaction = self._message, self._transaction
        self._message, self._transaction = None, None
        assert transaction is not None
        queue_id = message.queue_id
        refusal = reader.refusal()
        if refusal is None and self._write_failed:
            refusal = R.QUEUE_WRITE_ERROR
        if refusal is not None:
            message.abort()
            log.info("{queue_id}: refused message from {peer} <{sender}>: {reply}",
                     queue_id=queue_id, peer=self._peer(), sender=transaction.sender, reply=str(refusal))
            return refusal
        envelope = self._envelope(queue_id, transaction, self._stored)
        try:
            committed = message.commit(envelope)
        except Exception:
            log.failure("{queue_id}: commit failed", queue_id=queue_id)
            return R.QUEUE_WRITE_ERROR
        return committed.addCallbacks(self._committed, self._commit_failed,
                                      callbackArgs=(envelope,), errbackArgs=(envelope,))

    def _committed(self, result: Any, envelope: Envelope) -> Reply:
        log.info("{queue_id}: accepted from {peer} <{sender}>, {count} recipients, {size} octets",
                 queue_id=envelope.queue_id, peer=self._peer(), sender=envelope.sender,
                 count=len(envelope.recipients), size=envelope.size)
        return R.queued(envelope.queue_id)

    def _commit_failed(self, failure: Failure, envelope: Envelope) -> Reply:
        log.failure("{queue_id}: queue file write error, message refused", failure,
                    queue_id=envelope.queue_id)
        return R.QUEUE_WRITE_ERROR

    def _abort_message(self) -> None:
        message, self._message, self._reader = self._message, None, None
        if message is not None:
            try:
                message.abort()
            except Exception:
                log.failure("{queue_id}: abort failed", queue_id=message.queue_id)

    # -- envelope and trace --------------------------------------------------

    def protocol_name(self, smtputf8: bool = False) -> str:
        """RFC 3848 / RFC 6531 ``with`` keyword: SMTP, ESMTP, ESMTPS, ESMTPSA, UTF8SMTPS..."""
        if not self.esmtp:
            return "SMTP"
        name = "UTF8SMTP" if smtputf8 else "ESMTP"
        return name + ("S" if self.tls else "") + ("A" if self.auth_user else "")

    def client_info(self, smtputf8: bool = False) -> ClientInfo:
        """Who the client is, as the policy and the envelope see it."""
        return ClientInfo(
            address=self.peer_host, port=self.peer_port, helo=self.helo or "",
            protocol=self.protocol_name(smtputf8), trusted=self.trusted,
            auth_user=self.auth_user, tls=self._tls_description() if self.tls else "",
        )

    def _tls_description(self) -> str:
        try:
            handle = self.transport.getHandle()
            version, cipher = handle.get_protocol_version_name(), handle.get_cipher_name()
        except Exception:
            return "TLS"
        return f"{version} {cipher}" if version and cipher else "TLS"

    def _envelope(self, queue_id: str, transaction: _Transaction, size: int) -> Envelope:
        return Envelope(
            queue_id=queue_id, sender=transaction.sender,
            recipients=tuple(transaction.recipients),
            client=self.client_info(transaction.smtputf8),
            arrival=self.clock.seconds(), size=size, body=transaction.body,
            smtputf8=transaction.smtputf8, mail_params=transaction.params,
        )

    def _received_header(self, queue_id: str, transaction: _Transaction) -> bytes:
        ip = self.peer_host or "unknown"
        literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        line = (f"Received: from {self.helo} ({literal} {literal})\r\n"
                f"\tby {self.hostname} (relay) with {self.protocol_name(transaction.smtputf8)}"
                f" id {queue_id}\r\n")
        if len(transaction.recipients) == 1:
            return (line + f"\tfor <{transaction.recipients[0].address}>; {self._date()}\r\n").encode("utf-8")
        return (line[:-2] + f";\r\n\t{self._date()}\r\n").encode("utf-8")

    def _date(self) -> str:
        moment = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
        return format_datetime(moment)


def _valid_helo(name: str) -> bool:
    """A HELO/EHLO argument: one non-empty word of printable characters."""
    return bool(name) and all(c.isprintable() and not c.isspace() for c in name)


# -- the factory ---------------------------------------------------------------------


class SMTPServerFactory(ServerFactory):
    """Builds one SMTPServerProtocol per connection and counts the live sessions."""

    protocol = SMTPServerProtocol

    def __init__(self, hostname: str, config: ServerConfig, spool: Any, policy: RelayPolicy,
                 clock: IReactorTime, tls_context: Any = None, submission: bool = False) -> None:
        self.hostname = hostname
        self.config = config
        self.spool = spool
        self.policy = policy
        self.clock = clock
        self.tls_context = tls_context
        self.submission = submission
        self.sessions = 0

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        return SMTPServerProtocol(self)

    def session_opened(self, session: SMTPServerProtocol) -> bool:
        """Count a new session; False when it is over ``max_sessions`` (not counted then)."""
        if self.sessions >= self.config.max_sessions:
            return False
        self.sessions += 1
        return True

    def session_closed(self, session: SMTPServerProtocol) -> None:
        self.sessions -= 1
