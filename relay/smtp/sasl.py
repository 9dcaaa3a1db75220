"""AUTH (RFC 4954) of an inbound session: the SASL exchanges and the portal's check.

An ``AuthExchange`` decodes the client's response lines of PLAIN (RFC 4616)
or LOGIN and says what comes next: the next challenge, a refusal, or the
``Credentials`` to check; it knows nothing of the session.

An ``Authenticator`` is a session's helper for the AUTH command once the
session allows it (a portal, EHLO, TLS or ``auth_in_clear``, not twice, not
in a transaction): it runs the exchange, asks the twisted.cred portal for
``relay.auth.ISubmitter`` (in a thread: see ``relay.auth``), answers a
failure after ``AUTH_FAILURE_DELAY`` on the injected clock, counts the
failures of the session and of the client's address (``relay.smtp.limits``)
and refuses an address with too many of them without asking.  It holds the
authenticated user.  Passwords are never logged.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from relay.auth import ISubmitter
from relay.log import Logger
from relay.smtp.replies import (
    AUTH_BAD_BASE64,
    AUTH_CANCELLED,
    AUTH_FAILED,
    AUTH_MALFORMED,
    AUTH_MECHANISM_UNKNOWN,
    AUTH_OK,
    AUTH_RATE_LIMITED,
    AUTH_TEMPORARY_FAILURE,
    CHALLENGE_EMPTY,
    CHALLENGE_PASSWORD,
    CHALLENGE_USERNAME,
    SYNTAX_AUTH,
    Answer,
    Reply,
)

if TYPE_CHECKING:
    from relay.smtp.factory import SMTPServerFactory

# The sessions' own namespace: operators filter the inbound listener's lines by it.
log = Logger(namespace="relay.smtp.server")

MAX_AUTH_LINE = 12288  # octets including CRLF of AUTH lines and responses (RFC 4954 4)
AUTH_MECHANISMS = ("PLAIN", "LOGIN")
AUTH_FAILURE_DELAY = 1.0  # seconds before a 535, input paused meanwhile
AUTH_FAILURE_LIMIT = 3  # failed AUTH attempts in one session before 421 and close


@dataclass(frozen=True)
class Credentials:
    """What the client offered; ``password`` None: refused without asking (PLAIN with another authzid)."""

    username: bytes
    password: Optional[bytes]


Step = Union[bytes, Reply, Credentials]  # the next challenge (wire form), a refusal, or what to check


class AuthExchange:
    """One AUTH exchange: the mechanism and what the client has said so far."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.username: Optional[bytes] = None  # LOGIN: given, waiting for the password

    def first_challenge(self) -> bytes:
        """The challenge to an AUTH command without an initial response."""
        return CHALLENGE_EMPTY if self.mechanism == "PLAIN" else CHALLENGE_USERNAME

    def respond(self, line: bytes, initial: bool = False) -> Step:
        """One client response (or the initial response): what the session does next."""
        if line == b"*" and not initial:
            return AUTH_CANCELLED
        if line == b"=" and initial:
            data = b""
        else:
            try:
                data = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                return AUTH_BAD_BASE64
        if self.mechanism == "PLAIN":
            parts = data.split(b"\0")
            if len(parts) != 3:
                return AUTH_MALFORMED
            authzid, username, password = parts
            if authzid and authzid != username:
                return Credentials(username, None)
            return Credentials(username, password)
        if self.username is None:
            self.username = data
            return CHALLENGE_PASSWORD
        return Credentials(self.username, data)


class Authenticator:
    """AUTH for one session: the exchange under way, the portal's check, the failures and the user.

    ``challenge`` writes a challenge line (wire form) among the session's
    replies; ``exhausted`` is called for the answer to the failure that uses
    up AUTH_FAILURE_LIMIT (the session says 535, 421 and closes).
    """

    def __init__(self, factory: "SMTPServerFactory", peer: Callable[[], str], challenge: Callable[[bytes], None],
                 exhausted: Callable[[], Optional[Reply]]) -> None:
        self.factory = factory
        self._peer = peer
        self._challenge = challenge
        self._exhausted = exhausted
        self.client = ""  # the address whose failures count (relay.smtp.limits.client_key), set on connection
        self.exchange: Optional[AuthExchange] = None  # an exchange waiting for the client's next line
        self.user = ""  # the authenticated identity, "" when none
        self.failures = 0

    def start(self, argument: str) -> Answer:
        """``AUTH mechanism [initial-response]``: the first challenge, or the answer to the initial response."""
        words = argument.split(" ")
        if not words[0] or len(words) > 2:
            return SYNTAX_AUTH
        mechanism = words[0].upper()
        if mechanism not in AUTH_MECHANISMS:
            return AUTH_MECHANISM_UNKNOWN
        if self.factory.limits.auth.blocked(self.client):
            return self._rate_limited(mechanism)
        exchange = AuthExchange(mechanism)
        if len(words) == 1:
            self.exchange = exchange
            self._challenge(exchange.first_challenge())
            return None
        return self._response(exchange, words[1].encode("ascii", "replace"), initial=True)

    def respond(self, line: bytes) -> Answer:
        """The client's line while an exchange waits for it."""
        exchange = self.exchange
        assert exchange is not None
        return self._response(exchange, line)

    def _response(self, exchange: AuthExchange, line: bytes, initial: bool = False) -> Answer:
        """One client response of an AUTH exchange (or the initial response)."""
        self.exchange = None
        step = exchange.respond(line, initial)
        if isinstance(step, bytes):  # the next challenge: the exchange goes on
            self.exchange = exchange
            self._challenge(step)
            return None
        if isinstance(step, Reply):
            return step
        return self._verify(exchange.mechanism, step.username, step.password)

    def _verify(self, mechanism: str, username: bytes, password: Optional[bytes]) -> Deferred:
        """Ask the portal; 235, or 535 after a delay (``password`` None: refused without asking)."""
        user = username.decode("utf-8", "replace")
        if self.factory.limits.auth.blocked(self.client):
            return self._rate_limited(mechanism)
        if password is None:
            checked: Deferred = Deferred()
            checked.errback(UnauthorizedLogin())
        else:
            checked = self.factory.portal.login(UsernamePassword(username, password), None, ISubmitter)
        return checked.addCallbacks(self._succeeded, self._failed,
                                    callbackArgs=(mechanism,), errbackArgs=(mechanism, user))

    def _succeeded(self, result: tuple, mechanism: str) -> Reply:
        _, avatar, logout = result
        logout()
        self.user = avatar.name
        log.info("AUTH {mechanism} as {user} from {peer}: success",
                 mechanism=mechanism, user=self.user, peer=self._peer(), event="auth")
        return AUTH_OK

    def _failed(self, failure: Failure, mechanism: str, user: str) -> Answer:
        if not failure.check(UnauthorizedLogin):
            log.error("AUTH {mechanism} as {user!r} from {peer}: checker unavailable ({error})",
                      mechanism=mechanism, user=user, peer=self._peer(),
                      error=failure.type.__name__)
            return AUTH_TEMPORARY_FAILURE
        self.failures += 1
        self.factory.limits.auth.failed(self.client)
        log.info("AUTH {mechanism} as {user!r} from {peer}: failed ({count} of {limit})",
                 mechanism=mechanism, user=user, peer=self._peer(), event="auth_failed",
                 count=self.failures, limit=AUTH_FAILURE_LIMIT)
        return deferLater(self.factory.clock, AUTH_FAILURE_DELAY, self._failure_reply)

    def _rate_limited(self, mechanism: str) -> Deferred:
        """454 4.7.0 after the failure delay, without asking the portal: the address failed too often."""
        auth = self.factory.limits.auth
        log.warn("AUTH {mechanism} from {peer} refused: {limit} failures from {client} within {window:g} s",
                 mechanism=mechanism, peer=self._peer(), limit=auth.limit, client=self.client, window=auth.window)
        return deferLater(self.factory.clock, AUTH_FAILURE_DELAY, lambda: AUTH_RATE_LIMITED)

    def _failure_reply(self) -> Optional[Reply]:
        if self.failures < AUTH_FAILURE_LIMIT:
            return AUTH_FAILED
        return self._exhausted()
