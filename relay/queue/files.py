"""The queue's files: the filesystem seam and the small helpers that write files durably.

The store keeps large messages and quarantined entries in files, and the
import reads the file-per-message layout of earlier releases; every such
call goes through ``OsFileSystem`` (or a test's stand-in for it), so tests
can record the order of the calls and simulate a crash at any of them.

The queue directory is treated as hostile input (anyone who can write to it
could plant files): queue files are opened with ``O_NOFOLLOW`` and
``O_NONBLOCK`` (a symbolic link is refused, a FIFO cannot hang the reader)
and used only when they are regular files owned by the relay's user
(``open_read``); the store's own directories must be real directories owned
by that user (``check_directory``), so clearing ``tmp/`` never reaches
through a symbolic link into another directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
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

    def read_file(self, path: str, limit: int = -1) -> bytes:
        """The bytes of a queue file (see ``open_read``); at most ``limit`` + 1 octets when ``limit`` >= 0."""
        with self.open_read(path) as f:
            return f.read(limit + 1 if limit >= 0 else -1)

    def open_read(self, path: str) -> BinaryIO:
        """Open a queue file for reading; OSError unless it is a regular file owned by the relay's user."""
        return open_queue_file(path)


class UnsafeFile(OSError):
    """A queue file or directory that is not what the store expects (a link, a FIFO, another owner's)."""


def open_queue_file(path: str) -> BinaryIO:
    """``path`` opened for reading without following a symbolic link or blocking on a FIFO.

    Raises UnsafeFile (an OSError naming the path) unless it is a regular
    file owned by the effective user; FileNotFoundError when it is missing.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile(errno.ELOOP, "a symbolic link, not a queue file", path) from None
        raise
    try:
        problem = _file_problem(os.fstat(fd), stat.S_ISREG, "a regular file")
        if problem:
            raise UnsafeFile(errno.EPERM, problem, path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_NONBLOCK", 0))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_directory(path: str) -> None:
    """UnsafeFile unless ``path`` is a real directory (not a symbolic link) owned by the effective user."""
    problem = _file_problem(os.lstat(path), stat.S_ISDIR, "a directory")
    if problem:
        raise UnsafeFile(errno.EPERM, problem, path)


def file_problem(path: str) -> str:
    """Why ``path`` is not a regular queue file owned by the effective user ("" when it is); never follows a link."""
    try:
        return _file_problem(os.lstat(path), stat.S_ISREG, "a regular file")
    except FileNotFoundError:
        return "missing"


def _file_problem(info: os.stat_result, is_kind: Callable[[int], bool], kind: str) -> str:
    if stat.S_ISLNK(info.st_mode):
        return f"a symbolic link, not {kind}"
    if not is_kind(info.st_mode):
        return f"not {kind} (file type {stat.filemode(info.st_mode)[0]})"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not by the relay's user (uid {os.geteuid()})"
    return ""


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
