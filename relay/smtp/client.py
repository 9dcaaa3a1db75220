"""The outbound ESMTP client: one connection to one next hop, several transactions.

This module owns the client side of RFC 5321 as relay speaks it: the
greeting, EHLO (HELO when EHLO is refused), STARTTLS (RFC 3207) with the TLS
policy of the route, AUTH PLAIN/LOGIN (RFC 4954), pipelined transactions
(RFC 2920), the MAIL parameters SIZE (RFC 1870), BODY=8BITMIME (RFC 6152) and
SMTPUTF8 (RFC 6531), and the message itself, streamed from the spool through
a pull producer with dot-stuffing that holds across every chunk boundary
(``relay.smtp.stream``).  The peer's replies are read by ``relay.smtp.response``.

It knows nothing of the queue or of routing: the delivery module opens a
connection with ``relay.smtp.connect.connect``, hands ``Transaction`` values
to ``send`` and gets back one ``Reply`` per recipient (``TransactionResult``),
or a ``SessionError`` when the connection itself could not carry the mail
(the values live in ``relay.smtp.transaction``).

Why not ``twisted.mail.smtp``'s client: it dot-stuffs per 16 KiB chunk and so
misses a "." line that falls on a chunk boundary, and it has no pipelining and
no SIZE/8BITMIME/SMTPUTF8 parameters.
"""

from __future__ import annotations

import base64
import collections
import io
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITLSTransport
from relay.log import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from relay.domains import to_ascii
from relay.smtp import dsn, set_nodelay, write_now
from relay.envelope import OUTCOME_TRANSIENT, TLS_REQUIRE, TLS_VERIFY
from relay.outcome import LocalReply, Reason, classify
from relay.smtp.replies import Reply
from relay.smtp.response import MAX_REPLY_LENGTH, MalformedReply, ReplyReader, Response, describe, parse_capabilities
from relay.smtp.transaction import (
    REPLY_BAD_ADDRESS,
    REPLY_NO_8BITMIME,
    REPLY_NO_SMTPUTF8,
    REPLY_NUL,
    STAGE_AUTH,
    STAGE_EHLO,
    STAGE_GREETING,
    STAGE_LOST,
    STAGE_READY,
    STAGE_STARTTLS,
    STAGE_TIMEOUT,
    TEXT_TOO_BIG,
    ClientOptions,
    SessionError,
    Transaction,
    TransactionResult,
)
from relay.smtp.stream import CHUNK_SIZE, CRLF, END_OF_DATA, MessageProducer, NulInMessage
from relay.smtp.tls import CertificateCheck, tls_failure
from relay.trust import TrustStore

log = Logger()

# -- the protocol -----------------------------------------------------------------


@dataclass
class _Pending:
    """A reply we wait for: what it answers, how long to wait, who handles it."""

    what: str
    timeout: float
    handler: Callable[[Response], None]


@dataclass
class _TxnState:
    """The progress of the transaction in flight."""

    transaction: Transaction
    deferred: Deferred
    pipelined: bool
    rset: Optional[Response] = None
    mail: Optional[Response] = None
    rcpt: dict[int, Response] = field(default_factory=dict)
    replies: dict[str, Reply] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)


class SMTPClientProtocol(LineReceiver):
    """One outbound SMTP connection, a state machine driven by the replies.

    ``ready`` fires with the protocol once the session can carry mail
    (greeting, EHLO or HELO, STARTTLS and EHLO again, AUTH, as the options
    say) or errbacks with a ``SessionError``.  ``send`` runs one transaction
    (RSET first when the connection was used before); ``quit`` ends the
    session.  ``busy`` is true during a transaction, ``closed`` once the
    connection cannot be used any more.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_REPLY_LENGTH

    def __init__(self, options: ClientOptions, host: str, clock: IReactorTime) -> None:
        self.options = options
        self.host = host
        self.clock = clock
        self.ready: Deferred = Deferred()
        self.capabilities: dict[str, str] = {}
        self.busy = False
        self.closed = False
        self.tls = ""
        self.chunk_size = CHUNK_SIZE
        self._pending: collections.deque[_Pending] = collections.deque()
        self._replies = ReplyReader()
        self._timer = None
        self._stage = STAGE_GREETING
        self._setup_done = False
        self._tls_started = False
        self._used = False
        self._txn: Optional[_TxnState] = None
        self._quit_d: Optional[Deferred] = None
        self._source: Optional[BinaryIO] = None
        self._dead = False
        self._tls_check: Optional[CertificateCheck] = None

    # -- connection events ---------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        log.debug("connected to {host} [{address}]:{port}", host=self.host, address=getattr(peer, "host", "-"),
                  port=getattr(peer, "port", "-"), event="connect_out")
        set_nodelay(self.transport)
        self._expect("greeting", self.options.timeouts.greeting, self._on_greeting)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        log.debug("{host}: connection closed", host=self.host, event="disconnect_out")
        self.closed = True
        if self._dead:
            return
        if self._stage == STAGE_STARTTLS:
            checked = getattr(self._tls_check, "failed", None)
            kind, why = tls_failure(checked, reason, self.options.tls_hostname or self.host)
            log.warn("{host}: {why}", host=self.host, why=why)
            self._fail(SessionError(None, True, STAGE_STARTTLS, why, kind), drop=False)
            return
        self._fail(SessionError(None, True, STAGE_LOST, f"connection to {self.host} lost"), drop=False)

    def lineReceived(self, line: bytes) -> None:
        if self._dead:
            return
        try:
            response = self._replies.line(line)
            if response is not None:
                self._dispatch(response)
        except MalformedReply as e:
            self._protocol_error(str(e))
        except Exception:
            log.failure("error handling a reply from {host}", host=self.host)
            self._protocol_error("internal error handling a reply")

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self._dead:
            self._protocol_error("reply line too long")

    # -- replies -------------------------------------------------------------

    def _dispatch(self, response: Response) -> None:
        if not self._pending:
            if response.code == 421:
                self._peer_closing(response)
            else:
                self._protocol_error("unexpected reply")
            return
        pending = self._pending.popleft()
        self._cancel_timer()
        if self._pending:
            self._arm(self._pending[0].timeout, self._pending[0].what)
        pending.handler(response)

    def _expect(self, what: str, timeout: float, handler: Callable[[Response], None]) -> None:
        self._pending.append(_Pending(what, timeout, handler))
        if len(self._pending) == 1:
            self._arm(timeout, what)

    def _command(self, line: bytes, what: str, timeout: float, handler: Callable[[Response], None]) -> None:
        """Send one command and wait for its reply."""
        self._commands([(line, what, timeout, handler)])

    def _commands(self, commands: list[tuple[bytes, str, float, Callable[[Response], None]]]) -> None:
        """Send commands in one write (a pipelined group) and wait for each reply in order."""
        for _, what, timeout, handler in commands:
            self._expect(what, timeout, handler)
        write_now(self.transport, b"".join(line + CRLF for line, _, _, _ in commands))

    # -- timers --------------------------------------------------------------

    def _arm(self, seconds: float, what: str, callback: Optional[Callable[[str], None]] = None) -> None:
        self._cancel_timer()
        self._timer = self.clock.callLater(seconds, callback or self._timed_out, what)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self, what: str) -> None:
        self._timer = None
        log.warn("{host}: timeout waiting for {what}", host=self.host, what=what)
        self._fail(SessionError(None, True, STAGE_TIMEOUT, f"timeout waiting for {what} from {self.host}"))

    def _idle_expired(self, what: str) -> None:
        self._timer = None
        log.debug("{host}: idle connection closed", host=self.host)
        self._dead = True
        self.closed = True
        self.transport.write(b"QUIT" + CRLF)
        self.transport.loseConnection()

    # -- failure -------------------------------------------------------------

    def _protocol_error(self, why: str) -> None:
        log.warn("{host}: protocol error: {why}", host=self.host, why=why)
        stage = self._stage if not self._setup_done else STAGE_LOST
        self._fail(SessionError(None, True, stage, f"protocol error from {self.host}: {why}", Reason.PROTOCOL))

    def _fail(self, error: SessionError, drop: bool = True) -> None:
        """The session is over: report ``error`` to whoever waits, drop the connection."""
        self._dead = True
        self.closed = True
        self._pending.clear()
        self._cancel_timer()
        txn, self._txn = self._txn, None
        quit_d, self._quit_d = self._quit_d, None
        self.busy = False
        if not self._setup_done:
            self._setup_done = True
            self.ready.errback(error)
        elif txn is not None:
            txn.deferred.errback(error)
        elif quit_d is not None:
            quit_d.callback(None)
        if drop and self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.loseConnection)()

    def _refuse_session(self, response: Response, stage: str) -> None:
        """A refusal at greeting/EHLO: SessionError, QUIT (unless 421), close."""
        reply = response.reply()
        log.info("{host}: {stage} refused: {reply}", host=self.host, stage=stage, reply=describe(reply))
        self._give_up(SessionError(reply, classify(reply.code) == OUTCOME_TRANSIENT, stage), quit=reply.code != 421)

    def _give_up(self, error: SessionError, quit: bool = True) -> None:
        """Fail the session politely: QUIT, then close after the write."""
        if quit:
            self.transport.write(b"QUIT" + CRLF)
        self._fail(error, drop=False)
        self.transport.loseConnection()

    # -- session set-up --------------------------------------------------------

    def _on_greeting(self, response: Response) -> None:
        if response.code != 220:
            self._refuse_session(response, STAGE_GREETING)
            return
        self._send_ehlo()

    def _send_ehlo(self) -> None:
        if self._stage != STAGE_STARTTLS:
            self._stage = STAGE_EHLO
        self._command(b"EHLO " + self._hostname(), "the reply to EHLO", self.options.timeouts.ehlo, self._on_ehlo)

    def _hostname(self) -> bytes:
        return to_ascii(self.options.hostname).encode("ascii") if not self.options.hostname.isascii() else self.options.hostname.encode("ascii")

    def _on_ehlo(self, response: Response) -> None:
        if self._stage == STAGE_STARTTLS:
            self._tls_established()
        if response.code == 250:
            self.capabilities = parse_capabilities(response.lines)
            self._after_hello()
        elif 500 <= response.code < 600 and not self._tls_started:
            self._command(b"HELO " + self._hostname(), "the reply to HELO", self.options.timeouts.ehlo, self._on_helo)
        else:
            self._refuse_session(response, STAGE_EHLO)

    def _on_helo(self, response: Response) -> None:
        if response.code != 250:
            self._refuse_session(response, STAGE_EHLO)
            return
        self.capabilities = {}
        self._after_hello()

    def _after_hello(self) -> None:
        if not self._tls_started:
            if "STARTTLS" in self.capabilities and (self.options.starttls or self._tls_required()):
                self._command(b"STARTTLS", "the reply to STARTTLS", self.options.timeouts.ehlo, self._on_starttls)
                return
            if self._tls_required():
                self._give_up(SessionError(None, True, STAGE_STARTTLS, f"{self.host} does not offer STARTTLS; TLS is required"))
                return
        self._authenticate()

    def _tls_required(self) -> bool:
        return self.options.tls in (TLS_REQUIRE, TLS_VERIFY)

    def _on_starttls(self, response: Response) -> None:
        if response.code != 220:
            if self._tls_required():
                self._give_up(SessionError(response.reply(), True, STAGE_STARTTLS, f"{self.host} refused STARTTLS"))
                return
            log.info("{host}: STARTTLS refused ({reply}); continuing in clear", host=self.host, reply=describe(response.reply()))
            self._authenticate()
            return
        try:
            if not ITLSTransport.providedBy(self.transport):
                raise ValueError("the transport cannot start TLS")
            context = self._tls_context()
        except Exception as e:  # a bad ca_file, an unusable name: never escape into the reactor
            log.error("{host}: cannot start TLS: {error}", host=self.host, error=str(e))
            self._fail(SessionError(None, True, STAGE_STARTTLS, f"cannot start TLS with {self.host}", Reason.TLS_SETUP))
            return
        self._stage = STAGE_STARTTLS
        self._tls_started = True
        self.capabilities = {}
        self.transport.startTLS(context)
        self._send_ehlo()

    def _tls_context(self):
        from twisted.internet import ssl

        if self.options.tls != TLS_VERIFY:
            return ssl.CertificateOptions(verify=False)
        trust = self.options.trust if self.options.trust is not None else TrustStore(self.options.ca_file)
        self._tls_check = CertificateCheck(self.options.tls_hostname or self.host, trust.root())
        return self._tls_check

    def _tls_established(self) -> None:
        self._stage = STAGE_EHLO
        try:
            handle = self.transport.getHandle()
            self.tls = f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"
        except Exception:
            self.tls = "TLS"
        log.info("{host}: TLS established: {tls}", host=self.host, tls=self.tls, event="tls", direction="out")

    def _authenticate(self) -> None:
        if not self.options.username:
            self._session_ready()
            return
        self._stage = STAGE_AUTH
        if not self._tls_started and not self.options.auth_in_clear:
            self._give_up(SessionError(None, True, STAGE_AUTH, f"not authenticating to {self.host} without TLS", Reason.AUTH_UNAVAILABLE))
            return
        mechanisms = self.capabilities.get("AUTH", "").upper().split()
        user = self.options.username.encode("utf-8")
        password = self.options.password.encode("utf-8")
        timeout = self.options.timeouts.ehlo
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            self._command(b"AUTH PLAIN " + token, "the reply to AUTH", timeout, self._on_auth)
        elif "LOGIN" in mechanisms:
            def on_password_prompt(response: Response) -> None:
                if response.code != 334:
                    self._on_auth(response)
                    return
                self._command(base64.b64encode(password), "the reply to AUTH", timeout, self._on_auth)

            def on_user_prompt(response: Response) -> None:
                if response.code != 334:
                    self._on_auth(response)
                    return
                self._command(base64.b64encode(user), "the AUTH LOGIN password prompt", timeout, on_password_prompt)

            self._command(b"AUTH LOGIN", "the AUTH LOGIN user name prompt", timeout, on_user_prompt)
        else:
            self._give_up(SessionError(None, True, STAGE_AUTH, f"{self.host} offers no AUTH mechanism relay supports", Reason.AUTH_UNAVAILABLE))

    def _on_auth(self, response: Response) -> None:
        if response.code != 235:
            reply = response.reply()
            log.error("{host}: authentication as {user} failed: {reply}", host=self.host, user=self.options.username, reply=describe(reply))
            self._give_up(SessionError(reply, True, STAGE_AUTH, f"authentication to {self.host} failed"))
            return
        log.info("{host}: authenticated as {user}", host=self.host, user=self.options.username)
        self._session_ready()

    def _session_ready(self) -> None:
        self._stage = STAGE_READY
        self._setup_done = True
        self._arm_idle()
        self.ready.callback(self)

    def _arm_idle(self) -> None:
        self._arm(self.options.timeouts.idle, "idle", self._idle_expired)

    # -- transactions ------------------------------------------------------------

    def send(self, transaction: Transaction) -> Deferred:
        """Run one mail transaction; fires with a TransactionResult or errbacks SessionError."""
        if self.closed or self._dead:
            return defer.fail(SessionError(None, True, STAGE_LOST, f"connection to {self.host} is closed"))
        if self.busy or not self._setup_done:
            raise RuntimeError("send() on a connection that is not ready")
        self.busy = True
        self._cancel_timer()
        try:
            synthesized = self._precheck(transaction)
            source = None if synthesized else transaction.open_message()
            if isinstance(source, io.BytesIO) and b"\0" in source.getvalue():
                source.close()
                synthesized, source = REPLY_NUL, None
        except OSError as e:
            log.error("{queue_id}: cannot read the queued message: {error}", queue_id=transaction.queue_id, error=str(e))
            self.busy = False
            self._arm_idle()
            return defer.fail(SessionError(None, True, STAGE_LOST, "cannot read the queued message", Reason.MESSAGE_UNREADABLE))
        if synthesized is not None:
            self.busy = False
            self._arm_idle()
            replies = {address: synthesized for address, _ in transaction.recipients}
            self._log_replies(transaction, replies)
            return defer.succeed(TransactionResult(replies, self.host, self.tls, self._dsn))
        state = _TxnState(transaction, Deferred(), pipelined="PIPELINING" in self.capabilities)
        self._txn = state
        self._source = source
        state.deferred.addBoth(self._close_source, source)
        self._start_transaction(state)
        return state.deferred

    def _close_source(self, result, source: BinaryIO):
        try:
            source.close()
        except OSError:
            pass
        return result

    def _precheck(self, transaction: Transaction) -> Optional[Reply]:
        """A reply for every recipient when the peer cannot take this message at all."""
        if transaction.smtputf8 and "SMTPUTF8" not in self.capabilities:
            return REPLY_NO_SMTPUTF8
        addresses = [transaction.sender] + [a for a, _ in transaction.recipients]
        addresses += [h for _, route in transaction.recipients for h in route]
        if any(_unsafe(a) for a in addresses):
            return REPLY_BAD_ADDRESS
        limit = self._size_limit()
        if limit and transaction.size > limit:
            return LocalReply(552, "5.3.4", TEXT_TOO_BIG.format(size=transaction.size, limit=limit), Reason.MESSAGE_TOO_BIG)
        if transaction.body.upper() == "8BITMIME" and "8BITMIME" not in self.capabilities:
            if not _is_7bit(transaction.open_message, self.chunk_size):
                return REPLY_NO_8BITMIME
        return None

    def _size_limit(self) -> int:
        if "SIZE" not in self.capabilities:
            return 0
        value = self.capabilities["SIZE"].split()
        return int(value[0]) if value and value[0].isdigit() else 0

    def _mail_command(self, transaction: Transaction) -> bytes:
        params = []
        if "SIZE" in self.capabilities:
            params.append(f"SIZE={transaction.size}")
        if transaction.body.upper() == "8BITMIME" and "8BITMIME" in self.capabilities:
            params.append("BODY=8BITMIME")
        if transaction.smtputf8 and "SMTPUTF8" in self.capabilities:
            params.append("SMTPUTF8")
        if self._dsn:
            params += dsn.mail_params_to_send(transaction.mail_params)
        line = f"MAIL FROM:<{transaction.sender}>" + "".join(" " + p for p in params)
        return line.encode("utf-8")

    def _start_transaction(self, state: _TxnState) -> None:
        """Pipelined: [RSET] MAIL RCPT... DATA in one write.  Otherwise one command at a time."""
        t = self.options.timeouts
        transaction = state.transaction
        commands = []
        if self._used:
            commands.append((b"RSET", "the reply to RSET", t.mail, self._on_rset))
        self._used = True
        if not state.pipelined:
            self._commands(commands or [self._mail_step()])
            return
        commands.append(self._mail_step())
        for i in range(len(transaction.recipients)):
            commands.append((self._rcpt_command(i), "the reply to RCPT", t.rcpt, self._rcpt_handler(i)))
        commands.append((b"DATA", "the reply to DATA", t.data_init, self._on_data))
        self._commands(commands)

    def _mail_step(self) -> tuple[bytes, str, float, Callable[[Response], None]]:
        line = self._mail_command(self._txn.transaction)
        return (line, "the reply to MAIL", self.options.timeouts.mail, self._on_mail)

    @property
    def _dsn(self) -> bool:
        return "DSN" in self.capabilities

    def _rcpt_command(self, index: int) -> bytes:
        """RCPT for recipient ``index`` of the transaction, with its DSN parameters when the peer has DSN."""
        transaction = self._txn.transaction
        address, route = transaction.recipients[index]
        line = _rcpt_command(address, route)
        if self._dsn:
            params = transaction.rcpt_params[index] if index < len(transaction.rcpt_params) else ()
            line += b"".join(b" " + p.encode("utf-8") for p in dsn.rcpt_params_to_send(params, address))
        return line

    def _rcpt_handler(self, index: int) -> Callable[[Response], None]:
        def handler(response: Response) -> None:
            self._on_rcpt(index, response)
        return handler

    def _on_rset(self, response: Response) -> None:
        state = self._txn
        state.rset = response
        if response.code // 100 != 2:
            self._fail(SessionError(response.reply(), True, STAGE_LOST, f"{self.host} refused RSET"))
            return
        if not state.pipelined:
            self._commands([self._mail_step()])

    def _on_mail(self, response: Response) -> None:
        state = self._txn
        state.mail = response
        if response.code == 421:
            self._server_closing(response)
            return
        if state.pipelined:
            return
        if response.code // 100 != 2:
            self._finish_all(response.reply())
            return
        self._send_rcpt(0)

    def _send_rcpt(self, index: int) -> None:
        self._command(self._rcpt_command(index), "the reply to RCPT", self.options.timeouts.rcpt, self._rcpt_handler(index))

    def _on_rcpt(self, index: int, response: Response) -> None:
        state = self._txn
        state.rcpt[index] = response
        if response.code == 421:
            self._server_closing(response)
            return
        if state.pipelined:
            return
        if index + 1 < len(state.transaction.recipients):
            self._send_rcpt(index + 1)
            return
        self._record_rcpts(state)
        if state.accepted:
            self._command(b"DATA", "the reply to DATA", self.options.timeouts.data_init, self._on_data)
        else:
            self._finish()

    def _record_rcpts(self, state: _TxnState) -> None:
        """Refused recipients get their RCPT reply; the others are accepted."""
        for i, (address, _) in enumerate(state.transaction.recipients):
            response = state.rcpt.get(i)
            if response is not None and response.code // 100 == 2:
                state.accepted.append(address)
            elif response is not None:
                state.replies[address] = response.reply()

    def _on_data(self, response: Response) -> None:
        state = self._txn
        if state.pipelined:
            if state.mail.code // 100 != 2:
                self._finish_all(state.mail.reply(), data=response)
                return
            self._record_rcpts(state)
            if not state.accepted:
                self._finish(data=response)
                return
        if response.code == 421:
            self._server_closing(response)
            return
        if response.code != 354:
            for address in state.accepted:
                state.replies[address] = response.reply()
            self._finish()
            return
        self._stream_message(state)

    def _stream_message(self, state: _TxnState) -> None:
        t = self.options.timeouts
        producer = MessageProducer(
            self._source, self.transport,
            progress=lambda: self._arm(t.data_block, "the peer to read the message data"),
            done=lambda: self._expect("the reply to the end of data", t.final_dot, self._on_final_dot),
            failed=self._read_failed,
            chunk_size=self.chunk_size,
            crlf_only=self._txn.transaction.crlf_only,
            whole=self._txn.transaction.crlf_only,
        )
        self._arm(t.data_block, "the peer to read the message data")
        producer.start()

    def _read_failed(self, error: BaseException) -> None:
        queue_id = self._txn.transaction.queue_id if self._txn else ""
        if isinstance(error, NulInMessage):
            log.error("{queue_id}: a NUL character in the message; connection to {host} dropped before the end of data",
                      queue_id=queue_id, host=self.host)
            self._fail(SessionError(REPLY_NUL, False, STAGE_LOST, "message contains a NUL character", Reason.NUL_CONTENT))
            return
        log.error("{queue_id}: cannot read the queued message: {error}; connection to {host} dropped", queue_id=queue_id, error=str(error), host=self.host)
        self._fail(SessionError(None, True, STAGE_LOST, "cannot read the queued message", Reason.MESSAGE_UNREADABLE))

    def _on_final_dot(self, response: Response) -> None:
        state = self._txn
        reply = response.reply()
        for address in state.accepted:
            state.replies[address] = reply
        if response.code == 421:
            self._server_closing(response)
            return
        self._finish()

    def _finish_all(self, reply: Reply, data: Optional[Response] = None) -> None:
        for address, _ in self._txn.transaction.recipients:
            self._txn.replies[address] = reply
        self._finish(data)

    def _finish(self, data: Optional[Response] = None) -> None:
        """End the transaction; a 354 to a pipelined DATA without recipients gets an empty message."""
        if data is not None and data.code == 354:
            self.transport.write(END_OF_DATA)
            self._expect("the reply to the end of data", self.options.timeouts.final_dot, lambda r: self._finish())
            return
        state, self._txn = self._txn, None
        self.busy = False
        self._log_replies(state.transaction, state.replies)
        if not self._dead:
            self._arm_idle()
        state.deferred.callback(TransactionResult(dict(state.replies), self.host, self.tls, self._dsn))

    def _server_closing(self, response: Response) -> None:
        """421 in a transaction: undecided recipients get it, and the connection is done."""
        state = self._txn
        reply = response.reply()
        for i, (address, _) in enumerate(state.transaction.recipients):
            refusal = state.rcpt.get(i)
            if refusal is not None and refusal.code // 100 != 2:
                state.replies[address] = refusal.reply()
            state.replies.setdefault(address, reply)
        self._dead = True
        self.closed = True
        self._pending.clear()
        self._cancel_timer()
        self._finish()
        self.transport.loseConnection()

    def _peer_closing(self, response: Response) -> None:
        """An unsolicited 421 (RFC 5321 3.8): the peer is closing; one line, no protocol error."""
        reply = response.reply()
        log.info("{host}: the peer closes the connection: {reply}", host=self.host, reply=describe(reply))
        if self._txn is not None or not self._setup_done:  # in the middle of the message data
            self._fail(SessionError(reply, True, STAGE_LOST, f"{self.host} closed the connection"))
            return
        self._dead = True
        self.closed = True
        self._cancel_timer()
        self.transport.loseConnection()

    def _log_replies(self, transaction: Transaction, replies: dict[str, Reply]) -> None:
        for address, reply in replies.items():
            log.debug(
                "{queue_id}: to <{recipient}> via {host}: {reply}",
                queue_id=transaction.queue_id, recipient=address, host=self.host, reply=describe(reply),
            )

    # -- the end -------------------------------------------------------------------

    def quit(self) -> Deferred:
        """Send QUIT and close; fires (with None) once the peer answered or went away."""
        if self.closed or self._dead:
            return defer.succeed(None)
        self.closed = True
        self._cancel_timer()
        d = self._quit_d = Deferred()

        def on_reply(response: Response) -> None:
            self._dead = True
            self._quit_d = None
            self._cancel_timer()
            self.transport.loseConnection()
            d.callback(None)

        self._command(b"QUIT", "the reply to QUIT", self.options.timeouts.mail, on_reply)
        return d


def _unsafe(address: str) -> bool:
    """True for an address that would break the command line it goes into."""
    return any(c in address for c in "\r\n<>\0")


def _rcpt_command(address: str, route: tuple[str, ...]) -> bytes:
    path = (",".join("@" + h for h in route) + ":" if route else "") + address
    return f"RCPT TO:<{path}>".encode("utf-8")


def _is_7bit(open_message: Callable[[], BinaryIO], chunk_size: int) -> bool:
    """True when every byte of the message is below 128."""
    with open_message() as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                return True
            if not chunk.isascii():
                return False
