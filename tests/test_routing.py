"""Tests for relay.routing: the router chain, the built-in routers, build_chain, rcpt_check."""

from __future__ import annotations

from typing import Any, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relay.config import Config, RouteConfig, ServerConfig
from relay.config_values import ConfigError
from relay.domains import DomainSet
from relay.envelope import (
    ROUTE_MX,
    ROUTE_REJECT,
    ROUTE_SMARTHOST,
    ROUTE_SOURCE,
    ClientInfo,
    Envelope,
    NextHop,
    Recipient,
    Route,
)
from relay.interfaces import IRouter, IRouterFactory
from relay.routing import (
    DEFAULT_RULE,
    LITERAL_RULE,
    RouteContext,
    RouterChain,
    build_chain,
    rcpt_check,
)
from relay.routing.plugins import OptionError, UnknownPluginError
from relay.routing.static import (
    RejectRouter,
    SmartHostRouter,
    SmartHostRouterFactory,
    SourceRouteHonorRouter,
    ViaRouter,
    ViaRouterFactory,
    parse_next_hop,
)

UNTRUSTED = ClientInfo(address="198.51.100.7")
TRUSTED = ClientInfo(address="127.0.0.1", trusted=True)
AUTHENTICATED = ClientInfo(address="198.51.100.8", auth_user="alice")
CONTEXT = RouteContext(sender="s@here.test", client=UNTRUSTED, size=100, queue_id="Q1")


# -- test fakes, each checked against the interface ---------------------------------


@implementer(IRouter)
class FixedRouter:
    """Answers the same thing for every recipient and records who asked."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def route(self, recipient: Recipient, context: RouteContext) -> Any:
        self.asked.append(recipient.address)
        return self.answer


@implementer(IRouter)
class PendingRouter:
    """Answers with a Deferred the test fires."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def route(self, recipient: Recipient, context: RouteContext) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


@implementer(IRouter)
class RaisingRouter:
    """Raises, as a buggy router would."""

    def route(self, recipient: Recipient, context: RouteContext) -> None:
        raise RuntimeError("map file vanished")


@implementer(IRouterFactory)
class FakeFactory:
    """A plugin factory that records its arguments and makes a FixedRouter."""

    name = "fake"

    def __init__(self, answer: Optional[Route] = None, error: Optional[Exception] = None) -> None:
        self.answer = answer
        self.error = error
        self.calls: list[tuple[dict, Any, Any]] = []

    def makeRouter(self, options: dict, domains: Any, config: Any) -> Any:
        self.calls.append((options, domains, config))
        if self.error is not None:
            raise self.error
        return FixedRouter(self.answer)


@implementer(IRouterFactory)
class BadRouterFactory:
    """A plugin factory whose routers do not provide IRouter."""

    name = "bad"

    def makeRouter(self, options: dict, domains: Any, config: Any) -> Any:
        return object()


SMART = Route(kind=ROUTE_SMARTHOST, hosts=(NextHop("smart.test", 587),))


class FakesProvideInterfacesTests(SynchronousTestCase):
    def test_fakes_verify(self) -> None:
        """Every test fake fully provides the interface it stands in for."""
        self.assertTrue(verifyObject(IRouter, FixedRouter(None)))
        self.assertTrue(verifyObject(IRouter, PendingRouter()))
        self.assertTrue(verifyObject(IRouter, RaisingRouter()))
        self.assertTrue(verifyObject(IRouterFactory, FakeFactory()))
        self.assertTrue(verifyObject(IRouterFactory, BadRouterFactory()))

    def test_builtin_routers_verify(self) -> None:
        """The built-in routers provide IRouter and their factories IRouterFactory."""
        self.assertTrue(verifyObject(IRouter, SmartHostRouter([NextHop("a.test")])))
        self.assertTrue(verifyObject(IRouter, ViaRouter(NextHop("a.test"))))
        self.assertTrue(verifyObject(IRouter, RejectRouter("no")))
        self.assertTrue(verifyObject(IRouter, SourceRouteHonorRouter()))
        self.assertTrue(verifyObject(IRouterFactory, SmartHostRouterFactory()))
        self.assertTrue(verifyObject(IRouterFactory, ViaRouterFactory()))


# -- the chain --------------------------------------------------------------------------


class ChainTests(SynchronousTestCase):
    def route(self, chain: RouterChain, address: str, context: RouteContext = CONTEXT) -> Route:
        return self.successResultOf(chain.route(Recipient(address), context))

    def test_default_is_direct_mx(self) -> None:
        """With no rule, a recipient goes by direct MX of its domain."""
        route = self.route(RouterChain([]), "bob@Example.TEST")
        self.assertEqual(
            route, Route(kind=ROUTE_MX, hosts=(NextHop("Example.TEST", mx=True),), rule=DEFAULT_RULE)
        )

    def test_address_literal_goes_direct_without_mx(self) -> None:
        """An address-literal domain is delivered to that address, never looked up as MX."""
        for domain in ("[192.0.2.1]", "[IPv6:2001:db8::1]"):
            route = self.route(RouterChain([]), f"bob@{domain}")
            self.assertEqual(route.kind, ROUTE_MX)
            self.assertEqual(route.hosts, (NextHop(domain, mx=False),))
            self.assertEqual(route.rule, LITERAL_RULE)

    def test_first_answer_wins_and_none_passes_on(self) -> None:
        """Routers are asked in order; None passes to the next; the first Route wins."""
        silent, first, second = FixedRouter(None), FixedRouter(SMART), FixedRouter(SMART)
        chain = RouterChain([("r0", None, silent), ("r1", None, first), ("r2", None, second)])
        route = self.route(chain, "a@x.test")
        self.assertEqual(route.rule, "r1")
        self.assertEqual(route.hosts, SMART.hosts)
        self.assertEqual((silent.asked, first.asked, second.asked), (["a@x.test"], ["a@x.test"], []))

    def test_only_matching_domains_are_asked(self) -> None:
        """A router is asked only about recipients whose domain its DomainSet matches."""
        other, mine = FixedRouter(SMART), FixedRouter(SMART)
        chain = RouterChain(
            [("other", DomainSet(["other.test"]), other), ("mine", DomainSet([".corp.test"]), mine)]
        )
        self.assertEqual(self.route(chain, "a@mail.corp.test").rule, "mine")
        self.assertEqual(self.route(chain, "a@corp.test").rule, DEFAULT_RULE)
        self.assertEqual(other.asked, [])

    def test_domain_matching_is_case_insensitive_and_idna_aware(self) -> None:
        """A U-label pattern matches the A-label form of the domain in any case."""
        router = FixedRouter(SMART)
        chain = RouterChain([("idn", DomainSet(["bücher.example"]), router)])
        self.assertEqual(self.route(chain, "a@XN--BCHER-KVA.Example").rule, "idn")
        self.assertEqual(self.route(chain, "a@BÜCHER.example").rule, "idn")

    def test_asynchronous_answer(self) -> None:
        """A router answering with a Deferred holds the result until it fires."""
        pending, later = PendingRouter(), FixedRouter(SMART)
        chain = RouterChain([("slow", None, pending), ("later", None, later)])
        d = chain.route(Recipient("a@x.test"), CONTEXT)
        self.assertNoResult(d)
        self.assertEqual(later.asked, [])
        pending.pending[0].callback(None)
        self.assertEqual(self.successResultOf(d).rule, "later")

    def test_answers_at_once_then_later_keep_the_order(self) -> None:
        """A router answering None at once, then two answering later: each is asked once, in order."""
        first, second, third = FixedRouter(None), PendingRouter(), PendingRouter()
        chain = RouterChain([("map", None, first), ("slow", None, second), ("slower", None, third)])
        d = chain.route(Recipient("a@x.test"), CONTEXT)
        self.assertEqual((first.asked, len(second.pending), len(third.pending)), (["a@x.test"], 1, 0))
        second.pending[0].callback(None)
        self.assertEqual((len(second.pending), len(third.pending)), (1, 1))
        third.pending[0].callback(SMART)
        self.assertEqual(self.successResultOf(d).rule, "slower")

    def test_asynchronous_route_is_named(self) -> None:
        """A Deferred Route from a router carries the rule name."""
        pending = PendingRouter()
        chain = RouterChain([("slow", None, pending)])
        d = chain.route(Recipient("a@x.test"), CONTEXT)
        pending.pending[0].callback(SMART)
        self.assertEqual(self.successResultOf(d), Route(kind=ROUTE_SMARTHOST, hosts=SMART.hosts, rule="slow"))

    def test_raising_router_fails_the_chain(self) -> None:
        """A router that raises makes the chain errback with its error; later routers are not asked."""
        later = FixedRouter(SMART)
        chain = RouterChain([("broken", None, RaisingRouter()), ("later", None, later)])
        failure = self.failureResultOf(chain.route(Recipient("a@x.test"), CONTEXT), RuntimeError)
        self.assertEqual(str(failure.value), "map file vanished")
        self.assertEqual(later.asked, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_errback_of_a_router_fails_the_chain(self) -> None:
        """A router whose Deferred errbacks makes the chain errback with the same error."""
        pending = PendingRouter()
        chain = RouterChain([("slow", None, pending)])
        d = chain.route(Recipient("a@x.test"), CONTEXT)
        pending.pending[0].errback(TimeoutError("lookup table timed out"))
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(len(self.flushLoggedErrors(TimeoutError)), 1)

    def test_failure_of_a_later_router_is_logged_once(self) -> None:
        """A failure is logged once, for the router that failed, not for each earlier router."""
        chain = RouterChain(
            [("a", None, FixedRouter(None)), ("b", None, FixedRouter(None)), ("c", None, RaisingRouter())]
        )
        self.failureResultOf(chain.route(Recipient("a@x.test"), CONTEXT), RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_answer_that_is_not_a_route_fails(self) -> None:
        """A router answering something other than a Route or None fails the chain (typed contract)."""
        chain = RouterChain([("untyped", None, FixedRouter({"kind": "smarthost"}))])
        self.failureResultOf(chain.route(Recipient("a@x.test"), CONTEXT), TypeError)
        self.flushLoggedErrors(TypeError)

    def test_route_without_hosts_fails(self) -> None:
        """A smarthost answer with no hosts is refused rather than handed to delivery."""
        chain = RouterChain([("empty", None, FixedRouter(Route(kind=ROUTE_SMARTHOST)))])
        self.failureResultOf(chain.route(Recipient("a@x.test"), CONTEXT), ValueError)
        self.flushLoggedErrors(ValueError)

    def test_router_detail_is_kept_after_rule_name(self) -> None:
        """A rule text given by a router is kept after the chain's rule name."""
        answer = Route(kind=ROUTE_SMARTHOST, hosts=SMART.hosts, rule="map line 3")
        chain = RouterChain([("routes[2] (plugin tm)", None, FixedRouter(answer))])
        self.assertEqual(self.route(chain, "a@x.test").rule, "routes[2] (plugin tm): map line 3")

    def test_non_router_is_refused_at_construction(self) -> None:
        """The chain verifies every router provides IRouter when it is built."""
        with self.assertRaises(Exception):
            RouterChain([("nothing", None, object())])

    def test_context_from_envelope(self) -> None:
        """RouteContext.from_envelope carries sender, client, size and queue id."""
        envelope = Envelope(queue_id="Q9", sender="s@a.test", recipients=(), client=TRUSTED, size=1234)
        self.assertEqual(
            RouteContext.from_envelope(envelope, "relay.test"),
            RouteContext(sender="s@a.test", client=TRUSTED, size=1234, queue_id="Q9", hostname="relay.test"),
        )


# -- build_chain and the built-in routers --------------------------------------------

EXAMPLE_ROUTES = (
    RouteConfig(domains=("partner.example", ".corp.example.org"), smarthost=("mail.corp.example.org:2525", "backup.example.org"), tls="require", username="relay", password_file="/etc/relay/secret", index=0),
    RouteConfig(domains=("blocked.example",), reject="no mail to this domain", index=1),
    RouteConfig(domains=("legacy.example",), via=("gw1.example.net:2525", "gw2.example.net", "192.0.2.9"), index=2),
    RouteConfig(domains=("*",), smarthost=("[2001:db8::25]:587",), index=3),
)


def config(*routes: RouteConfig, source_routes: str = "ignore") -> Config:
    return Config(
        hostname="relay.test",
        server=ServerConfig(source_routes=source_routes),
        routes=routes,
        source="relay.toml",
    )


class BuildChainTests(SynchronousTestCase):
    def route(self, chain: RouterChain, address: str, client: ClientInfo = UNTRUSTED, hops: tuple[str, ...] = ()) -> Route:
        context = RouteContext(sender="", client=client, size=0)
        return self.successResultOf(chain.route(Recipient(address, source_route=hops), context))

    def test_smarthost_route(self) -> None:
        """A smarthost entry gives its hosts in failover order, A/AAAA only, with TLS and AUTH settings."""
        route = self.route(build_chain(config(*EXAMPLE_ROUTES)), "a@x.CORP.example.org")
        self.assertEqual(
            route,
            Route(
                kind=ROUTE_SMARTHOST,
                hosts=(NextHop("mail.corp.example.org", 2525), NextHop("backup.example.org", None)),
                rule="routes[0]",
                tls="require",
                username="relay",
                password_file="/etc/relay/secret",
            ),
        )
        self.assertFalse(any(hop.mx for hop in route.hosts))

    def test_reject_route(self) -> None:
        """A reject entry gives a reject route with its reason."""
        route = self.route(build_chain(config(*EXAMPLE_ROUTES)), "a@blocked.example")
        self.assertEqual(route, Route(kind=ROUTE_REJECT, reason="no mail to this domain", rule="routes[1]"))

    def test_via_route(self) -> None:
        """A via entry hands to the first hop (with its port); the other hops go in the RCPT path."""
        route = self.route(build_chain(config(*EXAMPLE_ROUTES)), "a@legacy.example")
        self.assertEqual(route.kind, ROUTE_SOURCE)
        self.assertEqual(route.hosts, (NextHop("gw1.example.net", 2525),))
        self.assertEqual(route.rcpt_route, ("gw2.example.net", "[192.0.2.9]"))
        self.assertEqual(route.rule, "routes[2]")

    def test_catch_all_and_order(self) -> None:
        """Entries are tried in file order; a catch-all takes everything the others did not."""
        route = self.route(build_chain(config(*EXAMPLE_ROUTES)), "a@anywhere.test")
        self.assertEqual(route.hosts, (NextHop("2001:db8::25", 587),))
        self.assertEqual(route.rule, "routes[3]")

    def test_default_after_routes(self) -> None:
        """Without a matching entry the recipient goes by direct MX."""
        route = self.route(build_chain(config(*EXAMPLE_ROUTES[:3])), "a@anywhere.test")
        self.assertEqual(route.rule, DEFAULT_RULE)

    def test_rule_names_in_chain(self) -> None:
        """The chain lists its rules in order, plugins named as such."""
        routes = (RouteConfig(domains=("a.test",), plugin="fake", index=0), EXAMPLE_ROUTES[1])
        chain = build_chain(config(*routes, source_routes="honor"), plugin_lookup=lambda name: FakeFactory())
        self.assertEqual(chain.rules, ("source route (trusted client)", "routes[0] (plugin fake)", "routes[1]"))

    def test_inbound_source_route_ignored_by_default(self) -> None:
        """With source_routes = "ignore", even a trusted client's route is ignored."""
        route = self.route(build_chain(config()), "a@final.test", TRUSTED, ("hop1.test", "hop2.test"))
        self.assertEqual(route.rule, DEFAULT_RULE)
        self.assertEqual(route.hosts, (NextHop("final.test", mx=True),))

    def test_inbound_source_route_honoured_for_trusted_client(self) -> None:
        """With "honor", a trusted client's route goes to its first hop, the rest in the RCPT path."""
        chain = build_chain(config(*EXAMPLE_ROUTES, source_routes="honor"))
        route = self.route(chain, "a@final.test", TRUSTED, ("hop1.test", "hop2.test", "hop3.test"))
        self.assertEqual(route.kind, ROUTE_SOURCE)
        self.assertEqual(route.hosts, (NextHop("hop1.test"),))
        self.assertEqual(route.rcpt_route, ("hop2.test", "hop3.test"))

    def test_inbound_source_route_honoured_for_authenticated_client(self) -> None:
        """With "honor", an authenticated client may choose the route too."""
        route = self.route(build_chain(config(source_routes="honor")), "a@final.test", AUTHENTICATED, ("hop1.test",))
        self.assertEqual((route.kind, route.hosts, route.rcpt_route), (ROUTE_SOURCE, (NextHop("hop1.test"),), ()))

    def test_inbound_source_route_of_untrusted_client_is_ignored(self) -> None:
        """With "honor", an untrusted client's route is ignored: the final mailbox is routed as usual."""
        chain = build_chain(config(*EXAMPLE_ROUTES, source_routes="honor"))
        route = self.route(chain, "a@blocked.example", UNTRUSTED, ("evil.test",))
        self.assertEqual(route.kind, ROUTE_REJECT)
        route = self.route(build_chain(config(source_routes="honor")), "a@final.test", UNTRUSTED, ("evil.test",))
        self.assertEqual(route.hosts, (NextHop("final.test", mx=True),))

    def test_plugin_gets_options_domains_and_config(self) -> None:
        """A plugin entry's factory gets the entry's own options, its DomainSet and the whole config."""
        factory = FakeFactory(SMART)
        cfg = config(
            RouteConfig(domains=("p.test",), plugin="fake", options={"map": "/etc/map"}, index=0)
        )
        chain = build_chain(cfg, plugin_lookup=lambda name: factory)
        (options, domains, passed), = factory.calls
        self.assertEqual(options, {"map": "/etc/map"})
        self.assertTrue(domains.matches("P.test") and not domains.matches("q.test"))
        self.assertIs(passed, cfg)
        self.assertEqual(self.route(chain, "a@p.test").rule, "routes[0] (plugin fake)")

    def test_unknown_plugin_is_one_config_line(self) -> None:
        """An unknown plugin name stops start-up with one line naming routes[i].plugin and the plugins found."""
        def lookup(name: str) -> Any:
            raise UnknownPluginError(name, ["transport-map"])

        routes = (EXAMPLE_ROUTES[0], EXAMPLE_ROUTES[1], RouteConfig(domains=("x.test",), plugin="foo", index=2))
        with self.assertRaises(ConfigError) as caught:
            build_chain(config(*routes), plugin_lookup=lookup)
        self.assertEqual(
            str(caught.exception),
            'relay.toml: routes[2].plugin: no router plugin named "foo" (found: transport-map)',
        )

    def test_bad_plugin_option_names_the_option(self) -> None:
        """A ValueError from makeRouter becomes a ConfigError naming routes[i].<option>."""
        cases = [
            (OptionError("map", "cannot read /nope"), "relay.toml: routes[0].map: cannot read /nope"),
            (ValueError("limit: not a number"), "relay.toml: routes[0].limit: not a number"),
            (ValueError("something is off"), "relay.toml: routes[0]: something is off"),
        ]
        for error, expected in cases:
            factory = FakeFactory(error=error)
            cfg = config(RouteConfig(domains=("p.test",), plugin="fake", options={"map": "/nope"}, index=0))
            with self.assertRaises(ConfigError) as caught:
                build_chain(cfg, plugin_lookup=lambda name: factory)
            self.assertEqual(str(caught.exception), expected)

    def test_plugin_router_not_providing_irouter(self) -> None:
        """A plugin whose router does not provide IRouter stops start-up naming routes[i].plugin."""
        cfg = config(RouteConfig(domains=("p.test",), plugin="bad", index=4))
        with self.assertRaises(ConfigError) as caught:
            build_chain(cfg, plugin_lookup=lambda name: BadRouterFactory())
        self.assertTrue(str(caught.exception).startswith("relay.toml: routes[4].plugin: "))
        self.assertIn("IRouter", str(caught.exception))

    def test_bad_builtin_entries(self) -> None:
        """Bad built-in entries (no action, bad host, port on a later via hop) name the key."""
        cases = [
            (RouteConfig(domains=("a.test",)), "relay.toml: routes[0]: exactly one of smarthost, via, plugin, reject is required"),
            (RouteConfig(domains=("a.test",), smarthost=("bad host",)), "relay.toml: routes[0].smarthost: "),
            (RouteConfig(domains=("a.test",), via=("gw1", "gw2:25")), "relay.toml: routes[0].via: "),
            (RouteConfig(domains=("a.test",), smarthost=("a",), tls="never"), "relay.toml: routes[0].tls: "),
            (RouteConfig(domains=(), reject="x"), "relay.toml: routes[0].domains: "),
        ]
        for entry, prefix in cases:
            with self.assertRaises(ConfigError) as caught:
                build_chain(config(entry))
            self.assertTrue(str(caught.exception).startswith(prefix), str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))


class ParseNextHopTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """host[:port], bracketed and bare IP addresses become NextHops resolved by A/AAAA."""
        self.assertEqual(parse_next_hop("mail.test"), NextHop("mail.test"))
        self.assertEqual(parse_next_hop("mail.test:2525"), NextHop("mail.test", 2525))
        self.assertEqual(parse_next_hop("[192.0.2.1]:25"), NextHop("192.0.2.1", 25))
        self.assertEqual(parse_next_hop("[IPv6:2001:db8::1]"), NextHop("2001:db8::1"))
        self.assertEqual(parse_next_hop("2001:db8::1"), NextHop("2001:db8::1"))

    def test_bad(self) -> None:
        """Empty hosts, spaces and bad ports are refused with ValueError."""
        for text in ("", "a b", "host:0", "host:x", "[192.0.2.1", "user@host", "1:2:zz"):
            with self.assertRaises(ValueError):
                parse_next_hop(text)


# -- RCPT time ----------------------------------------------------------------------


class RcptCheckTests(SynchronousTestCase):
    def test_reject_route_refuses_at_rcpt(self) -> None:
        """A recipient whose route is a reject gets 550 5.7.1 with the configured reason."""
        check = rcpt_check(build_chain(config(*EXAMPLE_ROUTES)))
        reply = self.successResultOf(check(UNTRUSTED, "s@a.test", Recipient("a@blocked.example")))
        self.assertEqual((reply.code, reply.status, reply.text), (550, "5.7.1", "no mail to this domain"))

    def test_other_routes_pass(self) -> None:
        """A recipient with any other route (given as a string or Recipient) gets no reply."""
        check = rcpt_check(build_chain(config(*EXAMPLE_ROUTES)))
        self.assertIsNone(self.successResultOf(check(TRUSTED, "s@a.test", "a@legacy.example")))
        self.assertIsNone(self.successResultOf(check(TRUSTED, "", Recipient("a@anywhere.test"))))

    def test_router_failure_passes(self) -> None:
        """A router failure at RCPT time accepts the recipient (routed again at delivery)."""
        check = rcpt_check(RouterChain([("broken", None, RaisingRouter())]))
        self.assertIsNone(self.successResultOf(check(TRUSTED, "", "a@x.test")))
        self.flushLoggedErrors(RuntimeError)


# -- the property that keeps the relay closed ---------------------------------------

hop_names = st.from_regex(r"[a-z]{1,10}\.test", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(
    hops=st.lists(hop_names, min_size=1, max_size=4),
    address=st.sampled_from(["126.0.0.1", "198.51.100.1", "2001:db8::1"]),
    helo=st.text(max_size=5),
)
def test_untrusted_client_never_chooses_the_route(hops: list[str], address: str, helo: str) -> None:
    """Whatever route an untrusted, unauthenticated client writes, the relay routes by the final mailbox."""
    chain = build_chain(config(source_routes="honor"))
    context = RouteContext(sender="", client=ClientInfo(address=address, helo=helo), size=0)
    d = chain.route(Recipient("user@final.test", source_route=tuple(hops)), context)
    results: list[Route] = []
    d.addCallback(results.append)
    assert results == [Route(kind=ROUTE_MX, hosts=(NextHop("final.test", mx=True),), rule=DEFAULT_RULE)]
