"""Turning a Route's next hops into the addresses to connect to, in order.

This module owns the MX rules of outbound mail and the resolver the
delivery asks: MX lookups of mail domains (RFC 5321 section 5.1, null MX of
RFC 7505), A/AAAA lookups of smart hosts and source route hops, address
literals, and a cache of answers on the injected clock.  The dnspython
queries these rules are made of, and ``ResolutionError``, are
``relay.routing.dns``'s.

Lookups run in a small thread pool of their own (``POOL_THREADS`` threads,
not the reactor's shared pool, which the spool's fsyncs must never queue
behind); a thread per concurrent lookup, with the cache in front and
concurrent lookups of one name merged, is cheap.

The work is split in two:

* ``resolve_host(resolver, name, mx)`` is the synchronous core: one
  resolution of one name with dnspython, returning a ``Resolution`` (the
  exchanges sorted by preference, each with its addresses) or raising
  ``ResolutionError``.  It runs in the pool.
* ``MXResolver`` is the asynchronous front: literals, the cache, merging of
  concurrent lookups, shuffling of equal preferences with the injected
  random source, ports, and the failover concatenation of several hops.

Outcomes:

* MX records: exchanges by preference, equal preferences in random order;
  each exchange resolved to its A addresses, then its AAAA addresses (IPv4
  first, as the relay's networks are mostly IPv4; both are tried).  An
  exchange with no address is skipped; when every one is, the lookup fails
  transiently (4.4.3), as the data may be mid-change.
* No MX records (NODATA): the domain's own A/AAAA (implicit MX, preference
  0); when it has none either, permanent 5.4.4.
* A null MX (a single ``0 .``): permanent 5.1.10.
* NXDOMAIN: permanent 5.1.2.
* SERVFAIL, refused, timeout, no nameserver, unreadable resolv.conf:
  transient 4.4.3.
* Hops with ``mx=False`` (smart hosts, source route hops) are resolved by
  A/AAAA only.  They name hosts from the configuration, so any failure to
  resolve them, NXDOMAIN included, is transient: an operator's typo defers
  mail until it is fixed instead of bouncing it.

Cache: positive answers live for the smallest TTL involved (CNAMEs, MX,
every address record), capped at ``MAX_TTL`` (``relay.routing.dns``).  Permanent failures (NXDOMAIN,
null MX, no address at all) live for their negative TTL, i.e. the SOA's
minimum as dnspython computes it (300 s when the answer carries no SOA),
capped at ``NEGATIVE_TTL_MAX``.  Transient failures are never cached.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import dns.exception
import dns.name
import dns.resolver
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from relay.log import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relay.domains import ip_literal, normalize_domain
from relay.envelope import NextHop, Route
from relay.routing.dns import (
    NEGATIVE_TTL_MAX,
    ResolutionError,
    dns_name,
    host_addresses,
    lookup,
    make_resolver,
    not_found_error,
    resolve_txt,
    transient_error,
)

log = Logger()

# Enhanced status codes (RFC 3463, RFC 7505).
STATUS_NULL_MX = "5.1.10"  # the domain accepts no mail
STATUS_NO_ADDRESS = "5.4.4"  # no MX and no address: unable to route

POOL_THREADS = 4
MAX_CACHE_ENTRIES = 10000

Runner = Callable[..., Any]  # runner(f, *args) -> Deferred (or a value)


@dataclass(frozen=True)
class Target:
    """One address to connect to, in the order to try."""

    host: str  # the host name (MX exchange, smart host name) or the literal
    address: str  # IP address (v4 or v6) to connect to
    port: int
    preference: int = 0  # MX preference; 0 otherwise


@dataclass(frozen=True)
class Exchange:
    """One host of a resolution with its addresses (A first, then AAAA)."""

    host: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Resolution:
    """What one name resolved to: exchanges sorted by preference, not yet shuffled."""

    exchanges: tuple[Exchange, ...]
    ttl: float


# -- the MX rules (blocking: they run in the pool) -------------------------------


def _host_resolution(resolver: dns.resolver.Resolver, qname: dns.name.Name, name: str) -> Resolution:
    """A smart host or source route hop: A/AAAA only, every failure transient."""
    addresses, ttl, failure = host_addresses(resolver, qname)
    if addresses:
        return Resolution((Exchange(name, 0, addresses),), ttl)
    if failure is not None and not failure.permanent:
        raise failure
    if failure is not None:
        raise not_found_error(name, False, 0.0)
    raise transient_error(f"host {name} has no address records")


def _implicit_mx(resolver: dns.resolver.Resolver, qname: dns.name.Name, name: str, ttl: float) -> Resolution:
    """A mail domain without MX records: its own A/AAAA, preference 0."""
    addresses, address_ttl, failure = host_addresses(resolver, qname)
    ttl = min(ttl, address_ttl)
    if addresses:
        return Resolution((Exchange(name, 0, addresses),), ttl)
    if failure is not None:
        raise failure
    raise ResolutionError(
        STATUS_NO_ADDRESS, f"domain {name} has no MX and no address records", min(ttl, NEGATIVE_TTL_MAX)
    )


def _exchanges(rrset: Any) -> list[tuple[int, str]]:
    """(preference, exchange) pairs sorted by preference, each exchange once."""
    best: dict[str, int] = {}
    for rdata in rrset:
        if rdata.exchange == dns.name.root:
            continue
        host = rdata.exchange.to_text(omit_final_dot=True).lower()
        best[host] = min(best.get(host, rdata.preference), rdata.preference)
    return sorted(((pref, host) for host, pref in best.items()), key=lambda pair: pair[0])


def _is_null_mx(rrset: Any) -> bool:
    """RFC 7505: one MX record of preference 0 pointing at the root."""
    return all(rdata.exchange == dns.name.root for rdata in rrset)


def _mx_resolution(resolver: dns.resolver.Resolver, qname: dns.name.Name, name: str) -> Resolution:
    """A mail domain: its MX hosts with their addresses, or the implicit MX."""
    rrset, ttl = lookup(resolver, qname, "MX", mx=True)
    if rrset is None:
        return _implicit_mx(resolver, qname, name, ttl)
    if _is_null_mx(rrset):
        raise ResolutionError(
            STATUS_NULL_MX, f"domain {name} does not accept mail (null MX)", min(ttl, NEGATIVE_TTL_MAX)
        )
    exchanges = []
    for preference, host in _exchanges(rrset):
        host_name = dns_name(host)
        if host_name is None:
            continue
        addresses, address_ttl, _ = host_addresses(resolver, host_name)
        if addresses:
            exchanges.append(Exchange(host, preference, addresses))
            ttl = min(ttl, address_ttl)
    if not exchanges:
        raise transient_error(f"no MX host of {name} has an address")
    return Resolution(tuple(exchanges), ttl)


def resolve_host(resolver: dns.resolver.Resolver, name: str, mx: bool) -> Resolution:
    """Resolve one normalized name (blocking): MX lookup when ``mx``, else A/AAAA.

    Raises ResolutionError; never any other exception for DNS trouble.
    """
    qname = dns_name(name)
    if qname is None:
        raise not_found_error(name, mx, NEGATIVE_TTL_MAX)
    if mx:
        return _mx_resolution(resolver, qname, name)
    return _host_resolution(resolver, qname, name)

# -- literals --------------------------------------------------------------------


def literal_address(host: str) -> Optional[str]:
    """The IP address of ``[192.0.2.1]``, ``[IPv6:2001:db8::1]`` or a bare IP; else None.

    Raises ValueError for a bracketed literal that is not an address.
    """
    try:
        address = ip_literal(host)
    except ValueError:
        raise ValueError(f"bad address literal {host}") from None
    return None if address is None else str(address)


# -- the asynchronous front ------------------------------------------------------

CacheValue = Union[Resolution, ResolutionError]


class MXResolver:
    """Resolves a Route's hops to Targets without blocking the reactor, with a cache."""

    def __init__(
        self,
        nameservers: tuple[tuple[str, int], ...] = (),
        *,
        clock: IReactorTime,
        runner: Optional[Runner] = None,
        timeout: float = 10.0,
        rng: Optional[random.Random] = None,
    ) -> None:
        self._nameservers = tuple(nameservers)
        self._clock = clock
        self._runner: Runner = runner or self._run_in_pool
        self._timeout = timeout
        self._rng = rng or random.Random()
        self._resolver: Optional[dns.resolver.Resolver] = None
        self._pool: Optional[ThreadPool] = None
        self._cache: dict[tuple[str, bool], tuple[float, CacheValue]] = {}
        self._waiting: dict[tuple[str, bool], list[defer.Deferred]] = {}

    # -- public ----------------------------------------------------------------

    def targets(self, route: Route, default_port: int) -> defer.Deferred:
        """Fire with the Targets of every hop of ``route``, concatenated in hop order.

        ``port`` of each Target is the hop's port or ``default_port``.  Fails
        with ResolutionError only when no hop resolved: permanent when every
        hop failed permanently, transient otherwise.  A route without hops
        gives an empty list.
        """
        hops = [self._hop_targets(hop, default_port) for hop in route.hosts]
        if len(hops) == 1:  # most routes: DeferredList's (success, result) pair without a DeferredList
            d = hops[0].addBoth(lambda result: [(not isinstance(result, Failure), result)])
        else:
            d = defer.DeferredList(hops, consumeErrors=True)
        d.addCallback(self._combine, route)
        return d

    def txt(self, name: str) -> defer.Deferred:
        """Fire with the TXT records of ``name`` (not cached); errback ResolutionError."""
        return defer.maybeDeferred(self._runner, self._lookup_txt, normalize_domain(name))

    def _lookup_txt(self, name: str) -> list[str]:
        """One TXT lookup; runs in the pool (or in the injected runner)."""
        return resolve_txt(self._get_resolver(), name)

    def stop(self) -> None:
        """Stop the lookup threads (called at reactor shutdown when the pool runs)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    # -- per hop ---------------------------------------------------------------

    def _hop_targets(self, hop: NextHop, default_port: int) -> defer.Deferred:
        port = hop.port or default_port
        try:
            address = literal_address(hop.host)
        except ValueError:
            return defer.fail(not_found_error(hop.host, hop.mx, 0.0))
        if address is not None:
            return defer.succeed([Target(hop.host, address, port)])
        d = self._resolve(normalize_domain(hop.host), hop.mx)
        d.addCallback(self._to_targets, port)
        return d

    def _to_targets(self, resolution: Resolution, port: int) -> list[Target]:
        """Targets in order: preference groups ascending, each group shuffled."""
        groups: dict[int, list[Exchange]] = {}
        for exchange in resolution.exchanges:
            groups.setdefault(exchange.preference, []).append(exchange)
        targets = []
        for preference in sorted(groups):
            group = list(groups[preference])
            self._rng.shuffle(group)
            for exchange in group:
                targets.extend(Target(exchange.host, a, port, preference) for a in exchange.addresses)
        return targets

    def _combine(self, results: list[tuple[bool, Any]], route: Route) -> list[Target]:
        targets: list[Target] = []
        errors: list[ResolutionError] = []
        for ok, value in results:
            if ok:
                targets.extend(value)
            else:
                errors.append(self._as_resolution_error(value))
        if targets or not errors:
            for error in errors:
                log.info("route {rule}: a next hop failed to resolve: {error}",
                         rule=route.rule, error=error.text)
            return targets
        permanent = [e for e in errors if e.permanent]
        raise permanent[0] if len(permanent) == len(errors) else next(e for e in errors if not e.permanent)

    def _as_resolution_error(self, failure: Failure) -> ResolutionError:
        if failure.check(ResolutionError):
            return failure.value
        log.failure("unexpected error while resolving a next hop", failure)
        return transient_error("DNS lookup failed")

    # -- cache and lookups -----------------------------------------------------

    def _resolve(self, name: str, mx: bool) -> defer.Deferred:
        """A Deferred Resolution for ``name``: from the cache, a running lookup, or a new one."""
        key = (name, mx)
        cached = self._cache.get(key)
        if cached is not None:
            expires, value = cached
            if expires > self._clock.seconds():
                return defer.fail(value) if isinstance(value, ResolutionError) else defer.succeed(value)
            del self._cache[key]
        d: defer.Deferred = defer.Deferred()
        if key in self._waiting:
            self._waiting[key].append(d)
            return d
        self._waiting[key] = [d]
        log.debug("DNS lookup of {name} (mx={mx})", name=name, mx=mx, event="dns_lookup")
        work = defer.maybeDeferred(self._runner, self._lookup, name, mx)
        work.addBoth(self._finished, key)
        return d

    def _lookup(self, name: str, mx: bool) -> Resolution:
        """One resolution; runs in the pool (or in the injected runner)."""
        return resolve_host(self._get_resolver(), name, mx)

    def _get_resolver(self) -> dns.resolver.Resolver:
        if self._resolver is None:
            try:
                self._resolver = make_resolver(self._nameservers, self._timeout)
            except (dns.exception.DNSException, OSError):
                raise transient_error("no DNS resolver: cannot read the system resolver configuration") from None
        return self._resolver

    def _finished(self, result: Union[Resolution, Failure], key: tuple[str, bool]) -> None:
        waiters = self._waiting.pop(key, [])
        if isinstance(result, Failure):
            error = self._as_resolution_error(result)
            if error.permanent:
                log.debug("DNS lookup of {name}: {error}", name=key[0], error=error.text, event="dns_failure",
                          permanent=True)
                self._store(key, error, error.ttl)
            else:
                log.info("DNS lookup of {name} failed: {error}", name=key[0], error=error.text, event="dns_failure",
                         permanent=False)
            for d in waiters:
                d.errback(error)
            return None
        self._store(key, result, result.ttl)
        for d in waiters:
            d.callback(result)
        return None

    def _store(self, key: tuple[str, bool], value: CacheValue, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._evict()
        self._cache[key] = (self._clock.seconds() + ttl, value)

    def _evict(self) -> None:
        """Drop expired entries; if none expired, drop the oldest."""
        now = self._clock.seconds()
        for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[key]
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            del self._cache[next(iter(self._cache))]

    # -- the thread pool -------------------------------------------------------

    def _run_in_pool(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        reactor = self._reactor()
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=POOL_THREADS, name="relay-dns")
            self._pool.start()
            if IReactorCore.providedBy(reactor):
                reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(reactor, self._pool, f, *args)

    def _reactor(self) -> Any:
        """The injected clock, which must take calls from threads when the resolver runs its own."""
        if not IReactorFromThreads.providedBy(self._clock):
            raise TypeError("MXResolver's own threads need a clock that provides IReactorFromThreads "
                            "(the reactor), or a runner")
        return self._clock
