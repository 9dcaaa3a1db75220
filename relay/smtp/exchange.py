"""One mail transaction on a ready outbound session: from MAIL to the reply to the end of data.

This module owns the client's side of a transaction (RFC 5321 3.3): the
checks that let relay answer for a peer that cannot take a message at all
(``precheck``: SMTPUTF8, unsafe addresses, SIZE, 8BITMIME), the MAIL and
RCPT commands with their SIZE, BODY, SMTPUTF8 and DSN parameters, and
``MailExchange``, which sends [RSET] MAIL RCPT... DATA (in one write when
the peer pipelines, RFC 2920, else one command at a time), streams the
message through ``relay.smtp.stream`` and collects one reply per recipient.

An exchange acts on its connection only through a ``Session``: the facts of
the session and the few things it may do there (send commands, wait for a
reply, run the reply timer, end the session, say that it is over).  The
protocol (``relay.smtp.client``) owns the connection, the reply queue and
the timers, and builds the ``Session`` for each transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Optional

from twisted.internet.defer import Deferred

from relay.log import Logger
from relay.outcome import LocalReply, Reason
from relay.smtp import dsn
from relay.smtp.replies import Reply
from relay.smtp.response import Response, describe
from relay.smtp.stream import END_OF_DATA, MessageProducer, NulInMessage
from relay.smtp.transaction import (
    REPLY_BAD_ADDRESS,
    REPLY_NO_8BITMIME,
    REPLY_NO_SMTPUTF8,
    REPLY_NUL,
    STAGE_LOST,
    TEXT_TOO_BIG,
    ClientTimeouts,
    SessionError,
    Transaction,
    TransactionResult,
)

log = Logger()

Handler = Callable[[Response], None]
# A command to send: the line, what its reply answers (for the timeout message), how long to wait, who handles it.
Command = tuple[bytes, str, float, Handler]


# -- what the peer is sent, from the Transaction and the peer's capabilities -------


def precheck(transaction: Transaction, capabilities: dict[str, str], chunk_size: int) -> Optional[Reply]:
    """A reply for every recipient when the peer cannot take this message at all."""
    if transaction.smtputf8 and "SMTPUTF8" not in capabilities:
        return REPLY_NO_SMTPUTF8
    addresses = [transaction.sender] + [a for a, _ in transaction.recipients]
    addresses += [h for _, route in transaction.recipients for h in route]
    if any(_unsafe(a) for a in addresses):
        return REPLY_BAD_ADDRESS
    limit = _size_limit(capabilities)
    if limit and transaction.size > limit:
        return LocalReply(552, "5.3.4", TEXT_TOO_BIG.format(size=transaction.size, limit=limit), Reason.MESSAGE_TOO_BIG)
    if transaction.body_type.upper() == "8BITMIME" and "8BITMIME" not in capabilities:
        if not _is_7bit(transaction.open_message, chunk_size):
            return REPLY_NO_8BITMIME
    return None


def _size_limit(capabilities: dict[str, str]) -> int:
    if "SIZE" not in capabilities:
        return 0
    value = capabilities["SIZE"].split()
    return int(value[0]) if value and value[0].isdigit() else 0


def mail_command(transaction: Transaction, capabilities: dict[str, str]) -> bytes:
    """MAIL FROM with the parameters the peer advertises (the DSN ones only when it has DSN)."""
    params = []
    if "SIZE" in capabilities:
        params.append(f"SIZE={transaction.size}")
    if transaction.body_type.upper() == "8BITMIME" and "8BITMIME" in capabilities:
        params.append("BODY=8BITMIME")
    if transaction.smtputf8 and "SMTPUTF8" in capabilities:
        params.append("SMTPUTF8")
    if "DSN" in capabilities:
        params += dsn.mail_params_to_send(transaction.mail_params)
    line = f"MAIL FROM:<{transaction.sender}>" + "".join(" " + p for p in params)
    return line.encode("utf-8")


def rcpt_command(transaction: Transaction, index: int, capabilities: dict[str, str]) -> bytes:
    """RCPT for recipient ``index`` of the transaction, with its DSN parameters when the peer has DSN."""
    address, route = transaction.recipients[index]
    path = (",".join("@" + h for h in route) + ":" if route else "") + address
    line = f"RCPT TO:<{path}>".encode("utf-8")
    if "DSN" in capabilities:
        params = transaction.rcpt_params[index] if index < len(transaction.rcpt_params) else ()
        line += b"".join(b" " + p.encode("utf-8") for p in dsn.rcpt_params_to_send(params, address))
    return line


def _unsafe(address: str) -> bool:
    """True for an address that would break the command line it goes into."""
    return any(c in address for c in "\r\n<>\0")


def _is_7bit(open_message: Callable[[], BinaryIO], chunk_size: int) -> bool:
    """True when every byte of the message is below 128."""
    with open_message() as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                return True
            if not chunk.isascii():
                return False


def log_replies(transaction: Transaction, replies: dict[str, Reply], host: str) -> None:
    """One debug line per recipient: the reply ``host`` (or relay) gave it."""
    for address, reply in replies.items():
        log.debug(
            "{queue_id}: to <{recipient}> via {host}: {reply}",
            queue_id=transaction.queue_id, recipient=address, host=host, reply=describe(reply),
        )


# -- the exchange ----------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """What an exchange knows of its session and may do on it (built by ``SMTPClientProtocol``)."""

    host: str
    tls: str  # "TLSv1.3 TLS_AES_256_GCM_SHA384", or "" in clear
    capabilities: dict[str, str]
    timeouts: ClientTimeouts
    chunk_size: int
    transport: Any  # where the message data and the end of data are written
    commands: Callable[[list[Command]], None]  # send in one write, wait for each reply in order
    expect: Callable[[str, float, Handler], None]  # wait for one more reply
    arm: Callable[[float, str], None]  # (re)start the reply timer: waiting for what, how long
    fail: Callable[[SessionError], None]  # the session is over; the error goes to the exchange's deferred
    ended: Callable[[bool], None]  # the exchange is over (True: after a 421, the connection is done too)


class MailExchange:
    """One transaction: ``deferred`` fires with a TransactionResult or errbacks with a SessionError.

    ``source`` is the opened message; it is closed when the exchange ends.
    ``start`` sends the first commands; the replies drive the rest.
    """

    def __init__(self, session: Session, transaction: Transaction, source: BinaryIO) -> None:
        self._session = session
        self.transaction = transaction
        self._source = source
        self._pipelined = "PIPELINING" in session.capabilities
        self._mail: Optional[Response] = None
        self._rcpt: dict[int, Response] = {}
        self._replies: dict[str, Reply] = {}
        self._accepted: list[str] = []
        self.deferred: Deferred = Deferred()
        self.deferred.addBoth(_close_source, source)

    def start(self, rset: bool) -> None:
        """Pipelined: [RSET] MAIL RCPT... DATA in one write.  Otherwise one command at a time.

        ``rset``: the connection carried a transaction before, so RSET goes first.
        """
        t = self._session.timeouts
        commands: list[Command] = []
        if rset:
            commands.append((b"RSET", "the reply to RSET", t.mail, self._on_rset))
        if not self._pipelined:
            self._session.commands(commands or [self._mail_step()])
            return
        commands.append(self._mail_step())
        for i in range(len(self.transaction.recipients)):
            commands.append((self._rcpt_command(i), "the reply to RCPT", t.rcpt, self._rcpt_handler(i)))
        commands.append((b"DATA", "the reply to DATA", t.data_init, self._on_data))
        self._session.commands(commands)

    def _command(self, line: bytes, what: str, timeout: float, handler: Handler) -> None:
        self._session.commands([(line, what, timeout, handler)])

    def _mail_step(self) -> Command:
        line = mail_command(self.transaction, self._session.capabilities)
        return (line, "the reply to MAIL", self._session.timeouts.mail, self._on_mail)

    def _rcpt_command(self, index: int) -> bytes:
        return rcpt_command(self.transaction, index, self._session.capabilities)

    def _rcpt_handler(self, index: int) -> Handler:
        def handler(response: Response) -> None:
            self._on_rcpt(index, response)
        return handler

    def _on_rset(self, response: Response) -> None:
        if response.code // 100 != 2:
            self._session.fail(SessionError(response.reply(), True, STAGE_LOST, f"{self._session.host} refused RSET"))
            return
        if not self._pipelined:
            self._session.commands([self._mail_step()])

    def _on_mail(self, response: Response) -> None:
        self._mail = response
        if response.code == 421:
            self._server_closing(response)
            return
        if self._pipelined:
            return
        if response.code // 100 != 2:
            self._finish_all(response.reply())
            return
        self._send_rcpt(0)

    def _send_rcpt(self, index: int) -> None:
        self._command(self._rcpt_command(index), "the reply to RCPT", self._session.timeouts.rcpt, self._rcpt_handler(index))

    def _on_rcpt(self, index: int, response: Response) -> None:
        self._rcpt[index] = response
        if response.code == 421:
            self._server_closing(response)
            return
        if self._pipelined:
            return
        if index + 1 < len(self.transaction.recipients):
            self._send_rcpt(index + 1)
            return
        self._record_rcpts()
        if self._accepted:
            self._command(b"DATA", "the reply to DATA", self._session.timeouts.data_init, self._on_data)
        else:
            self._finish()

    def _record_rcpts(self) -> None:
        """Refused recipients get their RCPT reply; the others are accepted."""
        for i, (address, _) in enumerate(self.transaction.recipients):
            response = self._rcpt.get(i)
            if response is not None and response.code // 100 == 2:
                self._accepted.append(address)
            elif response is not None:
                self._replies[address] = response.reply()

    def _on_data(self, response: Response) -> None:
        if self._pipelined:
            if self._mail.code // 100 != 2:
                self._finish_all(self._mail.reply(), data=response)
                return
            self._record_rcpts()
            if not self._accepted:
                self._finish(data=response)
                return
        if response.code == 421:
            self._server_closing(response)
            return
        if response.code != 354:
            for address in self._accepted:
                self._replies[address] = response.reply()
            self._finish()
            return
        self._stream_message()

    def _stream_message(self) -> None:
        s = self._session
        t = s.timeouts
        producer = MessageProducer(
            self._source, s.transport,
            progress=lambda: s.arm(t.data_block, "the peer to read the message data"),
            done=lambda: s.expect("the reply to the end of data", t.final_dot, self._on_final_dot),
            failed=self._read_failed,
            chunk_size=s.chunk_size,
            crlf_only=self.transaction.crlf_only,
            whole=self.transaction.crlf_only,
        )
        s.arm(t.data_block, "the peer to read the message data")
        producer.start()

    def _read_failed(self, error: BaseException) -> None:
        queue_id, host = self.transaction.queue_id, self._session.host
        if isinstance(error, NulInMessage):
            log.error("{queue_id}: a NUL character in the message; connection to {host} dropped before the end of data",
                      queue_id=queue_id, host=host)
            self._session.fail(SessionError(REPLY_NUL, False, STAGE_LOST, "message contains a NUL character", Reason.NUL_CONTENT))
            return
        log.error("{queue_id}: cannot read the queued message: {error}; connection to {host} dropped", queue_id=queue_id, error=str(error), host=host)
        self._session.fail(SessionError(None, True, STAGE_LOST, "cannot read the queued message", Reason.MESSAGE_UNREADABLE))

    def _on_final_dot(self, response: Response) -> None:
        reply = response.reply()
        for address in self._accepted:
            self._replies[address] = reply
        if response.code == 421:
            self._server_closing(response)
            return
        self._finish()

    def _finish_all(self, reply: Reply, data: Optional[Response] = None) -> None:
        for address, _ in self.transaction.recipients:
            self._replies[address] = reply
        self._finish(data)

    def _finish(self, data: Optional[Response] = None) -> None:
        """End the transaction; a 354 to a pipelined DATA without recipients gets an empty message."""
        if data is not None and data.code == 354:
            self._session.transport.write(END_OF_DATA)
            self._session.expect("the reply to the end of data", self._session.timeouts.final_dot, lambda r: self._finish())
            return
        self._session.ended(False)
        self._report()

    def _server_closing(self, response: Response) -> None:
        """421 in a transaction: undecided recipients get it, and the connection is done."""
        reply = response.reply()
        for i, (address, _) in enumerate(self.transaction.recipients):
            refusal = self._rcpt.get(i)
            if refusal is not None and refusal.code // 100 != 2:
                self._replies[address] = refusal.reply()
            self._replies.setdefault(address, reply)
        self._session.ended(True)
        self._report()
        self._session.transport.loseConnection()

    def _report(self) -> None:
        s = self._session
        log_replies(self.transaction, self._replies, s.host)
        self.deferred.callback(TransactionResult(dict(self._replies), s.host, s.tls, "DSN" in s.capabilities))


def _close_source(result: Any, source: BinaryIO) -> Any:
    try:
        source.close()
    except OSError:
        pass
    return result
