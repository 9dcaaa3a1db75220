"""End-to-end harness: the relay started by ``twistd -n relay`` as a real process.

The process runs from the source tree (``PYTHONPATH`` is the repository, so
both the ``relay`` package and the dropin in ``twisted/plugins`` come from
here) in its own working directory, listens on a free loopback port and is
stopped by its PID only.  Waiting for it to listen polls a real socket with
a bound on the total time; no test timer depends on the wall clock.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def relay_env(extra_path: Sequence[str] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*extra_path, str(REPO)])
    env.pop("PYTHONSTARTUP", None)
    return env


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll a real, external condition (a file, a socket peer, a process), bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_port(host: str, port: int, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout} s")


class RelayProcess:
    """One relay daemon in ``workdir`` with ``relay.toml`` written from ``config``."""

    def __init__(
        self,
        workdir: Path,
        config: str = "",
        args: Sequence[str] = (),
        port: Optional[int] = None,
        extra_path: Sequence[str] = (),
        listen: Optional[str] = None,
        twistd_args: Sequence[str] = (),
        launcher: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
    ) -> None:
        """``listen`` replaces the loopback TCP listener (a ``systemd:`` endpoint, say; ``""``:
        the file's ``[server] listen``);
        ``twistd_args`` go before ``relay`` (``--uid``); ``launcher`` runs before twistd
        and execs it, with ``pass_fds`` open in it (socket activation)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_path = self.workdir / "relay.toml"
        self.config_path.write_text(config)
        self.args = list(args)
        self.extra_path = list(extra_path)
        self.listen = f"tcp:{self.port}:interface=127.0.0.1" if listen is None else listen
        self.twistd_args = list(twistd_args)
        self.launcher = list(launcher)
        self.pass_fds = tuple(pass_fds)
        self.host = "127.0.0.1"  # where start() waits for the listener
        self.proc: Optional[subprocess.Popen] = None

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "relay-queue"

    @property
    def log_path(self) -> Path:
        return self.workdir / "relay.log"

    def command(self) -> list[str]:
        return [
            *self.launcher,
            *TWISTD, "-n", "--logfile", str(self.log_path), "--pidfile", str(self.workdir / "relay.pid"),
            *self.twistd_args,
            "relay", "--config", str(self.config_path),
            *(["--listen", self.listen] if self.listen else []),
            *self.args,
        ]

    def start(self, timeout: float = 20.0) -> "RelayProcess":
        self.proc = subprocess.Popen(
            self.command(), cwd=self.workdir, env=relay_env(self.extra_path),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=self.pass_fds,
        )
        try:
            wait_for_port(self.host, self.port, timeout, self.proc)
        except RuntimeError as e:
            self.kill()
            raise RuntimeError(f"{e}\n--- log ---\n{self.log()}\n--- output ---\n{self.output()}") from None
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def output(self) -> str:
        if self.proc is None or self.proc.stdout is None or self.proc.poll() is None:
            return ""
        return self.proc.stdout.read().decode(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "RelayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
