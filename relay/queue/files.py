"""The queue's files: the filesystem seam and the small helpers that write files durably.

The store keeps large messages and quarantined entries in files, and the
import reads the file-per-message layout of earlier releases; every such
call goes through ``OsFileSystem`` (or a test's stand-in for it), so tests
can record the order of the calls and simulate a crash at any of them.
"""

from __future__ import annotations

import errno
import os
from typing import Any, BinaryIO, Callable

MESSAGE_SUFFIX = ".msg"
ENVELOPE_SUFFIX = ".json"
REASON_SUFFIX = ".reason"

FILE_MODE = 0o600
DIR_MODE = 0o700


class OsFileSystem:
    """Every filesystem call the store makes for large messages and corrupt entries."""

    def open(self, path: str, flags: int, mode: int = FILE_MODE) -> int:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def open_read(self, path: str) -> BinaryIO:
        return open(path, "rb")


def ignore_errors(call: Callable[..., Any], *args: Any) -> None:
    try:
        call(*args)
    except Exception:
        pass


def write_all(fs: Any, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = fs.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def write_file(fs: Any, path: str, data: bytes, flags: int = os.O_TRUNC) -> None:
    """Write ``data`` to a new file at ``path`` and fsync it."""
    fd = fs.open(path, os.O_WRONLY | os.O_CREAT | flags)
    try:
        write_all(fs, fd, data)
        fs.fsync(fd)
    finally:
        fs.close(fd)


def describe(error: BaseException) -> str:
    """A one-line description of an error for the log (never sent to a peer)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({errno.errorcode.get(error.errno or 0, error.errno)})"
    return str(error) or type(error).__name__
