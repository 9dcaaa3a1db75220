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
