"""Tests for the spool's concurrent disk work: batches made durable side by side, files
created off the reactor thread, and the direct envelope JSON encoder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from relay.envelope import Attempt, ClientInfo, Envelope, Recipient
from relay.queue.spool import Spool
from test_spool import MESSAGE, ManualRunner, RecordingFS, SpoolTestCase, listing, make_envelope, store, sync_runner

FIXTURE = Path(__file__).parent / "fixtures" / "envelope-v1.json"


def asdict_json(envelope: Envelope) -> bytes:
    """The envelope JSON as the first encoder wrote it (dataclasses.asdict)."""
    return json.dumps(asdict(envelope), ensure_ascii=False, sort_keys=True).encode("utf-8")


class ParallelBatchTests(SpoolTestCase):
    def spool(self, **kwargs: Any) -> Spool:
        kwargs.setdefault("runner", sync_runner)
        kwargs.setdefault("clock", self.clock)
        spool = Spool(str(self.root), **kwargs)
        spool.recover()
        self.addCleanup(spool._stop_pool)
        return spool

    def test_messages_of_a_batch_in_threads_keep_each_durability_order(self) -> None:
        """With I/O threads, every message of a batch is fsynced before its renames, envelope last,
        and the one directory fsync comes after every rename and before any Deferred fires."""
        events: list = []
        runner = ManualRunner()
        spool = self.spool(runner=runner, fs=RecordingFS(events=events), io_threads=4)
        del events[:]
        first = store(spool)
        rest = [store(spool) for _ in range(12)]
        runner.run(0)
        self.successResultOf(first)
        del events[:]
        fired: list = []
        for d in rest:
            d.addCallback(lambda queue_id: fired.append(len(events)) or queue_id)
        self.assertEqual(fired, [])
        runner.run(1)
        queue = str(self.root / "queue")
        dir_syncs = [i for i, e in enumerate(events) if e == ("fsync_dir", queue)]
        self.assertEqual(len(dir_syncs), 1)
        for d in rest:
            queue_id = self.successResultOf(d)
            tmp_msg = str(self.root / "tmp" / (queue_id + ".msg"))
            tmp_env = str(self.root / "tmp" / (queue_id + ".json"))
            order = [
                events.index(("fsync", tmp_msg)),
                events.index(("rename", tmp_msg, os.path.join(queue, queue_id + ".msg"))),
                events.index(("rename", tmp_env, os.path.join(queue, queue_id + ".json"))),
                dir_syncs[0],
            ]
            self.assertEqual(order, sorted(order))
            self.assertLess(events.index(("fsync", tmp_env)), order[2] - 1)
        self.assertTrue(all(position >= dir_syncs[0] for position in fired))
        self.assertEqual(len(spool.ids()), 13)
        for queue_id in spool.ids():
            with spool.open_message(queue_id) as f:
                self.assertEqual(f.read(), MESSAGE)

    def test_operations_on_one_message_in_a_batch_run_in_order(self) -> None:
        """A modify and then a remove of the same message in one threaded batch: modified, then removed."""
        runner = ManualRunner()
        spool = self.spool(runner=runner, io_threads=4)
        stored = store(spool)
        runner.run(0)
        queue_id = self.successResultOf(stored)
        blocker = store(spool)  # batch 1: what follows goes together into batch 2
        others = [store(spool) for _ in range(3)]
        modified = spool.modify(queue_id, lambda e: make_envelope(queue_id, size=e.size, held=True))
        removed = spool.remove(queue_id)
        runner.run(1)
        self.successResultOf(blocker)
        self.assertEqual(len(runner.calls[2][1][0]), 5)
        runner.run(2)
        self.assertTrue(self.successResultOf(modified).held)
        self.successResultOf(removed)
        self.assertNotIn(queue_id, spool.ids())
        self.assertEqual(len(spool.ids()), len(others) + 1)

    def test_batches_run_side_by_side_but_never_on_the_same_message(self) -> None:
        """With two batches allowed, a second starts while the first runs, except for a message
        the running batch touches: its operation waits for that batch to end."""
        runner = ManualRunner()
        spool = self.spool(runner=runner, max_batches=2)
        busy = store(spool)  # batch 0, still running
        self.assertEqual(len(runner.calls), 1)
        other = store(spool)  # batch 1 starts at once
        self.assertEqual(len(runner.calls), 2)
        runner.run(1)
        self.successResultOf(other)
        queue_id = spool.ids()[0]
        self.assertNoResult(busy)
        blocked = spool.remove(queue_id)  # its batch is done: runs now
        self.assertEqual(len(runner.calls), 3)
        runner.run(2)
        self.successResultOf(blocked)
        runner.run(0)
        busy_id = self.successResultOf(busy)
        held = spool.modify(busy_id, lambda e: e)
        second = spool.modify(busy_id, lambda e: e)
        self.assertEqual(len(runner.calls), 4)  # the second modify waits for the first's batch
        self.assertNoResult(second)
        runner.run(3)
        self.successResultOf(held)
        self.assertEqual(len(runner.calls), 5)
        runner.run(4)
        self.successResultOf(second)


class DeferredCreation:
    """Stands in for the spool's I/O threads: each call waits until the test runs it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple, defer.Deferred]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def run_all(self) -> None:
        calls, self.calls = self.calls, []
        for f, args, d in calls:
            try:
                result = f(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)


class CreationOffThreadTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = tempfile.mkdtemp(prefix="relay-spool-create-")
        self.addCleanup(shutil.rmtree, base, True)
        self.root = Path(base) / "spool"
        self.spool = Spool(str(self.root), runner=sync_runner)
        self.spool.recover()
        self.creation = DeferredCreation()
        self.spool._io_call = self.creation  # type: ignore[method-assign]

    def test_bytes_written_before_the_file_exists_are_kept(self) -> None:
        """A message written and committed before its file is created is stored whole once it is."""
        message = self.spool.new_message()
        message.write(MESSAGE)
        message.write(b"x" * 70_000)  # over the write buffer: still held until the file exists
        self.assertEqual(listing(self.root, "tmp"), [])
        committed = message.commit(make_envelope(message.queue_id))
        stopped = self.spool.stop()
        self.assertNoResult(committed)
        self.assertNoResult(stopped)  # stop waits for the commit that waits for its file
        self.creation.run_all()
        queue_id = self.successResultOf(committed)
        self.successResultOf(stopped)
        with self.spool.open_message(queue_id) as f:
            self.assertEqual(f.read(), MESSAGE + b"x" * 70_000)
        self.assertEqual(self.spool.load(queue_id).size, len(MESSAGE) + 70_000)

    def test_abort_before_the_file_exists_removes_it_once_created(self) -> None:
        """An aborted message whose file is created afterwards leaves nothing under tmp/."""
        message = self.spool.new_message()
        message.write(MESSAGE)
        message.abort()
        self.creation.run_all()  # creates the file, then discards it
        self.creation.run_all()
        self.assertEqual(listing(self.root, "tmp"), [])
        self.assertEqual(self.spool.ids(), [])

    def test_a_failed_creation_fails_the_commit(self) -> None:
        """When the file cannot be created the commit errbacks and nothing is queued."""
        message = self.spool.new_message()
        os.rmdir(self.root / "tmp")
        message.write(MESSAGE)
        committed = message.commit(make_envelope(message.queue_id))
        self.creation.run_all()
        self.failureResultOf(committed, OSError)
        self.assertEqual(self.spool.ids(), [])


class EncoderTests(SynchronousTestCase):
    def test_fixture_round_trips_and_matches_the_asdict_encoding(self) -> None:
        """The checked-in v1 envelope loads, and to_json writes what the asdict encoder wrote."""
        envelope = Envelope.from_json(FIXTURE.read_bytes())
        self.assertEqual(envelope.to_json(), asdict_json(envelope))
        self.assertEqual(Envelope.from_json(envelope.to_json()), envelope)

    @settings(max_examples=60, deadline=None)
    @given(
        text=st.text(max_size=12),
        number=st.integers(min_value=0, max_value=10**6),
        when=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9, allow_nan=False)),
        flag=st.booleans(),
        hops=st.lists(st.text(max_size=6), max_size=3),
    )
    def test_any_envelope_encodes_as_asdict_did(self, text: str, number: int, when: Any, flag: bool,
                                                hops: list[str]) -> None:
        """Envelopes with any text, numbers, params, histories and flags encode byte for byte as before."""
        attempt = Attempt(time=when or 0.0, outcome="transient", reply=text, host=text, route="r", tls=text)
        envelope = Envelope(
            queue_id="Q" + str(number),
            sender=text,
            recipients=(
                Recipient(address=text + "@example.org", source_route=tuple(hops),
                          params=(("NOTIFY", None), ("ORCPT", text)), attempts=number,
                          last_error=text, next_attempt=when, history=(attempt, attempt),
                          reported=flag, warned=not flag),
                Recipient(address="b@example.net"),
            ),
            client=ClientInfo(address="192.0.2.1", port=number % 65536, helo=text, trusted=flag, tls=text),
            arrival=when or 0.0, size=number, smtputf8=flag, mail_params=(("ENVID", text),), held=flag,
        )
        self.assertEqual(envelope.to_json(), asdict_json(envelope))
        self.assertEqual(Envelope.from_json(envelope.to_json()), envelope)
