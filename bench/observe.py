"""Benchmark: what observing the relay costs.

Per event: a log event through relay's Logger into the metrics observer;
one SMTP reply counted; one log line written as text and as JSON (behind
the level filter, into memory).  Per scrape: the queue gauges
(``QueueCollector``) and ``relay-queue shape`` on a queue of N messages
(default 20,000, written as bench/queue_startup.py writes its queue).

    .venv/bin/python bench/observe.py [--messages N] [--events N]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from queue_startup import write_spool  # noqa: E402

from relay.cli import queue as cli  # noqa: E402
from relay.log import Logger, filtered, make_observer  # noqa: E402
from relay.metrics import Metrics, QueueCollector  # noqa: E402

MAX_EVENTS = 1_000_000
LINE = "{queue_id}: accepted from {peer} <{sender}>, {count} recipients, {size} octets"
FIELDS = dict(queue_id="0Qx1AbCdEfGh1234", peer="[127.0.0.1]:40000", sender="app@example.org", count=1, size=4096,
              event="accepted")


def per_call(f: Callable[[], None], n: int) -> float:
    """Microseconds per call of ``f``, over ``n`` calls."""
    started = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - started) / n * 1e6


def median_seconds(f: Callable[[], None], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        f()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    n = min(args.events, MAX_EVENTS)

    metrics = Metrics()
    counted = Logger(namespace="relay.bench", observer=metrics.observe)
    print(f"log event into the metrics observer: {per_call(lambda: counted.info(LINE, **FIELDS), n):6.2f} us")
    print(f"SMTP reply counted:                  {per_call(lambda: metrics.reply('in', 250), n):6.2f} us")
    for fmt in ("text", "json"):
        observer = make_observer(io.StringIO(), fmt)
        logger = Logger(namespace="relay.bench", observer=filtered(observer, "info"))
        print(f"{fmt:4} log line:                       {per_call(lambda: logger.info(LINE, **FIELDS), n):6.2f} us")
        observer.flush()

    with tempfile.TemporaryDirectory() as directory:
        write_spool(directory, args.messages)
        collector = QueueCollector(directory)
        scrape = median_seconds(lambda: list(collector.collect()))
        shape = median_seconds(lambda: cli.run(["--queue", directory, "shape"], out=io.StringIO(), err=io.StringIO()))
        print(f"queue gauges, {args.messages} messages:   {scrape * 1000:8.1f} ms per scrape")
        print(f"relay-queue shape, {args.messages} messages: {shape * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
