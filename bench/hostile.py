"""Benchmark: what hostile clients cost the daemon, and what a trusted client waits meanwhile.

Starts ``twistd -n relay`` on loopback (trusted_networks = 127.0.0.2/32)
and prints:

- flood: the daemon's resident set size before and after one client writes
  up to ``--mib`` MiB of ``EHLO x`` lines without reading a reply (it stops
  when the relay stops reading);
- cap: the time a trusted client (from 127.0.0.2) waits for its 220 while
  127.0.0.1 holds its ``max_sessions_per_client`` (50) sessions and keeps
  being refused;
- reserve: the same while 127.0.0.1 holds every session untrusted clients
  may have (``max_sessions`` 100, of which 10 reserved).

Bounded in count and time; loopback only.

    .venv/bin/python bench/hostile.py [--mib 64] [--trials 20]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import memory  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from relayproc import RelayProcess  # noqa: E402
from test_e2e_hostile import TRUSTED_SOURCE, config, flood, no_session_open, open_sessions, read_reply, warm_up  # noqa: E402


def flood_memory(mib: int) -> None:
    with tempfile.TemporaryDirectory(prefix="relay-hostile-") as tmp, RelayProcess(Path(tmp), config()) as relay:
        assert relay.proc is not None
        warm_up(relay.port)
        before, _ = memory(relay.proc.pid)
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        read_reply(sock)
        started = time.monotonic()
        sent = flood(sock, mib * 2**20)
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        after, peak = memory(relay.proc.pid)
        sock.close()
        print(f"flood: wrote {sent / 2**20:.1f} of {mib} MiB in {elapsed:.1f} s before the relay stopped reading; "
              f"RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB (growth {(after - before) / 1024:.1f} MiB, "
              f"peak {peak / 1024:.1f} MiB)", flush=True)


def trusted_wait(name: str, extra: str, hold: int, trials: int) -> None:
    with tempfile.TemporaryDirectory(prefix="relay-hostile-") as tmp, \
            RelayProcess(Path(tmp), config(extra=extra)) as relay:
        no_session_open(relay)
        sockets, greetings = open_sessions(relay.port, hold)
        admitted = sum(g.startswith(b"220 ") for g in greetings)
        waits, refused_after = [], 0
        try:
            for _ in range(trials):
                more, answers = open_sessions(relay.port, 1)  # the hostile address keeps trying
                sockets += more
                refused_after += answers[0].startswith(b"421 ")
                started = time.monotonic()
                trusted = socket.create_connection(("127.0.0.1", relay.port), timeout=10,
                                                   source_address=(TRUSTED_SOURCE, 0))
                banner = read_reply(trusted)
                waits.append(time.monotonic() - started)
                trusted.close()
                assert banner.startswith(b"220 "), banner
        finally:
            for sock in sockets:
                sock.close()
        print(f"{name}: 127.0.0.1 holds {admitted} sessions, {refused_after} of {trials} further attempts refused; "
              f"trusted client's 220 after median {statistics.median(waits) * 1000:.2f} ms, "
              f"max {max(waits) * 1000:.2f} ms over {trials} connections", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    flood_memory(min(args.mib, 1024))
    trials = min(args.trials, 200)
    trusted_wait("cap", "", 60, trials)
    trusted_wait("reserve", "max_sessions = 100\nreserved_sessions = 10\nmax_sessions_per_client = 1000\n",
                 95, trials)


if __name__ == "__main__":
    main()
