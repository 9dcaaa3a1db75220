"""Delivery: one attempt along each recipient's Route, one Outcome per recipient.

This module owns step 5 of the data flow on the queue's side.  For one
message it asks the router chain for the route of every pending recipient
(again at every attempt, so configuration changes apply to queued mail),
groups the recipients whose routes share a destination into one transaction,
resolves the destination's hosts once per group, and tries them in order
until one takes the transaction.  It never retries by itself: what did not
work becomes a transient Outcome, and the scheduler decides when to try again.

The three outcome buckets are decided here and nowhere else (``classify``,
``_resolution_outcome``, ``_unreachable``):

* delivered: a 2xx reply to the recipient;
* transient: a 4xx reply, no host reachable (connection refused, timeout,
  4xx greeting, TLS required but not offered...), a DNS timeout or SERVFAIL,
  a router that failed, an unreadable password file, any unexpected error;
* permanent: a 5xx reply, NXDOMAIN, a null MX, a reject route.

Once a host has taken the transaction its per-recipient replies are final for
this attempt: a 5xx from one MX host is not retried at the next one.

Outbound TLS follows the route (``tls`` may / require / verify, certificates
checked against ``[delivery] tls_ca_file`` or the system store, always for
the next hop's configured name, never an address); every Outcome carries
the TLS version and cipher of the session that answered, and every delivery
log line says it (or "no TLS").  With ``[delivery] mta_sts`` on, direct MX
delivery applies the recipient domain's MTA-STS policy (``relay.mta_sts``
finds it): in enforce mode only matching MX hosts are used, with TLS
verified for the MX name; in testing mode what enforce would refuse is
logged.

Connections are limited (``[delivery] concurrency`` in all,
``per_destination`` per destination address); work beyond the limits waits
in line, it never fails.  A connection that finished a transaction is kept
idle for the next transaction to the same destination (the client sends RSET)
and closed after ``ClientTimeouts.idle`` or at ``Delivery.close``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, Union

from twisted.internet import defer, error as neterror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from relay.log import Logger
from twisted.python.failure import Failure

from relay.config import Config
from relay.mta_sts import MODE_ENFORCE, MODE_TESTING
from relay.envelope import (
    OUTCOME_DELIVERED,
    OUTCOME_PERMANENT,
    OUTCOME_TRANSIENT,
    ROUTE_MX,
    ROUTE_REJECT,
    TLS_VERIFY,
    Envelope,
    Outcome,
    Recipient,
    Route,
)
from relay.routing import RouteContext
from relay.routing.mx import ResolutionError, Target
from relay.smtp import client as smtp_client
from relay.smtp.client import ClientOptions, SessionError, Transaction, TransactionResult
from relay.smtp.replies import Reply

log = Logger()

# Local outcomes carry no SMTP code.
LOCAL_CODE = 0

# A reject route: the recipient is refused as at RCPT time.
REJECT_CODE = 550
REJECT_STATUS = "5.7.1"
REJECT_TEXT = "Delivery to this address is not permitted"

# Texts of local transient outcomes; they never carry exception text.
STATUS_TRANSIENT = "4.4.0"
STATUS_NO_ANSWER = "4.4.1"
STATUS_LOCAL_ERROR = "4.3.0"
TEXT_INTERNAL = "local error during delivery; will try again"
TEXT_ROUTING = "routing failed; will try again"
TEXT_NO_TARGETS = "no address to deliver to"
TEXT_NO_REPLY = "the remote host gave no reply for this recipient"
TEXT_PASSWORD_UNREADABLE = "cannot read password file {path}: {reason}"
TEXT_PASSWORD_EMPTY = "password file {path} is empty"
DNS_PREFIX = "DNS: "
STATUS_MTA_STS = "4.7.5"
TEXT_MTA_STS_NO_MX = "MTA-STS: no MX host matches the policy"
TEXT_NO_TLS = "no TLS"
# The stable log event of each outcome (relay.log): what the JSON log and the metrics see.
OUTCOME_EVENTS = {OUTCOME_DELIVERED: "delivered", OUTCOME_TRANSIENT: "deferred", OUTCOME_PERMANENT: "bounced"}

# Why a connection failed, for the most common network errors (not their own text).
_CONNECT_REASONS: tuple[tuple[type, str], ...] = (
    (neterror.ConnectionRefusedError, "Connection refused"),
    (neterror.TCPTimedOutError, "Connection timed out"),
    (neterror.TimeoutError, "Connection timed out"),
    (neterror.NoRouteError, "No route to host"),
    (neterror.ConnectionLost, "Connection lost"),
    (neterror.ConnectionDone, "Connection closed"),
    (neterror.ConnectError, "Connection failed"),
    (OSError, "Connection failed"),
)

Connect = Callable[..., Deferred]


# -- the one place where outcomes are classified ---------------------------------


def classify(code: int) -> str:
    """The outcome bucket of an SMTP reply code: 2xx delivered, 5xx permanent, else transient."""
    if 200 <= code < 300:
        return OUTCOME_DELIVERED
    if 500 <= code < 600:
        return OUTCOME_PERMANENT
    return OUTCOME_TRANSIENT


def reply_outcome(address: str, reply: Reply, host: str, rule: str) -> Outcome:
    """The Outcome of a recipient the remote ``host`` answered with ``reply``."""
    return Outcome(
        recipient=address,
        kind=classify(reply.code),
        code=reply.code,
        status=reply.status,
        text=" ".join(reply.text.split("\n")),
        host=host,
        rule=rule,
    )


def local_outcome(address: str, kind: str, status: str, text: str, rule: str = "", host: str = "") -> Outcome:
    """An Outcome decided here rather than by a remote reply (code 0)."""
    return Outcome(address, kind, LOCAL_CODE, status, text, host=host, rule=rule)


def _resolution_outcome(address: str, error: ResolutionError, rule: str) -> Outcome:
    kind = OUTCOME_PERMANENT if error.permanent else OUTCOME_TRANSIENT
    text = error.text if error.text.startswith(DNS_PREFIX) else DNS_PREFIX + error.text
    return local_outcome(address, kind, error.status, text, rule)


def _reject_outcome(address: str, route: Route) -> Outcome:
    return Outcome(address, OUTCOME_PERMANENT, REJECT_CODE, REJECT_STATUS, route.reason or REJECT_TEXT, rule=route.rule)


def host_label(target: Target) -> str:
    """``mx1.example.test[192.0.2.1]``, or the bare address for a literal."""
    if target.host.startswith("[") or target.host == target.address:
        return f"[{target.address}]"
    return f"{target.host}[{target.address}]"


def connect_error_text(target: Target, failure: Failure) -> str:
    """One line saying why ``target`` could not carry the mail (no raw exception text)."""
    where = f"{host_label(target)}:{target.port}"
    error = failure.value
    if isinstance(error, SessionError):
        if error.reply is not None:
            return f"{where} said: {error.reply} (at {error.stage})"
        if error.stage == smtp_client.STAGE_CONNECT:
            return f"connect to {where}: {_network_reason(error)}"
        return f"{where}: {error.message}"
    for kind, reason in _CONNECT_REASONS:
        if isinstance(error, kind):
            return f"connect to {where}: {reason}"
    return f"{where}: {TEXT_INTERNAL}"


def _network_reason(error: SessionError) -> str:
    """The client's connect message names the Twisted error; keep only its gist."""
    text = error.message.lower()
    if "refused" in text:
        return "Connection refused"
    if "timed out" in text or "timeout" in text:
        return "Connection timed out"
    if "no route" in text:
        return "No route to host"
    return "Connection failed"


# -- passwords -------------------------------------------------------------------


class PasswordError(Exception):
    """The password file of a route cannot be used; the text names the file only."""


def read_password(path: str) -> str:
    """The first line of ``path``, stripped; PasswordError naming the file (never its content)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError as e:
        raise PasswordError(TEXT_PASSWORD_UNREADABLE.format(path=path, reason=e.strerror or "error")) from None
    try:
        password = first.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PasswordError(TEXT_PASSWORD_UNREADABLE.format(path=path, reason="not UTF-8")) from None
    if not password:
        raise PasswordError(TEXT_PASSWORD_EMPTY.format(path=path))
    return password


# -- connection limits and idle connections --------------------------------------

PoolKey = tuple


@dataclass(eq=False)
class _Idle:
    key: PoolKey
    address: str
    conn: Any
    timer: IDelayedCall


@dataclass(eq=False)
class _Waiter:
    key: PoolKey
    address: str
    deferred: Deferred = field(default_factory=Deferred)


_SLOT = object()  # what a waiter gets when it may open a new connection


class ConnectionPool:
    """Open outbound connections: counted against the limits, idle ones kept for reuse.

    Every connection counts from the moment it is being opened until it is
    closed, idle ones included.  When the limits are reached, ``checkout``
    waits in line (first come, first served among those that can go); an
    idle connection is closed early when that lets a waiting one proceed,
    and handed over directly when a waiting one wants the same destination.
    """

    def __init__(self, reactor: Any, connect: Connect, total: int, per_destination: int) -> None:
        self._reactor = reactor
        self._connect = connect
        self._total = max(1, total)
        self._per_destination = max(1, per_destination)
        self._open = 0
        self._by_address: collections.Counter[str] = collections.Counter()
        self._idle: list[_Idle] = []  # oldest first
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._closing = False
        self._serving = False
        self._serve_again = False

    # -- introspection (logs and tests) -------------------------------------------

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- checkout and checkin -----------------------------------------------------

    def checkout(
        self, key: PoolKey, target: Target, options: ClientOptions, fresh: bool = False
    ) -> Deferred:
        """Fire with ``(connection, reused)`` for ``target``; errback when it cannot connect."""
        grant = self._grant_now(key, target.address, reuse=not fresh)
        if grant is None:
            waiter = _Waiter(key if not fresh else ("fresh", key), target.address)
            self._waiting.append(waiter)
            d = waiter.deferred
        else:
            d = defer.succeed(grant)
        self._serve_waiting()  # a dead idle connection found above may have freed a place
        d.addCallback(self._use, key, target, options)
        return d

    def checkin(
        self,
        key: PoolKey,
        address: str,
        conn: Any,
        reusable: bool,
        idle_timeout: float = smtp_client.ClientTimeouts.idle,
    ) -> None:
        """Give a connection back after a transaction: kept idle, handed over, or closed."""
        if not reusable or self._closing or getattr(conn, "closed", False):
            self._close(conn, address)
            return
        for waiter in self._waiting:
            if waiter.key == key:
                self._waiting.remove(waiter)
                waiter.deferred.callback(conn)
                return
        if self._waiting and any(self._would_unblock(address, w) for w in self._waiting):
            self._close(conn, address)
            return
        entry = _Idle(key, address, conn, None)  # type: ignore[arg-type]
        entry.timer = self._reactor.callLater(idle_timeout, self._expire, entry)
        self._idle.append(entry)

    def close(self) -> Deferred:
        """Close every idle connection; later checkins close theirs.  Fires when QUITs are done."""
        self._closing = True
        idle, self._idle = self._idle, []
        quits = []
        for entry in idle:
            if entry.timer.active():
                entry.timer.cancel()
            quits.append(self._quit(entry.conn))
            self._forget(entry.address)
        return defer.gatherResults(quits, consumeErrors=True).addCallback(lambda _: None)

    # -- internals ----------------------------------------------------------------

    def _grant_now(self, key: PoolKey, address: str, reuse: bool) -> Any:
        """An idle connection for ``key``, a slot, or None (wait)."""
        if reuse:
            conn = self._take_idle(key)
            if conn is not None:
                return conn
        if not self._fits(address):
            self._evict_for(address)
        if self._fits(address):
            self._count(address)
            return _SLOT
        return None

    def _use(self, grant: Any, key: PoolKey, target: Target, options: ClientOptions) -> Any:
        if grant is not _SLOT:
            return (grant, True)
        d = defer.maybeDeferred(self._connect, self._reactor, target.address, target.port, target.host, options)

        def failed(failure: Failure) -> Failure:
            self._forget(target.address)
            return failure

        d.addCallbacks(lambda conn: (conn, False), failed)
        return d

    def _fits(self, address: str) -> bool:
        return self._open < self._total and self._by_address[address] < self._per_destination

    def _count(self, address: str) -> None:
        self._open += 1
        self._by_address[address] += 1

    def _uncount(self, address: str) -> None:
        self._open -= 1
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]

    def _forget(self, address: str) -> None:
        """A connection is gone: count it out and let waiting work use its place."""
        self._uncount(address)
        self._serve_waiting()

    def _take_idle(self, key: PoolKey) -> Any:
        for entry in list(self._idle):
            if entry.key != key:
                continue
            self._idle.remove(entry)
            if entry.timer.active():
                entry.timer.cancel()
            if getattr(entry.conn, "closed", False) or getattr(entry.conn, "busy", False):
                self._uncount(entry.address)
                continue
            return entry.conn
        return None

    def _would_unblock(self, address: str, waiter: _Waiter) -> bool:
        """Whether closing a connection to ``address`` lets ``waiter`` open one."""
        total_ok = self._open - 1 < self._total
        per = self._by_address[waiter.address] - (1 if waiter.address == address else 0)
        return total_ok and per < self._per_destination and not self._fits(waiter.address)

    def _evict_for(self, address: str) -> None:
        """Close one idle connection whose place ``address`` needs, if there is one."""
        if self._by_address[address] >= self._per_destination:
            candidates = [e for e in self._idle if e.address == address]
        else:
            candidates = list(self._idle)
        if not candidates:
            return
        entry = candidates[0]
        self._idle.remove(entry)
        if entry.timer.active():
            entry.timer.cancel()
        self._quit(entry.conn)
        self._uncount(entry.address)

    def _serve_waiting(self) -> None:
        """Let waiting checkouts go, in order, as far as the limits allow.

        Not re-entered: a grant whose callbacks free or take places makes the
        running loop look again instead.
        """
        if self._serving:
            self._serve_again = True
            return
        self._serving = True
        try:
            self._serve_again = True
            while self._serve_again:
                self._serve_again = False
                for waiter in list(self._waiting):
                    if waiter not in self._waiting:
                        continue
                    grant = self._grant_now(waiter.key, waiter.address, reuse=waiter.key[:1] != ("fresh",))
                    if grant is None:
                        continue
                    self._waiting.remove(waiter)
                    waiter.deferred.callback(grant)
                    self._serve_again = True
                    break
        finally:
            self._serving = False

    def _expire(self, entry: _Idle) -> None:
        if entry in self._idle:
            self._idle.remove(entry)
            self._close(entry.conn, entry.address)

    def _close(self, conn: Any, address: str) -> None:
        self._quit(conn)
        self._forget(address)

    def _quit(self, conn: Any) -> Deferred:
        if getattr(conn, "closed", False):
            return defer.succeed(None)
        d = defer.maybeDeferred(conn.quit)
        d.addErrback(lambda f: log.debug("QUIT failed: {error}", error=f.getErrorMessage()))
        return d


# -- delivery ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    """A recipient of a group with the route it takes this time."""

    recipient: Recipient
    route: Route


@dataclass(frozen=True)
class _Unreachable:
    """A target that could not take the transaction, and why."""

    text: str
    host: str


class Delivery:
    """Executes routes: one attempt for every pending recipient of a message."""

    def __init__(
        self,
        config: Config,
        chain: Any,
        resolver: Any,
        spool: Any,
        reactor: Any,
        connect: Optional[Connect] = None,
        mta_sts: Any = None,
    ) -> None:
        """``mta_sts``: a PolicyCache (built from ``resolver`` when ``[delivery] mta_sts`` is on)."""
        self._config = config
        self._chain = chain
        self._resolver = resolver
        self._spool = spool
        self._reactor = reactor
        if mta_sts is None and config.delivery.mta_sts:
            from relay.mta_sts import policy_cache

            mta_sts = policy_cache(resolver, reactor, config.delivery.tls_ca_file)
        self._mta_sts = mta_sts
        self.pool = ConnectionPool(
            reactor,
            connect or smtp_client.connect,
            config.delivery.concurrency,
            config.delivery.per_destination,
        )

    # -- public ----------------------------------------------------------------

    def attempt(self, envelope: Envelope) -> Deferred:
        """One attempt for every pending recipient; fires with one Outcome each, never errbacks."""
        pending = envelope.pending()
        try:
            d = Deferred.fromCoroutine(self._attempt(envelope, pending))
        except Exception:
            d = defer.fail()
        d.addErrback(self._attempt_failed, envelope, pending)
        return d

    def close(self) -> Deferred:
        """Close the idle connections (at shutdown); fires when they are closed."""
        return self.pool.close()

    # -- one attempt -----------------------------------------------------------

    async def _attempt(self, envelope: Envelope, pending: tuple[Recipient, ...]) -> list[Outcome]:
        context = RouteContext.from_envelope(envelope, self._config.hostname)
        routed = await defer.gatherResults([self._route(envelope, r, context) for r in pending])
        outcomes: dict[int, Outcome] = {}
        groups: dict[tuple, list[tuple[int, _Member]]] = {}
        for index, (recipient, route) in enumerate(routed):
            if isinstance(route, Outcome):
                outcomes[index] = route
            elif route.kind == ROUTE_REJECT:
                outcomes[index] = _reject_outcome(recipient.address, route)
                self._log_outcome(envelope, outcomes[index])
            else:
                groups.setdefault(route.destination(), []).append((index, _Member(recipient, route)))
        opener: Any = None
        if groups:
            try:
                opener = await self._spool.message_opener(envelope.queue_id)
            except Exception:
                log.failure("{queue_id}: cannot read the queued message; deferred", queue_id=envelope.queue_id)
                return [outcomes.get(i) or local_outcome(r.address, OUTCOME_TRANSIENT, STATUS_LOCAL_ERROR, TEXT_INTERNAL)
                        for i, r in enumerate(pending)]
        results = await defer.gatherResults(
            [self._deliver_group(envelope, [m for _, m in members], opener) for members in groups.values()]
        )
        for members, group_outcomes in zip(groups.values(), results):
            for (index, _), outcome in zip(members, group_outcomes):
                outcomes[index] = outcome
        return [outcomes[i] for i in range(len(pending))]

    def _attempt_failed(self, failure: Failure, envelope: Envelope, pending: tuple[Recipient, ...]) -> list[Outcome]:
        log.failure("{queue_id}: delivery attempt failed", failure, queue_id=envelope.queue_id)
        return [local_outcome(r.address, OUTCOME_TRANSIENT, STATUS_LOCAL_ERROR, TEXT_INTERNAL) for r in pending]

    def _route(self, envelope: Envelope, recipient: Recipient, context: RouteContext) -> Deferred:
        """Fire with ``(recipient, Route)`` or ``(recipient, transient Outcome)``; never errbacks."""
        d = defer.maybeDeferred(self._chain.route, recipient, context)

        def routed(route: Route) -> tuple[Recipient, Union[Route, Outcome]]:
            return recipient, route

        def failed(failure: Failure) -> tuple[Recipient, Union[Route, Outcome]]:
            log.failure(
                "{queue_id}: routing <{recipient}> failed; deferred",
                failure,
                queue_id=envelope.queue_id,
                recipient=recipient.address,
            )
            return recipient, local_outcome(recipient.address, OUTCOME_TRANSIENT, STATUS_LOCAL_ERROR, TEXT_ROUTING)

        d.addCallbacks(routed, failed)
        return d

    # -- one destination -------------------------------------------------------

    def _deliver_group(self, envelope: Envelope, members: list[_Member], opener: Callable[[], Any]) -> Deferred:
        """Fire with one Outcome per member, in order; an unexpected error makes them transient."""
        d = Deferred.fromCoroutine(self._deliver(envelope, members, opener))

        def failed(failure: Failure) -> list[Outcome]:
            log.failure(
                "{queue_id}: delivery to {recipients} failed with a local error",
                failure,
                queue_id=envelope.queue_id,
                recipients=_addresses(members),
            )
            return [
                local_outcome(m.recipient.address, OUTCOME_TRANSIENT, STATUS_LOCAL_ERROR, TEXT_INTERNAL, m.route.rule)
                for m in members
            ]

        d.addErrback(failed)
        d.addCallback(self._log_outcomes, envelope, self._reactor.seconds())
        return d

    async def _deliver(self, envelope: Envelope, members: list[_Member], opener: Callable[[], Any]) -> list[Outcome]:
        route = members[0].route
        try:
            password = read_password(route.password_file) if route.password_file else ""
        except PasswordError as e:
            log.error("{queue_id}: route {rule}: {error}", queue_id=envelope.queue_id, rule=route.rule, error=str(e))
            return [local_outcome(m.recipient.address, OUTCOME_TRANSIENT, STATUS_LOCAL_ERROR, str(e), m.route.rule) for m in members]
        try:
            targets = await defer.maybeDeferred(self._resolver.targets, route, self._config.delivery.port)
        except ResolutionError as e:
            log.info(
                "{queue_id}: DNS for {recipients} (route {rule}): {error} ({kind})",
                queue_id=envelope.queue_id,
                recipients=_addresses(members),
                rule=route.rule,
                error=e.text,
                kind="permanent" if e.permanent else "transient",
            )
            return [_resolution_outcome(m.recipient.address, e, m.route.rule) for m in members]
        if not targets:
            return [local_outcome(m.recipient.address, OUTCOME_TRANSIENT, STATUS_NO_ANSWER, TEXT_NO_TARGETS, m.route.rule) for m in members]
        policy = await self._sts_policy(route)
        targets, enforce = self._apply_sts(envelope, route, targets, policy)
        if not targets:
            return [local_outcome(m.recipient.address, OUTCOME_TRANSIENT, STATUS_MTA_STS, TEXT_MTA_STS_NO_MX, m.route.rule) for m in members]
        transaction = self._transaction(envelope, members, opener)
        last: Optional[_Unreachable] = None
        for target in targets:
            options = self._options(route, target, password, verify=enforce)
            result = await self._try_target(envelope, target, options, transaction, route)
            if isinstance(result, _Unreachable):
                last = result
                log.info(
                    "{queue_id}: {error}; {next}",
                    queue_id=envelope.queue_id,
                    error=result.text,
                    next="trying the next host" if target is not targets[-1] else "no more hosts",
                )
                continue
            if policy is not None and policy.mode == MODE_TESTING and not result.tls:
                log.warn(
                    "{queue_id}: MTA-STS testing: {host} took the mail without TLS; enforce mode would have refused it",
                    queue_id=envelope.queue_id, host=host_label(target),
                )
            return self._replies_to_outcomes(members, result, target)
        assert last is not None
        return [_unreachable(m, last) for m in members]

    async def _try_target(
        self, envelope: Envelope, target: Target, options: ClientOptions, transaction: Transaction, route: Route
    ) -> Union[TransactionResult, _Unreachable]:
        """Hand the transaction to ``target``: its result, or why it could not take it.

        A reused idle connection that fails before any reply is replaced by a
        fresh one once (the peer may have dropped it while idle).
        """
        key = _pool_key(target, options, route)
        fresh = False
        while True:
            try:
                conn, reused = await self.pool.checkout(key, target, options, fresh=fresh)
            except Exception:
                failure = Failure()
                if not failure.check(SessionError, neterror.ConnectError, OSError):
                    log.failure("{queue_id}: connecting to {host} failed", failure, queue_id=envelope.queue_id, host=host_label(target))
                return _Unreachable(connect_error_text(target, failure), host_label(target))
            try:
                result = await conn.send(transaction)
            except SessionError as e:
                self.pool.checkin(key, target.address, conn, reusable=False)
                if reused and e.transient and not fresh:
                    fresh = True
                    continue
                if not e.transient and e.reply is not None and classify(e.reply.code) == OUTCOME_PERMANENT:
                    return TransactionResult({a: e.reply for a, _ in transaction.recipients}, target.host, "")
                return _Unreachable(connect_error_text(target, Failure(e)), host_label(target))
            except Exception:
                self.pool.checkin(key, target.address, conn, reusable=False)
                raise
            self.pool.checkin(key, target.address, conn, reusable=True, idle_timeout=options.timeouts.idle)
            return result

    # -- building the transaction ----------------------------------------------

    def _transaction(self, envelope: Envelope, members: list[_Member], opener: Callable[[], Any]) -> Transaction:
        return Transaction(
            sender=envelope.sender,
            recipients=tuple((m.recipient.address, tuple(m.route.rcpt_route)) for m in members),
            size=envelope.size,
            body=envelope.body,
            smtputf8=envelope.smtputf8,
            open_message=opener,
            queue_id=envelope.queue_id,
            crlf_only=True,  # the server refuses bare CR and LF: the store holds CRLF text only
        )

    def _options(self, route: Route, target: Target, password: str, verify: bool = False) -> ClientOptions:
        """The session options: the route's TLS policy (``verify`` forces "verify"), for ``target.host``.

        The certificate is checked against the configured name of the next
        hop (the smart host's or MX host's name), never against an address.
        """
        return ClientOptions(
            hostname=self._config.hostname,
            tls=TLS_VERIFY if verify else route.tls,
            tls_hostname=target.host,
            ca_file=self._config.delivery.tls_ca_file,
            username=route.username,
            password=password,
            auth_in_clear=route.auth_in_clear,
        )

    # -- MTA-STS ---------------------------------------------------------------

    def _sts_policy(self, route: Route) -> Deferred:
        """The MTA-STS policy of an MX route's domain (None: none, or MTA-STS off)."""
        if self._mta_sts is None or route.kind != ROUTE_MX or not route.hosts:
            return defer.succeed(None)
        return self._mta_sts.policy(route.hosts[0].host)

    def _apply_sts(
        self, envelope: Envelope, route: Route, targets: list[Target], policy: Any
    ) -> tuple[list[Target], bool]:
        """The targets a policy allows, and whether their TLS must be verified.

        enforce: only MX hosts matching the policy, TLS verified for the MX
        name; testing: every target, and what enforce would refuse is logged;
        none (or no policy): every target, the route's own TLS policy.
        """
        if policy is None or policy.mode not in (MODE_ENFORCE, MODE_TESTING):
            return targets, False
        domain = route.hosts[0].host
        refused = sorted({t.host for t in targets if not policy.matches(t.host)})
        if policy.mode == MODE_TESTING:
            for host in refused:
                log.warn(
                    "{queue_id}: MTA-STS testing: {host} does not match the policy of {domain}; enforce mode would not use it",
                    queue_id=envelope.queue_id, host=host, domain=domain,
                )
            return targets, False
        for host in refused:
            log.info(
                "{queue_id}: MTA-STS: {host} does not match the policy of {domain}; not used",
                queue_id=envelope.queue_id, host=host, domain=domain,
            )
        return [t for t in targets if policy.matches(t.host)], True

    # -- results ---------------------------------------------------------------

    def _replies_to_outcomes(self, members: list[_Member], result: TransactionResult, target: Target) -> list[Outcome]:
        host = host_label(target)
        outcomes = []
        for m in members:
            reply = result.replies.get(m.recipient.address)
            if reply is None:
                outcomes.append(local_outcome(m.recipient.address, OUTCOME_TRANSIENT, STATUS_NO_ANSWER, TEXT_NO_REPLY, m.route.rule, host))
            else:
                outcomes.append(replace(reply_outcome(m.recipient.address, reply, host, m.route.rule), tls=result.tls))
        return outcomes

    def _log_outcomes(self, outcomes: list[Outcome], envelope: Envelope, started: float) -> list[Outcome]:
        now = self._reactor.seconds()
        log.debug("{queue_id}: attempt for {count} recipient(s) took {duration:.3f} s", queue_id=envelope.queue_id,
                  count=len(outcomes), duration=max(0.0, now - started), event="attempt")
        for outcome in outcomes:
            self._log_outcome(envelope, outcome, now)
        return outcomes

    def _log_outcome(self, envelope: Envelope, outcome: Outcome, now: Optional[float] = None) -> None:
        now = self._reactor.seconds() if now is None else now
        try:
            attempt = envelope.recipient(outcome.recipient).attempts + 1
        except KeyError:
            attempt = None
        log.info(
            "{queue_id}: to=<{recipient}> rule={rule} host={host} tls=({tls}) {kind}: {reply}",
            queue_id=envelope.queue_id,
            recipient=outcome.recipient,
            rule=outcome.rule or "-",
            host=outcome.host or "-",
            tls=outcome.tls or TEXT_NO_TLS,
            kind=outcome.kind,
            reply=outcome.describe(),
            event=OUTCOME_EVENTS.get(outcome.kind, outcome.kind),
            attempt=attempt,
            delay=round(max(0.0, now - envelope.arrival), 3) if envelope.arrival else None,
        )


def _unreachable(member: _Member, last: _Unreachable) -> Outcome:
    return local_outcome(member.recipient.address, OUTCOME_TRANSIENT, STATUS_NO_ANSWER, last.text, member.route.rule, last.host)


def _addresses(members: Iterable[_Member]) -> str:
    return ", ".join(f"<{m.recipient.address}>" for m in members)


def _pool_key(target: Target, options: ClientOptions, route: Route) -> PoolKey:
    """Connections are shared only between identical sessions: same peer, same TLS and AUTH."""
    return (
        target.address,
        target.port,
        options.hostname,
        options.tls,
        options.tls_hostname,
        options.ca_file,
        options.username,
        route.password_file,
        options.auth_in_clear,
    )
