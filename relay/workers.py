"""Worker processes: ``[server] workers = N`` runs the whole relay N times, one per core.

This module owns the master, the process ``twistd`` runs, and the start of
each worker.

* The master binds every listener (so privileged ports and every endpoint
  type work as with one process), never accepts on them, and starts N
  workers (``python -m relay.worker``), handing each the listening sockets
  as inherited descriptors.  Every worker accepts on all of them; the
  kernel gives each new connection to one worker.
* Each worker runs the whole pipeline (server, store, scheduler, routing,
  delivery, control socket) on its own part of the queue
  (``relay.queue.partitions``): workers share nothing on the way of a
  message.  ``concurrency``, ``per_destination`` and ``max_sessions`` are
  limits of the whole relay, split evenly between the workers (rounded up).
* Supervision: a worker that exits is started again, at once the first
  time and with a doubling delay (up to a minute) while it keeps dying
  within ten seconds of its start; its part of the queue is recovered and
  delivered by the new process.  SIGTERM to the master stops every worker
  (each drains as a single relay does) and exits 0.  Each worker's standard
  input is a pipe from the master: when the master dies, even by SIGKILL,
  the workers see the end of it and stop; on Linux they also ask the kernel
  for SIGTERM when their parent dies.
* Logs: workers write their lines (tagged ``worker-I``) to a pipe; the master
  writes them into its own log as they come.
* Before the workers start, the mail of parts that no worker owns any more
  (after ``workers`` was lowered) is moved into the remaining parts.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
from dataclasses import replace
from typing import Any, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer, error, protocol, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.config import Config
from relay.log import Logger

log = Logger(namespace="relay.workers")

FIRST_FD = 3  # inherited listening sockets start here in a worker
QUICK_DEATH = 10.0  # seconds: a worker that dies sooner is restarted with a growing delay
MAX_RESTART_DELAY = 60.0
STOP_TIMEOUT = 30.0  # seconds the master waits for its workers to stop before SIGKILL


def worker_config(config: Config, index: int, workers: int) -> Config:
    """``config`` as worker ``index`` of ``workers`` runs it: its part of the queue, its share of the limits."""
    from relay.queue.partitions import part_directory

    share = lambda total: max(1, math.ceil(total / workers))  # noqa: E731
    return replace(
        config,
        queue=replace(config.queue, directory=part_directory(config.queue.directory, index)),
        delivery=replace(config.delivery, concurrency=share(config.delivery.concurrency),
                         per_destination=share(config.delivery.per_destination)),
        server=replace(config.server, max_sessions=share(config.server.max_sessions)),
        metrics=replace(config.metrics, listen=()),  # the master serves the sum of the workers
    )


# -- the master ----------------------------------------------------------------


class _NoConnections(protocol.Factory):
    """The master listens but never accepts: its ports stop reading at once."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


class _WorkerProcess(protocol.ProcessProtocol):
    """One worker as the master sees it: its log lines, its end."""

    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred = Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buffered = self._partial.get(fd, b"") + data
        lines, _, self._partial[fd] = buffered.rpartition(b"\n")
        if lines:
            self.supervisor.worker_output(self.index, lines + b"\n")

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self.supervisor.worker_output(self.index, rest + b"\n")
        self._partial = {1: b"", 2: b""}
        self.supervisor.worker_ended(self.index, reason)
        self.ended.callback(None)


class Supervisor(Service):
    """The master: binds the listeners, starts the workers and keeps them running."""

    name = "workers"

    def __init__(self, config: Config, reactor: Any, relay_args: Sequence[str], log_out: Any = None,
                 metrics_dir: Optional[str] = None) -> None:
        self.config = config
        self.metrics_dir = metrics_dir  # where the workers write their metrics (relay.metrics), or None
        self.reactor = reactor
        self.relay_args = list(relay_args)
        self.log_out = log_out  # the master's text log (raw lines are written there), or None
        self.count = config.server.workers
        self.endpoints = listen_endpoints(config, reactor)  # built now: a bad one is a ConfigError
        self.ports: list[tuple[str, Any]] = []
        self.processes: dict[int, Any] = {}
        self.protocols: dict[int, _WorkerProcess] = {}
        self.started_at: dict[int, float] = {}
        self.pids: dict[int, int] = {}
        self.delays: dict[int, float] = {}
        self.timers: dict[int, Any] = {}
        self.stopping = False

    def privilegedStartService(self) -> None:
        """Bind every listener now (before twistd drops privileges); no connection is ever accepted here."""
        from relay.services import stop_start_up

        for description, endpoint in self.endpoints:
            try:
                port = _result(endpoint.listen(_NoConnections()))
            except Exception as e:
                stop_start_up(f"cannot listen on {description}: {' '.join(str(e).split())}")
            port.stopReading()
            self.ports.append((description, port))
        super().privilegedStartService()

    def startService(self) -> None:
        from relay.queue.partitions import merge_surplus

        super().startService()
        moved = merge_surplus(self.config.queue.directory, self.count)
        if moved:
            log.info("workers: {count} queued message(s) moved into the parts of {workers} workers",
                     count=moved, workers=self.count)
        log.info("workers: starting {count} worker processes", count=self.count)
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self.timers.pop(index, None)
        if self.stopping:
            return
        shared = self._shared_log_fd()
        fds: dict[int, Any] = {0: "w", 1: shared if shared is not None else "r", 2: "r"}
        listen_args = []
        for n, (description, port) in enumerate(self.ports):
            fds[FIRST_FD + n] = port.fileno()
            listen_args += ["--inherit", f"{FIRST_FD + n}={description}"]
        args = [sys.executable, "-m", "relay.worker", "--index", str(index), "--workers", str(self.count),
                *listen_args, "--", *self.relay_args]
        proto = _WorkerProcess(self, index)
        self.protocols[index] = proto
        env = dict(os.environ)
        if self.metrics_dir:
            from relay.metrics import MULTIPROC_ENV

            env[MULTIPROC_ENV] = self.metrics_dir
        self.processes[index] = self.reactor.spawnProcess(
            proto, sys.executable, args, env=env, path=os.getcwd(), childFDs=fds)
        self.started_at[index] = self.reactor.seconds()
        self.pids[index] = self.processes[index].pid
        log.info("workers: worker-{index} started (pid {pid})", index=index, pid=self.processes[index].pid)

    def _shared_log_fd(self) -> Optional[int]:
        """The master's log as a plain file on standard output (``twistd -n`` to a file): the
        workers write their lines straight into it (each write whole lines, at the file's end);
        anything else (a terminal, a pipe, a rotated log file) goes through the master."""
        out = getattr(self.log_out, "output", None)
        if out is not sys.stdout:
            return None
        try:
            fd = sys.stdout.fileno()
            import stat

            return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
        except (OSError, ValueError, AttributeError):
            return None

    def worker_output(self, index: int, data: bytes) -> None:
        """Lines a worker wrote: into the master's log as they are."""
        write = getattr(self.log_out, "write_raw", None)
        text = data.decode("utf-8", "replace")
        if write is not None:
            write(text)
        else:
            for line in text.splitlines():
                log.info("{line}", line=line)

    def worker_ended(self, index: int, reason: Failure) -> None:
        self.processes.pop(index, None)
        pid = self.pids.pop(index, None)
        if self.metrics_dir and pid is not None:
            from relay.metrics import worker_ended

            worker_ended(self.metrics_dir, pid)
        how = _exit_text(reason)
        if self.stopping:
            log.info("workers: worker-{index} stopped ({how})", index=index, how=how)
            return
        lived = self.reactor.seconds() - self.started_at.get(index, 0.0)
        delay = 0.0 if lived >= QUICK_DEATH else max(1.0, self.delays.get(index, 0.5) * 2)
        delay = min(delay, MAX_RESTART_DELAY)
        self.delays[index] = delay
        log.error("workers: worker-{index} exited ({how}); starting it again in {delay:g} s",
                  index=index, how=how, delay=delay)
        self.timers[index] = self.reactor.callLater(delay, self._spawn, index)

    def hangup(self) -> None:
        """SIGHUP: every worker reloads its routes (relay.reload)."""
        for index, process in list(self.processes.items()):
            log.info("workers: SIGHUP passed on to worker-{index}", index=index)
            _signal(process, "HUP")

    def stopService(self) -> Deferred:
        """Stop every worker (SIGTERM, SIGKILL after STOP_TIMEOUT), then close the listeners."""
        super().stopService()
        self.stopping = True
        for timer in self.timers.values():
            if timer.active():
                timer.cancel()
        self.timers.clear()
        waiting = [self.protocols[i].ended for i in list(self.processes)]
        for process in list(self.processes.values()):
            _signal(process, "TERM")
        killer = self.reactor.callLater(STOP_TIMEOUT, self._kill_all)
        d = defer.DeferredList(waiting)

        def stopped(_: Any) -> Any:
            if killer.active():
                killer.cancel()
            return defer.DeferredList([defer.maybeDeferred(port.stopListening) for _, port in self.ports])

        return d.addCallback(stopped)

    def _kill_all(self) -> None:
        for index, process in list(self.processes.items()):
            log.warn("workers: worker-{index} did not stop in time; killed", index=index)
            _signal(process, "KILL")


def listen_endpoints(config: Config, reactor: Any) -> list[tuple[str, Any]]:
    """The endpoint of every listener (``systemd:`` ones adopt the socket systemd passed);
    ConfigError naming the key for one that cannot be used."""
    from relay.config import COMMAND_LINE
    from relay.tap import _endpoint

    source = config.source or COMMAND_LINE
    server = config.server
    return [(description, _endpoint(reactor, description, f"{source}: {key}[{index}]"))
            for key, descriptions in (("server.listen", server.listen),
                                      ("server.submission_listen", server.submission_listen))
            for index, description in enumerate(descriptions)]


def _result(d: Deferred) -> Any:
    """The result of a Deferred that has fired (endpoints listen synchronously), or its error raised."""
    box: list = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("the listener did not start at once")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def _signal(process: Any, name: str) -> None:
    try:
        process.signalProcess(name)
    except error.ProcessExitedAlready:
        pass


def _exit_text(reason: Failure) -> str:
    value = reason.value
    if getattr(value, "signal", None):
        return f"signal {value.signal}"
    return f"exit status {getattr(value, 'exitCode', '?')}"


# -- a worker ------------------------------------------------------------------


class _SharedPort(tcp.Port):
    """A listening socket shared with other workers: one connection accepted per wake-up,
    so that a busy worker leaves the next ones to the others."""

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass


@implementer(IStreamServerEndpoint)
class InheritedEndpoint:
    """Listens on a socket the master bound and handed down (``fd``); TLS for ``ssl:`` listeners."""

    def __init__(self, reactor: Any, fd: int, description: str) -> None:
        self.reactor = reactor
        self.fd = fd
        self.description = description

    def listen(self, factory: Any) -> Deferred:
        try:
            from relay.server_tls import SSL_PREFIXES, listener_context

            if self.description.split(":", 1)[0] in SSL_PREFIXES:  # the master bound it: only TLS is built here
                from twisted.protocols.tls import TLSMemoryBIOFactory

                factory = TLSMemoryBIOFactory(listener_context(self.description), False, factory, clock=self.reactor)
            probe = socket.socket(fileno=os.dup(self.fd))
            family = probe.family
            probe.close()
            port = _SharedPort._fromListeningDescriptor(self.reactor, self.fd, family, factory)
            port.startListening()
        except Exception:
            return defer.fail()
        return defer.succeed(port)


class _MasterGone:
    """Reads the worker's standard input, a pipe from the master: its end means the master is gone."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def fileno(self) -> int:
        return 0

    def doRead(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.reactor.removeReader(self)
            log.warn("the master process is gone; stopping")
            if self.reactor.running:
                self.reactor.stop()

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "master"


def _die_with_parent() -> None:
    """Linux: SIGTERM to this process when its parent dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:
        pass


def worker_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m relay.worker --index I --workers N [--inherit FD=ENDPOINT]... -- RELAY-OPTIONS``."""
    import argparse

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from relay.log import filtered, make_observer, set_level
    from relay.tap import Options, add_reload, build_relay

    _die_with_parent()
    parser = argparse.ArgumentParser(prog="relay.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--inherit", action="append", default=[])
    parser.add_argument("relay_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    relay_args = args.relay_args[1:] if args.relay_args[:1] == ["--"] else args.relay_args
    inherited = {}
    for item in args.inherit:
        fd, _, description = item.partition("=")
        inherited[description] = int(fd)
    options = Options()
    options.parseOptions(relay_args)
    assert options.config is not None
    config = worker_config(options.config, args.index, args.workers)
    set_level(config.log.level)
    observer = make_observer(sys.stdout, config.log.format, tag=f"worker-{args.index}", reactor=reactor)
    globalLogBeginner.beginLoggingTo([filtered(observer)], redirectStandardIO=False)
    siblings = [i for i in range(args.workers) if i != args.index]
    relay = build_relay(config, reactor, inherited=inherited,
                        siblings=[_sibling(options.config, i) for i in siblings])
    add_reload(relay, reactor, options, baseline=options.config)
    os.set_blocking(0, False)
    reactor.addReader(_MasterGone(reactor))
    status = {"code": 0}

    def start() -> None:
        try:
            relay.privilegedStartService()
            relay.startService()
        except SystemExit as e:
            status["code"] = e.code if isinstance(e.code, int) else 1
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: relay.stopService() if relay.running else None)
    reactor.run()
    observer.flush()
    sys.exit(status["code"])


def _sibling(config: Config, index: int) -> str:
    from relay.queue.partitions import part_directory

    return part_directory(config.queue.directory, index)
