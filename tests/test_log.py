"""Tests for relay.log: the level threshold and the daemon's text log observer."""

from __future__ import annotations

import io
import threading

from twisted.logger import LogLevel

from relay import log as relay_log
from relay.log import Logger, TextLogObserver


def event(text: str, level=LogLevel.info, namespace: str = "relay.test", when: float = 1_700_000_000.5) -> dict:
    return {"log_format": text, "log_level": level, "log_namespace": namespace, "log_time": when}


def test_lines_are_twisted_classic_text_and_tagged_by_worker() -> None:
    """Lines are "time [namespace#level] text"; a worker's tag goes before the system."""
    out = io.StringIO()
    TextLogObserver(out)(event("hello"))
    tagged = io.StringIO()
    TextLogObserver(tagged, tag="worker-1")(event("hi"))
    assert out.getvalue().endswith(" [relay.test#info] hello\n")
    assert tagged.getvalue().endswith(" [worker-1 relay.test#info] hi\n")


class CountingOut(io.StringIO):
    """A text stream that counts the writes made to it."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_of_one_reactor_turn_go_out_in_one_write_on_the_injected_reactor() -> None:
    """On the reactor it is given (running, in its thread), the log writes a turn's lines once, at the turn's end."""
    from twisted.internet.task import Clock
    from twisted.python import threadable

    threadable.registerAsIOThread()  # this test's thread is the reactor's
    reactor = Clock()
    reactor.running = True  # type: ignore[attr-defined]
    out = CountingOut()
    observer = TextLogObserver(out, reactor=reactor)
    observer(event("first"))
    observer(event("second"))
    assert (out.getvalue(), out.writes) == ("", 0)
    reactor.advance(0)
    assert out.writes == 1
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == ["first", "second"]


def test_without_a_reactor_or_before_it_runs_each_line_is_written_at_once() -> None:
    """With no reactor, or one that is not running yet, a line is written when it is logged."""
    from twisted.internet.task import Clock

    for reactor in (None, Clock()):
        out = CountingOut()
        observer = TextLogObserver(out, reactor=reactor)
        observer(event("now"))
        assert out.writes == 1 and out.getvalue().endswith("] now\n")


def test_logging_while_the_observer_writes_does_not_hang() -> None:
    """A line logged during the observer's own write (a signal handler's) is written too, without deadlock."""

    class Reentrant(io.StringIO):
        def write(self, text: str) -> int:
            if not getattr(self, "inside", False):
                self.inside = True
                observer(event("from the signal handler"))
            return super().write(text)

    out = Reentrant()
    observer = TextLogObserver(out)
    worker = threading.Thread(target=observer, args=(event("first"),), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "the observer deadlocked on itself"
    observer.flush()
    text = out.getvalue()
    assert "first" in text and "from the signal handler" in text


def test_events_below_the_level_are_dropped_before_any_observer() -> None:
    """With the level at info, debug events never reach an observer; at debug they do."""
    seen: list[dict] = []
    logger = Logger(namespace="relay.test", observer=seen.append)
    try:
        relay_log.set_level("info")
        logger.debug("quiet")
        logger.info("loud")
        relay_log.set_level("debug")
        logger.debug("now heard")
    finally:
        relay_log.set_level("info")
    assert [e["log_format"] for e in seen] == ["loud", "now heard"]


def test_json_lines_carry_time_level_event_queue_id_and_fields() -> None:
    """A JSON line has time (UTC), level, the stable event, the queue id, the text and the format fields."""
    import json

    out = io.StringIO()
    observer = relay_log.make_observer(out, "json", tag="worker-1")
    Logger(namespace="relay.test", observer=observer).info(
        "{queue_id}: accepted from {peer} <{sender}>", queue_id="Q1", peer="[127.0.0.1]:25", sender="a@b.test",
        event="accepted", size=12, when=object())
    observer.flush()
    record = json.loads(out.getvalue())
    assert record["time"].endswith("Z") and record["level"] == "info" and record["event"] == "accepted"
    assert record["queue_id"] == "Q1" and record["client"] == "[127.0.0.1]:25" and record["sender"] == "a@b.test"
    assert record["message"] == "Q1: accepted from [127.0.0.1]:25 <a@b.test>"
    assert record["size"] == 12 and record["worker"] == "worker-1" and record["system"] == "relay.test"
    assert record["when"].startswith("<object")  # what JSON cannot hold becomes text


def test_json_lines_without_a_name_and_with_a_failure() -> None:
    """A line without a stable name is event "log"; an error's traceback is one field of its one line."""
    import json

    out = io.StringIO()
    observer = relay_log.JSONLogObserver(out)
    logger = Logger(namespace="relay.test", observer=observer)
    logger.info("plain")
    try:
        1 / 0
    except ZeroDivisionError:
        logger.failure("it broke")
    observer.flush()
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["event"] == "log" and "queue_id" not in first
    assert second["level"] == "critical" and "ZeroDivisionError" in second["traceback"]


def test_level_filter_is_twisteds_and_applies_to_every_logger() -> None:
    """``filtered`` keeps events at the level and above, Twisted's own loggers' too."""
    from twisted.logger import Logger as TwistedLogger

    seen: list[dict] = []
    twisted_logger = TwistedLogger(namespace="twisted.test", observer=relay_log.filtered(seen.append, "warn"))
    twisted_logger.info("not shown")
    twisted_logger.warn("shown")
    twisted_logger.error("shown too")
    assert [e["log_format"] for e in seen] == ["shown", "shown too"]


def test_named_events_below_the_threshold_go_to_the_counter_only() -> None:
    """While events are counted, a named debug event reaches the counter and never the log; others neither."""
    counted: list[dict] = []
    logged: list[dict] = []
    relay_log.set_level("info")
    relay_log.count_events(counted.append)
    try:
        logger = Logger(namespace="relay.test", observer=logged.append)
        logger.debug("DNS lookup", event="dns_lookup", mx=True)
        logger.debug("unnamed")
        logger.info("connect", event="connect")
    finally:
        relay_log.count_events(None)
    assert counted == [{"event": "dns_lookup", "mx": True}]
    assert [e["log_format"] for e in logged] == ["connect"]


def test_json_message_is_twisteds_text_for_every_kind_of_format() -> None:
    """The JSON ``message`` equals Twisted's formatEvent, for specs, !r, callables, missing fields and braces."""
    import json

    from twisted.logger import formatEvent

    formats = [("{n:.2f} s {who!r}", {"n": 1.5, "who": "x"}), ("{f()} called", {"f": lambda: "it"}),
               ("{missing} field", {}), ("{{literal}} {a.real}", {"a": 3})]
    for fmt, fields in formats:
        out = io.StringIO()
        observer = relay_log.JSONLogObserver(out)
        observer(dict(event(fmt), **fields))
        observer.flush()
        assert json.loads(out.getvalue())["message"] == formatEvent(dict(event(fmt), **fields)), fmt


def test_text_lines_are_twisteds_classic_text_for_every_kind_of_event() -> None:
    """A text line equals Twisted's formatEventAsClassicLogText: specs, !r, callables, missing
    fields, braces, attributes, newlines, a log_system, no level, an empty format and a failure."""
    from twisted.logger import formatEventAsClassicLogText
    from twisted.python.failure import Failure

    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    cases = [("{n:.2f} s {who!r}", {"n": 1.5, "who": "x"}), ("{f()} called", {"f": lambda: "it"}),
             ("{missing} field", {}), ("{{literal}} {a.real} {b[0]}", {"a": 3, "b": ["first"]}),
             ("two\nlines {x}", {"x": "and\nthree"}), ("from {peer}", {"peer": "[::1]:25", "log_system": "sys"}),
             ("no level", {"log_level": None}), ("", {}), ("failed: {why}", {"why": "boom", "log_failure": failure}),
             ("{n:d}", {"n": "not a number"})]
    for fmt, fields in cases:
        observer = TextLogObserver(io.StringIO())
        whole = dict(event(fmt), **fields)
        if whole.get("log_level", LogLevel.info) is None:
            del whole["log_level"]
        assert observer.format(whole) == formatEventAsClassicLogText(whole, formatTime=observer._time), fmt


def test_logger_events_are_those_twisteds_logger_makes() -> None:
    """relay's Logger hands observers the keys and values Twisted's Logger.emit would, and an unknown level is
    Twisted's error event."""
    from twisted.logger import Logger as TwistedLogger

    ours: list[dict] = []
    theirs: list[dict] = []
    Logger(namespace="relay.test", observer=ours.append).info("hello {who}", who="you", event="greeting")
    TwistedLogger(namespace="relay.test", observer=theirs.append).info("hello {who}", who="you", event="greeting")
    assert sorted(ours[0]) == sorted(theirs[0])
    assert {k: v for k, v in ours[0].items() if k not in ("log_logger", "log_time")} == \
        {k: v for k, v in theirs[0].items() if k not in ("log_logger", "log_time")}
    bad: list[dict] = []
    Logger(namespace="relay.test", observer=bad.append).emit("loud", "never")  # type: ignore[arg-type]
    assert [e["log_format"] for e in bad] == ["Got invalid log level {invalidLevel!r} in {logger}.emit()."]
