"""The durable queue store: the only code that touches the queue.

Every accepted message enters the queue through one door
(``Spool.new_message`` then ``IncomingMessage.commit``), and the store is the
single truth about it: every timer and in-flight set elsewhere is rebuilt
from it at start-up (``Spool.recover``, then ``Spool.summaries``).  What
recovery does, and how unreadable entries are moved into ``corrupt/``, is
``relay.queue.recovery``.

Layout under ``Spool.directory``::

    queue.db (-wal, -shm)  SQLite in WAL mode, synchronous=FULL: one row per
                           message in ``envelope`` (the versioned envelope JSON
                           and the columns scheduling needs) and in ``body``
                           (the message bytes exactly as received, our
                           Received first; NULL for a large message)
    large/<id>.msg         the bytes of a message over ``large_message``
                           octets, written while it arrives, fsynced before
                           its row is committed
    tmp/                   large messages still arriving; emptied at start-up
    corrupt/               entries that could not be read, moved aside as
                           ``<id>.json``, ``<id>.msg`` and ``<id>.reason``
                           files, never deleted

The database's format is ``relay.queue.schema``;
a queue directory in the file-per-message format of earlier releases is
imported at start-up (``relay.queue.legacy``).

Durability ("250 means durable").  A commit is durable when SQLite's WAL is
fsynced (``synchronous=FULL``); the commit Deferred fires only after that.
A crash before it leaves no row (and at most a large file without a row,
which recovery deletes: never acknowledged); after it, a complete entry.
A removal deletes the rows first and the large file after the commit, so
no row ever names a missing file by our doing.

Group commit.  Writes are queued as operations (``relay.queue.operations``);
one thread owns the writing connection and runs everything pending as one
transaction, so the messages of many concurrent sessions share one fsync;
while one batch commits, new operations accumulate for the next.  Reads for
the daemon run in a small pool of reader threads (WAL readers never wait on
the writer), so the reactor thread does no database or file I/O on the hot
path (``relay.queue.threads``).  The bytes of a message just committed stay
in memory (``RECENT_BYTES`` in all) until its first attempt takes them, so
delivery reads nothing back.

Concurrent writers.  The daemon and ``relay-queue`` may change one message
at once: each change reads and writes the row inside one ``BEGIN
IMMEDIATE`` transaction, which SQLite serialises between processes.

A message still arriving is a ``relay.queue.incoming.IncomingMessage``;
filesystem calls for large messages and corrupt entries go through
``relay.queue.files.OsFileSystem`` and database transactions through
``runner``, so tests can record their order and simulate a crash at any
step.
"""

from __future__ import annotations

import collections
import errno
import io
import os
import sqlite3
import threading
from typing import Any, BinaryIO, Callable, Iterable, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from relay.log import Logger

from relay.envelope import Envelope
from relay.queue.files import MESSAGE_SUFFIX, OsFileSystem, ignore_errors, write_file
from relay.queue import recovery, schema
from relay.queue.bounds import read_envelope
from relay.queue.ids import new_queue_id, valid_queue_id
from relay.queue.incoming import IncomingMessage
from relay.queue.operations import GroupCommit, ModifyOperation, RemoveOperation, Runner, StoreOperation
from relay.queue.recovery import QuarantineOperation, RecoveryReport
from relay.queue.schema import QueueSummary, StoreError, connect, modify_in, prepare, remove_in
from relay.queue.threads import StoreThreads

log = Logger(namespace="relay.store")

STORE_FILE = "queue.db"
TMP_DIR = "tmp"
LARGE_DIR = "large"
CORRUPT_DIR = "corrupt"
MISSING_MESSAGE = "message file missing"

LARGE_MESSAGE = 1024 * 1024  # octets kept in memory (and stored in the database) per message
LAZY_DELAY = 0.05  # seconds an outcome or a removal waits to share a new message's transaction
COMMIT_DELAY = 0.002  # seconds a new message waits for those of other open sessions (one fsync for all)
RECENT_BYTES = 32 * 1024 * 1024  # bytes of just-committed messages kept for their first attempt


def _delay(given: Optional[float], default: float, runner: Optional[Runner]) -> float:
    """A group-commit delay: as given, else ``default`` with the store's own threads and none with a runner."""
    if given is None:
        return default if runner is None else 0.0
    return given


class Spool:
    """A queue directory: the one door in, the single truth, start-up recovery."""

    def __init__(
        self,
        directory: str,
        *,
        clock: Optional[IReactorTime] = None,
        reactor: Any = None,
        runner: Optional[Runner] = None,
        fs: Any = None,
        large_message: int = LARGE_MESSAGE,
        recent_bytes: int = RECENT_BYTES,
        lazy_delay: Optional[float] = None,
        commit_delay: Optional[float] = None,
        write_inline: bool = False,
    ) -> None:
        """A store in ``directory``.

        ``clock`` stamps queue ids and times lazy writes; ``reactor`` (or a
        clock that is a reactor, as the composition root passes) is where the
        store's own threads report their results and stop at shutdown.  Both
        are injected: without them only the synchronous methods work (the
        tools).
        ``runner(f, *args)`` runs each transaction and every read for the
        daemon (default: the store's own threads); with an injected runner
        everything runs at once on the calling thread, which tests use.
        ``lazy_delay`` is how long outcomes and removals wait for company
        (``LAZY_DELAY`` with the store's own threads, none with a runner);
        ``commit_delay`` how long a new message waits for those of other open
        sessions (``COMMIT_DELAY``, likewise; see ``watch_sessions``).
        With ``write_inline`` the transactions run at once on the reactor
        thread, not in a writer thread (a worker of several; see
        ``relay.queue.threads``).
        """
        self.directory = directory
        self.large_message = large_message
        self._clock = clock
        self._reactor = reactor
        self._threads = StoreThreads(self._thread_reactor, inline=runner is not None, write_inline=write_inline)
        self._runner: Runner = runner if runner is not None else self._threads.in_writer
        self._fs = fs if fs is not None else OsFileSystem()
        self._path = os.path.join(directory, STORE_FILE)
        self._tmp = os.path.join(directory, TMP_DIR)
        self._large = os.path.join(directory, LARGE_DIR)
        self._corrupt = os.path.join(directory, CORRUPT_DIR)
        self._lock = threading.Lock()
        self._local = threading.local()  # a reading connection per thread
        self._writer_conn: Optional[sqlite3.Connection] = None
        self._commits = GroupCommit(
            lambda f, *args: self._runner(f, *args),  # read at each batch: a test may swap the runner
            self._writing,
            self._get_clock,
            self._committed,
            lazy_delay=_delay(lazy_delay, LAZY_DELAY, runner),
            commit_delay=_delay(commit_delay, COMMIT_DELAY, runner),
        )
        self._commit_listeners: list[Callable[[str, Envelope], Any]] = []
        self._recent: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._recent_size = 0
        self._recent_limit = recent_bytes
        self._checked = False

    # -- the one door in: who hears of new messages -------------------------

    def watch_sessions(self, count: Callable[[], int]) -> None:
        """``count()`` is how many inbound sessions are open: while more are open
        than new messages wait for their commit, a new message waits up to
        ``commit_delay`` for theirs, so that they share one transaction and one
        fsync.  With none watched, each new message's transaction starts at once."""
        self._commits.company = count

    def on_commit(self, listener: Callable[[str, Envelope], Any]) -> None:
        """Call ``listener(queue_id, envelope)`` each time a new message has become durable."""
        self._commit_listeners.append(listener)

    def _committed(self, envelope: Envelope, body: Optional[bytes]) -> None:
        if body is not None and self._commit_listeners and len(body) <= self._recent_limit:
            self._recent[envelope.queue_id] = body
            self._recent_size += len(body)
            while self._recent_size > self._recent_limit:
                _, old = self._recent.popitem(last=False)
                self._recent_size -= len(old)
        for listener in self._commit_listeners:
            try:
                listener(envelope.queue_id, envelope)
            except Exception:
                log.failure("{queue_id}: commit listener failed", queue_id=envelope.queue_id)

    def _forget_recent(self, queue_id: str) -> Optional[bytes]:
        body = self._recent.pop(queue_id, None)
        if body is not None:
            self._recent_size -= len(body)
        return body

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (only used without an injected runner)."""
        self._threads.start()

    def stop(self) -> Deferred:
        """Fire once every queued operation is durable and the threads have stopped."""
        d = self._commits.when_idle()
        d.addCallback(lambda _: self._threads.stop())
        return d

    def close(self) -> None:
        """Close the connections of the calling thread and the writer (tools, tests)."""
        for conn in (getattr(self._local, "conn", None), self._writer_conn):
            if conn is not None:
                ignore_errors(conn.close)
        self._local.conn = None
        self._writer_conn = None

    # -- connections and threads --------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """The calling thread's reading connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
        return conn

    def _open(self) -> sqlite3.Connection:
        if not self._checked:
            self._ensure_schema()
        return connect(self._path)

    def _ensure_schema(self) -> None:
        with self._lock:
            if self._checked:
                return
            self._fs.makedirs(self.directory)
            prepare(self._path)
            self._checked = True

    def _writing(self) -> sqlite3.Connection:
        if self._writer_conn is None:
            self._writer_conn = self._open()
        return self._writer_conn

    def _io_call(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return self._threads.io(f, *args)

    def _read_call(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return self._threads.read(f, *args)

    # -- paths --------------------------------------------------------------

    def _tmp_path(self, name: str) -> str:
        return os.path.join(self._tmp, name)

    def large_path(self, queue_id: str) -> str:
        """Where the bytes of a large message ``queue_id`` are kept."""
        return os.path.join(self._large, queue_id + MESSAGE_SUFFIX)

    # -- reading (blocking: tools, tests, and the reader threads) ------------

    def ids(self) -> list[str]:
        """Committed queue ids, oldest first."""
        if not os.path.exists(self._path):
            return []
        return [r[0] for r in self._conn().execute("SELECT id FROM envelope ORDER BY id")]

    def load(self, queue_id: str) -> Envelope:
        """Read the envelope of ``queue_id``; KeyError when it is not queued, EnvelopeFormatError when unreadable."""
        if not valid_queue_id(queue_id) or not os.path.exists(self._path):
            raise KeyError(queue_id)
        row = self._conn().execute("SELECT data FROM envelope WHERE id = ?", (queue_id,)).fetchone()
        if row is None:
            raise KeyError(queue_id)
        return read_envelope(queue_id, row[0])

    def peek(self, queue_id: str) -> QueueSummary:
        """What scheduling needs of ``queue_id``; KeyError when it is not queued."""
        if not valid_queue_id(queue_id) or not os.path.exists(self._path):
            raise KeyError(queue_id)
        row = self._conn().execute(
            "SELECT id, held, due, domains, unreported FROM envelope WHERE id = ?", (queue_id,)
        ).fetchone()
        if row is None:
            raise KeyError(queue_id)
        return schema.summary(row)

    def state_counts(self, now: float) -> tuple[int, int, int, Optional[str]]:
        """Messages due now or in flight, deferred (due later), held, and the oldest queue id: one query."""
        if not os.path.exists(self._path):
            return 0, 0, 0, None
        row = self._conn().execute(
            "SELECT total(held = 0 AND (due IS NULL OR due <= ?)), total(held = 0 AND due > ?),"
            " total(held != 0), min(id) FROM envelope", (now, now)
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2]), row[3]

    def all_summaries(self) -> list[QueueSummary]:
        """Every queued message's summary, oldest first (one query: start-up)."""
        if not os.path.exists(self._path):
            return []
        rows = self._conn().execute("SELECT id, held, due, domains, unreported FROM envelope ORDER BY id")
        return [schema.summary(row) for row in rows]

    def message_bytes(self, queue_id: str) -> Optional[bytes]:
        """The bytes of ``queue_id`` kept in the database, or None for a large message (a file).

        KeyError when it is not queued.
        """
        if not valid_queue_id(queue_id) or not os.path.exists(self._path):
            raise KeyError(queue_id)
        row = self._conn().execute("SELECT data FROM body WHERE id = ?", (queue_id,)).fetchone()
        if row is None:
            raise KeyError(queue_id)
        return row[0]

    def open_message(self, queue_id: str) -> BinaryIO:
        """Open the message bytes of ``queue_id`` for reading; the caller closes."""
        data = self.message_bytes(queue_id)
        if data is not None:
            return io.BytesIO(data)
        try:
            return self._fs.open_read(self.large_path(queue_id))
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    # -- reading for the daemon (off the reactor thread) --------------------

    def read(self, queue_id: str) -> Deferred:
        """``load`` in a reader thread."""
        return self._read_call(self.load, queue_id)

    def summaries(self) -> Deferred:
        """``all_summaries`` in a reader thread."""
        return self._read_call(self.all_summaries)

    def summary(self, queue_id: str) -> Deferred:
        """``peek`` in a reader thread."""
        return self._read_call(self.peek, queue_id)

    def call_reading(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``f(*args)``, which reads with the blocking methods above, in a reader thread."""
        return self._read_call(f, *args)

    def message_opener(self, queue_id: str) -> Deferred:
        """Fires with a function that opens the message's bytes (a memory buffer for
        all but large messages, whose file it opens); KeyError when not queued.

        The bytes of a message just committed come from memory, read once.
        """
        body = self._forget_recent(queue_id)
        if body is not None:
            return defer.succeed(lambda: io.BytesIO(body))
        d = self._read_call(self.message_bytes, queue_id)

        def opener(data: Optional[bytes]) -> Callable[[], BinaryIO]:
            if data is not None:
                return lambda: io.BytesIO(data)
            path = self.large_path(queue_id)

            def open_large() -> BinaryIO:
                try:
                    return self._fs.open_read(path)
                except FileNotFoundError:
                    raise OSError(errno.ENOENT, f"{MISSING_MESSAGE}: {path}") from None
            return open_large
        return d.addCallback(opener)

    # -- writing ------------------------------------------------------------

    def new_message(self) -> IncomingMessage:
        """Start receiving a message under a new queue id."""
        return IncomingMessage(self, new_queue_id(self._get_clock()))

    def _store(self, envelope: Envelope, body: Optional[bytes]) -> Deferred:
        """Queue a new message (its bytes, or None when they are in ``large/`` already)."""
        return self._commits.submit(StoreOperation(self, envelope, body))

    def update(self, envelope: Envelope) -> Deferred:
        """Durably replace the envelope of ``envelope.queue_id``; KeyError when not queued."""
        return self.modify(envelope.queue_id, lambda _current: envelope).addCallback(lambda _: None)

    def modify(self, queue_id: str, change: Callable[[Envelope], Envelope]) -> Deferred:
        """Durably replace an envelope by ``change(current)``, read in the same transaction.

        ``change`` runs in the writer's thread and must be a pure function.
        Fires with the stored envelope; KeyError when the message is not queued.
        """
        if not valid_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        return self._commits.submit(ModifyOperation(queue_id, change), lazy=True)

    def remove(self, queue_id: str) -> Deferred:
        """Durably remove a message; removing one that is not queued succeeds and does nothing."""
        if not valid_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        self._forget_recent(queue_id)
        return self._commits.submit(RemoveOperation(self, queue_id), lazy=True).addCallback(lambda _: None)

    def quarantine(self, queue_id: str, reason: str) -> Deferred:
        """Move an entry whose envelope cannot be read into corrupt/.

        Fires with True when it was moved; False when it was not queued or
        reads well by now (replaced meanwhile).
        """
        if not valid_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        self._forget_recent(queue_id)
        return self._commits.submit(QuarantineOperation(self, queue_id, reason))

    def modify_sync(self, queue_id: str, change: Callable[[Envelope], Envelope]) -> Envelope:
        """``modify`` for tools that run without a reactor (blocking)."""
        if not valid_queue_id(queue_id):
            raise KeyError(queue_id)
        stored = self._transaction(lambda conn: modify_in(conn, queue_id, change))
        log.info("{queue_id}: envelope updated", queue_id=queue_id)
        return stored

    def update_sync(self, envelope: Envelope) -> None:
        """``update`` for tools that run without a reactor (blocking)."""
        self.modify_sync(envelope.queue_id, lambda _current: envelope)

    def remove_sync(self, queue_id: str) -> None:
        """``remove`` for tools that run without a reactor (blocking)."""
        if not valid_queue_id(queue_id):
            raise KeyError(queue_id)
        existed, large = self._transaction(lambda conn: remove_in(conn, queue_id))
        if large:
            ignore_errors(self._fs.unlink, self.large_path(queue_id))
        if existed:
            log.info("{queue_id}: removed", queue_id=queue_id)

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            ignore_errors(conn.execute, "ROLLBACK")
            raise
        return result

    def _get_clock(self) -> IReactorTime:
        """The injected clock, or the injected reactor's."""
        clock = self._clock if self._clock is not None else self._reactor
        if clock is None:
            raise StoreError(f"{self.directory}: this use of the queue store needs a clock (clock= or reactor=)")
        return clock

    def _thread_reactor(self) -> Any:
        """The reactor the store's own threads report to: ``reactor``, or a clock that is one."""
        reactor = self._reactor if self._reactor is not None else self._clock
        if not IReactorFromThreads.providedBy(reactor):
            raise StoreError(f"{self.directory}: the queue store's threads need the reactor (reactor=)")
        return reactor

    # -- start-up recovery --------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Bring the directory to a clean state at start-up (synchronous; the daemon only).

        Creates the directories and the database; deletes everything under
        ``tmp/`` and every large file without a row (never acknowledged);
        imports a queue in the file-per-message format; moves entries it
        cannot use into ``corrupt/`` (``relay.queue.recovery.recover``).
        """
        return recovery.recover(self)

    def insert_sync(self, entries: Iterable[tuple[Envelope, bytes]]) -> int:
        """Store finished entries at once in one transaction, keeping their ids; those
        already queued are left as they are.  Returns how many were new (the import)."""
        def insert(conn: sqlite3.Connection) -> int:
            added = 0
            for envelope, body in entries:
                cursor = conn.execute("INSERT OR IGNORE INTO envelope VALUES (?, ?, ?, ?, ?, ?)",
                                      (envelope.queue_id, *schema.row(envelope)))
                if cursor.rowcount:
                    large = len(body) > self.large_message
                    if large:
                        write_file(self._fs, self.large_path(envelope.queue_id), body)
                    conn.execute("INSERT OR REPLACE INTO body VALUES (?, ?)", (envelope.queue_id, None if large else body))
                    added += 1
            if added:
                self._fs.fsync_dir(self._large)
            return added
        return self._transaction(insert)


class SpoolService(Service):
    """Runs a store with the application: recovery and threads at start, drain at stop."""

    name = "spool"

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.report: Optional[RecoveryReport] = None

    def startService(self) -> None:
        self.report = self.spool.recover()
        self.spool.start()
        Service.startService(self)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return self.spool.stop()


__all__ = ["Spool", "SpoolService", "IncomingMessage", "OsFileSystem", "new_queue_id", "valid_queue_id"]
