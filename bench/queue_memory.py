"""Benchmark: the daemon's memory while the queue grows (it must stay flat).

Starts ``twistd -n relay`` as ``bench/accept.py`` does, with the next hop
down by default (an upstream outage: every message is attempted once,
deferred and stays queued), then accepts messages with 50 clients in steps
up to ``--messages`` (default 20,000) and prints the daemon's resident set
size after each step, with the growth per queued message.  What may grow
per message is the scheduler's index entry (queue id, due time, domains):
some hundred octets.  Bounded in count and time.

    .venv/bin/python bench/queue_memory.py [--messages N] [--clients C] [--next-hop down|stalled]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import memory, next_hop, run, settle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from relayproc import RelayProcess  # noqa: E402
from relay.queue.store import Spool  # noqa: E402

MAX_MESSAGES = 200_000
STEP_LIMIT = 300.0  # seconds per step, whatever the count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--next-hop", choices=("down", "stalled"), default="down")
    parser.add_argument("--tmpdir")
    args = parser.parse_args()
    total = min(args.messages, MAX_MESSAGES)
    steps = sorted({max(1, total // 10), total // 4, total // 2, total} - {0})
    settle()
    with tempfile.TemporaryDirectory(prefix="relay-memory-", dir=args.tmpdir) as tmp, next_hop(args.next_hop) as (host, port):
        config = f'[[routes]]\ndomains = ["*"]\nsmarthost = "{host}:{port}"\n'
        with RelayProcess(Path(tmp), config, args=["--hostname", "bench.relay.test"]) as relay:
            assert relay.proc is not None
            base_rss, _ = memory(relay.proc.pid)
            print(f"queued=0 rss={base_rss / 1024:.1f}MiB (started)", flush=True)
            accepted = 0
            first: tuple[int, int] | None = None
            for target in steps:
                sent, elapsed = run(relay.port, args.clients, target - accepted, args.size, STEP_LIMIT)
                accepted += sent
                rss, peak = memory(relay.proc.pid)
                queued = len(Spool(str(relay.queue_dir)).ids())
                if first is None:
                    first = (accepted, rss)
                    slope = ""
                else:
                    per = 1024 * (rss - first[1]) / max(1, accepted - first[0])
                    slope = f" growth since {first[0]}: {per:.0f} octets per message"
                print(f"accepted={accepted} queued_on_disk={queued} rate={sent / elapsed:.0f} msg/s "
                      f"rss={rss / 1024:.1f}MiB peak={peak / 1024:.1f}MiB{slope}", flush=True)
            relay.stop()


if __name__ == "__main__":
    main()
