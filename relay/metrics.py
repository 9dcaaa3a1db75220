"""Metrics in the Prometheus text format: what the relay counts, and the ``[metrics] listen`` endpoint.

This module owns every metric the relay exposes.  Counters, histograms and
the open-session gauges are fed by one log observer (``Metrics.observe``)
that maps the stable event names of the relay's log lines (``accepted``,
``delivered``, ``connect``, ...; see ``relay.log``) to metrics, so that the
code that does the work only logs; SMTP replies, too many to log, are
counted by ``reply_in`` and ``reply_out``.  The queue gauges are computed
at scrape time from the store, every part of it (``QueueCollector``).

The endpoint is twisted.web with prometheus_client's ``MetricsResource``:
GET (or HEAD) ``/metrics`` only; any other path is 404, any other method
405.  It is read-only and binds where configured.

With ``[server] workers = N`` each worker counts into prometheus_client's
multiprocess files in a directory the master makes (``MULTIPROC_ENV`` in
the workers' environment); the master serves the sum of every worker with
its own queue gauges, so one scrape shows the whole relay.  The gauges of a
worker that ended are dropped (``Supervisor`` calls ``worker_ended``);
its counters stay in the sums.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from twisted.application.service import MultiService
from twisted.logger import globalLogPublisher
from twisted.web import pages, resource, server

from relay import log as relay_log
from relay.log import Logger

log = Logger(namespace="relay.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
IN, OUT = "in", "out"

QUEUE_TIME_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400)
ATTEMPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RESULTS = ("delivered", "deferred", "bounced")  # relay_deliveries_total{result}

_active: Optional["Metrics"] = None  # the process's counting metrics, once started


class Metrics:
    """The relay's metrics in ``registry``, and the log observer that feeds them."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.sessions = Counter("relay_smtp_sessions", "SMTP sessions opened by clients", registry=r)
        self.sessions_open = Gauge("relay_smtp_sessions_open", "SMTP sessions open now", registry=r,
                                   multiprocess_mode="livesum")
        self.sessions_refused = Counter("relay_smtp_connections_refused",
                                        "Connections refused (too many sessions)", registry=r)
        self.accepted = Counter("relay_messages_accepted", "Messages accepted (250 after the commit)", registry=r)
        self.accepted_bytes = Counter("relay_messages_accepted_bytes", "Octets of the messages accepted",
                                      registry=r)
        self.rejected = Counter("relay_messages_rejected", "MAIL, RCPT and messages refused with 4xx or 5xx",
                                ["stage"], registry=r)
        self.replies = Counter("relay_smtp_replies", "SMTP replies sent (in) and received (out), by class",
                               ["direction", "class"], registry=r)
        self.tls = Counter("relay_tls_sessions", "SMTP sessions that used TLS, inbound and outbound",
                           ["direction"], registry=r)
        self.deliveries = Counter("relay_deliveries", "Outcomes of delivery attempts, per recipient",
                                  ["result"], registry=r)
        self.expired = Counter("relay_recipients_expired", "Recipients given up after max_lifetime", registry=r)
        self.dsn = Counter("relay_dsn", "Delivery status notifications spooled", ["action"], registry=r)
        self.finished = Counter("relay_messages_finished", "Messages done and removed from the queue",
                                registry=r)
        self.queue_time = Histogram("relay_queue_time_seconds", "Time from arrival to delivery, per recipient",
                                    buckets=QUEUE_TIME_BUCKETS, registry=r)
        self.attempt_time = Histogram("relay_delivery_attempt_seconds",
                                      "Duration of one delivery attempt to one destination",
                                      buckets=ATTEMPT_BUCKETS, registry=r)
        self.outbound = Gauge("relay_outbound_connections", "Outbound SMTP connections open now", registry=r,
                              multiprocess_mode="livesum")
        self.connect_failures = Counter("relay_outbound_connect_failures", "Outbound connections that failed",
                                        registry=r)
        self.dns_lookups = Counter("relay_dns_lookups", "DNS lookups made (not answered from the cache)",
                                   registry=r)
        self.dns_failures = Counter("relay_dns_failures", "DNS lookups that failed", ["kind"], registry=r)
        self._reply_children = {
            (direction, digit): self.replies.labels(direction=direction, **{"class": f"{digit}xx"})
            for direction in (IN, OUT) for digit in range(1, 6)
        }
        self._handlers: dict[str, Callable[[dict], None]] = {
            "connect": self._connect,
            "disconnect": lambda e: self.sessions_open.dec(),
            "connection_refused": lambda e: self.sessions_refused.inc(),
            "accepted": self._accepted,
            "rejected": lambda e: self.rejected.labels(stage=str(e.get("stage", "-"))).inc(),
            "tls": lambda e: self.tls.labels(direction=OUT if e.get("direction") == OUT else IN).inc(),
            "delivered": self._delivered,
            "deferred": lambda e: self.deliveries.labels(result="deferred").inc(),
            "bounced": lambda e: self.deliveries.labels(result="bounced").inc(),
            "expired": lambda e: self.expired.inc(),
            "dsn": lambda e: self.dsn.labels(action=str(e.get("action", "-"))).inc(),
            "finished": lambda e: self.finished.inc(),
            "attempt": self._attempt,
            "connect_out": lambda e: self.outbound.inc(),
            "disconnect_out": lambda e: self.outbound.dec(),
            "connect_failed": lambda e: self.connect_failures.inc(),
            "dns_lookup": lambda e: self.dns_lookups.inc(),
            "dns_failure": lambda e: self.dns_failures.labels(
                kind="permanent" if e.get("permanent") else "transient").inc(),
        }
        for result in RESULTS:
            self.deliveries.labels(result=result)  # every result shows, at 0, from the start
        for direction in (IN, OUT):
            self.tls.labels(direction=direction)

    def observe(self, event: dict) -> None:
        """The log observer: count ``event`` when it has a stable name that maps to a metric."""
        handler = self._handlers.get(event.get("event", ""))  # type: ignore[arg-type]
        if handler is not None:
            try:
                handler(event)
            except Exception:
                pass  # a counter must never break logging

    def reply(self, direction: str, code: int) -> None:
        """Count one SMTP reply sent (``in``) or received (``out``)."""
        child = self._reply_children.get((direction, code // 100))
        if child is not None:
            child.inc()

    def _connect(self, event: dict) -> None:
        self.sessions.inc()
        self.sessions_open.inc()
        if event.get("tls"):
            self.tls.labels(direction=IN).inc()

    def _accepted(self, event: dict) -> None:
        self.accepted.inc()
        size = event.get("size")
        if isinstance(size, int) and size > 0:
            self.accepted_bytes.inc(size)

    def _delivered(self, event: dict) -> None:
        self.deliveries.labels(result="delivered").inc()
        delay = event.get("delay")
        if isinstance(delay, (int, float)) and delay >= 0:
            self.queue_time.observe(delay)

    def _attempt(self, event: dict) -> None:
        duration = event.get("duration")
        if isinstance(duration, (int, float)) and duration >= 0:
            self.attempt_time.observe(duration)


def reply_in(code: int) -> None:
    """The SMTP server sent a reply with ``code``."""
    if _active is not None:
        _active.reply(IN, code)


def reply_out(code: int) -> None:
    """The SMTP client received a reply with ``code``."""
    if _active is not None:
        _active.reply(OUT, code)


# -- the queue, at scrape time ---------------------------------------------------


class QueueCollector:
    """``relay_queue_messages{state}`` and ``relay_queue_oldest_message_seconds``, read from every part of the queue.

    Runs in the web server's thread (never on the reactor), one query per part.
    """

    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.clock = clock
        self._spools: dict[str, Any] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from relay.queue.ids import queue_id_time
        from relay.queue.partitions import part_directories
        from relay.queue.store import Spool

        now = self.clock()
        active = deferred = held = 0
        oldest: Optional[str] = None
        for directory in part_directories(self.directory):
            spool = self._spools.get(directory)
            if spool is None:
                spool = self._spools[directory] = Spool(directory)
            try:
                a, d, h, first = spool.state_counts(now)
            except Exception as e:
                log.warn("metrics: cannot read the queue in {directory}: {error}", directory=directory, error=e)
                continue
            active, deferred, held = active + a, deferred + d, held + h
            if first is not None and (oldest is None or first < oldest):
                oldest = first
        messages = GaugeMetricFamily("relay_queue_messages", "Messages in the queue, by state", labels=["state"])
        for state, count in (("active", active), ("deferred", deferred), ("held", held)):
            messages.add_metric([state], count)
        yield messages
        age = max(0.0, now - queue_id_time(oldest)) if oldest is not None else 0.0
        yield GaugeMetricFamily("relay_queue_oldest_message_seconds", "Age of the oldest queued message", value=age)


# -- the endpoint ----------------------------------------------------------------------


class _MetricsPage(resource.Resource):
    """``/metrics`` exactly, GET or HEAD: the registry in the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        from prometheus_client.twisted import MetricsResource

        self._inner = MetricsResource(registry)

    def render(self, request: Any) -> Any:
        if request.postpath not in ([], [b""]):
            return pages.notFound().render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return pages.errorPage(405, "Method Not Allowed", "Only GET is served here.").render(request)
        return self._inner.render(request)


def site(registry: CollectorRegistry) -> server.Site:
    """The web site of the endpoint: ``/metrics``, and 404 for every other path."""
    root = pages.notFound()
    root.putChild(b"metrics", _MetricsPage(registry))
    factory = server.Site(root)
    factory.noisy = False
    factory.displayTracebacks = False
    factory.log = lambda request: None  # type: ignore[method-assign]  # no access log: scrapes are routine
    return factory


class MetricsService(MultiService):
    """Counts while the relay runs (when ``metrics`` is given) and serves ``registry`` on ``listen``."""

    name = "metrics"

    def __init__(self, metrics: Optional[Metrics], multiproc_dir: str = "") -> None:
        super().__init__()
        self.metrics = metrics
        self.multiproc_dir = multiproc_dir  # the master's directory of the workers' files, removed at stop

    def startService(self) -> None:
        global _active
        if self.metrics is not None:
            globalLogPublisher.addObserver(self.metrics.observe)
            relay_log.count_events(self.metrics.observe)
            _active = self.metrics
        super().startService()

    def stopService(self) -> Any:
        global _active
        d = super().stopService()

        def stopped(result: Any) -> Any:
            global _active
            if self.metrics is not None:
                globalLogPublisher.removeObserver(self.metrics.observe)
                relay_log.count_events(None)
                if _active is self.metrics:
                    _active = None
            if self.multiproc_dir:
                shutil.rmtree(self.multiproc_dir, ignore_errors=True)
            return result

        return d.addBoth(stopped)


def _listen(service: MultiService, config: Any, reactor: Any, registry: CollectorRegistry) -> None:
    from relay.config import COMMAND_LINE
    from relay.services import Listener
    from relay.tap import _endpoint

    for index, description in enumerate(config.metrics.listen):
        endpoint = _endpoint(reactor, description, f"{config.source or COMMAND_LINE}: metrics.listen[{index}]")
        listener = Listener(description, endpoint, site(registry))
        listener.setName("metrics:" + description)
        listener.setServiceParent(service)


def add_metrics(relay: Any, reactor: Any) -> None:
    """A relay process: count its events when metrics are on, and serve them unless a master does."""
    config = relay.config
    in_worker = bool(relay.inherited) and bool(os.environ.get(MULTIPROC_ENV))  # a worker of a master that serves
    if not in_worker and not config.metrics.listen:
        return
    metrics = Metrics()
    service = MetricsService(metrics)
    if not in_worker:
        metrics.registry.register(QueueCollector(config.queue.directory))
        _listen(service, config, reactor, metrics.registry)
    relay.metrics = metrics
    service.setServiceParent(relay)


def add_master_metrics(master: Any, reactor: Any) -> Optional[str]:
    """The master of worker processes: serve the sum of the workers' metrics; the directory
    of their files (for the workers' environment), or None when metrics are off."""
    config = master.config
    if not config.metrics.listen:
        return None
    from prometheus_client import multiprocess

    directory = tempfile.mkdtemp(prefix="relay-metrics-")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    registry.register(QueueCollector(config.queue.directory))
    service = MetricsService(None, multiproc_dir=directory)
    _listen(service, config, reactor, registry)
    service.setServiceParent(master)
    return directory


def worker_ended(directory: str, pid: int) -> None:
    """Drop the open-session and connection gauges of a worker process that ended."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, directory)
    except OSError:
        pass
