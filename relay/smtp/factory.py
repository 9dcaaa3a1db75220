"""The inbound ESMTP listener's factory: admission, the live sessions, shutdown.

``SMTPServerFactory`` builds one ``relay.smtp.server.SMTPServerProtocol`` per
connection.  It admits sessions under ``max_sessions``, the trusted reserve,
the per-address cap and the connection rate (``relay.smtp.limits``), picks
the session timeout (``load_idle_timeout`` under load), and on
``stopping()`` makes every session answer 421 4.3.2 and close, letting a
message in DATA finish within ``SHUTDOWN_GRACE``.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory

from relay.config import ServerConfig
from relay.log import Logger
from relay.seams import MessageSpool, Policy
from relay.smtp import trace
from relay.smtp.etrn import EtrnHook
from relay.smtp.limits import ClientLimits, SessionCounts
from relay.smtp.replies import (
    Reply,
    connection_rate_exceeded,
    too_many_client_sessions,
    too_many_connections,
)
from relay.smtp.server import SMTPServerProtocol

# The sessions' own namespace: operators filter the inbound listener's lines by it.
log = Logger(namespace="relay.smtp.server")

SHUTDOWN_GRACE = 10.0  # seconds a message in DATA may take to finish when the relay stops
LOAD_THRESHOLD = 0.8  # share of max_sessions open past which timeouts are load_idle_timeout


class SMTPServerFactory(ServerFactory):
    """Builds one SMTPServerProtocol per connection and keeps the live sessions.

    ``portal`` (a twisted.cred Portal answering ``relay.auth.ISubmitter``)
    enables AUTH; ``etrn(domain, subdomains)`` starts the delivery of the
    mail queued for a domain (None: ETRN answers 458).  ``limits`` is the
    per-address state shared by the listeners of the process (connection
    rate, AUTH failures); sessions are counted per factory.
    """

    protocol = SMTPServerProtocol
    noisy = False  # no "Starting factory" lines

    def __init__(self, hostname: str, config: ServerConfig, spool: MessageSpool, policy: Policy,
                 clock: IReactorTime, tls_context: Any = None, submission: bool = False,
                 portal: Any = None, etrn: Optional[EtrnHook] = None,
                 limits: Optional[ClientLimits] = None) -> None:
        self.hostname = hostname
        self.config = config
        self.spool = spool
        self.policy = policy
        self.clock = clock
        self.tls_context = tls_context
        self.submission = submission
        self.portal = portal
        self.etrn = etrn
        self.limits = limits if limits is not None else ClientLimits(config, clock)
        self.counts = SessionCounts(config)
        self.shutting_down = False
        self._live: set[SMTPServerProtocol] = set()
        self._drained: list[Deferred] = []
        self._grace: Any = None
        self.date_text = trace.TraceDate()  # RFC 5322 date-time of a clock time, made once per second

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        return SMTPServerProtocol(self)

    @property
    def sessions(self) -> int:
        """Sessions open now."""
        return self.counts.total

    def timeout(self) -> float:
        """The deadline of a command line or DATA stretch: idle_timeout, or load_idle_timeout under load.

        Under load means more than LOAD_THRESHOLD of max_sessions are open
        on this listener (as Postfix shortens smtpd_timeout under stress).
        """
        config = self.config
        if self.counts.total > config.max_sessions * LOAD_THRESHOLD:
            return min(config.idle_timeout, config.load_idle_timeout)
        return config.idle_timeout

    def session_opened(self, session: SMTPServerProtocol) -> Optional[Reply]:
        """Count a new session; None, or the 421 refusing it (it is not counted then).

        A trusted client may use every one of ``max_sessions``; any other
        leaves ``reserved_sessions`` free, has at most
        ``max_sessions_per_client`` at a time and opens at most
        ``client_connection_rate_limit`` per ``client_rate_time_unit``.
        """
        client, peer = session.client, session._peer()
        if not session.trusted and client and not self.limits.connections.allow(client):
            log.warn("refused connection from {peer}: more than {limit} connections from {client} in {unit:g} s",
                     peer=peer, limit=self.config.client_connection_rate_limit, client=client,
                     unit=self.config.client_rate_time_unit, event="connection_refused")
            return connection_rate_exceeded(self.hostname, client)
        refused = self.counts.admit(client, session.trusted)
        if refused == "client sessions":
            log.warn("refused connection from {peer}: {count} sessions from {client} already",
                     peer=peer, count=self.counts.of(client), client=client, event="connection_refused")
            return too_many_client_sessions(self.hostname, client)
        if refused is not None:
            log.warn("refused connection from {peer}: too many sessions ({count} open)",
                     peer=peer, count=self.counts.total, event="connection_refused")
            return too_many_connections(self.hostname)
        self._live.add(session)
        return None

    def session_closed(self, session: SMTPServerProtocol) -> None:
        self.counts.release(session.client)
        self._live.discard(session)
        if self.shutting_down and not self._live:
            self._all_closed()

    def stopping(self, grace: float = SHUTDOWN_GRACE) -> Deferred:
        """The relay stops: every session answers 421 4.3.2 and closes.

        Idle sessions are closed now; a session reading DATA or waiting for
        an answer gets it first (the spool's commit decides 250 or 451).
        The Deferred fires when every session has closed, or after ``grace``
        seconds, when the remaining ones are cut off.
        """
        self.shutting_down = True
        for session in list(self._live):
            session.shutdown()
        if not self._live:
            return succeed(None)
        log.info("waiting up to {grace:g} s for {count} session(s) to finish", grace=grace, count=len(self._live))
        drained: Deferred = Deferred()
        self._drained.append(drained)
        if self._grace is None:
            self._grace = self.clock.callLater(grace, self._grace_over)
        return drained

    def _grace_over(self) -> None:
        self._grace = None
        for session in list(self._live):
            log.warn("session from {peer} still busy at shutdown: closed", peer=session._peer())
            session.abort_for_shutdown()
        self._all_closed()

    def _all_closed(self) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)
