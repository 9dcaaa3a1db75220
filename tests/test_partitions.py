"""Tests for relay.queue.partitions: the parts of a queue directory and the move of surplus parts."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import Clock

from deferreds import success
from relay.envelope import Envelope, Recipient
from relay.queue.partitions import merge_surplus, part_directories, part_directory, part_indexes
from relay.queue.store import Spool



def sync_runner(f, *args):
    return defer.maybeDeferred(f, *args)


def store(directory: str, n: int, large: bool = False) -> str:
    """Queue one message in the store at ``directory``; its queue id."""
    spool = Spool(directory, clock=Clock(), runner=sync_runner, large_message=1000)
    spool.recover()
    message = spool.new_message()
    message.write(b"Subject: %d\r\n\r\n" % n + (b"x" * 2000 if large else b"body") + b"\r\n")
    queue_id = message.queue_id
    success(message.commit(Envelope(queue_id=queue_id, sender="s@a.test",
                                               recipients=(Recipient(f"u{n}@b.test"),))))
    spool.close()
    return queue_id


def contents(directory: str) -> dict[str, bytes]:
    spool = Spool(directory)
    out = {}
    for queue_id in spool.ids():
        with spool.open_message(queue_id) as f:
            out[queue_id] = f.read()
    spool.close()
    return out


def test_part_zero_is_the_directory_and_others_are_worker_subdirectories(tmp_path: Path) -> None:
    """Part 0 is the queue directory itself; part i is worker-i; only existing parts are listed."""
    base = str(tmp_path)
    assert part_directory(base, 0) == base
    assert part_directory(base, 3) == str(tmp_path / "worker-3")
    (tmp_path / "worker-2").mkdir()
    (tmp_path / "worker-1").mkdir()
    (tmp_path / "worker-x").mkdir()
    (tmp_path / "worker-07").mkdir()
    assert part_indexes(base) == [0, 1, 2]
    assert part_directories(base) == [base, str(tmp_path / "worker-1"), str(tmp_path / "worker-2")]


def test_surplus_parts_move_into_the_remaining_ones(tmp_path: Path) -> None:
    """With fewer workers, the mail of parts without a worker moves into part i % workers, bytes intact."""
    base = str(tmp_path)
    ids = {i: [store(part_directory(base, i), 10 * i + k, large=(k == 1)) for k in range(3)] for i in range(3)}
    before = {i: contents(part_directory(base, i)) for i in range(3)}
    assert merge_surplus(base, 2) == 3
    assert part_indexes(base) == [0, 1]
    after0 = contents(part_directory(base, 0))
    assert set(after0) == set(ids[0]) | set(ids[2])
    assert all(after0[q] == before[2][q] for q in ids[2])
    assert contents(part_directory(base, 1)) == before[1]
    assert merge_surplus(base, 1) == 3
    assert part_indexes(base) == [0] and len(contents(base)) == 9


def test_a_merge_interrupted_after_the_copy_duplicates_nothing(tmp_path: Path) -> None:
    """Messages already copied into the target (a crash before their removal) are not stored twice."""
    base = str(tmp_path)
    source_dir = part_directory(base, 1)
    moved = [store(source_dir, k) for k in range(4)]
    source, target = Spool(source_dir), Spool(base, runner=sync_runner)
    target.recover()
    entries = []
    for queue_id in moved[:2]:
        with source.open_message(queue_id) as f:
            entries.append((source.load(queue_id), f.read()))
    assert target.insert_sync(entries) == 2  # the first batch was copied, then the process died
    source.close()
    target.close()
    assert merge_surplus(base, 1) == 4
    assert sorted(contents(base)) == sorted(moved)
    assert part_indexes(base) == [0]
