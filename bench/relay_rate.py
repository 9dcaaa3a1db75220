"""Benchmark: end-to-end relay rate, smtplib -> relay -> aiosmtpd sink.

Starts an aiosmtpd sink on loopback and ``twistd -n relay`` with a catch-all
smart-host route to it, then smtplib clients submit messages (the sink runs
in this process, the clients in threads of it).  The clock
stops when the sink has received every message: that is accepted (fsynced),
routed, delivered and removed from the queue.  Also prints the CPU time the daemon used per
message.  Bounded in count and time.

    .venv/bin/python bench/relay_rate.py [--messages N] [--clients C] [--size BYTES]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from relayproc import RelayProcess  # noqa: E402
from smtpsink import SMTPSink  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import client, cpu_seconds, message, settle  # noqa: E402
from relay.queue.store import Spool  # noqa: E402

TIME_LIMIT = 180.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--size", type=int, default=4000)
    args = parser.parse_args()

    data = message(args.size)
    settle()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp, SMTPSink("127.0.0.9") as sink:
        config = f'[[routes]]\ndomains = ["*"]\nsmarthost = "127.0.0.9:{sink.port}"\n'
        with RelayProcess(Path(tmp), config, args=["--hostname", "bench.relay.test"]) as relay:
            assert relay.proc is not None
            cpu_before = cpu_seconds(relay.proc.pid)
            per_client = max(1, args.messages // args.clients)
            total = per_client * args.clients
            deadline = time.monotonic() + TIME_LIMIT
            results: list[int] = []
            start = time.monotonic()
            threads = [
                threading.Thread(target=client, args=(relay.port, per_client, data, deadline, results))
                for _ in range(args.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            accepted = time.monotonic() - start
            received = sink.wait_for(sum(results), timeout=max(1.0, deadline - time.monotonic()))
            elapsed = time.monotonic() - start
            user, system = (after - before for after, before in zip(cpu_seconds(relay.proc.pid), cpu_before))
            relay.stop()
            left = len(Spool(str(relay.queue_dir)).ids())
    print(
        f"messages={len(received)}/{total} clients={args.clients} size={args.size}B "
        f"accepted_in={accepted:.2f}s relayed_in={elapsed:.2f}s "
        f"rate={len(received) / elapsed:.1f} msg/s end to end (fsync on accept) "
        f"daemon_cpu={1000 * (user + system) / max(1, len(received)):.2f}ms/msg left_in_queue={left}"
    )


if __name__ == "__main__":
    main()
