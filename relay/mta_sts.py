"""MTA-STS (RFC 8461): a recipient domain's policy, discovered, fetched, parsed and cached.

This module owns everything about a domain's MTA-STS policy up to the
question "which policy applies to this domain now?": the ``_mta-sts`` TXT
record (RFC 8461 3.1), the HTTPS fetch of
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (3.3), the policy text
(3.2), MX pattern matching (3.4 and 4.1) and the cache (5.1).  Applying the
policy to a delivery (which MX hosts may be used, with which TLS checks) is
the delivery module's job.

* ``parse_policy`` and ``parse_txt`` are pure; ``Policy.matches`` implements
  the MX pattern rules: ``mail.example.com`` matches that name only,
  ``*.example.com`` matches exactly one more label (``mx1.example.com``, not
  ``example.com`` nor ``a.b.example.com``).
* ``PolicyFetcher`` fetches the policy with Twisted's HTTP client.  The
  policy host is resolved through the relay's own resolver (not the system
  one), the certificate is verified for ``mta-sts.<domain>`` against
  ``[delivery] tls_ca_file`` or the system store, redirects are not
  followed, only a 200 answer counts, the body is limited to 64 KiB and the
  whole fetch to ``FETCH_TIMEOUT`` seconds.
* ``PolicyCache`` answers ``policy(domain)`` with a Deferred that never
  errbacks: a ``Policy`` or None (no policy).  A fetched policy is kept for
  its ``max_age`` on the injected clock together with the TXT record's id;
  the TXT record is looked at again at most every ``recheck`` seconds, and a
  new id makes the policy be fetched again.  When the TXT record is gone or
  a fetch fails, a cached policy that has not expired keeps applying
  (RFC 8461 5.1); without one, the domain has no policy.  Failures are
  remembered for ``recheck`` seconds too, so a broken policy host does not
  cost one fetch per message.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from relay.log import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from relay.domains import normalize_domain
from relay.envelope import ROUTE_SMARTHOST, NextHop, Route
from relay.trust import TrustStore

log = Logger()

VERSION = "STSv1"
MODE_ENFORCE = "enforce"
MODE_TESTING = "testing"
MODE_NONE = "none"
MODES = (MODE_ENFORCE, MODE_TESTING, MODE_NONE)

MAX_MAX_AGE = 31557600  # RFC 8461 3.2: about one year
MAX_POLICY_SIZE = 64 * 1024  # octets of the policy body
FETCH_TIMEOUT = 30.0  # seconds for the whole fetch (resolve, connect, TLS, body)
TXT_RECHECK = 300.0  # seconds between two looks at the same domain's TXT record
MAX_CACHE_ENTRIES = 10000
HTTPS_PORT = 443
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
USER_AGENT = b"relay (MTA-STS)"

_FIELD = re.compile(r"^([A-Za-z0-9_.-]{1,32})[ \t]*:[ \t]*(.*?)[ \t]*$")
_TXT_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_DIGITS = re.compile(r"^[0-9]{1,10}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class PolicyError(ValueError):
    """A policy text or a TXT record that is not valid; the text says what is wrong."""


class FetchError(Exception):
    """The policy could not be fetched; the text says why, in fixed words."""


# -- the policy -----------------------------------------------------------------


def _host_key(name: str) -> str:
    """A host name as compared with MX patterns: ASCII, lower case, no final dot."""
    try:
        return normalize_domain(name.strip().rstrip("."))
    except (UnicodeError, ValueError):
        return name.strip().rstrip(".").lower()


def mx_pattern_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: ``pattern`` matches ``host`` exactly, or ``*.`` stands for one label."""
    host = _host_key(host)
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and "." + rest == suffix
    return host == pattern


@dataclass(frozen=True)
class Policy:
    """One domain's MTA-STS policy as served (RFC 8461 3.2)."""

    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # normalized patterns: "mx.example.com" or "*.example.com"
    max_age: int  # seconds
    version: str = VERSION

    def matches(self, host: str) -> bool:
        """Whether the MX host ``host`` is allowed by one of the policy's patterns."""
        return any(mx_pattern_matches(pattern, host) for pattern in self.mx)


def _mx_pattern(value: str) -> str:
    text = value.strip().rstrip(".").lower()
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    try:
        name = normalize_domain(name)
    except (UnicodeError, ValueError):
        raise PolicyError(f"mx: {value!r} is not a host name or *.domain pattern") from None
    labels = name.split(".")
    if not name or "*" in name or not all(_LABEL.match(label) for label in labels):
        raise PolicyError(f"mx: {value!r} is not a host name or *.domain pattern")
    if wildcard and len(labels) < 2:
        raise PolicyError(f"mx: {value!r}: a wildcard needs at least two labels after it")
    return ("*." if wildcard else "") + name


def parse_policy(text: str) -> Policy:
    """Parse a policy body (CRLF or LF lines); raises PolicyError.

    ``version`` must be STSv1, ``mode`` one of enforce/testing/none,
    ``max_age`` an integer up to 31557600, and at least one ``mx`` is needed
    unless the mode is none.  Unknown fields are ignored; of a repeated
    single field the first counts.
    """
    fields: dict[str, str] = {}
    patterns: list[str] = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        match = _FIELD.match(line)
        if match is None:
            raise PolicyError(f"line {number} is not a 'key: value' field")
        key, value = match.group(1).lower(), match.group(2)
        if key == "mx":
            patterns.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != VERSION:
        raise PolicyError(f"version is {fields.get('version', 'missing')!r}, not {VERSION}")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"mode {mode or 'missing'!r} is not one of {', '.join(MODES)}")
    max_age_text = fields.get("max_age", "")
    if not _DIGITS.match(max_age_text) or int(max_age_text) > MAX_MAX_AGE:
        raise PolicyError(f"max_age {max_age_text or 'missing'!r} is not a number of seconds up to {MAX_MAX_AGE}")
    if not patterns and mode != MODE_NONE:
        raise PolicyError("no mx field")
    return Policy(mode=mode, mx=tuple(dict.fromkeys(patterns)), max_age=int(max_age_text))


def parse_txt(records: list[str]) -> Optional[str]:
    """The policy id of a domain's ``_mta-sts`` TXT records, or None (no policy).

    Records not starting with ``v=STSv1`` are ignored; exactly one must
    remain and carry a valid ``id`` (RFC 8461 3.1), otherwise there is none.
    """
    candidates = [r for r in records if re.match(r"^v=STSv1\s*(;|$)", r.strip())]
    if len(candidates) != 1:
        return None
    fields: dict[str, str] = {}
    for part in candidates[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    return policy_id if _TXT_ID.match(policy_id) else None


def policy_url(domain: str) -> str:
    return f"https://mta-sts.{domain}{WELL_KNOWN_PATH}"


# -- fetching ---------------------------------------------------------------------


def addresses_from(resolver: Any) -> Callable[[str, int], Deferred]:
    """``resolve(host, port)`` -> Deferred list of addresses, through an MXResolver's A/AAAA lookup."""

    def resolve(host: str, port: int) -> Deferred:
        route = Route(kind=ROUTE_SMARTHOST, hosts=(NextHop(host, port),), rule="mta-sts")
        d = defer.maybeDeferred(resolver.targets, route, port)
        d.addCallback(lambda targets: [t.address for t in targets])
        return d

    return resolve


@implementer(IStreamClientEndpoint)
class ResolvingTLSEndpoint:
    """Resolve ``host`` with our resolver, connect to its addresses in turn, TLS verified for ``host``."""

    def __init__(
        self, reactor: Any, resolve: Callable[[str, int], Deferred], host: str, port: int, tls_options: Any, timeout: float
    ) -> None:
        self._reactor = reactor
        self._resolve = resolve
        self._host = host
        self._port = port
        self._tls_options = tls_options
        self._timeout = timeout

    def connect(self, factory: Any) -> Deferred:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        addresses = await self._resolve(self._host, self._port)
        if not addresses:
            raise FetchError(f"{self._host} has no address")
        last: Optional[BaseException] = None
        for address in addresses:
            tcp_type = TCP6ClientEndpoint if ipaddress.ip_address(address).version == 6 else TCP4ClientEndpoint
            tcp = tcp_type(self._reactor, address, self._port, timeout=self._timeout)
            try:
                return await wrapClientTLS(self._tls_options, tcp).connect(factory)
            except Exception as e:  # a refused or timed out address: try the next one
                last = e
        raise FetchError(f"cannot connect to {self._host}:{self._port}") from last


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """Endpoints for the Agent: https only, resolved and verified as ``ResolvingTLSEndpoint``."""

    def __init__(self, reactor: Any, resolve: Callable[[str, int], Deferred], trust: TrustStore,
                 timeout: float) -> None:
        self._reactor = reactor
        self._resolve = resolve
        self._trust = trust
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> ResolvingTLSEndpoint:
        from twisted.internet import ssl
        from twisted.web.error import SchemeNotSupported

        if uri.scheme != b"https":
            raise SchemeNotSupported(uri.scheme)
        host = uri.host.decode("ascii")
        options = ssl.optionsForClientTLS(host, trustRoot=self._trust.root())
        return ResolvingTLSEndpoint(self._reactor, self._resolve, host, uri.port, options, self._timeout)


class _LimitedBody(Protocol):
    """Collects a response body up to ``limit`` octets; more aborts the connection."""

    def __init__(self, finished: Deferred, limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done = True
            self.transport.stopProducing()
            self.finished.errback(FetchError(f"the policy is larger than {self.limit} octets"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done:
            return
        self.done = True
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(FetchError("the connection was lost while reading the policy"))

    def cancel(self, _: Deferred) -> None:
        if not self.done:
            self.done = True
            if self.transport is not None:
                self.transport.stopProducing()


def read_limited(response: Any, limit: int) -> Deferred:
    """The body of ``response`` as bytes; FetchError when it exceeds ``limit`` octets."""
    length = getattr(response, "length", None)
    if isinstance(length, int) and length > limit:
        response.deliverBody(Protocol())  # consume nothing; the connection is closed
        return defer.fail(FetchError(f"the policy is larger than {limit} octets"))
    holder: list[_LimitedBody] = []
    finished: Deferred = Deferred(lambda d: holder[0].cancel(d))
    protocol = _LimitedBody(finished, limit)
    holder.append(protocol)
    response.deliverBody(protocol)
    return finished


def failure_reason(failure: Failure) -> str:
    """A short reason for the logs, looking inside the HTTP client's wrapped failures."""
    error = failure.value
    inner = getattr(error, "reasons", None)
    if inner:
        return failure_reason(inner[0])
    if isinstance(error, (FetchError, defer.TimeoutError, defer.CancelledError)):
        return str(error) or type(error).__name__
    if type(error).__name__ == "VerificationError":
        return "the certificate does not match the policy host name"
    if "certificate verify failed" in str(error):
        return "the certificate is not trusted"
    return type(error).__name__


class PolicyFetcher:
    """``fetch(domain)`` -> Deferred bytes of the policy body; errbacks on any failure."""

    def __init__(
        self,
        reactor: Any,
        resolve: Callable[[str, int], Deferred],
        trust: Optional[TrustStore] = None,
        timeout: float = FETCH_TIMEOUT,
        max_size: int = MAX_POLICY_SIZE,
        agent: Any = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._max_size = max_size
        self._agent = agent or Agent.usingEndpointFactory(
            reactor,
            _EndpointFactory(reactor, resolve, trust if trust is not None else TrustStore(), timeout),
            pool=HTTPConnectionPool(reactor, persistent=False),
        )

    def __call__(self, domain: str) -> Deferred:
        d = Deferred.fromCoroutine(self._fetch(domain))
        d.addTimeout(self._timeout, self._reactor)
        return d

    async def _fetch(self, domain: str) -> bytes:
        url = policy_url(domain).encode("ascii")
        response = await self._agent.request(b"GET", url, Headers({b"User-Agent": [USER_AGENT]}))
        if response.code != 200:
            response.deliverBody(Protocol())
            raise FetchError(f"HTTP status {response.code} (redirects are not followed)")
        return await read_limited(response, self._max_size)


# -- the cache --------------------------------------------------------------------


@dataclass
class _Entry:
    """What is known of one domain: its policy (None: none), the TXT id, until when."""

    policy: Optional[Policy]
    policy_id: str
    expires: float  # the policy's max_age from its fetch; for "no policy", the next recheck
    checked: float  # when the TXT record was last looked at


class PolicyCache:
    """``policy(domain)``: the domain's MTA-STS policy or None; never errbacks."""

    def __init__(
        self,
        lookup_txt: Callable[[str], Deferred],
        fetch: Callable[[str], Deferred],
        clock: IReactorTime,
        recheck: float = TXT_RECHECK,
    ) -> None:
        self._lookup_txt = lookup_txt
        self._fetch = fetch
        self._clock = clock
        self._recheck = recheck
        self._entries: dict[str, _Entry] = {}
        self._waiting: dict[str, list[Deferred]] = {}

    def cached(self, domain: str) -> Optional[Policy]:
        """The cached, unexpired policy of ``domain`` (no lookup), or None."""
        entry = self._entries.get(_host_key(domain))
        if entry is None or entry.policy is None or entry.expires <= self._clock.seconds():
            return None
        return entry.policy

    def policy(self, domain: str) -> Deferred:
        """Fire with the Policy that applies to ``domain`` now, or None."""
        domain = _host_key(domain)
        d: Deferred = Deferred()
        if domain in self._waiting:
            self._waiting[domain].append(d)
            return d
        self._waiting[domain] = [d]
        work = Deferred.fromCoroutine(self._policy(domain))
        work.addErrback(self._unexpected, domain)
        work.addCallback(self._answer, domain)
        return d

    # -- internals ----------------------------------------------------------------

    def _answer(self, policy: Optional[Policy], domain: str) -> None:
        for d in self._waiting.pop(domain, []):
            d.callback(policy)

    def _unexpected(self, failure: Failure, domain: str) -> Optional[Policy]:
        log.failure("MTA-STS: looking up the policy of {domain} failed", failure, domain=domain)
        return self.cached(domain)

    async def _policy(self, domain: str) -> Optional[Policy]:
        now = self._clock.seconds()
        entry = self._entries.get(domain)
        if entry is not None and entry.expires <= now:
            del self._entries[domain]
            entry = None
        if entry is not None and now - entry.checked < self._recheck:
            return entry.policy
        try:
            records = await self._lookup_txt(f"_mta-sts.{domain}")
        except Exception as e:
            log.info("MTA-STS: TXT lookup for {domain} failed: {error}", domain=domain, error=getattr(e, "text", type(e).__name__))
            return entry.policy if entry is not None else None
        policy_id = parse_txt(list(records))
        if policy_id is None:
            return self._no_record(domain, entry, now)
        if entry is not None and entry.policy is not None and entry.policy_id == policy_id:
            entry.checked = now
            return entry.policy
        return await self._refresh(domain, policy_id, entry, now)

    def _no_record(self, domain: str, entry: Optional[_Entry], now: float) -> Optional[Policy]:
        """No valid TXT record: a cached policy keeps applying; else remember "none" for a while."""
        if entry is not None and entry.policy is not None:
            entry.checked = now
            return entry.policy
        self._store(domain, _Entry(None, "", now + self._recheck, now))
        return None

    async def _refresh(self, domain: str, policy_id: str, entry: Optional[_Entry], now: float) -> Optional[Policy]:
        try:
            body = await self._fetch(domain)
            policy = parse_policy(body.decode("utf-8"))
        except Exception:
            reason = failure_reason(Failure())
            if entry is not None and entry.policy is not None:
                log.warn(
                    "MTA-STS: fetching the policy of {domain} failed: {error}; the cached policy (mode {mode}) still applies",
                    domain=domain, error=reason, mode=entry.policy.mode,
                )
                entry.checked = now
                return entry.policy
            log.warn("MTA-STS: fetching the policy of {domain} failed: {error}; delivering without a policy", domain=domain, error=reason)
            self._store(domain, _Entry(None, policy_id, now + self._recheck, now))
            return None
        log.info(
            "MTA-STS: policy of {domain} (id {id}): mode {mode}, mx {mx}, max_age {max_age}",
            domain=domain, id=policy_id, mode=policy.mode, mx=" ".join(policy.mx) or "-", max_age=policy.max_age,
        )
        self._store(domain, _Entry(policy, policy_id, now + policy.max_age, now))
        return policy

    def _store(self, domain: str, entry: _Entry) -> None:
        if domain not in self._entries and len(self._entries) >= MAX_CACHE_ENTRIES:
            now = self._clock.seconds()
            for key in [k for k, e in self._entries.items() if e.expires <= now]:
                del self._entries[key]
            if len(self._entries) >= MAX_CACHE_ENTRIES:
                del self._entries[next(iter(self._entries))]
        self._entries[domain] = entry


def policy_cache(resolver: Any, reactor: Any, trust: Optional[TrustStore] = None) -> PolicyCache:
    """The cache the relay uses: TXT and A/AAAA lookups through ``resolver`` (an MXResolver).

    ``trust``: the CA certificates the policy host must present a certificate of (None: the system store).
    """
    fetcher = PolicyFetcher(reactor, addresses_from(resolver), trust)
    return PolicyCache(resolver.txt, fetcher, reactor)
