"""Limits per client address, shared by the listeners of one process.

A client is known by its address (``client_key``): an IPv4 address, or a
whole IPv6 address (no aggregation into prefixes); an IPv4-mapped IPv6
address counts as the IPv4 address.  ``ClientLimits`` owns the state that
outlives a session:

- the connection rate (Postfix's ``smtpd_client_connection_rate_limit``):
  a token bucket per address holding ``client_connection_rate_limit``
  connections, refilled over ``client_rate_time_unit``;
- failed AUTH attempts: after ``auth_failure_limit`` failures within
  ``auth_failure_window`` an address is refused further attempts until the
  oldest of them leaves the window.

Concurrent sessions are counted by each listener's factory (``SessionCounts``),
like Postfix counts per service.  Every table is bounded: an entry that no
longer limits anything is dropped when the table is swept, and a table
over ``MAX_TRACKED`` addresses forgets its oldest entries.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Optional

from twisted.internet.interfaces import IReactorTime

from relay.config import ServerConfig
from relay.domains import parsed_ip

MAX_TRACKED = 100_000  # addresses one table remembers at most
SWEEP_EVERY = 1024  # new entries between two sweeps of a table, at the least


def client_key(host: str) -> str:
    """The address a client is counted by: IPv4-mapped IPv6 as IPv4, IPv6 in its compressed form."""
    address = parsed_ip(host)
    if address is None:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class _Bucket:
    __slots__ = ("tokens", "when")

    def __init__(self, tokens: float, when: float) -> None:
        self.tokens = tokens
        self.when = when


class ConnectionRate:
    """A token bucket per address: at most ``limit`` connections per ``unit`` seconds, in bursts up to ``limit``."""

    def __init__(self, limit: int, unit: float, clock: IReactorTime) -> None:
        self.limit = limit
        self.unit = unit
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._added = 0

    def allow(self, key: str) -> bool:
        """Take one connection from ``key``'s bucket; False when it is empty (or the limit is off: True)."""
        if self.limit <= 0:
            return True
        now = self.clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._added += 1
            if _sweep_due(self._added, len(self._buckets)):
                self._sweep(now)
            bucket = self._buckets[key] = _Bucket(float(self.limit), now)
        else:
            self._refill(bucket, now)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _refill(self, bucket: _Bucket, now: float) -> None:
        elapsed = max(0.0, now - bucket.when)
        bucket.tokens = min(float(self.limit), bucket.tokens + elapsed * self.limit / self.unit)
        bucket.when = now

    def _sweep(self, now: float) -> None:
        """Drop the buckets that are full again; past MAX_TRACKED, the oldest too."""
        self._added = 0
        for key, bucket in list(self._buckets.items()):
            self._refill(bucket, now)
            if bucket.tokens >= self.limit:
                del self._buckets[key]
        _forget_oldest(self._buckets)

    def __len__(self) -> int:
        return len(self._buckets)


class AuthFailures:
    """Failed AUTH attempts per address within a sliding window."""

    def __init__(self, limit: int, window: float, clock: IReactorTime) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._added = 0

    def blocked(self, key: str) -> bool:
        """Whether ``key`` has used up its failures in the window (the limit off: never)."""
        if self.limit <= 0:
            return False
        times = self._failures.get(key)
        if times is None:
            return False
        self._expire(times, self.clock.seconds())
        if not times:
            del self._failures[key]
            return False
        return len(times) >= self.limit

    def failed(self, key: str) -> None:
        """Record one failure of ``key`` now."""
        if self.limit <= 0:
            return
        now = self.clock.seconds()
        times = self._failures.get(key)
        if times is None:
            self._added += 1
            if _sweep_due(self._added, len(self._failures)):
                self._sweep(now)
            times = self._failures[key] = deque(maxlen=self.limit)
        times.append(now)

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def _sweep(self, now: float) -> None:
        self._added = 0
        for key, times in list(self._failures.items()):
            self._expire(times, now)
            if not times:
                del self._failures[key]
        _forget_oldest(self._failures)

    def __len__(self) -> int:
        return len(self._failures)


def _sweep_due(added: int, size: int) -> bool:
    """Sweep after as many new entries as the table holds (at least SWEEP_EVERY): constant work per entry."""
    return added >= max(SWEEP_EVERY, size // 2) or size >= MAX_TRACKED


def _forget_oldest(table: dict) -> None:
    """Keep a table under MAX_TRACKED entries by dropping the ones added first."""
    excess = len(table) - (MAX_TRACKED - SWEEP_EVERY)
    if excess > 0:
        for key in list(table)[:excess]:
            del table[key]


class ClientLimits:
    """The per-address state of one process: connection rate and AUTH failures."""

    def __init__(self, config: ServerConfig, clock: IReactorTime) -> None:
        self.connections = ConnectionRate(config.client_connection_rate_limit, config.client_rate_time_unit, clock)
        self.auth = AuthFailures(config.auth_failure_limit, config.auth_failure_window, clock)


class SessionCounts:
    """Concurrent sessions of one listener: in all, and per client address."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.total = 0
        self._per_client: dict[str, int] = {}

    def admit(self, key: str, trusted: bool) -> Optional[str]:
        """Count a new session; None, or why it is refused: "sessions", "client sessions".

        Trusted clients may use every session; others leave ``reserved_sessions``
        free and have at most ``max_sessions_per_client`` each.
        """
        config = self.config
        if self.total >= config.max_sessions:
            return "sessions"
        if not trusted:
            if self.total >= config.max_sessions - config.session_reserve():
                return "sessions"
            if key and self._per_client.get(key, 0) >= config.max_sessions_per_client:
                return "client sessions"
        self.total += 1
        if key:
            self._per_client[key] = self._per_client.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        """A counted session has ended."""
        self.total -= 1
        count = self._per_client.get(key, 0) - 1
        if count > 0:
            self._per_client[key] = count
        else:
            self._per_client.pop(key, None)

    def of(self, key: str) -> int:
        """Sessions of ``key`` now."""
        return self._per_client.get(key, 0)
