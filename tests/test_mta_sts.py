"""Tests for relay.mta_sts: policy and TXT parsing, MX patterns, the cache, the fetcher."""

from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface.verify import verifyObject

from certs import make_certificate
from dnsserver import start_dns_server
from deferreds import failure_of, no_result, success
from relay.mta_sts import (
    MAX_MAX_AGE,
    MODE_ENFORCE,
    MODE_NONE,
    MODE_TESTING,
    FetchError,
    Policy,
    PolicyCache,
    PolicyError,
    PolicyFetcher,
    ResolvingTLSEndpoint,
    _EndpointFactory,
    mx_pattern_matches,
    parse_policy,
    parse_txt,
    policy_url,
)
from relay.routing.dns import ResolutionError
from relay.routing.mx import MXResolver
from relay.trust import TrustStore


POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.a.test\r\nmx: *.backup.a.test\r\nmax_age: 86400\r\n"


@pytest.fixture
def events():
    captured: list[dict] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def logged(events: list[dict]) -> str:
    return "\n".join(formatEvent(e) for e in events)


# -- policy text -----------------------------------------------------------------


def test_parse_valid_policy():
    """A CRLF policy gives its mode, its mx patterns in order and its max_age."""
    policy = parse_policy(POLICY.decode())
    assert policy == Policy(mode=MODE_ENFORCE, mx=("mx1.a.test", "*.backup.a.test"), max_age=86400)


def test_parse_accepts_lf_blank_lines_unknown_fields_and_case():
    """LF line ends, blank lines and unknown fields are tolerated; mx patterns are lower-cased."""
    text = "version: STSv1\n\nmode:testing\nmx:  MX.A.Test.  \nfuture_field: anything\nmax_age: 0\n"
    policy = parse_policy(text)
    assert (policy.mode, policy.mx, policy.max_age) == (MODE_TESTING, ("mx.a.test",), 0)


def test_mode_none_needs_no_mx():
    """A policy in mode none is valid without mx fields."""
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 60\n").mode == MODE_NONE


def test_first_of_a_repeated_field_counts():
    """Of a repeated single-valued field, the first one is used."""
    policy = parse_policy("version: STSv1\nmode: testing\nmode: enforce\nmx: a.test\nmax_age: 5\n")
    assert policy.mode == MODE_TESTING


@pytest.mark.parametrize(
    "text,why",
    [
        ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 5\n", "version"),
        ("mode: enforce\nmx: a.test\nmax_age: 5\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 5\n", "mode"),
        ("version: STSv1\nmx: a.test\nmax_age: 5\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.test\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "max_age"),
        (f"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: {MAX_MAX_AGE + 1}\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 5\n", "no mx"),
        ("version: STSv1\nmode: enforce\nmx: *.com\nmax_age: 5\n", "wildcard"),
        ("version: STSv1\nmode: enforce\nmx: mail.*.a.test\nmax_age: 5\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: *\nmax_age: 5\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: bad name.test\nmax_age: 5\n", "mx"),
        ("version: STSv1\nthis line has no colon\nmode: enforce\nmx: a.test\nmax_age: 5\n", "line 2"),
        ("<html>not a policy</html>", "line 1"),
    ],
)
def test_invalid_policies_are_refused(text, why):
    """A policy with a bad version, mode, max_age, mx or line is refused with a reason naming it."""
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


# -- MX patterns (RFC 8461 3.4 and 4.1) -------------------------------------------


@pytest.mark.parametrize(
    "pattern,host,expected",
    [
        ("mx1.a.test", "mx1.a.test", True),
        ("mx1.a.test", "MX1.A.TEST.", True),
        ("mx1.a.test", "mx2.a.test", False),
        ("mx1.a.test", "x.mx1.a.test", False),
        ("*.a.test", "mx1.a.test", True),
        ("*.a.test", "MX9.a.test.", True),
        ("*.a.test", "a.test", False),
        ("*.a.test", "deep.mx1.a.test", False),
        ("*.a.test", "mx1.other.test", False),
        ("*.a.test", "mx1.xa.test", False),
        ("*.xn--bcher-kva.test", "mx.bücher.test", True),
    ],
)
def test_mx_pattern_matching(pattern, host, expected):
    """An exact pattern matches its name only; a wildcard stands for exactly one leftmost label."""
    assert mx_pattern_matches(pattern, host) is expected


def test_policy_matches_any_pattern():
    """A host is allowed when one of the policy's patterns matches it."""
    policy = parse_policy(POLICY.decode())
    assert policy.matches("mx1.a.test") and policy.matches("b1.backup.a.test")
    assert not policy.matches("mx2.a.test")


# -- TXT record -------------------------------------------------------------------


@pytest.mark.parametrize(
    "records,expected",
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc123"], "abc123"),
        (["some other record", "v=STSv1; id=x1"], "x1"),
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),
        (["v=STSv1;"], None),
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv1; id=" + "a" * 33], None),
        (["v=STSv10; id=a"], None),
        ([], None),
    ],
)
def test_parse_txt(records, expected):
    """Exactly one v=STSv1 record with a 1-32 character alphanumeric id names the policy; else none."""
    assert parse_txt(records) == expected


def test_txt_lookup_against_a_real_dns_server(tmp_path):
    """MXResolver.txt reads TXT records over the wire; a missing name gives no records."""
    zone = {"_mta-sts.a.test": {"TXT": ["v=STSv1; id=42"]}, "a.test": {"A": ["127.0.0.2"]}}
    port, stop = start_dns_server(zone, tmp_path)
    try:
        resolver = MXResolver((("127.0.0.1", port),), clock=Clock(), runner=lambda f, *a: f(*a), timeout=5)
        assert success(resolver.txt("_mta-sts.a.test")) == ["v=STSv1; id=42"]
        assert success(resolver.txt("_mta-sts.missing.test")) == []
        assert success(resolver.txt("_mta-sts.a.test.")) == ["v=STSv1; id=42"]
    finally:
        stop()


# -- the cache ----------------------------------------------------------------------


class FakeSources:
    """TXT records and policy bodies per domain; counts what was asked."""

    def __init__(self) -> None:
        self.txt: dict[str, Any] = {}
        self.bodies: dict[str, Any] = {}
        self.txt_calls: list[str] = []
        self.fetches: list[str] = []
        self.manual: list[Deferred] = []

    def lookup_txt(self, name: str) -> Deferred:
        self.txt_calls.append(name)
        answer = self.txt.get(name, [])
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        return defer.succeed(list(answer))

    def fetch(self, domain: str) -> Deferred:
        self.fetches.append(domain)
        body = self.bodies.get(domain)
        if body == "manual":
            d: Deferred = Deferred()
            self.manual.append(d)
            return d
        if isinstance(body, BaseException):
            return defer.fail(body)
        if body is None:
            return defer.fail(FetchError("HTTP status 404 (redirects are not followed)"))
        return defer.succeed(body)


def cache_with(txt_id: Optional[str] = "1", body: Any = POLICY, recheck: float = 300.0) -> tuple[PolicyCache, FakeSources, Clock]:
    sources = FakeSources()
    if txt_id is not None:
        sources.txt["_mta-sts.a.test"] = [f"v=STSv1; id={txt_id}"]
    sources.bodies["a.test"] = body
    clock = Clock()
    return PolicyCache(sources.lookup_txt, sources.fetch, clock, recheck=recheck), sources, clock


def test_policy_is_fetched_once_and_cached():
    """A policy is fetched at the first look-up and served from the cache until the recheck interval."""
    cache, sources, clock = cache_with()
    first = success(cache.policy("A.test"))
    assert first is not None and first.mode == MODE_ENFORCE
    clock.advance(299)
    assert success(cache.policy("a.test")) == first
    assert (sources.fetches, len(sources.txt_calls)) == (["a.test"], 1)


def test_same_txt_id_after_recheck_keeps_the_policy():
    """After the recheck interval the TXT record is read again; an unchanged id means no new fetch."""
    cache, sources, clock = cache_with()
    success(cache.policy("a.test"))
    clock.advance(301)
    assert success(cache.policy("a.test")).mode == MODE_ENFORCE
    assert (sources.fetches, len(sources.txt_calls)) == (["a.test"], 2)


def test_new_txt_id_fetches_the_policy_again():
    """A changed TXT id makes the policy be fetched again and the new one applies."""
    cache, sources, clock = cache_with()
    success(cache.policy("a.test"))
    sources.txt["_mta-sts.a.test"] = ["v=STSv1; id=2"]
    sources.bodies["a.test"] = POLICY.replace(b"enforce", b"testing")
    clock.advance(301)
    assert success(cache.policy("a.test")).mode == MODE_TESTING
    assert sources.fetches == ["a.test", "a.test"]


def test_policy_expires_after_max_age():
    """A cached policy is dropped after its max_age, even when the TXT record has gone."""
    cache, sources, clock = cache_with(body=POLICY.replace(b"86400", b"600"))
    success(cache.policy("a.test"))
    del sources.txt["_mta-sts.a.test"]
    clock.advance(301)
    assert success(cache.policy("a.test")) is not None  # TXT gone, cached policy still applies
    assert cache.cached("a.test") is not None
    clock.advance(300)
    assert cache.cached("a.test") is None
    assert success(cache.policy("a.test")) is None


def test_no_txt_record_means_no_policy_and_is_remembered():
    """Without a TXT record there is no policy, nothing is fetched, and the answer is kept for a while."""
    cache, sources, clock = cache_with(txt_id=None)
    assert success(cache.policy("a.test")) is None
    assert success(cache.policy("a.test")) is None
    assert (sources.fetches, len(sources.txt_calls)) == ([], 1)
    clock.advance(301)
    success(cache.policy("a.test"))
    assert len(sources.txt_calls) == 2


def test_fetch_failure_without_cache_is_no_policy_and_logged(events):
    """A fetch that fails with no cached policy means no policy, said in the log; retried after recheck."""
    cache, sources, clock = cache_with(body=None)
    assert success(cache.policy("a.test")) is None
    assert "fetching the policy of a.test failed: HTTP status 404" in logged(events)
    assert "delivering without a policy" in logged(events)
    success(cache.policy("a.test"))
    assert sources.fetches == ["a.test"]
    clock.advance(301)
    success(cache.policy("a.test"))
    assert sources.fetches == ["a.test", "a.test"]


def test_fetch_failure_keeps_the_cached_policy():
    """When a new id's policy cannot be fetched, the cached policy keeps applying."""
    cache, sources, clock = cache_with()
    success(cache.policy("a.test"))
    sources.txt["_mta-sts.a.test"] = ["v=STSv1; id=2"]
    sources.bodies["a.test"] = FetchError("timed out")
    clock.advance(301)
    assert success(cache.policy("a.test")).mode == MODE_ENFORCE


def test_invalid_policy_body_is_no_policy():
    """A policy body that does not parse counts as a failed fetch."""
    cache, _, _ = cache_with(body=b"version: STSv1\nmode: maybe\n")
    assert success(cache.policy("a.test")) is None


def test_txt_lookup_failure_is_no_policy():
    """A TXT lookup that fails (SERVFAIL, timeout) without a cached policy means no policy."""
    cache, sources, _ = cache_with()
    sources.txt["_mta-sts.a.test"] = ResolutionError("4.4.3", "timed out")
    assert success(cache.policy("a.test")) is None
    assert sources.fetches == []


def test_concurrent_lookups_are_merged():
    """Two look-ups of one domain while its policy is being fetched share one fetch."""
    cache, sources, _ = cache_with(body="manual")
    first, second = cache.policy("a.test"), cache.policy("a.test")
    no_result(first)
    sources.manual[0].callback(POLICY)
    assert success(first) == success(second)
    assert sources.fetches == ["a.test"]


def test_unexpected_error_never_escapes():
    """An unexpected exception inside a look-up gives None (logged), never an errback."""
    sources = FakeSources()

    def broken(name: str) -> Any:
        raise RuntimeError("boom")

    cache = PolicyCache(broken, sources.fetch, Clock())
    assert success(cache.policy("a.test")) is None


# -- the fetcher ------------------------------------------------------------------


class FakeBodyTransport:
    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    """A twisted.web response whose body is delivered in the given chunks, or held back."""

    def __init__(self, code: int, chunks: list[bytes], length: Any = None, finish: bool = True) -> None:
        self.code = code
        self.chunks = chunks
        self.length = length
        self.finish = finish
        self.transport = FakeBodyTransport()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        if self.finish and not self.transport.stopped:
            protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    def __init__(self, response: Any) -> None:
        self.response = response
        self.requests: list[tuple[bytes, bytes]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Deferred:
        self.requests.append((method, uri))
        if isinstance(self.response, Deferred):
            return self.response
        return defer.succeed(self.response)


def fetcher(response: Any, clock: Optional[Clock] = None) -> tuple[PolicyFetcher, FakeAgent, Clock]:
    clock = clock or Clock()
    agent = FakeAgent(response)
    return PolicyFetcher(clock, resolve=None, agent=agent, timeout=30), agent, clock  # type: ignore[arg-type]


def test_fetch_gets_the_well_known_url():
    """The policy is fetched with GET from https://mta-sts.<domain>/.well-known/mta-sts.txt."""
    f, agent, _ = fetcher(FakeResponse(200, [POLICY[:10], POLICY[10:]]))
    assert success(f("a.test")) == POLICY
    assert agent.requests == [(b"GET", b"https://mta-sts.a.test/.well-known/mta-sts.txt")]
    assert policy_url("a.test") == "https://mta-sts.a.test/.well-known/mta-sts.txt"


@pytest.mark.parametrize("code", [301, 302, 404, 500])
def test_fetch_refuses_other_status_codes(code):
    """Only a 200 answer is a policy; a redirect is not followed."""
    f, _, _ = fetcher(FakeResponse(code, [b"moved"]))
    assert f"HTTP status {code}" in str(failure_of(f("a.test")).value)


def test_fetch_body_is_limited_to_64_kib():
    """A body over 64 KiB is refused and the connection aborted."""
    response = FakeResponse(200, [b"x" * 40000, b"x" * 40000])
    f, _, _ = fetcher(response)
    assert failure_of(f("a.test")).check(FetchError)
    assert response.transport.stopped


def test_fetch_refuses_announced_large_body():
    """A Content-Length over the limit is refused without reading."""
    f, _, _ = fetcher(FakeResponse(200, [], length=10**6))
    assert "larger than" in str(failure_of(f("a.test")).value)


def test_fetch_times_out_on_the_clock():
    """A fetch that gets no answer fails after the timeout on the injected clock."""
    f, _, clock = fetcher(Deferred())
    d = f("a.test")
    clock.advance(29)
    no_result(d)
    clock.advance(2)
    assert failure_of(d).check(defer.TimeoutError)


def test_stalled_body_times_out_and_aborts():
    """A body that stops arriving is cut off at the timeout."""
    response = FakeResponse(200, [b"version: STSv1\r\n"], finish=False)
    f, _, clock = fetcher(response)
    d = f("a.test")
    clock.advance(31)
    assert failure_of(d).check(defer.TimeoutError)
    assert response.transport.stopped


def test_endpoint_factory_is_https_only_and_resolves_through_our_resolver(tmp_path):
    """The Agent's endpoints connect to the address our resolver gave, with TLS for the policy host."""
    cert, _ = make_certificate(tmp_path, "mta-sts.a.test")
    reactor = MemoryReactorClock()
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> Deferred:
        asked.append((host, port))
        return defer.succeed(["127.0.0.9"])

    factory = _EndpointFactory(reactor, resolve, TrustStore(str(cert)), 30)
    verifyObject(IAgentEndpointFactory, factory)

    class URI:
        scheme, host, port = b"https", b"mta-sts.a.test", 443

    endpoint = factory.endpointForURI(URI)
    assert isinstance(endpoint, ResolvingTLSEndpoint)
    endpoint.connect(object())
    assert asked == [("mta-sts.a.test", 443)]
    assert [(c[0], c[1]) for c in reactor.tcpClients] == [("127.0.0.9", 443)]
    URI.scheme = b"http"
    with pytest.raises(SchemeNotSupported):
        factory.endpointForURI(URI)


def test_endpoint_tries_the_next_address_and_fails_cleanly():
    """Connection failures move on to the next address; with none left the connect fails with FetchError."""
    from twisted.internet.error import ConnectionRefusedError

    from twisted.internet import ssl

    reactor = MemoryReactorClock()
    options = ssl.optionsForClientTLS("h.test")
    endpoint = ResolvingTLSEndpoint(reactor, lambda h, p: defer.succeed(["127.0.0.9", "::1"]), "h.test", 443, options, 5)
    d = endpoint.connect(object())
    reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.9", "::1"]
    reactor.tcpClients[1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert failure_of(d).check(FetchError)
