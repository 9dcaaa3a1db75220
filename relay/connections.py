"""Outbound connections: the limits they count against, and reuse within limits.

This module owns the open outbound SMTP connections of delivery (step 5).
Every connection counts from the moment it is being opened until it is
closed, idle ones included: at most ``total`` in all and ``per_destination``
per destination address.

Work beyond the limits waits in line per destination address, and the
destinations take turns: when a place frees up, the next destination in
the rotation that can use it gets it, so a destination with a long line
(or one whose connections hang) never keeps a place from another.  A wait
can be cancelled (``Deferred.cancel``): delivery does that when a
destination is suspended, so its queued work is deferred at once.

A connection that finished a clean transaction is kept idle for the next
transaction to the same session key (the client sends RSET first) and
closed after ``idle_timeout``, after ``reuse_count`` transactions, once it
is ``reuse_time`` seconds old, or at ``close``, with QUIT.  A connection that
had an error is never reused.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from relay.log import Logger
from relay.routing.mx import Target
from relay.seams import OutboundConnection
from relay.smtp.transaction import ClientOptions, ClientTimeouts

log = Logger()

Connect = Callable[..., Deferred]
PoolKey = tuple

# Transactions one connection carries before it is closed (Exim's
# connection_max_messages is 500, Postfix limits by time only).
REUSE_COUNT = 100
# Seconds after which a connection is not reused (Postfix's
# smtp_connection_reuse_time_limit).
REUSE_TIME = 300.0


@dataclass(eq=False)
class _Idle:
    key: PoolKey
    address: str
    conn: OutboundConnection
    timer: Optional[IDelayedCall] = None


@dataclass(eq=False)
class _Waiter:
    key: PoolKey
    address: str
    fresh: bool  # must open a new connection (a reused one just failed)
    deferred: Deferred = field(default_factory=Deferred)


@dataclass(eq=False)
class _Usage:
    opened: float
    transactions: int = 0


_SLOT = object()  # what a waiter gets when it may open a new connection


class ConnectionPool:
    """Open outbound connections: counted against the limits, idle ones kept for reuse."""

    def __init__(
        self,
        reactor: Any,
        connect: Connect,
        total: int,
        per_destination: int,
        reuse_count: int = REUSE_COUNT,
        reuse_time: float = REUSE_TIME,
    ) -> None:
        self._reactor = reactor
        self._connect = connect
        self._total = max(1, total)
        self._per_destination = max(1, per_destination)
        self._reuse_count = max(1, reuse_count)
        self._reuse_time = reuse_time
        self._open = 0
        self._by_address: collections.Counter[str] = collections.Counter()
        self._usage: dict[int, _Usage] = {}  # id(conn) -> when opened, transactions carried
        self._idle: list[_Idle] = []  # oldest first
        self._waiting: dict[str, collections.deque[_Waiter]] = {}  # address -> line; dict order is the rotation
        self._closing = False
        self._serving = False
        self._serve_again = False

    # -- introspection (logs and tests) -------------------------------------------

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._waiting.values())

    # -- checkout and checkin -----------------------------------------------------

    def checkout(self, key: PoolKey, target: Target, options: ClientOptions, fresh: bool = False) -> Deferred:
        """Fire with ``(connection, reused)`` for ``target``; errback when it cannot connect.

        Cancelling the Deferred while it waits for a place takes it out of line.
        """
        grant = self._grant_now(key, target.address, reuse=not fresh)
        if grant is None:
            waiter = _Waiter(key, target.address, fresh)
            waiter.deferred = Deferred(canceller=lambda d: self._remove_waiter(waiter))  # then CancelledError
            self._waiting.setdefault(target.address, collections.deque()).append(waiter)
            d = waiter.deferred
        else:
            d = defer.succeed(grant)
        self._serve_waiting()  # a dead idle connection found above may have freed a place
        d.addCallback(self._use, target, options)
        return d

    def checkin(
        self,
        key: PoolKey,
        address: str,
        conn: OutboundConnection,
        reusable: bool,
        idle_timeout: float = ClientTimeouts.idle,
    ) -> None:
        """Give a connection back after a transaction: kept idle, handed over, or closed."""
        usage = self._usage.get(id(conn))
        if usage is not None:
            usage.transactions += 1
        if not reusable or self._closing or conn.closed or self._worn(conn):
            self._close(conn, address)
            return
        line = self._waiting.get(address, ())
        for waiter in line:
            if waiter.key == key and not waiter.fresh:
                self._remove_waiter(waiter)
                waiter.deferred.callback(conn)
                return
        if any(self._would_unblock(address, w) for line in self._waiting.values() for w in line):
            self._close(conn, address)
            return
        entry = _Idle(key, address, conn)
        entry.timer = self._reactor.callLater(idle_timeout, self._expire, entry)
        self._idle.append(entry)

    def close(self) -> Deferred:
        """Close every idle connection; later checkins close theirs.  Fires when QUITs are done."""
        self._closing = True
        idle, self._idle = self._idle, []
        quits = []
        for entry in idle:
            self._cancel(entry)
            quits.append(self._quit(entry.conn))
            self._forget(entry.address)
        return defer.gatherResults(quits, consumeErrors=True).addCallback(lambda _: None)

    # -- internals ----------------------------------------------------------------

    def _worn(self, conn: OutboundConnection) -> bool:
        """Whether ``conn`` carried its share of transactions or is too old to be reused."""
        usage = self._usage.get(id(conn))
        if usage is None:
            return False
        age = self._reactor.seconds() - usage.opened
        return usage.transactions >= self._reuse_count or age >= self._reuse_time

    def _grant_now(self, key: PoolKey, address: str, reuse: bool) -> Any:
        """An idle connection for ``key``, a slot, or None (wait)."""
        if reuse:
            conn = self._take_idle(key)
            if conn is not None:
                return conn
        if not self._fits(address):
            self._evict_for(address)
        if self._fits(address):
            self._count(address)
            return _SLOT
        return None

    def _use(self, grant: Any, target: Target, options: ClientOptions) -> Any:
        if grant is not _SLOT:
            return (grant, True)
        opened = self._reactor.seconds()
        d = defer.maybeDeferred(self._connect, self._reactor, target.address, target.port, target.host, options)

        def connected(conn: OutboundConnection) -> tuple[Any, bool]:
            self._usage[id(conn)] = _Usage(opened)
            return (conn, False)

        def failed(failure: Any) -> Any:
            # The waiting work gets the place on the next turn, once the caller
            # heard of the failure: it may suspend the destination, and then
            # the work waiting for it must not connect.
            self._uncount(target.address)
            self._reactor.callLater(0, self._serve_waiting)
            return failure

        d.addCallbacks(connected, failed)
        return d

    def _fits(self, address: str) -> bool:
        return self._open < self._total and self._by_address[address] < self._per_destination

    def _count(self, address: str) -> None:
        self._open += 1
        self._by_address[address] += 1

    def _uncount(self, address: str) -> None:
        self._open -= 1
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]

    def _forget(self, address: str) -> None:
        """A connection is gone: count it out and let waiting work use its place."""
        self._uncount(address)
        self._serve_waiting()

    def _take_idle(self, key: PoolKey) -> Any:
        for entry in list(self._idle):
            if entry.key != key:
                continue
            self._idle.remove(entry)
            self._cancel(entry)
            if entry.conn.closed or entry.conn.busy:
                self._usage.pop(id(entry.conn), None)
                self._uncount(entry.address)
                continue
            if self._worn(entry.conn):
                self._quit(entry.conn)
                self._uncount(entry.address)
                continue
            return entry.conn
        return None

    def _would_unblock(self, address: str, waiter: _Waiter) -> bool:
        """Whether closing a connection to ``address`` lets ``waiter`` open one."""
        total_ok = self._open - 1 < self._total
        per = self._by_address[waiter.address] - (1 if waiter.address == address else 0)
        return total_ok and per < self._per_destination and not self._fits(waiter.address)

    def _evict_for(self, address: str) -> None:
        """Close one idle connection whose place ``address`` needs, if there is one."""
        if self._by_address[address] >= self._per_destination:
            candidates = [e for e in self._idle if e.address == address]
        else:
            candidates = list(self._idle)
        if not candidates:
            return
        entry = candidates[0]
        self._idle.remove(entry)
        self._cancel(entry)
        self._quit(entry.conn)
        self._uncount(entry.address)

    def _remove_waiter(self, waiter: _Waiter) -> None:
        line = self._waiting.get(waiter.address)
        if line is None:
            return
        try:
            line.remove(waiter)
        except ValueError:
            return
        if not line:
            del self._waiting[waiter.address]

    def _serve_waiting(self) -> None:
        """Let waiting checkouts go as far as the limits allow, destinations taking turns.

        Not re-entered: a grant whose callbacks free or take places makes the
        running loop look again instead.
        """
        if self._serving:
            self._serve_again = True
            return
        self._serving = True
        try:
            self._serve_again = True
            while self._serve_again:
                self._serve_again = False
                for address in list(self._waiting):
                    line = self._waiting.get(address)
                    if not line:
                        continue
                    waiter = line[0]
                    grant = self._grant_now(waiter.key, address, reuse=not waiter.fresh)
                    if grant is None:
                        continue
                    line.popleft()
                    del self._waiting[address]
                    if line:
                        self._waiting[address] = line  # to the end of the rotation
                    waiter.deferred.callback(grant)
                    self._serve_again = True
                    break
        finally:
            self._serving = False

    def _expire(self, entry: _Idle) -> None:
        if entry in self._idle:
            self._idle.remove(entry)
            self._close(entry.conn, entry.address)

    def _close(self, conn: OutboundConnection, address: str) -> None:
        self._quit(conn)
        self._forget(address)

    @staticmethod
    def _cancel(entry: _Idle) -> None:
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()

    def _quit(self, conn: OutboundConnection) -> Deferred:
        self._usage.pop(id(conn), None)
        if conn.closed:
            return defer.succeed(None)
        d = defer.maybeDeferred(conn.quit)
        d.addErrback(lambda f: log.debug("QUIT failed: {error}", error=f.getErrorMessage()))
        return d
