"""Tests for relay.queue.store: round trips, large messages, group commit, failures, crashes,
concurrent writers, the database format, quarantine, and a kill -9 of a real threaded store."""

from __future__ import annotations

import errno
import hashlib
import os
import selectors
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relay.envelope import (
    DELIVERED,
    FAILED,
    PENDING,
    Attempt,
    ClientInfo,
    Envelope,
    EnvelopeFormatError,
    Recipient,
)
from relay.queue import ids as ids_module
from relay.queue.ids import QUEUE_ID_LENGTH, new_queue_id, valid_queue_id
from recordingfs import Crash, RecordingFS
from relay.queue.operations import MAX_BATCH
from relay.queue.schema import STORE_VERSION, QueueSummary, StoreError
from relay.queue.store import (
    STORE_FILE,
    OsFileSystem,
    Spool,
    SpoolService,
)

REPO = Path(__file__).resolve().parent.parent
LARGE = 1000  # the large-message threshold the tests give the store

MESSAGE = (
    b"Received: from client.example ([192.0.2.7])\r\n"
    b"From: =?utf-8?q?J=C3=B6rg?= <j\xc3\xb6rg@ex\xc3\xa4mple.test>\r\n"
    b"Subject: bytes\r\n\r\n"
    b"8-bit \xff\xfe\x80 and NUL \x00\x00 and a lone \r and \n kept as given\r\n"
)
BIG = b"".join(b"line %05d of a large message \xe2\x82\xac \x00\r\n" % i for i in range(120))  # over LARGE


def sync_runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """Run each transaction at once, on the calling thread."""
    return defer.maybeDeferred(f, *args)


class ManualRunner:
    """Holds each transaction until the test runs it, like a writer thread that has not finished.

    ``execute`` runs the transaction; ``finish`` then delivers its result (the
    thread's answer reaching the reactor); ``run`` does both.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple, defer.Deferred]] = []
        self.results: dict[int, Any] = {}
        self.done: set[int] = set()

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def execute(self, index: int) -> None:
        f, args, _ = self.calls[index]
        try:
            self.results[index] = f(*args)
        except Exception:
            self.results[index] = Failure()

    def finish(self, index: int) -> None:
        _, _, d = self.calls[index]
        self.done.add(index)
        result = self.results.pop(index)
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    def run(self, index: int) -> None:
        self.execute(index)
        self.finish(index)

    def fail(self, index: int, error: Exception) -> None:
        """The runner fails without running the transaction."""
        self.done.add(index)
        self.calls[index][2].errback(error)

    def run_all(self) -> None:
        """Run every transaction, including those submitted meanwhile, in order."""
        index = 0
        while index < len(self.calls):
            if index not in self.done:
                self.run(index)
            index += 1


class FailingFS(OsFileSystem):
    """The real filesystem, except that the calls named in ``failing`` fail with ENOSPC."""

    def __init__(self, *failing: str) -> None:
        self.failing = set(failing)

    def _maybe_fail(self, name: str) -> None:
        if name in self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        self._maybe_fail("open")
        return super().open(path, flags, mode)

    def write(self, fd: int, data: bytes) -> int:
        self._maybe_fail("write")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        super().fsync(fd)

    def rename(self, src: str, dst: str) -> None:
        self._maybe_fail("rename")
        super().rename(src, dst)

    def fsync_dir(self, path: str) -> None:
        self._maybe_fail("fsync_dir")
        super().fsync_dir(path)


class FailingConnection:
    """A sqlite3 connection whose ``fail_at``-th execute (counted from ``arm``) raises a disk I/O error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail_at: Optional[int] = None
        self.count = 0
        self.hit = False

    def arm(self, fail_at: Optional[int]) -> None:
        self.fail_at, self.count, self.hit = fail_at, 0, False

    def execute(self, sql: str, *params: Any) -> Any:
        self.count += 1
        if self.count == self.fail_at:
            self.hit = True
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class FailingSpool(Spool):
    """A store whose writing connection (batches) and reading connection (``*_sync``) can fail on demand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writer_failing: Optional[FailingConnection] = None
        self.reader_failing: Optional[FailingConnection] = None

    def _writing(self) -> Any:
        if self.writer_failing is None:
            self.writer_failing = FailingConnection(super()._writing())
        return self.writer_failing

    def _conn(self) -> Any:
        if self.reader_failing is None:
            self.reader_failing = FailingConnection(super()._conn())
        return self.reader_failing


class WatchedConnection:
    """A sqlite3 connection that calls ``watch(sql)`` before it executes each statement."""

    def __init__(self, conn: sqlite3.Connection, watch: Callable[[str], None]) -> None:
        self._conn = conn
        self._watch = watch

    def execute(self, sql: str, *params: Any) -> Any:
        self._watch(sql)
        return self._conn.execute(sql, *params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class WatchedSpool(Spool):
    """A store whose reading connection (the one ``*_sync`` write with) reports each statement."""

    def __init__(self, *args: Any, watch: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watch = watch

    def _conn(self) -> Any:
        return WatchedConnection(super()._conn(), self.watch)


class DeferredCalls:
    """Stands in for the store's large-file I/O threads: each call waits until the test runs it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple, defer.Deferred]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def run_all(self) -> None:
        while self.calls:
            f, args, d = self.calls.pop(0)
            try:
                result = f(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)


def make_envelope(queue_id: str, **changes: Any) -> Envelope:
    envelope = Envelope(
        queue_id=queue_id,
        sender="jörg@exämple.test",
        recipients=(
            Recipient(address="alice@example.org",
                      params=(("NOTIFY", "FAILURE,DELAY"), ("ORCPT", "rfc822;alice@example.org"))),
            Recipient(
                address="bøb@exämple.net",
                source_route=("hop1.example", "hop2.example"),
                attempts=2,
                last_error="451 4.3.0 try later",
                next_attempt=1700003600.5,
                history=(Attempt(time=1700000000.25, outcome="transient", code=451, status="4.3.0", text="try later",
                                 host="mx.exämple.net", remote=True, rule="mx", tls="TLSv1.3"),),
                warned=True,
            ),
            Recipient(address="carol@example.com", status=FAILED, attempts=1, last_error="550 5.1.1 no such user"),
        ),
        client=ClientInfo(address="192.0.2.7", port=40000, helo="client.example", protocol="ESMTPSA",
                          trusted=True, auth_user="app1", tls="TLSv1.3 TLS_AES_128_GCM_SHA256"),
        arrival=1700000000.5,
        body_type="8BITMIME",
        smtputf8=True,
        mail_params=(("RET", "HDRS"), ("ENVID", "abc123")),
    )
    return replace(envelope, **changes)


def store(spool: Spool, data: bytes = MESSAGE, chunk: int = 7, **changes: Any) -> defer.Deferred:
    """Receive ``data`` in chunks and commit it; returns the commit Deferred."""
    message = spool.new_message()
    for i in range(0, len(data), chunk):
        message.write(data[i : i + chunk])
    return message.commit(make_envelope(message.queue_id, **changes))


def listing(directory: Path, sub: str) -> list[str]:
    path = directory / sub
    return sorted(os.listdir(path)) if path.exists() else []


def corrupt_row(directory: Path, queue_id: str, data: bytes) -> None:
    """Overwrite a stored envelope's JSON behind the store's back."""
    conn = sqlite3.connect(str(directory / STORE_FILE))
    try:
        conn.execute("UPDATE envelope SET data = ? WHERE id = ?", (data, queue_id))
        conn.commit()
    finally:
        conn.close()


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        base = tempfile.mkdtemp(prefix="relay-store-test-")
        self.addCleanup(shutil.rmtree, base, True)
        self.base = Path(base)
        self.root = self.base / "spool"
        self.clock = Clock()
        self.clock.advance(1700000000)

    def spool(self, root: Optional[Path] = None, recover: bool = True, cls: type = Spool, **kwargs: Any) -> Spool:
        kwargs.setdefault("runner", sync_runner)
        kwargs.setdefault("clock", self.clock)
        if kwargs["runner"] is None:  # the store's own threads report to the real reactor
            kwargs.setdefault("reactor", global_reactor)
        spool = cls(str(root or self.root), **kwargs)
        self.addCleanup(spool.close)
        if recover:
            spool.recover()
        return spool

    def read_back(self, spool: Spool, queue_id: str) -> bytes:
        with spool.open_message(queue_id) as f:
            return f.read()

    def assert_complete(self, spool: Spool, queue_id: str, data: bytes = MESSAGE, **changes: Any) -> Envelope:
        envelope = spool.load(queue_id)
        self.assertEqual(envelope, make_envelope(queue_id, size=len(data), **changes))
        self.assertEqual(self.read_back(spool, queue_id), data)
        return envelope


# -- round trips -----------------------------------------------------------------------


class RoundTripTests(StoreTestCase):
    def test_bytes_and_envelope_round_trip_exactly(self) -> None:
        """Committed bytes (8-bit, NUL, lone CR and LF) and every envelope field come back unchanged."""
        spool = self.spool()
        message = spool.new_message()
        for i in range(0, len(MESSAGE), 5):
            message.write(MESSAGE[i : i + 5])
        queue_id = self.successResultOf(message.commit(make_envelope(message.queue_id)))
        self.assertEqual(queue_id, message.queue_id)
        self.assertEqual(spool.load(queue_id), make_envelope(queue_id, size=len(MESSAGE)))
        self.assertEqual(spool.message_bytes(queue_id), MESSAGE)
        self.assertEqual(self.read_back(spool, queue_id), MESSAGE)
        self.assertEqual(spool.ids(), [queue_id])

    def test_size_counts_octets_written_whatever_the_envelope_said(self) -> None:
        """The stored size is the number of octets written (not characters, not the envelope's figure)."""
        spool = self.spool()
        data = "Subject: ünïcödé €\r\n\r\n".encode("utf-8")
        message = spool.new_message()
        message.write(data)
        self.assertEqual(message.size, len(data))
        queue_id = self.successResultOf(message.commit(make_envelope(message.queue_id, size=5)))
        self.assertEqual(spool.load(queue_id).size, len(data))
        self.assertNotEqual(len(data), len(data.decode("utf-8")))

    def test_empty_message_round_trips(self) -> None:
        """A message of no octets is stored as empty bytes, not as a large message."""
        spool = self.spool()
        queue_id = self.successResultOf(store(spool, b""))
        self.assertEqual(spool.message_bytes(queue_id), b"")
        self.assertEqual(self.read_back(spool, queue_id), b"")
        self.assertEqual(spool.ids(), [queue_id])

    def test_committed_message_survives_a_restart(self) -> None:
        """A new store object on the same directory finds the message, its bytes and envelope."""
        spool = self.spool()
        small = self.successResultOf(store(spool))
        spool.close()
        again = self.spool(large_message=LARGE)
        large = self.successResultOf(store(again, BIG))
        again.close()
        third = self.spool(large_message=LARGE, recover=False)
        report = third.recover()
        self.assertEqual(report.count, 2)
        self.assertEqual((report.removed_tmp, report.removed_orphans, report.imported), (0, 0, 0))
        self.assertEqual(sorted(third.ids()), sorted([small, large]))
        self.assert_complete(third, small)
        self.assert_complete(third, large, BIG)

    def test_unknown_or_unsafe_ids_are_key_errors(self) -> None:
        """load, peek, message_bytes and open_message raise KeyError for ids not queued or unsafe as names."""
        missing = self.spool(self.base / "never-created", recover=False)
        spool = self.spool()
        self.successResultOf(store(spool))
        for queue_id in ("0000000000000000", "../spool/queue", "a/b", "", "x.msg", "é", "a" * 65, "a\x00"):
            for s in (spool, missing):
                for read in (s.load, s.peek, s.message_bytes, s.open_message):
                    with self.assertRaises(KeyError, msg=(read.__name__, queue_id)):
                        read(queue_id)
        self.assertFalse((self.base / "never-created").exists())

    def test_commit_with_an_envelope_for_another_id_fails_and_stores_nothing(self) -> None:
        """Committing another message's envelope errbacks with ValueError and leaves no row or file."""
        spool = self.spool(large_message=LARGE)
        for data in (MESSAGE, BIG):
            message = spool.new_message()
            message.write(data)
            other = spool.new_message()
            failure = self.failureResultOf(message.commit(make_envelope(other.queue_id)), ValueError)
            self.assertIn(message.queue_id, str(failure.value))
            self.failureResultOf(message.commit(make_envelope(message.queue_id)), ValueError)
        self.assertEqual(spool.ids(), [])
        self.assertEqual(listing(self.root, "tmp"), [])
        self.assertEqual(listing(self.root, "large"), [])

    def test_abort_is_idempotent_and_leaves_no_tmp_file(self) -> None:
        """abort removes a large message's file under tmp/, twice is harmless, and nothing is queued."""
        spool = self.spool(large_message=LARGE)
        message = spool.new_message()
        message.write(BIG)
        self.assertEqual(listing(self.root, "tmp"), [message.queue_id + ".msg"])
        message.abort()
        message.abort()
        self.assertEqual(listing(self.root, "tmp"), [])
        self.failureResultOf(message.commit(make_envelope(message.queue_id)), ValueError)
        self.assertRaises(ValueError, message.write, b"more")
        small = spool.new_message()
        small.write(MESSAGE)
        small.abort()
        small.abort()
        self.assertEqual(spool.ids(), [])
        self.assertEqual(listing(self.root, "tmp"), [])
        self.assertEqual(listing(self.root, "large"), [])

    def test_a_message_commits_only_once(self) -> None:
        """A second commit of one message errbacks with ValueError and stores no second row."""
        spool = self.spool()
        message = spool.new_message()
        message.write(MESSAGE)
        queue_id = self.successResultOf(message.commit(make_envelope(message.queue_id)))
        self.failureResultOf(message.commit(make_envelope(message.queue_id, held=True)), ValueError)
        self.assertEqual(spool.ids(), [queue_id])
        self.assertFalse(spool.load(queue_id).held)


# -- large messages --------------------------------------------------------------------


class LargeMessageTests(StoreTestCase):
    def test_bytes_over_the_threshold_go_to_a_file_in_large(self) -> None:
        """large_message octets stay in the database; one more goes to large/<id>.msg and nothing is left in tmp/."""
        spool = self.spool(large_message=LARGE)
        at = self.successResultOf(store(spool, BIG[:LARGE]))
        over = self.successResultOf(store(spool, BIG[: LARGE + 1]))
        self.assertEqual(spool.message_bytes(at), BIG[:LARGE])
        self.assertIsNone(spool.message_bytes(over))
        self.assertEqual(listing(self.root, "large"), [over + ".msg"])
        self.assertEqual((self.root / "large" / (over + ".msg")).read_bytes(), BIG[: LARGE + 1])
        self.assertEqual(spool.large_path(over), str(self.root / "large" / (over + ".msg")))
        self.assert_complete(spool, over, BIG[: LARGE + 1])
        self.assert_complete(spool, at, BIG[:LARGE])
        self.assertEqual(listing(self.root, "tmp"), [])

    def test_a_message_over_the_write_buffer_is_stored_whole(self) -> None:
        """A message of several write buffers, written in odd chunks, is stored byte for byte."""
        spool = self.spool(large_message=LARGE)
        data = hashlib.sha256(b"seed").digest() * 40000  # 1.28 MB
        queue_id = self.successResultOf(store(spool, data, chunk=65521))
        self.assertEqual((self.root / "large" / (queue_id + ".msg")).read_bytes(), data)
        self.assertEqual(spool.load(queue_id).size, len(data))

    def test_remove_deletes_the_large_file(self) -> None:
        """remove and remove_sync delete a large message's rows and its file."""
        spool = self.spool(large_message=LARGE)
        first = self.successResultOf(store(spool, BIG))
        second = self.successResultOf(store(spool, BIG))
        keep = self.successResultOf(store(spool, BIG))
        self.successResultOf(spool.remove(first))
        spool.remove_sync(second)
        self.assertEqual(spool.ids(), [keep])
        self.assertEqual(listing(self.root, "large"), [keep + ".msg"])
        self.assertRaises(KeyError, spool.open_message, first)

    def test_recover_deletes_unacknowledged_large_files_and_empties_tmp(self) -> None:
        """recover deletes every large/ file without a row and everything in tmp/, and keeps the rest."""
        spool = self.spool(large_message=LARGE)
        kept = self.successResultOf(store(spool, BIG))
        small = self.successResultOf(store(spool))
        spool.close()
        (self.root / "large" / "0000000000000001.msg").write_bytes(b"never acknowledged")
        (self.root / "large" / (small + ".msg")).write_bytes(b"a small message has no file")
        (self.root / "large" / "junk").write_bytes(b"?")
        (self.root / "tmp" / "0000000000000002.msg").write_bytes(b"still arriving")
        (self.root / "tmp" / "other").write_bytes(b"?")
        report = self.spool(large_message=LARGE, recover=False).recover()
        self.assertEqual((report.removed_orphans, report.removed_tmp, report.count), (3, 2, 2))
        self.assertEqual(listing(self.root, "large"), [kept + ".msg"])
        self.assertEqual(listing(self.root, "tmp"), [])
        again = self.spool(large_message=LARGE)
        self.assert_complete(again, kept, BIG)
        self.assert_complete(again, small)

    def test_a_large_commit_makes_its_file_durable_before_the_transaction(self) -> None:
        """The file is written, fsynced, closed, renamed into large/ and large/ fsynced, then the row is committed."""
        events: list = []
        fs = RecordingFS(events)

        def runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
            events.append(("transaction",))
            return defer.maybeDeferred(f, *args)

        spool = self.spool(large_message=LARGE, fs=fs, runner=runner)
        fs.arm(None)
        queue_id = self.successResultOf(store(spool, BIG))
        tmp = str(self.root / "tmp" / (queue_id + ".msg"))
        large = str(self.root / "large" / (queue_id + ".msg"))
        compact = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]  # one entry per run of writes
        self.assertEqual(compact, [
            ("open", tmp), ("write", tmp), ("fsync", tmp), ("close", tmp),
            ("rename", tmp, large), ("fsync_dir", str(self.root / "large")), ("transaction",),
        ])


# -- reading for the daemon ----------------------------------------------------------


class DaemonReadTests(StoreTestCase):
    def test_message_opener_gives_the_bytes_of_small_and_large_messages(self) -> None:
        """message_opener fires with a function opening exactly the stored bytes, from memory or the file."""
        spool = self.spool(large_message=LARGE)
        heard: list = []
        spool.on_commit(lambda queue_id, envelope: heard.append(queue_id))
        small = self.successResultOf(store(spool))
        large = self.successResultOf(store(spool, BIG))
        for queue_id, data in ((small, MESSAGE), (small, MESSAGE), (large, BIG)):  # small twice: memory, database
            opener = self.successResultOf(spool.message_opener(queue_id))
            with opener() as f:
                self.assertEqual(f.read(), data)
        self.assertEqual(heard, [small, large])
        self.failureResultOf(spool.message_opener("0000000000000000"), KeyError)

    def test_message_opener_of_a_removed_message_is_not_served_from_memory(self) -> None:
        """After remove, the bytes kept in memory for the first attempt are gone: KeyError."""
        spool = self.spool()
        spool.on_commit(lambda queue_id, envelope: None)
        queue_id = self.successResultOf(store(spool))
        self.successResultOf(spool.remove(queue_id))
        self.failureResultOf(spool.message_opener(queue_id), KeyError)

    def test_read_summary_and_summaries_answer_like_the_blocking_calls(self) -> None:
        """read, summary and summaries fire with what load, peek and all_summaries return."""
        spool = self.spool()
        queue_id = self.successResultOf(store(spool))
        self.assertEqual(self.successResultOf(spool.read(queue_id)), spool.load(queue_id))
        self.assertEqual(self.successResultOf(spool.summary(queue_id)), spool.peek(queue_id))
        self.assertEqual(self.successResultOf(spool.summaries()), spool.all_summaries())
        self.failureResultOf(spool.read("0000000000000000"), KeyError)


# -- group commit ---------------------------------------------------------------------


class GroupCommitTests(StoreTestCase):
    def test_commits_arriving_during_a_batch_share_the_next_batch(self) -> None:
        """While one batch runs, new commits accumulate and then go together in one runner call."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        first = store(spool)
        self.assertEqual(len(runner.calls), 1)
        rest = [store(spool) for _ in range(5)]
        self.assertEqual(len(runner.calls), 1)
        runner.run(0)
        first_id = self.successResultOf(first)
        self.assertEqual(len(runner.calls), 2)
        for d in rest:
            self.assertNoResult(d)
        runner.run(1)
        stored = [self.successResultOf(d) for d in rest]
        self.assertEqual(len(runner.calls), 2)
        self.assertEqual(spool.ids(), sorted([first_id, *stored]))

    def test_nothing_fires_before_its_batch_runner_call_completes(self) -> None:
        """A commit whose transaction has run fires only when the runner's Deferred does."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        d = store(spool)
        self.assertNoResult(d)
        runner.execute(0)
        self.assertNoResult(d)
        self.assertEqual(len(self.spool(recover=False).ids()), 1)  # durable already
        runner.finish(0)
        self.assertIn(self.successResultOf(d), spool.ids())

    def test_updates_and_removes_join_batches(self) -> None:
        """A modify, an update, a remove and a commit submitted during a batch share one runner call."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        a, b, c = store(spool), store(spool), store(spool)
        runner.run_all()
        a, b, c = (self.successResultOf(d) for d in (a, b, c))
        blocker = spool.modify(a, lambda e: replace(e, sender=""))
        calls = len(runner.calls)
        modified = spool.modify(a, lambda e: replace(e, held=True))
        updated = spool.update(make_envelope(b, size=len(MESSAGE), held=True))
        removed = spool.remove(c)
        new = store(spool)
        self.assertEqual(len(runner.calls), calls)
        runner.run(calls - 1)
        self.successResultOf(blocker)
        self.assertEqual(len(runner.calls), calls + 1)
        for d in (modified, updated, removed, new):
            self.assertNoResult(d)
        runner.run(calls)
        stored = self.successResultOf(modified)
        self.assertEqual((stored.sender, stored.held), ("", True))
        self.assertIsNone(self.successResultOf(updated))
        self.assertIsNone(self.successResultOf(removed))
        new_id = self.successResultOf(new)
        self.assertEqual(spool.ids(), [a, b, new_id])
        self.assertTrue(spool.load(b).held)

    def test_operations_on_one_message_in_a_batch_run_in_submission_order(self) -> None:
        """In one batch, a modify before a remove sees the message; a modify after it finds it gone."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        a, b = store(spool), store(spool)
        runner.run_all()
        a, b = self.successResultOf(a), self.successResultOf(b)
        blocker = store(spool)
        calls = len(runner.calls)
        modified = spool.modify(a, lambda e: replace(e, held=True))
        removed_a = spool.remove(a)
        removed_b = spool.remove(b)
        too_late = spool.modify(b, lambda e: replace(e, held=True))
        runner.run_all()
        blocker_id = self.successResultOf(blocker)
        self.assertTrue(self.successResultOf(modified).held)
        self.successResultOf(removed_a)
        self.successResultOf(removed_b)
        self.failureResultOf(too_late, KeyError)
        self.assertEqual(spool.ids(), [blocker_id])
        self.assertEqual(len(runner.calls), calls + 1)  # the four shared one transaction

    def test_a_long_queue_of_operations_is_split_into_batches_of_max_batch(self) -> None:
        """More than MAX_BATCH pending operations go in batches of at most MAX_BATCH, all in order."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        blocker = store(spool)
        rest = [store(spool, b"%d" % i) for i in range(MAX_BATCH + 1)]
        runner.run(0)
        self.assertEqual(len(runner.calls), 2)
        runner.run(1)
        self.assertEqual([d.called for d in rest], [True] * MAX_BATCH + [False])
        self.assertNoResult(rest[-1])
        self.assertEqual(len(runner.calls), 3)
        runner.run(2)
        stored = [self.successResultOf(d) for d in rest]
        self.assertEqual(len(spool.ids()), MAX_BATCH + 2)
        self.assertEqual([spool.message_bytes(q) for q in stored[:3]], [b"0", b"1", b"2"])
        self.successResultOf(blocker)

    def batch_sizes(self, runner: ManualRunner) -> list[int]:
        return [len(args[0]) for _, args, _ in runner.calls]

    def test_a_lazy_change_waits_for_lazy_delay_or_goes_with_a_new_message(self) -> None:
        """A removal alone starts its transaction lazy_delay later; a new message takes it along at once."""
        runner = ManualRunner()
        spool = self.spool(runner=runner, lazy_delay=0.05)
        a, b = store(spool), store(spool)
        runner.run_all()
        a, b = self.successResultOf(a), self.successResultOf(b)
        calls = len(runner.calls)
        removed = spool.remove(a)
        self.clock.advance(0.049)
        self.assertEqual(len(runner.calls), calls)
        self.clock.advance(0.001)
        self.assertEqual(self.batch_sizes(runner)[calls:], [1])
        runner.run(calls)
        self.successResultOf(removed)
        removed = spool.remove(b)
        new = store(spool)
        self.assertEqual(self.batch_sizes(runner)[calls + 1:], [2])
        runner.run(calls + 1)
        self.successResultOf(removed)
        self.assertEqual(spool.ids(), [self.successResultOf(new)])
        self.clock.advance(1)
        self.assertEqual(len(runner.calls), calls + 2)  # the lazy timer went with it

    def test_a_new_message_with_no_other_session_open_starts_at_once(self) -> None:
        """With commit_delay, a new message while only its own session is open does not wait."""
        runner = ManualRunner()
        spool = self.spool(runner=runner, commit_delay=0.002)
        spool.watch_sessions(lambda: 1)
        store(spool)
        self.assertEqual(self.batch_sizes(runner), [1])

    def test_a_new_message_waits_up_to_commit_delay_for_other_open_sessions(self) -> None:
        """Sessions open that have not brought a message: the first new message waits commit_delay, no longer."""
        runner = ManualRunner()
        spool = self.spool(runner=runner, commit_delay=0.002)
        spool.watch_sessions(lambda: 4)
        first = store(spool)
        self.clock.advance(0.0015)
        second = store(spool)
        self.clock.advance(0.0004)
        self.assertEqual(runner.calls, [])
        self.clock.advance(0.0002)
        self.assertEqual(self.batch_sizes(runner), [2])
        runner.run(0)
        self.assertEqual(spool.ids(), sorted([self.successResultOf(first), self.successResultOf(second)]))
        self.clock.advance(1)
        self.assertEqual(len(runner.calls), 1)

    def test_the_wait_ends_once_every_open_session_brought_its_message(self) -> None:
        """Two sessions open and two new messages pending: their transaction starts without waiting out the delay."""
        runner = ManualRunner()
        spool = self.spool(runner=runner, commit_delay=0.002)
        spool.watch_sessions(lambda: 2)
        store(spool)
        self.assertEqual(runner.calls, [])
        store(spool)
        self.assertEqual(self.batch_sizes(runner), [2])

    def test_messages_that_came_during_a_transaction_do_not_wait_again(self) -> None:
        """New messages that waited through a running transaction longer than commit_delay go when it ends."""
        runner = ManualRunner()
        spool = self.spool(runner=runner, commit_delay=0.002)
        spool.watch_sessions(lambda: 10)
        store(spool)
        self.clock.advance(0.002)
        self.assertEqual(self.batch_sizes(runner), [1])
        store(spool)
        store(spool)
        self.clock.advance(0.005)  # the writer is slow
        runner.run(0)
        self.assertEqual(self.batch_sizes(runner), [1, 2])

    def test_a_waiting_removal_does_not_hold_a_new_message_past_commit_delay(self) -> None:
        """A removal waiting its lazy_delay: a new message with company waits only commit_delay, and both go."""
        runner = ManualRunner()
        spool = self.spool(runner=runner, lazy_delay=0.05, commit_delay=0.002)
        existing = store(spool)
        runner.run(0)
        existing = self.successResultOf(existing)
        spool.watch_sessions(lambda: 3)
        removed = spool.remove(existing)
        new = store(spool)
        self.assertEqual(len(runner.calls), 1)
        self.clock.advance(0.002)
        self.assertEqual(self.batch_sizes(runner), [1, 2])
        runner.run(1)
        self.successResultOf(removed)
        self.assertEqual(spool.ids(), [self.successResultOf(new)])

    def test_stop_waits_for_pending_batches(self) -> None:
        """stop fires only once every operation submitted before it is durable."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        first = store(spool)
        second = store(spool)
        stopped = spool.stop()
        self.assertNoResult(stopped)
        runner.run(0)
        self.successResultOf(first)
        self.assertNoResult(stopped)
        runner.run(1)
        self.successResultOf(second)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIsNone(self.successResultOf(spool.stop()))

    def test_stop_waits_for_a_commit_whose_large_file_is_still_being_written(self) -> None:
        """stop does not fire while a committed large message is still on its way to the database."""
        spool = self.spool(large_message=LARGE)
        io = DeferredCalls()
        spool._io_call = io  # type: ignore[method-assign]  # the I/O threads, held
        message = spool.new_message()
        message.write(BIG)
        committed = message.commit(make_envelope(message.queue_id))
        stopped = spool.stop()
        stopped_early = stopped.called
        io.run_all()
        self.successResultOf(committed)
        self.successResultOf(stopped)
        self.assertFalse(stopped_early)

    def test_listeners_hear_of_durable_messages_after_every_deferred_of_the_batch(self) -> None:
        """on_commit listeners get (queue_id, stored envelope) for each new message, once the whole batch fired."""
        runner = ManualRunner()
        spool = self.spool(runner=runner, large_message=LARGE)
        existing = store(spool)
        runner.run(0)
        existing = self.successResultOf(existing)
        heard: list = []
        results: list = []
        blocker = spool.modify(existing, lambda e: replace(e, held=True))
        commits = [store(spool), store(spool, BIG), store(spool)]
        modify = spool.modify(existing, lambda e: replace(e, held=False))
        for d in commits:
            d.addCallback(lambda queue_id: results.append(queue_id) or queue_id)
        spool.on_commit(lambda queue_id, envelope: heard.append((queue_id, envelope, len(results))))
        runner.run(1)
        self.successResultOf(blocker)
        self.assertEqual(heard, [])
        runner.run(2)
        self.successResultOf(modify)
        self.assertEqual(len(heard), 3)
        sizes = [len(MESSAGE), len(BIG), len(MESSAGE)]
        for (queue_id, envelope, fired), d, size in zip(heard, commits, sizes):
            self.assertEqual(queue_id, self.successResultOf(d))
            self.assertEqual(envelope, make_envelope(queue_id, size=size))
            self.assertEqual(fired, 3)

    def test_a_broken_listener_does_not_spoil_the_commit(self) -> None:
        """A listener that raises is logged; the commit still fires with its id and other listeners still hear."""
        spool = self.spool()
        heard: list = []
        spool.on_commit(lambda queue_id, envelope: 1 / 0)
        spool.on_commit(lambda queue_id, envelope: heard.append(queue_id))
        queue_id = self.successResultOf(store(spool))
        self.assertEqual(heard, [queue_id])
        self.assertEqual(spool.ids(), [queue_id])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


# -- failures ------------------------------------------------------------------------


class FailureTests(StoreTestCase):
    def test_a_failing_runner_errbacks_every_operation_of_the_batch(self) -> None:
        """When the runner fails, every Deferred of its batch errbacks, nothing is stored and nobody hears."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        existing = store(spool)
        runner.run(0)
        existing = self.successResultOf(existing)
        heard: list = []
        spool.on_commit(lambda queue_id, envelope: heard.append(queue_id))
        blocker = store(spool)
        batch = [store(spool), store(spool), spool.modify(existing, lambda e: replace(e, held=True)),
                 spool.remove(existing)]
        runner.run(1)
        blocker_id = self.successResultOf(blocker)
        heard.clear()
        runner.fail(2, RuntimeError("no thread"))
        for d in batch:
            self.failureResultOf(d, RuntimeError)
        self.assertEqual(heard, [])
        self.assertEqual(spool.ids(), sorted([existing, blocker_id]))
        self.assertFalse(spool.load(existing).held)

    def test_a_runner_that_raises_errbacks_the_commit(self) -> None:
        """A runner that raises instead of returning a Deferred fails the commit, and the store still works after."""
        broken = [True]

        def runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
            if broken[0]:
                raise RuntimeError("no thread")
            return defer.maybeDeferred(f, *args)

        spool = self.spool(runner=runner)
        self.failureResultOf(store(spool), RuntimeError)
        self.assertEqual(spool.ids(), [])
        broken[0] = False
        queue_id = self.successResultOf(store(spool))
        self.assertEqual(spool.ids(), [queue_id])

    def test_an_operation_failing_on_its_own_fails_alone(self) -> None:
        """An unknown id, a raising change or a change to another id fails alone; the rest of the batch commits."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        existing = store(spool)
        runner.run(0)
        existing = self.successResultOf(existing)

        def broken(envelope: Envelope) -> Envelope:
            raise RuntimeError("bad change")

        blocker = store(spool)
        before = store(spool)
        unknown = spool.modify("0000000000000000", lambda e: e)
        raising = spool.modify(existing, broken)
        renaming = spool.modify(existing, lambda e: replace(e, queue_id="0000000000000000"))
        held = spool.modify(existing, lambda e: replace(e, held=True))
        after = store(spool)
        runner.run_all()
        self.assertEqual(len(runner.calls), 3)
        self.failureResultOf(unknown, KeyError)
        self.failureResultOf(raising, RuntimeError)
        self.failureResultOf(renaming, ValueError)
        self.assertTrue(self.successResultOf(held).held)
        new = [self.successResultOf(d) for d in (blocker, before, after)]
        self.assertEqual(spool.ids(), sorted([existing, *new]))
        self.assertEqual(spool.load(existing), make_envelope(existing, size=len(MESSAGE), held=True))

    def test_a_database_error_at_any_statement_fails_the_whole_batch(self) -> None:
        """A disk I/O error at any statement of a batch fails all of it, stores nothing of it, removes
        its new large files, keeps the files of messages it would have removed, and the next batch works."""
        clean = None
        for fail_at in range(1, 100):
            runner = ManualRunner()
            root = self.base / f"fail-{fail_at}"
            spool = self.spool(root, cls=FailingSpool, runner=runner, large_message=LARGE)
            assert isinstance(spool, FailingSpool)
            keep, doomed = store(spool), store(spool, BIG)
            runner.run_all()
            keep, doomed = self.successResultOf(keep), self.successResultOf(doomed)
            heard: list = []
            spool.on_commit(lambda queue_id, envelope: heard.append(queue_id))
            blocker = spool.modify(keep, lambda e: replace(e, sender=""))
            batch = [store(spool), store(spool, BIG), store(spool),
                     spool.modify(keep, lambda e: replace(e, held=True)), spool.remove(doomed)]
            runner.run(len(runner.calls) - 1)
            self.successResultOf(blocker)
            assert spool.writer_failing is not None
            spool.writer_failing.arm(fail_at)
            runner.run_all()
            hit = spool.writer_failing.hit
            spool.writer_failing.arm(None)
            if not hit:
                clean = fail_at
                for d in batch:
                    self.successResultOf(d)
                self.assertEqual(len(spool.ids()), 4)
                break
            for d in batch:
                failure = self.failureResultOf(d, sqlite3.OperationalError)
                self.assertEqual(str(failure.value), "disk I/O error")
            self.assertEqual(heard, [], fail_at)
            self.assertEqual(spool.ids(), sorted([keep, doomed]), fail_at)
            self.assertEqual(spool.load(keep), make_envelope(keep, sender="", size=len(MESSAGE)), fail_at)
            self.assertEqual(listing(root, "large"), [doomed + ".msg"], fail_at)
            self.assertEqual(self.read_back(spool, doomed), BIG, fail_at)
            self.assertEqual(listing(root, "tmp"), [], fail_at)
            later_d = store(spool)
            runner.run_all()
            later = self.successResultOf(later_d)  # the store is not wedged
            self.assertEqual(spool.ids(), sorted([keep, doomed, later]), fail_at)
        self.assertIsNotNone(clean)
        self.assertGreater(clean, 10)  # BEGIN, two INSERTs per commit, modify, remove, COMMIT

    def test_a_database_error_in_remove_sync_removes_nothing(self) -> None:
        """A disk I/O error half way through remove_sync leaves both rows and the large file in place."""
        spool = self.spool(cls=FailingSpool, large_message=LARGE)
        assert isinstance(spool, FailingSpool)
        queue_id = self.successResultOf(store(spool, BIG))
        self.assertEqual(spool.ids(), [queue_id])  # the wrapped reading connection exists before it is armed
        assert spool.reader_failing is not None
        spool.reader_failing.arm(4)  # BEGIN, SELECT body, DELETE envelope, DELETE body
        self.assertRaises(sqlite3.OperationalError, spool.remove_sync, queue_id)
        self.assertTrue(spool.reader_failing.hit)
        spool.reader_failing.arm(None)
        self.assertEqual(spool.ids(), [queue_id])
        self.assert_complete(spool, queue_id, BIG)

    def test_a_large_file_write_failing_fails_the_commit_and_queues_nothing(self) -> None:
        """ENOSPC while writing a large message's file errbacks the commit with it and leaves no file."""
        spool = self.spool(large_message=LARGE, fs=FailingFS("write"))
        heard: list = []
        spool.on_commit(lambda queue_id, envelope: heard.append(queue_id))
        message = spool.new_message()
        for i in range(0, len(BIG), 100):
            message.write(BIG[i : i + 100])  # never raises
        failure = self.failureResultOf(message.commit(make_envelope(message.queue_id)), OSError)
        self.assertEqual(failure.value.errno, errno.ENOSPC)
        self.assertEqual((spool.ids(), heard), ([], []))
        self.assertEqual(listing(self.root, "tmp"), [])
        self.assertEqual(listing(self.root, "large"), [])
        self.assertEqual(self.successResultOf(store(spool)), spool.ids()[0])  # small messages still work

    def test_any_large_file_call_failing_fails_the_commit_and_queues_nothing(self) -> None:
        """ENOSPC on open, fsync, rename or the directory fsync fails the commit; no row, nothing in large/."""
        for call in ("fsync", "rename", "fsync_dir"):
            root = self.base / call
            fs = FailingFS()
            spool = self.spool(root, large_message=LARGE, fs=fs)
            fs.failing.add(call)
            failure = self.failureResultOf(store(spool, BIG), OSError)
            self.assertEqual(failure.value.errno, errno.ENOSPC, call)
            self.assertEqual(spool.ids(), [], call)
            self.assertEqual(listing(root, "large"), [], call)

    def test_a_failing_open_of_the_large_file_fails_the_commit_with_that_error(self) -> None:
        """ENOSPC creating a large message's file errbacks the commit with that OSError and queues nothing."""
        spool = self.spool(large_message=LARGE, fs=FailingFS("open"))
        outcome: list = []
        store(spool, BIG).addBoth(outcome.append)
        self.assertEqual(spool.ids(), [])
        self.assertEqual(listing(self.root, "tmp"), [])
        [failure] = outcome
        self.assertIsInstance(failure, Failure)
        failure.trap(OSError)
        self.assertEqual(failure.value.errno, errno.ENOSPC)

    def test_a_failing_fsync_leaves_nothing_in_tmp(self) -> None:
        """After the fsync of a large message's file fails, its temporary file is gone."""
        spool = self.spool(large_message=LARGE, fs=FailingFS("fsync"))
        self.failureResultOf(store(spool, BIG), OSError)
        self.assertEqual(listing(self.root, "tmp"), [])


# -- crashes -------------------------------------------------------------------------


class CrashTests(StoreTestCase):
    def crashed_then_recovered(self, root: Path) -> tuple[Spool, Any]:
        spool = self.spool(root, large_message=LARGE, recover=False)
        return spool, spool.recover()

    def assert_clean(self, spool: Spool, root: Path) -> None:
        """No tmp/ file, and exactly one large/ file for each large row."""
        self.assertEqual(listing(root, "tmp"), [])
        large = sorted(q + ".msg" for q in spool.ids() if spool.message_bytes(q) is None)
        self.assertEqual(listing(root, "large"), large)

    def test_crash_at_every_step_of_a_large_commit(self) -> None:
        """A crash at any filesystem call of a large commit leaves, after recovery, the whole message
        exactly when its commit had fired and nothing at all otherwise."""
        data = hashlib.sha256(b"crash").digest() * 20000  # 640 kB: several buffered writes
        clean_calls = None
        for crash_at in range(1, 50):
            root = self.base / f"crash-{crash_at}"
            fs = RecordingFS()
            spool = self.spool(root, large_message=LARGE, fs=fs)
            fs.arm(crash_at)
            outcome: list = []
            store(spool, data, chunk=65536).addBoth(outcome.append)
            self.assertEqual(len(outcome), 1)
            fired = not isinstance(outcome[0], Failure)  # a crash at open fails with AttributeError: see above
            spool.close()
            after, _ = self.crashed_then_recovered(root)
            if fired:
                self.assertEqual(after.ids(), [outcome[0]], crash_at)
                self.assertEqual(self.read_back(after, outcome[0]), data)
                self.assertEqual(after.load(outcome[0]).size, len(data))
            else:
                self.assertEqual(after.ids(), [], crash_at)
            self.assert_clean(after, root)
            if not fs.crashed:
                clean_calls = fs.calls
                self.assertTrue(fired)
                break
            self.assertFalse(fired, crash_at)  # every filesystem call comes before the commit point
        self.assertIsNotNone(clean_calls)
        self.assertGreaterEqual(clean_calls, 8)  # open, writes, fsync, close, rename, fsync_dir

    def test_crash_around_the_transaction_of_a_large_commit(self) -> None:
        """A crash before the transaction leaves nothing after recovery; one after its COMMIT leaves
        the whole message (never acknowledged: a duplicate at worst, never a loss)."""
        for after_commit in (False, True):
            root = self.base / f"txn-{after_commit}"

            def runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
                if after_commit:
                    f(*args)
                raise Crash("transaction")

            spool = self.spool(root, large_message=LARGE, runner=runner)
            self.failureResultOf(store(spool, BIG), Crash)
            spool.close()
            after, report = self.crashed_then_recovered(root)
            if after_commit:
                [queue_id] = after.ids()
                self.assert_complete(after, queue_id, BIG)
            else:
                self.assertEqual(after.ids(), [])
                self.assertEqual(report.removed_orphans, 1)
            self.assert_clean(after, root)

    def test_crash_at_every_step_of_removing_a_large_message(self) -> None:
        """A crash before the removal's transaction keeps the whole message; after it, recovery finishes the job."""
        for crash_at in (None, 1):
            for crash_in_runner in (False, True):
                root = self.base / f"remove-{crash_at}-{crash_in_runner}"
                fs = RecordingFS()
                crashing = [False]

                def runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
                    if crashing[0]:
                        raise Crash("transaction")
                    return defer.maybeDeferred(f, *args)

                spool = self.spool(root, large_message=LARGE, fs=fs, runner=runner)
                queue_id = self.successResultOf(store(spool, BIG))
                fs.arm(crash_at)
                crashing[0] = crash_in_runner
                outcome: list = []
                spool.remove(queue_id).addBoth(outcome.append)
                if crash_in_runner:
                    outcome[0].trap(Crash)
                spool.close()
                after, _ = self.crashed_then_recovered(root)
                if crash_in_runner:
                    self.assert_complete(after, queue_id, BIG)
                else:
                    self.assertEqual(outcome, [None])
                    self.assertEqual(after.ids(), [])
                self.assert_clean(after, root)


# -- concurrent writers, summaries and ids --------------------------------------------


class ConcurrentWriterTests(StoreTestCase):
    def test_modify_sees_a_change_made_by_another_store_while_it_waited(self) -> None:
        """A modify waiting for its batch applies its change to what another store object wrote meanwhile."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
        queue_id = store(spool)
        runner.run(0)
        queue_id = self.successResultOf(queue_id)
        blocker = store(spool)
        deliver = spool.modify(queue_id, lambda e: e.with_recipients([replace(e.recipients[0], status=DELIVERED)]))
        tool = self.spool(recover=False)
        tool.modify_sync(queue_id, lambda e: replace(e, held=True))
        runner.run_all()
        self.successResultOf(blocker)
        stored = self.successResultOf(deliver)
        self.assertTrue(stored.held)
        self.assertEqual([r.status for r in stored.recipients], [DELIVERED, PENDING, FAILED])
        self.assertEqual(tool.load(queue_id), stored)

    def test_modify_sync_reads_the_current_envelope_in_its_transaction(self) -> None:
        """modify_sync changes what is stored when it runs, not what its caller read before."""
        spool = self.spool()
        queue_id = self.successResultOf(store(spool))
        tool = self.spool(recover=False)
        seen = tool.load(queue_id)
        self.successResultOf(spool.modify(queue_id, lambda e: replace(e, held=True)))
        stored = tool.modify_sync(queue_id, lambda e: replace(e, sender=""))
        self.assertFalse(seen.held)
        self.assertEqual((stored.held, stored.sender), (True, ""))
        self.assertEqual(spool.load(queue_id), stored)
        self.assertTrue(spool.peek(queue_id).held)

    def test_modify_sync_waits_for_another_writer_and_loses_nothing(self) -> None:
        """A modify_sync started while another store object's modify_sync holds the write lock reads
        nothing before its transaction begins, waits, and applies its change on top of the other's."""
        spool = self.spool()
        queue_id = self.successResultOf(store(spool))
        inside, release = threading.Event(), threading.Event()
        before_begin: list = []
        errors: list = []

        def slow(envelope: Envelope) -> Envelope:
            inside.set()
            release.wait(10)
            return replace(envelope, held=True)

        def watch(sql: str) -> None:
            if sql.startswith("BEGIN"):
                release.set()  # the other writer may commit once this one is about to wait for its lock
            elif not release.is_set():
                before_begin.append(sql)

        def run(tool: Spool, change: Callable[[Envelope], Envelope]) -> None:
            try:
                tool.modify_sync(queue_id, change)
            except Exception as e:  # reported below
                errors.append(e)
            finally:
                tool.close()

        first = threading.Thread(target=run, args=(Spool(str(self.root)), slow))
        first.start()
        self.assertTrue(inside.wait(10))
        second = threading.Thread(target=run, args=(WatchedSpool(str(self.root), watch=watch),
                                                    lambda e: replace(e, sender="")))
        second.start()
        second.join(15)
        first.join(15)
        self.assertFalse(first.is_alive() or second.is_alive())
        self.assertEqual((errors, before_begin), ([], []))
        stored = spool.load(queue_id)
        self.assertEqual((stored.held, stored.sender), (True, ""))

    def test_missing_messages(self) -> None:
        """remove and remove_sync of a missing message succeed and do nothing; modify_sync, update_sync,
        modify and update of one raise KeyError, and every call raises KeyError for an unsafe id."""
        spool = self.spool()
        queue_id = self.successResultOf(store(spool))
        other = self.successResultOf(store(spool))
        spool.remove_sync(queue_id)
        self.assertIsNone(self.successResultOf(spool.remove(queue_id)))
        self.assertIsNone(spool.remove_sync(queue_id))
        self.assertRaises(KeyError, spool.modify_sync, queue_id, lambda e: e)
        self.assertRaises(KeyError, spool.update_sync, make_envelope(queue_id))
        self.failureResultOf(spool.modify(queue_id, lambda e: e), KeyError)
        self.failureResultOf(spool.update(make_envelope(queue_id)), KeyError)
        for unsafe in ("../x", ""):
            self.failureResultOf(spool.remove(unsafe), KeyError)
            self.failureResultOf(spool.modify(unsafe, lambda e: e), KeyError)
            self.assertRaises(KeyError, spool.remove_sync, unsafe)
            self.assertRaises(KeyError, spool.modify_sync, unsafe, lambda e: e)
        self.assertEqual(spool.ids(), [other])


def summary_case(queue_id: str, held: bool, recipients: tuple[Recipient, ...]) -> Envelope:
    return Envelope(queue_id=queue_id, sender="s@example.org", recipients=recipients, held=held)


class SummaryTests(StoreTestCase):
    def test_peek_and_all_summaries_agree_with_the_envelope(self) -> None:
        """peek and all_summaries give QueueSummary.of(load(id)) for held, due, domains and unreported."""
        spool = self.spool()
        cases = [
            (False, (Recipient("a@one.example", next_attempt=1700000100.25),
                     Recipient("b@twö.example", next_attempt=1700000050.5))),
            (True, (Recipient("a@one.example"), Recipient("b@two.example", next_attempt=1700000050.0))),
            (False, (Recipient("a@one.example", status=FAILED), Recipient("b@two.example", status=FAILED, reported=True),
                     Recipient("c@three.example", status=DELIVERED))),
        ]
        made = []
        for held, recipients in cases:
            message = spool.new_message()
            message.write(MESSAGE)
            made.append(self.successResultOf(message.commit(summary_case(message.queue_id, held, recipients))))
        expected = [
            QueueSummary(made[0], False, 1700000050.5, ("one.example", "twö.example"), 0),
            QueueSummary(made[1], True, None, ("one.example", "two.example"), 0),
            QueueSummary(made[2], False, None, (), 1),
        ]
        self.assertEqual([spool.peek(q) for q in made], expected)
        self.assertEqual([QueueSummary.of(spool.load(q)) for q in made], expected)
        self.assertEqual(spool.all_summaries(), expected)
        stored = spool.modify_sync(made[2], lambda e: e.with_recipients([replace(e.recipients[0], reported=True)]))
        self.assertEqual(spool.peek(made[2]), QueueSummary.of(stored))
        self.assertEqual(spool.peek(made[2]).unreported, 0)

    @settings(max_examples=40, deadline=None)
    @given(
        held=st.booleans(),
        recipients=st.lists(
            st.tuples(
                st.sampled_from(["a@example.org", "b@exämple.net", "c@EXAMPLE.org", "d@[192.0.2.1]"]),
                st.sampled_from([PENDING, DELIVERED, FAILED]),
                st.one_of(st.none(), st.floats(min_value=0, max_value=4e9, allow_nan=False)),
                st.booleans(),
            ),
            min_size=1, max_size=5,
        ),
    )
    def test_any_envelope_summarises_as_stored(self, held: bool, recipients: list) -> None:
        """For any mix of recipient states and times, peek equals QueueSummary.of(the stored envelope)."""
        if not hasattr(self, "shared"):  # one store for every example of this test
            self.shared = self.spool()
        spool = self.shared
        message = spool.new_message()
        envelope = summary_case(message.queue_id, held, tuple(
            Recipient(address, status=status, next_attempt=when, reported=reported)
            for address, status, when, reported in recipients))
        queue_id = self.successResultOf(message.commit(envelope))
        self.assertEqual(spool.peek(queue_id), QueueSummary.of(envelope))
        self.assertEqual(spool.peek(queue_id), QueueSummary.of(spool.load(queue_id)))

    def test_a_lone_empty_domain_survives_the_summary_columns(self) -> None:
        """peek keeps the empty domain of a lone pending recipient, as QueueSummary.of does."""
        spool = self.spool()
        message = spool.new_message()
        envelope = summary_case(message.queue_id, False, (Recipient("user@"),))
        queue_id = self.successResultOf(message.commit(envelope))
        self.assertEqual(spool.peek(queue_id), QueueSummary.of(envelope))

    def test_ids_are_oldest_first_and_only_committed(self) -> None:
        """ids() lists committed messages in creation order, whatever the commit order, and nothing else."""
        runner = ManualRunner()
        spool = self.spool(runner=runner)
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
        runner.run_all()
        for d in commits:
            self.successResultOf(d)
        self.assertEqual(spool.ids(), [m.queue_id for m in messages])
        self.assertEqual([s.queue_id for s in spool.all_summaries()], [m.queue_id for m in messages])

    def test_a_missing_directory_reads_as_empty_and_is_not_created(self) -> None:
        """ids() and all_summaries() of a directory that does not exist are empty and create nothing."""
        spool = self.spool(recover=False)
        self.assertEqual(spool.ids(), [])
        self.assertEqual(spool.all_summaries(), [])
        self.assertFalse(self.root.exists())


# -- the database format ---------------------------------------------------------------


class FormatTests(StoreTestCase):
    def test_the_database_carries_the_store_version_in_wal_mode(self) -> None:
        """queue.db has PRAGMA user_version = STORE_VERSION and is in WAL mode."""
        spool = self.spool()
        self.successResultOf(store(spool))
        conn = sqlite3.connect(str(self.root / STORE_FILE))
        try:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], STORE_VERSION)
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        finally:
            conn.close()

    def test_a_newer_format_is_refused_by_name_and_left_alone(self) -> None:
        """A database with a higher user_version makes recover raise StoreError naming the file, unchanged."""
        spool = self.spool()
        queue_id = self.successResultOf(store(spool))
        spool.close()
        path = str(self.root / STORE_FILE)
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version = {STORE_VERSION + 1}")
        conn.close()
        newer = self.spool(recover=False)
        error = self.assertRaises(StoreError, newer.recover)
        self.assertIn(path, str(error))
        self.assertIn(str(STORE_VERSION + 1), str(error))
        self.assertRaises(StoreError, self.spool(recover=False).load, queue_id)
        conn = sqlite3.connect(path)
        try:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], STORE_VERSION + 1)
            self.assertEqual(conn.execute("SELECT id FROM envelope").fetchall(), [(queue_id,)])
        finally:
            conn.close()

    def test_a_file_that_is_not_a_database_is_a_store_error(self) -> None:
        """Garbage in queue.db makes recover and reads raise StoreError naming the file, not a sqlite3 error."""
        self.root.mkdir()
        path = self.root / STORE_FILE
        path.write_bytes(b"this is not an SQLite database\n" * 200)
        for call in (lambda s: s.recover(), lambda s: s.ids(), lambda s: s.load("0000000000000000")):
            error = self.assertRaises(StoreError, call, self.spool(recover=False))
            self.assertIn(str(path), str(error))
            self.assertNotIsInstance(error, sqlite3.Error)
        self.assertEqual(path.read_bytes(), b"this is not an SQLite database\n" * 200)


# -- quarantine ----------------------------------------------------------------------


class QuarantineTests(StoreTestCase):
    def test_a_corrupt_row_moves_into_corrupt_as_files(self) -> None:
        """quarantine of an unreadable row writes <id>.json, <id>.msg and <id>.reason and removes the row."""
        spool = self.spool(large_message=LARGE)
        small = self.successResultOf(store(spool))
        large = self.successResultOf(store(spool, BIG))
        keep = self.successResultOf(store(spool))
        corrupt_row(self.root, small, b'{"version": 1, "queue_id": ')
        corrupt_row(self.root, large, make_envelope("0000000000000000").to_json())  # names another id
        for queue_id in (small, large):
            self.assertRaises(EnvelopeFormatError, spool.load, queue_id)
        self.assertTrue(self.successResultOf(spool.quarantine(small, "not JSON")))
        self.assertTrue(self.successResultOf(spool.quarantine(large, "names another id")))
        corrupt = self.root / "corrupt"
        self.assertEqual(listing(self.root, "corrupt"),
                         sorted(q + s for q in (small, large) for s in (".json", ".msg", ".reason")))
        self.assertEqual((corrupt / (small + ".json")).read_bytes(), b'{"version": 1, "queue_id": ')
        self.assertEqual((corrupt / (small + ".msg")).read_bytes(), MESSAGE)
        self.assertEqual((corrupt / (small + ".reason")).read_bytes(), b"not JSON\n")
        self.assertEqual((corrupt / (large + ".json")).read_bytes(), make_envelope("0000000000000000").to_json())
        self.assertEqual((corrupt / (large + ".msg")).read_bytes(), BIG)
        self.assertEqual(listing(self.root, "large"), [])
        self.assertEqual(spool.ids(), [keep])
        for queue_id in (small, large):
            self.assertRaises(KeyError, spool.message_bytes, queue_id)

    def test_a_row_that_reads_well_is_left_alone(self) -> None:
        """quarantine of a readable or a missing row fires with False and moves nothing."""
        spool = self.spool()
        queue_id = self.successResultOf(store(spool))
        self.assertFalse(self.successResultOf(spool.quarantine(queue_id, "looked bad")))
        self.assertFalse(self.successResultOf(spool.quarantine("0000000000000000", "gone")))
        self.assert_complete(spool, queue_id)
        self.assertEqual(listing(self.root, "corrupt"), [])

    def test_quarantine_never_overwrites_earlier_corrupt_files(self) -> None:
        """A second quarantine of the same id writes <id>-1.* and leaves the first files as they were."""
        spool = self.spool()
        queue_id = self.successResultOf(store(spool))
        corrupt_row(self.root, queue_id, b"first")
        self.assertTrue(self.successResultOf(spool.quarantine(queue_id, "first reason")))
        conn = sqlite3.connect(str(self.root / STORE_FILE))
        conn.execute("INSERT INTO envelope VALUES (?, 0, NULL, '', 0, ?)", (queue_id, b"second"))
        conn.execute("INSERT INTO body VALUES (?, ?)", (queue_id, b"second body"))
        conn.commit()
        conn.close()
        self.assertTrue(self.successResultOf(spool.quarantine(queue_id, "second reason")))
        corrupt = self.root / "corrupt"
        self.assertEqual(listing(self.root, "corrupt"),
                         sorted(queue_id + tail + s for tail in ("", "-1") for s in (".json", ".msg", ".reason")))
        self.assertEqual([(corrupt / (queue_id + s)).read_bytes() for s in (".json", ".msg", ".reason")],
                         [b"first", MESSAGE, b"first reason\n"])
        self.assertEqual([(corrupt / (queue_id + "-1" + s)).read_bytes() for s in (".json", ".msg", ".reason")],
                         [b"second", b"second body", b"second reason\n"])

    def test_quarantine_makes_its_files_durable_before_the_transaction_commits(self) -> None:
        """The three corrupt files are fsynced and corrupt/ is fsynced inside the removing transaction."""
        events: list = []
        fs = RecordingFS(events)

        def runner(f: Callable[..., Any], *args: Any) -> defer.Deferred:
            d = defer.maybeDeferred(f, *args)
            events.append(("transaction done",))
            return d

        spool = self.spool(fs=fs, runner=runner)
        queue_id = self.successResultOf(store(spool))
        corrupt_row(self.root, queue_id, b"{")
        fs.arm(None)
        self.assertTrue(self.successResultOf(spool.quarantine(queue_id, "bad")))
        corrupt = str(self.root / "corrupt")
        fsynced = [e[1] for e in events if e[0] == "fsync"]
        self.assertEqual(sorted(fsynced), sorted(os.path.join(corrupt, queue_id + s) for s in (".json", ".msg", ".reason")))
        names = [e[0] for e in events]
        self.assertLess(names.index("fsync_dir"), names.index("transaction done"))
        self.assertEqual(events[names.index("fsync_dir")], ("fsync_dir", corrupt))

    def test_a_quarantine_whose_batch_fails_keeps_the_large_file(self) -> None:
        """When the batch of a quarantine fails, the row stays and so does its large file."""
        spool = self.spool(cls=FailingSpool, large_message=LARGE)
        assert isinstance(spool, FailingSpool)
        queue_id = self.successResultOf(store(spool, BIG))
        corrupt_row(self.root, queue_id, b"{")
        assert spool.writer_failing is not None
        spool.writer_failing.arm(7)  # BEGIN, SELECT, SELECT body, SELECT body, DELETE, DELETE, COMMIT
        self.failureResultOf(spool.quarantine(queue_id, "bad"), sqlite3.OperationalError)
        self.assertTrue(spool.writer_failing.hit)
        spool.writer_failing.arm(None)
        self.assertEqual(spool.ids(), [queue_id])
        self.assertEqual(listing(self.root, "large"), [queue_id + ".msg"])


# -- queue ids -----------------------------------------------------------------------


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
            self.assertTrue(queue_id.isascii() and queue_id.isalnum() and valid_queue_id(queue_id))

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
        saved = dict(ids_module._id_state)
        try:
            ids_module._id_state["pid"] = None
            self.assertNotEqual(new_queue_id(clock)[-6:], before)
        finally:
            ids_module._id_state.update(saved)


# -- the service and the store's own threads --------------------------------------------


class ServiceTests(StoreTestCase):
    def test_service_recovers_at_start_and_drains_at_stop(self) -> None:
        """SpoolService runs recovery in startService and waits for pending batches in stopService."""
        (self.root / "tmp").mkdir(parents=True)
        (self.root / "tmp" / "leftover").write_bytes(b"x")
        runner = ManualRunner()
        spool = self.spool(recover=False, runner=runner)
        service = SpoolService(spool)
        service.startService()
        self.assertTrue(service.running)
        assert service.report is not None
        self.assertEqual((service.report.removed_tmp, service.report.count), (1, 0))
        committed = store(spool)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        runner.run_all()
        self.successResultOf(committed)
        self.successResultOf(stopped)
        self.assertFalse(service.running)

    def test_the_writer_thread_starts_and_stops(self) -> None:
        """Without a runner the store owns a writer thread; start twice makes one, stop ends it."""
        spool = self.spool(recover=False, runner=None)
        spool.start()
        spool.start()
        writers = [t for t in threading.enumerate() if "relay-store-writer" in t.name]
        self.assertEqual(len(writers), 1)
        self.assertIsNone(self.successResultOf(spool.stop()))
        writers[0].join(10)
        self.assertFalse(writers[0].is_alive())
        self.assertIsNone(self.successResultOf(spool.stop()))

    def test_write_inline_commits_on_the_calling_thread_without_a_writer(self) -> None:
        """With write_inline the store starts no writer thread: a commit is durable when its call returns."""
        before = {t.ident for t in threading.enumerate() if "relay-store-writer" in t.name}
        spool = self.spool(recover=False, runner=None, write_inline=True)
        spool.recover()
        spool.start()
        committed = store(spool)
        queue_id = self.successResultOf(committed)
        self.assertEqual(self.spool(recover=False).ids(), [queue_id])  # another connection sees it
        removed = spool.remove(queue_id)  # lazy: it waits the delay on the clock, then commits at once
        self.assertNoResult(removed)
        self.clock.advance(1)
        self.successResultOf(removed)
        self.assertEqual(self.spool(recover=False).ids(), [])
        writers = {t.ident for t in threading.enumerate() if "relay-store-writer" in t.name}
        self.assertEqual(writers - before, set())
        self.assertIsNone(self.successResultOf(spool.stop()))


# -- kill -9 of a real threaded store ----------------------------------------------------

MAKE_SOURCE = r'''
import hashlib

def kill_message(queue_id, size):
    """Bytes that name their queue id and length, then a filler derived from the id."""
    head = b"X-Queue-Id: %s\r\nX-Length: %d\r\n\r\n" % (queue_id.encode("ascii"), size)
    seed = hashlib.sha256(queue_id.encode("ascii")).digest()
    return head + (seed * (size // len(seed) + 1))[:size]
'''

CHILD_SOURCE = MAKE_SOURCE + r'''
import sys
from twisted.internet import reactor
from relay.envelope import Envelope, Recipient
from relay.queue.store import Spool

directory, large = sys.argv[1], int(sys.argv[2])
SIZES = (100, 700, 2500, 40, 12000, 900, 300000, 1500)
IN_FLIGHT = 20
spool = Spool(directory, reactor=reactor, large_message=large)
spool.recover()
spool.start()
made = [0]


def acknowledge(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def one():
    made[0] += 1
    n = made[0]
    message = spool.new_message()
    data = kill_message(message.queue_id, SIZES[n % len(SIZES)])
    for i in range(0, len(data), 8192):
        message.write(data[i:i + 8192])
    envelope = Envelope(queue_id=message.queue_id, sender="s@example.org",
                        recipients=(Recipient("r%d@example.net" % n),))
    d = message.commit(envelope)

    def committed(queue_id):
        acknowledge("stored %s %s" % (queue_id, hashlib.sha256(data).hexdigest()))
        if n % 10 == 0:  # some are removed again at once
            acknowledge("removing %s" % queue_id)
            spool.remove(queue_id).addCallback(lambda _: acknowledge("removed %s" % queue_id))

    def failed(failure):
        sys.stderr.write("commit failed: %s\n" % failure.getErrorMessage())

    d.addCallbacks(committed, failed)
    d.addBoth(lambda _: reactor.callLater(0, one))


for _ in range(IN_FLIGHT):
    one()
reactor.run()
'''

_make: dict = {}
exec(MAKE_SOURCE, _make)
kill_message: Callable[[str, int], bytes] = _make["kill_message"]


def run_and_kill(script: Path, directory: Path, acknowledgements: int,
                 seconds: float) -> tuple[dict, set, set, int, str]:
    """Run the child until it acknowledged enough commits (or ``seconds`` passed), SIGKILL it, and read
    every complete line it wrote before it died: {queue id: digest} stored, {queue id} whose removal
    was started, {queue id} whose removal was acknowledged; its exit status and its stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    stderr = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, str(script), str(directory), str(LARGE)], cwd=str(REPO),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env)
    buffer = b""
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            end = time.monotonic() + seconds
            while buffer.count(b"\nstored ") + buffer.startswith(b"stored ") < acknowledgements:
                left = end - time.monotonic()
                if left <= 0 or not selector.select(left):
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break  # the child died on its own: reported below
                buffer += chunk
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        while True:  # lines written before the kill are acknowledgements too
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        stderr.seek(0)
        errors = stderr.read().decode("utf-8", "replace")
        stderr.close()
    stored: dict = {}
    removing: set = set()
    removed: set = set()
    for line in buffer.split(b"\n")[:-1]:  # the last piece is an unfinished line, or empty
        kind, queue_id, *rest = line.decode("ascii").split()
        if kind == "stored":
            stored[queue_id] = rest[0]
        else:
            (removing if kind == "removing" else removed).add(queue_id)
    return stored, removing, removed, proc.returncode, errors


class KillTests(StoreTestCase):
    def test_every_acknowledged_commit_survives_kill_9(self) -> None:
        """A real threaded store killed with SIGKILL mid-stream, three times over, keeps every acknowledged
        message with exactly its bytes, drops every acknowledged removal, and stores no torn entry."""
        script = self.base / "child.py"
        script.write_text(CHILD_SOURCE)
        directory = self.base / "killed"
        acknowledged: dict = {}
        removing: set = set()
        removed: set = set()
        for target in (150, 400, 250):
            stored, started, gone, returncode, errors = run_and_kill(script, directory, target, 5.0)
            self.assertEqual(returncode, -signal.SIGKILL, errors)
            self.assertGreater(len(stored), 20, errors)
            self.assertNotIn("commit failed", errors)
            self.assertFalse(set(stored) & set(acknowledged))
            self.assertTrue(gone <= started <= set(stored))
            acknowledged.update(stored)
            removing |= started
            removed |= gone
            spool = self.spool(directory, large_message=LARGE, recover=False)
            spool.recover()
            present = set(spool.ids())
            for queue_id, digest in acknowledged.items():
                if queue_id in removed:
                    self.assertNotIn(queue_id, present)
                    continue
                if queue_id in removing and queue_id not in present:
                    continue  # removed durably before its acknowledgement was written
                self.assertIn(queue_id, present)
                self.assertEqual(hashlib.sha256(self.read_back(spool, queue_id)).hexdigest(), digest, queue_id)
            large = []
            for queue_id in present:
                data = self.read_back(spool, queue_id)
                head = data.split(b"\r\n", 2)
                self.assertEqual(head[0], b"X-Queue-Id: " + queue_id.encode())
                self.assertEqual(data, kill_message(queue_id, int(head[1].split()[1])))
                self.assertEqual(spool.load(queue_id).size, len(data))
                if spool.message_bytes(queue_id) is None:
                    large.append(queue_id + ".msg")
            self.assertEqual(listing(directory, "large"), sorted(large))
            self.assertEqual(listing(directory, "tmp"), [])
            self.assertTrue(large and len(large) < len(present))  # both kinds were stored
            spool.close()
