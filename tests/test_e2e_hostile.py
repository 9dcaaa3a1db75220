"""End-to-end hostile clients: ``twistd -n relay`` against clients that flood, hoard sessions or never read.

The relay runs as a real process on loopback.  A raw socket that writes
commands without reading a reply must not grow the daemon's memory (its
VmRSS in /proc is read before and after); one address that opens more
sessions than it may gets 421 past its cap while a trusted client (another
loopback address, 127.0.0.2) still gets its 220; a client stuck on unread
replies does not hold up SIGTERM.  Every loop is bounded in bytes and in
time; nothing here waits on a timer of the relay.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Optional

from certs import make_certificate
from relayproc import RelayProcess, free_port, wait_until

TRUSTED_SOURCE = "127.0.0.2"
FLOOD_TOTAL = 64 * 1024 * 1024  # octets of commands the flooding client tries to write
FLOOD_TIME = 30.0  # seconds the flood may take at most
STALL = 2.0  # seconds without progress: the relay has stopped reading
RSS_GROWTH_BOUND = 64 * 1024 * 1024


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in octets, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def config(trusted: str = TRUSTED_SOURCE + "/32", extra: str = "") -> str:
    return (f'hostname = "relay.test"\n\n[server]\ntrusted_networks = ["{trusted}"]\n{extra}\n'
            f'[[routes]]\ndomains = ["*"]\nsmarthost = "127.0.0.1:{free_port()}"\n')


def read_reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One reply line (its first line is enough here), bounded in time."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n" not in data and len(data) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def flood(sock: socket.socket, total: int = FLOOD_TOTAL) -> int:
    """Write up to ``total`` octets of ``EHLO x`` lines, reading nothing; stop when the relay stops reading."""
    chunk = b"EHLO x\r\n" * 8192  # 64 KiB
    sent = 0
    sock.settimeout(STALL)
    deadline = time.monotonic() + FLOOD_TIME
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except (socket.timeout, BlockingIOError):
            break  # no progress for STALL seconds: the relay is not reading
    return sent


def warm_up(port: int) -> None:
    """One whole session, so the relay's lazy imports and caches are in place before measuring."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("warm.test")
        s.help()


def measure_flood(relay: RelayProcess, connect) -> tuple[int, int, int]:
    """(octets written, RSS before, RSS after) of one client flooding EHLO without reading."""
    warm_up(relay.port)
    before = rss(relay.proc.pid)
    sock = connect()
    try:
        sent = flood(sock)
        time.sleep(0.5)  # let the relay process what it has read before measuring
        after = rss(relay.proc.pid)
        # The relay still serves another client while the flooder is stuck.
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            assert s.noop()[0] == 250
    finally:
        sock.close()
    return sent, before, after


def flood_then_stop(name: str, relay: RelayProcess, connect) -> None:
    """Measure a flood (printing the figures), then stop the relay while another flooder is stuck."""
    sent, before, after = measure_flood(relay, connect)
    print(f"\n{name}: wrote {sent / 2**20:.1f} MiB without reading; relay RSS {before / 2**20:.1f} -> "
          f"{after / 2**20:.1f} MiB (growth {(after - before) / 2**20:.1f} MiB)")
    assert 0 < sent < FLOOD_TOTAL, "the relay kept reading"
    assert after - before < RSS_GROWTH_BOUND
    stuck = connect()
    flood(stuck, 8 * 2**20)
    try:
        assert relay.stop() == 0
    finally:
        stuck.close()


def test_rss_bounded_while_client_floods_without_reading(tmp_path: Path) -> None:
    """A client writing up to 64 MiB of EHLO without reading grows the relay's RSS by less than 64 MiB; SIGTERM still exits 0."""
    with RelayProcess(tmp_path, config()) as relay:
        def connect() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            assert read_reply(sock).startswith(b"220 ")
            return sock

        flood_then_stop("plain", relay, connect)


def test_rss_bounded_for_implicit_tls_flood(tmp_path: Path) -> None:
    """On an implicit-TLS listener the handshake works, a flood without reading is held, and SIGTERM still exits 0."""
    cert, key = make_certificate(tmp_path, "relay.test", ("127.0.0.1",))
    tls_port = free_port()
    relay = RelayProcess(tmp_path, config(), args=(
        "--listen", f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"))
    with relay:
        context = ssl.create_default_context(cafile=str(cert))

        def connect() -> socket.socket:
            raw = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
            sock = context.wrap_socket(raw, server_hostname="relay.test")
            assert read_reply(sock).startswith(b"220 ")
            return sock

        flood_then_stop("implicit TLS", relay, connect)


def no_session_open(relay: RelayProcess) -> None:
    """Wait (bounded) until every session the relay logged as connected has been logged as ended.

    The harness's readiness probe (one connection) is a session too, and
    the relay may accept it, and see its end, after the test's first
    connections.
    """
    def settled() -> bool:
        log = relay.log()
        return 0 < log.count("] connect from ") == log.count("] disconnect from ")
    wait_until(settled, what="the relay's sessions to end")


def open_sessions(port: int, count: int, source: Optional[str] = None) -> tuple[list[socket.socket], list[bytes]]:
    """Open ``count`` connections and read each greeting; the sockets stay open."""
    sockets, greetings = [], []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                        source_address=(source, 0) if source else None)
        sockets.append(sock)
        greetings.append(read_reply(sock))
    return sockets, greetings


def trusted_client_gets_in(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(TRUSTED_SOURCE, 0)) as s:
        assert s.ehlo("trusted.test")[0] == 250
        assert s.noop()[0] == 250


def test_one_address_over_its_cap_while_trusted_client_gets_in(tmp_path: Path) -> None:
    """An address opening 60 sessions gets 220 for 50 (the default cap) and 421 4.7.0 past it; a trusted client still gets 220."""
    with RelayProcess(tmp_path, config()) as relay:
        no_session_open(relay)
        sockets, greetings = open_sessions(relay.port, 60)
        try:
            assert [g[:4] for g in greetings] == [b"220 "] * 50 + [b"421 "] * 10
            assert greetings[-1] == b"421 4.7.0 relay.test Error: too many connections from 127.0.0.1\r\n"
            trusted_client_gets_in(relay.port)
        finally:
            for sock in sockets:
                sock.close()
        wait_until(lambda: relay.log().count(": 50 sessions from 127.0.0.1 already") == 10,
                   what="ten refusals in the log")


def test_sessions_reserved_for_trusted_clients(tmp_path: Path) -> None:
    """With max_sessions taken by untrusted clients up to the reserve, a trusted client still gets a session."""
    extra = "max_sessions = 20\nreserved_sessions = 2\nmax_sessions_per_client = 100\n"
    with RelayProcess(tmp_path, config(extra=extra)) as relay:
        no_session_open(relay)
        sockets, greetings = open_sessions(relay.port, 25)
        try:
            assert [g[:4] for g in greetings] == [b"220 "] * 18 + [b"421 "] * 7
            assert greetings[-1].startswith(b"421 4.7.0 relay.test Too many connections")
            trusted_client_gets_in(relay.port)
        finally:
            for sock in sockets:
                sock.close()
