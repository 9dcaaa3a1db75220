"""The daemon's control socket: how ``relay-queue`` asks a running relay to act now.

This module owns both ends of one small protocol.  The daemon listens with
AMP (``twisted.protocols.amp``) on a UNIX socket in its spool directory
(``<queue>/control.sock``, mode 0600, created at start-up, removed at stop);
the administration tool connects, sends one command, reads one answer.

Commands, shared by both ends:

- ``Flush(domain=None, subdomains=False) -> count``: attempt every deferred
  recipient now (of one domain when given); ``count`` messages scheduled.
- ``Reschedule(queue_id)``: the envelope changed on disk (released): look at
  it again now.
- ``Forget(queue_id)``: the message was held or deleted: drop its timer.

The server side calls exactly ``scheduler.flush``, ``scheduler.reschedule``
and ``scheduler.forget``; a failure there answers AMP's generic "Unknown
Error" (the details go to the log, never to the peer).

The client side (``call``) is a plain blocking socket speaking AMP's box
format with amp's own serialisation: the tool runs no reactor, and every
wait is bounded (``CLIENT_TIMEOUT``), so it cannot hang on a stuck daemon.

At start-up a socket file that nobody answers on (left by a crashed daemon)
is replaced; one that a live daemon answers on stops start-up, since two
daemons on one spool would deliver mail twice.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from relay.log import Logger
from twisted.protocols import amp

from relay.queue.store import valid_queue_id

log = Logger(namespace="relay.control")

SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o600
BACKLOG = 16
CLIENT_TIMEOUT = 10.0  # seconds for connect, send and answer together
PROBE_TIMEOUT = 2.0  # seconds to decide whether a socket file has a live daemon
MAX_ANSWER = 64 * 1024  # octets; an answer is a few dozen
EXIT_FAILURE = 1

BAD_QUEUE_ID = b"BAD_QUEUE_ID"


def socket_path(directory: str) -> str:
    """The control socket of the spool in ``directory``."""
    return os.path.join(directory, SOCKET_NAME)


# -- the commands (both ends) ----------------------------------------------------------


class BadQueueId(Exception):
    """The queue id in a command cannot name a queue entry."""


class Flush(amp.Command):
    """Attempt every deferred recipient now (of ``domain`` when given); answers the count."""

    commandName = b"Flush"
    arguments = [
        (b"domain", amp.Unicode(optional=True)),
        (b"subdomains", amp.Boolean(optional=True)),
    ]
    response = [(b"count", amp.Integer())]


class Reschedule(amp.Command):
    """Read the envelope of ``queue_id`` again and schedule it now (after a release)."""

    commandName = b"Reschedule"
    arguments = [(b"queue_id", amp.Unicode())]
    response: list = []
    errors = {BadQueueId: BAD_QUEUE_ID}


class Forget(amp.Command):
    """Drop any timer of ``queue_id`` (after a hold or a delete)."""

    commandName = b"Forget"
    arguments = [(b"queue_id", amp.Unicode())]
    response: list = []
    errors = {BadQueueId: BAD_QUEUE_ID}


# -- the server ------------------------------------------------------------------------


class ControlProtocol(amp.AMP):
    """One connection from the administration tool, answered by the scheduler."""

    def __init__(self, scheduler: Any) -> None:
        super().__init__()
        self.scheduler = scheduler

    @Flush.responder
    def flush(self, domain: Optional[str] = None, subdomains: Optional[bool] = None) -> Deferred:
        if domain is not None:
            domain = domain.strip() or None
        whole = bool(subdomains)
        d = defer.maybeDeferred(self.scheduler.flush, domain=domain, subdomains=whole)
        d.addCallback(self._flushed, domain, whole)
        return d

    def _flushed(self, count: Any, domain: Optional[str], subdomains: bool) -> dict[str, int]:
        count = int(count or 0)
        if domain is None:
            log.info("control: flush requested, {count} message(s) scheduled", count=count)
        else:
            log.info(
                "control: flush of {domain}{also} requested, {count} message(s) scheduled",
                domain=domain,
                also=" and its subdomains" if subdomains else "",
                count=count,
            )
        return {"count": count}

    @Reschedule.responder
    def reschedule(self, queue_id: str) -> Deferred:
        _check_queue_id(queue_id)
        d = defer.maybeDeferred(self.scheduler.reschedule, queue_id)
        d.addCallback(self._done, "{queue_id}: rescheduled on request of relay-queue", queue_id)
        return d

    @Forget.responder
    def forget(self, queue_id: str) -> Deferred:
        _check_queue_id(queue_id)
        d = defer.maybeDeferred(self.scheduler.forget, queue_id)
        d.addCallback(self._done, "{queue_id}: forgotten on request of relay-queue", queue_id)
        return d

    @staticmethod
    def _done(_: Any, line: str, queue_id: str) -> dict:
        log.info(line, queue_id=queue_id)
        return {}


def _check_queue_id(queue_id: str) -> None:
    if not valid_queue_id(queue_id):
        log.warn("control: refused a command for the invalid queue id {queue_id!r}", queue_id=queue_id)
        raise BadQueueId("not a queue id")


class ControlFactory(Factory):
    """Builds a ControlProtocol per connection, all sharing one scheduler."""

    noisy = False  # no "Starting factory" lines

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        protocol = ControlProtocol(self.scheduler)
        protocol.factory = self
        return protocol


class DaemonAlreadyRunning(Exception):
    """Another daemon answers on the control socket of this spool."""


def probe(path: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when something accepts connections on the UNIX socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def remove_stale_socket(path: str) -> bool:
    """Remove a socket file nobody answers on; True when one was removed.

    Raises DaemonAlreadyRunning when a live process answers on it.
    """
    if not os.path.lexists(path):
        return False
    if probe(path):
        raise DaemonAlreadyRunning(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


class ControlService(Service):
    """Listens on ``<directory>/control.sock`` while the relay runs.

    ``privilegedStartService`` (run before any service starts, so before the
    spool recovers) refuses to start a second daemon on the same spool;
    ``startService`` replaces a stale socket file and listens.  Failing to
    listen is logged and the relay runs on: mail flow matters more than the
    tool reaching it.
    """

    name = "control"

    def __init__(self, directory: str, scheduler: Any, reactor: Any) -> None:
        self.directory = directory
        self.path = socket_path(directory)
        self.scheduler = scheduler
        self.reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if os.path.lexists(self.path) and probe(self.path):
            line = (
                f"relay: another relay daemon is running on the queue {self.directory}"
                f" (it answers on {self.path})"
            )
            log.critical("{line}", line=line)
            stream = sys.__stderr__ or sys.stderr
            stream.write(line + "\n")
            stream.flush()
            raise SystemExit(EXIT_FAILURE)

    def startService(self) -> None:
        super().startService()
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            if remove_stale_socket(self.path):
                log.info("control: removed the stale socket {path}", path=self.path)
        except (OSError, DaemonAlreadyRunning) as e:
            self._cannot_listen(e)
            return
        endpoint = UNIXServerEndpoint(self.reactor, self.path, backlog=BACKLOG, mode=SOCKET_MODE)
        d = endpoint.listen(ControlFactory(self.scheduler))
        d.addCallbacks(self._listening, self._cannot_listen)

    def _listening(self, port: Any) -> None:
        self.port = port
        log.info("control: listening on {path}", path=self.path)

    def _cannot_listen(self, reason: Any) -> None:
        error = getattr(reason, "value", reason)
        log.error(
            "control: cannot listen on {path}: {error}; relay-queue cannot reach this daemon",
            path=self.path,
            error=_one_line(error),
        )

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening)


def _one_line(error: BaseException) -> str:
    if isinstance(error, DaemonAlreadyRunning):
        return "another daemon answers on it"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return " ".join(str(error).split()) or type(error).__name__


# -- the client ------------------------------------------------------------------------


class ControlError(Exception):
    """The daemon could not be asked, or said no; ``str()`` is one line for the operator."""


class DaemonNotRunning(ControlError):
    """Nothing answers on the control socket."""

    def __init__(self, directory: str, path: str, reason: str) -> None:
        super().__init__(f"no relay daemon is running for {directory} (cannot connect to {path})")
        self.directory = directory
        self.path = path
        self.reason = reason


class DaemonError(ControlError):
    """The daemon answered a command with an error."""

    def __init__(self, code: str, description: str) -> None:
        if code == amp.UNKNOWN_ERROR_CODE.decode():
            text = "the relay daemon could not carry out the command (its log says why)"
        else:
            text = f"the relay daemon refused the command: {description} ({code})"
        super().__init__(text)
        self.code = code
        self.description = description


_NOT_RUNNING_ERRORS = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK)


def encode_request(command: type[amp.Command], arguments: dict[str, Any], tag: bytes = b"1") -> bytes:
    """The wire form of one AMP request (amp's own box serialisation)."""
    box = command.makeArguments(arguments, None)
    box[amp.COMMAND] = command.commandName
    box[amp.ASK] = tag
    return amp.AmpBox(box).serialize()


def box_length(data: bytes) -> Optional[int]:
    """The length of the first complete AMP box in ``data``; None while it is incomplete."""
    position = 0
    while True:
        if len(data) < position + 2:
            return None
        key_length = int.from_bytes(data[position : position + 2], "big")
        position += 2
        if key_length == 0:
            return position
        position += key_length
        if len(data) < position + 2:
            return None
        value_length = int.from_bytes(data[position : position + 2], "big")
        position += 2 + value_length


def decode_answer(command: type[amp.Command], data: bytes) -> dict[str, Any]:
    """The response values of ``command`` from one complete answer box.

    Raises DaemonError for an error answer and ControlError for anything else
    that is not an answer.
    """
    try:
        boxes = amp.parseString(data)
    except Exception:
        raise ControlError("the relay daemon sent an unreadable answer") from None
    if len(boxes) != 1:
        raise ControlError("the relay daemon sent an unreadable answer")
    box = boxes[0]
    if amp.ANSWER in box:
        try:
            return command.parseResponse(box, None)
        except Exception:
            raise ControlError("the relay daemon sent an unreadable answer") from None
    if amp.ERROR in box:
        code = box.get(amp.ERROR_CODE, b"").decode("utf-8", "replace")
        description = box.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
        raise DaemonError(code, " ".join(description.split()) or "no reason given")
    raise ControlError("the relay daemon sent an unreadable answer")


def call(
    directory: str,
    command: type[amp.Command],
    timeout: float = CLIENT_TIMEOUT,
    **arguments: Any,
) -> dict[str, Any]:
    """Send ``command`` to the daemon of the spool in ``directory``; its response values.

    Blocking, bounded by ``timeout`` seconds in all.  Raises DaemonNotRunning
    when nothing answers on the socket, ControlError (or DaemonError) otherwise.
    """
    path = socket_path(directory)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            if e.errno in _NOT_RUNNING_ERRORS:
                raise DaemonNotRunning(directory, path, e.strerror or str(e)) from None
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            s.sendall(encode_request(command, arguments))
            data = _read_box(s, deadline)
        except socket.timeout:
            raise ControlError(f"the relay daemon did not answer within {timeout:g} s ({path})") from None
        except OSError as e:
            raise ControlError(f"lost the connection to {path}: {e.strerror or e}") from None
    return decode_answer(command, data)


def _read_box(s: socket.socket, deadline: float) -> bytes:
    data = b""
    while True:
        end = box_length(data)
        if end is not None:
            return data[:end]
        if len(data) > MAX_ANSWER:
            raise ControlError("the relay daemon sent an unreadable answer")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        s.settimeout(remaining)
        chunk = s.recv(4096)
        if not chunk:
            raise ControlError("the relay daemon closed the connection without answering")
        data += chunk
