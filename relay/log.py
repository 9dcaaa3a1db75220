"""Logging for every part of the relay: Twisted's Logger with a level threshold, and the daemon's log.

Each module logs through ``relay.log.Logger`` (Twisted's ``Logger`` with
format fields, and the queue id on every line about a message).  A line an
operator or a tool follows carries a stable event name in its ``event``
field (``accepted``, ``delivered``, ``deferred``, ``bounced``, ``connect``,
...): the JSON log writes it, and the metrics (``relay.metrics``) count it.

The threshold (``[log] level``, set once at start-up with ``set_level``;
default ``info``) is applied twice.  Events below it are dropped where they
are made, before any observer formats them, so debug lines cost nothing
unless asked for; a named one goes straight to the metrics
(``count_events``), never to the log.  And the daemon's log observer sits
behind Twisted's own ``FilteringLogObserver`` with a level predicate
(``filtered``; ``LevelPredicate`` decides as ``LogLevelFilterPredicate`` with
one default level, without a namespace look-up per event), which also
filters the lines of Twisted itself.

The daemon's log is text (twistd's classic lines) or JSON (one object per
line), written once per reactor turn.
"""

from __future__ import annotations

import atexit
import json
import re
import signal
import sys
import threading
import time
from typing import IO, Any, Callable, Optional

from datetime import datetime, timezone

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger as _TwistedLogger,
    LogLevel,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
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
_threshold = LogLevel.info
_counter: Optional[Callable[[dict], None]] = None  # sees the named events below the threshold


def set_level(name: str) -> None:
    """Log events at level ``name`` ("debug", "info", "warn", "error") and above."""
    global _enabled, _threshold
    _threshold = LEVELS[name]
    _enabled = frozenset(_ORDER[_ORDER.index(_threshold):])


def count_events(counter: Optional[Callable[[dict], None]]) -> None:
    """Hand the named events below the threshold to ``counter`` (the metrics), never to the log; None: stop."""
    global _counter
    _counter = counter


@implementer(ILogFilterPredicate)
class LevelPredicate:
    """Twisted's level filter for one threshold in every namespace, as LogLevelFilterPredicate
    with only a default level would decide it, without its per-namespace look-up on every event."""

    def __init__(self, threshold: Any) -> None:
        self._shown = frozenset(_ORDER[_ORDER.index(threshold):])

    def __call__(self, event: dict) -> Any:
        return PredicateResult.maybe if event.get("log_level") in self._shown else PredicateResult.no


def filtered(observer: Any, level: Optional[str] = None) -> FilteringLogObserver:
    """``observer`` behind Twisted's level filter: events at ``level`` (default: the relay's) and above."""
    threshold = LEVELS[level] if level is not None else _threshold
    return FilteringLogObserver(observer, [LevelPredicate(threshold)])


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


def _system(event: dict) -> Any:
    """The event's ``[system]``: its log_system, else ``namespace#level`` (each "-" when missing), as Twisted's."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
    return system


def _fast_line(event: dict, stamp: Callable[[Optional[float]], str]) -> Optional[str]:
    """Twisted's classic line for a plain event (a text format, fields by name, no failure), or None.

    The same line ``formatEventAsClassicLogText`` makes, through ``str.format_map``
    instead of Twisted's formatter written in Python (a quarter of the cost of
    a line).  Anything else (a failure to show, a flattened event, a ``{call()}``
    field, a field that will not format) is None: Twisted's own code formats it.
    """
    if "log_failure" in event or "log_flattened" in event:
        return None
    text = _mapped(event)
    if not text:
        return None
    system = _system(event)
    if type(system) is not str:
        return None
    return f"{stamp(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"


class Logger(_TwistedLogger):
    """A Twisted Logger that drops events below the relay's threshold.

    An event at or above it is the one Twisted's ``Logger.emit`` makes, but
    built here: Twisted's checks the level against a freshly sorted list of
    every level on each call, where the relay's set of enabled levels has
    already said it is one.
    """

    def emit(self, level: Any, format: Any = None, **kwargs: Any) -> None:
        if level in _enabled:
            kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                          log_source=self.source, log_format=format, log_time=time.time())
            if "log_trace" in kwargs:
                kwargs["log_trace"].append((self, self.observer))
            self.observer(kwargs)
        elif _counter is not None and "event" in kwargs:
            _counter(kwargs)
        elif level not in _ORDER:
            super().emit(level, format, **kwargs)  # Twisted's error for a level that is none


# -- the text log the daemon writes --------------------------------------------

BUFFER_LIMIT = 64 * 1024  # characters held before a write, within one reactor turn


@implementer(ILogObserver)
class TextLogObserver:
    """twistd's classic text lines, written once per reactor turn instead of once per event.

    The lines are those of Twisted's ``textFileLogObserver`` (timestamp,
    ``[namespace#level]``, text, tracebacks indented); the timestamp is
    formatted once per second, and every line of one reactor turn goes out
    in one write, at the end of that turn (at once off the reactor thread,
    before the reactor runs, at shutdown, and always when no ``reactor`` is
    given).  ``reactor`` is the one the composition root runs, which this
    log schedules its writes on.
    """

    def __init__(self, out: IO[str], tag: str = "", reactor: Any = None) -> None:
        self._out = out
        self._reactor = reactor
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
        with self._lock:
            line = self.format(event)
        if line:
            self.write_raw(line)

    def format(self, event: dict) -> Optional[str]:
        """The line (with its newline) for ``event``, or None."""
        if self._tag:
            event = dict(event, log_system=f"{self._tag} {_system(event)}")
        line = _fast_line(event, self._time)
        if line is None:
            line = formatEventAsClassicLogText(event, formatTime=self._time)
        return _escape_line(line) if line else line

    def _can_wait(self) -> bool:
        reactor = self._reactor
        if reactor is None or not getattr(reactor, "running", False) or not isInIOThread():
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


RESERVED = ("time", "level", "event", "queue_id", "message", "system", "worker", "traceback")
FIELD_NAMES = {"peer": "client"}  # a format field's name in JSON, where the text log's differs
GENERIC_EVENT = "log"  # the event of a line that has no stable name
_NOT_FIELDS = ("format", "event", "queue_id", "isError", "why")  # keys of the event dict that are not format fields


class JSONLogObserver(TextLogObserver):
    """One JSON object per line: time, level, event, queue_id, message, then the event's fields.

    ``time`` is ISO 8601 in UTC; ``event`` the stable name (``log`` for lines
    without one); ``message`` the text line's text; ``system`` the Twisted
    namespace or log system; ``worker`` which worker wrote it; ``traceback``
    the failure of an error, if any.  Other format fields follow under their
    own names (``peer`` as ``client``); values JSON cannot hold become text.
    """

    def format(self, event: dict) -> Optional[str]:
        level = event.get("log_level")
        when = event.get("log_time")
        record: dict[str, Any] = {
            "time": _iso_time(when),
            "level": getattr(level, "name", "info"),
            "event": event.get("event") or GENERIC_EVENT,
        }
        if event.get("queue_id"):
            record["queue_id"] = event["queue_id"]
        text = _text(event)
        failure = event.get("log_failure")
        record["message"] = text
        system = event.get("log_system")
        record["system"] = system if system not in (None, "-") else event.get("log_namespace", "-")
        if self._tag:
            record["worker"] = self._tag
        if failure is not None:
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:
                record["traceback"] = repr(failure)
        for key, value in event.items():
            if key.startswith("log_") or key in _NOT_FIELDS:
                continue
            key = FIELD_NAMES.get(key, key)
            if key not in record:
                record[key] = value
        try:
            return json.dumps(record, ensure_ascii=False, default=str) + "\n"
        except (TypeError, ValueError):
            return json.dumps({k: str(v) for k, v in record.items()}, ensure_ascii=False) + "\n"


def _mapped(event: dict) -> Optional[str]:
    """The event's text by ``str.format_map``, or None where that cannot give Twisted's result
    (no text format, a ``{callable()}`` field, a missing field, a value that will not format)."""
    fmt = event.get("log_format")
    if type(fmt) is str:
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return None


def _text(event: dict) -> str:
    """The event's text: ``str.format_map`` where that gives Twisted's result (most formats, far
    faster), Twisted's ``formatEvent`` for the rest (``{callable()}`` fields, legacy events, errors)."""
    text = _mapped(event)
    return text if text is not None else formatEvent(event)


def _iso_time(when: Optional[float]) -> str:
    stamp = datetime.fromtimestamp(when if when is not None else 0.0, timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_observer(out: IO[str], format: str = "text", tag: str = "", reactor: Any = None) -> TextLogObserver:
    """The log observer for ``[log] format`` (``text`` or ``json``) writing to ``out`` on ``reactor``'s turns."""
    return (JSONLogObserver if format == "json" else TextLogObserver)(out, tag=tag, reactor=reactor)


def daemon_observer(options: Any, reactor: Any, format: str = "text") -> Optional[TextLogObserver]:
    """The relay's text log for twistd's ``options``, to the file twistd would choose.

    None when twistd is to use another observer (``--logger``, ``--syslog``):
    twistd builds that one itself.  Standard output with ``-n`` and no
    ``--logfile`` (or ``--logfile -``), otherwise the named file (default
    ``twistd.log``), rotated by size and on SIGUSR1 as twistd rotates it;
    ``reactor`` runs that rotation and the write at the end of each turn.
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
                reactor.callFromThread(out.rotate)
            signal.signal(signal.SIGUSR1, rotate)
    observer = make_observer(out, format, reactor=reactor)
    atexit.register(observer.flush)
    return observer
