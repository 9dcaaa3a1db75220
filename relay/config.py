"""Configuration: TOML -> frozen config objects.

This module owns the meaning of every configuration key, its default and
its validation.  Every error is a ``ConfigError`` whose message is one line
naming the file, the key and what is wrong.  Nothing else reads the file.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, NoReturn, Optional, Sequence, TypeVar, Union

from relay.domains import DomainError, DomainPattern, ip_literal, normalize_domain, to_ascii

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(Exception):
    """A configuration problem; ``str(error)`` is the one line to show."""


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


# -- value parsers shared by the loader and the command line ------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``.

    Raises ValueError with a short reason.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        unit = text[-1:] if text[-1:] in _DURATION_UNITS else "s"
        number = text[:-1] if text[-1:] in _DURATION_UNITS else text
        try:
            seconds = float(number) * _DURATION_UNITS[unit]
        except ValueError:
            raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 4h, 5d)") from None
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


def parse_size(value: Any) -> int:
    """Octets from a number or a string like ``"10MB"`` (10**7) or ``"10MiB"`` (10 * 2**20)."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        octets = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        i = len(text)
        while i and not text[i - 1].isdigit() and text[i - 1] != ".":
            i -= 1
        number, unit = text[:i], text[i:]
        if unit not in _SIZE_UNITS or not number:
            raise ValueError(f"{value!r} is not a size (use e.g. 35MB, 10MiB, 1000000)")
        try:
            octets = int(float(number) * _SIZE_UNITS[unit])
        except ValueError:
            raise ValueError(f"{value!r} is not a size (use e.g. 35MB, 10MiB, 1000000)") from None
    else:
        raise ValueError(f"expected a size, got {type(value).__name__}")
    if octets < 0:
        raise ValueError(f"{value!r} is not a positive size")
    return octets


def parse_hostport(value: str, default_port: Optional[int] = None) -> tuple[str, Optional[int]]:
    """Split ``host[:port]``; ``[v6]:port`` and bare IPv6 literals are understood."""
    text = value.strip()
    if not text:
        raise ValueError("empty host")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']'")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        return text, default_port  # a bare name or a bare IPv6 address
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: port {port} out of range")
    return host, port


# -- the loader: TOML -> Config ------------------------------------------------

_T = TypeVar("_T")

ROUTE_ACTIONS = ("smarthost", "via", "plugin", "reject")
ROUTE_DELIVERY_KEYS = ("username", "password_file", "tls", "auth_in_clear")
SOURCE_ROUTE_MODES = ("ignore", "honor")
ROUTE_TLS_POLICIES = ("may", "require", "verify")
DNS_PORT = 53
COMMAND_LINE = "command line"

_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "a boolean",
    list: "an array", dict: "a table",
}
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _show(value: Any) -> str:
    """A value as an operator wrote it in TOML, shortened for one line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value: Any) -> str:
    for kind in (bool, str, int, float, list, dict):
        if isinstance(value, kind):
            return _TYPE_NAMES[kind]
    return "a " + type(value).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Where:
    """The file and the dotted key of one value, so errors can name both."""

    def __init__(self, source: str, key: str = "") -> None:
        self.source = source
        self.key = key

    def child(self, name: str) -> "_Where":
        return _Where(self.source, f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> "_Where":
        return _Where(self.source, f"{self.key}[{index}]")

    def fail(self, what: str) -> NoReturn:
        prefix = f"{self.source}: {self.key}: " if self.key else f"{self.source}: "
        raise ConfigError(_one_line(prefix + what))


# -- typed values --------------------------------------------------------------


def _string(value: Any, where: _Where, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        where.fail(f"expected a string, got {_type_name(value)} {_show(value)}")
    if not allow_empty and not value.strip():
        where.fail("must not be empty")
    return value


def _integer(value: Any, where: _Where, low: int = 1, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        where.fail(f"expected an integer, got {_type_name(value)} {_show(value)}")
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        where.fail(f"{value} is out of range (must be {bounds})")
    return value


def _array(value: Any, where: _Where, non_empty: bool = False) -> list:
    if not isinstance(value, list):
        where.fail(f"expected an array, got {_type_name(value)} {_show(value)}")
    if non_empty and not value:
        where.fail("must not be an empty array")
    return value


def _each(value: Any, where: _Where, parse: Callable[[Any, _Where], _T], non_empty: bool = False) -> tuple[_T, ...]:
    return tuple(parse(item, where.item(i)) for i, item in enumerate(_array(value, where, non_empty)))


def _table(value: Any, where: _Where, known: Sequence[str]) -> dict:
    if not isinstance(value, dict):
        where.fail(f"expected a table, got {_type_name(value)} {_show(value)}")
    for key in value:
        if key not in known:
            where.child(key).fail(f"unknown key (known keys here: {', '.join(known)})")
    return value


def _choice(value: Any, where: _Where, choices: Sequence[str]) -> str:
    text = _string(value, where)
    if text not in choices:
        where.fail(f"{_show(value)} is not one of {', '.join(choices)}")
    return text


def _requote(message: str, value: Any) -> str:
    """Show the value in a parser's message as TOML writes it."""
    return message.replace(repr(value), _show(value)) if isinstance(value, str) else message


def _duration(value: Any, where: _Where) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        where.fail(_requote(str(e), value))
    if not math.isfinite(seconds) or seconds <= 0:
        where.fail(f"{_show(value)} must be a positive, finite duration")
    return seconds


def _size(value: Any, where: _Where) -> int:
    try:
        octets = parse_size(value)
    except ValueError as e:
        where.fail(_requote(str(e), value))
    if octets <= 0:
        where.fail(f"{_show(value)} must be a positive size")
    return octets


def _positive(value: Any, where: _Where) -> int:
    return _integer(value, where, low=1)


def _port(value: Any, where: _Where) -> int:
    return _integer(value, where, low=1, high=65535)


# -- names, addresses, endpoints -----------------------------------------------


def domain_problem(name: str) -> Optional[str]:
    """Why ``name`` is not a usable domain name, or None when it is."""
    text = name.strip().rstrip(".")
    if not text:
        return "is an empty domain name"
    try:
        ascii_name = to_ascii(text)
    except DomainError as e:
        return f"is not a valid domain name: {e}"
    if len(ascii_name) > 253:
        return "is longer than 253 characters"
    if not all(_LABEL.match(label) for label in ascii_name.split(".")):
        return "is not a valid domain name"
    return None


def _address_literal_problem(text: str) -> Optional[str]:
    try:
        if ip_literal(text) is None:
            raise ValueError(text)
    except ValueError:
        return "is not a valid address literal (use e.g. [192.0.2.1] or [IPv6:2001:db8::1])"
    return None


def domain_pattern_problem(text: str) -> Optional[str]:
    """Why ``text`` is not a domain pattern ("a.test", ".a.test", "*"), or None."""
    pattern = text.strip()
    if pattern == "*":
        return None
    if pattern.startswith("*"):
        return 'is not a domain pattern (write ".a.test" for the subdomains of a.test, "*" for every domain)'
    if pattern.startswith("["):
        return _address_literal_problem(pattern)
    return domain_problem(pattern[1:] if pattern.startswith(".") else pattern)


def _pattern(value: Any, where: _Where) -> str:
    text = _string(value, where, allow_empty=False).strip()
    problem = domain_pattern_problem(text)
    if problem:
        where.fail(f"{_show(value)} {problem}")
    return DomainPattern(text).text


def _hostname(value: Any, where: _Where) -> str:
    text = _string(value, where, allow_empty=False).strip()
    problem = domain_problem(text)
    if problem:
        where.fail(f"{_show(value)} {problem}")
    return text


def _host_problem(host: str) -> Optional[str]:
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return domain_problem(host)


def _hostport(value: Any, where: _Where, port_allowed: bool = True) -> str:
    """A ``host[:port]`` string, checked and returned stripped."""
    text = _string(value, where, allow_empty=False).strip()
    try:
        host, port = parse_hostport(text)
    except ValueError as e:
        where.fail(_requote(str(e), text))
    problem = _host_problem(host)
    if problem:
        where.fail(f"{_show(value)}: host {_show(host)} {problem}")
    if port is not None and not port_allowed:
        where.fail(f"{_show(value)}: a port is only possible on the first hop")
    return text


def _nameserver(value: Any, where: _Where) -> tuple[str, int]:
    text = _string(value, where, allow_empty=False).strip()
    try:
        host, port = parse_hostport(text, DNS_PORT)
        address = ipaddress.ip_address(host)
    except ValueError:
        where.fail(f"{_show(value)} is not a name server (use an IP address, e.g. 192.0.2.53, 192.0.2.53:5353 or [2001:db8::53]:53)")
    return str(address), port if port is not None else DNS_PORT


def _source_address(value: Any, where: _Where) -> str:
    text = _string(value, where, allow_empty=False).strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        where.fail(f"{_show(value)} is not an IP address (use e.g. 192.0.2.25 or 2001:db8::25)")
    return str(address)


def _source_addresses(value: Any, where: _Where) -> tuple[str, ...]:
    """One local address or a list of them, at most one per IP version."""
    addresses = (_source_address(value, where),) if isinstance(value, str) else _each(value, where, _source_address)
    versions = [ipaddress.ip_address(a).version for a in addresses]
    if len(set(versions)) != len(versions):
        where.fail("give at most one IPv4 and one IPv6 address")
    return addresses


def _network(value: Any, where: _Where) -> IPNetwork:
    text = _string(value, where, allow_empty=False).strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        where.fail(f"{_show(value)} is not an IP network (use e.g. 192.0.2.0/24, 2001:db8::/32 or 192.0.2.7)")
    where.fail(f"{_show(value)} has host bits set (did you mean {loose}?)")


_PARSE_ONLY = object()  # endpoints are parsed, never listened on, while loading


def endpoint_problem(description: str) -> Optional[str]:
    """Why ``description`` is not a Twisted server endpoint string, or None.

    The endpoint is built (files such as ``ssl:`` certificates are read) but
    nothing listens.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(_PARSE_ONLY, description)
    except (IndexError, KeyError) as e:  # systemd: finds no socket by index (or by name)
        from relay.systemd import is_passed_socket

        if is_passed_socket(description):
            return None  # the socket is only there when systemd starts the relay
        if isinstance(e, KeyError):
            return f"is not a valid endpoint: {e} is not known"
        return "is not a valid endpoint: an index is out of range"
    except Exception as e:  # any failure of a parser plugin means a bad string
        return f"is not a valid endpoint: {_one_line(str(e)) or type(e).__name__}"
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"is not a valid endpoint: port {port} out of range"
    return None


def _endpoint(value: Any, where: _Where) -> str:
    text = _string(value, where, allow_empty=False).strip()
    problem = endpoint_problem(text)
    if problem:
        where.fail(f"{_show(value)} {problem}")
    return text


# -- sections ------------------------------------------------------------------

_Parser = Callable[[Any, _Where], Any]


def _endpoints(value: Any, where: _Where) -> tuple[str, ...]:
    return _each(value, where, _endpoint)


def _networks(value: Any, where: _Where) -> tuple[IPNetwork, ...]:
    return _each(value, where, _network)


def _patterns(value: Any, where: _Where) -> tuple[str, ...]:
    return _each(value, where, _pattern)


def _nameservers(value: Any, where: _Where) -> tuple[tuple[str, int], ...]:
    return _each(value, where, _nameserver)


def _path(value: Any, where: _Where) -> str:
    return _string(value, where)


def _bool_value(value: Any, where: _Where) -> bool:
    if not isinstance(value, bool):
        where.fail(f"expected true or false, got {_type_name(value)} {_show(value)}")
    return value


def _ca_file(value: Any, where: _Where) -> str:
    """A readable PEM bundle holding at least one certificate, or "" (the system store)."""
    path = _string(value, where)
    if not path:
        return path
    try:
        with open(path, "rb") as f:
            content = f.read(16 * 1024 * 1024)
    except OSError as e:
        where.fail(f"{_show(value)}: cannot read: {_os_error_text(e)}")
    if b"-----BEGIN CERTIFICATE-----" not in content:
        where.fail(f"{_show(value)} holds no PEM certificate")
    return path


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


def selector_problem(selector: str) -> Optional[str]:
    """Why ``selector`` cannot be a DKIM selector (s=), or None when it can."""
    if not all(_LABEL.match(label) for label in selector.lower().split(".")):
        return "is not a selector (DNS labels of letters, digits, '-' and '_', with dots between them)"
    return None


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


def _os_error_text(error: OSError) -> str:
    if error.errno is not None and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error)


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
