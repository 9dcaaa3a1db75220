"""The inbound ESMTP session: one ``SMTPServerProtocol`` per connection.

Its factory (admission, live sessions, shutdown) is ``relay.smtp.factory``.

The protocol parses commands, enforces the limits, asks the relay policy
(``relay.policy.RelayPolicy``) about each recipient and hands each message to
the spool; it knows nothing of storage or routing.  It is a LineReceiver that
dispatches per state (command lines, DATA stream) and per verb (``do_MAIL``,
``do_RCPT`` ...).  The mail transaction MAIL and RCPT build, with its
parameter and policy checks, is ``relay.smtp.inbound``'s.

Pipelining (RFC 2920): the replies of one read leave together and in
command order through the session's ``relay.smtp.output.ReplyWriter``
(which also bounds them, holds input while the client does not read, and
closes after them).  When an answer is not ready (an asynchronous policy
check, the spool's commit), line delivery and the transport are paused
until it is written.

DATA and BDAT chunks are read in raw mode and handed to the session's
``relay.smtp.receive.MessageReceiver`` (the stream, its deadline, the
commit before 250).  The factory (``relay.smtp.factory``) admits sessions
under the limits of ``relay.smtp.limits``.  A command line must come
whole within the timeout (``load_idle_timeout`` under load) and within
its length (``relay.smtp.lines``).

The session decides when a verb is allowed and what it changes: HELO/EHLO
(``relay.smtp.ehlo``), STARTTLS (RFC 3207: what was pipelined behind it is
dropped, the dialogue starts again), AUTH (RFC 4954, offered with a portal
on a TLS session unless ``auth_in_clear``; ``relay.smtp.sasl``), MAIL only
after AUTH on a submission listener (RFC 6409), ETRN (RFC 1985,
``relay.smtp.etrn``) from a trusted or authenticated client.  The
factory's ``stopping()`` makes every session answer 421 4.3.2 and close,
letting a message in DATA finish first.
"""

from __future__ import annotations

import enum
from functools import lru_cache
from typing import TYPE_CHECKING, Optional, Union

from twisted.internet import address as _address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from relay.config import ServerConfig
from relay.envelope import ClientInfo
from relay.log import Logger, escape_controls
from relay.metrics import reply_in
from relay.smtp import set_nodelay, trace
from relay.smtp.ehlo import extensions, offered_verbs, read_helo
from relay.smtp.etrn import etrn
from relay.smtp.inbound import Refusal, Transactions, read_mail, read_rcpt
from relay.smtp.limits import client_key
from relay.smtp.lines import OverlongLine, too_long, too_long_unfinished
from relay.smtp.output import ReplyWriter
from relay.smtp.receive import Ending, MessageReceiver
from relay.smtp.replies import (
    ALREADY_TLS, AUTH_FAILED, AUTH_IN_TRANSACTION, AUTH_NEEDS_TLS, AUTH_NEED_EHLO, AUTH_NOT_ENABLED,
    AUTH_REQUIRED, AUTH_TWICE, BAD_UTF8_COMMAND, BARE_NEWLINE_COMMAND, BDAT_THEN_DATA, BYE, ETRN_IN_TRANSACTION,
    INTERNAL_ERROR, LINE_TOO_LONG, NEED_HELO, NEED_MAIL, NEED_RCPT, NESTED_MAIL, NOT_IMPLEMENTED, OK,
    PROTOCOL_ERROR_CODES, READY_TLS, START_DATA, SYNTAX_BDAT, SYNTAX_DATA, SYNTAX_EHLO, SYNTAX_HELO,
    SYNTAX_RSET, SYNTAX_STARTTLS, UNKNOWN_COMMAND, VRFY_REPLY, Answer, Reply, ehlo_reply, greeting, helo_reply,
    help_reply, idle_timeout, shutting_down, too_many_auth_failures, too_many_errors,
)
from relay.smtp.sasl import MAX_AUTH_LINE, Authenticator

if TYPE_CHECKING:
    from relay.smtp.factory import SMTPServerFactory

log = Logger(namespace="relay.smtp.server")

_MESSAGE_VERBS = ("MAIL", "RCPT", "DATA", "BDAT")  # a refusal of these is a rejected message (metrics)


# -- the session ---------------------------------------------------------------------


class SessionState(enum.Enum):
    """The stage of an SMTP session; its value is the name logged (e.g. "timeout after MAIL")."""

    CONNECT = "CONNECT"  # greeted, no HELO/EHLO yet
    HELO = "HELO"  # HELO/EHLO given, no transaction
    MAIL = "MAIL"  # MAIL accepted: RCPT and DATA expected
    DATA = "DATA"  # reading the message after the 354
    BDAT = "BDAT"  # a message coming in BDAT chunks (RFC 3030)


class SMTPServerProtocol(LineReceiver, TimeoutMixin):
    """One inbound SMTP session."""

    delimiter = b"\r\n"
    # LineReceiver counts without the delimiter.  AUTH lines may be longer than
    # other commands: lineReceived refuses the others over relay.smtp.lines.MAX_COMMAND_LINE.
    MAX_LENGTH = MAX_AUTH_LINE - 2

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
        self.peer_host = ""
        self.peer_port = 0
        self.trusted = False
        self.errors = 0
        self._mail = Transactions(self.config, self.hostname, factory.policy, self._peer)
        self._receiver = MessageReceiver(factory, self.client_info, self._peer)
        self._output = ReplyWriter(self.clock, self.pauseProducing, self._output_drained, self._peer)
        self._line_seen = False  # a complete line arrived in this read: its timeout restarts
        self.client = ""  # the address the per-client limits count (relay.smtp.limits.client_key)
        self._counted = False
        self._overlong = OverlongLine()
        self._reprocess = False
        self._waiting = False
        self._reason = ""  # why the current command is refused, for the log
        self._auth = Authenticator(factory, self._peer, self._output.queue, self._auth_exhausted)
        self.shutting_down = False

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        self._output.transport = self.transport
        peer = self.transport.getPeer()
        if isinstance(peer, (_address.IPv4Address, _address.IPv6Address)):
            self.peer_host, self.peer_port = peer.host, peer.port
        self.trusted = self.factory.policy.is_trusted(self.peer_host) if self.peer_host else False
        self.tls = ISSLTransport.providedBy(self.transport)  # an implicit-TLS listener
        self.client = client_key(self.peer_host) if self.peer_host else ""
        self._auth.client = self.client
        if self.factory.shutting_down:
            self._send(shutting_down(self.hostname))
            self._close()
            return
        refusal = self.factory.session_opened(self)
        if refusal is not None:
            self._send(refusal)
            self._close()
            return
        self._counted = True
        set_nodelay(self.transport)
        log.info("connect from {peer}", peer=self._peer(), event="connect", tls=self.tls)
        self.setTimeout(self.factory.timeout())
        self._send(greeting(self.hostname))
        self._output.flush()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        self._receiver.abort()
        self._output.lost()
        if self._counted:
            self._counted = False
            self.factory.session_closed(self)
            log.info("disconnect from {peer}", peer=self._peer(), event="disconnect")

    def timeoutConnection(self) -> None:
        log.info("timeout after {state} from {peer}", state=self.state.value, peer=self._peer(), event="timeout")
        self._receiver.abort()
        self._send(idle_timeout(self.hostname))
        self._close()

    def _peer(self) -> str:
        return f"[{self.peer_host}]:{self.peer_port}" if self.peer_host else "unknown"

    @property
    def state(self) -> SessionState:
        """Where the session is in the SMTP dialogue (RFC 5321 4.1.4), from what it holds."""
        if self._receiver.reader is not None:
            return SessionState.DATA
        if self._receiver.in_chunks:
            return SessionState.BDAT
        if self._mail.current is not None:
            return SessionState.MAIL
        return SessionState.HELO if self.helo else SessionState.CONNECT

    # -- output --------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._output.queue(_wire(reply))
        reply_in(reply.code)
        if reply.code in PROTOCOL_ERROR_CODES:
            self.errors += 1
            if self.errors >= self.config.max_errors and not self._output.closed:
                log.warn("too many errors from {peer}", peer=self._peer())
                self._output.queue(too_many_errors(self.hostname).to_bytes())
                self._close()

    def _output_drained(self) -> None:
        """The client has read its replies: reading goes on unless an answer is still awaited."""
        if not self._waiting:
            self.resumeProducing()

    def _close(self) -> None:
        """Stop reading and the timeout, and close after the replies collected."""
        if not self._output.closed:
            self.setTimeout(None)
            self.clearLineBuffer()
        self._output.close()

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._output.closed:
            return
        try:
            if self._overlong.discarding and data:
                data = self._overlong.feed(data)
            super().dataReceived(data)
            while self._reprocess and not self.paused and not self._output.closed:
                self._reprocess = False
                super().dataReceived(b"")
            if self._line_seen:
                # A complete line gives the next one a whole timeout, however it is
                # split; bytes alone do not (DATA has its own deadline).
                self._line_seen = False
                if self.line_mode and not self._output.closed:
                    self.setTimeout(self.factory.timeout())
            self._check_partial_line()
        except Exception:
            log.failure("unexpected error from {peer}", peer=self._peer())
            self._receiver.abort()
            self._send(INTERNAL_ERROR)
            self._close()
        finally:
            self._output.flush()

    def lineLengthExceeded(self, line: bytes) -> None:
        """Answer 500 5.5.6 and drop the overlong line up to its CRLF; go on after it."""
        log.info("line too long from {peer}", peer=self._peer())
        self._auth.exchange = None  # an overlong AUTH response ends the exchange
        self._send(LINE_TOO_LONG)
        rest = self._overlong.refused(line)
        if rest is not None:
            self._buffer = rest
            self._reprocess = True

    def _check_partial_line(self) -> None:
        """An unfinished command line already over 512 octets is refused now (AUTH lines may be longer)."""
        buffer = self._buffer
        if (self.line_mode and not self.paused and not self._output.closed
                and too_long_unfinished(buffer, self._auth.exchange is not None)):
            self._buffer = b""
            self.lineLengthExceeded(buffer)

    def lineReceived(self, line: bytes) -> None:
        if self._output.closed:
            return
        self._line_seen = True
        if self.shutting_down:
            self._say_goodbye()
            return
        self._reason = ""
        exchange = self._auth.exchange
        if too_long(line, exchange is not None):
            log.info("line too long from {peer}", peer=self._peer())
            self._send(LINE_TOO_LONG)
            return
        try:
            answer = self._auth.respond(line) if exchange is not None else self._command(line)
        except Exception:
            log.failure("error handling a command from {peer}", peer=self._peer())
            self._auth.exchange = None
            answer = INTERNAL_ERROR
        if isinstance(answer, Reply) and answer.code >= 400:
            # An AUTH response line is a secret: only its verb is ever logged.
            self._log_refusal(b"AUTH" if exchange is not None else line, answer)
        self._answer(answer)

    def _log_refusal(self, line: bytes, reply: Reply) -> None:
        verb = escape_controls(line[:12].split(b" ", 1)[0].decode("ascii", "replace").upper()) or "empty line"
        stage = verb.lower() if verb in _MESSAGE_VERBS else None
        log.info("{verb} refused from {peer}: {reply}{reason}", verb=verb, peer=self._peer(),
                 reply=str(reply), reason=f" ({escape_controls(self._reason)})" if self._reason else "",
                 event="rejected" if stage else "refused", stage=stage)

    def _answer(self, answer: Answer) -> None:
        """Send a reply now, or pause input until a Deferred reply has been sent."""
        if not isinstance(answer, Deferred):
            if answer is not None:
                self._send(answer)
            return
        fired: list[bool] = []

        def deliver(reply: Optional[Reply]) -> None:
            fired.append(True)
            if self._output.closed:
                return
            if reply is not None:
                self._send(reply if isinstance(reply, Reply) else INTERNAL_ERROR)
            if self.shutting_down and self._receiver.reader is None:
                self._say_goodbye()
                return
            if self._waiting:
                self._waiting = False
                self._output.flush()
                self.setTimeout(self.factory.timeout())  # the client has its reply: the next line's timeout starts
                if not self._output.blocked:
                    self.resumeProducing()

        def failed(failure: Failure) -> Reply:
            log.failure("error answering {peer}", failure, peer=self._peer())
            return INTERNAL_ERROR

        answer.addErrback(failed).addCallback(deliver).addErrback(
            lambda f: log.failure("error replying to {peer}", f, peer=self._peer()))
        if not fired and not self._output.closed:
            self._waiting = True
            self._output.flush()
            self.pauseProducing()

    def resumeProducing(self) -> None:
        if self._output.closed:
            return
        super().resumeProducing()

    def _command(self, line: bytes) -> Answer:
        if b"\r" in line or b"\n" in line:
            return BARE_NEWLINE_COMMAND
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return BAD_UTF8_COMMAND
        verb, _, argument = text.partition(" ")
        handler = getattr(self, "do_" + verb.upper(), None) if verb.isascii() and verb.isalpha() else None
        if handler is None:
            return UNKNOWN_COMMAND
        return handler(argument)

    # -- verbs ---------------------------------------------------------------

    def do_HELO(self, argument: str) -> Answer:
        name = self._helo_name(argument)
        if isinstance(name, Reply):
            return SYNTAX_HELO if name is SYNTAX_EHLO else name
        self._greeted(name, esmtp=False)
        return helo_reply(self.hostname)

    def do_EHLO(self, argument: str) -> Answer:
        name = self._helo_name(argument)
        if isinstance(name, Reply):
            return name
        self._greeted(name, esmtp=True)
        return ehlo_reply(self.hostname, self._extensions())

    def _helo_name(self, argument: str) -> Union[str, Reply]:
        try:
            return read_helo(argument)
        except Refusal as refusal:
            self._reason = refusal.reason
            return refusal.reply

    def _greeted(self, name: str, esmtp: bool) -> None:
        self.helo = name
        self.esmtp = esmtp
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        """No transaction any more; a BDAT message begun in it is dropped."""
        self._mail.current = None
        self._receiver.drop_chunks()

    def _extensions(self) -> list[str]:
        """What EHLO advertises now: STARTTLS until the session has TLS, AUTH when it is offered."""
        return extensions(self.config.max_message_size, self.factory.tls_context is not None and not self.tls,
                          self._auth_offered())

    def _auth_offered(self) -> bool:
        """AUTH is offered with a portal, on a TLS session or with auth_in_clear."""
        return self.factory.portal is not None and (self.tls or self.config.auth_in_clear)

    def do_MAIL(self, argument: str) -> Answer:
        if self.helo is None:
            return NEED_HELO
        if self.factory.submission and not self.auth_user:
            return AUTH_REQUIRED
        if self._mail.current is not None:
            return NESTED_MAIL
        try:
            transaction = read_mail(argument, self.esmtp, self._auth_offered(), self.config.max_message_size)
        except Refusal as refusal:
            self._reason = refusal.reason
            return refusal.reply
        return self._mail.begin(transaction, self.auth_user, self.client_info)

    def do_RCPT(self, argument: str) -> Answer:
        transaction = self._mail.current
        if transaction is None:
            return NEED_MAIL
        try:
            request = read_rcpt(argument, transaction.smtputf8)
        except Refusal as refusal:
            self._reason = refusal.reason
            return refusal.reply
        return self._mail.add(request, self.client_info)

    def do_DATA(self, argument: str) -> Answer:
        transaction = self._mail.current
        if transaction is None:
            return NEED_MAIL
        if self._receiver.chunks is not None:
            return BDAT_THEN_DATA
        if not transaction.recipients:
            return NEED_RCPT
        if argument:
            return SYNTAX_DATA
        self._receiver.start_data(transaction)
        self.setRawMode()
        self.setTimeout(self._receiver.time_left)
        return START_DATA

    def do_BDAT(self, argument: str) -> Answer:
        """``BDAT size [LAST]`` (RFC 3030): the next ``size`` octets are message content, read raw.

        A chunk that cannot be taken (no transaction, no recipient) is still
        read to its end and dropped, so the octets never count as commands;
        then it is refused.  The last chunk ends the message like DATA's end.
        """
        words = argument.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or not words[0].isascii() or len(words[0]) > 18 \
                or (len(words) == 2 and words[1].upper() != "LAST"):
            return SYNTAX_BDAT
        size, last = int(words[0]), len(words) == 2
        self._receiver.start_chunk(self._mail.current, size, last)
        self.setTimeout(self._receiver.time_left)
        if size == 0:
            return self._message_read(self._receiver.chunk_done())
        self.setRawMode()
        return None

    def do_RSET(self, argument: str) -> Answer:
        if argument.strip():
            return SYNTAX_RSET
        self._reset_transaction()
        return OK

    def do_NOOP(self, argument: str) -> Answer:
        return OK

    def do_VRFY(self, argument: str) -> Answer:
        return VRFY_REPLY

    def do_HELP(self, argument: str) -> Answer:
        return help_reply(offered_verbs(self._extensions()))

    def do_QUIT(self, argument: str) -> Answer:
        self._send(BYE)
        self._close()
        return None

    def do_STARTTLS(self, argument: str) -> Answer:
        if self.factory.tls_context is None:
            return NOT_IMPLEMENTED
        if self.tls:
            return ALREADY_TLS
        if argument:
            return SYNTAX_STARTTLS
        # Anything pipelined behind STARTTLS arrived in clear: never execute it.
        discarded = self.clearLineBuffer()
        if discarded:
            log.warn("discarded {count} octets sent behind STARTTLS by {peer}",
                     count=len(discarded), peer=self._peer())
        self._send(READY_TLS)
        self._output.flush()
        # The TLS layer pauses a registered producer until its handshake is done.
        self._output.release()
        self.transport.startTLS(self.factory.tls_context)
        log.info("STARTTLS from {peer}", peer=self._peer(), event="tls", direction="in")
        self.tls = True
        self.helo = None
        self.esmtp = False
        self._reset_transaction()
        self._auth.user = ""  # RFC 3207 4.2: forget what the client said in clear
        return None

    # -- AUTH (RFC 4954) -------------------------------------------------------

    def do_AUTH(self, argument: str) -> Answer:
        if self.factory.portal is None:
            return AUTH_NOT_ENABLED
        if not self.esmtp:
            return AUTH_NEED_EHLO
        if not self._auth_offered():
            return AUTH_NEEDS_TLS
        if self.auth_user:
            return AUTH_TWICE
        if self._mail.current is not None:
            return AUTH_IN_TRANSACTION
        return self._auth.start(argument)

    @property
    def auth_user(self) -> str:
        """The identity the client authenticated as ("" when none; forgotten at STARTTLS)."""
        return self._auth.user

    @auth_user.setter
    def auth_user(self, user: str) -> None:
        self._auth.user = user

    def _auth_exhausted(self) -> Optional[Reply]:
        """The failure that used up AUTH_FAILURE_LIMIT: 535, then 421 and close (535 alone once closed)."""
        if self._output.closed:
            return AUTH_FAILED
        log.warn("too many authentication failures from {peer}", peer=self._peer())
        self._send(AUTH_FAILED)
        self._send(too_many_auth_failures(self.hostname))
        self._close()
        return None

    # -- ETRN (RFC 1985) -------------------------------------------------------

    def do_ETRN(self, argument: str) -> Answer:
        if self.helo is None:
            return NEED_HELO
        if self._mail.current is not None:
            return ETRN_IN_TRANSACTION
        return etrn(argument, self.trusted or bool(self.auth_user), self.factory.etrn, self._peer())

    # -- shutdown --------------------------------------------------------------

    def shutdown(self) -> None:
        """The relay stops: 421 and close now, or after the answer a message in DATA is waiting for."""
        self.shutting_down = True
        if not self._output.closed and self._receiver.reader is None and not self._waiting:
            self._say_goodbye()

    def abort_for_shutdown(self) -> None:
        """The grace period is over: drop whatever is in progress, 421 and close (cut, if closed already)."""
        if not self._output.closed:
            self._receiver.abort()
            self._say_goodbye()
        else:
            self._output.cut()

    def _say_goodbye(self) -> None:
        log.info("shutting down: closing the session from {peer}", peer=self._peer())
        self._auth.exchange = None
        self._send(shutting_down(self.hostname))
        self._close()

    # -- DATA ----------------------------------------------------------------

    def rawDataReceived(self, data: bytes) -> None:
        receiver = self._receiver
        if not receiver.reading:  # not reached: raw mode is only set while the receiver reads
            self.setLineMode(data)
            return
        ending = receiver.feed(data)
        self.setTimeout(receiver.time_left)
        if ending is None:
            return
        self._line_seen = True  # the end of data or of a chunk restarts the timeout as a command line does
        self._answer(self._message_read(ending))
        # Back to commands: what followed the end of data is read as command
        # lines by LineReceiver's loop (once the reply is out, if it pauses).
        self.line_mode = 1
        self._buffer = ending.rest + self._buffer

    def _message_read(self, ending: Ending) -> Answer:
        """The answer to a DATA stream or BDAT chunk read to its end; the transaction is over with its message."""
        if ending.ended:
            self._mail.current = None
        return ending.answer

    # -- the client --------------------------------------------------

    def protocol_name(self, smtputf8: bool = False) -> str:
        """RFC 3848 / RFC 6531 ``with`` keyword: SMTP, ESMTP, ESMTPS, ESMTPSA, UTF8SMTPS..."""
        return trace.protocol_name(self.esmtp, smtputf8, self.tls, bool(self.auth_user))

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

@lru_cache(maxsize=1024)
def _wire(reply: Reply) -> bytes:
    """The wire form of a reply; the constant ones are made once."""
    return reply.to_bytes()

