"""Logging for every part of the relay: Twisted's Logger with a level threshold, and the daemon's text log.

Each module logs through ``relay.log.Logger`` (Twisted's ``Logger`` with
format fields, and the queue id on every line about a message).  Events
below the threshold are dropped where they are made, before any observer
formats them: debug lines cost nothing unless asked for.  The threshold is
the relay's, set once at start-up (``set_level``); default ``info``.
"""

from __future__ import annotations

import atexit
import re
import signal
import sys
import threading
from typing import IO, Any, Optional

from twisted.logger import ILogObserver, Logger as _TwistedLogger, LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python import logfile
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
_ORDER = [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical]
_enabled: frozenset = frozenset(_ORDER[1:])


def set_level(name: str) -> None:
    """Log events at level ``name`` ("debug", "info", "warn", "error") and above."""
    global _enabled
    threshold = _ORDER.index(LEVELS[name])
    _enabled = frozenset(_ORDER[threshold:])


def enabled(level: Any) -> bool:
    """Whether events at ``level`` are logged now."""
    return level in _enabled


# Characters that could forge or hide a log line: C0 controls but TAB and LF (which
# Twisted's text format indents), DEL, C1 controls, Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_ALL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: "re.Match[str]") -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character (CR, LF, other C0, DEL, C1, U+2028/2029) written as ``\\xNN``/``\\uNNNN``.

    For text from a peer that goes into a log line, so it can never start a
    line of its own or hide what follows.
    """
    return _ALL_CONTROLS.sub(_escaped, text) if _ALL_CONTROLS.search(text) else text


def _escape_line(line: str) -> str:
    """A formatted log line with the controls escaped that Twisted's format leaves raw (LF and TAB stay)."""
    return _CONTROLS.sub(_escaped, line) if _CONTROLS.search(line) else line


class Logger(_TwistedLogger):
    """A Twisted Logger that drops events below the relay's threshold."""

    def emit(self, level: Any, format: Any = None, **kwargs: Any) -> None:
        if level in _enabled:
            super().emit(level, format, **kwargs)


# -- the text log the daemon writes --------------------------------------------

BUFFER_LIMIT = 64 * 1024  # characters held before a write, within one reactor turn


@implementer(ILogObserver)
class TextLogObserver:
    """twistd's classic text lines, written once per reactor turn instead of once per event.

    The lines are those of Twisted's ``textFileLogObserver`` (timestamp,
    ``[namespace#level]``, text, tracebacks indented); the timestamp is
    formatted once per second, and every line of one reactor turn goes out
    in one write, at the end of that turn (at once off the reactor thread,
    before the reactor runs, and at shutdown).
    """

    def __init__(self, out: IO[str], tag: str = "") -> None:
        self._out = out
        self.output = out
        self._tag = tag  # before the system of every line: which worker wrote it
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.RLock()  # re-entrant: a signal handler may log while this thread writes
        self._flush_due = False
        self._second: Optional[int] = None
        self._stamp = ""

    def _time(self, when: Optional[float]) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(second)
        return self._stamp

    def __call__(self, event: dict) -> None:
        if self._tag:
            system = event.get("log_system")
            if system is None:
                level = event.get("log_level")
                system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
            event = dict(event, log_system=f"{self._tag} {system}")
        with self._lock:
            line = formatEventAsClassicLogText(event, formatTime=self._time)
        if line:
            self.write_raw(_escape_line(line))

    def _can_wait(self) -> bool:
        from twisted.internet import reactor

        if not getattr(reactor, "running", False) or not isInIOThread():
            return False
        if not self._flush_due:
            self._flush_due = True
            reactor.callLater(0, self.flush)  # type: ignore[attr-defined]
        return True

    def write_raw(self, text: str) -> None:
        """Lines formatted elsewhere (a worker's), written with this log's own."""
        with self._lock:
            self._lines.append(text)
            self._size += len(text)
            later = self._size < BUFFER_LIMIT and self._can_wait()
        if not later:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            self._flush_due = False
            lines, self._lines, self._size = self._lines, [], 0
            if lines:
                try:
                    self._out.write("".join(lines))
                    self._out.flush()
                except (OSError, ValueError):
                    pass


def daemon_observer(options: Any) -> Optional[TextLogObserver]:
    """The relay's text log for twistd's ``options``, to the file twistd would choose.

    None when twistd is to use another observer (``--logger``, ``--syslog``):
    twistd builds that one itself.  Standard output with ``-n`` and no
    ``--logfile`` (or ``--logfile -``), otherwise the named file (default
    ``twistd.log``), rotated by size and on SIGUSR1 as twistd rotates it.
    """
    if options is None or options.get("logger") or options.get("syslog"):
        return None
    name = options.get("logfile") or ""
    if name == "-" or (options.get("nodaemon") and not name):
        if name == "-" and not options.get("nodaemon"):
            return None  # twistd refuses this itself
        out: Any = sys.stdout
    else:
        out = logfile.LogFile.fromFullPath(name or "twistd.log")
        if not signal.getsignal(signal.SIGUSR1):
            def rotate(signum: int, frame: Any) -> None:
                from twisted.internet import reactor

                reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]
            signal.signal(signal.SIGUSR1, rotate)
    observer = TextLogObserver(out)
    atexit.register(observer.flush)
    return observer
