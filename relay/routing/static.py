"""The built-in routers: smart host, source route (via), reject, inbound source routes.

This module owns the routers that ``[[routes]]`` entries without a plugin
select, and the factories that make them from an entry's keys.  Each router
answers synchronously with one prebuilt frozen ``Route``; the chain stamps
the rule name on it.  Routers decide and never connect: smart hosts and via
hops are resolved later, by A/AAAA only (never MX), by delivery.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from zope.interface import implementer

from relay.config_values import parse_hostport
from relay.domains import ip_literal
from relay.envelope import (
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

__all__ = [
    "RejectRouter",
    "RejectRouterFactory",
    "SmartHostRouter",
    "SmartHostRouterFactory",
    "SourceRouteHonorRouter",
    "ViaRouter",
    "ViaRouterFactory",
    "parse_next_hop",
    "rcpt_hop",
]


def parse_next_hop(text: str) -> NextHop:
    """``host[:port]`` -> NextHop(host, port or None, mx=False).

    ``[192.0.2.1]:2525``, ``[IPv6:2001:db8::1]``, ``[2001:db8::1]:25`` and bare
    IP addresses are understood; an IP address is kept bare (no brackets).
    Raises ValueError naming the problem.
    """
    host, port = parse_hostport(str(text))
    try:
        address = ip_literal(host)
    except ValueError:
        raise ValueError(f"{text!r} is not a host name or address") from None
    if address is not None:
        return NextHop(host[5:] if host[:5].lower() == "ipv6:" else host, port, mx=False)
    if not host or ":" in host or any(c.isspace() or c in "@,;<>[]" for c in host):
        raise ValueError(f"{text!r} is not a host name or address")
    return NextHop(host.rstrip("."), port, mx=False)


def _is_ip(host: str) -> bool:
    try:
        return ip_literal(host) is not None
    except ValueError:
        return False


def _host_list(option: str, value: Union[str, Iterable[str]]) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items:
        raise OptionError(option, "at least one host is required")
    return tuple(str(item) for item in items)


def _tls(options: dict[str, Any]) -> str:
    tls = options.get("tls") or TLS_MAY
    if tls not in TLS_POLICIES:
        raise OptionError("tls", f"{tls!r} is not one of {', '.join(TLS_POLICIES)}")
    return str(tls)


def _auth_in_clear(options: dict[str, Any]) -> bool:
    value = options.get("auth_in_clear", False)
    if not isinstance(value, bool):
        raise OptionError("auth_in_clear", f"{value!r} is not true or false")
    return value


def _check_keys(options: dict[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise OptionError(unknown[0], "unknown option")


@implementer(IRouter)
class SmartHostRouter:
    """Every recipient it is asked about goes to the smart hosts, in failover order."""

    def __init__(
        self,
        hosts: Iterable[NextHop],
        tls: str = TLS_MAY,
        username: str = "",
        password_file: str = "",
        auth_in_clear: bool = False,
    ) -> None:
        self.answer = Route(
            kind=ROUTE_SMARTHOST,
            hosts=tuple(hosts),
            tls=tls,
            username=username,
            password_file=password_file,
            auth_in_clear=auth_in_clear,
        )
        if not self.answer.hosts:
            raise ValueError("a smart host route needs at least one host")

    def route(self, recipient: Recipient, context: Any) -> Route:
        return self.answer


@implementer(IRouter)
class ViaRouter:
    """A configured source route: hand to the first hop, the rest go in the RCPT path."""

    def __init__(
        self,
        first: NextHop,
        rcpt_route: Iterable[str] = (),
        tls: str = TLS_MAY,
        username: str = "",
        password_file: str = "",
        auth_in_clear: bool = False,
    ) -> None:
        self.answer = Route(
            kind=ROUTE_SOURCE,
            hosts=(first,),
            rcpt_route=tuple(rcpt_route),
            tls=tls,
            username=username,
            password_file=password_file,
            auth_in_clear=auth_in_clear,
        )

    def route(self, recipient: Recipient, context: Any) -> Route:
        return self.answer


@implementer(IRouter)
class RejectRouter:
    """Every recipient it is asked about is refused (550 5.7.1 at RCPT)."""

    def __init__(self, reason: str) -> None:
        self.answer = Route(kind=ROUTE_REJECT, reason=reason)

    def route(self, recipient: Recipient, context: Any) -> Route:
        return self.answer


@implementer(IRouter)
class SourceRouteHonorRouter:
    """Follows an inbound ``<@h1,@h2:user@domain>`` route, for trusted clients only.

    A client in trusted_networks or authenticated may choose the route; from
    anyone else the route is ignored and the final mailbox is routed as usual
    (RFC 5321), so no untrusted client can make the relay forward along a
    route it chose.
    """

    def route(self, recipient: Recipient, context: Any) -> Optional[Route]:
        hops = tuple(h.lstrip("@").strip() for h in recipient.source_route)
        hops = tuple(h for h in hops if h)
        if not hops or not _may_choose_route(context):
            return None
        return Route(kind=ROUTE_SOURCE, hosts=(NextHop(hops[0]),), rcpt_route=hops[1:])


def _may_choose_route(context: Any) -> bool:
    client = getattr(context, "client", None)
    return bool(client is not None and (client.trusted or client.auth_user))


# -- factories: [[routes]] keys -> routers -------------------------------------

_TRANSPORT_KEYS = ("tls", "username", "password_file", "auth_in_clear")


@implementer(IRouterFactory)
class SmartHostRouterFactory:
    """``smarthost = "host[:port]"`` or a list of them (failover order)."""

    name = "smarthost"

    def makeRouter(self, options: dict[str, Any], domains: Any, config: Any) -> SmartHostRouter:
        _check_keys(options, ("smarthost",) + _TRANSPORT_KEYS)
        hosts = []
        for text in _host_list("smarthost", options.get("smarthost", ())):
            try:
                hosts.append(parse_next_hop(text))
            except ValueError as e:
                raise OptionError("smarthost", str(e)) from None
        return SmartHostRouter(
            hosts,
            tls=_tls(options),
            username=str(options.get("username", "")),
            password_file=str(options.get("password_file", "")),
            auth_in_clear=_auth_in_clear(options),
        )


@implementer(IRouterFactory)
class ViaRouterFactory:
    """``via = ["h1[:port]", "h2", ..., "hn"]``: a port only on the first hop."""

    name = "via"

    def makeRouter(self, options: dict[str, Any], domains: Any, config: Any) -> ViaRouter:
        _check_keys(options, ("via",) + _TRANSPORT_KEYS)
        texts = _host_list("via", options.get("via", ()))
        hops = []
        for position, text in enumerate(texts):
            try:
                hop = parse_next_hop(text)
            except ValueError as e:
                raise OptionError("via", str(e)) from None
            if position and hop.port is not None:
                raise OptionError("via", f"{text!r}: a port is only possible on the first hop")
            hops.append(hop)
        return ViaRouter(
            hops[0],
            rcpt_route=tuple(rcpt_hop(h.host) for h in hops[1:]),
            tls=_tls(options),
            username=str(options.get("username", "")),
            password_file=str(options.get("password_file", "")),
            auth_in_clear=_auth_in_clear(options),
        )


def rcpt_hop(host: str) -> str:
    """A hop as written in an RCPT path: names as they are, IP addresses as literals."""
    if not _is_ip(host):
        return host
    if ":" in host:
        return f"[IPv6:{host}]"
    return f"[{host}]"


@implementer(IRouterFactory)
class RejectRouterFactory:
    """``reject = "reason"``: the text after ``550 5.7.1``."""

    name = "reject"

    def makeRouter(self, options: dict[str, Any], domains: Any, config: Any) -> RejectRouter:
        _check_keys(options, ("reject",))
        reason = " ".join(str(options.get("reject", "")).split())
        if not reason:
            raise OptionError("reject", "a reason text is required")
        return RejectRouter(reason)
