"""End to end: the metrics endpoint and the JSON log of a real ``twistd -n relay`` after real traffic.

A twisted.names DNS server on loopback serves the zone; an aiosmtpd server
is the MX of every domain and answers RCPT by the local part (``defer*``:
451, ``bounce*``: 550, anything else: 250); smtplib submits; the endpoint
is scraped over a real socket and parsed with prometheus_client's own
parser.  Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import ssl
import re
import signal
import smtplib
import threading
import urllib.error
import urllib.request
from typing import Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from certs import make_certificate
from dnsserver import start_dns_server
from relayproc import RelayProcess, free_port, wait_until
from smtpsink import SMTPSink
from test_e2e_workers import serving, start, worker_pids  # noqa: F401  (start: the workers' fixture)

MX = "127.0.0.52"
ZONE = {
    "dest.test": {"MX": [[10, "mx.dest.test"]]},
    "sender.test": {"MX": [[10, "mx.dest.test"]]},
    "mx.dest.test": {"A": [MX]},
}
MESSAGE_EVENTS = ("accepted", "delivered", "deferred", "bounced", "retry", "dsn", "finished", "attempt", "expired")


def rcpt_reply(address: str) -> Optional[str]:
    if address.startswith("defer"):
        return "451 4.3.0 try again later"
    if address.startswith("bounce"):
        return "550 5.1.1 no such mailbox"
    return None


def relay_config(port: int, dns_port: int, metrics_port: int, log: str, server: str = "") -> str:
    return f'''
hostname = "relay.test"
[server]
{server}
[queue]
min_retry = "1h"
max_retry = "2h"
[delivery]
port = {port}
nameservers = ["127.0.0.1:{dns_port}"]
[metrics]
listen = ["tcp:{metrics_port}:interface=127.0.0.1"]
[log]
{log}
[[routes]]
domains = ["blocked.test"]
reject = "no mail for this domain"
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """DNS, one MX sink, and a relay with metrics and a JSON log; each stopped by PID."""
    tmp = tmp_path_factory.mktemp("metrics-world")
    dns_port, stop_dns = start_dns_server(ZONE, tmp)
    request.addfinalizer(stop_dns)
    port = free_port(MX)
    mx_cert, mx_key = make_certificate(tmp, "mx.dest.test", (MX,))
    offered = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    offered.load_cert_chain(mx_cert, mx_key)
    sink = SMTPSink(MX, port, rcpt_reply=rcpt_reply, tls_context=offered).start()  # offers STARTTLS
    request.addfinalizer(sink.stop)
    metrics_port = free_port()
    cert, key = make_certificate(tmp, "relay.test", ("127.0.0.1",))
    tls = f'tls_certificate = "{cert}"\ntls_key = "{key}"'
    relay = RelayProcess(tmp / "relay", relay_config(port, dns_port, metrics_port, 'format = "json"', tls))
    request.addfinalizer(relay.kill)
    relay.start()
    return {"relay": relay, "sink": sink, "metrics_port": metrics_port, "port": port, "dns_port": dns_port,
            "tmp": tmp}


def submit(port: int, recipients: list[str], sender: str = "someone@sender.test", tls: bool = False) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        if tls:
            s.starttls(context=ssl._create_unverified_context())
            s.ehlo("client.test")
        s.sendmail(sender, recipients, b"Subject: hello\r\n\r\nhello\r\n")


def refused(port: int, recipient: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("someone@sender.test")
        code, _ = s.rcpt(recipient)
        s.rset()
    return code


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape, parsed by prometheus_client, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def json_lines(relay: RelayProcess) -> list[dict]:
    return [json.loads(line) for line in relay.log().splitlines() if line.strip()]


def events(relay: RelayProcess, name: str) -> list[dict]:
    return [r for r in json_lines(relay) if r["event"] == name]


@pytest.fixture(scope="module")
def traffic(world):
    """Accepted (delivered, deferred, bounced), and a recipient refused at RCPT; waits until all are logged."""
    relay = world["relay"]
    submit(relay.port, ["alice@dest.test"], tls=True)
    submit(relay.port, ["defer-bob@dest.test"])
    submit(relay.port, ["bounce-carol@dest.test"])
    code = refused(relay.port, "dave@blocked.test")
    assert code == 550
    wait_until(lambda: events(relay, "delivered") and events(relay, "deferred") and events(relay, "bounced")
               and events(relay, "dsn"), what="the three outcomes in the log")
    # The failure notice to someone@sender.test goes to the same sink and is delivered.
    wait_until(lambda: len(events(relay, "delivered")) >= 2, what="the notification's delivery")
    return world


def test_scrape_shows_the_traffic(traffic) -> None:
    """After real traffic, /metrics reports sessions, accepted, rejected, each delivery result and the queue."""
    s = samples(scrape(traffic["metrics_port"]))
    assert s[("relay_messages_accepted_total", ())] == 3
    assert s[("relay_messages_rejected_total", (("stage", "rcpt"),))] == 1
    assert s[("relay_smtp_sessions_total", ())] == 5  # four clients and the start-up probe
    assert s[("relay_deliveries_total", (("result", "delivered"),))] == 2  # alice and the notification
    assert s[("relay_deliveries_total", (("result", "deferred"),))] == 1
    assert s[("relay_deliveries_total", (("result", "bounced"),))] == 1
    assert s[("relay_dsn_total", (("action", "failed"),))] == 1
    assert s[("relay_queue_messages", (("state", "deferred"),))] == 1  # defer-bob, due in an hour
    assert s[("relay_queue_messages", (("state", "held"),))] == 0
    assert s[("relay_queue_oldest_message_seconds", ())] > 0
    assert s[("relay_queue_time_seconds_count", ())] == 2
    assert s[("relay_delivery_attempt_seconds_count", ())] >= 4
    assert s[("relay_smtp_replies_total", (("class", "5xx"), ("direction", "in")))] == 1
    assert s[("relay_smtp_replies_total", (("class", "2xx"), ("direction", "in")))] > 0
    assert s[("relay_smtp_replies_total", (("class", "4xx"), ("direction", "out")))] == 1
    assert s[("relay_smtp_replies_total", (("class", "5xx"), ("direction", "out")))] == 1
    assert s[("relay_dns_lookups_total", ())] >= 2  # dest.test and mx.dest.test, then the cache
    assert s[("relay_tls_sessions_total", (("direction", "in"),))] == 1  # alice's client used STARTTLS
    assert s[("relay_tls_sessions_total", (("direction", "out"),))] >= 1  # the MX offers STARTTLS
    assert s[("relay_messages_accepted_bytes_total", ())] > 0


def established_to(host: str, port: int) -> int:
    """TCP connections established to ``host:port`` on this machine (Linux /proc/net/tcp)."""
    remote = "".join(f"{int(octet):02X}" for octet in reversed(host.split("."))) + f":{port:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for row in rows if row[2] == remote and row[3] == "01")


def test_sessions_and_connections_are_counted_while_open(traffic) -> None:
    """Once the clients are gone no session is open, and the outbound gauge matches the relay's connections to the MX."""
    port = traffic["metrics_port"]
    wait_until(lambda: samples(scrape(port))[("relay_smtp_sessions_open", ())] == 0, what="sessions closed")
    assert established_to(MX, traffic["port"]) >= 1  # kept open, idle, in the pool
    wait_until(lambda: samples(scrape(port))[("relay_outbound_connections", ())]
               == established_to(MX, traffic["port"]), what="the outbound gauge to match the open connections")


def test_other_paths_and_methods_are_refused(world) -> None:
    """Only GET /metrics is served: other paths answer 404, other methods 405."""
    port = world["metrics_port"]
    for path in ("/", "/other", "/metrics/more", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            scrape(port, path)
        assert caught.value.code == 404, path
    post = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(post, timeout=10)
    assert caught.value.code == 405


def test_json_log_lines_parse_and_carry_the_queue_id(traffic) -> None:
    """Every log line is one JSON object with time, level and event; every line about a message has its queue id."""
    relay = traffic["relay"]
    lines = json_lines(relay)
    assert lines
    for record in lines:
        assert {"time", "level", "event", "message"} <= set(record), record
    ids = {r["queue_id"] for r in events(relay, "accepted")}
    assert len(ids) == 3
    for record in lines:
        if record["event"] in MESSAGE_EVENTS or any(queue_id in record["message"] for queue_id in ids):
            assert record.get("queue_id"), record
    accepted = events(relay, "accepted")[0]
    assert accepted["client"].startswith("[127.0.0.1]:") and accepted["sender"] == "someone@sender.test"
    delivered = [r for r in events(relay, "delivered") if r["recipient"] == "alice@dest.test"][0]
    assert delivered["attempt"] == 1 and delivered["delay"] >= 0 and delivered["reply"].startswith("250")
    assert events(relay, "connect") and events(relay, "rejected")[0]["stage"] == "rcpt"


def test_no_factory_lines_and_no_debug_lines_at_info(traffic) -> None:
    """Twisted's "Starting factory" lines are gone, and DNS lookups (debug) are not logged at level info."""
    text = traffic["relay"].log()
    assert "Starting factory" not in text and "Stopping factory" not in text
    assert not events(traffic["relay"], "dns_lookup")
    assert {r["level"] for r in json_lines(traffic["relay"])} <= {"info", "warn", "error", "critical"}


def test_level_filter_drops_lines_but_not_counts(world) -> None:
    """At level "error" the accepted line is not logged, yet the metrics count the message."""
    metrics_port = free_port()
    relay = RelayProcess(world["tmp"] / "quiet", relay_config(
        world["port"], world["dns_port"], metrics_port, 'level = "error"'))
    with relay:
        submit(relay.port, ["erin@dest.test"])
        wait_until(lambda: samples(scrape(metrics_port)).get(("relay_deliveries_total", (("result", "delivered"),)))
                   == 1, what="the delivery counted")
        assert samples(scrape(metrics_port))[("relay_messages_accepted_total", ())] == 1
        relay.stop()
    text = relay.log()
    assert "accepted from" not in text and "#info]" not in text and "#debug]" not in text


def test_debug_level_logs_dns_lookups(world) -> None:
    """At level "debug" the DNS lookups are logged."""
    relay = RelayProcess(world["tmp"] / "verbose", relay_config(
        world["port"], world["dns_port"], free_port(), 'level = "debug"'))
    with relay:
        submit(relay.port, ["frank@dest.test"])
        wait_until(lambda: "DNS lookup of dest.test" in relay.log(), what="the DNS lookup line")
        relay.stop()


def test_workers_one_scrape_shows_the_whole_relay(start) -> None:
    """With two workers the master's /metrics is the sum of both, and a killed worker's counts stay in it."""
    metrics_port = free_port()
    with SMTPSink() as sink:
        relay = start(sink.port, extra=f'[metrics]\nlisten = ["tcp:{metrics_port}:interface=127.0.0.1"]\n')
        threads = [threading.Thread(target=lambda c=c: [submit(relay.port, [f"u{c}.{i}@dest.test"])
                                                       for i in range(2)]) for c in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        sink.wait_for(20, timeout=60)
        delivered = ("relay_deliveries_total", (("result", "delivered"),))
        queued = (("relay_queue_messages", (("state", "active"),)), ("relay_queue_messages", (("state", "deferred"),)))

        def delivered_and_removed() -> bool:
            # A message leaves the queue a moment after its delivery is counted (removals share a commit).
            now = samples(scrape(metrics_port))
            return now.get(delivered) == 20 and sum(now.get(key, 0) for key in queued) == 0

        wait_until(delivered_and_removed, what="20 deliveries counted and the queue empty")
        s = samples(scrape(metrics_port))
        log = relay.log()
        served = [len(re.findall(rf"\[worker-{i} relay\.smtp\.server#info\] \w+: accepted from", log)) for i in (0, 1)]
        assert sum(served) == 20 and s[("relay_messages_accepted_total", ())] == 20
        assert s[("relay_queue_messages", (("state", "active"),))] + s[("relay_queue_messages", (("state", "deferred"),))] == 0
        old = worker_pids(relay)[1]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: worker_pids(relay).get(1, old) != old and serving(relay), what="worker-1 started again")
        after = samples(scrape(metrics_port))
        assert after[("relay_messages_accepted_total", ())] == 20
        assert after[("relay_smtp_sessions_open", ())] == 0
        assert relay.stop() == 0
