"""Configuration: TOML -> frozen config objects.

This module owns the meaning of every configuration key, its default and
its validation: the config dataclasses, the sections and their keys, the
cross-key checks, ``load_config`` and the command-line overrides.  What one
value may be (a duration, a domain, an endpoint...) is read by
``relay.config_values``.  Every error is a ``ConfigError`` whose message is
one line naming the file, the key and what is wrong.  Nothing else reads
the file.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

from relay.config_values import (
    ConfigError,
    IPNetwork,
    _array,
    _bool_value,
    _ca_file,
    _choice,
    _duration,
    _each,
    _endpoint,
    _endpoints,
    _hostname,
    _hostport,
    _integer,
    _nameservers,
    _networks,
    _one_line,
    _os_error_text,
    _Parser,
    _path,
    _pattern,
    _patterns,
    _port,
    _positive,
    _show,
    _size,
    _source_addresses,
    _string,
    _table,
    _type_name,
    _Where,
    domain_problem,
    parse_duration,
    selector_problem,
)
from relay.domains import normalize_domain


def default_hostname() -> str:
    return socket.getfqdn() or "localhost"


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    submission_listen: tuple[str, ...] = ()
    trusted_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    relay_domains: tuple[str, ...] = ()  # domain patterns, see relay.domains
    max_message_size: int = 35_000_000  # octets
    max_recipients: int = 1000
    tls_certificate: str = ""
    tls_key: str = ""
    auth_users: str = ""
    idle_timeout: float = 300.0  # seconds
    max_sessions: int = 1000
    max_errors: int = 10  # protocol errors in one session before 421 and close
    source_routes: str = "ignore"  # or "honor"
    auth_in_clear: bool = False  # offer AUTH without TLS (loopback and tests only)
    received_auth: bool = False  # "(Authenticated sender: user)" in the Received header
    sender_login_map: str = ""  # file of "address-or-@domain user[,user...]" lines
    workers: int = 1  # worker processes sharing the listeners ("auto": one per CPU core)
    postmaster: str = ""  # where mail to <postmaster> (no domain) goes; "": postmaster@<hostname>
    max_sessions_per_client: int = 50  # concurrent sessions from one untrusted address, per listener
    reserved_sessions: Optional[int] = None  # of max_sessions, kept for trusted clients; None: a tenth
    client_connection_rate_limit: int = 300  # new sessions per client_rate_time_unit from one address; 0: off
    client_rate_time_unit: float = 60.0  # seconds
    min_data_rate: int = 500  # octets per second a DATA stream must keep up (per-chunk deadline)
    load_idle_timeout: float = 10.0  # seconds: idle_timeout while over 80% of max_sessions are open
    auth_failure_limit: int = 10  # failed AUTH attempts from one address within auth_failure_window; 0: off
    auth_failure_window: float = 300.0  # seconds

    def session_reserve(self) -> int:
        """Sessions of max_sessions that only trusted clients may use."""
        if self.reserved_sessions is None:
            return self.max_sessions // 10
        return self.reserved_sessions


@dataclass(frozen=True)
class QueueConfig:
    directory: str = "relay-queue"
    min_retry: float = 300.0
    max_retry: float = 14400.0
    max_lifetime: float = 432000.0
    delay_warning: float = 0.0  # seconds; one "delayed" DSN once a recipient waits this long; 0: off
    active_limit: int = 5000  # messages being delivered at once (waiting for a connection included)


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = 25
    nameservers: tuple[tuple[str, int], ...] = ()  # (ip, port); empty: system resolver
    concurrency: int = 50
    per_destination: int = 10
    tls_ca_file: str = ""  # PEM bundle for tls = "verify" and MTA-STS; empty: the system store
    mta_sts: bool = False  # apply RFC 8461 policies to direct MX delivery
    connection_reuse_count: int = 100  # transactions per outbound connection
    connection_reuse_time: float = 300.0  # seconds after which a connection is not reused
    source_address: tuple[str, ...] = ()  # local addresses to connect from (one IPv4, one IPv6)


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, ...] = ()  # endpoints serving GET /metrics (Prometheus text format)


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error")


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"  # or "json": one JSON object per line
    level: str = "info"  # debug | info | warn | error


@dataclass(frozen=True)
class RouteConfig:
    """One ``[[routes]]`` entry.  Exactly one of smarthost / via / plugin / reject is set."""

    domains: tuple[str, ...]  # domain patterns, see relay.domains
    smarthost: tuple[str, ...] = ()  # "host[:port]" in failover order
    via: tuple[str, ...] = ()  # source route hops; a port only on the first
    plugin: str = ""  # name of a router plugin
    reject: str = ""  # reason text for 550 5.7.1
    username: str = ""
    password_file: str = ""
    tls: str = "may"  # may | require | verify
    auth_in_clear: bool = False  # AUTH to the next hop even without TLS
    options: Mapping[str, Any] = field(default_factory=dict)  # the plugin's own keys
    index: int = 0  # position in the file, for naming the rule ("routes[2]")


@dataclass(frozen=True)
class DkimConfig:
    """One ``[[dkim]]`` entry: sign mail whose From: domain is ``domain`` or a subdomain of it."""

    domain: str  # the d= domain, lower-case A-labels
    selector: str  # the s= selector (one or more labels)
    private_key: str  # path of the PEM private key (RSA or Ed25519)
    index: int = 0  # position in the file, for naming the entry ("dkim[1]")


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=default_hostname)
    server: ServerConfig = field(default_factory=ServerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    routes: tuple[RouteConfig, ...] = ()
    dkim: tuple[DkimConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: Optional[str] = None  # the file this came from, None for defaults


# -- the loader: TOML -> Config ------------------------------------------------

ROUTE_ACTIONS = ("smarthost", "via", "plugin", "reject")
ROUTE_DELIVERY_KEYS = ("username", "password_file", "tls", "auth_in_clear")
SOURCE_ROUTE_MODES = ("ignore", "honor")
ROUTE_TLS_POLICIES = ("may", "require", "verify")
COMMAND_LINE = "command line"


# -- sections ------------------------------------------------------------------

_SERVER_KEYS: dict[str, _Parser] = {
    "listen": _endpoints,
    "submission_listen": _endpoints,
    "trusted_networks": _networks,
    "relay_domains": _patterns,
    "max_message_size": _size,
    "max_recipients": _positive,
    "tls_certificate": _path,
    "tls_key": _path,
    "auth_users": _path,
    "idle_timeout": _duration,
    "max_sessions": _positive,
    "max_errors": _positive,
    "source_routes": lambda v, w: _choice(v, w, SOURCE_ROUTE_MODES),
    "auth_in_clear": _bool_value,
    "received_auth": _bool_value,
    "sender_login_map": _path,
    "workers": lambda v, w: _workers(v, w),
    "postmaster": lambda v, w: _postmaster(v, w),
    "max_sessions_per_client": _positive,
    "reserved_sessions": lambda v, w: _integer(v, w, low=0),
    "client_connection_rate_limit": lambda v, w: _integer(v, w, low=0),
    "client_rate_time_unit": _duration,
    "min_data_rate": _positive,
    "load_idle_timeout": _duration,
    "auth_failure_limit": lambda v, w: _integer(v, w, low=0),
    "auth_failure_window": _duration,
}


def _postmaster(value: Any, where: _Where) -> str:
    """An address (``local@domain``) for mail to ``<postmaster>``; "" for the default."""
    from relay.smtp.address import parse_mailbox

    text = _string(value, where).strip()
    if text:
        try:
            parse_mailbox(text, smtputf8=True)
        except ValueError as e:
            where.fail(f"{_show(value)} is not an address (user@domain): {e}")
    return text

MAX_WORKERS = 256


def _workers(value: Any, where: _Where) -> int:
    """A number of worker processes, or "auto": one per CPU core."""
    if value == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(value, str):
        where.fail(f'{_show(value)} is not a number of workers or "auto"')
    return _integer(value, where, low=1, high=MAX_WORKERS)

def _duration_or_off(value: Any, where: _Where) -> float:
    """A duration where 0 (or "0s") means "off"."""
    try:
        if parse_duration(value) == 0:
            return 0.0
    except ValueError:
        pass
    return _duration(value, where)


_QUEUE_KEYS: dict[str, _Parser] = {
    "directory": lambda v, w: _string(v, w, allow_empty=False),
    "min_retry": _duration,
    "max_retry": _duration,
    "max_lifetime": _duration,
    "delay_warning": _duration_or_off,
    "active_limit": _positive,
}

_DELIVERY_KEYS: dict[str, _Parser] = {
    "port": _port,
    "nameservers": _nameservers,
    "concurrency": _positive,
    "per_destination": _positive,
    "connection_reuse_count": _positive,
    "connection_reuse_time": _duration,
    "source_address": lambda v, w: _source_addresses(v, w),
    "tls_ca_file": _ca_file,
    "mta_sts": _bool_value,
}


def _section(data: Any, where: _Where, parsers: Mapping[str, _Parser]) -> dict[str, Any]:
    """The keyword arguments of a section's dataclass, for the keys present."""
    table = _table(data, where, tuple(parsers))
    return {key: parsers[key](value, where.child(key)) for key, value in table.items()}


def _server(data: Any, where: _Where) -> ServerConfig:
    server = ServerConfig(**_section(data, where, _SERVER_KEYS))
    if bool(server.tls_certificate) != bool(server.tls_key):
        missing, present = (
            ("tls_key", "tls_certificate") if server.tls_certificate else ("tls_certificate", "tls_key")
        )
        where.child(missing).fail(f"must be set together with server.{present}")
    if server.submission_listen and not server.auth_users:
        where.child("submission_listen").fail(
            "clients must authenticate there: set server.auth_users too"
        )
    if server.sender_login_map and not server.auth_users:
        where.child("sender_login_map").fail("applies to authenticated clients: set server.auth_users too")
    if server.reserved_sessions is not None and server.reserved_sessions >= server.max_sessions:
        where.child("reserved_sessions").fail(
            f"{server.reserved_sessions} leaves no session for untrusted clients "
            f"(must be less than server.max_sessions, {server.max_sessions})"
        )
    return server


def _queue(data: Any, where: _Where) -> QueueConfig:
    queue = QueueConfig(**_section(data, where, _QUEUE_KEYS))
    if queue.max_retry < queue.min_retry:
        where.child("max_retry").fail(
            f"{queue.max_retry:g}s is shorter than queue.min_retry ({queue.min_retry:g}s)"
        )
    return queue


def _delivery(data: Any, where: _Where) -> DeliveryConfig:
    return DeliveryConfig(**_section(data, where, _DELIVERY_KEYS))


_METRICS_KEYS: dict[str, _Parser] = {"listen": _endpoints}

_LOG_KEYS: dict[str, _Parser] = {
    "format": lambda v, w: _choice(v, w, LOG_FORMATS),
    "level": lambda v, w: _choice(v, w, LOG_LEVELS),
}


# -- [[routes]] ----------------------------------------------------------------


def _route_action(entry: dict, where: _Where) -> str:
    actions = [a for a in ROUTE_ACTIONS if a in entry]
    if not actions:
        where.fail(f"needs exactly one of {', '.join(ROUTE_ACTIONS)}")
    if len(actions) > 1:
        where.fail(f"has both {actions[0]} and {actions[1]}: give exactly one of {', '.join(ROUTE_ACTIONS)}")
    return actions[0]


def _smarthosts(value: Any, where: _Where) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_hostport(value, where),)
    return _each(value, where, _hostport, non_empty=True)


def _via(value: Any, where: _Where) -> tuple[str, ...]:
    hops = _array(value, where, non_empty=True)
    return tuple(_hostport(hop, where.item(i), port_allowed=(i == 0)) for i, hop in enumerate(hops))


def _route(entry: Any, where: _Where, index: int) -> RouteConfig:
    if not isinstance(entry, dict):
        where.fail(f"expected a table ([[routes]] entry), got {_type_name(entry)}")
    action = _route_action(entry, where)
    if "domains" not in entry:
        where.child("domains").fail("missing: every route needs a non-empty array of domain patterns")
    domains = _each(entry["domains"], where.child("domains"), _pattern, non_empty=True)
    if action == "plugin":
        name = _string(entry["plugin"], where.child("plugin"), allow_empty=False).strip()
        options = {k: copy.deepcopy(v) for k, v in entry.items() if k not in ("domains", "plugin")}
        return RouteConfig(domains=domains, plugin=name, options=options, index=index)
    for key in entry:
        if key in ROUTE_DELIVERY_KEYS and action == "reject":
            where.child(key).fail("only possible with smarthost or via")
        if key not in ("domains", action, *ROUTE_DELIVERY_KEYS):
            known = ", ".join(("domains", *ROUTE_ACTIONS, *ROUTE_DELIVERY_KEYS))
            where.child(key).fail(f"unknown key (known keys here: {known})")
    fields: dict[str, Any] = {"domains": domains, "index": index}
    if action == "reject":
        fields["reject"] = _string(entry["reject"], where.child("reject"), allow_empty=False).strip()
        return RouteConfig(**fields)
    fields[action] = (_smarthosts if action == "smarthost" else _via)(entry[action], where.child(action))
    for key in ("username", "password_file"):
        if key in entry:
            fields[key] = _string(entry[key], where.child(key), allow_empty=False)
    if ("username" in fields) != ("password_file" in fields):
        present, missing = ("username", "password_file") if "username" in fields else ("password_file", "username")
        where.child(missing).fail(f"must be set together with {where.key}.{present}")
    if "tls" in entry:
        fields["tls"] = _choice(entry["tls"], where.child("tls"), ROUTE_TLS_POLICIES)
    if "auth_in_clear" in entry:
        fields["auth_in_clear"] = _bool_value(entry["auth_in_clear"], where.child("auth_in_clear"))
    return RouteConfig(**fields)


def _routes(value: Any, where: _Where) -> tuple[RouteConfig, ...]:
    if isinstance(value, dict):
        where.fail("expected an array of tables: write [[routes]], not [routes]")
    entries = _array(value, where)
    return tuple(_route(entry, where.item(i), i) for i, entry in enumerate(entries))


# -- [[dkim]] ------------------------------------------------------------------

_DKIM_KEYS = ("domain", "selector", "private_key")


def _dkim_entry(entry: Any, where: _Where, index: int) -> DkimConfig:
    if not isinstance(entry, dict):
        where.fail(f"expected a table ([[dkim]] entry), got {_type_name(entry)}")
    _table(entry, where, _DKIM_KEYS)
    for key in _DKIM_KEYS:
        if key not in entry:
            where.child(key).fail("missing: every [[dkim]] entry needs domain, selector and private_key")
    domain = _string(entry["domain"], where.child("domain"), allow_empty=False).strip().rstrip(".")
    problem = domain_problem(domain)
    if problem:
        where.child("domain").fail(f"{_show(domain)} {problem}")
    selector = _string(entry["selector"], where.child("selector"), allow_empty=False).strip().lower()
    problem = selector_problem(selector)
    if problem:
        where.child("selector").fail(f"{_show(selector)} {problem}")
    path = _string(entry["private_key"], where.child("private_key"), allow_empty=False)
    return DkimConfig(domain=normalize_domain(domain), selector=selector, private_key=path, index=index)


def _dkim(value: Any, where: _Where) -> tuple[DkimConfig, ...]:
    if isinstance(value, dict):
        where.fail("expected an array of tables: write [[dkim]], not [dkim]")
    entries = _array(value, where)
    parsed = tuple(_dkim_entry(entry, where.item(i), i) for i, entry in enumerate(entries))
    seen: dict[tuple[str, str], int] = {}
    for entry in parsed:
        other = seen.setdefault((entry.domain, entry.selector), entry.index)
        if other != entry.index:
            where.item(entry.index).child("selector").fail(
                f"{_show(entry.selector)} for {entry.domain} is already configured in {where.key}[{other}]")
    return parsed


# -- entry points --------------------------------------------------------------

_TOP_KEYS = ("hostname", "server", "queue", "delivery", "routes", "dkim", "metrics", "log")


def config_from_mapping(data: Mapping[str, Any], source: str) -> Config:
    """Validate parsed TOML (or any mapping of the same shape) into a Config.

    ``source`` names the file in error messages.  Raises ConfigError.
    """
    root = _Where(source)
    _table(dict(data), root, _TOP_KEYS)
    hostname = _hostname(data["hostname"], root.child("hostname")) if "hostname" in data else default_hostname()
    return Config(
        hostname=hostname,
        server=_server(data.get("server", {}), root.child("server")),
        queue=_queue(data.get("queue", {}), root.child("queue")),
        delivery=_delivery(data.get("delivery", {}), root.child("delivery")),
        routes=_routes(data.get("routes", []), root.child("routes")),
        dkim=_dkim(data.get("dkim", []), root.child("dkim")),
        metrics=MetricsConfig(**_section(data.get("metrics", {}), root.child("metrics"), _METRICS_KEYS)),
        log=LogConfig(**_section(data.get("log", {}), root.child("log"), _LOG_KEYS)),
        source=source,
    )


def read_toml(path: str) -> dict[str, Any]:
    """The parsed TOML of ``path``; an unreadable file or bad syntax is a ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(_one_line(f"{path}: cannot read: {_os_error_text(e)}")) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_one_line(f"{path}: TOML syntax error: {e}")) from None
    except UnicodeDecodeError as e:
        raise ConfigError(_one_line(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}")) from None


def load_config(path: str) -> Config:
    """Read and validate a TOML configuration file.  Raises ConfigError."""
    return config_from_mapping(read_toml(path), path)


def apply_overrides(
    config: Config,
    *,
    listen: Optional[Sequence[str]] = None,
    queue: Optional[str] = None,
    hostname: Optional[str] = None,
    smarthost: Optional[str] = None,
    source: str = COMMAND_LINE,
) -> Config:
    """The config with command-line values in place of the file's.

    ``listen`` (when not None or empty) replaces server.listen; ``smarthost``
    appends a catch-all route after the file's routes, so it only takes the
    recipients that no file route matched.  Errors name the option.
    """
    where = _Where(source)
    if listen:
        endpoints = tuple(_endpoint(desc, where.child("--listen")) for desc in listen)
        config = replace(config, server=replace(config.server, listen=endpoints))
    if queue is not None:
        directory = _string(queue, where.child("--queue"), allow_empty=False)
        config = replace(config, queue=replace(config.queue, directory=directory))
    if hostname is not None:
        config = replace(config, hostname=_hostname(hostname, where.child("--hostname")))
    if smarthost is not None:
        host = _hostport(smarthost, where.child("--smarthost"))
        catch_all = RouteConfig(domains=("*",), smarthost=(host,), index=len(config.routes))
        config = replace(config, routes=config.routes + (catch_all,))
    return config
