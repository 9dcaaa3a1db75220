"""Where the store's work runs: one writer thread, reader threads, threads for large-message files.

The reactor thread does no database or file I/O on the hot path: every
transaction runs in the one writer thread (SQLite has one writer; the
group commit hands it one batch at a time), reads for the daemon in a
small pool of reader threads (WAL readers never wait on the writer), and
the writes of large-message files in a pool of their own.  Results come
back to the reactor thread (``callFromThread``); the threads stop when the
store stops or the reactor shuts down.  With ``inline`` (a store given a
runner: tests) everything runs at once on the calling thread.  With
``write_inline`` (a worker of several) the transactions run at once on the
reactor thread instead of the writer thread, and only the reads and the
large-message files have threads: the worker's event loop waits for each
fsync, as each Postfix process waits for its own, while another worker uses
the core; one process keeps its writer thread, so that its event loop never
waits for the disk.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relay.queue.files import ignore_errors

READ_THREADS = 2
IO_THREADS = 2  # large-message files


class StoreThreads:
    """The store's threads, started on first use and stopped together."""

    def __init__(self, reactor: Callable[[], Any], inline: bool = False, write_inline: bool = False) -> None:
        """``reactor()`` is the reactor the threads report to (it raises when the
        store was given none); with ``inline`` no thread is ever started, with
        ``write_inline`` no writer thread."""
        self._reactor = reactor
        self._inline = inline
        self._write_inline = write_inline
        self._lock = threading.Lock()
        self._writer: Optional[ThreadPool] = None
        self._readers: Optional[ThreadPoolExecutor] = None
        self._io: Optional[ThreadPoolExecutor] = None
        self._shutdown_trigger: Any = None

    def start(self) -> None:
        """Start the writer thread (only used without an injected runner), and stop
        the threads when the reactor shuts down."""
        if self._inline:
            return
        reactor = self._reactor()
        if self._writer is None and not self._write_inline:
            self._writer = ThreadPool(minthreads=1, maxthreads=1, name="relay-store-writer")
            self._writer.start()
        if self._shutdown_trigger is None:
            self._shutdown_trigger = reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
                "during", "shutdown", self.stop
            )

    def stop(self) -> None:
        """Wait for the reader and I/O threads, then stop the writer."""
        for executor in (self._readers, self._io):
            if executor is not None:
                executor.shutdown(wait=True)
        self._readers = self._io = None
        pool, self._writer = self._writer, None
        if self._shutdown_trigger is not None:
            reactor = self._reactor()
            ignore_errors(reactor.removeSystemEventTrigger, self._shutdown_trigger)  # type: ignore[attr-defined]
            self._shutdown_trigger = None
        if pool is not None:
            pool.stop()

    def in_writer(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``f(*args)`` in the writer thread (at once with ``write_inline``); fires in the reactor thread with its result."""
        if self._write_inline:
            return defer.maybeDeferred(f, *args)
        from twisted.internet.threads import deferToThreadPool

        reactor = self._reactor()
        if self._writer is None:
            self.start()
        assert self._writer is not None
        return deferToThreadPool(reactor, self._writer, f, *args)  # type: ignore[arg-type]

    def io(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``f(*args)`` in the I/O threads (large-message files)."""
        return self._in_thread("_io", IO_THREADS, f, *args)

    def read(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``f(*args)`` in the reader threads."""
        return self._in_thread("_readers", READ_THREADS, f, *args)

    def _executor(self, name: str, threads: int) -> ThreadPoolExecutor:
        with self._lock:
            executor = getattr(self, name)
            if executor is None:
                executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="relay-store" + name)
                setattr(self, name, executor)
            return executor

    def _in_thread(self, name: str, threads: int, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``f(*args)`` in the named threads; the result arrives in the reactor thread.

        With an injected runner it runs at once, on the calling thread.
        """
        if self._inline:
            return defer.maybeDeferred(f, *args)
        reactor = self._reactor()
        d: Deferred = Deferred()

        def deliver(future: Future) -> None:
            error = future.exception()
            if error is None:
                d.callback(future.result())
            else:
                d.errback(Failure(error))

        try:
            future = self._executor(name, threads).submit(f, *args)
        except RuntimeError:  # shutting down
            return defer.fail()
        future.add_done_callback(lambda done: reactor.callFromThread(deliver, done))  # type: ignore[attr-defined]
        return d
