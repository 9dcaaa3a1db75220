"""Import of a queue directory in the file-per-message format of earlier releases.

Before the SQLite store, every message was a pair of files under
``queue/``: ``<id>.msg`` (its bytes) and ``<id>.json`` (its envelope, whose
rename there was the commit point).  ``import_queue`` runs at start-up,
before anything else reads the queue, and moves every such entry into the
store under its own queue id:

* a batch of entries is inserted in one transaction (``Spool.insert_sync``,
  which leaves alone an id already stored), and only after that commit are
  its files unlinked, envelope first: a crash at any point leaves each
  message in the files, in the store, or in both, and the next start
  finishes the job without a duplicate;
* an envelope without its message, or one that cannot be read, is moved
  into ``corrupt/`` with a ``.reason`` file, as before; so is an entry
  whose files are not regular files owned by the relay's user (a symbolic
  link, a FIFO, a directory) or whose envelope is outside the bounds of
  ``relay.queue.bounds``: files are opened without following links or
  blocking, and a ``queue/`` that is itself a link is refused;
* a ``.msg`` without an envelope was never acknowledged and is deleted.

When nothing is left, ``queue/`` is removed.
"""

from __future__ import annotations

import os
from typing import Any

from relay.log import Logger

from relay.envelope import Envelope, EnvelopeFormatError
from relay.queue.bounds import MAX_ENVELOPE, read_envelope
from relay.queue.ids import valid_queue_id

log = Logger(namespace="relay.store")

LEGACY_DIR = "queue"
BATCH_MESSAGES = 500
BATCH_BYTES = 64 * 1024 * 1024


def import_queue(spool: Any, report: Any) -> None:
    """Move every entry of ``<directory>/queue/`` into ``spool``; counts go into ``report``."""
    from relay.queue.files import ENVELOPE_SUFFIX, MESSAGE_SUFFIX, check_directory, describe
    from relay.queue.store import MISSING_MESSAGE

    fs = spool._fs
    directory = os.path.join(spool.directory, LEGACY_DIR)
    if not os.path.lexists(directory):
        return
    check_directory(directory)  # a link to another directory: never read or delete there
    names = set(fs.listdir(directory))
    ids = sorted(n[: -len(ENVELOPE_SUFFIX)] for n in names
                 if n.endswith(ENVELOPE_SUFFIX) and valid_queue_id(n[: -len(ENVELOPE_SUFFIX)]))
    batch: list[tuple[Envelope, bytes]] = []
    size = 0

    def path(queue_id: str, suffix: str) -> str:
        return os.path.join(directory, queue_id + suffix)

    def flush() -> None:
        nonlocal batch, size
        if not batch:
            return
        report.imported += spool.insert_sync(batch)
        for envelope, _ in batch:
            for suffix in (ENVELOPE_SUFFIX, MESSAGE_SUFFIX):
                try:
                    fs.unlink(path(envelope.queue_id, suffix))
                except FileNotFoundError:
                    pass
        batch, size = [], 0

    for queue_id in ids:
        reason = None
        if queue_id + MESSAGE_SUFFIX not in names:
            reason = MISSING_MESSAGE
        else:
            try:
                envelope = read_envelope(queue_id, fs.read_file(path(queue_id, ENVELOPE_SUFFIX), MAX_ENVELOPE))
                body = fs.read_file(path(queue_id, MESSAGE_SUFFIX))
            except (OSError, EnvelopeFormatError) as e:
                reason = describe(e)
        if reason is not None:
            _quarantine(spool, directory, queue_id, reason)
            report.quarantined.append(queue_id)
            continue
        batch.append((envelope, body))
        size += len(body)
        if len(batch) >= BATCH_MESSAGES or size >= BATCH_BYTES:
            flush()
    flush()
    for name in fs.listdir(directory):
        stem, _, suffix = name.partition(".")
        if "." + suffix == MESSAGE_SUFFIX and valid_queue_id(stem):
            fs.unlink(os.path.join(directory, name))
            report.removed_orphans += 1
            log.info("{queue_id}: removed message never acknowledged", queue_id=stem)
    fs.fsync_dir(directory)
    if report.quarantined:
        fs.fsync_dir(spool._corrupt)
    left = fs.listdir(directory)
    if left:
        log.warn("store: {count} unexpected files left in {directory}", count=len(left), directory=directory)
    else:
        os.rmdir(directory)
    if report.imported:
        log.info("store: imported {count} queued messages from {directory}", count=report.imported, directory=directory)


def _quarantine(spool: Any, directory: str, queue_id: str, reason: str) -> None:
    """Move an unreadable file-format entry into corrupt/: the message first, as before."""
    from relay.queue.files import ENVELOPE_SUFFIX, MESSAGE_SUFFIX, REASON_SUFFIX, write_file
    from relay.queue.recovery import free_corrupt_name

    fs = spool._fs
    base = free_corrupt_name(spool, queue_id)
    for suffix in (MESSAGE_SUFFIX, ENVELOPE_SUFFIX):
        try:
            fs.rename(os.path.join(directory, queue_id + suffix), base + suffix)
        except FileNotFoundError:
            pass
    write_file(fs, base + REASON_SUFFIX, (reason + "\n").encode("utf-8"))
    log.error("{queue_id}: quarantined in {path}: {reason}", queue_id=queue_id, path=base + ENVELOPE_SUFFIX, reason=reason)
