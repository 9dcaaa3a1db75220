"""Tests for relay.routing.mx and relay.routing.dns: MX and address resolution against a real DNS server on loopback.

The synchronous core (``resolve_host``) is driven directly against the
server; the Deferred front (``MXResolver``) with an injected synchronous
runner and a ``task.Clock``, still against the same server.
"""

from __future__ import annotations

import queue
import random
import socket
from typing import Any, Callable, Iterator

import dns.message
import dns.query
import dns.resolver
import pytest
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from zope.interface import implementer

from dnsserver import start_dns_server
from deferreds import failure_of as failure, success
from relay.envelope import ROUTE_MX, ROUTE_SMARTHOST, NextHop, Route
from relay.routing.dns import STATUS_DNS_TRANSIENT, STATUS_NO_DOMAIN, ResolutionError, make_resolver
from relay.routing.mx import (
    STATUS_NO_ADDRESS,
    STATUS_NULL_MX,
    Exchange,
    MXResolver,
    Resolution,
    Target,
    literal_address,
    resolve_host,
)

ZONE = {
    "example.test": {"MX": [[20, "mx2.example.test"], [10, "mx1.example.test"]], "TTL": 60},
    "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "equal.test": {"MX": [[10, "a.equal.test"], [10, "b.equal.test"], [20, "c.equal.test"]]},
    "a.equal.test": {"A": ["127.0.0.4"]},
    "b.equal.test": {"A": ["127.0.0.5"]},
    "c.equal.test": {"A": ["127.0.0.6"]},
    "alias.test": {"CNAME": "example.test"},
    "cnamemx.test": {"MX": [[10, "mail.cnamemx.test"]]},
    "mail.cnamemx.test": {"CNAME": "mx2.example.test"},
    "implicit.test": {"A": ["127.0.0.7"]},
    "nullmx.test": {"MX": [[0, "."]]},
    "servfail.test": "SERVFAIL",
    "slow.test": "TIMEOUT",
    "noaddr.test": {"MX": [[10, "missing.noaddr.test"], [20, "empty.test"]]},
    "partial.test": {"MX": [[10, "missing.partial.test"], [20, "mx2.example.test"]]},
    "empty.test": {"TTL": 30},
    "smart.test": {"MX": [[10, "mx1.example.test"]], "A": ["127.0.0.9"]},
    "ttl.test": {"MX": [[10, "mx2.example.test"]], "TTL": 30},
    "xn--bcher-kva.test": {"MX": [[10, "mx2.example.test"]]},
}



@pytest.fixture(scope="module")
def dns_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port, stop = start_dns_server(ZONE, tmp_path_factory.mktemp("dns"))
    try:
        yield port
    finally:
        stop()


@pytest.fixture(scope="module")
def resolver(dns_port: int) -> dns.resolver.Resolver:
    return make_resolver((("127.0.0.1", dns_port),), timeout=2.0)


class CountingRunner:
    """Runs lookups synchronously and counts them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Any:
        self.calls.append(args)
        return f(*args)


def make_mx(port: int, seed: int = 0, timeout: float = 2.0) -> tuple[MXResolver, Clock, CountingRunner]:
    clock, runner = Clock(), CountingRunner()
    mx = MXResolver(
        (("127.0.0.1", port),), clock=clock, runner=runner, timeout=timeout, rng=random.Random(seed)
    )
    return mx, clock, runner


def mx_route(domain: str) -> Route:
    return Route(kind=ROUTE_MX, hosts=(NextHop(domain, mx=True),))


def hosts_of(targets: list[Target]) -> list[str]:
    return [t.host for t in targets]


# -- the synchronous core ---------------------------------------------------------


def test_lowest_preference_first(resolver: dns.resolver.Resolver) -> None:
    """MX hosts come sorted by preference, each with its A addresses before its AAAA ones."""
    resolution = resolve_host(resolver, "example.test", mx=True)
    assert [(e.host, e.preference, e.addresses) for e in resolution.exchanges] == [
        ("mx1.example.test", 10, ("127.0.0.2", "::1")),
        ("mx2.example.test", 20, ("127.0.0.3",)),
    ]
    assert resolution.ttl == 60


def test_cname_followed(resolver: dns.resolver.Resolver) -> None:
    """A CNAME is followed both at the mail domain and at an MX host."""
    alias = resolve_host(resolver, "alias.test", mx=True)
    assert [e.host for e in alias.exchanges] == ["mx1.example.test", "mx2.example.test"]
    through = resolve_host(resolver, "cnamemx.test", mx=True)
    assert [(e.host, e.addresses) for e in through.exchanges] == [("mail.cnamemx.test", ("127.0.0.3",))]


def test_implicit_mx(resolver: dns.resolver.Resolver) -> None:
    """A domain without MX records is its own mail host at preference 0."""
    resolution = resolve_host(resolver, "implicit.test", mx=True)
    assert [(e.host, e.preference, e.addresses) for e in resolution.exchanges] == [
        ("implicit.test", 0, ("127.0.0.7",))
    ]


def test_null_mx_is_permanent(resolver: dns.resolver.Resolver) -> None:
    """A null MX (0 .) fails permanently with 5.1.10."""
    with pytest.raises(ResolutionError) as info:
        resolve_host(resolver, "nullmx.test", mx=True)
    assert (info.value.permanent, info.value.status) == (True, STATUS_NULL_MX)
    assert "nullmx.test" in info.value.text


def test_nxdomain_is_permanent(resolver: dns.resolver.Resolver) -> None:
    """A nonexistent mail domain fails permanently with 5.1.2."""
    with pytest.raises(ResolutionError) as info:
        resolve_host(resolver, "nope.test", mx=True)
    assert (info.value.permanent, info.value.status) == (True, STATUS_NO_DOMAIN)
    assert info.value.text == "domain nope.test does not exist"


def test_servfail_is_transient(resolver: dns.resolver.Resolver) -> None:
    """SERVFAIL fails transiently with 4.4.3 and a fixed text."""
    with pytest.raises(ResolutionError) as info:
        resolve_host(resolver, "servfail.test", mx=True)
    assert (info.value.permanent, info.value.status) == (False, STATUS_DNS_TRANSIENT)
    assert "SERVFAIL" in info.value.text


def test_timeout_is_transient() -> None:
    """A nameserver that never answers gives a transient 4.4.3 after the timeout."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        silent.bind(("127.0.0.1", 0))
        quiet = make_resolver((silent.getsockname(),), timeout=0.3)
        with pytest.raises(ResolutionError) as info:
            resolve_host(quiet, "example.test", mx=True)
    finally:
        silent.close()
    assert (info.value.permanent, info.value.status) == (False, STATUS_DNS_TRANSIENT)
    assert "timed out" in info.value.text


def test_unanswered_name_is_transient(dns_port: int) -> None:
    """A name the server never answers times out into a transient failure."""
    quick = make_resolver((("127.0.0.1", dns_port),), timeout=0.3)
    with pytest.raises(ResolutionError) as info:
        resolve_host(quick, "slow.test", mx=True)
    assert info.value.permanent is False


def test_exchange_without_address_is_skipped(resolver: dns.resolver.Resolver) -> None:
    """An MX host that resolves to nothing is left out; the others remain."""
    resolution = resolve_host(resolver, "partial.test", mx=True)
    assert [e.host for e in resolution.exchanges] == ["mx2.example.test"]


def test_no_exchange_with_address_is_transient(resolver: dns.resolver.Resolver) -> None:
    """When no MX host has an address, the lookup fails transiently."""
    with pytest.raises(ResolutionError) as info:
        resolve_host(resolver, "noaddr.test", mx=True)
    assert (info.value.permanent, info.value.status) == (False, STATUS_DNS_TRANSIENT)


def test_no_mx_and_no_address_is_permanent(resolver: dns.resolver.Resolver) -> None:
    """A domain with neither MX nor address records fails permanently with 5.4.4."""
    with pytest.raises(ResolutionError) as info:
        resolve_host(resolver, "empty.test", mx=True)
    assert (info.value.permanent, info.value.status) == (True, STATUS_NO_ADDRESS)
    assert info.value.ttl == 30


def test_host_lookup_never_uses_mx(resolver: dns.resolver.Resolver) -> None:
    """A host (mx=False) is resolved by A/AAAA even when it has MX records."""
    resolution = resolve_host(resolver, "smart.test", mx=False)
    assert [(e.host, e.addresses) for e in resolution.exchanges] == [("smart.test", ("127.0.0.9",))]


def test_missing_host_is_transient(resolver: dns.resolver.Resolver) -> None:
    """A configured host name that does not exist defers instead of bouncing."""
    with pytest.raises(ResolutionError) as info:
        resolve_host(resolver, "nope.test", mx=False)
    assert (info.value.permanent, info.value.status) == (False, STATUS_DNS_TRANSIENT)


def test_literal_address_forms() -> None:
    """Bracketed IPv4, IPv6-tagged and bare addresses are recognised; names are not."""
    assert literal_address("[192.0.2.1]") == "192.0.2.1"
    assert literal_address("[IPv6:2001:DB8::1]") == "2001:db8::1"
    assert literal_address("127.0.0.5") == "127.0.0.5"
    assert literal_address("example.test") is None
    with pytest.raises(ValueError):
        literal_address("[not-an-address]")


def test_server_answers_over_tcp(dns_port: int) -> None:
    """The test DNS server answers over TCP on the same port as UDP."""
    query = dns.message.make_query("mx2.example.test", "A")
    response = dns.query.tcp(query, "127.0.0.1", port=dns_port, timeout=2)
    assert [r.address for r in response.answer[0]] == ["127.0.0.3"]


# -- the Deferred front -----------------------------------------------------------


def test_targets_in_preference_order_with_port(dns_port: int) -> None:
    """An MX route gives one Target per address, lowest preference first, on the default port."""
    mx, _, _ = make_mx(dns_port)
    targets = success(mx.targets(mx_route("example.test"), 25))
    assert targets == [
        Target("mx1.example.test", "127.0.0.2", 25, 10),
        Target("mx1.example.test", "::1", 25, 10),
        Target("mx2.example.test", "127.0.0.3", 25, 20),
    ]


def test_equal_preferences_shuffled(dns_port: int) -> None:
    """Hosts of equal preference come in both orders across seeds; the higher preference stays last."""
    orders = set()
    for seed in range(12):
        mx, _, _ = make_mx(dns_port, seed=seed)
        hosts = hosts_of(success(mx.targets(mx_route("equal.test"), 25)))
        assert hosts[2] == "c.equal.test"
        orders.add(tuple(hosts[:2]))
    assert orders == {("a.equal.test", "b.equal.test"), ("b.equal.test", "a.equal.test")}


def test_idna_domain(dns_port: int) -> None:
    """A U-label mail domain is looked up in its A-label form."""
    mx, _, runner = make_mx(dns_port)
    targets = success(mx.targets(mx_route("Bücher.test"), 25))
    assert hosts_of(targets) == ["mx2.example.test"]
    assert runner.calls == [("xn--bcher-kva.test", True)]


def test_address_literals_need_no_dns(dns_port: int) -> None:
    """Address literals and bare IPs become Targets without any lookup."""
    mx, _, runner = make_mx(dns_port)
    route = Route(
        kind=ROUTE_SMARTHOST,
        hosts=(NextHop("[127.0.0.5]", mx=True), NextHop("[IPv6:::1]"), NextHop("127.0.0.6", port=2525)),
    )
    assert success(mx.targets(route, 25)) == [
        Target("[127.0.0.5]", "127.0.0.5", 25),
        Target("[IPv6:::1]", "::1", 25),
        Target("127.0.0.6", "127.0.0.6", 2525),
    ]
    assert runner.calls == []


def test_smarthost_resolved_by_address_only(dns_port: int) -> None:
    """A smart host hop (mx=False) uses its A record, not its MX, and its own port."""
    mx, _, _ = make_mx(dns_port)
    route = Route(kind=ROUTE_SMARTHOST, hosts=(NextHop("smart.test", port=2525),))
    assert success(mx.targets(route, 25)) == [Target("smart.test", "127.0.0.9", 2525)]


def test_failover_concatenates_hops(dns_port: int) -> None:
    """Targets of several hops are concatenated in hop order; a hop that fails is left out."""
    mx, _, _ = make_mx(dns_port)
    route = Route(
        kind=ROUTE_SMARTHOST,
        hosts=(
            NextHop("mx2.example.test", port=2525),
            NextHop("nope.test"),
            NextHop("smart.test"),
            NextHop("example.test", mx=True),
        ),
    )
    targets = success(mx.targets(route, 25))
    assert [(t.host, t.address, t.port) for t in targets] == [
        ("mx2.example.test", "127.0.0.3", 2525),
        ("smart.test", "127.0.0.9", 25),
        ("mx1.example.test", "127.0.0.2", 25),
        ("mx1.example.test", "::1", 25),
        ("mx2.example.test", "127.0.0.3", 25),
    ]


def test_all_hops_failed_permanently_is_permanent(dns_port: int) -> None:
    """When every hop fails permanently, the whole fails permanently."""
    mx, _, _ = make_mx(dns_port)
    route = Route(kind=ROUTE_MX, hosts=(NextHop("nope.test", mx=True), NextHop("nullmx.test", mx=True)))
    error = failure(mx.targets(route, 25), ResolutionError).value
    assert (error.permanent, error.status) == (True, STATUS_NO_DOMAIN)


def test_mixed_failures_are_transient(dns_port: int) -> None:
    """When one failed hop failed transiently, the whole fails transiently."""
    mx, _, _ = make_mx(dns_port)
    route = Route(kind=ROUTE_MX, hosts=(NextHop("nope.test", mx=True), NextHop("servfail.test", mx=True)))
    error = failure(mx.targets(route, 25), ResolutionError).value
    assert (error.permanent, error.status) == (False, STATUS_DNS_TRANSIENT)


def test_cache_respects_ttl(dns_port: int) -> None:
    """A second lookup within the TTL makes no query; after the TTL it queries again."""
    mx, clock, runner = make_mx(dns_port)
    first = success(mx.targets(mx_route("ttl.test"), 25))
    clock.advance(29)
    assert success(mx.targets(mx_route("ttl.test"), 25)) == first
    assert len(runner.calls) == 1
    clock.advance(2)
    assert success(mx.targets(mx_route("ttl.test"), 25)) == first
    assert len(runner.calls) == 2


def test_cached_answer_is_reshuffled(dns_port: int) -> None:
    """Equal preferences are shuffled again on every answer served from the cache."""
    mx, _, runner = make_mx(dns_port, seed=1)
    orders = {tuple(hosts_of(success(mx.targets(mx_route("equal.test"), 25)))[:2]) for _ in range(12)}
    assert len(orders) == 2
    assert len(runner.calls) == 1


def test_permanent_failure_cached_transient_not(dns_port: int) -> None:
    """NXDOMAIN is cached for its negative TTL; SERVFAIL is asked again every time."""
    mx, clock, runner = make_mx(dns_port)
    for _ in range(2):
        failure(mx.targets(mx_route("nope.test"), 25), ResolutionError)
        failure(mx.targets(mx_route("servfail.test"), 25), ResolutionError)
    assert [c[0] for c in runner.calls] == ["nope.test", "servfail.test", "servfail.test"]
    clock.advance(301)
    failure(mx.targets(mx_route("nope.test"), 25), ResolutionError)
    assert [c[0] for c in runner.calls].count("nope.test") == 2


def test_concurrent_lookups_are_merged() -> None:
    """Lookups of one name while a lookup of it runs wait for that one instead of querying."""
    pending: list[defer.Deferred] = []

    def runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
        pending.append(defer.Deferred())
        return pending[-1]

    mx = MXResolver(clock=Clock(), runner=runner)
    first, second = mx.targets(mx_route("[192.0.2.1]"), 25), mx.targets(mx_route("merged.test"), 25)
    third = mx.targets(mx_route("merged.test"), 25)
    assert len(pending) == 1
    pending[0].callback(Resolution((Exchange("merged.test", 0, ("127.0.0.8",)),), 60))
    assert success(first) == [Target("[192.0.2.1]", "192.0.2.1", 25)]
    assert success(second) == success(third) == [Target("merged.test", "127.0.0.8", 25)]


def test_unexpected_error_becomes_transient() -> None:
    """A bug inside a lookup surfaces as a transient failure, not as a crash."""

    def runner(f: Callable[..., Any], *args: Any) -> Any:
        raise RuntimeError("internal detail")

    mx = MXResolver(clock=Clock(), runner=runner)
    error = failure(mx.targets(mx_route("example.test"), 25), ResolutionError).value
    assert (error.permanent, error.status) == (False, STATUS_DNS_TRANSIENT)
    assert "internal detail" not in error.text


def test_missing_system_resolver_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without nameservers and without a readable resolv.conf, lookups fail transiently, start-up does not."""

    def unconfigured(*args: Any, **kwargs: Any) -> None:
        raise dns.resolver.NoResolverConfiguration("no resolv.conf")

    monkeypatch.setattr(dns.resolver, "Resolver", unconfigured)
    mx = MXResolver(clock=Clock(), runner=lambda f, *a: f(*a))
    error = failure(mx.targets(mx_route("example.test"), 25), ResolutionError).value
    assert (error.permanent, error.status) == (False, STATUS_DNS_TRANSIENT)


@implementer(IReactorFromThreads)
class ThreadedClock(Clock):
    """A Clock that collects calls made from threads, for the test to run."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.from_threads.put((f, args, kwargs))


def test_default_runner_uses_own_thread_pool(dns_port: int) -> None:
    """Without a runner, lookups run in the resolver's own threads and report back via the reactor."""
    clock = ThreadedClock()
    mx = MXResolver((("127.0.0.1", dns_port),), clock=clock, timeout=2.0)
    try:
        d = mx.targets(mx_route("ttl.test"), 25)
        assert not d.called
        f, args, kwargs = clock.from_threads.get(timeout=5)
        f(*args, **kwargs)
        assert success(d) == [Target("mx2.example.test", "127.0.0.3", 25, 10)]
    finally:
        mx.stop()
