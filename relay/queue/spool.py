"""The durable on-disk spool: the only code that touches queue files.

Every accepted message enters the queue through one door
(``Spool.new_message`` then ``IncomingMessage.commit``), and the files in the
queue directory are the single truth about it: every timer and in-flight set
elsewhere can be rebuilt from them at start-up (``Spool.recover``).

Layout under ``Spool.directory``::

    tmp/                 files being written; removed at start-up
      <id>.msg             message bytes of a message still arriving
      <id>.json            its envelope, written at commit
      <id>.json.new        a replacement envelope being written by update
    queue/               committed messages, one pair per message
      <id>.msg             message bytes exactly as received (our Received first)
      <id>.json            the envelope (``Envelope.to_json``); its arrival here
                           is the commit point; replaced atomically on update
    corrupt/             entries that could not be read, moved aside with a
                           ``<name>.reason`` file, never deleted

Durability ("250 means durable").  Commit writes and fsyncs the message, writes
and fsyncs the envelope under ``tmp/``, renames the message into ``queue/``,
then the envelope (the commit point), then fsyncs ``queue/``; only then does
the commit Deferred fire.  A crash before the envelope's rename leaves only
files that recovery deletes (``tmp/`` leftovers, a ``.msg`` without its
``.json``: never acknowledged); after it, a complete entry.  An update writes
a new envelope under ``tmp/``, fsyncs it and renames it over the old one, so
readers see the old or the new envelope, never a torn one.  A removal unlinks
the envelope first, then the message, so no envelope is ever left without its
message.

Group commit.  Disk work runs in the spool's own threads, so DNS lookups in
the reactor's shared pool cannot starve it and the reactor never waits on a
disk (not even to create the file of an incoming message: creating a file can
wait on the journal, or, on ext4 without one, scan past every inode freed in
the last minutes).  Commits, updates and removals
are queued as operations; while one batch is being made durable, new
operations accumulate and go together in the next batch.  A batch runs the
operations of different messages side by side in ``IO_THREADS`` threads (and
fsyncs a message and its envelope side by side), because concurrent fsyncs
share journal commits where serial ones pay one each; the operations of one
message run in order.  The whole batch then shares one fsync of ``queue/``,
and only after it does any of its Deferreds fire.

Concurrent writers.  The daemon and the queue administration tool may change
one message at the same time.  Updates and removals take an exclusive
``fcntl.flock`` on the envelope file itself; since an update replaces that
file by rename, a writer that waited on the lock re-checks, once it holds it,
that the path still names the inode it locked, and starts over when it does
not (a removed entry then reads as "not queued" rather than being
resurrected).  ``Spool.recover`` is for the daemon at start-up only: it
deletes files being written.

Start-up at scale.  ``recover`` only needs the directory listing to find
unfinished files and entries without their message; reading every envelope
as well is optional (``check_envelopes``).  The daemon skips it and reads each
envelope once, with ``peek`` (a ``QueueSummary``: no Envelope is built), to
fill its schedule; an envelope found unreadable then is moved aside with
``quarantine``.

Filesystem calls go through a small object (``OsFileSystem`` by default) so
that tests can record their order and simulate a crash at any step.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import string
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Callable, NamedTuple, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relay.envelope import (
    FAILED,
    FORMAT_VERSION,
    PENDING,
    RECIPIENT_STATES,
    Envelope,
    EnvelopeFormatError,
    domain_of,
)

log = Logger(namespace="relay.spool")

TMP_DIR = "tmp"
QUEUE_DIR = "queue"
CORRUPT_DIR = "corrupt"
MESSAGE_SUFFIX = ".msg"
ENVELOPE_SUFFIX = ".json"
REPLACEMENT_SUFFIX = ".json.new"
REASON_SUFFIX = ".reason"
MISSING_MESSAGE = "message file missing"

FILE_MODE = 0o600
DIR_MODE = 0o700
WRITE_BUFFER = 64 * 1024  # octets held in memory per incoming message before a write
READ_CHUNK = 64 * 1024  # octets per read of an envelope
IO_THREADS = 8  # messages of one batch made durable side by side (concurrent fsyncs coalesce)
MAX_BATCHES = 4  # batches being made durable at once

Runner = Callable[..., Deferred]


# -- queue ids -----------------------------------------------------------------

_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase  # ASCII order
_TIME_DIGITS = 10  # microseconds since the epoch: 62**10 us is some 26,000 years
_NONCE_DIGITS = 6  # per process: 62**6 is some 5.7e10
QUEUE_ID_LENGTH = _TIME_DIGITS + _NONCE_DIGITS

_id_lock = threading.Lock()
_id_state: dict[str, Any] = {"last": -1, "pid": None, "nonce": ""}


def _encode(number: int, digits: int) -> str:
    out = []
    for _ in range(digits):
        number, rest = divmod(number, 62)
        out.append(_ALPHABET[rest])
    return "".join(reversed(out))


def new_queue_id(clock: IReactorTime) -> str:
    """Return a new queue id: 16 characters of ``[0-9A-Za-z]``.

    The first ten encode the creation time in microseconds, strictly
    increasing within a process (so ids sort by creation time); the last six
    are a random nonce drawn once per process, so ids from other processes
    and earlier runs differ even when clocks agree or step back.
    """
    micros = max(0, int(clock.seconds() * 1_000_000)) % (62**_TIME_DIGITS)
    with _id_lock:
        pid = os.getpid()
        if _id_state["pid"] != pid:
            _id_state["pid"] = pid
            _id_state["nonce"] = _encode(secrets.randbelow(62**_NONCE_DIGITS), _NONCE_DIGITS)
        micros = max(micros, _id_state["last"] + 1)
        _id_state["last"] = micros
        nonce = _id_state["nonce"]
    return _encode(micros, _TIME_DIGITS) + nonce


_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")
_ENVELOPE_NAME = re.compile(r"([0-9A-Za-z]{1,64})\.json")


def valid_queue_id(queue_id: str) -> bool:
    """True when ``queue_id`` could name a queue entry (and is safe as a file name)."""
    return _QUEUE_ID.fullmatch(queue_id) is not None


# -- the filesystem seam -------------------------------------------------------


class OsFileSystem:
    """Every filesystem call the spool makes, done with the os module."""

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
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            chunks = []
            while True:
                chunk = os.read(fd, READ_CHUNK)
                chunks.append(chunk)
                if len(chunk) < READ_CHUNK:  # a short read of a regular file is its end
                    return b"".join(chunks)
        finally:
            os.close(fd)

    def open_read(self, path: str) -> BinaryIO:
        return open(path, "rb")

    def lock(self, fd: int) -> None:
        """Take an exclusive advisory lock, waiting for it; closing ``fd`` releases it."""
        fcntl.flock(fd, fcntl.LOCK_EX)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)


class _OneAtATime:
    """A filesystem seam whose calls that change a directory are made one at a time.

    Creating, renaming and removing files take the directory's lock in the
    kernel, which spins while another thread holds it; creating a file can
    take long (ext4 without a journal scans the inodes freed in the last
    minutes).  The spool's threads therefore queue for these calls on a lock
    of their own, asleep, while their fsyncs still run side by side.
    """

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def open(self, path: str, flags: int, mode: int = FILE_MODE) -> int:
        if not flags & os.O_CREAT:
            return self._fs.open(path, flags, mode)
        with self._lock:
            return self._fs.open(path, flags, mode)

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            self._fs.rename(src, dst)

    def unlink(self, path: str) -> None:
        with self._lock:
            self._fs.unlink(path)


# -- results -------------------------------------------------------------------


@dataclass
class RecoveryReport:
    """What start-up recovery found and did."""

    ids: list[str] = field(default_factory=list)  # good committed entries, oldest first
    removed_tmp: int = 0  # files under tmp/ deleted
    removed_orphans: int = 0  # .msg files without an envelope deleted (never acknowledged)
    quarantined: list[str] = field(default_factory=list)  # ids moved to corrupt/
    ignored: list[str] = field(default_factory=list)  # names in queue/ that are not ours


class QueueSummary(NamedTuple):
    """What scheduling needs to know of a queued message, read without building its Envelope."""

    queue_id: str
    held: bool
    next_attempts: tuple[Optional[float], ...]  # of each pending recipient (None: at once)
    domains: tuple[str, ...]  # the domain of each pending recipient, as stored
    unreported: int = 0  # FAILED recipients whose notification is not spooled yet

    @classmethod
    def of(cls, envelope: Envelope) -> "QueueSummary":
        pending = envelope.pending()
        return cls(
            queue_id=envelope.queue_id,
            held=envelope.held,
            next_attempts=tuple(r.next_attempt for r in pending),
            domains=tuple(r.domain for r in pending),
            unreported=sum(1 for r in envelope.recipients if r.status == FAILED and not r.reported),
        )


_JSON = json.JSONDecoder()
_JSON_SPACE = " \t\n\r"


def summarize_json(queue_id: str, data: bytes) -> QueueSummary:
    """A QueueSummary straight from stored JSON; EnvelopeFormatError when it is not a good envelope.

    Checks what recovery checks (JSON, known version, this queue id, known
    recipient states) without building the value objects, which is most of
    the cost of ``Envelope.from_json``.
    """
    try:
        text = data.decode("utf-8").strip(_JSON_SPACE)
        raw, end = _JSON.raw_decode(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise EnvelopeFormatError(f"not JSON: {e}") from None
    if end != len(text):
        raise EnvelopeFormatError("not JSON: extra data after the object")
    if not isinstance(raw, dict):
        raise EnvelopeFormatError("not a JSON object")
    if raw.get("version") != FORMAT_VERSION:
        raise EnvelopeFormatError(f"unknown envelope format version {raw.get('version')!r}")
    if raw.get("queue_id") != queue_id:
        raise EnvelopeFormatError(f"envelope names queue id {raw.get('queue_id')!r}")
    next_attempts: list[Optional[float]] = []
    domains: list[str] = []
    unreported = 0
    try:
        for r in raw["recipients"]:
            status = r["status"]
            if status == PENDING:
                when = r.get("next_attempt")
                next_attempts.append(None if when is None else float(when))
                domains.append(domain_of(str(r["address"])))
            elif status == FAILED:
                unreported += not r.get("reported", False)
            elif status not in RECIPIENT_STATES:
                raise ValueError(f"unknown recipient status {status!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise EnvelopeFormatError(f"bad envelope: {e!r}") from None
    return QueueSummary(queue_id, bool(raw.get("held", False)), tuple(next_attempts), tuple(domains), unreported)


def _ignore_errors(call: Callable[..., Any], *args: Any) -> None:
    try:
        call(*args)
    except Exception:
        pass


def _write_all(fs: Any, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = fs.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def _write_file(fs: Any, path: str, data: bytes, flags: int) -> None:
    """Write ``data`` to a new file at ``path`` and fsync it."""
    fd = fs.open(path, os.O_WRONLY | os.O_CREAT | flags)
    try:
        _write_all(fs, fd, data)
        fs.fsync(fd)
    finally:
        fs.close(fd)


# -- operations run in a batch -------------------------------------------------


class _Operation:
    """One change to the queue, run off the reactor thread inside a batch."""

    queue_id: str
    action: str

    def run(self) -> Any:
        raise NotImplementedError

    def undo(self) -> None:
        """Called when the batch's directory fsync failed after ``run`` succeeded."""


class _CommitOperation(_Operation):
    action = "store"

    def __init__(self, spool: "Spool", message: "IncomingMessage", envelope: bytes) -> None:
        self.spool = spool
        self.message = message
        self.queue_id = message.queue_id
        self.envelope = envelope

    def run(self) -> str:
        spool, fs = self.spool, self.spool._fs
        tmp_env = spool._tmp_path(self.queue_id + ENVELOPE_SUFFIX)
        queued_msg = spool.message_path(self.queue_id)
        renamed = False
        try:
            self._write_files(tmp_env)
            fs.rename(self.message._tmp_path, queued_msg)
            renamed = True
            fs.rename(tmp_env, spool._envelope_path(self.queue_id))  # the commit point
        except Exception:
            _ignore_errors(fs.unlink, tmp_env)
            _ignore_errors(fs.unlink, queued_msg if renamed else self.message._tmp_path)
            raise
        return self.queue_id

    def _write_files(self, tmp_env: str) -> None:
        """Fsync the message and write and fsync the envelope, side by side when the
        spool has the threads for it: concurrent fsyncs share one journal commit."""
        fs = self.spool._fs
        helpers = self.spool._file_executor()
        if helpers is None:
            self.message._finish()
            _write_file(fs, tmp_env, self.envelope, os.O_EXCL)
            return
        finished = helpers.submit(self.message._finish)
        try:
            _write_file(fs, tmp_env, self.envelope, os.O_EXCL)
        finally:
            wait([finished])  # both files are done with before anything is renamed or removed
        finished.result()

    def undo(self) -> None:
        # Never acknowledged: withdraw it rather than deliver a message the
        # client will send again.  Envelope first, as in every removal.
        fs = self.spool._fs
        _ignore_errors(fs.unlink, self.spool._envelope_path(self.queue_id))
        _ignore_errors(fs.unlink, self.spool.message_path(self.queue_id))


class _ModifyOperation(_Operation):
    action = "update"

    def __init__(self, spool: "Spool", queue_id: str, change: Callable[[Envelope], Envelope]) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.change = change

    def run(self) -> Envelope:
        return self.spool._modify_locked(self.queue_id, self.change)


class _QuarantineOperation(_Operation):
    action = "quarantine"

    def __init__(self, spool: "Spool", queue_id: str, reason: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.reason = reason

    def run(self) -> bool:
        return self.spool._quarantine_locked(self.queue_id, self.reason)


class _RemoveOperation(_Operation):
    action = "remove"

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id

    def run(self) -> bool:
        return self.spool._remove_locked(self.queue_id)


# -- incoming messages ---------------------------------------------------------


class IncomingMessage:
    """A message being received: bytes go to a file under ``tmp/`` until commit.

    The file is created off the reactor thread when the spool runs its own
    threads (creating a file can take milliseconds while other messages are
    being fsynced); bytes written meanwhile stay in the buffer.
    A message that fits in the buffer (``WRITE_BUFFER``) is written in one go
    by the commit, in the spool's threads; only larger ones are written
    while they arrive.

    ``write`` never raises on a disk error: the first error is kept, later
    data is dropped, and ``commit`` errbacks with it (the session answers 451).
    """

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._tmp_path = spool._tmp_path(queue_id + MESSAGE_SUFFIX)
        self._buffer = bytearray()
        self._error: Optional[BaseException] = None
        self._state = "open"  # open -> committing -> committed | aborted | failed
        self._fd: Optional[int] = None
        self._opened = False  # the file's creation has finished, well or not
        self._after_open: Optional[Callable[[], None]] = None  # a commit waiting for it
        opening = spool._io_call(spool._fs.open, self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        opening.addCallbacks(self._file_opened, self._open_failed)

    def write(self, data: bytes) -> None:
        """Append ``data`` (buffered; nothing is fsynced before commit)."""
        if self._state != "open":
            raise ValueError(f"message {self.queue_id} is no longer open for writing")
        self.size += len(data)
        if self._error is not None:
            return
        self._buffer += data
        if len(self._buffer) >= WRITE_BUFFER and self._fd is not None:
            self._spill()

    def commit(self, envelope: Envelope) -> Deferred:
        """Make the message and ``envelope`` durable; fires with the queue id.

        The stored envelope carries this message's queue id and its size in
        octets.  On failure the Deferred errbacks and nothing is queued.
        """
        if self._state != "open":
            return defer.fail(ValueError(f"message {self.queue_id} cannot be committed twice"))
        self._state = "committing"
        if envelope.queue_id != self.queue_id:
            self._state = "failed"
            self._discard()
            return defer.fail(
                ValueError(f"envelope is for {envelope.queue_id!r}, not {self.queue_id!r}")
            )
        if envelope.size != self.size:
            envelope = replace(envelope, size=self.size)
        operation = _CommitOperation(self._spool, self, envelope.to_json())
        if self._opened:
            d = self._spool._submit(operation)
        else:
            d = self._spool._submit_later()
            self._after_open = lambda: self._spool._release(operation, d)
        d.addBoth(self._committed)
        return d

    def abort(self) -> None:
        """Forget the message and remove its temporary file; idempotent."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._discard()

    # -- internals ----------------------------------------------------------

    def _file_opened(self, fd: int) -> None:
        self._fd = fd
        self._opened_now()

    def _open_failed(self, failure: Failure) -> None:
        if self._error is None:
            self._error = failure.value
        self._buffer = bytearray()
        self._opened_now()

    def _opened_now(self) -> None:
        self._opened = True
        if self._state in ("aborted", "failed"):
            self._discard()
            return
        if self._after_open is not None:
            after, self._after_open = self._after_open, None
            after()
        elif self._state == "open" and len(self._buffer) >= WRITE_BUFFER and self._fd is not None:
            self._spill()

    def _spill(self) -> None:
        """Write the buffer to the file while the message still arrives (large messages)."""
        try:
            self._flush(self._fd)
        except Exception as e:
            self._error = e
            self._buffer.clear()

    def _committed(self, result: Any) -> Any:
        self._state = "failed" if isinstance(result, Failure) else "committed"
        if self._state == "committed":
            self._spool._notify_commit(self.queue_id)
        return result

    def _discard(self) -> None:
        """Close and remove the file, once its creation has finished (in the spool's threads)."""
        self._buffer = bytearray()
        if not self._opened:
            return  # _opened_now discards it
        fd, self._fd = self._fd, None
        if fd is None and self._error is not None:
            return  # never created
        self._spool._io_call(_discard_file, self._spool._fs, fd, self._tmp_path)

    def _flush(self, fd: Optional[int]) -> None:
        if self._buffer and fd is not None:
            data, self._buffer = bytes(self._buffer), bytearray()
            _write_all(self._spool._fs, fd, data)

    def _finish(self) -> None:
        """Write what is buffered, fsync and close (in the spool's threads)."""
        fs, fd = self._spool._fs, self._fd
        self._fd = None
        try:
            if self._error is not None:
                raise self._error
            assert fd is not None
            self._flush(fd)
            fs.fsync(fd)
        finally:
            if fd is not None:
                fs.close(fd)


def _discard_file(fs: Any, fd: Optional[int], path: str) -> None:
    if fd is not None:
        _ignore_errors(fs.close, fd)
    _ignore_errors(fs.unlink, path)


# -- the spool -----------------------------------------------------------------


class Spool:
    """A queue directory: the one door in, the single truth, start-up recovery."""

    def __init__(
        self,
        directory: str,
        *,
        clock: Optional[IReactorTime] = None,
        runner: Optional[Runner] = None,
        fs: Any = None,
        io_threads: Optional[int] = None,
        max_batches: Optional[int] = None,
    ) -> None:
        """A spool on ``directory``.

        ``runner`` runs each batch (default: the spool's own threads).
        ``io_threads`` is how many messages of a batch are made durable at
        once, ``max_batches`` how many batches run at once; both default to
        ``IO_THREADS`` and ``MAX_BATCHES`` with the spool's own threads and to
        one with an injected runner (whose batches then run one by one and
        in order).  The files of incoming messages are created in the I/O
        threads with the spool's own threads, at once on the calling thread
        with an injected runner.
        """
        self.directory = directory
        self._clock = clock
        self._runner: Runner = runner if runner is not None else self._run_in_pool
        self._io_async = runner is None  # create incoming files off the calling thread
        self._io_threads = max(1, io_threads if io_threads is not None else (IO_THREADS if runner is None else 1))
        self._max_batches = max(1, max_batches if max_batches is not None else (MAX_BATCHES if runner is None else 1))
        self._fs = fs if fs is not None else OsFileSystem()
        if self._io_async or self._io_threads > 1 or self._max_batches > 1:
            self._fs = _OneAtATime(self._fs)
        self._io_pool: Optional[ThreadPoolExecutor] = None
        self._file_pool: Optional[ThreadPoolExecutor] = None
        self._io_lock = threading.Lock()
        self._waiting = 0  # commits submitted while their file is still being created
        self._tmp = os.path.join(directory, TMP_DIR)
        self._queue = os.path.join(directory, QUEUE_DIR)
        self._queue_prefix = os.path.join(self._queue, "")
        self._corrupt = os.path.join(directory, CORRUPT_DIR)
        self._pending: list[tuple[_Operation, Deferred]] = []
        self._running = 0  # batches being made durable
        self._busy: dict[str, int] = {}  # queue id -> operations on it in running batches
        self._idle_waiters: list[Deferred] = []
        self._pool: Optional[ThreadPool] = None
        self._shutdown_trigger: Any = None
        self._commit_listeners: list[Callable[[str], Any]] = []

    # -- the one door in: who hears of new messages -------------------------

    def on_commit(self, listener: Callable[[str], Any]) -> None:
        """Call ``listener(queue_id)`` each time a new message has become durable."""
        self._commit_listeners.append(listener)

    def _notify_commit(self, queue_id: str) -> None:
        for listener in self._commit_listeners:
            try:
                listener(queue_id)
            except Exception:
                log.failure("{queue_id}: commit listener failed", queue_id=queue_id)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the spool's own thread pool (only used without an injected runner)."""
        if self._pool is not None:
            return
        from twisted.internet import reactor

        self._pool = ThreadPool(minthreads=1, maxthreads=self._max_batches, name="relay-spool")
        self._pool.start()
        self._shutdown_trigger = reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
            "during", "shutdown", self._stop_pool
        )

    def stop(self) -> Deferred:
        """Fire once every queued operation is durable and the thread pool has stopped."""
        d = self._when_idle()
        d.addCallback(lambda _: self._stop_pool())
        return d

    def _stop_pool(self) -> None:
        for executor in (self._io_pool, self._file_pool):
            if executor is not None:
                executor.shutdown(wait=True)
        self._io_pool = self._file_pool = None
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._shutdown_trigger is not None:
            from twisted.internet import reactor

            _ignore_errors(reactor.removeSystemEventTrigger, self._shutdown_trigger)  # type: ignore[attr-defined]
            self._shutdown_trigger = None
        pool.stop()

    def _io_executor(self) -> ThreadPoolExecutor:
        """The threads that make the messages of a batch durable side by side."""
        with self._io_lock:
            if self._io_pool is None:
                self._io_pool = ThreadPoolExecutor(max_workers=self._io_threads, thread_name_prefix="relay-spool-io")
            return self._io_pool

    def _file_executor(self) -> Optional[ThreadPoolExecutor]:
        """Threads for the files of one operation (never waiting on other work, so
        operations running in the I/O threads may wait on them); None: one by one."""
        if self._io_threads == 1:
            return None
        with self._io_lock:
            if self._file_pool is None:
                self._file_pool = ThreadPoolExecutor(max_workers=self._io_threads, thread_name_prefix="relay-spool-file")
            return self._file_pool

    def _io_call(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``f(*args)`` in the spool's I/O threads; the result arrives in the reactor thread.

        With an injected runner it runs at once, on the calling thread.
        """
        if not self._io_async:
            return defer.maybeDeferred(f, *args)
        from twisted.internet import reactor

        d: Deferred = Deferred()

        def deliver(future: Future) -> None:
            error = future.exception()
            if error is None:
                d.callback(future.result())
            else:
                d.errback(Failure(error))

        try:
            future = self._io_executor().submit(f, *args)
        except RuntimeError:  # the interpreter is shutting down
            return defer.fail()
        future.add_done_callback(lambda done: reactor.callFromThread(deliver, done))  # type: ignore[attr-defined]
        return d

    def _run_in_pool(self, f: Callable[..., Any], *args: Any) -> Deferred:
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThreadPool

        if self._pool is None:
            self.start()
        assert self._pool is not None
        return deferToThreadPool(reactor, self._pool, f, *args)  # type: ignore[arg-type]

    # -- paths --------------------------------------------------------------

    def _tmp_path(self, name: str) -> str:
        return os.path.join(self._tmp, name)

    def _envelope_path(self, queue_id: str) -> str:
        return self._queue_prefix + queue_id + ENVELOPE_SUFFIX

    def message_path(self, queue_id: str) -> str:
        """The path of the message bytes of ``queue_id``."""
        _check_id(queue_id)
        return os.path.join(self._queue, queue_id + MESSAGE_SUFFIX)

    # -- reading ------------------------------------------------------------

    def ids(self) -> list[str]:
        """Committed queue ids, oldest first (one directory listing, no stat)."""
        try:
            names = self._fs.listdir(self._queue)
        except FileNotFoundError:
            return []
        return sorted(_ids_in(names))

    def load(self, queue_id: str) -> Envelope:
        """Read the envelope of ``queue_id``; KeyError when it is not queued."""
        if not valid_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            data = self._fs.read_file(self._envelope_path(queue_id))
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        return Envelope.from_json(data)

    def peek(self, queue_id: str) -> QueueSummary:
        """What scheduling needs of ``queue_id``, read cheaply; KeyError when it is not queued.

        EnvelopeFormatError when the envelope cannot be read (see ``quarantine``).
        """
        if not valid_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            data = self._fs.read_file(self._envelope_path(queue_id))
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        return summarize_json(queue_id, data)

    def open_message(self, queue_id: str) -> BinaryIO:
        """Open the message bytes of ``queue_id`` for reading; the caller closes."""
        try:
            return self._fs.open_read(self.message_path(queue_id))
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    # -- writing ------------------------------------------------------------

    def new_message(self) -> IncomingMessage:
        """Start receiving a message under a new queue id."""
        return IncomingMessage(self, new_queue_id(self._get_clock()))

    def update(self, envelope: Envelope) -> Deferred:
        """Durably replace the envelope of ``envelope.queue_id``; KeyError when not queued."""
        return self.modify(envelope.queue_id, lambda _current: envelope).addCallback(
            lambda _: None
        )

    def modify(self, queue_id: str, change: Callable[[Envelope], Envelope]) -> Deferred:
        """Durably replace an envelope by ``change(current)``, read under the lock.

        ``change`` runs in the spool's thread and must be a pure function.
        Fires with the stored envelope; KeyError when the message is not queued.
        """
        if not valid_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        return self._submit(_ModifyOperation(self, queue_id, change))

    def remove(self, queue_id: str) -> Deferred:
        """Durably remove a message: envelope first, then its bytes.

        Removing a message that is not queued succeeds and does nothing.
        """
        if not valid_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        return self._submit(_RemoveOperation(self, queue_id)).addCallback(lambda _: None)

    def quarantine(self, queue_id: str, reason: str) -> Deferred:
        """Move an entry whose envelope cannot be read into corrupt/, under its lock.

        Fires with True when it was moved; False when it was not queued or
        reads well by now (replaced meanwhile).
        """
        if not valid_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        return self._submit(_QuarantineOperation(self, queue_id, reason))

    def update_sync(self, envelope: Envelope) -> None:
        """``update`` for tools that run without a reactor (blocking)."""
        self.modify_sync(envelope.queue_id, lambda _current: envelope)

    def modify_sync(self, queue_id: str, change: Callable[[Envelope], Envelope]) -> Envelope:
        """``modify`` for tools that run without a reactor (blocking)."""
        _check_id(queue_id)
        stored = self._modify_locked(queue_id, change)
        self._fs.fsync_dir(self._queue)
        log.info("{queue_id}: envelope updated", queue_id=queue_id)
        return stored

    def remove_sync(self, queue_id: str) -> None:
        """``remove`` for tools that run without a reactor (blocking)."""
        _check_id(queue_id)
        if self._remove_locked(queue_id):
            self._fs.fsync_dir(self._queue)
            log.info("{queue_id}: removed", queue_id=queue_id)

    # -- locked changes (run in the spool's thread or by the sync twins) ----

    def _lock_envelope(self, queue_id: str) -> Optional[int]:
        """Lock the current envelope file of ``queue_id``; None when not queued.

        Closing the returned descriptor releases the lock.
        """
        fs, path = self._fs, self._envelope_path(queue_id)
        while True:
            try:
                fd = fs.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                fs.lock(fd)
                held = fs.fstat(fd)
                try:
                    current = fs.stat(path)
                except FileNotFoundError:
                    fs.close(fd)
                    return None
            except BaseException:
                _ignore_errors(fs.close, fd)
                raise
            if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                return fd
            fs.close(fd)  # replaced while we waited: lock the new file

    def _modify_locked(self, queue_id: str, change: Callable[[Envelope], Envelope]) -> Envelope:
        fs = self._fs
        fd = self._lock_envelope(queue_id)
        if fd is None:
            raise KeyError(queue_id)
        try:
            new = change(Envelope.from_json(fs.read_file(self._envelope_path(queue_id))))
            if new.queue_id != queue_id:
                raise ValueError(f"envelope is for {new.queue_id!r}, not {queue_id!r}")
            tmp = self._tmp_path(queue_id + REPLACEMENT_SUFFIX)
            try:
                _write_file(fs, tmp, new.to_json(), os.O_TRUNC)
                fs.rename(tmp, self._envelope_path(queue_id))
            except Exception:
                _ignore_errors(fs.unlink, tmp)
                raise
            return new
        finally:
            _ignore_errors(fs.close, fd)

    def _quarantine_locked(self, queue_id: str, reason: str) -> bool:
        fs = self._fs
        fd = self._lock_envelope(queue_id)
        if fd is None:
            return False
        try:
            if self._check_entry(queue_id, True) is None:
                return False
            self._quarantine(queue_id, reason)
            return True
        finally:
            _ignore_errors(fs.close, fd)

    def _remove_locked(self, queue_id: str) -> bool:
        """Remove an entry; True when there was an envelope to remove."""
        fs = self._fs
        fd = self._lock_envelope(queue_id)
        try:
            if fd is not None:
                fs.unlink(self._envelope_path(queue_id))
            try:
                fs.unlink(self.message_path(queue_id))
            except FileNotFoundError:
                pass
            return fd is not None
        finally:
            if fd is not None:
                _ignore_errors(fs.close, fd)

    # -- group commit -------------------------------------------------------

    def _submit(self, operation: _Operation) -> Deferred:
        d: Deferred = Deferred()
        self._pending.append((operation, d))
        self._next_batch()
        return d

    def _submit_later(self) -> Deferred:
        """The Deferred of an operation that ``_release`` submits later (stop waits for it)."""
        self._waiting += 1
        return Deferred()

    def _release(self, operation: _Operation, d: Deferred) -> None:
        self._waiting -= 1
        self._submit(operation).chainDeferred(d)

    def _next_batch(self) -> None:
        """Start a batch of what is pending, when a batch may start.

        Up to ``max_batches`` batches run at once; an operation on a message
        that a running batch touches waits for that batch, so the operations
        of one message are run in the order they were submitted.
        """
        if not self._pending:
            if self._running or self._waiting:
                return  # the end of those fires the waiters
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        if self._running >= self._max_batches:
            return
        batch: list[tuple[_Operation, Deferred]] = []
        later: list[tuple[_Operation, Deferred]] = []
        for entry in self._pending:
            (later if entry[0].queue_id in self._busy else batch).append(entry)
        if not batch:
            return
        self._pending = later
        self._running += 1
        for op, _ in batch:
            self._busy[op.queue_id] = self._busy.get(op.queue_id, 0) + 1
        operations = [op for op, _ in batch]
        try:
            d = self._runner(self._run_batch, operations)
        except Exception:
            d = defer.fail()
        d.addBoth(self._batch_done, batch)

    def _run_batch(self, operations: list[_Operation]) -> list[tuple[bool, Any]]:
        """Run every operation, then one fsync of queue/ (in the spool's thread).

        Operations on different messages run side by side in the I/O threads
        (concurrent fsyncs share journal commits); those on one message run
        in the order they were submitted, each keeping its own order of
        fsyncs and renames.  Nothing is answered before the directory fsync.
        """
        results: list[tuple[bool, Any]] = [(False, None)] * len(operations)

        def run(indexes: list[int]) -> None:
            for i in indexes:
                try:
                    results[i] = (True, operations[i].run())
                except Exception as e:
                    results[i] = (False, e)

        by_message: dict[str, list[int]] = {}
        for i, op in enumerate(operations):
            by_message.setdefault(op.queue_id, []).append(i)
        groups = list(by_message.values())
        if len(groups) == 1 or self._io_threads == 1:
            for indexes in groups:
                run(indexes)
        else:
            futures = [self._io_executor().submit(run, indexes) for indexes in groups[1:]]
            run(groups[0])
            for future in futures:
                future.result()
        if any(ok for ok, _ in results):
            try:
                self._fs.fsync_dir(self._queue)
            except Exception as e:
                for i, (op, (ok, _)) in enumerate(zip(operations, results)):
                    if ok:
                        op.undo()
                        results[i] = (False, e)
        return results

    def _batch_done(self, outcome: Any, batch: list[tuple[_Operation, Deferred]]) -> None:
        if isinstance(outcome, Failure):
            results: list[tuple[bool, Any]] = [(False, outcome)] * len(batch)
        else:
            results = outcome
        for (op, d), (ok, value) in zip(batch, results):
            if ok:
                self._log_done(op, value)
                d.callback(value)
            else:
                self._log_failed(op, value)
                d.errback(value if isinstance(value, Failure) else Failure(value))
        self._running -= 1  # operations submitted by the callbacks above wait for this
        for op, _ in batch:
            left = self._busy[op.queue_id] - 1
            if left:
                self._busy[op.queue_id] = left
            else:
                del self._busy[op.queue_id]
        self._next_batch()

    def _log_done(self, op: _Operation, value: Any) -> None:
        if isinstance(op, _CommitOperation):
            log.info(
                "{queue_id}: stored, {size} octets", queue_id=op.queue_id, size=op.message.size
            )
        elif isinstance(op, _RemoveOperation):
            log.info("{queue_id}: removed", queue_id=op.queue_id)
        else:
            log.debug("{queue_id}: envelope updated", queue_id=op.queue_id)

    def _log_failed(self, op: _Operation, error: Any) -> None:
        if isinstance(error, Failure):
            error = error.value
        if isinstance(error, KeyError):
            log.info("{queue_id}: cannot {action}: not queued", queue_id=op.queue_id, action=op.action)
        else:
            log.error(
                "{queue_id}: cannot {action}: {error}",
                queue_id=op.queue_id,
                action=op.action,
                error=_describe(error),
            )

    def _when_idle(self) -> Deferred:
        if not self._running and not self._pending and not self._waiting:
            return defer.succeed(None)
        d: Deferred = Deferred()
        self._idle_waiters.append(d)
        return d

    def _get_clock(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock  # type: ignore[return-value]

    # -- start-up recovery --------------------------------------------------

    def recover(self, check_envelopes: bool = True) -> RecoveryReport:
        """Bring the directory to a clean state at start-up (synchronous).

        Creates the directories; deletes everything under ``tmp/`` and every
        ``.msg`` without an envelope (never acknowledged); moves envelopes
        without their message into ``corrupt/``, and, with
        ``check_envelopes``, those that cannot be read (which means reading
        every envelope: the daemon leaves that to ``peek`` and ``quarantine``).
        """
        fs, report = self._fs, RecoveryReport()
        for path in (self._tmp, self._queue, self._corrupt):
            fs.makedirs(path)
        for name in fs.listdir(self._tmp):
            _ignore_errors(fs.unlink, self._tmp_path(name))
            report.removed_tmp += 1
        names = set(fs.listdir(self._queue))
        for name in sorted(names):
            stem, _, suffix = name.partition(".")
            if not valid_queue_id(stem) or "." + suffix not in (ENVELOPE_SUFFIX, MESSAGE_SUFFIX):
                report.ignored.append(name)
                log.warn("spool: ignoring unexpected file {name} in queue/", name=name)
            elif suffix == MESSAGE_SUFFIX[1:] and stem + ENVELOPE_SUFFIX not in names:
                fs.unlink(os.path.join(self._queue, name))
                report.removed_orphans += 1
                log.info("{queue_id}: removed message never acknowledged", queue_id=stem)
            elif suffix == ENVELOPE_SUFFIX[1:]:
                has_message = stem + MESSAGE_SUFFIX in names
                if check_envelopes:
                    reason = self._check_entry(stem, has_message)
                else:
                    reason = None if has_message else MISSING_MESSAGE
                if reason is None:
                    report.ids.append(stem)
                else:
                    self._quarantine(stem, reason)
                    report.quarantined.append(stem)
        for path in (self._tmp, self._queue, self._corrupt):
            fs.fsync_dir(path)
        log.info(
            "spool: {count} queued messages recovered from {directory}"
            " ({tmp} temporary files and {orphans} unacknowledged messages removed,"
            " {quarantined} entries moved to corrupt/)",
            count=len(report.ids),
            directory=self.directory,
            tmp=report.removed_tmp,
            orphans=report.removed_orphans,
            quarantined=len(report.quarantined),
        )
        return report

    def _check_entry(self, queue_id: str, has_message: bool) -> Optional[str]:
        """None when the entry is good, otherwise why it is not."""
        if not has_message:
            return MISSING_MESSAGE
        try:
            envelope = Envelope.from_json(self._fs.read_file(self._envelope_path(queue_id)))
        except (OSError, EnvelopeFormatError) as e:
            return _describe(e)
        if envelope.queue_id != queue_id:
            return f"envelope names queue id {envelope.queue_id!r}"
        return None

    def _quarantine(self, queue_id: str, reason: str) -> None:
        """Move an entry into corrupt/: the message first, so no envelope is left alone."""
        fs = self._fs
        base = self._free_corrupt_name(queue_id)
        for suffix in (MESSAGE_SUFFIX, ENVELOPE_SUFFIX):
            try:
                fs.rename(os.path.join(self._queue, queue_id + suffix), base + suffix)
            except FileNotFoundError:
                pass
        _write_file(fs, base + REASON_SUFFIX, (reason + "\n").encode("utf-8"), os.O_TRUNC)
        log.error(
            "{queue_id}: quarantined in {path}: {reason}",
            queue_id=queue_id,
            path=base + ENVELOPE_SUFFIX,
            reason=reason,
        )

    def _free_corrupt_name(self, queue_id: str) -> str:
        taken = set(self._fs.listdir(self._corrupt))
        name, n = queue_id, 0
        while any(name + s in taken for s in (MESSAGE_SUFFIX, ENVELOPE_SUFFIX, REASON_SUFFIX)):
            n += 1
            name = f"{queue_id}-{n}"
        return os.path.join(self._corrupt, name)


class SpoolService(Service):
    """Runs a spool with the application: recovery and threads at start, drain at stop.

    Start-up recovery reads no envelope: the scheduler reads each one once
    as it fills its schedule and quarantines those it cannot read.
    """

    name = "spool"

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.report: Optional[RecoveryReport] = None

    def startService(self) -> None:
        self.report = self.spool.recover(check_envelopes=False)
        self.spool.start()
        Service.startService(self)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return self.spool.stop()


# -- helpers -------------------------------------------------------------------


def _ids_in(names: list[str]) -> list[str]:
    match = _ENVELOPE_NAME.fullmatch
    return [m.group(1) for m in map(match, names) if m is not None]


def _check_id(queue_id: str) -> None:
    if not valid_queue_id(queue_id):
        raise KeyError(queue_id)


def _describe(error: BaseException) -> str:
    """A one-line description of an error for the log (never sent to a peer)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({errno.errorcode.get(error.errno or 0, error.errno)})"
    return str(error) or type(error).__name__
