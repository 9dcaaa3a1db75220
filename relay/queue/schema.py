"""The queue store's database format: its tables, their columns, and the SQL of one message's rows.

``queue.db`` holds one row per message in ``envelope`` (the versioned
envelope JSON beside the columns scheduling needs, ``QueueSummary``) and in
``body`` (the message bytes, NULL for a large message kept in a file).  The
database's ``user_version`` is the format (``STORE_VERSION``); ``prepare``
creates the tables in a new database and refuses one it cannot use.
``connect`` opens it in WAL mode with synchronous=FULL, so a commit is
durable once it returns.  ``modify_in`` and ``remove_in`` change one
message inside a transaction the caller holds; ``relay.queue.store`` owns
the transactions.
"""

from __future__ import annotations

import sqlite3
from typing import Callable, NamedTuple, Optional

from relay.envelope import Envelope
from relay.queue.bounds import read_envelope

STORE_VERSION = 1
BUSY_TIMEOUT = 30.0  # seconds a connection waits for another process's write lock
# 16 KiB pages: a 100 KiB message is 7 pages written to the WAL (and checkpointed) instead
# of 26 at SQLite's default 4 KiB; measured 0.64 -> 0.40 ms of store CPU per 100 KiB message,
# 0.13 -> 0.16 ms per 4 KiB one.
PAGE_SIZE = 16384

_SCHEMA = """
CREATE TABLE IF NOT EXISTS envelope (
    id TEXT PRIMARY KEY,
    held INTEGER NOT NULL,
    due REAL,
    domains TEXT NOT NULL,
    unreported INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS body (
    id TEXT PRIMARY KEY,
    data BLOB
);
"""


_SHAPE_CHECKS = (
    "SELECT id, held, due, domains, unreported, data FROM envelope LIMIT 0",
    "SELECT id, data FROM body LIMIT 0",
)


class StoreError(Exception):
    """The queue store cannot be used (not a database, a newer format...); ``str()`` names the file."""


class QueueSummary(NamedTuple):
    """What scheduling needs to know of a queued message, kept in columns beside its envelope."""

    queue_id: str
    held: bool
    due: Optional[float]  # the earliest next attempt of a pending recipient; None: at once
    domains: tuple[str, ...]  # the domain of each pending recipient, as stored
    unreported: int = 0  # recipients owed a notification not spooled yet (Recipient.awaiting_report)

    @classmethod
    def of(cls, envelope: Envelope) -> "QueueSummary":
        pending = envelope.pending()
        times = [r.next_attempt for r in pending]
        due = None if not times or None in times else min(times)  # type: ignore[type-var]
        return cls(
            queue_id=envelope.queue_id,
            held=envelope.held,
            due=due,
            domains=tuple(r.domain for r in pending),
            unreported=sum(1 for r in envelope.recipients if r.awaiting_report),
        )


def connect(path: str) -> sqlite3.Connection:
    """A connection to the store at ``path`` in WAL mode with synchronous=FULL (autocommit)."""
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect when the database is created
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot open the queue store: {e}") from None
    return conn


def prepare(path: str) -> None:
    """Create the tables of a new store at ``path``; StoreError when the file there is not one this relay can use."""
    conn = connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > STORE_VERSION:
            raise StoreError(
                f"{path}: queue store format {version} is newer than this relay reads ({STORE_VERSION})"
            )
        if version < STORE_VERSION:
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {STORE_VERSION}; COMMIT;")
        for query in _SHAPE_CHECKS:  # tables dropped or changed behind our back
            conn.execute(query).fetchall()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: not a usable queue store: {e}") from None
    finally:
        conn.close()


def row(envelope: Envelope) -> tuple:
    """The ``envelope`` row's columns after its id: held, due, domains, unreported, data."""
    summary = QueueSummary.of(envelope)
    domains = "".join("\n" + d for d in summary.domains)  # each after a newline: "" is no domain, "\n" one empty
    return (int(summary.held), summary.due, domains, summary.unreported, envelope.to_json())


def summary(columns: tuple) -> QueueSummary:
    """The summary read back from the columns id, held, due, domains, unreported."""
    queue_id, held, due, domains, unreported = columns
    return QueueSummary(queue_id, bool(held), due, tuple(domains.split("\n")[1:]), unreported)


def modify_in(conn: sqlite3.Connection, queue_id: str, change: Callable[[Envelope], Envelope]) -> Envelope:
    """Replace the envelope of ``queue_id`` by ``change(current)`` in the open transaction."""
    found = conn.execute("SELECT data FROM envelope WHERE id = ?", (queue_id,)).fetchone()
    if found is None:
        raise KeyError(queue_id)
    new = change(read_envelope(queue_id, found[0]))
    if new.queue_id != queue_id:
        raise ValueError(f"envelope is for {new.queue_id!r}, not {queue_id!r}")
    conn.execute(
        "UPDATE envelope SET held = ?, due = ?, domains = ?, unreported = ?, data = ? WHERE id = ?",
        (*row(new), queue_id),
    )
    return new


def remove_in(conn: sqlite3.Connection, queue_id: str) -> tuple[bool, bool]:
    """Delete the rows of ``queue_id``: (whether it was queued, whether its bytes are a large file)."""
    body = conn.execute("SELECT data IS NULL FROM body WHERE id = ?", (queue_id,)).fetchone()
    existed = conn.execute("DELETE FROM envelope WHERE id = ?", (queue_id,)).rowcount > 0
    conn.execute("DELETE FROM body WHERE id = ?", (queue_id,))
    return existed, bool(body and body[0])
