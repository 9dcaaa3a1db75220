"""Delivery: one attempt along each recipient's Route, one Outcome per recipient.

This module owns step 5 of the data flow on the queue's side.  For one
message it asks the router chain for the route of every pending recipient
(again at every attempt, so configuration changes apply to queued mail),
groups the recipients whose routes share a destination into one transaction,
resolves the destination's hosts once per group, and tries them in order
until one takes the transaction.  It never retries by itself: what did not
work becomes a transient Outcome, and the scheduler decides when to try again.

The outcome buckets (delivered, transient, permanent) and the typed reasons
are decided in ``relay.outcome``; this module only says which applies.

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
``per_destination`` per destination address; ``relay.connections`` keeps
them): work beyond the limits waits in its destination's line, it never
fails, and the lines take turns, so a stalled destination holds only its
own connections.  A destination none of whose hosts answered is suspended
until the next retry (``[queue] min_retry``; ``relay.suspension`` keeps
them): its mail, waiting or new, is deferred without a connection.  The
message bytes are read when a connection is ready for them
(``relay.outgoing``); what delivery derives from each next hop (labels,
session options, pool keys) is in ``relay.nexthop``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Union

from twisted.internet import defer, error as neterror
from twisted.internet.defer import Deferred
from relay.log import Logger
from twisted.python.failure import Failure

from relay.config import Config
from relay.connections import ConnectionPool
from relay.mta_sts import MODE_ENFORCE, MODE_TESTING
from relay.envelope import (
    OUTCOME_DELIVERED,
    OUTCOME_PERMANENT,
    OUTCOME_TRANSIENT,
    ROUTE_MX,
    ROUTE_REJECT,
    TLS_MAY,
    Envelope,
    Outcome,
    Recipient,
    Route,
)
from relay.outcome import (
    STATUS_MTA_STS,
    STATUS_NO_ANSWER,
    TEXT_MTA_STS_NO_MX,
    TEXT_NO_REPLY,
    TEXT_NO_TARGETS,
    TEXT_ROUTING,
    Reason,
    Unreachable,
    classify,
    internal_outcome,
    local_outcome,
    reject_outcome,
    reply_outcome,
    resolution_outcome,
    unreachable_outcome,
)
from relay.outgoing import BodyUnavailable, MessageBody, transaction_for
from relay.routing import RouteContext
from relay.nexthop import PasswordError, host_label, pool_key, read_password, session_options, unreachable_target
from relay.routing.dns import ResolutionError
from relay.routing.mx import Target
from relay.smtp import connect as smtp_connect
from relay.smtp.transaction import ClientOptions, SessionError, Transaction, TransactionResult
from relay.seams import MessageSource, Resolver
from relay.suspension import DestinationSuspended, Suspension, Suspensions
from relay.trust import TrustStore

log = Logger()

TEXT_NO_TLS = "no TLS"
TEXT_TLS_FALLBACK = "no TLS: the TLS handshake failed, sent in clear"
TEXT_SUSPENDED = "delivery temporarily suspended"
TEXT_NO_ANSWER_BEFORE = "the destination did not answer"
# The stable log event of each outcome (relay.log): what the JSON log and the metrics see.
OUTCOME_EVENTS = {OUTCOME_DELIVERED: "delivered", OUTCOME_TRANSIENT: "deferred", OUTCOME_PERMANENT: "bounced"}

Connect = Callable[..., Deferred]
# progress(outcomes): the outcomes of one destination, while the message's others still run.
Progress = Callable[[list[Outcome]], None]


# -- delivery ----------------------------------------------------------------------


@dataclass(frozen=True)
class _RoutedRecipient:
    """A recipient of a group with the route it takes this time."""

    recipient: Recipient
    route: Route


class Delivery:
    """Executes routes: one attempt for every pending recipient of a message."""

    def __init__(
        self,
        config: Config,
        chain: Any,
        resolver: Resolver,
        spool: MessageSource,
        reactor: Any,
        connect: Optional[Connect] = None,
        mta_sts: Any = None,
        trust: Optional[TrustStore] = None,
    ) -> None:
        """``mta_sts``: a PolicyCache (built from ``resolver`` when ``[delivery] mta_sts`` is on).

        ``trust``: the loaded ``[delivery] tls_ca_file`` (built here, read at the first use, when not given).
        """
        self._config = config
        self._chain = chain
        self._resolver = resolver
        self._spool = spool
        self._reactor = reactor
        self._trust = trust if trust is not None else TrustStore(config.delivery.tls_ca_file)
        if mta_sts is None and config.delivery.mta_sts:
            from relay.mta_sts import policy_cache

            mta_sts = policy_cache(resolver, reactor, self._trust)
        self._mta_sts = mta_sts
        self.pool = ConnectionPool(
            reactor,
            connect or smtp_connect.connect,
            config.delivery.concurrency,
            config.delivery.per_destination,
            reuse_count=config.delivery.connection_reuse_count,
            reuse_time=config.delivery.connection_reuse_time,
        )
        self.suspensions = Suspensions(reactor, config.queue.min_retry)

    # -- public ----------------------------------------------------------------

    def attempt(self, envelope: Envelope, progress: Optional[Progress] = None, forced: bool = False) -> Deferred:
        """One attempt for every pending recipient; fires with one Outcome each, never errbacks.

        ``progress`` hears the outcomes of each destination whose transaction
        ended while others of the message are still running, so they can be
        recorded at once.  ``forced`` (a flush) ignores suspended destinations.
        """
        pending = envelope.pending()
        try:
            d = Deferred.fromCoroutine(self._attempt(envelope, pending, progress, forced))
        except Exception:
            d = defer.fail()
        d.addErrback(self._attempt_failed, envelope, pending)
        return d

    def close(self) -> Deferred:
        """Close the idle connections (at shutdown); fires when they are closed."""
        return self.pool.close()

    # -- one attempt -----------------------------------------------------------

    async def _attempt(
        self, envelope: Envelope, pending: tuple[Recipient, ...], progress: Optional[Progress], forced: bool
    ) -> list[Outcome]:
        context = RouteContext.from_envelope(envelope, self._config.hostname)
        routed = await _gathered([self._route(envelope, r, context) for r in pending])
        outcomes: dict[int, Outcome] = {}
        groups: dict[tuple, list[tuple[int, _RoutedRecipient]]] = {}
        for index, (recipient, route) in enumerate(routed):
            if isinstance(route, Outcome):
                outcomes[index] = route
            elif route.kind == ROUTE_REJECT:
                outcomes[index] = reject_outcome(recipient.address, route)
                self._log_outcome(envelope, outcomes[index])
            else:
                groups.setdefault(route.destination(), []).append((index, _RoutedRecipient(recipient, route)))
        body = MessageBody(self._spool, envelope.queue_id)
        running = [len(groups)]

        def ended(group_outcomes: list[Outcome]) -> list[Outcome]:
            running[0] -= 1
            if progress is not None and running[0] > 0:
                progress(group_outcomes)
            return group_outcomes

        results = await _gathered(
            [
                self._deliver_group(envelope, [m for _, m in members], body, forced).addCallback(ended)
                for members in groups.values()
            ]
        )
        for members, group_outcomes in zip(groups.values(), results):
            for (index, _), outcome in zip(members, group_outcomes):
                outcomes[index] = outcome
        return [outcomes[i] for i in range(len(pending))]

    def _attempt_failed(self, failure: Failure, envelope: Envelope, pending: tuple[Recipient, ...]) -> list[Outcome]:
        log.failure("{queue_id}: delivery attempt failed", failure, queue_id=envelope.queue_id)
        return [internal_outcome(r.address) for r in pending]

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
            return recipient, internal_outcome(recipient.address, text=TEXT_ROUTING, reason=Reason.ROUTING)

        d.addCallbacks(routed, failed)
        return d

    # -- one destination -------------------------------------------------------

    def _deliver_group(self, envelope: Envelope, members: list[_RoutedRecipient], body: MessageBody, forced: bool) -> Deferred:
        """Fire with one Outcome per member, in order; an unexpected error makes them transient."""
        d = Deferred.fromCoroutine(self._deliver(envelope, members, body, forced))

        def failed(failure: Failure) -> list[Outcome]:
            log.failure(
                "{queue_id}: delivery to {recipients} failed with a local error",
                failure,
                queue_id=envelope.queue_id,
                recipients=_addresses(members),
            )
            return [internal_outcome(m.recipient.address, m.route.rule) for m in members]

        d.addErrback(failed)
        d.addCallback(self._log_outcomes, envelope, self._reactor.seconds())
        return d

    async def _deliver(self, envelope: Envelope, members: list[_RoutedRecipient], body: MessageBody, forced: bool) -> list[Outcome]:
        route = members[0].route
        destination = route.destination()
        suspension = None if forced else self.suspensions.get(destination)
        if suspension is not None:
            return self._suspended_outcomes(envelope, members, suspension)
        try:
            password = read_password(route.password_file) if route.password_file else ""
        except PasswordError as e:
            log.error("{queue_id}: route {rule}: {error}", queue_id=envelope.queue_id, rule=route.rule, error=str(e))
            return [internal_outcome(m.recipient.address, m.route.rule, str(e), Reason.PASSWORD) for m in members]
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
            return [resolution_outcome(m.recipient.address, e.status, e.text, m.route.rule) for m in members]
        if not targets:
            return [local_outcome(m.recipient.address, Reason.NO_TARGETS, STATUS_NO_ANSWER, TEXT_NO_TARGETS, m.route.rule) for m in members]
        policy = await self._sts_policy(route)
        targets, enforce = self._apply_sts(envelope, route, targets, policy)
        if not targets:
            return [local_outcome(m.recipient.address, Reason.MTA_STS, STATUS_MTA_STS, TEXT_MTA_STS_NO_MX, m.route.rule) for m in members]
        transaction = transaction_for(envelope, [(m.recipient, m.route) for m in members], body)
        last: Optional[Unreachable] = None
        for target in targets:
            options = session_options(self._config, self._trust, route, target, password, verify=enforce)
            try:
                result, in_clear = await self._try_target(envelope, target, options, transaction, route, body,
                                                          destination)
            except DestinationSuspended:
                suspension = self.suspensions.get(destination)
                if suspension is None:
                    suspension = Suspension(0.0, TEXT_NO_ANSWER_BEFORE, host_label(target), Reason.SUSPENDED)
                return self._suspended_outcomes(envelope, members, suspension)
            except BodyUnavailable:
                return [internal_outcome(m.recipient.address, m.route.rule, reason=Reason.MESSAGE_UNREADABLE) for m in members]
            if isinstance(result, Unreachable):
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
            self.suspensions.lift(destination)
            return self._replies_to_outcomes(members, result, target, in_clear)
        assert last is not None
        if not forced:
            self.suspensions.suspend(envelope.queue_id, destination, last)
        return [unreachable_outcome(m.recipient.address, last, m.route.rule) for m in members]

    def _suspended_outcomes(self, envelope: Envelope, members: list[_RoutedRecipient], suspension: Suspension) -> list[Outcome]:
        text = f"{TEXT_SUSPENDED}: {suspension.text}"
        return [local_outcome(m.recipient.address, Reason.SUSPENDED, STATUS_NO_ANSWER, text, m.route.rule, suspension.host)
                for m in members]

    async def _try_target(
        self, envelope: Envelope, target: Target, options: ClientOptions, transaction: Transaction, route: Route,
        body: MessageBody, destination: tuple,
    ) -> tuple[Union[TransactionResult, Unreachable], bool]:
        """Hand the transaction to ``target``: its result (or why it could not take it),
        and whether it went in clear after a failed TLS handshake.

        A reused idle connection that fails before any reply is replaced by a
        fresh one once (the peer may have dropped it while idle).  With
        ``tls = "may"``, a STARTTLS handshake that fails is followed at once
        by a session in clear.  Raises DestinationSuspended when the wait for
        a connection was cut short by a suspension, BodyUnavailable when the
        message cannot be read.
        """
        fresh = False
        while True:
            key = pool_key(target, options, route)
            checkout = self.pool.checkout(key, target, options, fresh=fresh)
            self.suspensions.park(destination, checkout)
            try:
                conn, reused = await checkout
            except defer.CancelledError:
                raise DestinationSuspended() from None
            except Exception:
                failure = Failure()
                if self._may_fall_back(options, failure.value):
                    options = self._in_clear(envelope, target, options)
                    continue
                if not failure.check(SessionError, neterror.ConnectError, OSError):
                    log.failure("{queue_id}: connecting to {host} failed", failure, queue_id=envelope.queue_id, host=host_label(target))
                return unreachable_target(target, failure), not options.starttls
            finally:
                self.suspensions.unpark(destination, checkout)
            try:
                if not body.loaded:
                    await body.load()
            except Exception:
                log.failure("{queue_id}: cannot read the queued message; deferred", queue_id=envelope.queue_id)
                self.pool.checkin(key, target.address, conn, reusable=True, idle_timeout=options.timeouts.idle)
                raise BodyUnavailable() from None
            try:
                result = await conn.send(transaction)
            except SessionError as e:
                self.pool.checkin(key, target.address, conn, reusable=False)
                if reused and e.transient and not fresh:
                    fresh = True
                    continue
                if not e.transient and e.reply is not None and classify(e.reply.code) == OUTCOME_PERMANENT:
                    return TransactionResult({a: e.reply for a, _ in transaction.recipients}, target.host, ""), not options.starttls
                return unreachable_target(target, Failure(e)), not options.starttls
            except Exception:
                self.pool.checkin(key, target.address, conn, reusable=False)
                raise
            self.pool.checkin(key, target.address, conn, reusable=_clean(result), idle_timeout=options.timeouts.idle)
            return result, not options.starttls

    def _may_fall_back(self, options: ClientOptions, error: BaseException) -> bool:
        """Whether a failed session may be tried again in clear: opportunistic TLS whose handshake failed."""
        return (
            options.tls == TLS_MAY
            and options.starttls
            and isinstance(error, SessionError)
            and error.reason in (Reason.TLS_HANDSHAKE, Reason.TLS_LOST)  # not a certificate check, not a refusal
        )

    def _in_clear(self, envelope: Envelope, target: Target, options: ClientOptions) -> ClientOptions:
        log.warn(
            "{queue_id}: TLS handshake with {host} failed; trying again in clear (tls = \"may\")",
            queue_id=envelope.queue_id,
            host=host_label(target),
            event="tls_fallback",
        )
        return replace(options, starttls=False)

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

    def _replies_to_outcomes(
        self, members: list[_RoutedRecipient], result: TransactionResult, target: Target, in_clear: bool = False
    ) -> list[Outcome]:
        """One Outcome per member from the peer's replies; ``in_clear``: sent in clear after a failed handshake."""
        host = host_label(target)
        outcomes = []
        for m in members:
            reply = result.replies.get(m.recipient.address)
            if reply is None:
                outcomes.append(local_outcome(m.recipient.address, Reason.NO_REPLY, STATUS_NO_ANSWER, TEXT_NO_REPLY, m.route.rule, host))
            else:
                outcome = reply_outcome(m.recipient.address, reply, host, m.route.rule)
                outcomes.append(replace(outcome, tls=result.tls, tls_fallback=in_clear, dsn_passed=result.dsn))
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
            tls=outcome.tls or (TEXT_TLS_FALLBACK if outcome.tls_fallback else TEXT_NO_TLS),
            kind=outcome.kind,
            reply=outcome.describe() if outcome.remote or not outcome.code else f"relay: {outcome.describe()}",
            event=OUTCOME_EVENTS.get(outcome.kind, outcome.kind),
            attempt=attempt,
            delay=round(max(0.0, now - envelope.arrival), 3) if envelope.arrival else None,
        )


def _gathered(deferreds: list[Deferred]) -> Deferred:
    """``gatherResults`` of Deferreds that never errback; one alone needs no DeferredList (most messages)."""
    if len(deferreds) == 1:
        return deferreds[0].addCallback(lambda result: [result])
    return defer.gatherResults(deferreds)


def _addresses(members: Iterable[_RoutedRecipient]) -> str:
    return ", ".join(f"<{m.recipient.address}>" for m in members)


def _clean(result: TransactionResult) -> bool:
    """Whether a connection may carry another transaction: the peer accepted something in this one.

    A session whose every recipient was refused is not reused: peers count
    such transactions as errors and cut the client off (Postfix's "too many
    errors", Exim's "too many nonmail commands").
    """
    return any(200 <= reply.code < 300 for reply in result.replies.values())
