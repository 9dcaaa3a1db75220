"""End to end: one destination that never greets cannot hold up mail for the others.

A twisted.names DNS server on loopback serves two domains: stalled.test,
whose MX accepts TCP connections and never says a word, and healthy.test,
whose MX is an aiosmtpd sink.  The relay (``twistd -n relay``) gets 150
messages for the first and then 10 for the second over smtplib; the 10 must
arrive while the 150 still wait for a greeting that never comes (its
timeout is 300 s), and the silent MX must never see more connections than
``per_destination`` allows.
"""

from __future__ import annotations

import smtplib
import socket
import threading

import pytest

from dnsserver import start_dns_server
from relayproc import RelayProcess, free_port, wait_until
from smtpsink import SMTPSink

STALLED_IP = "127.0.0.9"
HEALTHY_IP = "127.0.0.2"
PER_DESTINATION = 5

ZONE = {
    "stalled.test": {"MX": [[10, "mx.stalled.test"]]},
    "mx.stalled.test": {"A": [STALLED_IP]},
    "healthy.test": {"MX": [[10, "mx.healthy.test"]]},
    "mx.healthy.test": {"A": [HEALTHY_IP]},
}


class SilentServer:
    """Accepts TCP connections and never sends a byte (a tar pit); counts and holds them."""

    def __init__(self, host: str, port: int) -> None:
        self.listener = socket.create_server((host, port))
        self.listener.settimeout(0.2)
        self.accepted: list[socket.socket] = []
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "SilentServer":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted.append(conn)
            self.peak = max(self.peak, len(self.accepted))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.listener.close()


@pytest.fixture
def world(tmp_path, request):
    dns_port, stop_dns = start_dns_server(ZONE, tmp_path)
    request.addfinalizer(stop_dns)
    port = free_port(HEALTHY_IP)
    sink = SMTPSink(HEALTHY_IP, port).start()
    request.addfinalizer(sink.stop)
    silent = SilentServer(STALLED_IP, port).start()
    request.addfinalizer(silent.stop)
    relay = RelayProcess(tmp_path / "relay", f'''
hostname = "relay.test"
[delivery]
port = {port}
nameservers = ["127.0.0.1:{dns_port}"]
concurrency = 50
per_destination = {PER_DESTINATION}
''')
    request.addfinalizer(relay.kill)  # SIGKILL: the stalled attempts would hold a graceful stop
    relay.start()
    return relay, sink, silent


def submit(port: int, domain: str, count: int) -> None:
    """``count`` messages over one smtplib session, each acknowledged with 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example.org")
        for i in range(count):
            s.sendmail("app@client.example.org", [f"user{i}@{domain}"],
                       f"Subject: {domain} {i}\r\n\r\nbody {i}\r\n".encode())


def test_healthy_destination_delivers_while_another_never_greets(world):
    """10 messages for a healthy MX arrive while 150 queued before them wait on an MX that never greets."""
    relay, sink, silent = world
    submit(relay.port, "stalled.test", 150)
    wait_until(lambda: silent.peak >= PER_DESTINATION, timeout=30, what="connections to the silent MX")
    submit(relay.port, "healthy.test", 10)
    # The greeting timeout toward the silent MX is 300 s: without isolation
    # nothing for healthy.test could arrive before it.
    arrived = sink.wait_for(10, timeout=60)
    assert sorted(r for m in arrived for r in m.recipients) == sorted(f"user{i}@healthy.test" for i in range(10))
    assert silent.peak == PER_DESTINATION, "the silent MX got more connections than per_destination"
