"""Socket activation as systemd does it, for end-to-end tests of the relay.

``python tests/socketactivation.py --fd N [--name NAME]... -- COMMAND...``
moves the listening sockets it was handed (``--fd``, in order) to
descriptors 3, 4, ..., sets ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and
``LISTEN_PID`` (its own pid) and execs ``COMMAND``: the pid stays the same,
so ``LISTEN_PID`` names the process that reads it, exactly as with
``systemd`` or ``systemd-socket-activate``.

``listening_socket`` makes such a socket on a free loopback port.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import sys
from typing import Optional, Sequence

FIRST_FD = 3  # systemd's SD_LISTEN_FDS_START
OUT_OF_THE_WAY = 1000


def listening_socket(host: str = "127.0.0.1", family: Optional[int] = None) -> socket.socket:
    """A listening TCP socket on a free port of ``host`` (loopback in tests)."""
    family = family if family is not None else (socket.AF_INET6 if ":" in host else socket.AF_INET)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(50)
    return s


def launcher_command(fds: Sequence[int], names: Sequence[str] = ()) -> list[str]:
    """The argument list that runs this launcher for ``fds`` (to put before the command)."""
    args = [sys.executable, os.path.abspath(__file__)]
    for fd in fds:
        args += ["--fd", str(fd)]
    for name in names:
        args += ["--name", name]
    return [*args, "--"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="socketactivation")
    parser.add_argument("--fd", type=int, action="append", default=[])
    parser.add_argument("--name", action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or not args.fd:
        parser.error("give --fd and a command")
    # Move each socket to its place without clobbering one not yet moved:
    # first out of the way (above any descriptor in use), then down to 3, 4, ...
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, OUT_OF_THE_WAY) for fd in args.fd]
    for fd in args.fd:
        os.close(fd)
    for n, fd in enumerate(high):
        os.dup2(fd, FIRST_FD + n, inheritable=True)
        os.close(fd)
    names = args.name or ["unknown"] * len(high)
    os.environ["LISTEN_FDS"] = str(len(high))
    os.environ["LISTEN_FDNAMES"] = ":".join(names)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
