"""transport-map: a router plugin mapping recipients to routes from a file.

A Postfix-transport-like table, read once when the router is made.  Each
line maps a recipient address, a domain, or ``.parent`` (every subdomain of
``parent``) to an action::

    # key                      action
    alice@example.org          smarthost mail1.example.net:2525 mail2.example.net
    example.org                smarthost [192.0.2.10]
    .example.org               via gw1.example.net:2525 gw2.example.net
    blocked.example            reject no mail to this domain
    partner.example            mx

Actions:

- ``smarthost HOST[:PORT] ...``: hand to these hosts in failover order
  (A/AAAA, never MX).
- ``via H1[:PORT] H2 ... HN``: a source route (RCPT TO:<@H2,...,@HN:user@dom>).
- ``reject [TEXT]``: refuse with ``550 5.7.1 TEXT``.
- ``mx``: deliver by direct MX, overriding rules further down the chain
  (an exception from a catch-all smart host, for instance).

Lookup, first hit wins: the whole address, then the domain, then
``.parent`` entries from the nearest parent outwards.  Keys are
case-insensitive and IDNA-aware.  A recipient not in the map gets no
opinion (None), so the chain asks the next rule.

Options of the ``[[routes]]`` entry: ``map`` (the file, required), and
``tls``, ``username``, ``password_file`` applied to smarthost and via
answers.  Enable it with::

    [[routes]]
    domains = ["*"]
    plugin = "transport-map"
    map = "/etc/relay/transport"
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.domains import normalize_domain
from relay.envelope import (
    ROUTE_MX,
    ROUTE_REJECT,
    ROUTE_SMARTHOST,
    ROUTE_SOURCE,
    TLS_MAY,
    TLS_POLICIES,
    NextHop,
    Recipient,
    Route,
)
from relay.interfaces import IRouter, IRouterFactory
from relay.routing.plugins import OptionError
from relay.routing.static import parse_next_hop, rcpt_hop

PLUGIN_NAME = "transport-map"
OPTIONS = ("map", "tls", "username", "password_file")
DEFAULT_REJECT_TEXT = "Delivery to this address is not permitted"


class MapError(ValueError):
    """A line of the map file cannot be understood."""


def parse_map(text: str, source: str = "map") -> dict[str, Route]:
    """Keys (lower-case, A-label domains) -> Routes without transport settings.

    Raises MapError naming ``source`` and the line number.
    """
    table: dict[str, Route] = {}
    for number, line in _lines(text):
        key, _, rest = line.partition(" ")
        words = rest.split()
        if not words:
            raise MapError(f"{source} line {number}: no action for {key!r}")
        try:
            route = _action(words[0].lower(), words[1:], rest.strip()[len(words[0]) :].strip())
        except ValueError as e:
            raise MapError(f"{source} line {number}: {e}") from None
        table.setdefault(normalize_key(key), _with_rule(route, f"map line {number}"))
    return table


def _lines(text: str) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        line = " ".join(raw.split("#", 1)[0].split())
        if line:
            yield number, line


def _action(action: str, args: list[str], tail: str) -> Route:
    if action == "smarthost":
        if not args:
            raise ValueError("smarthost needs at least one host")
        return Route(kind=ROUTE_SMARTHOST, hosts=tuple(parse_next_hop(a) for a in args))
    if action == "via":
        if not args:
            raise ValueError("via needs at least one hop")
        hops = [parse_next_hop(a) for a in args]
        if any(h.port is not None for h in hops[1:]):
            raise ValueError("a port is only possible on the first via hop")
        return Route(kind=ROUTE_SOURCE, hosts=(hops[0],), rcpt_route=tuple(rcpt_hop(h.host) for h in hops[1:]))
    if action == "reject":
        return Route(kind=ROUTE_REJECT, reason=tail or DEFAULT_REJECT_TEXT)
    if action == "mx":
        if args:
            raise ValueError("mx takes no arguments")
        return Route(kind=ROUTE_MX)  # hosts filled in per recipient
    raise ValueError(f"unknown action {action!r} (smarthost, via, reject, mx)")


def _with_rule(route: Route, rule: str) -> Route:
    return Route(
        kind=route.kind, hosts=route.hosts, rcpt_route=route.rcpt_route, reason=route.reason, rule=rule
    )


def normalize_key(key: str) -> str:
    """``Alice@Bücher.Example`` -> ``alice@xn--bcher-kva.example``; ``.Parent`` keeps its dot."""
    local, at, domain = key.rpartition("@")
    if at:
        return f"{local.lower()}@{normalize_domain(domain)}"
    if key.startswith("."):
        return "." + normalize_domain(key[1:])
    return normalize_domain(key)


def lookup_keys(address: str) -> Iterator[str]:
    """The keys tried for ``address``, in order: address, domain, .parents."""
    local, _, domain = address.rpartition("@")
    domain = normalize_domain(domain)
    yield f"{local.lower()}@{domain}"
    yield domain
    labels = domain.split(".")
    for i in range(1, len(labels)):
        yield "." + ".".join(labels[i:])


@implementer(IRouter)
class TransportMapRouter:
    """Answers from the table; None for recipients not in it."""

    def __init__(
        self, table: dict[str, Route], tls: str = TLS_MAY, username: str = "", password_file: str = ""
    ) -> None:
        self.table = table
        self.tls = tls
        self.username = username
        self.password_file = password_file

    def route(self, recipient: Recipient, context: Any) -> Optional[Route]:
        for key in lookup_keys(recipient.address):
            found = self.table.get(key)
            if found is not None:
                return self._complete(found, recipient)
        return None

    def _complete(self, route: Route, recipient: Recipient) -> Route:
        if route.kind == ROUTE_MX:
            return Route(kind=ROUTE_MX, hosts=(NextHop(recipient.domain, mx=True),), rule=route.rule)
        if route.kind == ROUTE_REJECT:
            return route
        return Route(
            kind=route.kind,
            hosts=route.hosts,
            rcpt_route=route.rcpt_route,
            rule=route.rule,
            tls=self.tls,
            username=self.username,
            password_file=self.password_file,
        )


@implementer(IPlugin, IRouterFactory)
class TransportMapFactory:
    """Makes a TransportMapRouter from ``map = "/path"`` (read once, at start-up)."""

    name = PLUGIN_NAME

    def makeRouter(self, options: dict[str, Any], domains: Any, config: Any) -> TransportMapRouter:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise OptionError(unknown[0], f"unknown option (known: {', '.join(OPTIONS)})")
        path = options.get("map")
        if not isinstance(path, str) or not path:
            raise OptionError("map", "the path of the map file is required")
        tls = options.get("tls", TLS_MAY)
        if tls not in TLS_POLICIES:
            raise OptionError("tls", f"{tls!r} is not one of {', '.join(TLS_POLICIES)}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError("map", f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            table = parse_map(text, path)
        except MapError as e:
            raise OptionError("map", str(e)) from None
        return TransportMapRouter(
            table,
            tls=tls,
            username=str(options.get("username", "")),
            password_file=str(options.get("password_file", "")),
        )
