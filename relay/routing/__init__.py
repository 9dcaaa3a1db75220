"""The router chain: which route each recipient takes next.

This package owns the routing decision (step 4 of the data flow).  A
``RouterChain`` holds an ordered list of rules, each a ``DomainSet`` (or
None for "every domain") and an ``IRouter``.  For one recipient it asks, in
order, only the routers whose domains match the recipient's domain; the
first answer that is not None wins.  When no router has an opinion the
recipient goes by direct MX (or straight to an address literal).

Routers decide and never connect; delivery executes the ``Route``.  The
chain is asked again at every delivery attempt, so a configuration change
applies to mail already queued.

Modules:

- ``relay.routing.static``: the built-in routers (smart host, source route
  via, reject) and the inbound source route honouring router.
- ``relay.routing.plugins``: discovery of router plugins by name.
- ``relay.routing.mx``: MX, A and AAAA resolution of a route's hosts.
- ``relay.routing.dns``: the dnspython queries under it (and TXT records).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from relay.log import Logger
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relay.config import Config, RouteConfig
from relay.config_values import ConfigError
from relay.domains import DomainSet
from relay.envelope import (
    ROUTE_KINDS,
    ROUTE_MX,
    ROUTE_REJECT,
    ClientInfo,
    Envelope,
    NextHop,
    Recipient,
    Route,
)
from relay.interfaces import IRouter, IRouterFactory
from relay.routing.plugins import PluginError, find_router_factory, make_router
from relay.routing.static import (
    RejectRouterFactory,
    SmartHostRouterFactory,
    SourceRouteHonorRouter,
    ViaRouterFactory,
)
from relay.smtp.replies import Reply

__all__ = [
    "DEFAULT_RULE",
    "LITERAL_RULE",
    "RouteContext",
    "RouterChain",
    "build_chain",
    "default_route",
    "rcpt_check",
]

log = Logger()

DEFAULT_RULE = "default (direct MX)"
LITERAL_RULE = "default (address literal)"
HONOR_RULE = "source route (trusted client)"

# The reply given at RCPT time to a recipient whose route is a reject.
REJECT_CODE = 550
REJECT_STATUS = "5.7.1"
REJECT_DEFAULT_TEXT = "Delivery to this address is not permitted"

SOURCE_ROUTES_HONOR = "honor"


@dataclass(frozen=True)
class RouteContext:
    """What a router may know about the message besides the recipient."""

    sender: str  # "" for the null sender <>
    client: ClientInfo  # who handed the message to us (trusted, auth_user...)
    size: int  # octets of the message; 0 when not known yet (at RCPT time)
    queue_id: str = ""  # "" before the message is queued
    hostname: str = ""  # this relay's hostname

    @classmethod
    def from_envelope(cls, envelope: Envelope, hostname: str = "") -> "RouteContext":
        """The context of a queued message."""
        return cls(
            sender=envelope.sender,
            client=envelope.client,
            size=envelope.size,
            queue_id=envelope.queue_id,
            hostname=hostname,
        )


@dataclass(frozen=True)
class _Rule:
    name: str
    domains: Optional[DomainSet]
    router: Any  # provides IRouter

    def applies_to(self, domain: str) -> bool:
        return self.domains is None or self.domains.matches(domain)


def is_address_literal(domain: str) -> bool:
    """True for ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]`` domains."""
    return domain.startswith("[") and domain.endswith("]")


def default_route(domain: str) -> Route:
    """The route when no rule has an opinion: direct MX, or the literal itself."""
    if is_address_literal(domain):
        return Route(kind=ROUTE_MX, hosts=(NextHop(domain, mx=False),), rule=LITERAL_RULE)
    return Route(kind=ROUTE_MX, hosts=(NextHop(domain, mx=True),), rule=DEFAULT_RULE)


class RouterChain:
    """Asks routers in order; the first answer that is not None wins."""

    def __init__(self, rules: Iterable[tuple[str, Optional[DomainSet], Any]]) -> None:
        compiled = []
        for name, domains, router in rules:
            verifyObject(IRouter, router)
            compiled.append(_Rule(name, domains, router))
        self._rules: tuple[_Rule, ...] = tuple(compiled)

    def replace_rules(self, other: "RouterChain") -> None:
        """Ask ``other``'s rules from now on (a reload); a question already being asked keeps its own."""
        self._rules = other._rules

    @property
    def rules(self) -> tuple[str, ...]:
        """The rule names, in the order they are asked."""
        return tuple(rule.name for rule in self._rules)

    def route(self, recipient: Recipient, context: RouteContext) -> Deferred[Route]:
        """Fire with the Route of ``recipient``; errback when a router fails.

        Routers that answer at once (the built-in ones) are asked without a
        Deferred each; from the first that answers with a Deferred on, the
        rest are asked in turn as its answer comes.
        """
        domain = recipient.domain
        candidates = [rule for rule in self._rules if rule.applies_to(domain)]
        for index, rule in enumerate(candidates):
            try:
                answer = rule.router.route(recipient, context)
                if isinstance(answer, Deferred):
                    return self._ask(candidates[index:], recipient, context, answer)
                answer = _checked_answer(answer)
            except Exception:
                _log_router_failure(rule, recipient, context)
                return defer.fail()
            if answer is not None:
                return defer.succeed(_named(answer, rule.name))
        return defer.succeed(default_route(domain))

    @defer.inlineCallbacks
    def _ask(self, candidates: list[_Rule], recipient: Recipient, context: RouteContext,
             first: Deferred) -> Any:
        """Ask ``candidates`` in turn; the first one's answer is ``first``, already asked."""
        for rule in candidates:
            try:
                if first is not None:
                    answer, first = (yield first), None
                else:
                    answer = yield defer.maybeDeferred(rule.router.route, recipient, context)
                answer = _checked_answer(answer)
            except Exception:
                _log_router_failure(rule, recipient, context)
                raise
            if answer is not None:
                return _named(answer, rule.name)
        return default_route(recipient.domain)


def _log_router_failure(rule: _Rule, recipient: Recipient, context: RouteContext) -> None:
    """Log the exception being handled as the failure of ``rule`` for ``recipient``."""
    log.failure(
        "{queue_id}: router {rule} failed for <{recipient}>",
        queue_id=context.queue_id or "-",
        rule=rule.name,
        recipient=recipient.address,
    )


def _checked_answer(answer: object) -> Optional[Route]:
    """A router's answer, or TypeError/ValueError when it is not a Route or None."""
    if answer is None:
        return None
    if not isinstance(answer, Route):
        raise TypeError(f"router answered {type(answer).__name__}, not a Route or None")
    if answer.kind not in ROUTE_KINDS:
        raise ValueError(f"router answered unknown route kind {answer.kind!r}")
    if answer.kind != ROUTE_REJECT and not answer.hosts:
        raise ValueError(f"router answered a {answer.kind} route without hosts")
    return answer


def _named(route: Route, rule_name: str) -> Route:
    """Stamp the chain's rule name on a router's answer, keeping any detail it gave."""
    if route.rule == rule_name:
        return route
    if route.rule:
        return replace(route, rule=f"{rule_name}: {route.rule}")
    return replace(route, rule=rule_name)


# -- building the chain from configuration ------------------------------------


def rule_name(entry: RouteConfig) -> str:
    """``routes[2]``, or ``routes[2] (plugin transport-map)`` for a plugin."""
    if entry.plugin:
        return f"routes[{entry.index}] (plugin {entry.plugin})"
    return f"routes[{entry.index}]"


def build_chain(
    config: Config,
    plugin_lookup: Callable[[str], Any] = find_router_factory,
) -> RouterChain:
    """The chain for ``config``: [[routes]] in order, then the default.

    Raises ``ConfigError`` with one line naming the file and the key when a
    route entry cannot be turned into a router (unknown plugin, bad option).
    """
    rules: list[tuple[str, Optional[DomainSet], Any]] = []
    if config.server.source_routes == SOURCE_ROUTES_HONOR:
        rules.append((HONOR_RULE, None, SourceRouteHonorRouter()))
    for entry in config.routes:
        rules.append(_build_rule(config, entry, plugin_lookup))
    return RouterChain(rules)


_BUILTIN_FACTORIES = {
    "smarthost": SmartHostRouterFactory(),
    "via": ViaRouterFactory(),
    "reject": RejectRouterFactory(),
}


def _build_rule(
    config: Config, entry: RouteConfig, plugin_lookup: Callable[[str], Any]
) -> tuple[str, DomainSet, Any]:
    where = f"{config.source or 'configuration'}: routes[{entry.index}]"
    try:
        domains = DomainSet(entry.domains)
    except ValueError as e:
        raise ConfigError(f"{where}.domains: {e}") from None
    if not domains:
        raise ConfigError(f"{where}.domains: at least one domain pattern is required")
    kinds = [k for k in ("smarthost", "via", "plugin", "reject") if getattr(entry, k)]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: exactly one of smarthost, via, plugin, reject is required")
    kind = kinds[0]
    if kind == "plugin":
        factory, options = _plugin_factory(where, entry, plugin_lookup), dict(entry.options)
    else:
        factory, options = _BUILTIN_FACTORIES[kind], _builtin_options(entry, kind)
    try:
        router = make_router(factory, options, domains, config)
    except PluginError as e:
        raise ConfigError(f"{where}.plugin: {e}") from None
    except ValueError as e:
        raise ConfigError(_option_error(where, e, kind)) from None
    return rule_name(entry), domains, router


def _plugin_factory(where: str, entry: RouteConfig, plugin_lookup: Callable[[str], Any]) -> Any:
    try:
        factory = plugin_lookup(entry.plugin)
    except PluginError as e:
        raise ConfigError(f"{where}.plugin: {e}") from None
    if not IRouterFactory.providedBy(factory):
        raise ConfigError(f'{where}.plugin: "{entry.plugin}" does not provide IRouterFactory')
    return factory


def _builtin_options(entry: RouteConfig, kind: str) -> dict[str, Any]:
    options: dict[str, Any] = {kind: getattr(entry, kind)}
    if kind != "reject":
        options.update(
            tls=entry.tls,
            username=entry.username,
            password_file=entry.password_file,
            auth_in_clear=entry.auth_in_clear,
        )
    return options


_NAMED_OPTION = re.compile(r"([A-Za-z_][\w-]*):\s*")


def _option_error(where: str, error: ValueError, kind: str) -> str:
    """One line naming ``routes[i].<option>`` when the error says which option."""
    option = getattr(error, "option", "")
    text = " ".join(str(error).split())
    if not option:
        named = _NAMED_OPTION.match(text)
        if named:
            option, text = named.group(1), text[named.end() :]
    if not option and kind != "plugin":
        option = kind
    return f"{where}.{option}: {text}" if option else f"{where}: {text}"


# -- RCPT time -----------------------------------------------------------------


def rcpt_check(
    chain: RouterChain, hostname: str = ""
) -> Callable[[ClientInfo, str, Union[Recipient, str]], "Deferred[Optional[Reply]]"]:
    """The RCPT-time hook: ``Reply(550, "5.7.1", reason)`` for a reject route, else None.

    Routing is evaluated again at every delivery attempt; this hook only
    refuses early what would be rejected anyway.  A router failure here is
    logged and lets the recipient through (it is retried at delivery).
    """

    def check(client: ClientInfo, sender: str, recipient: Union[Recipient, str]) -> "Deferred[Optional[Reply]]":
        if isinstance(recipient, str):
            recipient = Recipient(address=recipient)
        context = RouteContext(sender=sender, client=client, size=0, hostname=hostname)
        d = chain.route(recipient, context)
        d.addCallbacks(_reply_for, _no_reply_on_failure, errbackArgs=(recipient,))
        return d

    return check


def _reply_for(route: Route) -> Optional[Reply]:
    if route.kind != ROUTE_REJECT:
        return None
    reason = " ".join(route.reason.split())  # one reply line, whatever a plugin wrote
    return Reply(REJECT_CODE, REJECT_STATUS, reason or REJECT_DEFAULT_TEXT)


def _no_reply_on_failure(failure: Failure, recipient: Recipient) -> None:
    log.info(
        "routing <{recipient}> at RCPT failed ({error}); accepted, routed again at delivery",
        recipient=recipient.address,
        error=failure.getErrorMessage(),
    )
    return None
