"""A message being received: in memory, or once large in a file under ``tmp/``.

``Spool.new_message`` hands one out; the SMTP session writes the message's
bytes into it as they arrive and commits it with its envelope (the one
door into the queue).  Up to ``Spool.large_message`` octets stay in memory
and become the body row of the commit; beyond that, the bytes go to a file
under ``tmp/``, written in order off the reactor thread, which is fsynced
and moved into ``large/`` before the commit's transaction (so a session
never holds more than that in memory).
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relay.envelope import Envelope
from relay.queue.files import MESSAGE_SUFFIX, ignore_errors, write_all

if TYPE_CHECKING:
    from relay.queue.store import Spool

WRITE_BUFFER = 256 * 1024  # octets of a large message written to its file at once


class _LargeFile:
    """The file of a large message under ``tmp/``, written in order off the reactor thread."""

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.tmp_path = spool._tmp_path(queue_id + MESSAGE_SUFFIX)
        fs = spool._fs
        self.error: Optional[BaseException] = None
        self._tail: Deferred = spool._io_call(fs.open, self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self._tail.addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        if self.error is None:
            self.error = failure.value
        return None

    def write(self, data: bytes) -> None:
        def write(fd: Optional[int]) -> Any:
            if fd is None or self.error is not None:
                return fd
            return self.spool._io_call(_write_returning_fd, self.spool._fs, fd, data).addErrback(self._lost, fd)
        self._tail.addCallback(write)

    def _lost(self, failure: Failure, fd: int) -> int:
        self._failed(failure)
        return fd

    def finish(self) -> Deferred:
        """Fsync, close and move the file into ``large/``; fires when it is durable there."""
        spool = self.spool

        def finish(fd: Optional[int]) -> Any:
            if fd is None or self.error is not None:
                if fd is not None:
                    spool._io_call(_discard_file, spool._fs, fd, self.tmp_path)
                return defer.fail(self.error or OSError(errno.EIO, "large message file lost"))
            return spool._io_call(_finish_large, spool._fs, fd, self.tmp_path, spool.large_path(self.queue_id), spool._large)
        return self._tail.addCallback(finish)

    def discard(self) -> None:
        def discard(fd: Optional[int]) -> None:
            self.spool._io_call(_discard_file, self.spool._fs, fd, self.tmp_path)
        self._tail.addCallback(discard)


def _write_returning_fd(fs: Any, fd: int, data: bytes) -> int:
    write_all(fs, fd, data)
    return fd


def _finish_large(fs: Any, fd: int, tmp_path: str, path: str, directory: str) -> None:
    try:
        try:
            fs.fsync(fd)
        finally:
            fs.close(fd)
    except Exception:
        ignore_errors(fs.unlink, tmp_path)
        raise
    try:
        fs.rename(tmp_path, path)
        fs.fsync_dir(directory)
    except Exception:
        ignore_errors(fs.unlink, tmp_path)
        ignore_errors(fs.unlink, path)
        raise


def _discard_file(fs: Any, fd: Optional[int], path: str) -> None:
    if fd is not None:
        ignore_errors(fs.close, fd)
    ignore_errors(fs.unlink, path)


class IncomingMessage:
    """A message being received: bytes in memory, or in a file under ``tmp/`` once large.

    ``write`` never raises on a disk error: the first error is kept, later
    data is dropped, and ``commit`` errbacks with it (the session answers 451).
    """

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._chunks: list[bytes] = []  # what arrived since the last write to the file
        self._buffered = 0
        self._file: Optional[_LargeFile] = None
        self._state = "open"  # open -> committing -> committed | aborted | failed

    def write(self, data: bytes) -> None:
        """Append ``data`` (nothing is durable before commit)."""
        if self._state != "open":
            raise ValueError(f"message {self.queue_id} is no longer open for writing")
        self.size += len(data)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._file is None:
            if self._buffered <= self._spool.large_message:
                return
            self._file = _LargeFile(self._spool, self.queue_id)
        if self._buffered >= WRITE_BUFFER:
            self._spill()

    def _take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        return data

    def _spill(self) -> None:
        assert self._file is not None
        self._file.write(self._take())

    def commit(self, envelope: Envelope) -> Deferred:
        """Make the message and ``envelope`` durable; fires with the queue id.

        The stored envelope carries this message's queue id and its size in
        octets.  On failure the Deferred errbacks and nothing is queued.
        """
        if self._state != "open":
            return defer.fail(ValueError(f"message {self.queue_id} cannot be committed twice"))
        self._state = "committing"
        if envelope.queue_id != self.queue_id:
            self.abort(force=True)
            return defer.fail(ValueError(f"envelope is for {envelope.queue_id!r}, not {self.queue_id!r}"))
        if envelope.size != self.size:
            envelope = replace(envelope, size=self.size)
        spool = self._spool
        if self._file is None:
            body = self._take()
            d = spool._store(envelope, body)
            d.addCallback(self._committed)
        else:
            if self._chunks:
                self._spill()
            spool._commits.finishing += 1  # stop() waits for it
            d = self._file.finish()
            d.addBoth(spool._commits.finished_file)
            d.addCallback(lambda _: spool._store(envelope, None))
            d.addCallback(self._committed)
        d.addErrback(self._failed)
        return d

    def abort(self, force: bool = False) -> None:
        """Forget the message and remove its temporary file; idempotent."""
        if self._state != "open" and not force:
            return
        self._state = "aborted"
        self._chunks, self._buffered = [], 0
        if self._file is not None:
            self._file.discard()
            self._file = None

    def _committed(self, queue_id: str) -> str:
        self._state = "committed"
        return queue_id

    def _failed(self, failure: Failure) -> Failure:
        self._state = "failed"
        return failure
