"""End-to-end: ``[server] workers = 2`` under twistd, with smtplib clients and an aiosmtpd smart host.

The master binds the listener and starts two worker processes; each owns
its part of the queue.  These tests follow mail through both, kill a worker
and the master with SIGKILL, stop with SIGTERM, and use relay-queue on the
whole queue.  Worker pids come from the master's log; every process is
ended by its pid.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import pytest

from relayproc import RelayProcess, free_port, relay_env, wait_until
from smtpsink import SMTPSink

REPO = Path(__file__).resolve().parent.parent
_STARTED = re.compile(r"workers: worker-(\d+) started \(pid (\d+)\)")


def config(sink_port: int, min_retry: str = "1h", extra: str = "") -> str:
    return f'''
hostname = "relay-w.test"
{extra}

[server]
workers = 2

[queue]
min_retry = "{min_retry}"
max_retry = "2h"

[[routes]]
domains = ["*"]
smarthost = "127.0.0.1:{sink_port}"
'''


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """The latest pid of each worker, from the master's log."""
    pids: dict[int, int] = {}
    for index, pid in _STARTED.findall(relay.log()):
        pids[int(index)] = int(pid)
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is not serving
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def serving(relay: RelayProcess) -> bool:
    """Both workers have started their listener."""
    log = relay.log()
    return all(f"[worker-{i} relay.queue.scheduler#info] queue:" in log for i in (0, 1))


@pytest.fixture
def start(tmp_path: Path, request) -> Callable[..., RelayProcess]:
    """Start a two-worker relay in this test's directory; every process it started is killed at the end."""

    def start_relay(sink_port: int, args: tuple[str, ...] = (), **kw) -> RelayProcess:
        relay = RelayProcess(tmp_path / "relay", config(sink_port, **kw), args=args)

        def end() -> None:
            pids = worker_pids(relay)
            relay.kill()
            for pid in pids.values():
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)

        request.addfinalizer(end)
        relay.start()
        wait_until(lambda: serving(relay), what=f"both workers serving\n{relay.log()[-3000:]}")
        return relay

    return start_relay


def send(port: int, n: int, tag: str) -> str:
    """One message; the queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.origin.test")
        s.mail("app@origin.test")
        s.rcpt(f"user{n}@dest.test")
        code, reply = s.data(f"From: app@origin.test\r\nMessage-ID: <{tag}.{n}@origin.test>\r\n\r\nbody {n}\r\n".encode())
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[-1]


def relay_queue(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli.queue", "--queue", str(relay.queue_dir), *args],
                          capture_output=True, text=True, timeout=60, env=relay_env(), cwd=REPO)


def message_ids(sink: SMTPSink) -> list[str]:
    with sink.lock:
        return [re.search(rb"Message-ID: (<[^>]+>)", m.data).group(1).decode() for m in sink.messages]


def test_mail_from_twenty_clients_is_served_by_both_workers_and_delivered_once(start):
    """Twenty concurrent clients: both workers accept mail, and every message reaches the smart host exactly once."""
    with SMTPSink() as sink:
        relay = start(sink.port)
        ids: list[str] = []
        lock = threading.Lock()

        def client(c: int) -> None:
            for i in range(5):
                queue_id = send(relay.port, c * 5 + i, "twenty")
                with lock:
                    ids.append(queue_id)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(set(ids)) == 100
        sink.wait_for(100, timeout=60)
        wait_until(lambda: relay_queue(relay, "list", "--json").stdout.strip() == "[]", what="an empty queue")
        assert sorted(message_ids(sink)) == sorted(f"<twenty.{n}@origin.test>" for n in range(100))
        log = relay.log()
        served = {i: len(re.findall(rf"\[worker-{i} relay\.smtp\.server#info\] \w+: accepted from", log)) for i in (0, 1)}
        assert served[0] > 0 and served[1] > 0 and served[0] + served[1] == 100, served


def test_killed_worker_is_restarted_and_its_queued_mail_delivered_once(start):
    """kill -9 of a worker with mail queued in both parts: it is started again, and after a flush
    relay-queue's whole-queue view empties and every message arrives once."""
    sink_port = free_port()
    relay = start(sink_port)  # nothing listens on sink_port yet: every message is deferred
    queued = [send(relay.port, n, "killed") for n in range(30)]
    parts = {0: relay.queue_dir, 1: relay.queue_dir / "worker-1"}

    def deferred_everywhere() -> Optional[list]:
        out = relay_queue(relay, "list", "--json")
        entries = [] if out.returncode else __import__("json").loads(out.stdout)
        done = len(entries) == 30 and all(r["attempts"] >= 1 for m in entries for r in m["recipients"])
        return entries if done else None

    entries = wait_until(deferred_everywhere, timeout=60, what=f"30 deferred messages\n{relay.log()[-3000:]}")
    assert sorted(m["id"] for m in entries) == sorted(queued)
    assert all((parts[i] / "queue.db").exists() for i in parts)
    old = worker_pids(relay)[1]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: worker_pids(relay).get(1, old) != old and serving(relay),
               what=f"worker-1 started again\n{relay.log()[-3000:]}")
    assert re.search(r"worker-1 exited \(signal 9\)", relay.log())
    with SMTPSink(port=sink_port) as sink:
        def delivered() -> bool:
            if len(message_ids(sink)) < 30:
                relay_queue(relay, "flush")
                return False
            return True

        wait_until(delivered, timeout=60, what=f"30 deliveries\n{relay.log()[-3000:]}")
        wait_until(lambda: relay_queue(relay, "list", "--json").stdout.strip() == "[]", what="an empty queue")
        assert sorted(message_ids(sink)) == sorted(f"<killed.{n}@origin.test>" for n in range(30))


def test_sigterm_stops_every_worker_and_exits_zero(start):
    """SIGTERM to the master stops both workers and the master exits with status 0."""
    with SMTPSink() as sink:
        relay = start(sink.port)
        send(relay.port, 1, "term")
        sink.wait_for(1)
        pids = worker_pids(relay)
        assert relay.stop() == 0
        assert not any(alive(pid) for pid in pids.values())
        assert "workers: worker-0 stopped" in relay.log() and "workers: worker-1 stopped" in relay.log()


def test_sigkill_of_the_master_leaves_no_worker_serving(start):
    """kill -9 of the master: the workers notice and stop, so no orphan keeps serving."""
    with SMTPSink() as sink:
        relay = start(sink.port)
        pids = worker_pids(relay)
        relay.kill()
        wait_until(lambda: not any(alive(pid) for pid in pids.values()), timeout=20, what="the workers to stop")


def test_implicit_tls_listener_is_served_by_the_workers(tmp_path: Path, start) -> None:
    """An ssl: listener bound by the master is served with TLS by the workers it was handed to."""
    import ssl

    from certs import make_certificate

    cert, key = make_certificate(tmp_path, "relay-w.test", ips=("127.0.0.1",))
    tls_port = free_port()
    with SMTPSink() as sink:
        start(sink.port, args=("--listen", f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"))
        context = ssl.create_default_context(cafile=str(cert))
        with smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=20, context=context) as s:
            s.ehlo("client.origin.test")
            s.sendmail("app@origin.test", ["tls@dest.test"], b"Message-ID: <tls.1@origin.test>\r\n\r\nover TLS\r\n")
        sink.wait_for(1)
        assert message_ids(sink) == ["<tls.1@origin.test>"]
