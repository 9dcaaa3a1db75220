"""Tests for relay.queue.spool: durability order, crash recovery, group commit, locking."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relay.envelope import (
    DELIVERED,
    PENDING,
    Attempt,
    ClientInfo,
    Envelope,
    Recipient,
)
from relay.queue import spool as spool_module
from relay.queue.spool import (
    QUEUE_ID_LENGTH,
    WRITE_BUFFER,
    OsFileSystem,
    Spool,
    SpoolService,
    new_queue_id,
)

FIXTURES = Path(__file__).parent / "fixtures"

MESSAGE = (
    b"Received: from client.example (127.0.0.1)\r\n"
    b"From: =?utf-8?q?J=C3=B6rg?= <j\xc3\xb6rg@ex\xc3\xa4mple.test>\r\n"
    b"Subject: bytes\r\n\r\n"
    b"8-bit \xff\xfe\x80 and NUL \x00\x00 and a lone \r and \n kept as given\r\n"
)


def sync_runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """Run the spool's disk work at once, on the calling thread."""
    return defer.maybeDeferred(f, *args)


class ManualRunner:
    """Holds each batch until the test runs it, like a thread that has not finished."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple, defer.Deferred]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self, index: int) -> None:
        f, args, d = self.calls[index]
        d.callback(f(*args))


class Crash(Exception):
    """The process died at this filesystem call."""


class RecordingFS(OsFileSystem):
    """The real filesystem, recording each call; from call number ``crash_at`` on, every call fails."""

    MUTATING = {"open", "write", "fsync", "close", "rename", "unlink", "fsync_dir", "lock"}

    def __init__(self, crash_at: Optional[int] = None, events: Optional[list] = None) -> None:
        self.crash_at = crash_at
        self.events: list = events if events is not None else []
        self.count = 0
        self.crashed = False
        self.paths: dict[int, str] = {}

    def _step(self, name: str, *detail: Any) -> None:
        if name in self.MUTATING:
            if self.crashed or (self.crash_at is not None and self.count >= self.crash_at):
                self.crashed = True
                raise Crash(name)
            self.count += 1
        self.events.append((name, *detail))

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        self._step("open", path)
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        return fd

    def write(self, fd: int, data: bytes) -> int:
        self._step("write", self.paths.get(fd))
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._step("fsync", self.paths.get(fd))
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self._step("close", self.paths.get(fd))
        super().close(fd)

    def rename(self, src: str, dst: str) -> None:
        self._step("rename", src, dst)
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self._step("unlink", path)
        super().unlink(path)

    def fsync_dir(self, path: str) -> None:
        self._step("fsync_dir", path)
        super().fsync_dir(path)

    def lock(self, fd: int) -> None:
        self._step("lock", self.paths.get(fd))
        super().lock(fd)


class FailingFS(OsFileSystem):
    """The real filesystem, except that one call fails with ENOSPC."""

    def __init__(self, failing: str) -> None:
        self.failing = failing

    def _maybe_fail(self, name: str) -> None:
        if name == self.failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, fd: int, data: bytes) -> int:
        self._maybe_fail("write")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        super().fsync(fd)

    def fsync_dir(self, path: str) -> None:
        self._maybe_fail("fsync_dir")
        super().fsync_dir(path)


def make_envelope(queue_id: str, **changes: Any) -> Envelope:
    envelope = Envelope(
        queue_id=queue_id,
        sender="jörg@exämple.test",
        recipients=(
            Recipient(address="alice@example.org", params=(("NOTIFY", "FAILURE"),)),
            Recipient(address="bøb@exämple.net", source_route=("hop.example",)),
        ),
        client=ClientInfo(address="127.0.0.1", port=40000, helo="client.example", trusted=True),
        arrival=1700000000.5,
        body="8BITMIME",
        smtputf8=True,
    )
    return replace(envelope, **changes)


def store(spool: Spool, data: bytes = MESSAGE, chunk: int = 7, **changes: Any) -> defer.Deferred:
    """Receive ``data`` in chunks and commit it; returns the commit Deferred."""
    message = spool.new_message()
    for i in range(0, len(data), chunk):
        message.write(data[i : i + chunk])
    return message.commit(make_envelope(message.queue_id, **changes))


def listing(directory: Path, sub: str) -> list[str]:
    return sorted(os.listdir(directory / sub))


class SpoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        base = tempfile.mkdtemp(prefix="relay-spool-test-")
        self.addCleanup(shutil.rmtree, base, True)
        self.root = Path(base) / "spool"
        self.clock = Clock()
        self.clock.advance(1700000000)

    def spool(self, **kwargs: Any) -> Spool:
        kwargs.setdefault("runner", sync_runner)
        kwargs.setdefault("clock", self.clock)
        return Spool(str(self.root), **kwargs)

    def fresh_recovered(self) -> tuple[Spool, Any]:
        spool = self.spool()
        return spool, spool.recover()

    def assert_complete(self, spool: Spool, queue_id: str, data: bytes = MESSAGE) -> Envelope:
        envelope = spool.load(queue_id)
        with spool.open_message(queue_id) as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(envelope.size, len(data))
        return envelope


class RoundTripTests(SpoolTestCase):
    def test_bytes_and_envelope_round_trip_exactly(self) -> None:
        """Stored bytes (8-bit, NUL, bare CR/LF) and the UTF-8 envelope read back unchanged."""
        spool = self.spool()
        spool.recover()
        data = MESSAGE + bytes(range(256)) * (3 * WRITE_BUFFER // 256)  # crosses the write buffer
        queue_id = self.successResultOf(store(spool, data, chunk=1000))
        self.assertEqual(spool.ids(), [queue_id])
        envelope = self.assert_complete(spool, queue_id, data)
        self.assertEqual(envelope, make_envelope(queue_id, size=len(data)))
        self.assertEqual(envelope.sender, "jörg@exämple.test")
        self.assertTrue(spool.message_path(queue_id).endswith(queue_id + ".msg"))

    def test_committed_message_survives_a_restart(self) -> None:
        """A fresh spool on the same directory recovers and loads what was committed."""
        spool = self.spool()
        spool.recover()
        queue_id = self.successResultOf(store(spool))
        again, report = self.fresh_recovered()
        self.assertEqual(report.ids, [queue_id])
        self.assert_complete(again, queue_id)

    def test_size_counts_octets_written(self) -> None:
        """IncomingMessage.size counts every octet written so far."""
        spool = self.spool()
        spool.recover()
        message = spool.new_message()
        message.write(b"abc")
        message.write(b"\x00\xff")
        self.assertEqual(message.size, 5)
        message.abort()

    def test_load_unknown_or_unsafe_id_is_key_error(self) -> None:
        """load and open_message raise KeyError for ids not queued or not safe as file names."""
        spool = self.spool()
        spool.recover()
        for bad in ("0000000000000000", "../queue/x", "", "a/b"):
            self.assertRaises(KeyError, spool.load, bad)
            self.assertRaises(KeyError, spool.open_message, bad)

    def test_commit_rejects_an_envelope_for_another_id(self) -> None:
        """An envelope naming another queue id is refused and nothing is left behind."""
        spool = self.spool()
        spool.recover()
        message = spool.new_message()
        message.write(MESSAGE)
        self.failureResultOf(message.commit(make_envelope("other")), ValueError)
        self.assertEqual(spool.ids(), [])
        self.assertEqual(listing(self.root, "tmp"), [])

    def test_abort_removes_temp_file_and_is_idempotent(self) -> None:
        """abort deletes the file being written, may be repeated, and ends writing."""
        spool = self.spool()
        spool.recover()
        message = spool.new_message()
        message.write(MESSAGE)
        self.assertEqual(len(listing(self.root, "tmp")), 1)
        message.abort()
        message.abort()
        self.assertEqual(listing(self.root, "tmp"), [])
        self.assertRaises(ValueError, message.write, b"more")
        self.failureResultOf(message.commit(make_envelope(message.queue_id)), ValueError)
        self.assertEqual(spool.ids(), [])


class OrderTests(SpoolTestCase):
    def test_commit_fsyncs_each_file_before_rename_and_envelope_last(self) -> None:
        """Commit: message fsync, envelope fsync, message rename, envelope rename, dir fsync, then fire."""
        events: list = []
        spool = self.spool(fs=RecordingFS(events=events))
        spool.recover()
        del events[:]
        d = store(spool)

        def fired(queue_id: str) -> str:
            events.append(("fired", queue_id))
            return queue_id

        queue_id = self.successResultOf(d.addCallback(fired))
        q = str(self.root / "queue")
        tmp_msg = str(self.root / "tmp" / (queue_id + ".msg"))
        tmp_env = str(self.root / "tmp" / (queue_id + ".json"))
        order = [
            ("fsync", tmp_msg),
            ("fsync", tmp_env),
            ("rename", tmp_msg, os.path.join(q, queue_id + ".msg")),
            ("rename", tmp_env, os.path.join(q, queue_id + ".json")),
            ("fsync_dir", q),
            ("fired", queue_id),
        ]
        positions = [events.index(e) for e in order]
        self.assertEqual(positions, sorted(positions))
        last_env_write = max(i for i, e in enumerate(events) if e == ("write", tmp_env))
        self.assertLess(last_env_write, events.index(("fsync", tmp_env)))

    def test_update_writes_temp_fsyncs_then_renames_under_lock(self) -> None:
        """Update: lock the envelope, write and fsync a temp file, rename it over, fsync queue/."""
        events: list = []
        spool = self.spool(fs=RecordingFS(events=events))
        spool.recover()
        queue_id = self.successResultOf(store(spool))
        del events[:]
        self.successResultOf(spool.update(make_envelope(queue_id, held=True)))
        env = str(self.root / "queue" / (queue_id + ".json"))
        new = str(self.root / "tmp" / (queue_id + ".json.new"))
        order = [("lock", env), ("fsync", new), ("rename", new, env), ("fsync_dir", str(self.root / "queue"))]
        positions = [events.index(e) for e in order]
        self.assertEqual(positions, sorted(positions))
        self.assertTrue(spool.load(queue_id).held)

    def test_remove_unlinks_envelope_before_message(self) -> None:
        """Remove unlinks the envelope first, then the message, then fsyncs queue/."""
        events: list = []
        spool = self.spool(fs=RecordingFS(events=events))
        spool.recover()
        queue_id = self.successResultOf(store(spool))
        del events[:]
        self.successResultOf(spool.remove(queue_id))
        q = self.root / "queue"
        order = [
            ("unlink", str(q / (queue_id + ".json"))),
            ("unlink", str(q / (queue_id + ".msg"))),
            ("fsync_dir", str(q)),
        ]
        positions = [events.index(e) for e in order]
        self.assertEqual(positions, sorted(positions))
        self.assertEqual(spool.ids(), [])
        self.assertEqual(listing(self.root, "queue"), [])

    def test_remove_of_missing_message_succeeds(self) -> None:
        """Removing an id that is not queued does nothing and succeeds."""
        spool = self.spool()
        spool.recover()
        self.assertIsNone(self.successResultOf(spool.remove("0000000000000000")))
        spool.remove_sync("0000000000000000")


class CrashTests(SpoolTestCase):
    """A crash (every filesystem call failing from step k on) at every step, then recovery."""

    def crash_everywhere(self, prepare: Callable[[], Any], act: Callable[[Spool, Any], defer.Deferred],
                         check: Callable[[Spool, Any, bool], None], data: bytes = MESSAGE) -> int:
        steps = 0
        for crash_at in range(200):
            shutil.rmtree(self.root, ignore_errors=True)
            state = prepare()
            fs = RecordingFS(crash_at=crash_at)
            d = act(self.spool(fs=fs), state)
            results: list = []
            d.addBoth(results.append)
            self.assertEqual(len(results), 1)
            acknowledged = not isinstance(results[0], defer.Failure)
            recovered, report = self.fresh_recovered()
            self.assertEqual(listing(self.root, "tmp"), [])
            for queue_id in report.ids:
                self.assert_complete(recovered, queue_id, data)
            self.assertEqual(report.quarantined, [])
            check(recovered, state, acknowledged)
            if not fs.crashed:
                return steps
            steps += 1
        self.fail("the operation never completed")

    def test_crash_at_every_step_of_commit(self) -> None:
        """No crash during commit leaves a partial entry; an acknowledged one is always complete."""
        outcomes = set()

        def act(spool: Spool, _: Any) -> defer.Deferred:
            return store(spool, MESSAGE * 5000, chunk=4096)

        def check(spool: Spool, _: Any, acknowledged: bool) -> None:
            ids = spool.ids()
            if acknowledged:
                self.assertEqual(len(ids), 1)
            for queue_id in ids:
                self.assert_complete(spool, queue_id, MESSAGE * 5000)
            self.assertEqual(len(listing(self.root, "queue")), 2 * len(ids))
            outcomes.add((acknowledged, len(ids)))

        steps = self.crash_everywhere(lambda: self.spool().recover(), act, check, MESSAGE * 5000)
        self.assertGreater(steps, 8)
        # Crashed before the commit point, crashed between it and the dir fsync, done.
        self.assertEqual(outcomes, {(False, 0), (False, 1), (True, 1)})

    def test_crash_at_every_step_of_update(self) -> None:
        """A crash during update leaves the old or the new envelope, never a torn one, and the message."""
        def prepare() -> str:
            spool = self.spool()
            spool.recover()
            return self.successResultOf(store(spool))

        def act(spool: Spool, queue_id: str) -> defer.Deferred:
            return spool.update(self.updated(queue_id))

        def check(spool: Spool, queue_id: str, acknowledged: bool) -> None:
            self.assertEqual(spool.ids(), [queue_id])
            envelope = self.assert_complete(spool, queue_id)
            self.assertIn(envelope, (make_envelope(queue_id, size=len(MESSAGE)), self.updated(queue_id)))
            if acknowledged:
                self.assertEqual(envelope, self.updated(queue_id))

        self.assertGreater(self.crash_everywhere(prepare, act, check), 5)

    def updated(self, queue_id: str) -> Envelope:
        envelope = make_envelope(queue_id, size=len(MESSAGE))
        attempt = Attempt(time=1700000100.0, outcome="delivered", reply="250 2.0.0 ok", host="mx.example")
        return envelope.with_recipients(
            [replace(envelope.recipients[0], status=DELIVERED, attempts=1, history=(attempt,))]
        )

    def test_crash_at_every_step_of_remove(self) -> None:
        """A crash during remove leaves the whole entry or nothing, never an envelope without its message."""
        def prepare() -> str:
            spool = self.spool()
            spool.recover()
            return self.successResultOf(store(spool))

        def check(spool: Spool, queue_id: str, acknowledged: bool) -> None:
            if acknowledged or queue_id not in spool.ids():
                self.assertEqual(spool.ids(), [])
                self.assertEqual(listing(self.root, "queue"), [])

        self.assertGreater(self.crash_everywhere(prepare, lambda s, q: s.remove(q), check), 3)


class RecoveryTests(SpoolTestCase):
    def test_recover_creates_directories(self) -> None:
        """recover on a missing directory creates tmp/, queue/ and corrupt/ and finds nothing."""
        spool, report = self.fresh_recovered()
        self.assertEqual(report.ids, [])
        self.assertEqual(sorted(os.listdir(self.root)), ["corrupt", "queue", "tmp"])
        self.assertEqual(spool.ids(), [])

    def test_recover_removes_tmp_leftovers_and_unacknowledged_messages(self) -> None:
        """Files under tmp/ and .msg files without an envelope are deleted; good entries stay."""
        spool, _ = self.fresh_recovered()
        good = self.successResultOf(store(spool))
        unfinished = spool.new_message()
        unfinished.write(b"half a message")
        (self.root / "tmp" / "0000000000000001.json.new").write_bytes(b"{")
        (self.root / "queue" / "0000000000000002.msg").write_bytes(b"never acknowledged")
        (self.root / "queue" / "README.txt").write_bytes(b"not ours")
        spool, report = self.fresh_recovered()
        self.assertEqual(report.ids, [good])
        self.assertEqual(report.removed_tmp, 2)
        self.assertEqual(report.removed_orphans, 1)
        self.assertEqual(report.ignored, ["README.txt"])
        self.assertEqual(listing(self.root, "tmp"), [])
        self.assertEqual(listing(self.root, "queue"), sorted([good + ".json", good + ".msg", "README.txt"]))

    def test_unreadable_envelopes_are_moved_to_corrupt_not_deleted(self) -> None:
        """Garbage, a wrong version, truncated JSON, a wrong id and a missing message go to corrupt/ with a reason."""
        spool, _ = self.fresh_recovered()
        good = self.successResultOf(store(spool))
        bad = {
            "B000000000000001": b"\x00\xff not json at all",
            "B000000000000002": make_envelope("B000000000000002", version=99).to_json(),
            "B000000000000003": make_envelope("B000000000000003").to_json()[:40],
            "B000000000000004": make_envelope("B0000000000000zz").to_json(),
        }
        for queue_id, content in bad.items():
            (self.root / "queue" / (queue_id + ".json")).write_bytes(content)
            (self.root / "queue" / (queue_id + ".msg")).write_bytes(b"body of " + queue_id.encode())
        lonely = make_envelope("B00000000000000z").to_json()
        (self.root / "queue" / "B00000000000000z.json").write_bytes(lonely)
        spool, report = self.fresh_recovered()
        self.assertEqual(report.ids, [good])
        self.assertEqual(sorted(report.quarantined), sorted([*bad, "B00000000000000z"]))
        self.assertEqual(spool.ids(), [good])
        corrupt = self.root / "corrupt"
        for queue_id, content in bad.items():
            self.assertEqual((corrupt / (queue_id + ".json")).read_bytes(), content)
            self.assertEqual((corrupt / (queue_id + ".msg")).read_bytes(), b"body of " + queue_id.encode())
            self.assertTrue((corrupt / (queue_id + ".reason")).read_text().strip())
        self.assertEqual((corrupt / "B00000000000000z.json").read_bytes(), lonely)
        self.assertIn("missing", (corrupt / "B00000000000000z.reason").read_text())
        self.assertIn("version", (corrupt / "B000000000000002.reason").read_text())
        self.assertIn("B0000000000000zz", (corrupt / "B000000000000004.reason").read_text())

    def test_quarantine_never_overwrites_earlier_corrupt_entries(self) -> None:
        """A second corrupt entry with the same id is kept beside the first."""
        spool, _ = self.fresh_recovered()
        for content in (b"first", b"second"):
            (self.root / "queue" / "C000000000000000.json").write_bytes(content)
            (self.root / "queue" / "C000000000000000.msg").write_bytes(content)
            spool.recover()
        corrupt = self.root / "corrupt"
        self.assertEqual((corrupt / "C000000000000000.json").read_bytes(), b"first")
        self.assertEqual((corrupt / "C000000000000000-1.json").read_bytes(), b"second")


class GroupCommitTests(SpoolTestCase):
    def test_commits_arriving_during_a_batch_share_the_next_batch(self) -> None:
        """While one batch is on disk, later commits wait and then go together with one dir fsync."""
        events: list = []
        runner = ManualRunner()
        spool = self.spool(runner=runner, fs=RecordingFS(events=events))
        spool.recover()
        first = store(spool)
        self.assertEqual(len(runner.calls), 1)
        second, third = store(spool), store(spool)
        self.assertEqual(len(runner.calls), 1)
        self.assertNoResult(first)
        del events[:]
        runner.run(0)
        first_id = self.successResultOf(first)
        self.assertEqual([e[0] for e in events].count("fsync_dir"), 1)
        self.assertNoResult(second)
        self.assertNoResult(third)
        self.assertEqual(len(runner.calls), 2)
        self.assertEqual(len(runner.calls[1][1][0]), 2)  # both operations in one batch
        del events[:]
        runner.run(1)
        self.assertEqual([e[0] for e in events].count("fsync_dir"), 1)
        ids = [first_id, self.successResultOf(second), self.successResultOf(third)]
        self.assertEqual(spool.ids(), sorted(ids))
        self.assertEqual(len(runner.calls), 2)

    def test_nothing_fires_before_its_batch_is_durable(self) -> None:
        """A commit Deferred has no result while its batch has not run."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        spool.recover()
        d = store(spool)
        self.assertNoResult(d)
        self.assertEqual(spool.ids(), [])
        runner.run(0)
        self.assertEqual(spool.ids(), [self.successResultOf(d)])

    def test_updates_and_removes_join_batches(self) -> None:
        """Updates and removals queue behind a batch and then share one."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        spool.recover()
        a, b = store(spool), store(spool)
        runner.run(0)
        runner.run(1)
        a_id, b_id = self.successResultOf(a), self.successResultOf(b)
        held = spool.update(make_envelope(a_id, held=True, size=len(MESSAGE)))
        gone = spool.remove(b_id)
        self.assertEqual(len(runner.calls), 3)
        self.assertEqual(len(runner.calls[2][1][0]), 1)
        runner.run(2)
        self.successResultOf(held)
        self.assertEqual(len(runner.calls[3][1][0]), 1)
        runner.run(3)
        self.successResultOf(gone)
        self.assertEqual(spool.ids(), [a_id])
        self.assertTrue(spool.load(a_id).held)

    def test_stop_waits_for_pending_batches(self) -> None:
        """stop fires only after every queued operation has been made durable."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        spool.recover()
        d = store(spool)
        stopped = spool.stop()
        self.assertNoResult(stopped)
        runner.run(0)
        self.successResultOf(d)
        self.successResultOf(stopped)


class FailureTests(SpoolTestCase):
    def assert_nothing_queued(self, spool: Spool) -> None:
        self.assertEqual(spool.ids(), [])
        self.assertEqual(listing(self.root, "queue"), [])
        self.assertEqual(listing(self.root, "tmp"), [])

    def test_enospc_on_write_fails_the_commit_and_queues_nothing(self) -> None:
        """A full disk while writing makes commit errback (write itself never raises) and leaves nothing."""
        spool = self.spool(fs=FailingFS("write"))
        spool.recover()
        message = spool.new_message()
        message.write(b"x" * (WRITE_BUFFER + 1))  # forces a write to disk
        message.write(b"more")
        failure = self.failureResultOf(message.commit(make_envelope(message.queue_id)), OSError)
        self.assertEqual(failure.value.errno, errno.ENOSPC)
        self.assert_nothing_queued(spool)

    def test_enospc_on_fsync_fails_the_commit_and_queues_nothing(self) -> None:
        """A failing fsync makes commit errback and removes every file of the message."""
        spool = self.spool(fs=FailingFS("fsync"))
        spool.recover()
        self.failureResultOf(store(spool), OSError)
        self.assert_nothing_queued(spool)

    def test_failing_directory_fsync_withdraws_the_batch(self) -> None:
        """When queue/ cannot be fsynced the commit errbacks and the entry is withdrawn."""
        spool = self.spool(fs=FailingFS("fsync_dir"))
        os.makedirs(self.root / "tmp")
        os.makedirs(self.root / "queue")
        self.failureResultOf(store(spool), OSError)
        self.assert_nothing_queued(spool)

    def test_one_failure_does_not_fail_the_rest_of_the_batch(self) -> None:
        """A commit that fails in a batch errbacks alone; the others are stored."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        spool.recover()
        store(spool)
        good = store(spool)
        bad_message = spool.new_message()
        bad_message.write(MESSAGE)
        bad = bad_message.commit(make_envelope(bad_message.queue_id))
        os.unlink(self.root / "tmp" / (bad_message.queue_id + ".msg"))  # its rename will fail
        runner.run(0)
        runner.run(1)
        self.failureResultOf(bad, OSError)
        self.assertIn(self.successResultOf(good), spool.ids())
        self.assertEqual(len(spool.ids()), 2)

    def test_runner_failure_errbacks_every_operation(self) -> None:
        """If the runner itself fails, every Deferred of the batch errbacks."""
        def broken(f: Callable[..., Any], *args: Any) -> defer.Deferred:
            raise RuntimeError("no thread")

        spool = self.spool(runner=broken)
        spool.recover()
        self.failureResultOf(store(spool), RuntimeError)


class QueueIdTests(SynchronousTestCase):
    def test_ids_are_unique_safe_and_sort_by_creation(self) -> None:
        """Many ids, made at equal and at advancing times, are unique, [0-9A-Za-z], 16 long and sorted."""
        clock = Clock()
        clock.advance(1700000000)
        made = []
        for i in range(20000):
            if i % 7 == 0:
                clock.advance(0.0003)
            made.append(new_queue_id(clock))
        self.assertEqual(len(set(made)), len(made))
        self.assertEqual(made, sorted(made))
        for queue_id in made[:100]:
            self.assertEqual(len(queue_id), QUEUE_ID_LENGTH)
            self.assertTrue(queue_id.isascii() and queue_id.isalnum())

    def test_ids_keep_increasing_when_the_clock_steps_back(self) -> None:
        """A clock stepping backwards never produces an id that sorts before an earlier one."""
        clock = Clock()
        clock.advance(2000000000)
        first = new_queue_id(clock)
        self.assertLess(first, new_queue_id(Clock()))

    def test_other_processes_use_another_suffix(self) -> None:
        """A new process (another pid) draws a new random suffix, so ids differ across processes."""
        clock = Clock()
        before = new_queue_id(clock)[-6:]
        saved = dict(spool_module._id_state)
        try:
            spool_module._id_state["pid"] = None
            self.assertNotEqual(new_queue_id(clock)[-6:], before)
        finally:
            spool_module._id_state.update(saved)


class IdsTests(SpoolTestCase):
    def test_ids_are_oldest_first_and_only_committed(self) -> None:
        """ids() lists committed entries in creation order, whatever the commit order, and nothing else."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        spool.recover()
        messages = []
        for _ in range(4):
            messages.append(spool.new_message())
            self.clock.advance(1)
        pending = spool.new_message()
        pending.write(b"still arriving")
        commits = []
        for message in reversed(messages):
            message.write(MESSAGE)
            commits.append(message.commit(make_envelope(message.queue_id)))
        runner.run(0)
        runner.run(1)
        for d in commits:
            self.successResultOf(d)
        self.assertEqual(spool.ids(), [m.queue_id for m in messages])

    def test_ids_of_missing_directory_is_empty(self) -> None:
        """ids() on a directory that does not exist yet is empty."""
        self.assertEqual(self.spool().ids(), [])


class LockTests(SpoolTestCase):
    def test_update_sync_holds_the_lock_while_replacing(self) -> None:
        """update_sync holds an exclusive flock on the envelope when it renames the new one over it."""
        spool, _ = self.fresh_recovered()
        queue_id = self.successResultOf(store(spool))
        envelope_path = str(self.root / "queue" / (queue_id + ".json"))
        seen: list = []

        class Probe(OsFileSystem):
            def rename(probe, src: str, dst: str) -> None:
                fd = os.open(dst, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("free")
                except BlockingIOError:
                    seen.append("locked")
                finally:
                    os.close(fd)
                os.rename(src, dst)

        tool = Spool(str(self.root), fs=Probe())
        tool.update_sync(make_envelope(queue_id, held=True, size=len(MESSAGE)))
        self.assertEqual(seen, ["locked"])
        self.assertTrue(spool.load(queue_id).held)
        fd = os.open(envelope_path, os.O_RDONLY)  # released afterwards
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)

    def test_waiting_writer_locks_the_replacement_after_a_rename(self) -> None:
        """A writer that waited on a lock while the envelope was replaced starts over on the new file."""
        spool, _ = self.fresh_recovered()
        queue_id = self.successResultOf(store(spool))
        path = self.root / "queue" / (queue_id + ".json")
        events: list = []
        about_to_lock = threading.Event()

        class Signalling(RecordingFS):
            def lock(fs, fd: int) -> None:
                about_to_lock.set()
                super().lock(fd)

        holder = os.open(path, os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_EX)
        tool = Spool(str(self.root), fs=Signalling(events=events))
        errors: list = []

        def change() -> None:
            try:
                tool.modify_sync(queue_id, lambda e: replace(e, held=True))
            except Exception as e:  # reported below
                errors.append(e)

        worker = threading.Thread(target=change)
        worker.start()
        self.assertTrue(about_to_lock.wait(10))
        # Another writer replaces the envelope while holding the lock on the old file.
        replacement = self.root / "tmp" / "other"
        replacement.write_bytes(make_envelope(queue_id, sender="", size=len(MESSAGE)).to_json())
        os.rename(replacement, path)
        os.close(holder)
        worker.join(10)
        self.assertFalse(worker.is_alive())
        self.assertEqual(errors, [])
        self.assertEqual([e[0] for e in events].count("lock"), 2)
        stored = spool.load(queue_id)
        self.assertEqual((stored.sender, stored.held), ("", True))  # the change saw the replacement

    def test_update_of_a_removed_message_does_not_resurrect_it(self) -> None:
        """Updating an id that has been removed raises KeyError and creates no files."""
        spool, _ = self.fresh_recovered()
        queue_id = self.successResultOf(store(spool))
        spool.remove_sync(queue_id)
        envelope = make_envelope(queue_id, size=len(MESSAGE))
        self.assertRaises(KeyError, spool.update_sync, envelope)
        self.failureResultOf(spool.update(envelope), KeyError)
        self.assertEqual(listing(self.root, "queue"), [])
        self.assertEqual(listing(self.root, "tmp"), [])

    def test_modify_reads_the_current_envelope_under_the_lock(self) -> None:
        """modify applies a change to what is on disk and fires with the stored envelope."""
        spool, _ = self.fresh_recovered()
        queue_id = self.successResultOf(store(spool))
        Spool(str(self.root)).update_sync(make_envelope(queue_id, held=True, size=len(MESSAGE)))
        stored = self.successResultOf(
            spool.modify(queue_id, lambda e: e.with_recipients([replace(e.recipients[0], status=DELIVERED)]))
        )
        self.assertTrue(stored.held)
        self.assertEqual(spool.load(queue_id), stored)
        self.assertEqual([r.status for r in stored.recipients], [DELIVERED, PENDING])


class ServiceTests(SpoolTestCase):
    def test_service_recovers_at_start_and_drains_at_stop(self) -> None:
        """SpoolService runs recovery in startService and stop in stopService."""
        (self.root / "tmp").mkdir(parents=True)
        (self.root / "tmp" / "leftover").write_bytes(b"x")
        spool = self.spool()
        service = SpoolService(spool)
        service.startService()
        self.assertTrue(service.running)
        self.assertEqual(service.report.removed_tmp, 1)
        self.successResultOf(store(spool))
        self.successResultOf(service.stopService())
        self.assertFalse(service.running)

    def test_default_thread_pool_starts_and_stops(self) -> None:
        """Without a runner the spool owns a thread pool; start and stop are idempotent."""
        spool = Spool(str(self.root), clock=self.clock)
        spool.start()
        spool.start()
        pool = spool._pool
        self.assertTrue(pool is not None and pool.started)
        self.successResultOf(spool.stop())
        self.assertFalse(pool.started)
        self.successResultOf(spool.stop())


class FixtureTests(SpoolTestCase):
    def test_v1_envelope_fixture_loads(self) -> None:
        """The checked-in v1 envelope and its message load through the spool unchanged."""
        envelope = Envelope.from_json((FIXTURES / "envelope-v1.json").read_bytes())
        self.assertEqual(envelope.queue_id, "0lPq3Rz8Xa2Kd9Wb")
        self.assertEqual(envelope.sender, "jörg@exämple.test")
        self.assertTrue(envelope.held and envelope.smtputf8)
        self.assertEqual(envelope.body, "8BITMIME")
        self.assertEqual(envelope.mail_params, (("RET", "HDRS"), ("ENVID", "abc123")))
        self.assertEqual([r.status for r in envelope.recipients], ["pending", "pending", "delivered", "failed"])
        bob = envelope.recipient("bob@legacy.example")
        self.assertEqual((bob.source_route, bob.attempts, bob.next_attempt), (("gw1.example.net", "gw2.example.net"), 2, 1700003600.5))
        self.assertEqual(bob.history[1].reply, "451 4.3.0 try again later")
        self.assertEqual(envelope.client.auth_user, "app1")

        queue = self.root / "queue"
        queue.mkdir(parents=True)
        shutil.copy(FIXTURES / "envelope-v1.json", queue / "0lPq3Rz8Xa2Kd9Wb.json")
        shutil.copy(FIXTURES / "envelope-v1.msg", queue / "0lPq3Rz8Xa2Kd9Wb.msg")
        spool, report = self.fresh_recovered()
        self.assertEqual(report.ids, ["0lPq3Rz8Xa2Kd9Wb"])
        self.assertEqual(spool.load("0lPq3Rz8Xa2Kd9Wb"), envelope)
        self.assert_complete(spool, "0lPq3Rz8Xa2Kd9Wb", (FIXTURES / "envelope-v1.msg").read_bytes())



def test_commit_listeners_hear_of_each_durable_message_only(tmp_path: Path) -> None:
    """on_commit listeners get the queue id once a message is durable, and never for a failed commit."""
    heard: list[str] = []
    spool = Spool(str(tmp_path / "ok"), runner=sync_runner)
    spool.recover()
    spool.on_commit(heard.append)
    spool.on_commit(lambda queue_id: 1 / 0)  # a broken listener does not spoil the commit
    results: list = []
    store(spool).addBoth(results.append)
    assert results == heard and len(heard) == 1
    assert heard[0] in spool.ids()

    fs = RecordingFS()
    failing = Spool(str(tmp_path / "failing"), runner=sync_runner, fs=fs)
    failing.recover()
    failing.on_commit(heard.append)
    fs.crash_at = fs.count  # every further disk call fails
    outcome: list = []
    store(failing).addBoth(outcome.append)
    assert outcome and outcome[0].__class__.__name__ == "Failure"
    assert len(heard) == 1
