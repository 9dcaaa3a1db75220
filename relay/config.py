"""Configuration: TOML -> frozen config objects.

This module owns the meaning of every configuration key, its default and
its validation.  Every error is a ``ConfigError`` whose message is one line
naming the file, the key and what is wrong.  Nothing else reads the file.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

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


@dataclass(frozen=True)
class QueueConfig:
    directory: str = "relay-queue"
    min_retry: float = 300.0
    max_retry: float = 14400.0
    max_lifetime: float = 432000.0


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = 25
    nameservers: tuple[tuple[str, int], ...] = ()  # (ip, port); empty: system resolver
    concurrency: int = 50
    per_destination: int = 10


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
    options: Mapping[str, Any] = field(default_factory=dict)  # the plugin's own keys
    index: int = 0  # position in the file, for naming the rule ("routes[2]")


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=default_hostname)
    server: ServerConfig = field(default_factory=ServerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    routes: tuple[RouteConfig, ...] = ()
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
