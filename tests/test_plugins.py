"""Tests for relay.routing.plugins (discovery by name) and the example transport-map plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import twisted.plugins
from twisted.internet import defer
from zope.interface.verify import verifyObject

from relay.config import Config, RouteConfig
from relay.config_values import ConfigError
from relay.envelope import ROUTE_MX, ROUTE_REJECT, ROUTE_SMARTHOST, ROUTE_SOURCE, ClientInfo, NextHop, Recipient, Route
from relay.interfaces import IRouter, IRouterFactory
from relay.routing import RouteContext, build_chain, rcpt_check
from relay.routing.plugins import (
    OptionError,
    PluginError,
    UnknownPluginError,
    find_router_factory,
    make_router,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CONTEXT = RouteContext(sender="s@a.test", client=ClientInfo(address="192.0.2.99"), size=10, queue_id="Q1")


def routed(router: Any, address: str) -> Any:
    """The answer of a router, synchronous or not, for one address."""
    results: list[Any] = []
    defer.maybeDeferred(router.route, Recipient(address), CONTEXT).addBoth(results.append)
    assert len(results) == 1
    return results[0]


# -- discovery in a private plugin package -------------------------------------------

PLUGIN_MODULE = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from relay.interfaces import IRouter, IRouterFactory

@implementer(IRouter)
class Router:
    def route(self, recipient, context):
        return None

@implementer(IPlugin, IRouterFactory)
class Good:
    name = "good"
    def makeRouter(self, options, domains, config):
        return Router()

@implementer(IPlugin, IRouterFactory)
class Broken:
    name = "broken"   # says it provides IRouterFactory but has no makeRouter

@implementer(IPlugin, IRouterFactory)
class MakesJunk:
    name = "junk"
    def makeRouter(self, options, domains, config):
        return object()

good = Good()
broken = Broken()
junk = MakesJunk()
'''


@pytest.fixture
def plugin_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A plugin package of its own, holding good and broken router factories."""
    name = f"relayplugins_{abs(hash(str(tmp_path)))}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "routers.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(name)
    return sys.modules[name]


def test_find_by_name(plugin_package: Any) -> None:
    """A factory is found by its name attribute and provides IRouterFactory."""
    factory = find_router_factory("good", plugin_package)
    assert factory.name == "good"
    assert verifyObject(IRouterFactory, factory)


def test_unknown_name_lists_found(plugin_package: Any) -> None:
    """An unknown name raises an error listing the names that were found."""
    with pytest.raises(UnknownPluginError) as caught:
        find_router_factory("nope", plugin_package)
    assert str(caught.value) == 'no router plugin named "nope" (found: broken, good, junk)'
    assert isinstance(caught.value, ConfigError)


def test_broken_factory_is_refused(plugin_package: Any) -> None:
    """A factory claiming IRouterFactory without makeRouter fails verifyObject with a clear error."""
    with pytest.raises(PluginError) as caught:
        find_router_factory("broken", plugin_package)
    assert 'plugin "broken" does not provide IRouterFactory' in str(caught.value)
    assert "makeRouter" in str(caught.value)


def test_router_is_verified(plugin_package: Any) -> None:
    """make_router refuses a router that does not provide IRouter."""
    factory = find_router_factory("junk", plugin_package)
    with pytest.raises(PluginError) as caught:
        make_router(factory, {}, None, Config(hostname="h.test"))
    assert "IRouter" in str(caught.value)
    router = make_router(find_router_factory("good", plugin_package), {}, None, Config(hostname="h.test"))
    assert verifyObject(IRouter, router)


def test_build_chain_with_unknown_plugin_in_default_package() -> None:
    """build_chain with a name no installed plugin has stops with one line naming routes[i].plugin."""
    config = Config(
        hostname="h.test",
        routes=(RouteConfig(domains=("*",), plugin="no-such-router", index=0),),
        source="relay.toml",
    )
    with pytest.raises(ConfigError) as caught:
        build_chain(config)
    assert str(caught.value).startswith('relay.toml: routes[0].plugin: no router plugin named "no-such-router" (found: ')


# -- the example plugin: transport-map ----------------------------------------------------

MAP = """\
# key                      action
alice@example.org          smarthost mail1.example.net:2525 [192.0.2.10]
example.org                smarthost [192.0.2.10]      # the whole domain
.example.org               via gw1.example.net:2525 gw2.example.net
Bücher.Example             reject no mail to this domain
partner.example            mx
.a.b.example               smarthost near.example.net
.b.example                 smarthost far.example.net
"""


@pytest.fixture
def transport_map(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The example plugin's module, imported from examples/."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import relay_transport_map

    return relay_transport_map


@pytest.fixture
def map_file(tmp_path: Path) -> Path:
    path = tmp_path / "transport"
    path.write_text(MAP, encoding="utf-8")
    return path


def make(transport_map: Any, **options: Any) -> Any:
    return transport_map.TransportMapFactory().makeRouter(options, None, Config(hostname="h.test"))


def test_example_factory_provides_interfaces(transport_map: Any, map_file: Path) -> None:
    """The example factory and its routers pass verifyObject."""
    factory = transport_map.TransportMapFactory()
    assert verifyObject(IRouterFactory, factory)
    assert verifyObject(IRouter, make(transport_map, map=str(map_file)))


def test_example_lookup_order(transport_map: Any, map_file: Path) -> None:
    """The whole address beats the domain, the domain beats .parent, the nearest parent wins."""
    router = make(transport_map, map=str(map_file))
    alice = routed(router, "Alice@Example.ORG")
    assert (alice.kind, alice.hosts) == (ROUTE_SMARTHOST, (NextHop("mail1.example.net", 2525), NextHop("192.0.2.10")))
    assert alice.rule == "map line 2"
    bob = routed(router, "bob@example.org")
    assert (bob.hosts, bob.rule) == ((NextHop("192.0.2.10"),), "map line 3")
    sub = routed(router, "bob@x.y.example.org")
    assert (sub.kind, sub.hosts, sub.rcpt_route) == (ROUTE_SOURCE, (NextHop("gw1.example.net", 2525),), ("gw2.example.net",))
    assert routed(router, "c@x.a.b.example").hosts == (NextHop("near.example.net"),)
    assert routed(router, "c@x.b.example").hosts == (NextHop("far.example.net"),)
    assert routed(router, "c@b.example") is None


def test_example_reject_mx_and_no_opinion(transport_map: Any, map_file: Path) -> None:
    """reject and mx actions give those routes (IDNA-aware keys); unknown recipients get None."""
    router = make(transport_map, map=str(map_file))
    rejected = routed(router, "x@xn--bcher-kva.example")
    assert (rejected.kind, rejected.reason) == (ROUTE_REJECT, "no mail to this domain")
    direct = routed(router, "x@Partner.Example")
    assert (direct.kind, direct.hosts) == (ROUTE_MX, (NextHop("Partner.Example", mx=True),))
    assert routed(router, "x@elsewhere.test") is None


def test_example_transport_options(transport_map: Any, map_file: Path) -> None:
    """tls, username and password_file apply to smarthost answers."""
    router = make(transport_map, map=str(map_file), tls="verify", username="u", password_file="/p")
    route = routed(router, "bob@example.org")
    assert (route.tls, route.username, route.password_file) == ("verify", "u", "/p")


def test_example_bad_options(transport_map: Any, tmp_path: Path) -> None:
    """Bad options raise OptionError naming the option; map errors name file and line."""
    bad_map = tmp_path / "bad"
    bad_map.write_text("ok.example smarthost a.example\nx.example deliver somewhere\n")
    cases = [
        ({}, "map", "required"),
        ({"map": str(tmp_path / "missing")}, "map", "cannot read"),
        ({"map": str(bad_map)}, "map", "line 2: unknown action 'deliver'"),
        ({"map": str(bad_map), "colour": "blue"}, "colour", "unknown option"),
        ({"map": str(bad_map), "tls": "sometimes"}, "tls", "not one of"),
    ]
    for options, option, text in cases:
        with pytest.raises(OptionError) as caught:
            make(transport_map, **options)
        assert caught.value.option == option
        assert text in str(caught.value)


@pytest.fixture
def example_plugins_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/ on sys.path and its twisted/plugins in twisted.plugins.__path__ (computed at import)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    paths = list(twisted.plugins.__path__)
    monkeypatch.setattr(twisted.plugins, "__path__", paths + [str(EXAMPLES / "twisted" / "plugins")])


def test_example_through_build_chain(example_plugins_on_path: None, map_file: Path) -> None:
    """A [[routes]] plugin entry finds transport-map by name and routes through it, then falls through."""
    config = Config(
        hostname="h.test",
        routes=(
            RouteConfig(domains=("*",), plugin="transport-map", options={"map": str(map_file)}, index=0),
            RouteConfig(domains=("*",), smarthost=("fallback.example.net",), index=1),
        ),
        source="relay.toml",
    )
    chain = build_chain(config)
    routes: list[Route] = []
    chain.route(Recipient("bob@example.org"), CONTEXT).addCallback(routes.append)
    chain.route(Recipient("bob@elsewhere.test"), CONTEXT).addCallback(routes.append)
    assert routes[0].rule == "routes[0] (plugin transport-map): map line 3"
    assert routes[0].hosts == (NextHop("192.0.2.10"),)
    assert routes[1].rule == "routes[1]"
    replies: list[Any] = []
    rcpt_check(chain)(CONTEXT.client, "", "x@bücher.example").addCallback(replies.append)
    assert (replies[0].code, replies[0].status, replies[0].text) == (550, "5.7.1", "no mail to this domain")


def test_example_bad_option_through_build_chain(example_plugins_on_path: None, tmp_path: Path) -> None:
    """A missing map file stops build_chain with one line naming routes[i].map."""
    config = Config(
        hostname="h.test",
        routes=(RouteConfig(domains=("*",), plugin="transport-map", options={"map": str(tmp_path / "none")}, index=3),),
        source="relay.toml",
    )
    with pytest.raises(ConfigError) as caught:
        build_chain(config)
    assert str(caught.value).startswith(f"relay.toml: routes[3].map: cannot read {tmp_path / 'none'}")


def test_example_plugin_found_via_pythonpath(tmp_path: Path, map_file: Path) -> None:
    """The documented way: with examples/ on PYTHONPATH, relay-route finds and uses the plugin."""
    config = tmp_path / "relay.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            hostname = "relay.test"
            [[routes]]
            domains = ["*"]
            plugin = "transport-map"
            map = {json.dumps(str(map_file))}
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLES), str(ROOT)]))
    result = subprocess.run(
        [sys.executable, "-m", "relay.cli.route", "--config", str(config), "--json", "--nameserver", "127.0.0.1:9", "bob@example.org", "x@bücher.example"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["rule"] == "routes[0] (plugin transport-map): map line 3"
    assert first["hosts"] == [{"host": "192.0.2.10", "address": "192.0.2.10", "port": 25, "preference": 0}]
    assert (second["kind"], second["reason"], second["hosts"]) == ("reject", "no mail to this domain", [])
