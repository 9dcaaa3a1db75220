"""What the store does with a queue directory it cannot take on trust: start-up recovery and quarantine.

At start-up (``recover``, synchronous, before anything else reads the
queue) the store's directories must be real directories owned by the
relay's user; ``tmp/`` is emptied (messages still arriving when the relay
stopped, never acknowledged); a queue in the file-per-message format of
earlier releases is imported (``relay.queue.legacy``); a large file without
a row is deleted (never acknowledged); and an entry whose large file is not
a regular file of ours, or whose due time is no time at all, is moved into
``corrupt/``.

An entry that cannot be used is never deleted: ``QuarantineOperation``
writes its envelope, its bytes and the reason into ``corrupt/`` as files
(``<id>.json``, ``<id>.msg``, ``<id>.reason``, fsynced) in the transaction
that deletes its rows, and moves a large message's file there once that
transaction is durable.  The daemon quarantines through the group commit
(``Spool.quarantine``); recovery runs the same operation in a transaction
of its own.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.envelope import EnvelopeFormatError
from relay.log import Logger
from relay.queue import legacy
from relay.queue.bounds import MAX_TIME, read_envelope
from relay.queue.files import (
    ENVELOPE_SUFFIX,
    MESSAGE_SUFFIX,
    REASON_SUFFIX,
    UnsafeFile,
    check_directory,
    file_problem,
    ignore_errors,
    write_file,
)
from relay.queue.operations import Operation
from relay.queue.schema import StoreError, remove_in

if TYPE_CHECKING:
    from relay.queue.store import Spool

log = Logger(namespace="relay.store")

# Rows whose due time is no time at all (a queue changed behind the relay's back).
BAD_DUE = f"due IS NOT NULL AND (typeof(due) NOT IN ('real', 'integer') OR NOT (due BETWEEN 0 AND {MAX_TIME!r}))"


def checked_directory(path: str) -> None:
    """StoreError unless ``path`` is a real directory owned by the relay's user."""
    try:
        check_directory(path)
    except OSError as e:
        raise StoreError(f"{path}: {e.strerror}; the queue's directories must be the relay's own") from None


@dataclass
class RecoveryReport:
    """What start-up recovery found and did."""

    count: int = 0  # messages queued
    removed_tmp: int = 0  # files under tmp/ deleted
    removed_orphans: int = 0  # large files without a row deleted (never acknowledged)
    imported: int = 0  # entries imported from the file-per-message format
    quarantined: list[str] = field(default_factory=list)  # ids moved to corrupt/ by the import


def recover(spool: "Spool") -> RecoveryReport:
    """Bring the directory of ``spool`` to a clean state at start-up (synchronous; the daemon only).

    Creates the directories and the database; deletes everything under
    ``tmp/`` and every large file without a row (never acknowledged);
    imports a queue in the file-per-message format.
    """
    fs, report = spool._fs, RecoveryReport()
    for path in (spool._tmp, spool._large, spool._corrupt):
        fs.makedirs(path)
        checked_directory(path)
    spool._ensure_schema()
    for name in fs.listdir(spool._tmp):  # unlink never follows a link: only the name goes
        ignore_errors(fs.unlink, spool._tmp_path(name))
        report.removed_tmp += 1
    try:
        legacy.import_queue(spool, report)
    except UnsafeFile as e:
        raise StoreError(f"{e.filename}: {e.strerror}; refusing to import from it") from None
    conn = spool._conn()
    known = {r[0] for r in conn.execute("SELECT id FROM body WHERE data IS NULL")}
    for name in fs.listdir(spool._large):
        stem = name[: -len(MESSAGE_SUFFIX)] if name.endswith(MESSAGE_SUFFIX) else None
        if stem is None or stem not in known:
            ignore_errors(fs.unlink, os.path.join(spool._large, name))
            report.removed_orphans += 1
            log.info("{queue_id}: removed message never acknowledged", queue_id=stem or name)
            continue
        problem = file_problem(os.path.join(spool._large, name))
        if problem:
            quarantine_now(spool, stem, f"message file {problem}", report)
    for queue_id, due in conn.execute(f"SELECT id, due FROM envelope WHERE {BAD_DUE}").fetchall():
        quarantine_now(spool, queue_id, f"next attempt {due!r} out of range", report)
    for path in (spool._tmp, spool._large):
        fs.fsync_dir(path)
    report.count = conn.execute("SELECT count(*) FROM envelope").fetchone()[0]
    log.info(
        "store: {count} queued messages in {directory}"
        " ({tmp} temporary files and {orphans} unacknowledged messages removed, {imported} imported)",
        count=report.count, directory=spool.directory, tmp=report.removed_tmp,
        orphans=report.removed_orphans, imported=report.imported,
    )
    return report


def quarantine_now(spool: "Spool", queue_id: str, reason: str, report: RecoveryReport) -> None:
    """Move an entry to corrupt/ at start-up, however its envelope reads (a bad file or column)."""
    operation = QuarantineOperation(spool, queue_id, reason, force=True)
    if spool._transaction(operation.run):
        operation.committed()
        report.quarantined.append(queue_id)


class QuarantineOperation(Operation):
    """Move an entry whose envelope (or, with ``force``, its file or columns) is bad into corrupt/."""

    action = "quarantine"
    urgent = True

    def __init__(self, spool: "Spool", queue_id: str, reason: str, force: bool = False) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.reason = reason
        self.force = force  # move it even when the envelope reads well (its file or columns are bad)
        self.moved = False
        self.large = False
        self.base = ""

    def run(self, conn: sqlite3.Connection) -> bool:
        row = conn.execute("SELECT data FROM envelope WHERE id = ?", (self.queue_id,)).fetchone()
        if row is None:
            return False
        if not self.force:
            try:
                read_envelope(self.queue_id, row[0])
                return False  # reads well by now
            except EnvelopeFormatError:
                pass
        self.base = write_corrupt(self.spool, conn, self.queue_id, row[0], self.reason)
        _, self.large = remove_in(conn, self.queue_id)
        self.moved = True
        return True

    def committed(self) -> None:
        """The rows are gone: now the large file, if any, joins the entry in corrupt/."""
        if self.moved and self.large:
            fs = self.spool._fs
            ignore_errors(fs.rename, self.spool.large_path(self.queue_id), self.base + MESSAGE_SUFFIX)
            ignore_errors(fs.fsync_dir, self.spool._corrupt)

    def undo(self) -> None:
        """The rows stay queued: take back the copy written into corrupt/."""
        if self.moved:
            for suffix in (MESSAGE_SUFFIX, ENVELOPE_SUFFIX, REASON_SUFFIX):
                ignore_errors(self.spool._fs.unlink, self.base + suffix)


def write_corrupt(spool: "Spool", conn: sqlite3.Connection, queue_id: str, envelope: bytes, reason: str) -> str:
    """Write an unreadable entry into corrupt/ as files (fsynced); returns the base path.

    A large message's file is moved there by the caller once the rows are gone.
    """
    fs = spool._fs
    fs.makedirs(spool._corrupt)
    base = free_corrupt_name(spool, queue_id)
    row = conn.execute("SELECT data FROM body WHERE id = ?", (queue_id,)).fetchone()
    if row is not None and row[0] is not None:
        write_file(fs, base + MESSAGE_SUFFIX, row[0])
    write_file(fs, base + ENVELOPE_SUFFIX, envelope)
    write_file(fs, base + REASON_SUFFIX, (reason + "\n").encode("utf-8"))
    fs.fsync_dir(spool._corrupt)
    log.error("{queue_id}: quarantined in {path}: {reason}", queue_id=queue_id,
              path=base + ENVELOPE_SUFFIX, reason=reason)
    return base


def free_corrupt_name(spool: "Spool", queue_id: str) -> str:
    """A base path in corrupt/ that no entry uses yet: the queue id, then ``<id>-1``, ``<id>-2``..."""
    taken = set(spool._fs.listdir(spool._corrupt))
    name, n = queue_id, 0
    while any(name + s in taken for s in (MESSAGE_SUFFIX, ENVELOPE_SUFFIX, REASON_SUFFIX)):
        n += 1
        name = f"{queue_id}-{n}"
    return os.path.join(spool._corrupt, name)
