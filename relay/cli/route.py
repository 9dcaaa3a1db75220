"""``relay-route``: show the route each address would take, without sending anything.

This module owns the command: it loads the configuration, builds the same
router chain as the daemon, asks it about each address and resolves the
chosen hosts (MX, A/AAAA) in the order delivery would try them::

    relay-route [--config FILE] [--json] [--nameserver IP[:PORT]] ADDRESS...

The addresses are routed as if a trusted client had submitted them, so a
source-routed address (``<@h1,@h2:user@domain>``) shows what
``source_routes = "honor"`` would do.  Exit status: 0 when every address got
a route (a reject route included), 1 when a router or DNS failed for some
address, 2 for a bad configuration, option or address (one line on stderr).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, NoReturn, Optional, Sequence, TextIO

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.python.failure import Failure

from relay.config import Config
from relay.config_values import ConfigError, parse_hostport
from relay.envelope import ROUTE_REJECT, ClientInfo, Recipient, Route
from relay.routing import RouteContext, RouterChain, build_chain

PROG = "relay-route"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DNS_PORT = 53
ROUTER_FAILURE_STATUS = "4.3.0"
RESOLVER_FAILURE_STATUS = "4.4.3"

# The client an address is routed for: trusted, as the operator asking is.
CLI_CLIENT = ClientInfo(address="127.0.0.1", trusted=True, protocol="ESMTP")


class UsageError(Exception):
    """A bad option or address; ``str(error)`` is the one line to print."""


# -- arguments ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Show the route each address would take.")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.add_argument(
        "--nameserver",
        metavar="IP[:PORT]",
        action="append",
        default=[],
        help="DNS server to ask (repeatable); overrides [delivery] nameservers",
    )
    parser.add_argument("addresses", metavar="ADDRESS", nargs="+", help="user@domain or <@hop,...:user@domain>")
    return parser


def parse_nameserver(text: str) -> tuple[str, int]:
    """``192.0.2.53``, ``192.0.2.53:5353`` or ``[2001:db8::53]:53`` -> (ip, port)."""
    try:
        host, port = parse_hostport(text, DNS_PORT)
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--nameserver {text!r} is not an IP address with an optional port") from None
    return str(address), port or DNS_PORT


def parse_address(text: str) -> Recipient:
    """``user@domain``, ``<user@domain>`` or ``<@h1,@h2:user@domain>`` -> Recipient.

    Checked with the same RFC 5321 rules as an inbound RCPT TO (SMTPUTF8 allowed).
    """
    from relay.smtp.address import parse_path

    raw = text.strip()
    try:
        path = parse_path(raw if raw.startswith("<") else f"<{raw}>", True)
    except ValueError as e:
        raise UsageError(f"{text!r} is not an address: {e}") from None
    if path.is_null:
        raise UsageError(f"{text!r} is not an address: the null path has no route")
    return Recipient(address=path.mailbox, source_route=path.source_route)


# -- one address ------------------------------------------------------------------


@dataclass(frozen=True)
class RouteReport:
    """What ``relay-route`` says about one address."""

    address: str
    rule: str = ""
    kind: str = ""
    rcpt_route: tuple[str, ...] = ()
    reason: str = ""
    hosts: tuple[Any, ...] = ()  # relay.routing.mx.Target, in the order tried
    error: Optional[dict[str, Any]] = None  # {"permanent", "status", "text"}

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "rule": self.rule,
            "kind": self.kind,
            "rcpt_route": list(self.rcpt_route),
            "reason": self.reason,
            "hosts": [
                {"host": t.host, "address": t.address, "port": t.port, "preference": t.preference}
                for t in self.hosts
            ],
            "error": self.error,
        }


def explain(
    chain: RouterChain, resolver: Any, recipient: Recipient, context: RouteContext, default_port: int
) -> Deferred[RouteReport]:
    """Route ``recipient`` and resolve its hosts; never errbacks."""
    d = chain.route(recipient, context)
    d.addCallbacks(
        _resolve,
        _router_failed,
        callbackArgs=(resolver, recipient, default_port),
        errbackArgs=(recipient,),
    )
    return d


def _resolve(route: Route, resolver: Any, recipient: Recipient, default_port: int) -> Any:
    report = RouteReport(
        address=recipient.address,
        rule=route.rule,
        kind=route.kind,
        rcpt_route=route.rcpt_route,
        reason=route.reason,
    )
    if route.kind == ROUTE_REJECT:
        return report
    d = defer.maybeDeferred(resolver.targets, route, default_port)
    d.addCallbacks(
        lambda targets: _replace(report, hosts=tuple(targets)),
        lambda failure: _replace(report, error=_resolution_error(failure)),
    )
    return d


def _replace(report: RouteReport, **changes: Any) -> RouteReport:
    return replace(report, **changes)


def _resolution_error(failure: Failure) -> dict[str, Any]:
    error = failure.value
    if hasattr(error, "permanent") and hasattr(error, "status"):
        return {"permanent": bool(error.permanent), "status": str(error.status), "text": str(getattr(error, "text", error))}
    return {"permanent": False, "status": RESOLVER_FAILURE_STATUS, "text": f"resolver failed: {_one_line(error)}"}


def _router_failed(failure: Failure, recipient: Recipient) -> RouteReport:
    text = f"router failed: {_one_line(failure.value)}"
    return RouteReport(
        address=recipient.address,
        error={"permanent": False, "status": ROUTER_FAILURE_STATUS, "text": text},
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- output ---------------------------------------------------------------------------


def format_json(reports: Iterable[RouteReport]) -> str:
    return json.dumps([r.to_json() for r in reports], indent=2, ensure_ascii=False) + "\n"


def format_human(reports: Iterable[RouteReport]) -> str:
    return "\n".join(_human_block(r) for r in reports)


def _human_block(report: RouteReport) -> str:
    lines = [report.address]
    if report.rule:
        lines.append(f"  rule:   {report.rule}")
    if report.kind:
        lines.append(f"  kind:   {report.kind}")
    if report.rcpt_route:
        path = ",".join(f"@{hop}" for hop in report.rcpt_route)
        lines.append(f"  rcpt:   <{path}:{report.address}>")
    if report.kind == ROUTE_REJECT:
        lines.append(f"  reject: 550 5.7.1 {report.reason}")
    for position, target in enumerate(report.hosts, start=1):
        lines.append(f"  {'hosts:' if position == 1 else '':7} {position}. {_target_text(target)}")
    if report.error is not None:
        severity = "permanent" if report.error["permanent"] else "transient"
        lines.append(f"  error:  {severity} {report.error['status']} {report.error['text']}")
    return "\n".join(lines) + "\n"


def _target_text(target: Any) -> str:
    address = f"[{target.address}]" if ":" in target.address else target.address
    preference = f" (preference {target.preference})" if target.preference else ""
    return f"{target.host}{preference} {address} port {target.port}"


# -- the command --------------------------------------------------------------------


def make_resolver(nameservers: tuple[tuple[str, int], ...], reactor: Any) -> Any:
    """The real MX resolver, on the reactor (lookups in its own threads)."""
    from relay.routing.mx import MXResolver

    return MXResolver(nameservers, clock=reactor)


def load_config(path: Optional[str]) -> Config:
    """The configuration in ``path``, or the built-in defaults when None."""
    if path is None:
        return Config()
    from relay.config import load_config as load

    return load(path)


def run(
    reactor: Any,
    argv: Sequence[str],
    *,
    resolver_factory: Callable[[tuple[tuple[str, int], ...], Any], Any] = make_resolver,
    plugin_lookup: Optional[Callable[[str], Any]] = None,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> Deferred[int]:
    """Run ``relay-route argv``; fire with the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        options = _parser().parse_args(list(argv))
        recipients = [parse_address(a) for a in options.addresses]
        nameservers = tuple(parse_nameserver(n) for n in options.nameserver)
        config = load_config(options.config)
        chain = build_chain(config, plugin_lookup) if plugin_lookup else build_chain(config)
    except (UsageError, ConfigError) as e:
        err.write(f"{PROG}: {' '.join(str(e).split())}\n")
        return defer.succeed(EXIT_USAGE)
    resolver = resolver_factory(nameservers or config.delivery.nameservers, reactor)
    context = RouteContext(sender="", client=CLI_CLIENT, size=0, hostname=config.hostname)
    port = config.delivery.port
    d = defer.gatherResults([explain(chain, resolver, r, context, port) for r in recipients])
    d.addCallback(_print, options.json, out)
    d.addBoth(_stop_resolver, resolver)
    return d


def _print(reports: list[RouteReport], as_json: bool, out: TextIO) -> int:
    out.write(format_json(reports) if as_json else format_human(reports))
    out.flush()
    return EXIT_FAILED if any(r.error is not None for r in reports) else EXIT_OK


def _stop_resolver(result: Any, resolver: Any) -> Any:
    stop = getattr(resolver, "stop", None)
    if callable(stop):
        stop()
    return result


def _react_main(reactor: Any, argv: Sequence[str]) -> Deferred[None]:
    d = run(reactor, argv)
    d.addCallback(_exit)
    return d


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Console entry point ``relay-route``."""
    react(_react_main, (sys.argv[1:] if argv is None else list(argv),))
    raise SystemExit(EXIT_OK)  # react exits itself; not reached


if __name__ == "__main__":
    main()
