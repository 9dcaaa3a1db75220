"""Benchmark: relay throughput under Postfix's smtp-source, delivered to smtp-sink.

The way operators compare MTAs: Postfix's load generator ``smtp-source``
submits messages to the relay, and the relay delivers every one through a
catch-all smart-host route to Postfix's ``smtp-sink``.  Both tools are C
programs, so neither end of the pipe competes with the relay for the GIL or
costs much CPU.  All addresses are loopback.

The script starts ``smtp-sink -c`` on ``127.0.0.1:--sink-port`` (as root with
``-u nobody``, which it then requires) and reads the running counter it
prints (``mesg=N``) to know how many messages have arrived.  It writes a
relay configuration into a temporary directory and starts
``.venv/bin/twistd -n --pidfile= relay --config relay.toml`` there (output in
``relay.log``; ``PYTHONPATH`` is the repository, so the working tree is what
runs), listening on ``127.0.0.1:--listen-port``.

For every message size and concurrency, each repetition first sends
``--warmup`` messages and waits until the sink has them, then runs
``smtp-source -s CONC -m COUNT -l SIZE`` (with ``-d`` under ``--reuse``: many
messages per connection; otherwise one connection per message) and measures

* accept msg/s: COUNT over the wall time of the smtp-source run (every
  message accepted, so durable in the queue);
* e2e msg/s: COUNT over the time from the start of smtp-source until the
  sink's counter reached COUNT more than before (accepted, routed, delivered);
* CPU ms/msg: the daemon's user plus system CPU time over the same span,
  from ``/proc/PID/stat`` (every thread; live child processes and reaped
  children included), divided by COUNT.

After each repetition the script waits until ``relay-queue list --json``
prints ``[]``.  With ``--reps R`` each cell runs R times and the table shows
the medians (every repetition is also printed, to stderr, as it ends).
Everything is bounded: 20 s for the daemon to listen, 300 s per smtp-source
run, 120 s after it for the sink to receive, 60 s for the queue to drain.
Whatever it started is stopped by its PID (SIGTERM, SIGKILL after 10 s).

    .venv/bin/python bench/smtp_rate.py [--sizes 4096,102400] [--conc 10,50]
        [--count N] [--warmup 300] [--reuse] [--reps 1]
        [--listen-port 2540] [--sink-port 2600]
        [--server-toml 'KEY = VALUE']... [--extra-toml 'TOML']... [--keep] [--tmpdir DIR]

``--server-toml`` lines go into the ``[server]`` table (after ``listen``),
e.g. ``--server-toml 'max_sessions = 2000'``; ``--extra-toml`` text is
appended at the end of the file and must begin with a table header, e.g.
``--extra-toml $'[delivery]\\nper_destination = 50'``.  Both may be repeated.

``smtp-source`` and ``smtp-sink`` come with Debian's ``postfix`` package.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
TWISTD = REPO / ".venv" / "bin" / "twistd"
RELAY_QUEUE = REPO / ".venv" / "bin" / "relay-queue"
SMTP_SOURCE = Path("/usr/sbin/smtp-source")
SMTP_SINK = Path("/usr/sbin/smtp-sink")

HOST = "127.0.0.1"
SINK_BACKLOG = 1000
LISTEN_LIMIT = 20.0  # seconds for the daemon (and the sink) to accept connections
SOURCE_LIMIT = 300.0  # seconds one smtp-source run may take
E2E_LIMIT = 120.0  # seconds after smtp-source ends for the sink to receive everything
DRAIN_LIMIT = 60.0  # seconds for the queue to empty after a run
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
MAX_CELLS = 100  # sizes x concurrencies
MAX_REPS = 20


def port_free(port: int) -> bool:
    """Whether nothing listens on ``HOST:port`` (a bind would succeed)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {HOST}:{port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what}: nothing listening on {HOST}:{port} after {timeout:.0f} s")


def stop(proc: Optional[subprocess.Popen]) -> None:
    """SIGTERM the process we started (by its PID), SIGKILL it after STOP_GRACE seconds."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(STOP_GRACE)


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()  # fields from the third (state) on


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (all threads), its reaped children and its live descendants."""
    fields = _stat_fields(pid)
    total = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            other = _stat_fields(int(entry.name))
        except OSError:
            continue
        children.setdefault(int(other[1]), []).append(int(entry.name))
        ticks[int(entry.name)] = int(other[11]) + int(other[12])
    todo = list(children.get(pid, ()))
    seen: set[int] = set()
    while todo and len(seen) < 10_000:
        child = todo.pop()
        if child in seen:
            continue
        seen.add(child)
        total += ticks.get(child, 0)
        todo.extend(children.get(child, ()))
    return total


class Sink:
    """``smtp-sink -c`` on HOST:port; a reader thread follows its ``mesg=N`` counter."""

    def __init__(self, port: int, workdir: Path) -> None:
        command = [str(SMTP_SINK)]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        command += ["-c", f"{HOST}:{port}", str(SINK_BACKLOG)]
        self.port = port
        self.count = 0
        self._cond = threading.Condition()
        self._target: Optional[int] = None
        self._reached_at: Optional[float] = None
        self._errors = open(workdir / "sink.log", "wb")
        self.proc = subprocess.Popen(
            command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._errors,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.monotonic()
            *records, pending = re.split(rb"[\r\n]", pending + chunk)
            pending = pending[-4096:]
            for record in reversed(records):
                found = re.findall(rb"mesg=(\d+)", record)
                if found:
                    with self._cond:
                        self.count = int(found[-1])
                        if self._target is not None and self._reached_at is None and self.count >= self._target:
                            self._reached_at = now
                        self._cond.notify_all()
                    break

    def expect(self, target: int) -> None:
        """Note the time at which the counter first reaches ``target`` from now on."""
        with self._cond:
            self._target = target
            self._reached_at = time.monotonic() if self.count >= target else None

    def wait(self, deadline: float) -> Optional[float]:
        """The monotonic time the counter reached the target, or None by ``deadline``."""
        with self._cond:
            while self._reached_at is None and self.proc.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return self._reached_at

    def close(self) -> None:
        stop(self.proc)
        self._thread.join(STOP_GRACE)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._errors.close()


def relay_config(tmp: Path, args: argparse.Namespace) -> str:
    lines = [
        f"hostname = {json.dumps('bench.relay.test')}",
        "",
        "[server]",
        f"listen = [{json.dumps(f'tcp:{args.listen_port}:interface={HOST}')}]",
        *args.server_toml,
        "",
        "[queue]",
        f"directory = {json.dumps(str(tmp / 'queue'))}",
        "",
        "[[routes]]",
        'domains = ["*"]',
        f"smarthost = {json.dumps(f'{HOST}:{args.sink_port}')}",
        "",
        *args.extra_toml,
        "",
    ]
    text = "\n".join(lines)
    tomllib.loads(text)  # a syntax error here, not in the daemon's log
    return text


def relay_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.pop("PYTHONSTARTUP", None)
    return env


def queued(queue_dir: Path) -> Optional[int]:
    """Messages ``relay-queue list --json`` reports, or None if it fails."""
    try:
        done = subprocess.run(
            [str(RELAY_QUEUE), "--queue", str(queue_dir), "list", "--json"],
            capture_output=True, text=True, timeout=30, env=relay_env(), stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    if done.stdout.strip() == "[]":
        return 0
    try:
        return len(json.loads(done.stdout))
    except ValueError:
        return None


def wait_drained(queue_dir: Path) -> None:
    deadline = time.monotonic() + DRAIN_LIMIT
    left: Optional[int] = None
    while time.monotonic() < deadline:
        left = queued(queue_dir)
        if left == 0:
            return
        time.sleep(0.5)
    print(f"warning: queue not empty after {DRAIN_LIMIT:.0f} s ({left} messages)", file=sys.stderr, flush=True)


def source(size: int, conc: int, count: int, args: argparse.Namespace) -> tuple[float, int, str]:
    """Run smtp-source once: (wall seconds, exit status, the tail of its stderr)."""
    command = [str(SMTP_SOURCE), "-s", str(conc), "-m", str(count), "-l", str(size)]
    if args.reuse:
        command.append("-d")
    command += ["-f", "bench@example.org", "-t", "sink@example.net", f"{HOST}:{args.listen_port}"]
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            timeout=SOURCE_LIMIT,
        )
        status, errors = done.returncode, done.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired:
        status, errors = -1, f"smtp-source killed after {SOURCE_LIMIT:.0f} s"
    return time.monotonic() - start, status, errors[-500:]


def one_run(sink: Sink, relay: subprocess.Popen, queue_dir: Path, size: int, conc: int, count: int,
            args: argparse.Namespace) -> Optional[tuple[float, float, float]]:
    """One repetition of a cell: (accept msg/s, e2e msg/s, CPU ms/msg), or None if it failed."""
    if args.warmup > 0:
        sink.expect(sink.count + args.warmup)
        _, status, errors = source(size, conc, args.warmup, args)
        if status != 0 or sink.wait(time.monotonic() + E2E_LIMIT) is None:
            print(f"warm-up failed (status {status}, sink at {sink.count}): {errors.strip()}", file=sys.stderr)
            return None
        wait_drained(queue_dir)

    before = sink.count
    sink.expect(before + count)
    tick = os.sysconf("SC_CLK_TCK")
    cpu_before = cpu_ticks(relay.pid)
    start = time.monotonic()
    elapsed, status, errors = source(size, conc, count, args)
    reached = sink.wait(start + elapsed + E2E_LIMIT)
    cpu_after = cpu_ticks(relay.pid)
    if status != 0:
        print(f"smtp-source exited with status {status}: {errors.strip()}", file=sys.stderr)
        return None
    if reached is None:
        print(f"sink received {sink.count - before}/{count} within {E2E_LIMIT:.0f} s of the end of smtp-source",
              file=sys.stderr)
        return None
    wait_drained(queue_dir)
    return count / elapsed, count / (reached - start), 1000 * (cpu_after - cpu_before) / tick / count


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, not {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int_list, default=[4096, 102400],
                        help="comma-separated message sizes in bytes, smtp-source -l (default 4096,102400)")
    parser.add_argument("--conc", type=int_list, default=[10, 50],
                        help="comma-separated concurrent sessions, smtp-source -s (default 10,50)")
    parser.add_argument("--count", type=int,
                        help="messages per measured run (default 3000 up to 4096 bytes, 1000 above)")
    parser.add_argument("--warmup", type=int, default=300, help="messages sent before each run (default 300)")
    parser.add_argument("--reuse", action="store_true",
                        help="many messages per connection (smtp-source -d); default one connection each")
    parser.add_argument("--reps", type=int, default=1, help="runs per cell; the table shows medians (default 1)")
    parser.add_argument("--listen-port", type=int, default=2540, help="the relay's port on 127.0.0.1 (default 2540)")
    parser.add_argument("--sink-port", type=int, default=2600, help="smtp-sink's port on 127.0.0.1 (default 2600)")
    parser.add_argument("--server-toml", action="append", default=[], metavar="TOML",
                        help="a line for the [server] table, e.g. 'max_sessions = 2000' (repeatable)")
    parser.add_argument("--extra-toml", action="append", default=[], metavar="TOML",
                        help="TOML appended to the configuration, starting with a table header (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, queue, logs)")
    parser.add_argument("--tmpdir", help="where the temporary directory goes (default: the system's)")
    args = parser.parse_args()

    missing = [str(tool) for tool in (SMTP_SOURCE, SMTP_SINK) if not tool.exists()]
    if missing:
        print(f"{' and '.join(missing)} missing: `apt-get install postfix` provides smtp-source and smtp-sink")
        return 2
    for tool in (TWISTD, RELAY_QUEUE):
        if not tool.exists():
            print(f"{tool} is missing: create the virtualenv first", file=sys.stderr)
            return 2
    if args.count is not None and not 0 < args.count <= 1_000_000:
        parser.error("--count must be between 1 and 1000000")
    if not 0 <= args.warmup <= 100_000:
        parser.error("--warmup must be between 0 and 100000")
    if not 1 <= args.reps <= MAX_REPS:
        parser.error(f"--reps must be between 1 and {MAX_REPS}")
    if len(args.sizes) * len(args.conc) > MAX_CELLS:
        parser.error(f"at most {MAX_CELLS} cells (sizes x concurrencies)")
    if args.listen_port == args.sink_port:
        parser.error("--listen-port and --sink-port must differ")
    for option, port in (("--listen-port", args.listen_port), ("--sink-port", args.sink_port)):
        if not port_free(port):
            print(f"{HOST}:{port} is in use; choose another {option}", file=sys.stderr)
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="relay-smtp-rate-", dir=args.tmpdir))
    sink: Optional[Sink] = None
    relay: Optional[subprocess.Popen] = None
    log = None
    try:
        config = tmp / "relay.toml"
        try:
            config.write_text(relay_config(tmp, args))
        except tomllib.TOMLDecodeError as e:
            print(f"--server-toml/--extra-toml make invalid TOML: {e}", file=sys.stderr)
            return 2
        queue_dir = tmp / "queue"

        sink = Sink(args.sink_port, tmp)
        wait_for_port(args.sink_port, LISTEN_LIMIT, sink.proc, "smtp-sink")

        log = open(tmp / "relay.log", "wb")
        relay = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "relay", "--config", str(config)],
            cwd=tmp, env=relay_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(args.listen_port, LISTEN_LIMIT, relay, "relay")
        except RuntimeError:
            log.flush()
            sys.stderr.write((tmp / "relay.log").read_text(errors="replace")[-3000:])
            raise

        mode = "reuse" if args.reuse else "new-conn"
        print(f"relay pid {relay.pid} on {HOST}:{args.listen_port}, smtp-sink on {HOST}:{args.sink_port}, "
              f"warm-up {args.warmup}, reps {args.reps} (medians)", flush=True)
        print(f"{'size':>7} {'conc':>5} {'mode':>8} {'count':>6} {'accept msg/s':>13} {'e2e msg/s':>10} "
              f"{'CPU ms/msg':>11}", flush=True)
        for size in args.sizes:
            count = args.count or (3000 if size <= 4096 else 1000)
            for conc in args.conc:
                results = []
                for rep in range(args.reps):
                    if relay.poll() is not None:
                        raise RuntimeError(f"relay exited with status {relay.returncode}; see {tmp / 'relay.log'}")
                    result = one_run(sink, relay, queue_dir, size, conc, count, args)
                    if result is not None:
                        results.append(result)
                        print(f"  size={size} conc={conc} {mode} rep {rep + 1}: accept {result[0]:.1f} msg/s, "
                              f"e2e {result[1]:.1f} msg/s, cpu {result[2]:.2f} ms/msg", file=sys.stderr, flush=True)
                if not results:
                    print(f"{size:>7} {conc:>5} {mode:>8} {count:>6} {'failed':>13}", flush=True)
                    continue
                accept, e2e, cpu = (statistics.median(column) for column in zip(*results))
                print(f"{size:>7} {conc:>5} {mode:>8} {count:>6} {accept:>13.1f} {e2e:>10.1f} {cpu:>11.2f}", flush=True)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stop(relay)
        if sink is not None:
            sink.close()
        if log is not None:
            log.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
