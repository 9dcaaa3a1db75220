"""Tests for relay.queue.legacy: start-up import of a queue directory in the file-per-message format."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relay.envelope import FAILED, Attempt, ClientInfo, Envelope, Recipient
from relay.queue.ids import new_queue_id
from recordingfs import Crash, RecordingFS
from relay.queue.store import STORE_FILE, Spool

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_ID = "0lPq3Rz8Xa2Kd9Wb"  # the queue id inside envelope-v1.json
LARGE = 1000


def sync_runner(f: Any, *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


def old_envelope(queue_id: str, size: int, **changes: Any) -> Envelope:
    envelope = Envelope(
        queue_id=queue_id,
        sender="jörg@exämple.test",
        recipients=(
            Recipient(address="alice@example.org", params=(("NOTIFY", "FAILURE"),)),
            Recipient(address="bøb@exämple.net", attempts=1, next_attempt=1700000600.5, last_error="421 busy",
                      history=(Attempt(time=1700000000.0, outcome="transient", code=421, text="busy", host="mx",
                                       remote=True),)),
            Recipient(address="carol@example.com", status=FAILED, reported=True),
        ),
        client=ClientInfo(address="192.0.2.9", port=2525, helo="old.example", trusted=True),
        arrival=1699999999.25,
        size=size,
        body_type="8BITMIME",
    )
    return replace(envelope, **changes)


def old_message(queue_id: str, length: int = 200) -> bytes:
    head = b"Received: by old.example id %s\r\nSubject: caf\xc3\xa9\r\n\r\n" % queue_id.encode()
    body = (b"%s \x00\xff\r\n" % queue_id.encode()) * (length // 20 + 1)
    return head + body[: max(0, length - len(head))]


class LegacyTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        base = tempfile.mkdtemp(prefix="relay-legacy-test-")
        self.addCleanup(shutil.rmtree, base, True)
        self.base = Path(base)
        self.root = self.base / "spool"
        self.queue = self.root / "queue"
        self.queue.mkdir(parents=True)
        (self.root / "tmp").mkdir()
        self.clock = Clock()
        self.clock.advance(1600000000)  # old ids: earlier than any the store makes in these tests

    def new_id(self) -> str:
        self.clock.advance(0.001)
        return new_queue_id(self.clock)

    def spool(self, root: Optional[Path] = None, **kwargs: Any) -> Spool:
        kwargs.setdefault("runner", sync_runner)
        kwargs.setdefault("large_message", LARGE)
        spool = Spool(str(root or self.root), **kwargs)
        self.addCleanup(spool.close)
        return spool

    def old_entry(self, queue_id: Optional[str] = None, data: Optional[bytes] = None,
                  queue: Optional[Path] = None, **changes: Any) -> tuple[str, Envelope, bytes]:
        """Write one committed entry of the old layout: queue/<id>.msg and queue/<id>.json."""
        queue_id = queue_id or self.new_id()
        data = old_message(queue_id) if data is None else data
        envelope = old_envelope(queue_id, len(data), **changes)
        queue = queue or self.queue
        (queue / (queue_id + ".msg")).write_bytes(data)
        (queue / (queue_id + ".json")).write_bytes(envelope.to_json())
        return queue_id, envelope, data

    def read_back(self, spool: Spool, queue_id: str) -> bytes:
        with spool.open_message(queue_id) as f:
            return f.read()


class ImportTests(LegacyTestCase):
    def test_recover_imports_the_old_layout_and_cleans_it_up(self) -> None:
        """Good entries are imported with exact bytes and envelopes, bad ones quarantined with reasons,
        orphan messages and tmp/ leftovers deleted, queue/ removed, and the report counts it all."""
        fixture = Envelope.from_json((FIXTURES / "envelope-v1.json").read_bytes())
        fixture_bytes = (FIXTURES / "envelope-v1.msg").read_bytes()
        self.assertEqual(fixture.queue_id, FIXTURE_ID)
        self.assertEqual(fixture.size, len(fixture_bytes))
        shutil.copy(FIXTURES / "envelope-v1.json", self.queue / (FIXTURE_ID + ".json"))
        shutil.copy(FIXTURES / "envelope-v1.msg", self.queue / (FIXTURE_ID + ".msg"))
        small, small_envelope, small_bytes = self.old_entry(held=True)
        large, large_envelope, large_bytes = self.old_entry(data=old_message("x", 5000))
        orphan = self.new_id()
        (self.queue / (orphan + ".msg")).write_bytes(b"never acknowledged")
        garbage = self.new_id()
        (self.queue / (garbage + ".json")).write_bytes(b'{"version": 1, "queue_id"')
        (self.queue / (garbage + ".msg")).write_bytes(b"the bytes of an unreadable entry")
        lonely, lonely_envelope, _ = self.old_entry()
        os.unlink(self.queue / (lonely + ".msg"))
        other = self.new_id()
        (self.queue / (other + ".json")).write_bytes(old_envelope("0000000000000000", 3).to_json())
        (self.queue / (other + ".msg")).write_bytes(b"abc")
        leftover = self.new_id()
        for name in (leftover + ".msg", leftover + ".json", small + ".json.new"):
            (self.root / "tmp" / name).write_bytes(b"half written")

        spool = self.spool()
        report = spool.recover()

        self.assertEqual(report.imported, 3)
        self.assertEqual(report.count, 3)
        self.assertEqual(sorted(report.quarantined), sorted([garbage, lonely, other]))
        self.assertEqual(report.removed_orphans, 1)
        self.assertEqual(report.removed_tmp, 3)
        self.assertEqual(spool.ids(), sorted([FIXTURE_ID, small, large]))
        self.assertEqual(spool.load(FIXTURE_ID), fixture)
        self.assertEqual(self.read_back(spool, FIXTURE_ID), fixture_bytes)
        self.assertEqual(spool.load(small), small_envelope)
        self.assertTrue(spool.peek(small).held)
        self.assertEqual(spool.message_bytes(small), small_bytes)
        self.assertEqual(spool.load(large), large_envelope)
        self.assertIsNone(spool.message_bytes(large))
        self.assertEqual((self.root / "large" / (large + ".msg")).read_bytes(), large_bytes)
        self.assertFalse(self.queue.exists())
        self.assertEqual(os.listdir(self.root / "tmp"), [])

        corrupt = self.root / "corrupt"
        self.assertEqual(sorted(os.listdir(corrupt)), sorted(
            [garbage + s for s in (".json", ".msg", ".reason")]
            + [lonely + s for s in (".json", ".reason")]
            + [other + s for s in (".json", ".msg", ".reason")]))
        self.assertEqual((corrupt / (garbage + ".json")).read_bytes(), b'{"version": 1, "queue_id"')
        self.assertEqual((corrupt / (garbage + ".msg")).read_bytes(), b"the bytes of an unreadable entry")
        self.assertIn("not JSON", (corrupt / (garbage + ".reason")).read_text())
        self.assertEqual((corrupt / (lonely + ".json")).read_bytes(), lonely_envelope.to_json())
        self.assertEqual((corrupt / (lonely + ".reason")).read_text(), "message file missing\n")
        self.assertIn("0000000000000000", (corrupt / (other + ".reason")).read_text())
        self.assertEqual((corrupt / (other + ".msg")).read_bytes(), b"abc")

        again = self.spool().recover()  # a second start finds nothing more to do
        self.assertEqual((again.imported, again.count, again.quarantined, again.removed_orphans), (0, 3, [], 0))
        self.assertEqual(len(os.listdir(corrupt)), 8)

    def test_quarantine_never_overwrites_corrupt_files_of_the_old_spool(self) -> None:
        """An unreadable entry whose id already has files in corrupt/ goes to <id>-1.*, the old files untouched."""
        corrupt = self.root / "corrupt"
        corrupt.mkdir()
        bad = self.new_id()
        (corrupt / (bad + ".json")).write_bytes(b"old corrupt envelope")
        (corrupt / (bad + ".reason")).write_bytes(b"old reason\n")
        (self.queue / (bad + ".json")).write_bytes(b"\xff not utf-8")
        (self.queue / (bad + ".msg")).write_bytes(b"new bytes")
        report = self.spool().recover()
        self.assertEqual(report.quarantined, [bad])
        self.assertEqual((corrupt / (bad + ".json")).read_bytes(), b"old corrupt envelope")
        self.assertEqual((corrupt / (bad + ".reason")).read_bytes(), b"old reason\n")
        self.assertEqual((corrupt / (bad + "-1.json")).read_bytes(), b"\xff not utf-8")
        self.assertEqual((corrupt / (bad + "-1.msg")).read_bytes(), b"new bytes")
        self.assertTrue((corrupt / (bad + "-1.reason")).read_text().strip())

    def test_unexpected_files_keep_queue_but_not_the_import(self) -> None:
        """A file that is no entry stays in queue/ (which then stays), and the entries are still imported."""
        queue_id, envelope, data = self.old_entry()
        (self.queue / "README").write_bytes(b"notes of an operator")
        spool = self.spool()
        report = spool.recover()
        self.assertEqual(report.imported, 1)
        self.assertEqual(spool.load(queue_id), envelope)
        self.assertEqual(spool.message_bytes(queue_id), data)
        self.assertEqual(os.listdir(self.queue), ["README"])

    def test_no_old_queue_means_nothing_to_import(self) -> None:
        """Without queue/, recover imports nothing and creates no queue/."""
        shutil.rmtree(self.queue)
        report = self.spool().recover()
        self.assertEqual((report.imported, report.count, report.quarantined), (0, 0, []))
        self.assertFalse(self.queue.exists())


class InterruptedImportTests(LegacyTestCase):
    def test_an_import_interrupted_after_its_commit_imports_nothing_twice(self) -> None:
        """Entries already stored (their files not yet unlinked, or only the envelope unlinked) are not
        imported again: each message is stored once, with its bytes, and queue/ is cleaned up."""
        entries = [self.old_entry(data=old_message("q", 300 if i % 2 else 3000)) for i in range(6)]
        crashed = self.spool()  # the first start: its batch of four committed, then it died
        (self.root / "large").mkdir()
        self.assertEqual(crashed.insert_sync([(envelope, data) for _, envelope, data in entries[:4]]), 4)
        os.unlink(self.queue / (entries[0][0] + ".json"))  # the crash came between its two unlinks
        crashed.close()
        spool = self.spool()
        report = spool.recover()
        self.assertEqual(report.imported, 2)
        self.assertEqual(report.count, 6)
        self.assertEqual(report.removed_orphans, 1)  # the .msg whose .json was unlinked
        self.assertEqual(spool.ids(), sorted(q for q, _, _ in entries))
        for queue_id, envelope, data in entries:
            self.assertEqual(spool.load(queue_id), envelope)
            self.assertEqual(self.read_back(spool, queue_id), data)
        self.assertFalse(self.queue.exists())
        self.assertEqual(sorted(os.listdir(self.root / "large")),
                         sorted(q + ".msg" for q, _, data in entries if len(data) > LARGE))
        conn = sqlite3.connect(str(self.root / STORE_FILE))
        try:
            self.assertEqual(conn.execute("SELECT count(*) FROM body").fetchone()[0], 6)
        finally:
            conn.close()

    def test_a_crash_at_any_step_of_the_import_loses_nothing(self) -> None:
        """Whichever filesystem call of recover the process dies at, the next start has every good message
        exactly once with its bytes, keeps the bad entry's files in corrupt/, and leaves queue/ clean."""
        template = self.base / "template"
        (template / "queue").mkdir(parents=True)
        (template / "tmp").mkdir()
        good = [self.old_entry(data=old_message("g", n), queue=template / "queue") for n in (100, 4000, 250, 1200)]
        bad = self.new_id()
        (template / "queue" / (bad + ".json")).write_bytes(b"[]")
        (template / "queue" / (bad + ".msg")).write_bytes(b"bad entry bytes")
        (template / "queue" / (self.new_id() + ".msg")).write_bytes(b"orphan")
        (template / "tmp" / "leftover").write_bytes(b"x")
        clean_calls = None
        for crash_at in range(1, 400):
            root = self.base / f"crash-{crash_at}"
            shutil.copytree(template, root)
            fs = RecordingFS(crash_at=crash_at)
            try:
                self.spool(root, fs=fs).recover()
            except Crash:
                pass
            spool = self.spool(root)
            report = spool.recover()
            self.assertEqual(spool.ids(), sorted(q for q, _, _ in good), crash_at)
            for queue_id, envelope, data in good:
                self.assertEqual(spool.load(queue_id), envelope, crash_at)
                self.assertEqual(self.read_back(spool, queue_id), data, crash_at)
            corrupt = root / "corrupt"
            kept = {name: (corrupt / name).read_bytes() for name in os.listdir(corrupt)}
            self.assertIn(b"[]", kept.values(), crash_at)
            self.assertIn(b"bad entry bytes", kept.values(), crash_at)
            self.assertFalse((root / "queue").exists(), crash_at)
            self.assertEqual(os.listdir(root / "tmp"), [], crash_at)
            self.assertEqual(sorted(os.listdir(root / "large")),
                             sorted(q + ".msg" for q, _, data in good if len(data) > LARGE), crash_at)
            self.assertEqual(report.count, len(good))
            if not fs.crashed:
                clean_calls = fs.calls
                break
        self.assertIsNotNone(clean_calls)
        self.assertGreater(clean_calls, 20)

    def test_the_import_makes_quarantined_entries_durable_in_corrupt(self) -> None:
        """After moving an unreadable entry into corrupt/, the import fsyncs corrupt/."""
        bad = self.new_id()
        (self.queue / (bad + ".json")).write_bytes(b"garbage")
        (self.queue / (bad + ".msg")).write_bytes(b"bytes")
        fs = RecordingFS()
        self.spool(fs=fs).recover()
        corrupt = str(self.root / "corrupt")
        renames = [i for i, e in enumerate(fs.events) if e[0] == "rename" and e[2].startswith(corrupt)]
        self.assertEqual(len(renames), 2)
        self.assertIn(("fsync_dir", corrupt), fs.events[renames[-1]:])


class LargeImportTests(LegacyTestCase):
    def test_three_thousand_old_messages_import_completely(self) -> None:
        """3000 entries of the old format (some large) are all imported once, with their bytes and envelopes."""
        entries = {}
        for i in range(3000):
            queue_id = self.new_id()
            data = old_message(queue_id, 1500 if i % 97 == 0 else 120 + i % 50)
            envelope = old_envelope(queue_id, len(data), held=i % 3 == 0, arrival=1600000000.0 + i)
            (self.queue / (queue_id + ".msg")).write_bytes(data)
            (self.queue / (queue_id + ".json")).write_bytes(envelope.to_json())
            entries[queue_id] = (envelope, data)
        spool = self.spool()
        report = spool.recover()
        self.assertEqual((report.imported, report.count, report.quarantined), (3000, 3000, []))
        self.assertEqual(spool.ids(), sorted(entries))
        for queue_id, (envelope, data) in entries.items():
            self.assertEqual(spool.load(queue_id), envelope)
            self.assertEqual(self.read_back(spool, queue_id), data)
        self.assertEqual([s.queue_id for s in spool.all_summaries()], sorted(entries))
        self.assertEqual(sum(s.held for s in spool.all_summaries()), 1000)
        self.assertEqual(len(os.listdir(self.root / "large")), sum(1 for _, d in entries.values() if len(d) > LARGE))
        self.assertFalse(self.queue.exists())
        conn = sqlite3.connect(str(self.root / STORE_FILE))
        try:
            self.assertEqual(conn.execute("SELECT count(*), count(DISTINCT id) FROM body").fetchone(), (3000, 3000))
        finally:
            conn.close()
