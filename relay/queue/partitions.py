"""The parts of one queue directory, one per worker process.

With ``[server] workers = N`` each worker owns one part of the queue and
runs the whole pipeline on it alone, so workers share nothing on the way
of a message.  Part 0 is the queue directory itself (so one worker, the
default, uses the layout of a single relay); part ``i`` of the others is
``<directory>/worker-<i>``, a complete store of its own (``queue.db``,
``large/``, ``corrupt/``, ``control.sock``).  Tools see the whole queue by
reading every part (``part_directories``).

When the number of workers shrinks, the master moves the mail of every
part without a worker into part ``i % N`` before any worker starts
(``merge_surplus``): each batch is inserted into the destination in one
transaction that leaves alone ids already there, and only then removed
from the source, so a crash at any point loses and duplicates nothing.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Optional

from relay.log import Logger

log = Logger(namespace="relay.store")

PART_PREFIX = "worker-"
_PART = re.compile(r"worker-([1-9][0-9]{0,3})")
MERGE_BATCH = 200


def part_directory(directory: str, index: int) -> str:
    """The store directory of part ``index`` of the queue in ``directory``."""
    return directory if index == 0 else os.path.join(directory, f"{PART_PREFIX}{index}")


def part_indexes(directory: str) -> list[int]:
    """The parts that exist in ``directory``, 0 first (0 always, the directory itself)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return [0]
    found = sorted(int(m.group(1)) for m in map(_PART.fullmatch, names) if m is not None)
    return [0] + [i for i in found if os.path.isdir(part_directory(directory, i))]


def part_directories(directory: str) -> list[str]:
    """The store directories of every part of the queue in ``directory``, part 0 first."""
    return [part_directory(directory, i) for i in part_indexes(directory)]


def merge_surplus(directory: str, workers: int, spool_factory: Optional[Any] = None) -> int:
    """Move the mail of every part numbered ``workers`` or more into part ``index % workers``.

    Runs before any worker starts (blocking).  Returns how many messages moved.
    """
    from relay.queue.store import CORRUPT_DIR, Spool

    make = spool_factory or (lambda d: Spool(d))
    moved = 0
    for index in part_indexes(directory):
        if index < workers:
            continue
        source_dir = part_directory(directory, index)
        target_dir = part_directory(directory, index % workers)
        source, target = make(source_dir), make(target_dir)
        source.recover()
        target.recover()
        ids = source.ids()
        for start in range(0, len(ids), MERGE_BATCH):
            batch = []
            for queue_id in ids[start:start + MERGE_BATCH]:
                with source.open_message(queue_id) as f:
                    batch.append((source.load(queue_id), f.read()))
            target.insert_sync(batch)
            for envelope, _ in batch:
                source.remove_sync(envelope.queue_id)
            moved += len(batch)
        corrupt = os.path.join(source_dir, CORRUPT_DIR)
        if os.path.isdir(corrupt):
            os.makedirs(os.path.join(target_dir, CORRUPT_DIR), exist_ok=True)
            for name in os.listdir(corrupt):
                destination = os.path.join(target_dir, CORRUPT_DIR, f"{PART_PREFIX}{index}-{name}")
                os.rename(os.path.join(corrupt, name), destination)
        source.close()
        target.close()
        shutil.rmtree(source_dir)
        log.info("store: {count} message(s) of {source} moved into {target}", count=len(ids),
                 source=source_dir, target=target_dir)
    return moved
