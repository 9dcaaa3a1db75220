"""Tests for relay.delivery: routes executed, one outcome per recipient, limits, reuse."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from deferreds import no_result, success
from relay.config import Config, DeliveryConfig, config_from_mapping
from relay.config_values import ConfigError
from relay.delivery import Delivery
from relay.domains import DomainSet
from relay.envelope import (
    DELIVERED,
    OUTCOME_DELIVERED,
    OUTCOME_PERMANENT,
    OUTCOME_TRANSIENT,
    ROUTE_REJECT,
    ROUTE_SMARTHOST,
    ROUTE_SOURCE,
    TLS_MAY,
    TLS_REQUIRE,
    TLS_VERIFY,
    Attempt,
    Envelope,
    NextHop,
    Recipient,
    Route,
)
from relay.interfaces import IRouter
from relay.outcome import STAGE_CONNECT, TEXT_INTERNAL, TEXT_ROUTING, Reason
from relay.mta_sts import Policy
from relay.routing import RouterChain, build_chain
from relay.routing.dns import ResolutionError
from relay.routing.mx import Target
from relay.smtp.transaction import STAGE_GREETING, STAGE_LOST, ClientOptions, SessionError, Transaction, TransactionResult
from relay.smtp.replies import Reply

OK = Reply(250, "2.0.0", "Ok: queued as ABC")
IDLE = ClientOptions(hostname="x").timeouts.idle


# -- fakes -------------------------------------------------------------------------


@implementer(IRouter)
class MapRouter:
    """Answers a fixed Route per recipient address (None: no opinion)."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.routes = routes
        self.asked: list[str] = []

    def route(self, recipient: Recipient, context: Any) -> Any:
        self.asked.append(recipient.address)
        answer = self.routes.get(recipient.address)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakeResolver:
    """Targets per first hop host; a ResolutionError or other exception to raise instead."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.calls: list[tuple[Route, int]] = []

    def targets(self, route: Route, default_port: int) -> Deferred:
        self.calls.append((route, default_port))
        answer = self.table[route.hosts[0].host]
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        return defer.succeed(list(answer))


class FakeConnection:
    """Stands for SMTPClientProtocol: records transactions, answers by script."""

    def __init__(self, connector: "FakeConnector", address: str, port: int, host: str, options: ClientOptions) -> None:
        self.connector = connector
        self.address = address
        self.port = port
        self.host = host
        self.options = options
        self.busy = False
        self.closed = False
        self.sent: list[Transaction] = []
        self.quits = 0

    def send(self, transaction: Transaction) -> Deferred:
        assert not self.busy and not self.closed, "send on a busy or closed connection"
        self.sent.append(transaction)
        self.busy = True
        d = self.connector.answer(self, transaction)

        def done(result: Any) -> Any:
            self.busy = False
            return result

        return d.addBoth(done)

    def quit(self) -> Deferred:
        self.quits += 1
        self.closed = True
        return defer.succeed(None)


@dataclass
class FakeConnector:
    """The ``connect`` function: per-address failures, reply scripts, open connection counts."""

    failures: dict[str, SessionError] = field(default_factory=dict)
    replies: Callable[[str, str], Reply] = lambda address, rcpt: OK  # (target address, rcpt) -> Reply
    manual: bool = False  # sends wait until released by hand
    send_errors: dict[str, Exception] = field(default_factory=dict)
    connections: list[FakeConnection] = field(default_factory=list)
    calls: list[tuple[str, int, str, ClientOptions]] = field(default_factory=list)
    held: list[tuple[FakeConnection, Transaction, Deferred]] = field(default_factory=list)
    max_open: int = 0
    max_open_by_address: dict[str, int] = field(default_factory=dict)

    def __call__(self, reactor: Any, address: str, port: int, host: str, options: ClientOptions) -> Deferred:
        self.calls.append((address, port, host, options))
        if address in self.failures:
            return defer.fail(self.failures[address])
        conn = FakeConnection(self, address, port, host, options)
        self.connections.append(conn)
        self.max_open = max(self.max_open, self.open())
        self.max_open_by_address[address] = max(self.max_open_by_address.get(address, 0), self.open(address))
        return defer.succeed(conn)

    def open(self, address: Optional[str] = None) -> int:
        return sum(1 for c in self.connections if not c.closed and (address is None or c.address == address))

    def answer(self, conn: FakeConnection, transaction: Transaction) -> Deferred:
        error = self.send_errors.pop(conn.address, None)
        if error is not None:
            conn.closed = True
            return defer.fail(error)
        if self.manual:
            d: Deferred = Deferred()
            self.held.append((conn, transaction, d))
            return d
        return defer.succeed(self.result(conn, transaction))

    def result(self, conn: FakeConnection, transaction: Transaction) -> TransactionResult:
        replies = {a: self.replies(conn.address, a) for a, _ in transaction.recipients}
        return TransactionResult(replies, conn.host, "")

    def release_one(self) -> None:
        conn, transaction, d = self.held.pop(0)
        d.callback(self.result(conn, transaction))


class FakeSpool:
    def __init__(self) -> None:
        self.opened: list[str] = []

    def open_message(self, queue_id: str) -> io.BytesIO:
        self.opened.append(queue_id)
        return io.BytesIO(b"Subject: hi\r\n\r\nbody\r\n")

    def message_opener(self, queue_id: str) -> Deferred:
        return defer.succeed(lambda: self.open_message(queue_id))


def refused(address: str, host: str = "mx") -> SessionError:
    """What ``relay.smtp.connect.connect`` raises when the peer refuses the TCP connection."""
    return SessionError(None, True, STAGE_CONNECT, f"cannot connect to {host} [{address}]:25: Connection refused",
                        Reason.CONNECT_REFUSED)


def mx(domain: str) -> Route:
    return Route(kind="mx", hosts=(NextHop(domain, mx=True),))


def envelope(*addresses: str, queue_id: str = "Q1", **kw: Any) -> Envelope:
    return Envelope(queue_id=queue_id, sender="s@origin.test", recipients=tuple(Recipient(a) for a in addresses), size=123, **kw)


DEFAULT_TARGETS = {
    "a.test": [Target("mx1.a.test", "127.0.0.2", 25, 10), Target("mx2.a.test", "127.0.0.3", 25, 20)],
    "b.test": [Target("mx.b.test", "127.0.0.4", 25, 10)],
}


class Harness:
    """A Delivery with a real RouterChain of fake routers, a fake resolver and connector on a Clock."""

    def __init__(
        self,
        routes: Optional[dict[str, Any]] = None,
        targets: Optional[dict[str, Any]] = None,
        connector: Optional[FakeConnector] = None,
        concurrency: int = 50,
        per_destination: int = 10,
        **delivery: Any,
    ) -> None:
        self.router = MapRouter(routes or {})
        verifyObject(IRouter, self.router)
        self.chain = RouterChain([("routes[0]", DomainSet(["*"]), self.router)])
        self.resolver = FakeResolver(dict(DEFAULT_TARGETS, **(targets or {})))
        self.connector = connector or FakeConnector()
        self.clock = Clock()
        self.spool = FakeSpool()
        config = Config(hostname="relay.test", delivery=DeliveryConfig(concurrency=concurrency, per_destination=per_destination, **delivery))
        self.delivery = Delivery(config, self.chain, self.resolver, self.spool, self.clock, connect=self.connector)

    def attempt(self, env: Envelope, **options: Any) -> Deferred:
        return self.delivery.attempt(env, **options)


@pytest.fixture
def events():
    captured: list[dict] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)




def by_address(outcomes):
    return {o.recipient: o for o in outcomes}


# -- routing -----------------------------------------------------------------------------


def test_reject_route_is_permanent_550_with_reason():
    """A reject route gives a permanent 550 5.7.1 outcome with the route's reason and connects nowhere."""
    h = Harness(routes={"u@blocked.test": Route(kind=ROUTE_REJECT, reason="no mail to this domain")})
    [outcome] = success(h.attempt(envelope("u@blocked.test")))
    assert (outcome.kind, outcome.code, outcome.status, outcome.text) == (OUTCOME_PERMANENT, 550, "5.7.1", "no mail to this domain")
    assert outcome.rule == "routes[0]"
    assert h.connector.calls == [] and h.resolver.calls == []


def test_router_failure_is_transient_for_that_recipient_only():
    """A router that raises makes only its recipient transient, with a generic text."""
    h = Harness(routes={"x@a.test": RuntimeError("secret detail")})
    outcomes = by_address(success(h.attempt(envelope("x@a.test", "y@a.test"))))
    assert outcomes["x@a.test"].kind == OUTCOME_TRANSIENT
    assert outcomes["x@a.test"].text == TEXT_ROUTING
    assert "secret" not in outcomes["x@a.test"].describe()
    assert outcomes["y@a.test"].kind == OUTCOME_DELIVERED


def test_routing_is_evaluated_at_each_attempt():
    """A changed routing answer applies to the next attempt of the same message."""
    h = Harness()
    env = envelope("u@a.test")
    assert success(h.attempt(env))[0].kind == OUTCOME_DELIVERED
    h.router.routes["u@a.test"] = Route(kind=ROUTE_REJECT, reason="now blocked")
    assert success(h.attempt(env))[0].kind == OUTCOME_PERMANENT
    assert h.router.asked == ["u@a.test", "u@a.test"]


def test_only_pending_recipients_are_attempted():
    """Recipients already delivered get no outcome and are not routed again."""
    h = Harness()
    env = envelope("u@a.test", "v@a.test")
    env = env.with_recipients([Recipient("u@a.test", status=DELIVERED)])
    outcomes = success(h.attempt(env))
    assert [o.recipient for o in outcomes] == ["v@a.test"]
    assert h.router.asked == ["v@a.test"]


# -- grouping ----------------------------------------------------------------------------


def test_mixed_domains_make_two_transactions_and_same_domain_shares_one():
    """Recipients of one destination share one transaction; another domain gets its own."""
    h = Harness()
    outcomes = success(h.attempt(envelope("a1@a.test", "b1@b.test", "a2@a.test")))
    assert [o.recipient for o in outcomes] == ["a1@a.test", "b1@b.test", "a2@a.test"]
    assert all(o.kind == OUTCOME_DELIVERED for o in outcomes)
    sent = {c.address: [t.recipients for t in c.sent] for c in h.connector.connections}
    assert sent == {
        "127.0.0.2": [(("a1@a.test", ()), ("a2@a.test", ()))],
        "127.0.0.4": [(("b1@b.test", ()),)],
    }
    assert len(h.resolver.calls) == 2


def test_transaction_carries_the_envelope():
    """The transaction has the envelope's sender, size, body, SMTPUTF8 flag, queue id and message bytes."""
    h = Harness()
    success(h.attempt(envelope("u@a.test", body_type="8BITMIME", smtputf8=True)))
    [transaction] = h.connector.connections[0].sent
    assert (transaction.sender, transaction.size, transaction.body_type, transaction.smtputf8, transaction.queue_id) == ("s@origin.test", 123, "8BITMIME", True, "Q1")
    assert transaction.open_message().read() == b"Subject: hi\r\n\r\nbody\r\n"
    assert h.spool.opened == ["Q1"]


def test_smarthost_options_and_port():
    """A smart host route connects with the relay's hostname, the route's TLS policy and the target's name for TLS."""
    route = Route(kind=ROUTE_SMARTHOST, hosts=(NextHop("smart.test", 587),), tls="verify")
    h = Harness(routes={"u@a.test": route}, targets={"smart.test": [Target("smart.test", "127.0.0.9", 587)]})
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_DELIVERED and outcome.host == "smart.test[127.0.0.9]"
    [(address, port, host, options)] = h.connector.calls
    assert (address, port, host) == ("127.0.0.9", 587, "smart.test")
    assert (options.hostname, options.tls, options.tls_hostname, options.username) == ("relay.test", "verify", "smart.test", "")
    assert h.resolver.calls[0][1] == 25


def test_rcpt_route_is_passed_through():
    """A source route's remaining hops travel with the recipient in the transaction."""
    route = Route(kind=ROUTE_SOURCE, hosts=(NextHop("gw1.test", 2525),), rcpt_route=("gw2.test", "gw3.test"))
    h = Harness(routes={"u@legacy.test": route}, targets={"gw1.test": [Target("gw1.test", "127.0.0.7", 2525)]})
    success(h.attempt(envelope("u@legacy.test")))
    [transaction] = h.connector.connections[0].sent
    assert transaction.recipients == (("u@legacy.test", ("gw2.test", "gw3.test")),)


# -- DNS ---------------------------------------------------------------------------------


def test_dns_permanent_failure_fails_every_recipient_of_the_group(events):
    """NXDOMAIN is a permanent outcome with the resolver's status for each recipient of the domain."""
    error = ResolutionError("5.1.2", "domain nx.test does not exist")
    h = Harness(targets={"nx.test": error})
    outcomes = success(h.attempt(envelope("a@nx.test", "b@nx.test", "c@b.test")))
    for o in outcomes[:2]:
        assert (o.kind, o.code, o.status, o.text) == (OUTCOME_PERMANENT, 0, "5.1.2", "DNS: domain nx.test does not exist")
    assert outcomes[2].kind == OUTCOME_DELIVERED
    assert len(h.resolver.calls) == 2
    assert any("Q1" in formatEvent(e) and "does not exist" in formatEvent(e) for e in events)


def test_dns_transient_failure_defers():
    """A DNS timeout or SERVFAIL is a transient outcome and nothing is connected."""
    h = Harness(targets={"a.test": ResolutionError("4.4.3", "DNS lookup of a.test MX failed: timed out")})
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert (outcome.kind, outcome.status) == (OUTCOME_TRANSIENT, "4.4.3")
    assert outcome.text.startswith("DNS: ")
    assert h.connector.calls == []


# -- failover ----------------------------------------------------------------------------


def test_failover_to_next_target_on_connection_refused():
    """A refused connection moves on to the next MX host, which delivers."""
    h = Harness(connector=FakeConnector(failures={"127.0.0.2": refused("127.0.0.2")}))
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_DELIVERED
    assert outcome.host == "mx2.a.test[127.0.0.3]"
    assert [c[0] for c in h.connector.calls] == ["127.0.0.2", "127.0.0.3"]


def test_failover_on_4xx_greeting():
    """A 421 greeting (a SessionError with a reply) moves on to the next host."""
    busy = SessionError(Reply(421, "4.3.2", "busy"), True, STAGE_GREETING)
    h = Harness(connector=FakeConnector(failures={"127.0.0.2": busy}))
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_DELIVERED and outcome.host == "mx2.a.test[127.0.0.3]"


def test_every_host_refusing_its_greeting_ends_in_the_last_hosts_words():
    """Both MX hosts answer 421 at greeting: transient, with the last host's code, status and text, marked remote."""
    busy = SessionError(Reply(421, "4.7.0", "too many connections"), True, STAGE_GREETING)
    h = Harness(connector=FakeConnector(failures={"127.0.0.2": busy, "127.0.0.3": busy}))
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert (outcome.kind, outcome.code, outcome.status, outcome.text) == (OUTCOME_TRANSIENT, 421, "4.7.0", "too many connections")
    assert (outcome.host, outcome.remote, outcome.reason) == ("mx2.a.test[127.0.0.3]", True, "session-refused")


def test_a_reply_relay_made_up_is_not_the_peers():
    """A LocalReply from the client (the size over the peer's limit) becomes a local outcome with its reason."""
    from relay.outcome import LocalReply

    too_big = LocalReply(552, "5.3.4", "message size 99 exceeds the remote server's limit of 10 octets", Reason.MESSAGE_TOO_BIG)
    h = Harness(connector=FakeConnector(replies=lambda address, rcpt: too_big))
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert (outcome.kind, outcome.code, outcome.status) == (OUTCOME_PERMANENT, 552, "5.3.4")
    assert (outcome.host, outcome.remote, outcome.reason) == ("mx1.a.test[127.0.0.2]", False, "message-too-big")
    [accepted] = success(Harness().attempt(envelope("v@a.test")))
    assert (accepted.remote, accepted.reason) == (True, "")


def test_all_targets_failed_is_transient_with_the_last_error():
    """When no host takes the mail the outcome is transient and names the last host's error."""
    h = Harness(connector=FakeConnector(failures={"127.0.0.2": refused("127.0.0.2"), "127.0.0.3": refused("127.0.0.3")}))
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_TRANSIENT and outcome.code == 0
    assert outcome.text == "connect to mx2.a.test[127.0.0.3]:25: Connection refused"
    assert (outcome.status, outcome.remote, outcome.reason) == ("4.4.1", False, "connect-refused")
    assert h.delivery.pool.open_connections == 0


def test_unexpected_connect_exception_moves_on_without_its_text():
    """A non-network exception while connecting is logged, hides its text and moves on."""
    class Boom(FakeConnector):
        def __call__(self, reactor, address, port, host, options):
            if address == "127.0.0.2":
                raise ValueError("internal secret")
            return super().__call__(reactor, address, port, host, options)

    h = Harness(connector=Boom(failures={"127.0.0.3": refused("127.0.0.3")}))
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_TRANSIENT and "secret" not in outcome.describe()


def test_recipient_5xx_is_final_no_next_host():
    """A 5xx to RCPT from the first MX host is permanent and the second host is not tried."""
    connector = FakeConnector(replies=lambda address, rcpt: Reply(550, "5.1.1", "no such user"))
    h = Harness(connector=connector)
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert (outcome.kind, outcome.code, outcome.status, outcome.text) == (OUTCOME_PERMANENT, 550, "5.1.1", "no such user")
    assert outcome.host == "mx1.a.test[127.0.0.2]"
    assert [c[0] for c in connector.calls] == ["127.0.0.2"]


def test_partial_rcpt_refusal():
    """Each recipient of one transaction gets its own reply's bucket."""
    table = {"ok@a.test": OK, "gone@a.test": Reply(550, "5.1.1", "no such user"), "full@a.test": Reply(452, "4.2.2", "mailbox full")}
    h = Harness(connector=FakeConnector(replies=lambda address, rcpt: table[rcpt]))
    outcomes = by_address(success(h.attempt(envelope(*table))))
    assert outcomes["ok@a.test"].kind == OUTCOME_DELIVERED
    assert outcomes["gone@a.test"].kind == OUTCOME_PERMANENT
    assert outcomes["full@a.test"].kind == OUTCOME_TRANSIENT
    assert outcomes["full@a.test"].describe() == "452 4.2.2 mailbox full"
    assert len(h.connector.connections) == 1


def test_missing_reply_is_transient():
    """A recipient the client returned no reply for is transient rather than lost."""
    class Partial(FakeConnector):
        def result(self, conn, transaction):
            return TransactionResult({}, conn.host, "")

    h = Harness(connector=Partial())
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_TRANSIENT


def test_connection_lost_during_transaction_tries_next_host():
    """A session lost during the transaction (no reply) moves on to the next host."""
    connector = FakeConnector(send_errors={"127.0.0.2": SessionError(None, True, STAGE_LOST, "connection to mx1 lost")})
    h = Harness(connector=connector)
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_DELIVERED and outcome.host == "mx2.a.test[127.0.0.3]"


# -- limits ------------------------------------------------------------------------------


def test_per_destination_limit_queues_work_and_reuses_connections():
    """No more than per_destination connections to one address; waiting work proceeds on freed connections."""
    connector = FakeConnector(manual=True)
    h = Harness(connector=connector, per_destination=2)
    results = [h.attempt(envelope("u@b.test", queue_id=f"Q{i}")) for i in range(5)]
    assert connector.open("127.0.0.4") == 2
    assert len(connector.held) == 2
    assert h.delivery.pool.waiting == 3
    while connector.held:
        connector.release_one()
    assert all(success(d)[0].kind == OUTCOME_DELIVERED for d in results)
    assert connector.max_open_by_address["127.0.0.4"] == 2
    assert len(connector.connections) == 2
    assert sum(len(c.sent) for c in connector.connections) == 5


def test_total_concurrency_limit():
    """No more than [delivery] concurrency connections at once across destinations."""
    connector = FakeConnector(manual=True)
    targets = {f"d{i}.test": [Target(f"mx.d{i}.test", f"127.0.1.{i}", 25)] for i in range(6)}
    h = Harness(connector=connector, targets=targets, concurrency=3)
    results = [h.attempt(envelope(f"u@d{i}.test", queue_id=f"Q{i}")) for i in range(6)]
    assert connector.open() == 3 and h.delivery.pool.waiting == 3
    for d in results[:3]:
        no_result(d)
    while connector.held:
        connector.release_one()
        assert connector.open() <= 3
    assert connector.max_open == 3
    assert all(success(d)[0].kind == OUTCOME_DELIVERED for d in results)
    assert h.delivery.pool.open_connections <= 3


def test_idle_connection_is_closed_when_another_destination_waits():
    """An idle connection gives its place to work for another destination instead of blocking it."""
    h = Harness(concurrency=1)
    success(h.attempt(envelope("u@a.test")))
    first = h.connector.connections[0]
    assert not first.closed and h.delivery.pool.idle_connections == 1
    [outcome] = success(h.attempt(envelope("u@b.test")))
    assert outcome.kind == OUTCOME_DELIVERED
    assert first.quits == 1
    assert h.connector.max_open == 1


@pytest.mark.parametrize("seed", range(5))
def test_limits_hold_under_random_completion_order(seed):
    """With sends finishing in random order the limits always hold, every recipient is delivered and no place leaks."""
    import random

    rng = random.Random(seed)
    connector = FakeConnector(manual=True)
    targets = {f"d{i}.test": [Target(f"mx.d{i}.test", f"127.0.2.{i % 3}", 25)] for i in range(6)}
    h = Harness(connector=connector, targets=targets, concurrency=4, per_destination=2)
    results = [h.attempt(envelope(f"u@d{rng.randrange(6)}.test", f"v@d{rng.randrange(6)}.test", queue_id=f"Q{i}")) for i in range(40)]
    steps = 0
    while connector.held and steps < 1000:
        steps += 1
        conn, transaction, d = connector.held.pop(rng.randrange(len(connector.held)))
        d.callback(connector.result(conn, transaction))
        assert connector.open() <= 4
        assert all(connector.open(f"127.0.2.{i}") <= 2 for i in range(3))
        if rng.random() < 0.2:
            h.clock.advance(IDLE + 1)
    for d in results:
        assert all(o.kind == OUTCOME_DELIVERED for o in success(d))
    pool = h.delivery.pool
    assert pool.waiting == 0
    assert pool.open_connections == pool.idle_connections == connector.open()
    h.clock.advance(IDLE + 1)
    assert pool.open_connections == 0 == connector.open()


# -- reuse and idle close ------------------------------------------------------------------


def test_connection_is_reused_for_the_next_transaction():
    """A second message to the same destination goes over the same connection."""
    h = Harness()
    success(h.attempt(envelope("u@a.test", queue_id="Q1")))
    success(h.attempt(envelope("v@a.test", queue_id="Q2")))
    assert len(h.connector.connections) == 1
    assert [t.queue_id for t in h.connector.connections[0].sent] == ["Q1", "Q2"]


def test_idle_connection_closed_after_idle_time():
    """An idle connection is closed with QUIT once ClientTimeouts.idle passed on the clock."""
    h = Harness()
    success(h.attempt(envelope("u@a.test")))
    conn = h.connector.connections[0]
    h.clock.advance(IDLE - 1)
    assert conn.quits == 0
    h.clock.advance(2)
    assert conn.quits == 1
    assert h.delivery.pool.open_connections == 0
    success(h.attempt(envelope("v@a.test")))
    assert len(h.connector.connections) == 2


def test_close_quits_idle_connections():
    """Delivery.close() ends every idle connection and cancels its timer."""
    h = Harness()
    success(h.attempt(envelope("u@a.test", "v@b.test")))
    assert h.delivery.pool.idle_connections == 2
    success(h.delivery.close())
    assert all(c.quits == 1 for c in h.connector.connections)
    assert h.clock.getDelayedCalls() == []


def test_connection_not_pooled_after_close():
    """A transaction that ends after close() closes its connection instead of keeping it."""
    connector = FakeConnector(manual=True)
    h = Harness(connector=connector)
    d = h.attempt(envelope("u@a.test"))
    success(h.delivery.close())
    connector.release_one()
    assert success(d)[0].kind == OUTCOME_DELIVERED
    assert connector.connections[0].quits == 1 and h.delivery.pool.idle_connections == 0


def test_stale_reused_connection_is_replaced():
    """A reused connection that died while idle is replaced by a fresh one to the same host."""
    h = Harness()
    success(h.attempt(envelope("u@a.test")))
    h.connector.send_errors["127.0.0.2"] = SessionError(None, True, STAGE_LOST, "connection lost")
    [outcome] = success(h.attempt(envelope("v@a.test")))
    assert outcome.kind == OUTCOME_DELIVERED and outcome.host == "mx1.a.test[127.0.0.2]"
    assert [c.address for c in h.connector.connections] == ["127.0.0.2", "127.0.0.2"]


def test_peer_closed_idle_connection_is_not_reused():
    """An idle connection the peer closed is dropped and a new one is opened."""
    h = Harness()
    success(h.attempt(envelope("u@a.test")))
    h.connector.connections[0].closed = True
    success(h.attempt(envelope("v@a.test")))
    assert len(h.connector.connections) == 2
    assert h.delivery.pool.open_connections == 1


# -- credentials ---------------------------------------------------------------------------


def test_password_read_from_file_and_never_logged(tmp_path, events):
    """The password is the first line of password_file, reaches the client options and no log line."""
    secret = tmp_path / "upstream.secret"
    secret.write_text("s3cr3t-pw  \nsecond line\n")
    route = Route(kind=ROUTE_SMARTHOST, hosts=(NextHop("smart.test"),), username="relay", password_file=str(secret))
    h = Harness(routes={"u@a.test": route}, targets={"smart.test": [Target("smart.test", "127.0.0.9", 25)]})
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_DELIVERED
    options = h.connector.calls[0][3]
    assert (options.username, options.password) == ("relay", "s3cr3t-pw")
    assert events
    for event in events:
        assert "s3cr3t" not in formatEvent(event)
        assert "s3cr3t" not in repr(event)


def test_unreadable_password_file_is_transient_and_names_the_file(tmp_path):
    """A password file that cannot be read defers the recipients with a text naming the file."""
    path = tmp_path / "missing.secret"
    route = Route(kind=ROUTE_SMARTHOST, hosts=(NextHop("smart.test"),), username="relay", password_file=str(path))
    h = Harness(routes={"u@a.test": route})
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_TRANSIENT
    assert str(path) in outcome.text
    assert h.connector.calls == []


# -- robustness ----------------------------------------------------------------------------


def test_exception_inside_becomes_transient_outcome(events):
    """An unexpected exception becomes a transient outcome with a generic text, logged with its traceback."""
    h = Harness(targets={"a.test": RuntimeError("kaboom internals")})
    d = h.attempt(envelope("u@a.test", "v@b.test"))
    outcomes = by_address(success(d))
    assert outcomes["u@a.test"].kind == OUTCOME_TRANSIENT
    assert outcomes["u@a.test"].text == TEXT_INTERNAL
    assert "kaboom" not in outcomes["u@a.test"].describe()
    assert outcomes["v@b.test"].kind == OUTCOME_DELIVERED
    assert any(e.get("log_failure") is not None and "Q1" in formatEvent(e) for e in events)


def test_attempt_never_errbacks_when_the_chain_itself_breaks():
    """Even a chain that raises outright yields one transient outcome per recipient."""
    h = Harness()

    def broken(recipient, context):
        raise KeyError("nope")

    h.delivery._chain = type("Broken", (), {"route": staticmethod(broken)})()
    outcomes = success(h.attempt(envelope("u@a.test", "v@b.test")))
    assert [o.kind for o in outcomes] == [OUTCOME_TRANSIENT, OUTCOME_TRANSIENT]


def test_permanent_session_error_on_send_fails_the_group():
    """A permanent session refusal carrying a 5xx reply is final for the transaction's recipients."""
    refusal = SessionError(Reply(554, "5.7.1", "go away"), False, STAGE_LOST)
    h = Harness(connector=FakeConnector(send_errors={"127.0.0.2": refusal}))
    outcomes = success(h.attempt(envelope("u@a.test", "v@a.test")))
    assert [(o.kind, o.code) for o in outcomes] == [(OUTCOME_PERMANENT, 554)] * 2
    assert [c[0] for c in h.connector.calls] == ["127.0.0.2"]


def test_every_line_about_a_message_carries_its_queue_id(events):
    """Delivery log lines about a message include its queue id, the rule, the host and the reply."""
    h = Harness()
    success(h.attempt(envelope("u@a.test", queue_id="QID42")))
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "relay.delivery"]
    assert lines and all("QID42" in line for line in lines)
    assert any("default (direct MX)" in line and "mx1.a.test[127.0.0.2]" in line and "250 2.0.0" in line for line in lines)


# -- over loopback with the real client and a real SMTP server ---------------------------------

LOOPBACK_SCRIPT = r'''
import io, json, sys
from twisted.internet import defer, reactor
from relay.config import Config
from relay.delivery import Delivery
from relay.envelope import Envelope, Recipient
from relay.routing import build_chain
from relay.routing.mx import Target
from relay.smtp.connect import connect

closed_port, sink_port = int(sys.argv[1]), int(sys.argv[2])
connects = []

class Resolver:
    def targets(self, route, default_port):
        return defer.succeed([Target("down.test", "127.0.0.1", closed_port, 10),
                              Target("sink.test", "127.0.0.1", sink_port, 20)])

class Spool:
    def message_opener(self, queue_id):
        return defer.succeed(lambda: io.BytesIO(b"Subject: " + queue_id.encode() + b"\r\n\r\n.dot line\r\n"))

def counting_connect(*args):
    connects.append(args[1:3])
    return connect(*args)

config = Config(hostname="relay.test")
delivery = Delivery(config, build_chain(config), Resolver(), Spool(), reactor, connect=counting_connect)

async def main():
    results = []
    for queue_id in ("QA", "QB"):
        env = Envelope(queue_id=queue_id, sender="s@src.test", size=40,
                       recipients=(Recipient("ok@dest.test"), Recipient("gone@dest.test")))
        outcomes = await delivery.attempt(env)
        results.append([[o.recipient, o.kind, o.code, o.host] for o in outcomes])
    await delivery.close()
    return {"results": results, "connects": connects}

def done(result):
    print(json.dumps(result))
    reactor.stop()

def failed(failure):
    print(json.dumps({"error": failure.getTraceback()}))
    reactor.stop()

reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(main()).addCallbacks(done, failed))
reactor.callLater(30, reactor.stop)
reactor.run()
'''


def test_loopback_failover_partial_refusal_and_reuse(tmp_path):
    """Over real sockets: a refused host is skipped, a 550 recipient fails, and two messages share one connection."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = Path(__file__).parent
    sys.path.insert(0, str(tests_dir))
    from relayproc import free_port
    from smtpsink import SMTPSink

    sink = SMTPSink(rcpt_reply=lambda address: "550 5.1.1 no such user" if address.startswith("gone@") else None).start()
    try:
        env = {**os.environ, "PYTHONPATH": str(tests_dir.parent)}
        proc = subprocess.run(
            [sys.executable, "-c", LOOPBACK_SCRIPT, str(free_port()), str(sink.port)],
            capture_output=True, timeout=60, env=env, cwd=str(tmp_path),
        )
        received = sink.wait_for(2, timeout=10)
    finally:
        sink.stop()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert "error" not in out, out["error"]
    for results in out["results"]:
        assert results == [
            ["ok@dest.test", OUTCOME_DELIVERED, 250, "sink.test[127.0.0.1]"],
            ["gone@dest.test", OUTCOME_PERMANENT, 550, "sink.test[127.0.0.1]"],
        ]
    ports = [port for _, port in out["connects"]]
    assert ports.count(sink.port) == 1, out["connects"]  # the second message reused the connection
    assert [m.recipients for m in received] == [["ok@dest.test"], ["ok@dest.test"]]
    assert received[0].data.endswith(b".dot line\r\n")


# -- outbound TLS policy, TLS in the history, MTA-STS ----------------------------------

TLS13 = "TLSv1.3 TLS_AES_256_GCM_SHA384"


class TLSConnector(FakeConnector):
    """A connector whose sessions report TLS for the addresses in ``tls_by_address``."""

    def __init__(self, tls_by_address: dict[str, str]) -> None:
        super().__init__()
        self.tls_by_address = tls_by_address

    def result(self, conn: FakeConnection, transaction: Transaction) -> TransactionResult:
        replies = {a: self.replies(conn.address, a) for a, _ in transaction.recipients}
        return TransactionResult(replies, conn.host, self.tls_by_address.get(conn.address, ""))


class FakePolicies:
    """Stands for relay.mta_sts.PolicyCache: a fixed policy per domain."""

    def __init__(self, policies: dict[str, Optional[Policy]]) -> None:
        self.policies = policies
        self.asked: list[str] = []

    def policy(self, domain: str) -> Deferred:
        self.asked.append(domain)
        return defer.succeed(self.policies.get(domain))


def tls_harness(routes=None, targets=None, connector=None, policies=None, ca_file="") -> Harness:
    h = Harness(routes=routes, targets=targets, connector=connector)
    config = Config(hostname="relay.test", delivery=DeliveryConfig(tls_ca_file=ca_file, mta_sts=policies is not None))
    h.policies = policies
    h.delivery = Delivery(config, h.chain, h.resolver, h.spool, h.clock, connect=h.connector, mta_sts=policies)
    return h


def smarthost(tls: str = TLS_MAY, **kw: Any) -> Route:
    return Route(kind=ROUTE_SMARTHOST, hosts=(NextHop("smart.test"),), tls=tls, rule="routes[0]", **kw)


def test_route_tls_policy_reaches_client_options_with_the_host_name():
    """tls, the CA file and auth_in_clear go from the Route into ClientOptions; the verified name is the host name."""
    route = smarthost(TLS_VERIFY, username="u", password_file="", auth_in_clear=True)
    h = tls_harness(routes={"u@x.test": route}, targets={"smart.test": [Target("smart.test", "127.0.0.9", 25)]}, ca_file="/etc/ca.pem")
    success(h.attempt(envelope("u@x.test")))
    [(address, _, host, options)] = h.connector.calls
    assert (address, host) == ("127.0.0.9", "smart.test")
    assert (options.tls, options.tls_hostname, options.ca_file, options.auth_in_clear) == (TLS_VERIFY, "smart.test", "/etc/ca.pem", True)


def test_config_route_keys_reach_the_route():
    """[[routes]] tls and auth_in_clear travel through the router chain into the Route."""
    config = config_from_mapping(
        {"routes": [{"domains": ["x.test"], "smarthost": "smart.test", "tls": "require", "auth_in_clear": True}]}, "t.toml"
    )
    route = success(defer.maybeDeferred(build_chain(config).route, Recipient("u@x.test"), None))
    assert (route.tls, route.auth_in_clear) == (TLS_REQUIRE, True)
    assert config.routes[0].auth_in_clear is True


def test_outcome_and_log_carry_the_tls_of_the_session(events):
    """The Outcome records the session's TLS version and cipher, and the delivery log line says it."""
    h = tls_harness(connector=TLSConnector({"127.0.0.2": TLS13}), routes={"u@a.test": mx("a.test")})
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert (outcome.kind, outcome.tls) == (OUTCOME_DELIVERED, TLS13)
    lines = [formatEvent(e) for e in events if "to=<u@a.test>" in formatEvent(e)]
    assert lines and f"tls=({TLS13})" in lines[0]


def test_log_says_no_tls_in_clear(events):
    """A delivery in clear is logged with "no TLS" and its Outcome has an empty tls."""
    h = tls_harness(routes={"u@a.test": mx("a.test")})
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.tls == ""
    assert any("tls=(no TLS)" in formatEvent(e) and "to=<u@a.test>" in formatEvent(e) for e in events)


def test_connections_with_other_tls_settings_are_not_shared():
    """An idle connection is reused only by a route with the same TLS policy and AUTH settings."""
    routes = {"a@x.test": smarthost(TLS_MAY), "b@x.test": smarthost(TLS_MAY, auth_in_clear=True)}
    h = tls_harness(routes=routes, targets={"smart.test": [Target("smart.test", "127.0.0.9", 25)]})
    success(h.attempt(envelope("a@x.test")))
    success(h.attempt(envelope("b@x.test", queue_id="Q2")))
    assert len(h.connector.calls) == 2


def test_attempt_tls_round_trips_and_old_history_loads():
    """Attempt.tls is stored in the JSON and read back; a v1 history entry without it still loads."""
    attempt = Attempt(1.0, OUTCOME_DELIVERED, 250, "", "ok", "h", True, rule="r", tls=TLS13)
    env = Envelope(queue_id="Q", sender="", recipients=(Recipient("u@a.test", history=(attempt,)),))
    assert Envelope.from_json(env.to_json()).recipients[0].history[0].tls == TLS13
    old = (b'{"version": 1, "queue_id": "Q", "sender": "", "recipients": [{"address": "u@a.test", "status": "pending",'
           b' "history": [{"time": 1.0, "outcome": "delivered", "reply": "250 ok", "host": "h", "route": "r"}]}]}')
    assert Envelope.from_json(old).recipients[0].history[0] == Attempt(1.0, OUTCOME_DELIVERED, 250, "", "ok", "h", True, rule="r")


@pytest.mark.parametrize(
    "data,message",
    [
        ({"delivery": {"mta_sts": "yes"}}, "t.toml: delivery.mta_sts: expected true or false"),
        ({"delivery": {"tls_ca_file": 5}}, "t.toml: delivery.tls_ca_file: expected a string"),
        ({"delivery": {"tls_ca_file": "/nonexistent/ca.pem"}}, "t.toml: delivery.tls_ca_file: \"/nonexistent/ca.pem\": cannot read"),
        ({"routes": [{"domains": ["x.test"], "smarthost": "h.test", "auth_in_clear": 1}]}, "t.toml: routes[0].auth_in_clear: expected true or false"),
        ({"routes": [{"domains": ["x.test"], "reject": "no", "auth_in_clear": True}]}, "t.toml: routes[0].auth_in_clear: only possible with smarthost or via"),
    ],
)
def test_tls_config_keys_are_validated(data, message):
    """delivery.mta_sts, delivery.tls_ca_file and routes[].auth_in_clear are checked with one-line errors naming the key."""
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, "t.toml")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_tls_config_defaults_and_values(tmp_path):
    """The new keys default to off/empty and accept a readable PEM bundle and booleans."""
    assert (DeliveryConfig().tls_ca_file, DeliveryConfig().mta_sts) == ("", False)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    config = config_from_mapping({"delivery": {"tls_ca_file": str(ca), "mta_sts": True}}, "t.toml")
    assert (config.delivery.tls_ca_file, config.delivery.mta_sts) == (str(ca), True)
    (tmp_path / "empty.pem").write_text("nothing\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        config_from_mapping({"delivery": {"tls_ca_file": str(tmp_path / "empty.pem")}}, "t.toml")


ENFORCE = Policy(mode="enforce", mx=("mx2.a.test",), max_age=86400)


def test_mta_sts_enforce_uses_only_matching_mx_with_verified_tls():
    """Enforce: the preferred MX outside the policy is skipped; the matching one gets TLS verified for its name."""
    h = tls_harness(routes={"u@a.test": mx("a.test")}, policies=FakePolicies({"a.test": ENFORCE}), ca_file="/ca.pem")
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert outcome.kind == OUTCOME_DELIVERED
    [(address, _, host, options)] = h.connector.calls
    assert (address, host, options.tls, options.tls_hostname, options.ca_file) == ("127.0.0.3", "mx2.a.test", TLS_VERIFY, "mx2.a.test", "/ca.pem")
    assert h.policies.asked == ["a.test"]


def test_mta_sts_enforce_without_matching_mx_is_transient():
    """Enforce with no MX host matching the policy: transient, nothing connects."""
    policy = Policy(mode="enforce", mx=("*.elsewhere.test",), max_age=60)
    h = tls_harness(routes={"u@a.test": mx("a.test")}, policies=FakePolicies({"a.test": policy}))
    [outcome] = success(h.attempt(envelope("u@a.test")))
    assert (outcome.kind, outcome.status, outcome.text) == (OUTCOME_TRANSIENT, "4.7.5", "MTA-STS: no MX host matches the policy")
    assert h.connector.calls == []


def test_mta_sts_testing_delivers_as_usual_and_logs(events):
    """Testing: the preferred MX is used with the route's own TLS policy; what enforce would refuse is logged."""
    policy = Policy(mode="testing", mx=("mx2.a.test",), max_age=60)
    h = tls_harness(routes={"u@a.test": mx("a.test")}, policies=FakePolicies({"a.test": policy}))
    [outcome] = success(h.attempt(envelope("u@a.test", queue_id="QT")))
    assert outcome.kind == OUTCOME_DELIVERED
    [(address, _, _, options)] = h.connector.calls
    assert (address, options.tls) == ("127.0.0.2", TLS_MAY)
    text = "\n".join(formatEvent(e) for e in events)
    assert "QT: MTA-STS testing: mx1.a.test does not match the policy of a.test" in text
    assert "QT: MTA-STS testing: mx1.a.test[127.0.0.2] took the mail without TLS" in text


@pytest.mark.parametrize("policy", [None, Policy(mode="none", mx=(), max_age=60)])
def test_no_policy_or_mode_none_changes_nothing(policy):
    """Without a policy, or with mode none, MX delivery is as usual."""
    h = tls_harness(routes={"u@a.test": mx("a.test")}, policies=FakePolicies({"a.test": policy}))
    success(h.attempt(envelope("u@a.test")))
    [(address, _, _, options)] = h.connector.calls
    assert (address, options.tls) == ("127.0.0.2", TLS_MAY)


def test_mta_sts_is_not_consulted_for_smart_hosts():
    """MTA-STS applies to direct MX delivery only, never to a configured smart host."""
    policies = FakePolicies({"smart.test": ENFORCE})
    h = tls_harness(routes={"u@x.test": smarthost()}, targets={"smart.test": [Target("smart.test", "127.0.0.9", 25)]}, policies=policies)
    success(h.attempt(envelope("u@x.test")))
    assert policies.asked == [] and h.connector.calls[0][3].tls == TLS_MAY
