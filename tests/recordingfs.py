"""A filesystem seam for the queue store's tests that records each call and can crash at any of them."""

from __future__ import annotations

from typing import Any, Optional

from relay.queue.store import OsFileSystem


class Crash(Exception):
    """The process died at this filesystem call."""


class RecordingFS(OsFileSystem):
    """The real filesystem, recording each call; from call number ``crash_at`` on, every call raises Crash."""

    def __init__(self, events: Optional[list] = None, crash_at: Optional[int] = None) -> None:
        self.events: list = events if events is not None else []
        self.crash_at = crash_at
        self.calls = 0
        self.crashed = False
        self.paths: dict[int, str] = {}

    def arm(self, crash_at: Optional[int]) -> None:
        self.calls, self.crash_at, self.crashed = 0, crash_at, False
        del self.events[:]

    def _step(self, name: str, *detail: Any) -> None:
        self.calls += 1
        if self.crashed or (self.crash_at is not None and self.calls >= self.crash_at):
            self.crashed = True
            raise Crash(name)
        self.events.append((name, *detail))

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        self._step("open", path)
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        return fd

    def write(self, fd: int, data: bytes) -> int:
        self._step("write", self.paths.get(fd))
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._step("fsync", self.paths.get(fd))
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self._step("close", self.paths.get(fd))
        super().close(fd)

    def rename(self, src: str, dst: str) -> None:
        self._step("rename", src, dst)
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self._step("unlink", path)
        super().unlink(path)

    def fsync_dir(self, path: str) -> None:
        self._step("fsync_dir", path)
        super().fsync_dir(path)

    def listdir(self, path: str) -> list[str]:
        self._step("listdir", path)
        return super().listdir(path)

    def makedirs(self, path: str) -> None:
        self._step("makedirs", path)
        super().makedirs(path)

    def read_file(self, path: str, limit: int = -1) -> bytes:
        self._step("read_file", path)
        return super().read_file(path, limit)

    def open_read(self, path: str) -> Any:
        self._step("open_read", path)
        return super().open_read(path)
