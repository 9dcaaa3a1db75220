"""Tests for a hostile queue directory: queue files, the store's directories, envelope bounds, a corrupt database.

Anyone who can write to the queue directory could plant a symbolic link, a
FIFO, a directory or an absurd envelope there; the store, start-up recovery
and relay-queue must neither hang, nor read or delete through a link, nor
fail for the whole queue because of one entry.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from relay.cli import queue as cli
from relay.envelope import ClientInfo, Envelope, EnvelopeFormatError, Recipient
from relay.queue.bounds import MAX_ENVELOPE, read_envelope
from relay.queue.files import UnsafeFile, open_queue_file
from relay.queue.ids import new_queue_id
from relay.queue.schema import StoreError
from relay.queue.store import STORE_FILE, Spool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relayproc import REPO, TWISTD  # noqa: E402

NOW = 1_700_000_000.0
MESSAGE = b"Subject: hi\r\n\r\nthe queued message\r\n"
SECRET = b"root:the contents of some other file\n"
LARGE = 100  # octets kept in the database; more goes to large/
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")


def sync_runner(f: Any, *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


def make_spool(directory: Path, recover: bool = True) -> Spool:
    clock = Clock()
    clock.advance(NOW)
    spool = Spool(str(directory), clock=clock, runner=sync_runner, large_message=LARGE)
    if recover:
        spool.recover()
    return spool


def store(spool: Spool, data: bytes = MESSAGE, **fields: Any) -> str:
    message = spool.new_message()
    message.write(data)
    results: list = []
    envelope = Envelope(queue_id=message.queue_id, sender="s@origin.test",
                        recipients=(Recipient("u@dest.test"),), arrival=NOW, **fields)
    message.commit(envelope).addBoth(results.append)
    assert results == [message.queue_id], results
    return message.queue_id


def set_row(directory: Path, queue_id: str, **columns: Any) -> None:
    """Change an envelope row behind the store's back."""
    with sqlite3.connect(directory / STORE_FILE) as db:
        for column, value in columns.items():
            db.execute(f"UPDATE envelope SET {column} = ? WHERE id = ?", (value, queue_id))


def good_json(queue_id: str, **recipient: Any) -> dict:
    data = json.loads(Envelope(queue_id=queue_id, sender="s@origin.test", recipients=(Recipient("u@dest.test"),),
                               arrival=NOW).to_json())
    data["recipients"][0].update(recipient)
    return data


@pytest.fixture
def base() -> Any:
    path = Path(tempfile.mkdtemp(prefix="relay-hostile-test-"))
    yield path
    shutil.rmtree(path, True)


@pytest.fixture
def secret(base: Path) -> Path:
    """A file and a directory outside the queue that must never be read or touched."""
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    path = elsewhere / "passwd"
    path.write_bytes(SECRET)
    return path


def log_events() -> tuple[list[str], Any]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    return events, lambda: (globalLogPublisher.removeObserver(events.append), [formatEvent(e) for e in events])[1]


# -- opening queue files -------------------------------------------------------------


def test_queue_file_that_is_a_symlink_is_refused(base: Path, secret: Path) -> None:
    """A symbolic link is never followed, even to a regular file of the same owner."""
    link = base / "x.msg"
    link.symlink_to(secret)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        open_queue_file(str(link))


def test_queue_file_that_is_a_fifo_is_refused_without_blocking(base: Path) -> None:
    """A FIFO named like a queue file is refused at once (O_NONBLOCK), never waited on."""
    fifo = base / "x.json"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFile, match="not a regular file"):
        open_queue_file(str(fifo))


def test_queue_file_that_is_a_directory_is_refused(base: Path) -> None:
    """A directory named like a queue file is refused."""
    (base / "x.json").mkdir()
    with pytest.raises(UnsafeFile, match="not a regular file"):
        open_queue_file(str(base / "x.json"))


@ROOT_ONLY
def test_queue_file_of_another_owner_is_refused(base: Path) -> None:
    """A regular file owned by another user than the relay's is refused."""
    path = base / "x.msg"
    path.write_bytes(MESSAGE)
    os.chown(path, 54321, -1)
    with pytest.raises(UnsafeFile, match="owned by uid 54321"):
        open_queue_file(str(path))


def test_regular_queue_file_reads_and_blocks_normally(base: Path) -> None:
    """A regular file of the relay's user opens, in blocking mode, and reads whole."""
    path = base / "x.msg"
    path.write_bytes(MESSAGE)
    with open_queue_file(str(path)) as f:
        assert os.get_blocking(f.fileno())
        assert f.read() == MESSAGE


# -- large messages and the store's directories -------------------------------------------


def planted_large_message(directory: Path, plant: Callable[[Path], None],
                          data: bytes = b"x" * 500) -> tuple[Spool, str]:
    """A queued large message whose file was then replaced by ``plant(path)``."""
    spool = make_spool(directory)
    queue_id = store(spool, data)
    path = Path(spool.large_path(queue_id))
    path.unlink()
    plant(path)
    return spool, queue_id


def test_large_message_symlinked_to_another_file_is_never_read_and_quarantined(base: Path, secret: Path) -> None:
    """A large/<id>.msg replaced by a link is refused when opened, and recovery moves the entry (link and all) to corrupt/."""
    directory = base / "spool"
    spool, queue_id = planted_large_message(directory, lambda path: path.symlink_to(secret))
    with pytest.raises(UnsafeFile):
        spool.open_message(queue_id)
    openers: list = []
    spool.message_opener(queue_id).addCallback(openers.append)
    with pytest.raises(UnsafeFile):
        openers[0]()
    _, done = log_events()
    report = make_spool(directory, recover=False).recover()
    lines = done()
    assert report.quarantined == [queue_id]
    assert (directory / "corrupt" / (queue_id + ".msg")).is_symlink()
    assert secret.read_bytes() == SECRET
    assert any(queue_id in line and "quarantined" in line and "symbolic link" in line for line in lines), lines
    assert make_spool(directory).ids() == []


def test_large_message_that_is_a_fifo_is_quarantined_at_start_up(base: Path) -> None:
    """A FIFO in place of a large message neither hangs recovery nor stays queued."""
    directory = base / "spool"
    _, queue_id = planted_large_message(directory, os.mkfifo)
    report = make_spool(directory, recover=False).recover()
    assert report.quarantined == [queue_id]
    assert (directory / "corrupt" / (queue_id + ".reason")).read_text().startswith("message file not a regular file")


@pytest.mark.parametrize("sub", ["tmp", "large", "corrupt"])
def test_store_directory_that_is_a_symlink_stops_start_up_and_deletes_nothing(base: Path, secret: Path,
                                                                              sub: str) -> None:
    """tmp/, large/ or corrupt/ linked to another directory is a StoreError naming it; nothing there is deleted."""
    directory = base / "spool"
    make_spool(directory)
    shutil.rmtree(directory / sub)
    (directory / sub).symlink_to(secret.parent, target_is_directory=True)
    (secret.parent / "stray.msg").write_bytes(b"x")
    with pytest.raises(StoreError, match=f"{sub}: a symbolic link"):
        make_spool(directory, recover=False).recover()
    assert sorted(os.listdir(secret.parent)) == ["passwd", "stray.msg"]
    assert secret.read_bytes() == SECRET


def test_tmp_entries_that_are_links_lose_only_the_link(base: Path, secret: Path) -> None:
    """Clearing tmp/ at start-up removes a link planted there, never the file it names."""
    directory = base / "spool"
    make_spool(directory)
    (directory / "tmp" / "planted.msg").symlink_to(secret)
    report = make_spool(directory, recover=False).recover()
    assert report.removed_tmp == 1 and os.listdir(directory / "tmp") == []
    assert secret.read_bytes() == SECRET


def test_legacy_queue_directory_that_is_a_symlink_is_refused(base: Path, secret: Path) -> None:
    """A queue/ (the old file-per-message layout) linked to another directory is refused, nothing imported or deleted."""
    directory = base / "spool"
    directory.mkdir()
    queue_id = new_queue_id(Clock())
    (secret.parent / (queue_id + ".msg")).write_bytes(MESSAGE)
    (directory / "queue").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(StoreError, match="queue: a symbolic link"):
        make_spool(directory, recover=False).recover()
    assert sorted(os.listdir(secret.parent)) == sorted(["passwd", queue_id + ".msg"])


@pytest.mark.parametrize("plant", ["fifo", "directory", "symlink-envelope", "symlink-message", "nested", "huge-number"])
def test_legacy_entry_of_the_wrong_kind_is_quarantined(base: Path, secret: Path, plant: str) -> None:
    """In the old layout, a FIFO, a directory or a link named like an entry, or an envelope out of bounds, is quarantined; the others are imported."""
    directory = base / "spool"
    legacy = directory / "queue"
    legacy.mkdir(parents=True)
    clock = Clock()
    clock.advance(NOW - 100)
    good, bad = new_queue_id(clock), (clock.advance(1), new_queue_id(clock))[1]
    for queue_id in (good, bad):
        (legacy / (queue_id + ".msg")).write_bytes(MESSAGE)
        (legacy / (queue_id + ".json")).write_text(json.dumps(good_json(queue_id)))
    envelope, message = legacy / (bad + ".json"), legacy / (bad + ".msg")
    if plant == "fifo":
        envelope.unlink()
        os.mkfifo(envelope)
    elif plant == "directory":
        envelope.unlink()
        envelope.mkdir()
    elif plant == "symlink-envelope":
        envelope.unlink()
        envelope.symlink_to(legacy / (good + ".json"))
    elif plant == "symlink-message":
        message.unlink()
        message.symlink_to(secret)
    elif plant == "nested":
        envelope.write_text('{"version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        envelope.write_text(json.dumps(good_json(bad, next_attempt=1e308)))
    report = make_spool(directory, recover=False).recover()
    assert report.imported == 1 and report.quarantined == [bad]
    assert make_spool(directory).ids() == [good]
    assert secret.read_bytes() == SECRET


# -- envelope bounds -------------------------------------------------------------------------


@pytest.mark.parametrize("change, why", [
    ({"next_attempt": 1e308}, "next_attempt"),
    ({"next_attempt": float("inf")}, "next_attempt"),
    ({"next_attempt": float("nan")}, "next_attempt"),
    ({"next_attempt": -5.0}, "next_attempt"),
    ({"next_attempt": 10 ** 400}, "out of range"),
    ({"attempts": 10 ** 30}, "attempts"),
    ({"history": [{"time": 1e300, "outcome": "transient", "reply": "x"}]}, "history time"),
])
def test_numbers_out_of_range_are_format_errors(change: dict, why: str) -> None:
    """Times that are not between 0 and year 9999 and counts over 2**53 are refused with a reason naming the field."""
    data = json.dumps(good_json("0000000000000001", **change)).encode()
    with pytest.raises(EnvelopeFormatError, match=why):
        read_envelope("0000000000000001", data)


def test_deep_nesting_and_size_are_format_errors() -> None:
    """JSON nested past the recursion limit, an envelope over MAX_ENVELOPE and a list where text belongs are refused."""
    with pytest.raises(EnvelopeFormatError, match="nested"):
        read_envelope("0000000000000001", b'{"version": 1, "queue_id": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    with pytest.raises(EnvelopeFormatError, match="over the limit"):
        read_envelope("0000000000000001", b" " * (MAX_ENVELOPE + 1))
    data = good_json("0000000000000001")
    data["client"] = {"address": [[["x"]]], "helo": "h"}
    with pytest.raises(EnvelopeFormatError, match="client.address"):
        read_envelope("0000000000000001", json.dumps(data).encode())
    with pytest.raises(EnvelopeFormatError, match="stored as int"):
        read_envelope("0000000000000001", 7)


def test_a_good_envelope_passes_the_bounds() -> None:
    """An envelope the relay writes reads back unchanged."""
    envelope = Envelope(queue_id="0000000000000001", sender="s@x.test",
                        recipients=(Recipient("u@dest.test", attempts=3, next_attempt=NOW),),
                        client=ClientInfo(address="192.0.2.1", port=25, helo="h", trusted=True), arrival=NOW)
    assert read_envelope("0000000000000001", envelope.to_json()) == envelope


@pytest.mark.parametrize("data", [
    json.dumps(good_json("@", next_attempt=1e308)),
    '{"version": 1, "queue_id": "@", "sender": "", "recipients": [], "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
])
def test_out_of_bounds_row_is_quarantined_by_the_store(base: Path, data: str) -> None:
    """A row whose envelope is out of bounds is a format error on load, and quarantine moves it with the reason."""
    directory = base / "spool"
    spool = make_spool(directory)
    queue_id = store(spool)
    set_row(directory, queue_id, data=data.replace('"@"', json.dumps(queue_id)).encode())
    with pytest.raises(EnvelopeFormatError):
        spool.load(queue_id)
    done: list = []
    spool.quarantine(queue_id, "bad").addBoth(done.append)
    assert done == [True]
    assert spool.ids() == [] and (directory / "corrupt" / (queue_id + ".json")).exists()


@pytest.mark.parametrize("due", [1e308, float("inf"), -1.0, "soon"])
def test_due_column_out_of_range_is_quarantined_at_start_up(base: Path, due: Any) -> None:
    """A due time out of range in the scheduling columns is quarantined at start-up with a log line naming the entry."""
    directory = base / "spool"
    spool = make_spool(directory)
    queue_id, kept = store(spool), store(spool)
    set_row(directory, queue_id, due=due)
    _, done = log_events()
    report = make_spool(directory, recover=False).recover()
    lines = done()
    assert report.quarantined == [queue_id]
    assert make_spool(directory).ids() == [kept]
    assert any(queue_id in line and "out of range" in line for line in lines), lines


# -- relay-queue survives any single bad entry ------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.run(list(argv), out, err, clock=lambda: NOW)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("json_output", [False, True])
@pytest.mark.parametrize("data", [
    json.dumps(good_json("@", next_attempt=1e308)),
    '{"version": 1, "queue_id": "@", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    json.dumps(dict(good_json("@"), client={"address": [[[[]]]]})),
])
def test_relay_queue_list_names_the_bad_entry_and_lists_the_rest(base: Path, data: str, json_output: bool) -> None:
    """relay-queue list (and --json) reports one bad envelope by id on stderr, exit 1, and lists every other message."""
    directory = base / "spool"
    spool = make_spool(directory)
    first, bad, last = store(spool), store(spool), store(spool)
    set_row(directory, bad, data=data.replace('"@"', json.dumps(bad)).encode())
    status, out, err = run_cli("--queue", str(directory), "list", *(["--json"] if json_output else []))
    assert status == 1
    assert err.startswith(f"relay-queue: {bad}: cannot read the envelope: ") and err.count("\n") == 1
    if json_output:
        assert [m["id"] for m in json.loads(out)] == [first, last]
    else:
        assert first in out and last in out and bad not in out
    status, _, err = run_cli("--queue", str(directory), "show", bad)
    assert status == 1 and err.startswith(f"relay-queue: {bad}: cannot read the envelope: ")


def test_relay_queue_show_refuses_a_linked_message_file(base: Path, secret: Path) -> None:
    """relay-queue show of a message whose large file is a link says so in one line and never prints the other file."""
    directory = base / "spool"
    _, queue_id = planted_large_message(directory, lambda path: path.symlink_to(secret),
                                        b"Subject: x\r\n\r\n" + b"y" * 500)
    status, out, err = run_cli("--queue", str(directory), "show", queue_id)
    assert status == 1 and "symbolic link" in err and err.count("\n") == 1
    assert "root:" not in out


def test_relay_queue_on_a_corrupt_database_is_one_line(base: Path) -> None:
    """relay-queue list on a queue.db that is not a database exits 1 with one line naming the file."""
    directory = base / "spool"
    directory.mkdir()
    (directory / STORE_FILE).write_bytes(b"garbage, not SQLite\n" * 100)
    status, out, err = run_cli("--queue", str(directory), "list")
    assert status == 1 and err.count("\n") == 1
    assert err.startswith(f"relay-queue: {directory / STORE_FILE}: ") and "internal error" not in err


# -- start-up -----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "tables dropped"])
def test_daemon_start_up_on_a_corrupt_database_is_one_clear_line(base: Path, damage: str) -> None:
    """twistd relay on an unusable queue.db exits 1 with one stderr line naming the file; the file is left as it was."""
    directory = base / "spool"
    if damage == "garbage":
        directory.mkdir()
        (directory / STORE_FILE).write_bytes(b"garbage, not SQLite\n" * 100)
    else:
        make_spool(directory)
        with sqlite3.connect(directory / STORE_FILE) as db:
            db.execute("DROP TABLE envelope")
    before = _contents(directory / STORE_FILE)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([*TWISTD, "-n", "--pidfile=", "relay", "--queue", str(directory), "--hostname", "relay.test"],
                          cwd=base, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith(f"relay: cannot open the queue: {directory / STORE_FILE}: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert _contents(directory / STORE_FILE) == before


def _contents(path: Path) -> Any:
    """The bytes of a file that is no database, else its schema (a checkpoint may rewrite the header)."""
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    except sqlite3.DatabaseError:
        return path.read_bytes()
