"""Tests for ``relay-queue shape`` (relay.cli.shape): a real spool with several domains and ages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from relay.cli import queue as cli
from relay.cli.shape import LABELS, bucket
from relay.envelope import DELIVERED, Recipient
from relay.queue.partitions import part_directory
from test_queue_cli import NOW, make_spool, store

MINUTE = 60.0


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """far.test backs up (three messages: 2 minutes, 30 minutes and 2 days old), near.test has one fresh
    recipient, a delivered recipient is not counted, one held message and one in a second part."""
    directory = tmp_path / "spool"
    spool = make_spool(directory)
    store(spool, "a@origin.test", (Recipient("x@far.test"), Recipient("y@near.test")), arrival=NOW - 2 * MINUTE)
    store(spool, "a@origin.test", (Recipient("x@FAR.test", next_attempt=NOW + 600),
                                   Recipient("done@near.test", status=DELIVERED)), arrival=NOW - 30 * MINUTE)
    store(spool, "", (Recipient("z@far.test", attempts=9, next_attempt=NOW + 3600),), arrival=NOW - 2 * 86400)
    store(spool, "a@origin.test", (Recipient("h@parked.test"),), arrival=NOW - 100 * MINUTE, held=True)
    other = make_spool(Path(part_directory(str(directory), 1)))
    store(other, "b@origin.test", (Recipient("w@far.test", next_attempt=NOW + 60),), arrival=NOW - 7 * MINUTE)
    return directory


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.run(list(argv), out=out, err=err, clock=lambda: NOW)
    return status, out.getvalue(), err.getvalue()


def test_buckets_are_qshapes() -> None:
    """Ages fall into qshape's buckets: up to 5, 10, 20, ... 1280 minutes, then older."""
    assert LABELS == ("5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+")
    assert [bucket(s * MINUTE) for s in (0, 5, 5.5, 30, 1280, 1281)] == [0, 0, 1, 3, 8, 9]


def test_table_of_domains_by_age(spool_dir: Path) -> None:
    """The table has a TOTAL row and one row per domain, largest first, counting pending recipients by age."""
    status, out, err = run("--queue", str(spool_dir), "shape")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["T", *LABELS]
    rows = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in lines[1:]}
    assert list(rows) == ["TOTAL", "far.test", "near.test", "parked.test"]
    assert rows["far.test"] == [4, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1]
    assert rows["near.test"] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert rows["parked.test"] == [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert rows["TOTAL"] == [6, 2, 1, 0, 1, 0, 1, 0, 0, 0, 1]


def test_json_and_state_filter(spool_dir: Path) -> None:
    """--json gives the same counts as data; --state deferred keeps only messages waiting for a retry."""
    status, out, _ = run("--queue", str(spool_dir), "--json", "shape", "--state", "deferred")
    assert status == 0
    document = json.loads(out)
    assert document["buckets"] == list(LABELS) and document["unit"] == "minutes"
    assert document["domains"] == [{"domain": "far.test", "total": 3, "counts": [0, 1, 0, 1, 0, 0, 0, 0, 0, 1]}]
    assert document["total"]["total"] == 3
    _, held, _ = run("--queue", str(spool_dir), "shape", "--state", "held", "--json")
    assert [d["domain"] for d in json.loads(held)["domains"]] == ["parked.test"]


def test_top_keeps_the_largest_domains(spool_dir: Path) -> None:
    """--top 1 shows the TOTAL row and the largest domain only."""
    _, out, _ = run("--queue", str(spool_dir), "shape", "--top", "1")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["TOTAL", "far.test"]


def test_empty_queue(tmp_path: Path) -> None:
    """An empty queue shows the header and a TOTAL row of zeros."""
    make_spool(tmp_path / "empty")
    status, out, _ = run("--queue", str(tmp_path / "empty"), "shape")
    assert status == 0
    assert out.splitlines()[1].split() == ["TOTAL"] + ["0"] * 11
