"""The outbound ESMTP client: one connection to one next hop, several transactions.

This module owns the client's session as relay speaks it (RFC 5321): the
connection, the replies awaited in order with their timeouts, the
greeting, EHLO (HELO when EHLO is refused), STARTTLS (RFC 3207) with the TLS
policy of the route, AUTH PLAIN/LOGIN (RFC 4954), reuse and QUIT.  Each
transaction is run by ``relay.smtp.exchange`` (pipelining, RFC 2920; the
MAIL parameters SIZE, RFC 1870, BODY=8BITMIME, RFC 6152, and SMTPUTF8, RFC
6531; the message streamed with dot-stuffing that holds across every chunk
boundary, ``relay.smtp.stream``).  The peer's replies are read by
``relay.smtp.response``.

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
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITLSTransport
from relay.log import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from relay.domains import to_ascii
from relay.smtp import set_nodelay, write_now
from relay.envelope import OUTCOME_TRANSIENT, TLS_REQUIRE, TLS_VERIFY
from relay.outcome import Reason, classify
from relay.smtp.exchange import MailExchange, Session, log_replies, precheck
from relay.smtp.response import MAX_REPLY_LENGTH, MalformedReply, ReplyReader, Response, describe, parse_capabilities
from relay.smtp.transaction import (
    REPLY_NUL,
    STAGE_AUTH,
    STAGE_EHLO,
    STAGE_GREETING,
    STAGE_LOST,
    STAGE_READY,
    STAGE_STARTTLS,
    STAGE_TIMEOUT,
    ClientOptions,
    SessionError,
    Transaction,
    TransactionResult,
)
from relay.smtp.stream import CHUNK_SIZE, CRLF
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
        self._exchange: Optional[MailExchange] = None
        self._quit_d: Optional[Deferred] = None
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
        exchange, self._exchange = self._exchange, None
        quit_d, self._quit_d = self._quit_d, None
        self.busy = False
        if not self._setup_done:
            self._setup_done = True
            self.ready.errback(error)
        elif exchange is not None:
            exchange.deferred.errback(error)
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
            synthesized = precheck(transaction, self.capabilities, self.chunk_size)
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
            log_replies(transaction, replies, self.host)
            return defer.succeed(TransactionResult(replies, self.host, self.tls, self._dsn))
        session = Session(
            self.host, self.tls, self.capabilities, self.options.timeouts, self.chunk_size, self.transport,
            commands=self._commands, expect=self._expect, arm=self._arm, fail=self._fail, ended=self._transaction_ended,
        )
        exchange = self._exchange = MailExchange(session, transaction, source)
        rset, self._used = self._used, True
        exchange.start(rset)
        return exchange.deferred

    def _transaction_ended(self, closing: bool) -> None:
        """The exchange in flight is over; ``closing``: it ended with a 421, so the connection is done."""
        self._exchange = None
        self.busy = False
        if closing:
            self._dead = True
            self.closed = True
            self._pending.clear()
            self._cancel_timer()
        elif not self._dead:
            self._arm_idle()

    @property
    def _dsn(self) -> bool:
        return "DSN" in self.capabilities

    def _peer_closing(self, response: Response) -> None:
        """An unsolicited 421 (RFC 5321 3.8): the peer is closing; one line, no protocol error."""
        reply = response.reply()
        log.info("{host}: the peer closes the connection: {reply}", host=self.host, reply=describe(reply))
        if self._exchange is not None or not self._setup_done:  # in the middle of the message data
            self._fail(SessionError(reply, True, STAGE_LOST, f"{self.host} closed the connection"))
            return
        self._dead = True
        self.closed = True
        self._cancel_timer()
        self.transport.loseConnection()

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
