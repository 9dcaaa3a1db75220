"""Tests for relay.control: the AMP commands, the control service and the blocking client.

The commands run between a real AMP client and the ControlProtocol over
twisted.test.iosim against a fake scheduler; the tool's blocking client is
checked for wire compatibility by feeding its bytes to the server protocol
over StringTransport.  The end-to-end path (a real ``twistd -n relay`` and
``relay-queue flush`` as processes) runs at the end of this file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from deferreds import failure_of, no_result, success
from relay.control import (
    BadQueueId,
    ControlError,
    ControlFactory,
    ControlProtocol,
    ControlService,
    DaemonAlreadyRunning,
    DaemonError,
    DaemonNotRunning,
    Flush,
    Forget,
    Reschedule,
    box_length,
    call,
    decode_answer,
    encode_request,
    remove_stale_socket,
    socket_path,
)
from relay.control import probe as control_probe
from relay.envelope import Envelope, Recipient
from relay.queue.store import Spool


QID = "08DolYlYPhpza6mt"


class FakeScheduler:
    """Records the calls the control protocol makes; answers like the real scheduler."""

    def __init__(self, count: Any = 3, error: Optional[Exception] = None) -> None:
        self.calls: list[tuple] = []
        self.count = count
        self.error = error

    def flush(self, domain: Optional[str] = None, subdomains: bool = False) -> Any:
        self.calls.append(("flush", domain, subdomains))
        if self.error is not None:
            raise self.error
        return self.count

    def reschedule(self, queue_id: str) -> None:
        self.calls.append(("reschedule", queue_id))
        if self.error is not None:
            raise self.error

    def forget(self, queue_id: str) -> None:
        self.calls.append(("forget", queue_id))


def connected(scheduler: FakeScheduler) -> tuple[amp.AMP, iosim.IOPump]:
    client, _server, pump = iosim.connectedServerAndClient(lambda: ControlProtocol(scheduler), amp.AMP)
    return client, pump


def call_remote(client: amp.AMP, command: type[amp.Command], **arguments: Any) -> defer.Deferred:
    """callRemote, with the result taken before AMP's last-resort errback sees it (as a real caller does)."""
    result: defer.Deferred = defer.Deferred()
    client.callRemote(command, **arguments).addBoth(
        lambda r: result.errback(r) if isinstance(r, Failure) else result.callback(r)
    )
    return result


def ask(scheduler: FakeScheduler, command: type[amp.Command], **arguments: Any) -> defer.Deferred:
    client, pump = connected(scheduler)
    d = call_remote(client, command, **arguments)
    pump.flush()
    return d


# -- the commands over AMP ------------------------------------------------------------


def test_flush_calls_scheduler_and_answers_count() -> None:
    """Flush without a domain calls scheduler.flush(domain=None, subdomains=False) and answers its count."""
    scheduler = FakeScheduler(count=7)
    assert success(ask(scheduler, Flush, subdomains=False)) == {"count": 7}
    assert scheduler.calls == [("flush", None, False)]


def test_flush_passes_domain_and_subdomains() -> None:
    """Flush with a domain and subdomains passes both to the scheduler."""
    scheduler = FakeScheduler(count=1)
    assert success(ask(scheduler, Flush, domain="Example.ORG", subdomains=True)) == {"count": 1}
    assert scheduler.calls == [("flush", "Example.ORG", True)]


def test_flush_waits_for_a_deferred_count() -> None:
    """A scheduler answering with a Deferred is answered once it fires."""
    pending: defer.Deferred = defer.Deferred()
    scheduler = FakeScheduler(count=pending)
    client, pump = connected(scheduler)
    d = call_remote(client, Flush)
    pump.flush()
    no_result(d)
    pending.callback(4)
    pump.flush()
    assert success(d) == {"count": 4}


def test_reschedule_and_forget_call_the_scheduler() -> None:
    """Reschedule and Forget call scheduler.reschedule / scheduler.forget with the queue id."""
    scheduler = FakeScheduler()
    assert success(ask(scheduler, Reschedule, queue_id=QID)) == {}
    assert success(ask(scheduler, Forget, queue_id=QID)) == {}
    assert scheduler.calls == [("reschedule", QID), ("forget", QID)]


@pytest.mark.parametrize("command", [Reschedule, Forget])
def test_invalid_queue_id_is_refused_before_the_scheduler(command: type[amp.Command]) -> None:
    """A queue id that cannot name an entry answers BadQueueId and never reaches the scheduler."""
    scheduler = FakeScheduler()
    failure = failure_of(ask(scheduler, command, queue_id="../../etc/passwd"))
    failure.trap(BadQueueId)
    assert scheduler.calls == []


def test_scheduler_error_text_never_reaches_the_peer() -> None:
    """An exception in the scheduler answers AMP's generic error, without its text."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        scheduler = FakeScheduler(error=RuntimeError("secret path /var/lib/x"))
        failure = failure_of(ask(scheduler, Reschedule, queue_id=QID))
    finally:
        globalLogPublisher.removeObserver(events.append)
    failure.trap(amp.UnknownRemoteError)
    assert "secret" not in str(failure.value)
    assert any(e.get("log_failure") is not None and e["log_failure"].check(RuntimeError) for e in events)


def test_garbage_on_the_socket_drops_the_connection_only() -> None:
    """Bytes that are not AMP close that connection without raising."""
    protocol = ControlFactory(FakeScheduler()).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"\x00\x05hello\xff\xff" + b"x" * 10)
    protocol.dataReceived(b"\x00\x00")
    assert transport.disconnecting or transport.value() == b""


# -- the blocking client's wire form ------------------------------------------------------


def exchange(scheduler: FakeScheduler, request: bytes) -> bytes:
    """Feed ``request`` to a ControlProtocol over StringTransport; its answer bytes."""
    protocol = ControlProtocol(scheduler)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(request)
    return transport.value()


def test_client_request_is_understood_by_the_server() -> None:
    """encode_request produces a box the AMP server answers, and decode_answer reads the answer."""
    scheduler = FakeScheduler(count=12)
    answer = exchange(scheduler, encode_request(Flush, {"domain": "a.test", "subdomains": True}))
    assert box_length(answer) == len(answer)
    assert decode_answer(Flush, answer) == {"count": 12}
    assert scheduler.calls == [("flush", "a.test", True)]


def test_client_omits_an_absent_domain() -> None:
    """A flush without a domain reaches the scheduler as domain None."""
    scheduler = FakeScheduler()
    decode_answer(Flush, exchange(scheduler, encode_request(Flush, {"domain": None, "subdomains": False})))
    assert scheduler.calls == [("flush", None, False)]


def test_error_answer_becomes_daemon_error() -> None:
    """An error answer is a DaemonError carrying the code and description."""
    answer = exchange(FakeScheduler(), encode_request(Forget, {"queue_id": "bad/id"}))
    with pytest.raises(DaemonError) as info:
        decode_answer(Forget, answer)
    assert info.value.code == "BAD_QUEUE_ID"


def test_box_length_waits_for_a_complete_box() -> None:
    """box_length is None for every proper prefix of a box and the box length once complete."""
    box = encode_request(Reschedule, {"queue_id": QID})
    for end in range(len(box)):
        assert box_length(box[:end]) is None
    assert box_length(box + b"\x00\x01") == len(box)


def test_unreadable_answer_is_a_control_error() -> None:
    """An answer that is neither _answer nor _error is a ControlError, not a crash."""
    with pytest.raises(ControlError):
        decode_answer(Flush, amp.AmpBox({b"x": b"y"}).serialize())


# -- the client against real UNIX sockets (no daemon, stale, silent) ---------------------


def unix_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_call_without_socket_is_daemon_not_running(tmp_path: Path) -> None:
    """With no socket file, call raises DaemonNotRunning naming the directory and socket."""
    with pytest.raises(DaemonNotRunning) as info:
        call(str(tmp_path), Flush)
    assert str(info.value) == (
        f"no relay daemon is running for {tmp_path} (cannot connect to {tmp_path}/control.sock)"
    )


def test_call_with_stale_socket_is_daemon_not_running(tmp_path: Path) -> None:
    """A socket file left by a dead process reads as no daemon running."""
    unix_listener(tmp_path / "control.sock").close()
    assert (tmp_path / "control.sock").exists()
    with pytest.raises(DaemonNotRunning):
        call(str(tmp_path), Flush)


def test_call_is_bounded_when_the_daemon_never_answers(tmp_path: Path) -> None:
    """A peer that accepts but never answers ends the call after the timeout with one line."""
    with unix_listener(tmp_path / "control.sock"):
        with pytest.raises(ControlError) as info:
            call(str(tmp_path), Flush, timeout=0.2)
    assert "did not answer within 0.2 s" in str(info.value)


def test_remove_stale_socket(tmp_path: Path) -> None:
    """A dead socket file is removed, a live one raises DaemonAlreadyRunning, none is left alone."""
    path = str(tmp_path / "control.sock")
    assert remove_stale_socket(path) is False
    unix_listener(Path(path)).close()
    assert remove_stale_socket(path) is True
    assert not os.path.lexists(path)
    with unix_listener(Path(path)):
        with pytest.raises(DaemonAlreadyRunning):
            remove_stale_socket(path)


# -- the service -------------------------------------------------------------------------


def test_service_listens_on_the_spool_socket_with_mode_0600(tmp_path: Path) -> None:
    """startService replaces a stale socket and listens on <queue>/control.sock, mode 0600, with the scheduler."""
    unix_listener(tmp_path / "control.sock").close()
    reactor, scheduler = MemoryReactor(), FakeScheduler()
    service = ControlService(str(tmp_path), scheduler, reactor)
    service.privilegedStartService()
    service.startService()
    [(address, factory, _backlog, mode, _pid)] = reactor.unixServers
    assert address == socket_path(str(tmp_path)) == str(tmp_path / "control.sock")
    assert mode == 0o600
    assert not (tmp_path / "control.sock").exists()  # the stale file is gone
    assert factory.buildProtocol(None).scheduler is scheduler
    assert service.port is not None
    success(defer.maybeDeferred(service.stopService))
    assert service.port is None


def test_service_refuses_a_second_daemon_on_the_spool(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """privilegedStartService exits 1 with one line when a live daemon answers on the socket."""
    with unix_listener(tmp_path / "control.sock"):
        service = ControlService(str(tmp_path), FakeScheduler(), MemoryReactor())
        with pytest.raises(SystemExit) as info:
            service.privilegedStartService()
    assert info.value.code == 1
    assert capfd.readouterr().err == (
        f"relay: another relay daemon is running on the queue {tmp_path} (it answers on {tmp_path}/control.sock)\n"
    )


def test_service_runs_on_when_it_cannot_listen(tmp_path: Path) -> None:
    """A directory that cannot hold the socket is logged; startService does not raise."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    service = ControlService(str(blocker / "q"), FakeScheduler(), MemoryReactor())
    service.startService()
    assert service.port is None
    assert service.running


def test_real_scheduler_has_the_methods_control_calls() -> None:
    """relay.queue.scheduler.Scheduler provides flush, reschedule and forget."""
    from relay.queue.scheduler import Scheduler

    for name in ("flush", "reschedule", "forget"):
        assert callable(getattr(Scheduler, name, None)), name


# -- the real socket under a real reactor, in a process ---------------------------------------

CONTROL_DAEMON = """
import sys
from twisted.internet import reactor
from relay.control import ControlService

class Scheduler:
    def flush(self, domain=None, subdomains=False):
        print("flush", domain, subdomains, flush=True)
        return 5
    def reschedule(self, queue_id):
        print("reschedule", queue_id, flush=True)
    def forget(self, queue_id):
        print("forget", queue_id, flush=True)

service = ControlService(sys.argv[1], Scheduler(), reactor)
service.privilegedStartService()
service.startService()
reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
reactor.run()
"""


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"control process exited with {proc.returncode}")
        if path.exists() and control_probe(str(path)):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {path} after {timeout} s")


def test_tool_reaches_a_control_service_over_its_unix_socket(tmp_path_factory: pytest.TempPathFactory) -> None:
    """relay-queue flush, hold and release reach a ControlService on a real reactor and socket."""
    from relayproc import relay_env

    directory = tmp_path_factory.mktemp("cs")
    spool = Spool(str(directory), clock=global_reactor, runner=lambda f, *args: defer.maybeDeferred(f, *args))
    spool.recover()
    message = spool.new_message()
    message.write(b"Subject: x\r\n\r\nbody\r\n")
    envelope = Envelope(queue_id=message.queue_id, sender="", recipients=(Recipient("u@a.test"),))
    assert success(message.commit(envelope)) == message.queue_id
    proc = subprocess.Popen(
        [sys.executable, "-c", CONTROL_DAEMON, str(directory)],
        env=relay_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for_socket(directory / "control.sock", proc)
        assert stat.S_IMODE((directory / "control.sock").stat().st_mode) == 0o600
        flushed = relay_queue("--queue", str(directory), "flush")
        assert (flushed.returncode, flushed.stdout, flushed.stderr) == (0, "flush: 5 messages scheduled\n", "")
        held = relay_queue("--queue", str(directory), "hold", message.queue_id)
        assert (held.returncode, held.stdout, held.stderr) == (0, f"{message.queue_id}: held\n", "")
        released = relay_queue("--queue", str(directory), "release", message.queue_id)
        assert (released.returncode, released.stderr) == (0, "")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=15)
    assert output.splitlines() == ["flush None False", f"forget {message.queue_id}", f"reschedule {message.queue_id}"]
    assert not (directory / "control.sock").exists()


# -- end to end: twistd -n relay and relay-queue as processes ------------------------------


def relay_queue(*args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    from relayproc import relay_env

    return subprocess.run(
        [sys.executable, "-m", "relay.cli.queue", *args],
        cwd=cwd, env=relay_env(), capture_output=True, text=True, timeout=30,
    )


def send_one(port: int) -> str:
    """Hand the relay one message with smtplib; its queue id."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("app@origin.test")
        client.rcpt("user@dest.test")
        code, reply = client.data(b"Subject: held\r\n\r\nbody\r\n")
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def test_flush_reaches_a_running_daemon_and_fails_without_one(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Against twistd -n relay: flush exits 0 and hold reaches the daemon; once it stopped, flush exits 1 with one line."""
    from relayproc import RelayProcess, free_port, wait_until

    config = f'hostname = "relay.test"\n\n[[routes]]\ndomains = ["*"]\nsmarthost = "127.0.0.1:{free_port()}"\n'
    workdir = tmp_path_factory.mktemp("ctl")
    stale = workdir / "relay-queue" / "control.sock"
    stale.parent.mkdir()
    unix_listener(stale).close()  # left behind by a crashed daemon
    relay = RelayProcess(workdir, config).start()
    try:
        sock = relay.queue_dir / "control.sock"
        # The SMTP port can answer before the control service has replaced the stale socket.
        wait_until(lambda: "control: listening on" in relay.log(), what="the control socket")
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        done = relay_queue("--queue", str(relay.queue_dir), "flush")
        assert done.returncode == 0, done.stderr + relay.log()
        assert re.fullmatch(r"flush: \d+ messages? scheduled\n", done.stdout)
        assert done.stderr == ""
        queue_id = send_one(relay.port)
        held = relay_queue("--queue", str(relay.queue_dir), "hold", queue_id)
        assert (held.returncode, held.stdout, held.stderr) == (0, f"{queue_id}: held\n", "")
        assert Spool(str(relay.queue_dir)).load(queue_id).held is True
        running = relay_queue("--queue", str(relay.queue_dir), "--json", "list")
        assert [m["id"] for m in json.loads(running.stdout)] == [queue_id]
    finally:
        status = relay.stop()
    assert status == 0
    assert not (relay.queue_dir / "control.sock").exists()
    assert f"{queue_id}: forgotten on request of relay-queue" in relay.log()
    done = relay_queue("flush", "--queue", "relay-queue", cwd=workdir)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        "relay-queue: no relay daemon is running for relay-queue (cannot connect to relay-queue/control.sock)\n"
    )
