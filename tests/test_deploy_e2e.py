"""The relay as a system service, end to end: socket activation, privilege drop, SIGHUP.

Each test starts a real ``twistd -n relay`` and delivers a message through
it over loopback to an aiosmtpd sink (the smart host of a route):

* socket activation: the listening socket is handed over as descriptor 3
  with ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` (by
  ``tests/socketactivation.py``, which execs twistd so the pid matches, and
  by Debian's ``systemd-socket-activate`` where it is installed), with one
  process and with worker processes;
* ``--uid/--gid`` (the tests run as root): the spool belongs to that user
  and the process has no root identity left;
* SIGHUP re-reads the routes of the running daemon.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from relayproc import REPO, RelayProcess, free_port, relay_env, wait_until
from smtpsink import SMTPSink
from socketactivation import launcher_command, listening_socket

MESSAGE = b"From: app@example.org\r\nTo: user@example.net\r\nSubject: deploy\r\n\r\nbody\r\n"


def route_to(sink: SMTPSink, domain: str = "example.net") -> str:
    return f'''
hostname = "relay.test"
[[routes]]
domains = ["{domain}"]
smarthost = ["[{sink.host}]:{sink.port}"]
'''


def send(host: str, port: int, recipient: str = "user@example.net") -> None:
    """Submit one message; the connection may wait in the listen backlog until the relay accepts."""
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("client.example.org")
        s.sendmail("app@example.org", [recipient], MESSAGE)


@pytest.fixture
def sink() -> Iterator[SMTPSink]:
    with SMTPSink("127.0.0.1") as s:
        yield s


def _activated(tmp_path: Path, config: str, sock: socket.socket, domain: str = "INET") -> RelayProcess:
    port = sock.getsockname()[1]
    return RelayProcess(tmp_path, config, port=port, listen=f"systemd:domain={domain}:index=0",
                        launcher=launcher_command([sock.fileno()], ["smtp"]), pass_fds=[sock.fileno()])


def test_socket_activated_relay_delivers(tmp_path: Path, sink: SMTPSink) -> None:
    """A relay started with a listening socket on fd 3 (LISTEN_PID = its pid) accepts and delivers on it."""
    sock = listening_socket("127.0.0.1")
    relay = _activated(tmp_path, route_to(sink), sock)
    try:
        relay.start()
        sock.close()  # only the relay holds it now
        send("127.0.0.1", relay.port)
        [received] = sink.wait_for(1)
        assert received.recipients == ["user@example.net"]
        assert b"Subject: deploy" in received.data
        log = relay.log()
        assert "listening on systemd:domain=INET:index=0" in log
        assert "delivered" in log
        assert relay.stop() == 0
    finally:
        relay.kill()
        sock.close()


def test_socket_activated_ipv6_socket_keeps_client_addresses(tmp_path: Path, sink: SMTPSink) -> None:
    """An INET6 socket from systemd (ListenStream=25 where IPv6 is on) read as INET6: ::1 is trusted and relays."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        sock = listening_socket("::1")
    except OSError as e:
        pytest.skip(f"cannot listen on ::1: {e}")
    relay = _activated(tmp_path, route_to(sink), sock, domain="INET6")
    relay.host = "::1"
    try:
        relay.start()
        send("::1", relay.port)
        sink.wait_for(1)
        assert "connect from [::1]:" in relay.log()
        assert relay.stop() == 0
    finally:
        relay.kill()
        sock.close()


def test_socket_of_another_family_stops_start_up(tmp_path: Path) -> None:
    """domain=INET for an INET6 socket would garble client addresses: start-up stops with one line naming the key."""
    try:
        sock = listening_socket("::1")
    except OSError as e:
        pytest.skip(f"cannot listen on ::1: {e}")
    relay = _activated(tmp_path, "", sock, domain="INET")
    try:
        relay.proc = subprocess.Popen(
            relay.command(), cwd=relay.workdir, env=relay_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=relay.pass_fds)
        assert relay.proc.wait(60) == 2
        output = relay.proc.stdout.read().decode()
        assert "server.listen[0]: 'systemd:domain=INET:index=0' cannot be used: " in output
        assert "systemd passed an AF_INET6 socket (write domain=INET6" in output
        assert output.count("\n") == 1
    finally:
        relay.kill()
        sock.close()


def test_socket_activated_workers_share_the_socket(tmp_path: Path, sink: SMTPSink) -> None:
    """With [server] workers = 2 the master adopts systemd's socket and hands it to its workers, which deliver."""
    sock = listening_socket("127.0.0.1")
    relay = _activated(tmp_path, route_to(sink).replace('hostname = "relay.test"',
                                                       'hostname = "relay.test"\n[server]\nworkers = 2'), sock)
    try:
        relay.start()
        sock.close()
        wait_until(lambda: relay.log().count("control: listening") >= 2, 60, "two workers listening")
        for n in range(4):
            send("127.0.0.1", relay.port, f"user{n}@example.net")
        sink.wait_for(4)
        log = relay.log()
        assert "workers: starting 2 worker processes" in log
        assert "[worker-0 " in log and "[worker-1 " in log
        assert relay.stop() == 0
    finally:
        relay.kill()
        sock.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed (Debian package systemd)")
def test_systemd_socket_activate_starts_the_relay(tmp_path: Path, sink: SMTPSink) -> None:
    """systemd's own activator binds the port, starts twistd on the first connection, and the relay delivers."""
    port = free_port()
    launcher = [shutil.which("systemd-socket-activate"), "-l", f"127.0.0.1:{port}", "--fdname=smtp",
                "-E", f"PYTHONPATH={relay_env()['PYTHONPATH']}", "-E", "PYTHONDONTWRITEBYTECODE=1"]
    relay = RelayProcess(tmp_path, route_to(sink), port=port, listen="systemd:domain=INET:index=0",
                         launcher=launcher)
    try:
        relay.start()
        send("127.0.0.1", port)
        sink.wait_for(1)
        wait_until(lambda: "delivered" in relay.log(), 20, "the delivery line")
        assert relay.stop() == 0
    finally:
        relay.kill()


# -- --uid / --gid ---------------------------------------------------------------------


def _unprivileged() -> tuple[str, str, int, int]:
    try:
        user = pwd.getpwnam("nobody")
        group = grp.getgrgid(user.pw_gid)
    except KeyError:
        pytest.skip("no user nobody on this machine")
    return user.pw_name, group.gr_name, user.pw_uid, group.gr_gid


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A working directory another user can enter (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="relay-deploy-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_uid_gid_leave_spool_owned_by_that_user_and_no_root(shared_dir: Path, sink: SMTPSink) -> None:
    """Started as root with --uid/--gid, the relay binds, then runs and writes its spool as that user only."""
    user, group, uid, gid = _unprivileged()
    os.chown(shared_dir, uid, gid)
    shared_dir.chmod(0o755)
    relay = RelayProcess(shared_dir, route_to(sink), twistd_args=["--uid", user, "--gid", group])
    try:
        relay.start()
        send("127.0.0.1", relay.port)
        sink.wait_for(1)
        status = Path(f"/proc/{relay.proc.pid}/status").read_text()
        ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()
               if line.startswith(("Uid:", "Gid:", "Groups:"))}
        assert ids["Uid"] == [str(uid)] * 4  # real, effective, saved, file system
        assert ids["Gid"] == [str(gid)] * 4
        assert "0" not in ids["Groups"]
        queue = relay.queue_dir
        for path in [queue, *queue.iterdir()]:
            info = path.lstat()
            assert (info.st_uid, info.st_gid) == (uid, gid), path
        assert (queue / "queue.db").exists()
        assert relay.stop() == 0
    finally:
        relay.kill()


# -- SIGHUP ------------------------------------------------------------------------------


def test_sighup_reloads_routes_of_the_running_relay(tmp_path: Path) -> None:
    """After the file routes the domain elsewhere, SIGHUP makes the same daemon deliver there; a bad file changes nothing."""
    import signal

    with SMTPSink("127.0.0.1") as first, SMTPSink("127.0.0.1") as second:
        relay = RelayProcess(tmp_path, route_to(first))
        try:
            relay.start()
            pid = relay.proc.pid
            send("127.0.0.1", relay.port, "one@example.net")
            first.wait_for(1)

            relay.config_path.write_text(route_to(first) + "\n[[routes]]\ndomains = [\n")
            relay.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "the routes in use stay as they were" in relay.log(), 20, "the refused reload")
            send("127.0.0.1", relay.port, "two@example.net")
            first.wait_for(2)

            relay.config_path.write_text(route_to(second).replace('"relay.test"', '"renamed.test"'))
            relay.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reload: 1 route(s) from" in relay.log(), 20, "the reload")
            send("127.0.0.1", relay.port, "three@example.net")
            [received] = second.wait_for(1)
            assert received.recipients == ["three@example.net"]
            assert len(first.messages) == 2
            assert relay.proc.poll() is None and relay.proc.pid == pid
            assert "reload: hostname changed in" in relay.log()
            assert relay.stop() == 0
        finally:
            relay.kill()


def test_sighup_to_the_master_reloads_every_worker(tmp_path: Path) -> None:
    """With [server] workers = 2, SIGHUP to the master reaches both workers, and each delivers by the new routes."""
    import signal

    workers = 'hostname = "relay.test"\n[server]\nworkers = 2'
    with SMTPSink("127.0.0.1") as first, SMTPSink("127.0.0.1") as second:
        relay = RelayProcess(tmp_path, route_to(first).replace('hostname = "relay.test"', workers))
        try:
            relay.start()
            wait_until(lambda: relay.log().count("control: listening") >= 2, 60, "two workers listening")
            relay.config_path.write_text(route_to(second).replace('hostname = "relay.test"', workers))
            relay.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: relay.log().count("reload: 1 route(s) from") >= 2, 30, "both workers reloading")
            log = relay.log()
            assert "[worker-0 relay.reload#info] reload: 1 route(s)" in log
            assert "[worker-1 relay.reload#info] reload: 1 route(s)" in log
            for n in range(4):
                send("127.0.0.1", relay.port, f"user{n}@example.net")
            second.wait_for(4)
            assert first.messages == []
            assert relay.stop() == 0
        finally:
            relay.kill()


# -- the layout of relay.socket: SMTP, submission with STARTTLS, implicit TLS -----------------


@pytest.mark.parametrize("workers", [1, 2])
def test_smtp_submission_and_implicit_tls_on_passed_sockets(tmp_path: Path, sink: SMTPSink, workers: int) -> None:
    """Three passed sockets as relay.socket orders them: plain SMTP, submission (STARTTLS, AUTH) and
    systemd-ssl: submission (TLS from the first byte, AUTH); each accepts a message that is delivered."""
    import ssl

    from certs import make_certificate
    from test_e2e_submission import PASSWORD, relay_passwd

    cert, key = make_certificate(tmp_path, "relay.test", ("127.0.0.1",))
    users = tmp_path / "users"
    relay_passwd(users, "alice", PASSWORD)
    sockets = [listening_socket("127.0.0.1") for _ in range(3)]
    smtp_port, submission_port, implicit_port = (s.getsockname()[1] for s in sockets)
    config = route_to(sink).replace('hostname = "relay.test"', f'''hostname = "relay.test"
[server]
workers = {workers}
tls_certificate = "{cert}"
tls_key = "{key}"
auth_users = "{users}"
listen = ["systemd:domain=INET:index=0"]
submission_listen = ["systemd:domain=INET:index=1",
                     "systemd-ssl:domain=INET:index=2:privateKey={key}:certKey={cert}"]''')
    fds = [s.fileno() for s in sockets]
    relay = RelayProcess(tmp_path, config, port=smtp_port, listen="",
                         launcher=launcher_command(fds, ["smtp", "submission", "submissions"]), pass_fds=fds)
    try:
        relay.start()
        for s in sockets:
            s.close()
        wait_until(lambda: relay.log().count("control: listening") >= workers, 60, "the relay listening")
        context = ssl.create_default_context(cafile=str(cert))
        with smtplib.SMTP("127.0.0.1", submission_port, timeout=30) as c:
            c.starttls(context=context)
            c.login("alice", PASSWORD)
            c.sendmail("app@example.org", ["starttls@example.net"], MESSAGE)
        with smtplib.SMTP_SSL("127.0.0.1", implicit_port, timeout=30, context=context) as c:
            assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
            c.login("alice", PASSWORD)
            c.sendmail("app@example.org", ["implicit@example.net"], MESSAGE)
        send("127.0.0.1", smtp_port, "plain@example.net")
        received = {r.recipients[0]: r.data.decode() for r in sink.wait_for(3)}
        assert sorted(received) == ["implicit@example.net", "plain@example.net", "starttls@example.net"]
        assert "with ESMTPSA" in received["implicit@example.net"]
        assert "with ESMTPSA" in received["starttls@example.net"]
        assert "with ESMTP " in received["plain@example.net"]
        assert relay.stop() == 0
    finally:
        relay.kill()
        for s in sockets:
            s.close()
