"""Profile the daemon under the accept load: where does a durable message cost time?

Starts ``twistd -n relay`` as ``bench/accept.py`` does, attaches the py-spy
sampling profiler to it (a development tool: ``.venv/bin/pip install
py-spy``; it is not a dependency of the relay), runs the accept load for
each client count and prints, per run, the functions with the most samples,
by their own time and inclusive of what they call.  Every thread is
sampled (the reactor and the spool's disk threads); ``--idle`` counts
samples of threads that wait, too.

    .venv/bin/python bench/profile_accept.py [--messages N] [--clients 1,50] [--next-hop down|stalled|sink]
        [--top 25] [--idle] [--keep DIR]

The raw collapsed stacks of each run are kept under ``--keep`` when given
(``flamegraph.pl`` or speedscope read them).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import NEXT_HOPS, next_hop, run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from relayproc import RelayProcess  # noqa: E402

PY_SPY = Path(sys.executable).with_name("py-spy")
SAMPLE_RATE = 250  # samples per second
SETTLE = 1.0  # seconds py-spy gets to attach before the load starts


def summarize(collapsed: Path, top: int) -> str:
    """The functions with most samples: own time and inclusive time, in percent of all samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples"]
    for title, counter in (("own time", own), ("inclusive", inclusive)):
        lines.append(f"  -- top {top} by {title} --")
        for frame, count in counter.most_common(top):
            lines.append(f"  {100.0 * count / total:5.1f}%  {frame}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``function (path/to/module.py:LINE)`` -> ``function (module.py)``: group by function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})" if path else name


def profile(clients: int, args: argparse.Namespace, keep: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="relay-profile-") as tmp, next_hop(args.next_hop) as (host, port):
        config = f'[[routes]]\ndomains = ["*"]\nsmarthost = "{host}:{port}"\n'
        out = Path(tmp) / "stacks.txt"
        with RelayProcess(Path(tmp) / "relay", config, args=["--hostname", "bench.relay.test"]) as relay:
            assert relay.proc is not None
            command = [str(PY_SPY), "record", "--pid", str(relay.proc.pid), "--rate", str(SAMPLE_RATE),
                       "--format", "raw", "--output", str(out), "--threads", "--nonblocking"]
            if args.idle:
                command.append("--idle")
            spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(SETTLE)
            sent, elapsed = run(relay.port, clients, args.messages, args.size)
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
            relay.stop()
        print(f"clients={clients} next_hop={args.next_hop} messages={sent} rate={sent / elapsed:.1f} msg/s (under the profiler)")
        if not out.exists():
            print("  py-spy wrote nothing:", spy.stderr.read().decode(errors="replace") if spy.stderr else "")
            return
        print(summarize(out, args.top))
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(out, keep / f"accept-{args.next_hop}-{clients}.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--clients", default="1,50")
    parser.add_argument("--next-hop", choices=NEXT_HOPS, default="down")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--idle", action="store_true", help="count samples of waiting threads too")
    parser.add_argument("--keep", type=Path, help="directory to keep the collapsed stacks in")
    args = parser.parse_args()
    if not PY_SPY.exists() or not os.access(PY_SPY, os.X_OK):
        sys.exit(f"{PY_SPY} not found: .venv/bin/pip install py-spy (a development tool)")
    for clients in [int(c) for c in args.clients.split(",")]:
        profile(clients, args, args.keep)


if __name__ == "__main__":
    main()
