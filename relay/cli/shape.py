"""``relay-queue shape``: the queue as destination domains by age, after Postfix's qshape.

This module owns the table: one row per destination domain (the domain of
each pending recipient, lower-cased), one column per age bucket, counting
pending recipients by the age of their message (now - arrival).  The
buckets are qshape's: up to 5, 10, 20, 40, 80, 160, 320, 640 and 1280
minutes, and older.  A TOTAL row comes first; domains follow, the largest
first.  ``--state`` picks active (due now), deferred (waiting for a retry)
or held messages; the default counts them all.  ``--top N`` keeps the N
largest domains.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, TextIO

from relay.envelope import Envelope

BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # minutes: upper bounds; one more column for older
LABELS = tuple(str(b) for b in BUCKETS) + (f"{BUCKETS[-1]}+",)
STATES = ("all", "active", "deferred", "held")
TOTAL = "TOTAL"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``shape``."""
    parser.add_argument("--state", choices=STATES, default="all",
                        help="active (due now), deferred (waiting for a retry), held, or all (default)")
    parser.add_argument("--top", type=int, metavar="N", default=0, help="only the N largest domains")


@dataclass
class Row:
    """One line of the table: a domain (or TOTAL), its recipients in each age bucket."""

    domain: str
    counts: list[int] = field(default_factory=lambda: [0] * len(LABELS))

    @property
    def total(self) -> int:
        return sum(self.counts)


def bucket(age: float) -> int:
    """The column of a message ``age`` seconds old."""
    minutes = max(0.0, age) / 60
    for index, limit in enumerate(BUCKETS):
        if minutes <= limit:
            return index
    return len(BUCKETS)


def state_of(envelope: Envelope, now: float) -> str:
    """held, active (a pending recipient is due now) or deferred (all wait for a later attempt)."""
    if envelope.held:
        return "held"
    times = [r.next_attempt for r in envelope.pending()]
    return "active" if any(t is None or t <= now for t in times) else "deferred"


def shape(envelopes: Iterable[Envelope], now: float, state: str = "all") -> tuple[Row, list[Row]]:
    """The TOTAL row and the domain rows (largest first, then by name) of the pending recipients."""
    total = Row(TOTAL)
    rows: dict[str, Row] = {}
    for envelope in envelopes:
        pending = envelope.pending()
        if not pending or (state != "all" and state_of(envelope, now) != state):
            continue
        column = bucket(now - envelope.arrival)
        for recipient in pending:
            domain = recipient.domain.lower()
            row = rows.get(domain)
            if row is None:
                row = rows[domain] = Row(domain)
            row.counts[column] += 1
            total.counts[column] += 1
    ordered = sorted(rows.values(), key=lambda r: (-r.total, r.domain))
    return total, ordered


def render_text(total: Row, rows: list[Row]) -> str:
    """The table as qshape prints it: domain, T (total), then one column per bucket."""
    lines = [[r.domain, str(r.total), *map(str, r.counts)] for r in [total, *rows]]
    header = ["", "T", *LABELS]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    out = []
    for line in [header, *lines]:
        cells = [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])]
        out.append(" ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def render_json(total: Row, rows: list[Row], state: str) -> str:
    def one(row: Row) -> dict[str, Any]:
        return {"domain": row.domain, "total": row.total, "counts": row.counts}

    document = {
        "unit": "minutes",
        "buckets": list(LABELS),
        "state": state,
        "total": {"total": total.total, "counts": total.counts},
        "domains": [one(r) for r in rows],
    }
    return json.dumps(document, ensure_ascii=False, sort_keys=True) + "\n"


def write_shape(envelopes: Iterable[Envelope], options: argparse.Namespace, out: TextIO, now: float) -> None:
    """``relay-queue shape`` on ``envelopes``, to ``out``."""
    total, rows = shape(envelopes, now, options.state)
    if options.top > 0:
        rows = rows[: options.top]
    out.write(render_json(total, rows, options.state) if options.json else render_text(total, rows))
