"""Benchmark: durable messages accepted per second, 1 and 50 concurrent clients.

Starts ``twistd -n relay`` on a free loopback port in a temporary directory
(every 250 is after fsync, as always), then smtplib clients, each on its own
connection, send messages back to back.  Clients run in a few processes so
the client side does not bottleneck on one GIL.  Bounded in count and time.
Outbound delivery goes to a loopback port where nothing listens, so the
numbers measure acceptance and the queue, not a downstream server.

    .venv/bin/python bench/accept.py [--messages N] [--size BYTES] [--clients 1,50]
"""

from __future__ import annotations

import argparse
import multiprocessing
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from relayproc import RelayProcess, free_port  # noqa: E402

TIME_LIMIT = 120.0  # seconds per run, whatever the count


def message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog 0123456789.\r\n"
    body = line * max(1, size // len(line))
    return b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n" + body


def client(port: int, count: int, data: bytes, deadline: float, results: list) -> None:
    sent = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("bench.example.org")
            while sent < count and time.monotonic() < deadline:
                s.sendmail("bench@example.org", ["sink@example.net"], data)
                sent += 1
    finally:
        results.append(sent)


def worker(port: int, clients: int, per_client: int, size: int, limit: float, queue) -> None:
    data = message(size)
    deadline = time.monotonic() + limit
    results: list[int] = []
    threads = [threading.Thread(target=client, args=(port, per_client, data, deadline, results)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(sum(results))


def run(port: int, clients: int, total: int, size: int) -> tuple[int, float]:
    processes = min(clients, 4)
    per_process = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    per_client = max(1, total // clients)
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=worker, args=(port, n, per_client, size, TIME_LIMIT, q)) for n in per_process]
    start = time.monotonic()
    for p in procs:
        p.start()
    sent = sum(q.get(timeout=TIME_LIMIT + 60) for _ in procs)
    elapsed = time.monotonic() - start
    for p in procs:
        p.join(10)
    return sent, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (default 2000)")
    parser.add_argument("--size", type=int, default=4000, help="message size in bytes (default 4000)")
    parser.add_argument("--clients", default="1,50", help="comma-separated client counts (default 1,50)")
    args = parser.parse_args()

    for clients in [int(c) for c in args.clients.split(",")]:
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            config = f'[[routes]]\ndomains = ["*"]\nsmarthost = "127.0.0.1:{free_port()}"\n'
            with RelayProcess(Path(tmp), config, args=["--hostname", "bench.relay.test"]) as relay:
                sent, elapsed = run(relay.port, clients, args.messages, args.size)
                relay.stop()
                queued = len(list(relay.queue_dir.glob("queue/*.json")))
            print(
                f"clients={clients:3d} messages={sent:6d} size={args.size}B "
                f"elapsed={elapsed:6.2f}s rate={sent / elapsed:8.1f} msg/s (durable, fsync per commit) "
                f"queued_on_disk={queued}"
            )


if __name__ == "__main__":
    main()
