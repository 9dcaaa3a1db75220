"""The store's writes: each change to the queue as an operation, and the group commit that runs them.

An operation (store a new message, modify, remove or quarantine one) does
its SQL in the writer's transaction (``run``) and its file work once that
transaction is durable (``committed``) or failed (``undo``), in the
writer's thread.

Group commit.  ``GroupCommit`` queues the operations; one transaction at a
time runs everything pending (up to ``MAX_BATCH``), so the messages of
many concurrent sessions share one fsync, and while one batch commits, new
operations accumulate for the next.  A new message starts a transaction
at once unless other sessions may bring one soon: then it waits up to
``commit_delay`` for them (PostgreSQL's commit_delay and commit_siblings),
since each transaction costs far more than the messages in it; an outcome
or a removal waits up to ``lazy_delay`` for company.  The
Deferred of each operation fires only after its transaction is durable;
the store hears of each new message after every Deferred of its batch
fired.  ``relay.queue.store.Spool`` owns the connection, the thread the
transactions run in and the clock, and hands them in.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relay.envelope import Envelope
from relay.log import Logger
from relay.queue.files import describe, ignore_errors
from relay.queue.schema import modify_in, remove_in, row

if TYPE_CHECKING:
    from relay.queue.store import Spool

log = Logger(namespace="relay.store")

MAX_BATCH = 1000  # operations in one transaction

Runner = Callable[..., Deferred]


class Operation:
    """One change to the queue, run in the writer's transaction."""

    queue_id: str
    action: str
    urgent = False  # starts a transaction at once (a client or an operator waits for it)

    def run(self, conn: sqlite3.Connection) -> Any:
        raise NotImplementedError

    def committed(self) -> None:
        """After the transaction is durable (in the writer's thread)."""

    def undo(self) -> None:
        """After the transaction failed (in the writer's thread)."""


class StoreOperation(Operation):
    action = "store"
    urgent = True

    def __init__(self, spool: "Spool", envelope: Envelope, body: Optional[bytes]) -> None:
        self.spool = spool
        self.queue_id = envelope.queue_id
        self.envelope = envelope
        self.body = body  # None: in large/

    def run(self, conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO envelope VALUES (?, ?, ?, ?, ?, ?)", (self.queue_id, *row(self.envelope)))
        conn.execute("INSERT INTO body VALUES (?, ?)", (self.queue_id, self.body))
        return self.queue_id

    def undo(self) -> None:
        if self.body is None:  # never acknowledged: its file goes too
            ignore_errors(self.spool._fs.unlink, self.spool.large_path(self.queue_id))


class ModifyOperation(Operation):
    action = "update"

    def __init__(self, queue_id: str, change: Callable[[Envelope], Envelope]) -> None:
        self.queue_id = queue_id
        self.change = change

    def run(self, conn: sqlite3.Connection) -> Envelope:
        return modify_in(conn, self.queue_id, self.change)


class RemoveOperation(Operation):
    action = "remove"

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.large = False

    def run(self, conn: sqlite3.Connection) -> bool:
        existed, self.large = remove_in(conn, self.queue_id)
        return existed

    def committed(self) -> None:
        if self.large:
            ignore_errors(self.spool._fs.unlink, self.spool.large_path(self.queue_id))


class GroupCommit:
    """The writer's queue: pending operations, run as one transaction at a time."""

    def __init__(
        self,
        run: Runner,
        connection: Callable[[], sqlite3.Connection],
        clock: Callable[[], IReactorTime],
        stored: Callable[[Envelope, Optional[bytes]], None],
        lazy_delay: float,
        commit_delay: float = 0.0,
    ) -> None:
        """``run(f, *args)`` runs a transaction where the writer runs (fires with its
        result); ``connection()`` is the writer's connection there; ``clock()``
        times lazy changes; ``stored(envelope, body)`` hears of each new message
        once its batch is answered.  ``company`` (settable) counts the sessions
        that may yet bring a new message."""
        self._run = run
        self._connection = connection
        self._clock = clock
        self._stored = stored
        self._pending: list[tuple[Operation, Deferred]] = []
        self._running = False
        self._urgent = 0  # pending operations that start a transaction at once
        self._lazy_delay = lazy_delay
        self._timer: Any = None  # starts the next transaction after a wait (lazy or commit delay)
        self._commit_delay = commit_delay
        self._urgent_since = 0.0  # when the oldest pending urgent operation came
        self.company: Callable[[], int] = lambda: 0
        self.finishing = 0  # large messages whose file is being made durable before their commit
        self._idle_waiters: list[Deferred] = []

    def submit(self, operation: Operation, lazy: bool = False) -> Deferred:
        """Queue ``operation`` for the next transaction.

        A new message starts a transaction at once (a client waits for its
        250), unless more sessions are open than new messages pending: then
        it waits up to ``commit_delay`` for theirs.  A ``lazy`` change (an
        outcome, a removal) waits up to ``lazy_delay`` for company: it goes
        with the next new message's transaction, or alone when the delay is
        up, so under load outcomes and removals cost no fsync of their own.
        """
        d: Deferred = Deferred()
        self._pending.append((operation, d))
        if not lazy:
            if not self._urgent:
                self._urgent_since = self._clock().seconds() if self._commit_delay > 0 else 0.0
            self._urgent += 1
        if not self._running:
            self._next_batch()
        return d

    def _wait(self, delay: float) -> None:
        """Start the next transaction in ``delay`` seconds, or when it is already due if that is sooner."""
        timer, clock = self._timer, self._clock()
        if timer is not None:
            if timer.getTime() <= clock.seconds() + delay:
                return
            timer.cancel()
        self._timer = clock.callLater(delay, self._timer_due)

    def _timer_due(self) -> None:
        self._timer = None
        if not self._running:
            self._next_batch(now=True)

    def _next_batch(self, now: bool = False) -> None:
        """Start a transaction of what is pending (one at a time: one writer).

        Only lazy changes pending: wait for company, up to ``lazy_delay``.
        New messages pending while other sessions may still bring theirs:
        wait up to ``commit_delay`` since the oldest of them came.
        """
        if self._pending and not now and not self._idle_waiters:
            if not self._urgent:
                wait = self._lazy_delay
            elif self._commit_delay > 0 and self.company() > self._urgent:
                wait = self._urgent_since + self._commit_delay - self._clock().seconds()
            else:
                wait = 0.0
            if wait > 0:
                self._wait(wait)
                return
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._pending:
            if self.finishing:
                return  # its commit comes next; the waiters wait for it
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        self._urgent = sum(1 for op, _ in self._pending if op.urgent)
        self._running = True
        try:
            d = self._run(self._run_batch, [op for op, _ in batch])
        except Exception:
            d = defer.fail()
        d.addBoth(self._batch_done, batch)

    def _run_batch(self, operations: list[Operation]) -> list[tuple[bool, Any]]:
        """Run every operation in one transaction and commit it (in the writer's thread).

        An operation that fails on its own (an unknown id, a change that
        raises) fails alone, before it wrote anything; a database error fails
        the whole transaction, and nothing of it is answered as done.
        """
        results: list[tuple[bool, Any]] = []
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in operations:
                    try:
                        results.append((True, op.run(conn)))
                    except sqlite3.Error:
                        raise
                    except Exception as e:
                        results.append((False, e))
                conn.execute("COMMIT")
            except BaseException:
                ignore_errors(conn.execute, "ROLLBACK")
                raise
        except Exception as e:
            for op in operations:
                op.undo()
            return [(False, e)] * len(operations)
        for op, (ok, _) in zip(operations, results):
            if ok:
                op.committed()
        return results

    def _batch_done(self, outcome: Any, batch: list[tuple[Operation, Deferred]]) -> None:
        if isinstance(outcome, Failure):
            results: list[tuple[bool, Any]] = [(False, outcome)] * len(batch)
        else:
            results = outcome
        self._running = False
        stored = []
        for (op, d), (ok, value) in zip(batch, results):
            if ok:
                if isinstance(op, StoreOperation):
                    stored.append(op)
                if not isinstance(op, ModifyOperation):
                    log.debug("{queue_id}: {action} done", queue_id=op.queue_id, action=op.action)
                d.callback(value)
            else:
                self._log_failed(op, value)
                d.errback(value if isinstance(value, Failure) else Failure(value))
        for op in stored:  # after every 250 of the batch is written
            self._stored(op.envelope, op.body)
        if not self._running:
            self._next_batch()

    def _log_failed(self, op: Operation, error: Any) -> None:
        if isinstance(error, Failure):
            error = error.value
        if isinstance(error, KeyError):
            log.info("{queue_id}: cannot {action}: not queued", queue_id=op.queue_id, action=op.action)
        else:
            log.error("{queue_id}: cannot {action}: {error}", queue_id=op.queue_id, action=op.action,
                      error=describe(error))

    def finished_file(self, result: Any) -> Any:
        """A large file is durable (its commit is submitted next) or failed (nothing follows)."""
        self.finishing -= 1
        if isinstance(result, Failure) and not self._running:
            self._next_batch()  # fires the idle waiters when nothing else is left
        return result

    def when_idle(self) -> Deferred:
        """Fires once nothing is pending, running or on its way (lazy changes go at once)."""
        if not self._running and not self._pending and not self.finishing:
            return defer.succeed(None)
        d: Deferred = Deferred()
        self._idle_waiters.append(d)
        if not self._running:
            self._next_batch(now=True)  # lazy changes go now
        return d
