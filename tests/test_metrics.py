"""Tests for relay.metrics: log events mapped to metrics, the reply counters, the queue gauges, the endpoint's pages."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.web.test.requesthelper import DummyRequest

from relay import log as relay_log
from relay import metrics as relay_metrics
from relay.envelope import Recipient
from relay.log import Logger
from relay.metrics import Metrics, MetricsService, QueueCollector, _MetricsPage
from relay.queue.ids import queue_id_time
from relay.queue.partitions import part_directory
from relay.queue.store import Spool
from test_queue_cli import NOW, store, sync_runner


def spool_at(directory: Path, when: float) -> tuple[Spool, Clock]:
    """A recovered spool whose clock (and so its queue ids) reads ``when``."""
    clock = Clock()
    clock.advance(when)
    spool = Spool(str(directory), clock=clock, runner=sync_runner)
    spool.recover()
    return spool, clock


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_named_events_feed_the_counters() -> None:
    """Events logged with stable names through relay's Logger become counts, sums and histogram samples."""
    metrics = Metrics()
    log = Logger(namespace="relay.test", observer=metrics.observe)
    log.info("connect from {peer}", peer="[127.0.0.1]:1", event="connect", tls=True)
    log.info("{queue_id}: accepted", queue_id="Q1", size=1200, event="accepted")
    log.info("refused", event="rejected", stage="rcpt")
    log.info("{queue_id}: delivered", queue_id="Q1", event="delivered", delay=42.0, attempt=1)
    log.info("{queue_id}: deferred", queue_id="Q1", event="deferred")
    log.info("{queue_id}: bounced", queue_id="Q1", event="bounced")
    log.info("attempt", event="attempt", duration=0.3)
    log.info("tls", event="tls", direction="out")
    log.info("dns", event="dns_failure", permanent=True)
    log.info("disconnect", event="disconnect")
    assert value(metrics, "relay_smtp_sessions_total") == 1
    assert value(metrics, "relay_smtp_sessions_open") == 0
    assert value(metrics, "relay_tls_sessions_total", direction="in") == 1
    assert value(metrics, "relay_tls_sessions_total", direction="out") == 1
    assert value(metrics, "relay_messages_accepted_total") == 1
    assert value(metrics, "relay_messages_accepted_bytes_total") == 1200
    assert value(metrics, "relay_messages_rejected_total", stage="rcpt") == 1
    for result in ("delivered", "deferred", "bounced"):
        assert value(metrics, "relay_deliveries_total", result=result) == 1
    assert value(metrics, "relay_queue_time_seconds_sum") == 42.0
    assert value(metrics, "relay_queue_time_seconds_bucket", le="60.0") == 1
    assert value(metrics, "relay_queue_time_seconds_bucket", le="15.0") == 0
    assert value(metrics, "relay_delivery_attempt_seconds_count") == 1
    assert value(metrics, "relay_dns_failures_total", kind="permanent") == 1


def test_other_events_and_odd_fields_count_nothing() -> None:
    """Lines without a known name count nothing; a field of the wrong type is ignored, never raised."""
    metrics = Metrics()
    log = Logger(namespace="relay.test", observer=metrics.observe)
    log.info("plain line")
    log.info("odd", event="no_such_event")
    log.info("odd", event="delivered", delay="soon")
    log.info("odd", event="accepted", size=None)
    assert value(metrics, "relay_deliveries_total", result="delivered") == 1
    assert value(metrics, "relay_queue_time_seconds_count") == 0
    assert value(metrics, "relay_messages_accepted_bytes_total") == 0


def test_running_service_counts_global_events_and_replies_then_stops() -> None:
    """While the service runs, named events of any level reach it and replies are counted; after stop, nothing is."""
    metrics = Metrics()
    service = MetricsService(metrics)
    log = Logger(namespace="relay.test")
    relay_log.set_level("info")
    service.startService()
    try:
        log.debug("DNS lookup", event="dns_lookup")  # below the threshold, yet counted
        relay_metrics.reply_in(250)
        relay_metrics.reply_in(554)
        relay_metrics.reply_out(451)
    finally:
        service.stopService()
    log.debug("DNS lookup", event="dns_lookup")
    relay_metrics.reply_in(250)
    assert value(metrics, "relay_dns_lookups_total") == 1
    assert value(metrics, "relay_smtp_replies_total", direction="in", **{"class": "2xx"}) == 1
    assert value(metrics, "relay_smtp_replies_total", direction="in", **{"class": "5xx"}) == 1
    assert value(metrics, "relay_smtp_replies_total", direction="out", **{"class": "4xx"}) == 1


def test_queue_gauges_from_every_part(tmp_path: Path) -> None:
    """The queue gauges count active, deferred and held messages in every part, and the oldest one's age."""
    directory = tmp_path / "spool"
    spool, clock = spool_at(directory, NOW - 3600)  # queue ids carry their creation time
    first = store(spool, "a@origin.test", (Recipient("x@far.test"),))
    clock.advance(3000)
    store(spool, "a@origin.test", (Recipient("y@far.test", next_attempt=NOW + 60),))
    store(spool, "a@origin.test", (Recipient("z@far.test"),), held=True)
    other, _ = spool_at(Path(part_directory(str(directory), 1)), NOW - 60)
    store(other, "b@origin.test", (Recipient("w@far.test", next_attempt=NOW - 1),))
    collector = QueueCollector(str(directory), clock=lambda: NOW)
    families = {f.name: f for f in collector.collect()}
    states = {s.labels["state"]: s.value for s in families["relay_queue_messages"].samples}
    assert states == {"active": 2, "deferred": 1, "held": 1}
    # Ids only ever increase within a process, so an earlier test's ids may make these later than NOW - 3600.
    later = QueueCollector(str(directory), clock=lambda: queue_id_time(first) + 3600)
    oldest = {f.name: f for f in later.collect()}["relay_queue_oldest_message_seconds"]
    assert oldest.samples[0].value == pytest.approx(3600)


def test_empty_queue_gauges_are_zero(tmp_path: Path) -> None:
    """An empty (or not yet created) queue exposes zeros, in the text format Prometheus parses."""
    metrics = Metrics()
    metrics.registry.register(QueueCollector(str(tmp_path / "none"), clock=lambda: NOW))
    text = generate_latest(metrics.registry).decode()
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("relay_queue_messages", (("state", "active"),))] == 0
    assert samples[("relay_queue_oldest_message_seconds", ())] == 0
    assert samples[("relay_deliveries_total", (("result", "bounced"),))] == 0


def test_page_refuses_other_paths_and_methods() -> None:
    """/metrics/anything is 404 and POST is 405, before the registry is read."""
    page = _MetricsPage(Metrics().registry)
    deeper = DummyRequest([b"more"])
    page.render(deeper)
    assert deeper.responseCode == 404
    post = DummyRequest([])
    post.method = b"POST"
    page.render(post)
    assert post.responseCode == 405


def test_without_counting_named_debug_events_are_dropped() -> None:
    """Without counting, a debug event with a name is dropped at the info threshold, as before."""
    seen: list = []
    relay_log.set_level("info")
    Logger(namespace="relay.test", observer=seen.append).debug("x", event="dns_lookup")
    Logger(namespace="relay.test", observer=seen.append).emit(LogLevel.info, "y", event="connect")
    assert [e["log_format"] for e in seen] == ["y"]



def _exposed_names() -> set[str]:
    """Every metric name (with its _total, _bucket... forms) that a relay exposes."""
    metrics = Metrics()
    metrics.registry.register(QueueCollector("/nonexistent-queue", clock=lambda: NOW))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + suffix for f in metrics.registry.collect() for suffix in suffixes[f.type]}


def test_dashboard_and_readme_use_only_exposed_metrics() -> None:
    """The Grafana example queries only metrics the relay exposes, and README.rst documents every one."""
    import json
    import re

    repo = Path(__file__).resolve().parent.parent
    exposed = _exposed_names()
    dashboard = json.loads((repo / "examples" / "grafana" / "relay-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"relay_[a-z_]+", target["expr"])}
    assert used and used <= exposed, used - exposed
    readme = (repo / "README.rst").read_text()
    families = {f.name for f in Metrics().registry.collect()} | {"relay_queue_messages",
                                                                  "relay_queue_oldest_message_seconds"}
    for family in families:
        documented = family if f"``{family}``" in readme else f"{family}_total"
        assert f"``{documented}``" in readme, family
