"""Benchmark: durable messages accepted per second, 1 and 50 concurrent clients.

Starts ``twistd -n relay`` on a free loopback port in a temporary directory
(every 250 is after fsync, as always), then smtplib clients, each on its own
connection, send messages back to back.  Clients run in a few processes so
the client side does not bottleneck on one GIL.  Bounded in count and time.

What a run measures depends on the next hop (``--next-hop``); every message
is handed to the scheduler the moment it is durable, as in production, and
the relay has no "hold on arrival" switch, so the next hop decides what that
costs:

* ``down`` (default): the catch-all smart host is a loopback port where
  nothing listens, an upstream outage.  Each message costs acceptance plus
  one refused connect and one durable deferral (its envelope rewritten and
  fsynced with the next attempt time): two commits per message.  This is
  the figure for "the queue grows while the upstream is down".
* ``stalled``: the smart host accepts TCP connections and never answers.
  At most the scheduler's attempt cap (100) of attempts hang, the rest wait
  in the schedule: acceptance alone, as near as the product gets to it.
* ``sink``: an aiosmtpd sink on loopback takes every message; acceptance
  runs alongside delivery and removal.  ``bench/relay_rate.py`` times that
  case to the last delivery (end to end).

Besides the rate, each run prints the CPU time the daemon used per message
(user plus system, every thread: steadier than the rate on a shared
machine, where the clients and other work compete for the same cores).
After each run the daemon's resident set size is printed (``VmRSS``, and
the peak ``VmHWM``) with the number of messages still queued on disk.

    .venv/bin/python bench/accept.py [--messages N] [--size BYTES] [--clients 1,50]
        [--next-hop down|stalled|sink] [--repeat R] [--tmpdir DIR]

The queue lives in a new temporary directory under ``--tmpdir`` (default:
the system's).  Where it lives matters on ext4: creating a file costs what
the inode allocator has to search in the directory's block group, from some
20 microseconds to a millisecond of CPU on the same disk, and the spool
creates two or three files per message.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import smtplib
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from relayproc import RelayProcess, free_port  # noqa: E402
from relay.queue.store import Spool  # noqa: E402

TIME_LIMIT = 120.0  # seconds per run, whatever the count
NEXT_HOPS = ("down", "stalled", "sink")
STALLED_LIMIT = 1000  # connections a stalled next hop holds open at most
SETTLE = 6.0  # seconds between runs after a sync (see settle)


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


def run(port: int, clients: int, total: int, size: int, limit: float = TIME_LIMIT) -> tuple[int, float]:
    processes = min(clients, 4)
    per_process = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    per_client = max(1, total // clients)
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=worker, args=(port, n, per_client, size, limit, q)) for n in per_process]
    start = time.monotonic()
    for p in procs:
        p.start()
    sent = sum(q.get(timeout=limit + 60) for _ in procs)
    elapsed = time.monotonic() - start
    for p in procs:
        p.join(10)
    return sent, elapsed


class StalledHost:
    """A loopback TCP listener that accepts connections and never says a word."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set() and len(self._held) < STALLED_LIMIT:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._listener.close()


@contextlib.contextmanager
def next_hop(kind: str) -> Iterator[tuple[str, int]]:
    """The (host, port) of the catch-all smart host for a run of kind ``kind``."""
    if kind == "down":
        yield "127.0.0.1", free_port()
    elif kind == "stalled":
        stalled = StalledHost()
        try:
            yield "127.0.0.1", stalled.port
        finally:
            stalled.close()
    elif kind == "sink":
        from smtpsink import SMTPSink

        with SMTPSink("127.0.0.9") as sink:
            yield sink.host, sink.port
    else:
        raise ValueError(f"unknown next hop {kind!r}")


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in KiB, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time that process ``pid`` (all its threads) has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def settle() -> None:
    """Let the filesystem forget earlier runs: write back dirty blocks, wait out ext4's window.

    Without a journal, ext4 skips inodes freed in the last few seconds (five
    minutes while their inode table block is dirty) when it allocates a new
    one, at a cost per skipped inode: the files an earlier run deleted would
    make this run's file creations slower.
    """
    os.sync()
    time.sleep(SETTLE)


def bench(clients: int, args: argparse.Namespace) -> None:
    settle()
    with tempfile.TemporaryDirectory(prefix="relay-bench-", dir=args.tmpdir) as tmp, next_hop(args.next_hop) as (host, port):
        config = f'[[routes]]\ndomains = ["*"]\nsmarthost = "{host}:{port}"\n'
        with RelayProcess(Path(tmp), config, args=["--hostname", "bench.relay.test"]) as relay:
            assert relay.proc is not None
            cpu_before = cpu_seconds(relay.proc.pid)
            sent, elapsed = run(relay.port, clients, args.messages, args.size)
            user, system = (after - before for after, before in zip(cpu_seconds(relay.proc.pid), cpu_before))
            rss, peak = memory(relay.proc.pid)
            relay.stop()
            queued = len(Spool(str(relay.queue_dir)).ids())
    print(
        f"clients={clients:3d} next_hop={args.next_hop} messages={sent:6d} size={args.size}B "
        f"elapsed={elapsed:6.2f}s rate={sent / elapsed:8.1f} msg/s (durable, fsync per commit) "
        f"daemon_cpu={1000 * (user + system) / max(1, sent):.2f}ms/msg (user {1000 * user / max(1, sent):.2f}) "
        f"queued_on_disk={queued} rss={rss / 1024:.1f}MiB peak={peak / 1024:.1f}MiB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (default 2000)")
    parser.add_argument("--size", type=int, default=4000, help="message size in bytes (default 4000)")
    parser.add_argument("--clients", default="1,50", help="comma-separated client counts (default 1,50)")
    parser.add_argument("--next-hop", choices=NEXT_HOPS, default="down", help="what the smart host does (default down)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per client count (default 1)")
    parser.add_argument("--tmpdir", help="where the temporary queue directory goes (default: the system's)")
    args = parser.parse_args()

    for clients in [int(c) for c in args.clients.split(",")]:
        for _ in range(max(1, args.repeat)):
            bench(clients, args)


if __name__ == "__main__":
    main()
