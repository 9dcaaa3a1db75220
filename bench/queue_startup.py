"""Benchmark: start-up with a large queue (spool recovery plus rebuilding the schedule).

Writes a queue of N messages (default 100,000) into the store
(``Spool.insert_sync``, a thousand per transaction): small bodies, envelopes
of 1-3 recipients over a few hundred domains, some already deferred
(attempts, history, a next attempt within the next four hours), some held.
Give ``--directory`` to keep the queue and reuse it on the next run.

Then, in a fresh process, measures what the daemon does at start-up:
``Spool.recover`` as SpoolService runs it, and the scheduler's pickup until
every message is scheduled (a Clock drives the batches; delivery never
answers, so the attempts started stay in flight, at most the attempt cap).
Prints the times and the peak resident set size before and after.

    .venv/bin/python bench/queue_startup.py [--messages N] [--directory DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from relay.config import QueueConfig  # noqa: E402
from relay.envelope import OUTCOME_TRANSIENT, Attempt, ClientInfo, Envelope, Recipient  # noqa: E402
from relay.queue.scheduler import Scheduler  # noqa: E402
from relay.queue.ids import new_queue_id  # noqa: E402
from relay.queue.store import Spool  # noqa: E402

MAX_MESSAGES = 1_000_000  # the loop that writes the spool is bounded by this, whatever is asked
DOMAINS = 300
BODY = (
    b"Received: from client.example.org (client.example.org [127.0.0.1])\r\n"
    b"\tby relay.example.org with ESMTP id bench; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: app@example.org\r\nTo: someone@example.net\r\nSubject: queued\r\n"
    b"Message-ID: <bench@example.org>\r\n\r\n" + b"A line of a small message body.\r\n" * 12
)


class _WallClock:
    seconds = staticmethod(time.time)


def _sync_runner(f: Callable[..., Any], *args: Any) -> Deferred:
    return defer.maybeDeferred(f, *args)


def _envelope(queue_id: str, n: int, rng: random.Random, now: float) -> Envelope:
    recipients = []
    deferred = rng.random() < 0.6
    for j in range(rng.randint(1, 3)):
        domain = f"d{rng.randrange(DOMAINS)}.example"
        attempts = rng.randint(1, 4) if deferred else 0
        history = tuple(
            Attempt(
                time=now - 600.0 * (attempts - k),
                outcome=OUTCOME_TRANSIENT,
                reply="451 4.7.1 greylisted, try again later",
                host=f"mx1.{domain}[192.0.2.{j + 1}]",
                route="mx",
            )
            for k in range(attempts)
        )
        recipients.append(
            Recipient(
                address=f"user{n}.{j}@{domain}",
                attempts=attempts,
                last_error=history[-1].reply if history else "",
                next_attempt=now + rng.uniform(0, 4 * 3600) if deferred else None,
                history=history,
            )
        )
    return Envelope(
        queue_id=queue_id,
        sender=f"app{n % 50}@example.org",
        recipients=tuple(recipients),
        client=ClientInfo(address="127.0.0.1", port=40000 + n % 20000, helo="client.example.org", trusted=True),
        arrival=now - rng.uniform(0, 2 * 86400),
        size=len(BODY),
        held=rng.random() < 0.01,
    )


def write_spool(directory: str, count: int) -> None:
    """Write ``count`` queued messages into the store (bounded loop)."""
    spool = Spool(directory, runner=_sync_runner)
    spool.recover()
    rng, now = random.Random(2024), time.time()
    started = time.monotonic()
    batch = []
    for n in range(min(count, MAX_MESSAGES)):
        batch.append((_envelope(new_queue_id(_WallClock), n, rng, now), BODY))
        if len(batch) == 1000:
            spool.insert_sync(batch)
            batch = []
        if n and n % 20000 == 0:
            print(f"  written {n} messages ({time.monotonic() - started:.0f} s)", flush=True)
    spool.insert_sync(batch)
    print(f"spool of {count} messages written in {time.monotonic() - started:.1f} s", flush=True)


class _SilentDelivery:
    """Delivery that never answers: what is started stays in flight."""

    def __init__(self) -> None:
        self.started = 0

    def attempt(self, envelope: Envelope) -> Deferred:
        self.started += 1
        return Deferred()


def _rss_kib() -> int:
    """Current resident set size in KiB (Linux), 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(directory: str) -> None:
    """Run in a fresh process: recovery, then pickup until everything is scheduled."""
    peak_before, rss_before = _peak_kib(), _rss_kib()
    started = time.perf_counter()
    spool = Spool(directory, runner=_sync_runner)
    report = spool.recover()
    recovered = time.perf_counter()
    clock = Clock()
    clock.advance(time.time())
    delivery = _SilentDelivery()
    scheduler = Scheduler(spool, delivery, clock, config=QueueConfig(), hostname="relay.example.org")
    done = scheduler.pickup()
    turns = 0
    while not done.called and turns < 10 * MAX_MESSAGES:
        clock.advance(0)
        turns += 1
    finished = time.perf_counter()
    peak_after, rss_after = _peak_kib(), _rss_kib()
    total = scheduler.scheduled + len(scheduler.in_flight)
    print(f"queued entries found by recover: {report.count}")
    print(f"Spool.recover:                 {recovered - started:6.2f} s")
    print(f"scheduler pickup:              {finished - recovered:6.2f} s "
          f"({total} scheduled, {report.count - total} held, {delivery.started} attempts started, "
          f"cap {scheduler.max_attempts})")
    print(f"start-up to all scheduled:     {finished - started:6.2f} s")
    print(f"peak RSS before / after:       {peak_before / 1024:6.1f} MiB / {peak_after / 1024:6.1f} MiB "
          f"(growth {(peak_after - peak_before) / 1024:.1f} MiB)")
    print(f"current RSS before / after:    {rss_before / 1024:6.1f} MiB / {rss_after / 1024:6.1f} MiB "
          f"(growth {(rss_after - rss_before) / 1024:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--directory", help="spool to create or reuse (kept); default: a temporary one")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the fresh measuring process
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        directory = args.directory or os.path.join(tmp, "queue")
        existing = len(Spool(directory).ids())
        if existing < args.messages:
            write_spool(directory, args.messages - existing)
        else:
            print(f"reusing {directory} ({existing} messages)")
        command = [sys.executable, __file__, "--measure", directory]
        subprocess.run(command, check=True, timeout=600)


if __name__ == "__main__":
    main()
