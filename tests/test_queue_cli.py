"""Tests for relay.cli.queue: ``relay-queue`` on a real spool made with the Spool API.

Most tests call ``run(argv)`` in-process with a fixed clock and read its
output; a few run ``python -m relay.cli.queue`` as a process to prove the
console form (exit status, one line on stderr, no traceback).
"""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from relay.cli import queue as cli
from relay.control import DaemonError, Flush, Forget, Reschedule
from relay.envelope import DELIVERED, FAILED, PENDING, Attempt, ClientInfo, Envelope, Recipient
from relay.queue.partitions import part_directory
from relay.queue.store import Spool

NOW = 1_700_000_000.0
HEADERS = b"Received: from client.test\r\n\tby relay.test; id X\r\nSubject: quarterly report\r\nFrom: a@origin.test\r\n"
BODY = b"the secret body text\r\n"
SIZE = len(HEADERS) + 2 + len(BODY)  # 122 octets: "122B" in the list


def sync_runner(f: Any, *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


def make_spool(directory: Path) -> Spool:
    spool = Spool(str(directory), clock=Clock(), runner=sync_runner)
    spool.recover()
    return spool


def store(spool: Spool, sender: str, recipients: tuple[Recipient, ...], **fields: Any) -> str:
    message = spool.new_message()
    message.write(HEADERS + b"\r\n" + BODY)
    results: list = []
    message.commit(Envelope(queue_id=message.queue_id, sender=sender, recipients=recipients, **fields)).addBoth(
        results.append
    )
    assert results == [message.queue_id]
    return message.queue_id


BUSY = Attempt(time=NOW - 60, outcome="transient", code=451, status="4.3.0", text="mailbox busy", host="mx1.dest.test",
               remote=True, rule="mx")
BUSY_JSON = {"time": NOW - 60, "outcome": "transient", "host": "mx1.dest.test", "route": "mx", "code": 451,
             "status": "4.3.0", "text": "mailbox busy", "remote": True, "reason": "", "tls": "", "tls_fallback": False, "dsn_passed": False,
             "reply": "451 4.3.0 mailbox busy"}


@dataclass
class Queue:
    directory: Path
    spool: Spool
    old: str  # held, three days old
    bounce: str  # null sender, two hours old
    new: str  # five minutes old, pending + delivered + failed


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    directory = tmp_path / "spool"
    spool = make_spool(directory)
    old = store(spool, "ops@origin.test", (Recipient("x@far.test"),), arrival=NOW - 3 * 86400, held=True)
    bounce = store(
        spool, "", (Recipient("a@origin.test", attempts=1, last_error="421 4.4.2 timeout", next_attempt=NOW - 5),),
        arrival=NOW - 7200,
    )
    new = store(
        spool,
        "app@origin.test",
        (
            Recipient("bob@dest.test", attempts=1, last_error="451 4.3.0 mailbox busy", next_attempt=NOW + 240,
                      history=(BUSY,)),
            Recipient("carol@dest.test", status=DELIVERED, attempts=1),
            Recipient("dave@dest.test", status=FAILED, attempts=1, last_error="550 5.1.1 no such user"),
        ),
        arrival=NOW - 300,
        client=ClientInfo(address="192.0.2.7", port=40000, helo="app.origin.test", protocol="ESMTPS", trusted=True),
        body_type="8BITMIME",
    )
    return Queue(directory, spool, old, bounce, new)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.run(list(argv), out, err, clock=lambda: NOW)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record control calls; answer as if no daemon ran."""
    from relay import control

    calls: list = []

    def call(directory: str, command: Any, timeout: float = 10.0, **arguments: Any) -> dict:
        calls.append((command, arguments))
        raise control.DaemonNotRunning(directory, control.socket_path(directory), "No such file or directory")

    monkeypatch.setattr(control, "call", call)
    return calls


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record control calls; answer as a running daemon does."""
    from relay import control

    calls: list = []

    def call(directory: str, command: Any, timeout: float = 10.0, **arguments: Any) -> dict:
        calls.append((command, arguments))
        return {"count": 2} if command is Flush else {}

    monkeypatch.setattr(control, "call", call)
    return calls


# -- list ------------------------------------------------------------------------------


def test_list_human_oldest_first_with_pending_recipients(queue: Queue) -> None:
    """list prints one block per message oldest first: id, age, size, sender, held flag, pending recipients, summary."""
    status, out, err = run("--queue", str(queue.directory), "list")
    assert status == 0 and err == ""
    lines = out.splitlines()
    heads = [line for line in lines if not line.startswith(" ")]
    assert [h.split()[0] for h in heads[:3]] == [queue.old, queue.bounce, queue.new]
    assert heads[0].split()[1:] == ["3d", f"{SIZE}B", "<ops@origin.test>", "HELD"]
    assert heads[1].split()[1:] == ["2h", f"{SIZE}B", "<>"]
    assert heads[2].split()[1:] == ["5m", f"{SIZE}B", "<app@origin.test>"]
    assert "    x@far.test  pending, 0 attempts, held" in lines
    assert "    a@origin.test  pending, 1 attempt, due now  last: 421 4.4.2 timeout" in lines
    bob = next(line for line in lines if "bob@dest.test" in line)
    assert "pending, 1 attempt, next in 4m (" in bob and bob.endswith("last: 451 4.3.0 mailbox busy")
    assert not any("carol@" in line or "dave@" in line for line in lines)  # only pending ones are listed
    assert "    (1 delivered, 1 failed)" in lines
    assert lines[-1] == "3 messages (1 held), 3 pending recipients"


def test_list_json_is_a_stable_array(queue: Queue) -> None:
    """list --json prints an array of messages with id, sender, arrival, size, held and every recipient."""
    status, out, err = run("list", "--json", "--queue", str(queue.directory))
    assert status == 0 and err == ""
    messages = json.loads(out)
    assert [m["id"] for m in messages] == [queue.old, queue.bounce, queue.new]
    old, bounce, new = messages
    assert old["held"] is True and bounce["held"] is False
    assert bounce["sender"] == "" and new["sender"] == "app@origin.test"
    assert new["arrival"] == NOW - 300 and new["size"] == SIZE
    assert new["recipients"] == [
        {"address": "bob@dest.test", "status": PENDING, "attempts": 1, "last_error": "451 4.3.0 mailbox busy",
         "next_attempt": NOW + 240, "last_attempt": BUSY_JSON},
        {"address": "carol@dest.test", "status": DELIVERED, "attempts": 1, "last_error": "", "next_attempt": None,
         "last_attempt": None},
        {"address": "dave@dest.test", "status": FAILED, "attempts": 1, "last_error": "550 5.1.1 no such user",
         "next_attempt": None, "last_attempt": None},
    ]
    assert sorted(new) == ["arrival", "held", "id", "recipients", "sender", "size"]


def test_list_of_an_empty_queue(tmp_path: Path) -> None:
    """An empty spool lists as a zero summary, and as [] in JSON."""
    make_spool(tmp_path / "q")
    assert run("--queue", str(tmp_path / "q"), "list") == (0, "0 messages, 0 pending recipients\n", "")
    status, out, _ = run("--queue", str(tmp_path / "q"), "--json", "list")
    assert status == 0 and json.loads(out) == []


def test_list_never_opens_message_bodies(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """list reads envelopes only, so it scales with the queue without reading messages."""

    def refuse(self: Spool, queue_id: str) -> Any:
        raise AssertionError("list opened a message")

    monkeypatch.setattr(Spool, "open_message", refuse)
    status, out, _ = run("--queue", str(queue.directory), "list")
    assert status == 0 and out.endswith("3 messages (1 held), 3 pending recipients\n")


def test_list_reports_an_unreadable_envelope_and_goes_on(queue: Queue) -> None:
    """An envelope that cannot be read is one line on stderr and exit 1; the others are listed."""
    with sqlite3.connect(queue.directory / "queue.db") as db:
        db.execute("UPDATE envelope SET data = ? WHERE id = ?", (b"{not json", queue.bounce))
    status, out, err = run("--queue", str(queue.directory), "list")
    assert status == 1
    assert err.startswith(f"relay-queue: {queue.bounce}: cannot read the envelope: not JSON")
    assert len(err.splitlines()) == 1
    assert out.splitlines()[-1] == "2 messages (1 held), 2 pending recipients"


# -- show ------------------------------------------------------------------------------


def test_show_prints_envelope_history_and_headers_only(queue: Queue) -> None:
    """show prints the envelope, each recipient's attempts and the header section, never the body."""
    status, out, err = run("--queue", str(queue.directory), "show", queue.new)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"queue id:  {queue.new}"
    assert "sender:    <app@origin.test>" in lines
    assert f"size:      {SIZE} octets" in lines
    assert "client:    192.0.2.7 port 40000, helo app.origin.test, ESMTPS, trusted" in lines
    assert "body:      8BITMIME, smtputf8 no" in lines
    assert "held:      no" in lines
    assert any(line.startswith("arrival:   ") and line.endswith("(5m ago)") for line in lines)
    assert "  bob@dest.test: pending, 1 attempt, next in 4m (" in out
    assert "    last error: 451 4.3.0 mailbox busy" in lines
    assert any(line.endswith("  transient mx1.dest.test [mx]: 451 4.3.0 mailbox busy") for line in lines)
    assert "  carol@dest.test: delivered, 1 attempt" in lines
    assert "    last error: 550 5.1.1 no such user" in lines
    assert lines[lines.index("headers:") + 1 :] == [
        "  Received: from client.test", "  \tby relay.test; id X", "  Subject: quarterly report",
        "  From: a@origin.test"]
    assert "secret body" not in out


def test_show_and_list_say_whose_words_an_attempt_recorded(tmp_path: Path) -> None:
    """A remote reply is shown as the host sent it; relay's own decision is marked "relay:" with its reason."""
    spool = make_spool(tmp_path / "spool")
    refused = Attempt(time=NOW - 30, outcome="transient", status="4.4.1", host="mx1.dest.test[192.0.2.5]",
                      text="connect to mx1.dest.test[192.0.2.5]:25: Connection refused", reason="connect-refused")
    too_big = Attempt(time=NOW - 20, outcome="permanent", code=552, status="5.3.4", host="mx2.dest.test[192.0.2.6]",
                      text="message size 9000 exceeds the remote server's limit of 100 octets", reason="message-too-big")
    queue_id = store(spool, "app@origin.test", (
        Recipient("bob@dest.test", attempts=1, last_error=refused.reply, history=(refused,)),
        Recipient("eve@dest.test", status=FAILED, attempts=1, last_error=too_big.reply, history=(too_big,)),
    ), arrival=NOW - 60)
    status, out, _ = run("--queue", str(tmp_path / "spool"), "list")
    assert status == 0
    assert "last: relay: 4.4.1 connect to mx1.dest.test[192.0.2.5]:25: Connection refused (connect-refused)" in out
    status, out, _ = run("--queue", str(tmp_path / "spool"), "show", queue_id)
    assert status == 0
    assert ("transient mx1.dest.test[192.0.2.5]: relay: 4.4.1 connect to mx1.dest.test[192.0.2.5]:25: "
            "Connection refused (connect-refused)") in out
    assert "permanent mx2.dest.test[192.0.2.6]: relay: 552 5.3.4 message size 9000" in out
    status, out, _ = run("--json", "--queue", str(tmp_path / "spool"), "show", queue_id)
    history = json.loads(out)["recipients"][1]["history"]
    assert [(a["code"], a["status"], a["remote"], a["reason"]) for a in history] == [(552, "5.3.4", False, "message-too-big")]


def test_show_json(queue: Queue) -> None:
    """show --json carries the envelope, client, attempt history and header lines."""
    status, out, _ = run("--json", "--queue", str(queue.directory), "show", queue.new)
    shown = json.loads(out)
    assert status == 0
    assert shown["id"] == queue.new and shown["body"] == "8BITMIME"
    assert shown["client"]["helo"] == "app.origin.test"
    assert shown["recipients"][0]["history"] == [BUSY_JSON]
    assert shown["headers"][2] == "Subject: quarterly report" and shown["headers_truncated"] is False
    assert "secret body" not in out


# -- delete / hold / release -------------------------------------------------------------------


def test_delete_removes_the_message_and_tells_the_daemon(queue: Queue, daemon: list) -> None:
    """delete removes both files through the spool and sends Forget to a running daemon."""
    status, out, err = run("--queue", str(queue.directory), "delete", queue.new)
    assert (status, out, err) == (0, f"{queue.new}: deleted\n", "")
    assert queue.spool.ids() == [queue.old, queue.bounce]
    assert not (queue.directory / "queue" / f"{queue.new}.msg").exists()
    assert daemon == [(Forget, {"queue_id": queue.new})]


def test_delete_without_a_daemon_succeeds(queue: Queue, no_daemon: list) -> None:
    """delete works with no daemon running and says nothing more about it."""
    assert run("delete", queue.old, queue.bounce, "--queue", str(queue.directory)) == (
        0, f"{queue.old}: deleted\n{queue.bounce}: deleted\n", "")
    assert queue.spool.ids() == [queue.new]


def test_hold_and_release_change_the_envelope_on_disk(queue: Queue, daemon: list) -> None:
    """hold sets envelope.held (daemon told Forget), release clears it (daemon told Reschedule)."""
    directory = str(queue.directory)
    assert run("--queue", directory, "hold", queue.new) == (0, f"{queue.new}: held\n", "")
    assert Spool(directory).load(queue.new).held is True
    assert run("--queue", directory, "hold", queue.new) == (0, f"{queue.new}: already held\n", "")
    assert run("--queue", directory, "release", queue.new) == (0, f"{queue.new}: released\n", "")
    assert Spool(directory).load(queue.new).held is False
    assert daemon == [
        (Forget, {"queue_id": queue.new}), (Forget, {"queue_id": queue.new}),
        (Reschedule, {"queue_id": queue.new})]


def test_hold_keeps_the_rest_of_the_envelope(queue: Queue, no_daemon: list) -> None:
    """hold changes only the held flag; recipients and history stay as stored."""
    before = queue.spool.load(queue.new)
    status, out, _ = run("--queue", str(queue.directory), "hold", queue.new)
    assert status == 0
    assert out == f"{queue.new}: held (no relay daemon is running: it takes effect when one starts)\n"
    assert queue.spool.load(queue.new) == replace(before, held=True)


def test_release_when_the_daemon_fails_is_exit_1_after_the_change(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that answers with an error: the release is on disk, one line on stderr, exit 1."""
    from relay import control

    def call(directory: str, command: Any, **arguments: Any) -> dict:
        raise DaemonError("UNKNOWN", "Unknown Error")

    monkeypatch.setattr(control, "call", call)
    status, out, err = run("--queue", str(queue.directory), "release", queue.old)
    assert status == 1 and out == f"{queue.old}: released\n"
    assert err == (f"relay-queue: {queue.old}: released on disk, but the relay daemon could not carry out"
                   " the command (its log says why)\n")
    assert queue.spool.load(queue.old).held is False


def test_unknown_id_is_exit_1_and_the_others_are_done(queue: Queue, no_daemon: list) -> None:
    """An unknown queue id is one line and exit 1; the known ids given with it are still changed."""
    missing = "0000000000ABCDEF"
    status, out, err = run("--queue", str(queue.directory), "hold", missing, queue.new)
    assert status == 1
    assert err == f"relay-queue: {missing}: no such message in {queue.directory}\n"
    assert queue.spool.load(queue.new).held is True
    assert run("--queue", str(queue.directory), "show", missing)[0] == 1
    assert run("--queue", str(queue.directory), "delete", missing)[:2] == (1, "")


@pytest.mark.parametrize("command", ["show", "delete", "hold", "release"])
def test_bad_id_is_refused_before_touching_the_filesystem(tmp_path: Path, command: str) -> None:
    """An id that cannot be a queue id is exit 2 with one line, even where no spool exists."""
    status, out, err = run("--queue", str(tmp_path / "absent"), command, "../queue/x")
    assert (status, out, err) == (2, "", "relay-queue: '../queue/x' is not a queue id\n")
    assert not (tmp_path / "absent").exists()


# -- flush -------------------------------------------------------------------------------------


def test_flush_reports_the_daemons_count(queue: Queue, daemon: list) -> None:
    """flush sends Flush to the daemon and prints how many messages it scheduled."""
    assert run("--queue", str(queue.directory), "flush") == (0, "flush: 2 messages scheduled\n", "")
    assert run("--queue", str(queue.directory), "flush", "dest.test", "--subdomains") == (
        0, "flush: 2 messages scheduled for dest.test and its subdomains\n", "")
    assert daemon == [
        (Flush, {"domain": None, "subdomains": False}), (Flush, {"domain": "dest.test", "subdomains": True})]


def test_flush_without_daemon_is_exit_1_with_one_line(queue: Queue) -> None:
    """flush with no daemon on the spool's socket exits 1 naming the directory and the socket."""
    directory = str(queue.directory)
    assert run("flush", "--queue", directory) == (
        1, "", f"relay-queue: no relay daemon is running for {directory} (cannot connect to {directory}/control.sock)\n")


# -- a queue in several parts ------------------------------------------------------------------


@dataclass
class Parted:
    directory: Path  # part 0
    second: Path  # part 1, <directory>/worker-1
    ids: list[str]  # in creation order: part 0, part 1, part 0, part 1 (held)
    spools: tuple[Spool, Spool]


@pytest.fixture
def parted(tmp_path: Path) -> Parted:
    directory = tmp_path / "spool"
    first = make_spool(directory)
    second = make_spool(Path(part_directory(str(directory), 1)))
    ids = [
        store(first, "a@origin.test", (Recipient("one@dest.test"),), arrival=NOW - 400),
        store(second, "b@origin.test", (Recipient("two@dest.test"),), arrival=NOW - 300),
        store(first, "c@origin.test", (Recipient("three@dest.test"),), arrival=NOW - 200),
        store(second, "d@origin.test", (Recipient("four@dest.test"),), arrival=NOW - 100, held=True),
    ]
    return Parted(directory, directory / "worker-1", ids, (first, second))


@pytest.fixture
def told(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record control calls with the directory each went to; answer as running daemons do."""
    from relay import control

    calls: list = []

    def call(directory: str, command: Any, timeout: float = 10.0, **arguments: Any) -> dict:
        calls.append((directory, command, arguments))
        return {"count": 2} if command is Flush else {}

    monkeypatch.setattr(control, "call", call)
    return calls


def test_list_merges_every_part_oldest_first(parted: Parted) -> None:
    """list shows the messages of every part in one id order under one totals line."""
    status, out, err = run("--queue", str(parted.directory), "list")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines if not line.startswith(" ")][:4] == parted.ids
    assert lines[-1] == "4 messages (1 held), 4 pending recipients"
    status, out, _ = run("--queue", str(parted.directory), "--json", "list")
    messages = json.loads(out)
    assert status == 0 and [m["id"] for m in messages] == parted.ids
    assert sorted(messages[1]) == ["arrival", "held", "id", "recipients", "sender", "size"]


def test_list_shows_a_message_in_two_parts_once(parted: Parted) -> None:
    """A message caught between two parts while being moved at start-up is listed and counted once."""
    first, second = parted.spools
    with second.open_message(parted.ids[1]) as f:
        first.insert_sync([(second.load(parted.ids[1]), f.read())])
    status, out, _ = run("--queue", str(parted.directory), "--json", "list")
    assert status == 0 and [m["id"] for m in json.loads(out)] == parted.ids


def test_show_finds_a_message_in_another_part(parted: Parted) -> None:
    """show prints a message that part 1 holds, headers included."""
    status, out, err = run("--queue", str(parted.directory), "show", parted.ids[1])
    assert status == 0 and err == ""
    assert out.splitlines()[0] == f"queue id:  {parted.ids[1]}"
    assert "sender:    <b@origin.test>" in out and "  Subject: quarterly report" in out


def test_hold_release_delete_act_in_the_part_and_tell_its_daemon(parted: Parted, told: list) -> None:
    """hold, release and delete change the message in the part that holds it and tell that part's daemon."""
    directory, queue_id = str(parted.directory), parted.ids[1]
    second = str(parted.second)
    assert run("--queue", directory, "hold", queue_id) == (0, f"{queue_id}: held\n", "")
    assert Spool(second).load(queue_id).held is True
    assert run("--queue", directory, "release", queue_id, parted.ids[0]) == (
        0, f"{queue_id}: released\n{parted.ids[0]}: already released\n", "")
    assert Spool(second).load(queue_id).held is False
    assert run("--queue", directory, "delete", queue_id) == (0, f"{queue_id}: deleted\n", "")
    assert Spool(second).ids() == [parted.ids[3]]
    assert Spool(directory).ids() == [parted.ids[0], parted.ids[2]]
    assert told == [
        (second, Forget, {"queue_id": queue_id}), (second, Reschedule, {"queue_id": queue_id}),
        (directory, Reschedule, {"queue_id": parted.ids[0]}), (second, Forget, {"queue_id": queue_id})]


def test_unknown_id_in_every_part_is_the_same_error(parted: Parted, told: list) -> None:
    """An id that no part holds is one line naming the queue directory and exit 1, as with one part."""
    missing = "0000000000ABCDEF"
    for command in ("show", "hold", "release", "delete"):
        assert run("--queue", str(parted.directory), command, missing) == (
            1, "", f"relay-queue: {missing}: no such message in {parted.directory}\n")
    assert told == []


def test_parts_are_never_created(parted: Parted, told: list) -> None:
    """An empty part directory is read as an empty part; nothing is created in it or next to it."""
    empty = parted.directory / "worker-2"
    empty.mkdir()
    status, out, _ = run("--queue", str(parted.directory), "list")
    assert status == 0 and out.endswith("4 messages (1 held), 4 pending recipients\n")
    assert run("--queue", str(parted.directory), "hold", "0000000000ABCDEF")[0] == 1
    assert list(empty.iterdir()) == []
    assert sorted(p.name for p in parted.directory.iterdir() if p.name.startswith("worker-")) == [
        "worker-1", "worker-2"]


def test_flush_without_any_daemon_names_every_part(parted: Parted) -> None:
    """flush with no daemon on any part exits 1 with one line naming the parts."""
    directory = str(parted.directory)
    assert run("--queue", directory, "flush") == (
        1, "", f"relay-queue: no relay daemon is running for parts 0, 1 of {directory}"
        " (cannot connect to their control.sock)\n")


def test_flush_sums_the_parts_and_names_one_without_daemon(parted: Parted, monkeypatch: pytest.MonkeyPatch) -> None:
    """flush adds up the counts of the daemons that answer and names, in one line, the part with none (exit 0)."""
    from relay import control

    counts = {str(parted.directory): 3, str(parted.directory / "worker-2"): 4}
    (parted.directory / "worker-2").mkdir()

    def call(directory: str, command: Any, timeout: float = 10.0, **arguments: Any) -> dict:
        if directory not in counts:
            raise control.DaemonNotRunning(directory, control.socket_path(directory), "No such file or directory")
        return {"count": counts[directory]}

    monkeypatch.setattr(control, "call", call)
    absent = f"relay-queue: no relay daemon is running for part 1 of {parted.directory}" \
             f" (cannot connect to {parted.second}/control.sock)\n"
    assert run("--queue", str(parted.directory), "flush", "dest.test") == (
        0, "flush: 7 messages scheduled for dest.test\n", absent)
    status, out, err = run("--queue", str(parted.directory), "--json", "flush")
    assert (status, err) == (0, absent)
    assert json.loads(out) == {"scheduled": 7, "parts": [
        {"part": 0, "scheduled": 3, "daemon": "told"}, {"part": 1, "scheduled": 0, "daemon": "not running"},
        {"part": 2, "scheduled": 4, "daemon": "told"}]}


def test_flush_that_fails_in_one_part_is_exit_1(parted: Parted, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that answers flush with an error is one line naming its part and exit 1; the others' sum is printed."""
    from relay import control

    def call(directory: str, command: Any, timeout: float = 10.0, **arguments: Any) -> dict:
        if directory == str(parted.second):
            raise DaemonError("UNKNOWN", "Unknown Error")
        return {"count": 1}

    monkeypatch.setattr(control, "call", call)
    assert run("--queue", str(parted.directory), "flush") == (
        1, "flush: 1 message scheduled\n", f"relay-queue: part 1 ({parted.second}): the relay daemon could not"
        " carry out the command (its log says why)\n")


PART_DAEMON = """
import sys
from twisted.internet import reactor
from relay.control import ControlService

class Scheduler:
    def flush(self, domain=None, subdomains=False):
        print("flush", domain, subdomains, flush=True)
        return int(sys.argv[2])
    def reschedule(self, queue_id):
        print("reschedule", queue_id, flush=True)
    def forget(self, queue_id):
        print("forget", queue_id, flush=True)

service = ControlService(sys.argv[1], Scheduler(), reactor)
service.privilegedStartService()
service.startService()
print("listening" if service.port is not None else "not listening", flush=True)
reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
reactor.run()
"""


def test_flush_and_hold_reach_the_daemon_of_each_part(parted: Parted) -> None:
    """Two ControlServices on real sockets, one per part: flush sums their counts, hold reaches the right one."""
    from relayproc import relay_env

    daemons = [
        subprocess.Popen([sys.executable, "-c", PART_DAEMON, str(directory), count], env=relay_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for directory, count in ((parted.directory, "3"), (parted.second, "4"))
    ]
    try:
        for daemon in daemons:
            assert daemon.stdout is not None
            assert select.select([daemon.stdout], [], [], 30)[0], "a part daemon did not start"
            assert daemon.stdout.readline() == "listening\n"
        flushed = relay_queue("--queue", str(parted.directory), "flush")
        assert (flushed.returncode, flushed.stdout, flushed.stderr) == (0, "flush: 7 messages scheduled\n", "")
        held = relay_queue("--queue", str(parted.directory), "hold", parted.ids[1])
        assert (held.returncode, held.stdout, held.stderr) == (0, f"{parted.ids[1]}: held\n", "")
    finally:
        outputs = []
        for daemon in daemons:
            daemon.terminate()
            outputs.append(daemon.communicate(timeout=15)[0])
    assert outputs[0].splitlines() == ["flush None False"]
    assert outputs[1].splitlines() == ["flush None False", f"forget {parted.ids[1]}"]


# -- options and configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--queue", "{q}", "--json", "list"],
        ["list", "--queue", "{q}", "--json"],
        ["--json", "list", "--queue", "{q}"],
        ["--queue={q}", "list", "--json"],
    ],
)
def test_options_before_or_after_the_subcommand(queue: Queue, argv: list[str]) -> None:
    """--queue and --json are accepted before and after the subcommand alike."""
    status, out, _ = run(*[a.format(q=queue.directory) for a in argv])
    assert status == 0 and len(json.loads(out)) == 3


def test_queue_option_overrides_config(queue: Queue, tmp_path: Path) -> None:
    """--queue wins over the configuration's [queue] directory."""
    config = tmp_path / "relay.toml"
    config.write_text('[queue]\ndirectory = "elsewhere"\n')
    status, out, _ = run("--config", str(config), "list", "--queue", str(queue.directory))
    assert status == 0 and out.endswith("3 messages (1 held), 3 pending recipients\n")


def test_config_queue_directory_is_relative_to_the_current_directory(
    queue: Queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config FILE finds the spool at its [queue] directory, relative to the working directory."""
    config = tmp_path / "etc" / "relay.toml"
    config.parent.mkdir()
    config.write_text('hostname = "relay.test"\n\n[queue]\ndirectory = "spool"\nmin_retry = "1m"\n')
    monkeypatch.chdir(tmp_path)
    status, out, _ = run("list", "--config", str(config))
    assert status == 0 and out.endswith("3 messages (1 held), 3 pending recipients\n")


def test_bad_config_is_exit_2_naming_file_and_key(tmp_path: Path) -> None:
    """A configuration with an unknown key is exit 2 and one line naming the file and the key."""
    config = tmp_path / "relay.toml"
    config.write_text('[queue]\ndirectroy = "x"\n')
    status, out, err = run("--config", str(config), "list")
    assert status == 2 and out == ""
    assert err.startswith(f"relay-queue: {config}: queue.directroy") and err.count("\n") == 1


def test_missing_queue_directory_is_one_line(tmp_path: Path) -> None:
    """A spool directory that does not exist is exit 2 and one line; nothing is created."""
    assert run("--queue", str(tmp_path / "nope"), "list") == (
        2, "", f"relay-queue: no queue directory at {tmp_path / 'nope'} (give --queue DIR or --config FILE)\n")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    "argv,text",
    [
        ([], "the following arguments are required: SUBCOMMAND"),
        (["frobnicate"], "argument SUBCOMMAND: invalid choice: 'frobnicate'"),
        (["show"], "the following arguments are required: ID"),
        (["list", "--bogus"], "unrecognized arguments: --bogus"),
        (["flush", "--subdomains"], "--subdomains needs a DOMAIN"),
    ],
)
def test_bad_options_are_exit_2_with_one_line(queue: Queue, argv: list[str], text: str) -> None:
    """A bad or missing option or subcommand is exit 2 with one line on stderr."""
    status, out, err = run("--queue", str(queue.directory), *argv)
    assert status == 2 and out == ""
    assert err.startswith(f"relay-queue: {text}") and err.count("\n") == 1


# -- the console form ---------------------------------------------------------------------------


def relay_queue(*args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    from relayproc import relay_env

    return subprocess.run(
        [sys.executable, "-m", "relay.cli.queue", *args],
        cwd=cwd, env=relay_env(), capture_output=True, text=True, timeout=30,
    )


def test_console_list_and_hold(queue: Queue) -> None:
    """As a process, list exits 0 with the summary and hold changes the envelope on disk."""
    listed = relay_queue("list", "--queue", str(queue.directory))
    assert listed.returncode == 0 and listed.stderr == ""
    assert listed.stdout.endswith("3 messages (1 held), 3 pending recipients\n")
    held = relay_queue("--queue", str(queue.directory), "hold", queue.bounce)
    assert held.returncode == 0, held.stderr
    assert held.stdout.startswith(f"{queue.bounce}: held")
    assert queue.spool.load(queue.bounce).held is True


def test_console_errors_never_show_a_traceback(tmp_path: Path) -> None:
    """As a process, a missing spool and a bad config each give one line and exit 2, no traceback."""
    missing = relay_queue("list", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == "relay-queue: no queue directory at relay-queue (give --queue DIR or --config FILE)\n"
    (tmp_path / "bad.toml").write_text("[queue\n")
    bad = relay_queue("--config", "bad.toml", "list", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("relay-queue: bad.toml: TOML syntax error")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_root_changes_files_as_the_spool_owner() -> None:
    """Run as root, hold rewrites the envelope as the spool's owner, so the daemon can still read it."""
    nobody = 65534
    base = Path(tempfile.mkdtemp(prefix="rq-owner-"))
    try:
        base.chmod(0o755)
        spool = make_spool(base / "spool")
        queue_id = store(spool, "a@origin.test", (Recipient("b@dest.test"),), arrival=NOW)
        for path in [base / "spool", *(base / "spool").rglob("*")]:
            os.chown(path, nobody, nobody)
        held = relay_queue("--queue", str(base / "spool"), "hold", queue_id)
        assert held.returncode == 0, held.stderr
        spool.close()
        owners = {p.name: p.stat().st_uid for p in (base / "spool").iterdir() if p.name.startswith("queue.db")}
        assert "queue.db" in owners and set(owners.values()) == {nobody}, owners
        assert spool.load(queue_id).held is True
    finally:
        shutil.rmtree(base)
