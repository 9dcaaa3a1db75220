"""Tests for the inbound server's limits against hostile clients: reply flow control, sessions per
client address and connection rate, the reserve for trusted clients, command and DATA deadlines and
AUTH failures per address; over StringTransport with a fake clock."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import tempfile
import time
import tomllib
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase as TrialTestCase

from relay.config import Config, ServerConfig, config_from_mapping
from relay.config_values import ConfigError
from relay.smtp import replies as R
from relay.policy import RelayPolicy
from relay.smtp.flow import ReplyThrottle, pending_output
from relay.smtp import limits
from relay.smtp.limits import AuthFailures, ConnectionRate, SessionCounts, client_key
from relay.smtp.factory import SMTPServerFactory
from relay.smtp.output import CLOSE_GRACE, MAX_PENDING_REPLIES

from test_server import (
    PLAIN_BAD, PLAIN_OK, TRANSACTION, FakeSpool, RecordingTransport, Session, code, make_factory, make_portal,
    spool_of,
)

UNTRUSTED = "192.0.2.7"
EHLO_REPLY_FLOOD = b"EHLO x\r\n" * 20_000  # about 4 MiB of replies


def peer(host: str = UNTRUSTED, port: int = 40000) -> Any:
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


def opened(factory: SMTPServerFactory, host: str = UNTRUSTED) -> Session:
    return Session(factory, peer(host))


def greeting_code(s: Session) -> str:
    return code(s.read())


def load_config_text(text: str, source: str) -> Config:
    return config_from_mapping(tomllib.loads(text), source)


# -- reply flow control ------------------------------------------------------------------------


class BackedUpTransport(RecordingTransport):
    """A transport whose peer reads nothing until ``drain``: it accounts output as Twisted's TCP transport does.

    Past ``bufferSize`` octets unsent it pauses a registered streaming
    producer; ``drain`` hands everything to the peer and resumes it.
    """

    bufferSize = 65536

    def __init__(self, peer: Any) -> None:
        super().__init__(peer)
        self.unsent = 0
        self.most_unsent = 0
        self.paused_producer = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unsent += len(data)
        self.most_unsent = max(self.most_unsent, self.unsent)
        if self.producer is not None and self.streaming and self.unsent > self.bufferSize:
            self.paused_producer = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.unsent = 0
        if self.producer is not None and self.paused_producer:
            self.paused_producer = False
            self.producer.resumeProducing()


def backed_up_session(**config: Any) -> tuple[Session, BackedUpTransport]:
    """A session whose client does not read, greeting consumed."""
    factory = make_factory(**config)
    s = Session.__new__(Session)
    s.factory = factory
    s.transport = BackedUpTransport(peer())
    s.proto = factory.buildProtocol(None)
    s.proto._output._throttle = ReplyThrottle(s.proto._output._backed_up, s.proto._output._drained,
                                              pending=lambda t: t.unsent)
    s.proto.makeConnection(s.transport)
    s.read()
    s.transport.unsent = 0
    return s, s.transport


def test_replies_collected_in_one_read_are_written_in_bounded_pieces() -> None:
    """Replies to one read of many pipelined commands go out in writes of about MAX_PENDING_REPLIES, not one large buffer."""
    s = Session(make_factory(), peer())
    s.read()
    sizes: list[int] = []
    write = s.transport.write
    s.transport.write = lambda data: (sizes.append(len(data)), write(data))  # type: ignore[method-assign]
    s.proto.dataReceived(b"HELP\r\n" * 5000)
    assert s.read() == R.HELP_REPLY.to_bytes() * 5000
    assert len(sizes) > 1
    assert max(sizes) < MAX_PENDING_REPLIES + len(R.HELP_REPLY.to_bytes())


def test_client_not_reading_stops_input_until_replies_drain() -> None:
    """Past the transport's buffer the session stops reading; when the client reads, it resumes and answers in order."""
    s, transport = backed_up_session()
    s.proto.dataReceived(EHLO_REPLY_FLOOD)
    assert transport.producerState == "paused" and s.proto.paused
    answered = s.read().count(b"250 ETRN\r\n")  # the last line of each EHLO reply
    assert 0 < answered < 2000
    rounds = 0
    while s.proto.paused and rounds < 1000:
        transport.drain()
        rounds += 1
    assert not s.proto.paused and transport.producerState == "producing"
    assert rounds > 10
    assert transport.most_unsent < 2 * MAX_PENDING_REPLIES + 65536
    assert answered + s.read().count(b"250 ETRN\r\n") == 20_000
    assert s.proto._buffer == b"" and not s.closed


def test_every_flooded_command_is_answered_once_in_order() -> None:
    """Through pauses and resumptions every pipelined command gets exactly one reply, in order."""
    s, transport = backed_up_session()
    commands = b"".join(b"NOOP\r\nHELP\r\n" for _ in range(10_000))
    s.proto.dataReceived(commands)
    for _ in range(1000):
        if not s.proto.paused:
            break
        transport.drain()
    out = s.read().decode()
    codes = [line[:3] for line in out.split("\r\n") if line[3:4] == " "]
    assert codes == ["250", "214"] * 10_000


def test_throttle_unregisters_once_output_drained() -> None:
    """The producer is registered only while output is backed up, so a session that keeps up writes directly."""
    s, transport = backed_up_session()
    s.proto.dataReceived(b"NOOP\r\n")
    assert transport.producer is None  # nothing was waiting: no producer
    s.proto.dataReceived(EHLO_REPLY_FLOOD[:8 * 2000])
    assert transport.producer is not None
    while s.proto.paused:
        transport.drain()
    transport.drain()
    s.proto.dataReceived(b"NOOP\r\n")
    assert transport.producer is None


def test_throttle_released_before_starttls() -> None:
    """STARTTLS unregisters the producer and resumes reading, so the TLS handshake is never held up."""
    context = object()
    s, transport = backed_up_session(tls_context=context)
    s.proto.dataReceived(b"EHLO x\r\n" * 400 + b"STARTTLS\r\n")
    assert transport.tls_started == [context]
    assert transport.producer is None
    assert not s.proto.paused and transport.producerState == "producing"


def test_close_releases_throttle_and_cuts_unread_connection() -> None:
    """A session closed with unread replies lets its producer go, and is cut after CLOSE_GRACE."""
    s, transport = backed_up_session(max_errors=10_000)
    s.proto.dataReceived(EHLO_REPLY_FLOOD[:8 * 2000] + b"QUIT\r\n")
    assert s.proto.paused
    s.proto.timeoutConnection()
    assert transport.producer is None and s.closed
    abort_calls: list[bool] = []
    transport.abortConnection = lambda: abort_calls.append(True)  # type: ignore[method-assign]
    s.factory.clock.advance(CLOSE_GRACE)
    assert abort_calls == [True]


def test_timeout_while_blocked_on_output() -> None:
    """A client that never reads its replies is closed after idle_timeout like an idle one."""
    s, transport = backed_up_session(idle_timeout=60)
    s.proto.dataReceived(EHLO_REPLY_FLOOD)
    assert s.proto.paused
    s.factory.clock.advance(60)
    assert s.closed
    assert R.idle_timeout("relay.test").to_bytes() in s.read()


# -- sessions per client, reserve, connection rate ----------------------------------------------


def test_sessions_per_client_capped() -> None:
    """Past max_sessions_per_client an address gets 421 4.7.0 naming it and is closed; others still get in."""
    factory = make_factory(max_sessions_per_client=3)
    first = [opened(factory) for _ in range(3)]
    assert [greeting_code(s) for s in first] == ["220 relay"] * 3
    fourth = opened(factory)
    assert fourth.read() == b"421 4.7.0 relay.test Error: too many connections from 192.0.2.7\r\n"
    assert fourth.closed
    fourth.proto.connectionLost(Failure(ConnectionError()))
    other = opened(factory, "192.0.2.8")
    assert greeting_code(other) == "220 relay"
    first[0].proto.connectionLost(Failure(ConnectionError()))
    assert greeting_code(opened(factory)) == "220 relay"
    assert factory.sessions == 4


def test_trusted_clients_exempt_from_per_client_cap() -> None:
    """A trusted address may open more than max_sessions_per_client (as Postfix exempts mynetworks)."""
    factory = make_factory(max_sessions_per_client=2, trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    assert [greeting_code(opened(factory)) for _ in range(5)] == ["220 relay"] * 5


def test_reserve_kept_for_trusted_clients() -> None:
    """Untrusted clients get at most max_sessions - reserved_sessions; trusted ones the rest."""
    factory = make_factory(max_sessions=5, reserved_sessions=2, max_sessions_per_client=50,
                           trusted_networks=(ipaddress.ip_network("198.51.100.0/24"),))
    untrusted = [opened(factory, f"192.0.2.{i}") for i in range(1, 5)]
    assert [greeting_code(s) for s in untrusted] == ["220 relay"] * 3 + ["421 4.7.0"]
    untrusted[3].proto.connectionLost(Failure(ConnectionError()))
    trusted = [opened(factory, "198.51.100.1") for _ in range(3)]
    assert [greeting_code(s) for s in trusted] == ["220 relay"] * 2 + ["421 4.7.0"]


def test_default_reserve_is_a_tenth() -> None:
    """Without reserved_sessions a tenth of max_sessions is kept for trusted clients."""
    assert ServerConfig(max_sessions=1000).session_reserve() == 100
    assert ServerConfig(max_sessions=5).session_reserve() == 0
    assert ServerConfig(max_sessions=5, reserved_sessions=3).session_reserve() == 3


def test_connection_rate_limited_per_address() -> None:
    """More than client_connection_rate_limit connections per time unit get 421 4.7.0; the bucket refills over time."""
    factory = make_factory(client_connection_rate_limit=4, client_rate_time_unit=60)
    codes = []
    for _ in range(5):
        s = opened(factory)
        codes.append(greeting_code(s))
        s.proto.connectionLost(Failure(ConnectionError()))
    assert codes == ["220 relay"] * 4 + ["421 4.7.0"]
    refused = opened(factory)
    assert refused.read() == (b"421 4.7.0 relay.test Error: too many connection attempts from 192.0.2.7,"
                              b" try again later\r\n")
    assert greeting_code(opened(factory, "192.0.2.9")) == "220 relay"
    factory.clock.advance(14)
    assert greeting_code(opened(factory)) == "421 4.7.0"
    factory.clock.advance(1)
    assert greeting_code(opened(factory)) == "220 relay"


def test_connection_rate_shared_by_listeners() -> None:
    """Connections to two listeners sharing one ClientLimits draw on one bucket per address."""
    first = make_factory(client_connection_rate_limit=2)
    second = SMTPServerFactory("relay.test", first.config, first.spool, first.policy, first.clock,
                               limits=first.limits)
    assert greeting_code(opened(first)) == "220 relay"
    assert greeting_code(opened(second)) == "220 relay"
    assert greeting_code(opened(second)) == "421 4.7.0"


def test_connection_rate_off_and_trusted_exempt() -> None:
    """A limit of 0 means no limit, and trusted clients are never rate limited."""
    factory = make_factory(client_connection_rate_limit=0)
    assert all(greeting_code(opened(factory)) == "220 relay" for _ in range(20))
    trusted = make_factory(client_connection_rate_limit=1, trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    assert all(greeting_code(opened(trusted)) == "220 relay" for _ in range(20))


def test_ipv4_mapped_counted_as_ipv4_and_ipv6_per_address() -> None:
    """::ffff:192.0.2.7 is the client 192.0.2.7; two IPv6 addresses in one /64 are two clients."""
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:0:0::1") == "2001:db8::1"
    factory = make_factory(max_sessions_per_client=1)
    assert greeting_code(opened(factory, "192.0.2.7")) == "220 relay"
    assert greeting_code(opened(factory, "::ffff:192.0.2.7")) == "421 4.7.0"
    assert greeting_code(opened(factory, "2001:db8::1")) == "220 relay"
    assert greeting_code(opened(factory, "2001:db8::2")) == "220 relay"


@pytest.mark.parametrize("make, add, table", [
    (lambda clock: ConnectionRate(10, 60, clock), "allow", "_buckets"),
    (lambda clock: AuthFailures(3, 60, clock), "failed", "_failures"),
], ids=["connection rate", "auth failures"])
def test_tables_stay_bounded(monkeypatch: Any, make: Any, add: str, table: str) -> None:
    """The per-address tables never exceed MAX_TRACKED and forget entries that limit nothing any more."""
    monkeypatch.setattr(limits, "MAX_TRACKED", 5000)
    clock = Clock()
    tracker = make(clock)
    for i in range(limits.MAX_TRACKED + 3000):
        getattr(tracker, add)(f"k{i}")
        assert len(tracker) <= limits.MAX_TRACKED
    clock.advance(60)  # every bucket is full again, every failure out of the window
    late = [f"late{i}" for i in range(limits.SWEEP_EVERY * 3)]
    for key in late:
        getattr(tracker, add)(key)
    assert sorted(getattr(tracker, table)) == sorted(late)


def test_session_counts_release() -> None:
    """Released sessions leave no per-client entry behind."""
    counts = SessionCounts(ServerConfig(max_sessions_per_client=2))
    assert counts.admit("a", False) is None and counts.admit("a", False) is None
    assert counts.admit("a", False) == "client sessions"
    counts.release("a")
    counts.release("a")
    assert counts.total == 0 and counts.of("a") == 0 and counts._per_client == {}


# -- deadlines ---------------------------------------------------------------------------------


def test_dripped_command_line_times_out() -> None:
    """A command line sent one byte every few seconds is closed idle_timeout after the last complete line."""
    s = opened(make_factory(idle_timeout=60))
    s.read()
    clock = s.factory.clock
    for byte in b"EHLO slow.example.test":
        s.proto.dataReceived(bytes([byte]))
        clock.advance(3)
        if s.closed:
            break
    assert s.closed
    assert s.read() == R.idle_timeout("relay.test").to_bytes()
    assert clock.seconds() - 1_700_000_000.0 == pytest.approx(60, abs=3)


def test_complete_lines_restart_the_timer() -> None:
    """Each complete command line gives the next one a whole idle_timeout."""
    s = opened(make_factory(idle_timeout=60))
    s.read()
    for _ in range(5):
        s.factory.clock.advance(50)
        assert code(s.send(b"NOOP\r\n")) == "250 2.0.0"
    assert not s.closed


def test_slow_data_stream_times_out() -> None:
    """DATA at one byte per second (under min_data_rate) times out although bytes keep coming; the message is aborted."""
    s = opened(make_factory(idle_timeout=60, min_data_rate=500))
    s.read()
    s.send(b"EHLO c.test\r\n" + TRANSACTION)
    clock = s.factory.clock
    for _ in range(120):
        s.proto.dataReceived(b"x")
        clock.advance(1)
        if s.closed:
            break
    assert s.closed and code(s.read()) == "421 4.4.2"
    assert spool_of(s).messages[0].state == "aborted"
    assert clock.seconds() - 1_700_000_000.0 < 62


def test_data_at_min_rate_continues_past_timeout() -> None:
    """A DATA stream that keeps min_data_rate may take longer than idle_timeout in all, and is accepted."""
    s = opened(make_factory(idle_timeout=60, min_data_rate=500))
    s.read()
    s.send(b"EHLO c.test\r\n" + TRANSACTION)
    line = b"y" * 598 + b"\r\n"  # 600 octets a second
    for _ in range(200):
        assert s.send(line) == b""
        s.factory.clock.advance(1)
    assert not s.closed
    assert code(s.send(b".\r\n")) == "250 2.0.0"


def test_data_deadline_never_exceeds_timeout() -> None:
    """However much was sent, a DATA stream that stops is closed idle_timeout later at most."""
    s = opened(make_factory(idle_timeout=60, min_data_rate=500))
    s.read()
    s.send(b"EHLO c.test\r\n" + TRANSACTION)
    s.send((b"z" * 998 + b"\r\n") * 1000)  # a million octets: 2000 s earned, capped at 60
    s.factory.clock.advance(59.9)
    assert not s.closed
    s.factory.clock.advance(0.1)
    assert s.closed


def test_end_of_data_restarts_the_timeout() -> None:
    """After the end of data the next command has a whole idle_timeout, however little DATA had left."""
    s = opened(make_factory(idle_timeout=60, min_data_rate=500))
    s.read()
    s.send(b"EHLO c.test\r\n" + TRANSACTION)
    s.factory.clock.advance(59)
    assert code(s.send(b".\r\n")) == "250 2.0.0"
    s.factory.clock.advance(59)
    assert not s.closed
    s.factory.clock.advance(1)
    assert s.closed


def test_min_data_rate_config() -> None:
    """min_data_rate must be a positive integer in the config file."""
    assert load_config_text("[server]\nmin_data_rate = 200\n", "r.toml").server.min_data_rate == 200
    with pytest.raises(ConfigError, match=r"r.toml: server.min_data_rate: 0 is out of range"):
        load_config_text("[server]\nmin_data_rate = 0\n", "r.toml")


# -- AUTH failures per address -----------------------------------------------------------------


def auth_factory(**config: Any) -> SMTPServerFactory:
    return make_factory(portal=make_portal(), auth_in_clear=True, **config)


def auth_session(factory: SMTPServerFactory, host: str = UNTRUSTED) -> Session:
    s = opened(factory, host)
    s.read()
    s.send(b"EHLO c.test\r\n")
    return s


def fail_twice(factory: SMTPServerFactory, host: str = UNTRUSTED) -> None:
    s = auth_session(factory, host)
    for _ in range(2):
        s.send(PLAIN_BAD)
        factory.clock.advance(1)
        assert code(s.read()) == "535 5.7.8"


def test_auth_failures_limited_across_sessions() -> None:
    """After auth_failure_limit failures from one address in any sessions, AUTH gets 454 4.7.0 after the delay, even with the right password."""
    factory = auth_factory(auth_failure_limit=4, auth_failure_window=300)
    fail_twice(factory)
    fail_twice(factory)
    s = auth_session(factory)
    assert s.send(PLAIN_OK) == b""
    factory.clock.advance(1)
    assert s.read() == b"454 4.7.0 Error: too many authentication failures from your address, try again later\r\n"
    assert s.proto.auth_user == "" and not s.closed
    assert code(s.send(b"AUTH LOGIN\r\n")) == ""  # answered after the delay, no challenge
    factory.clock.advance(1)
    assert code(s.read()) == "454 4.7.0"


def test_auth_limit_other_address_and_window() -> None:
    """Another address may still authenticate, and the blocked one may again once its failures leave the window."""
    factory = auth_factory(auth_failure_limit=2, auth_failure_window=300)
    fail_twice(factory)
    other = auth_session(factory, "192.0.2.99")
    assert code(other.send(PLAIN_OK)) == "235 2.7.0"
    blocked = auth_session(factory)
    assert blocked.send(PLAIN_OK) == b""
    factory.clock.advance(1)
    assert code(blocked.read()) == "454 4.7.0"
    factory.clock.advance(300)
    s = auth_session(factory)
    assert code(s.send(PLAIN_OK)) == "235 2.7.0"


def test_auth_limit_off() -> None:
    """auth_failure_limit = 0 turns the per-address limit off (the per-session limit stays)."""
    factory = auth_factory(auth_failure_limit=0)
    for _ in range(5):
        fail_twice(factory)
    s = auth_session(factory)
    assert code(s.send(PLAIN_OK)) == "235 2.7.0"


# -- configuration -----------------------------------------------------------------------------


def test_limit_keys_parsed_with_defaults() -> None:
    """The new [server] keys have safe defaults and are read from the file."""
    default = load_config_text("", "r.toml").server
    assert (default.max_sessions_per_client, default.client_connection_rate_limit, default.client_rate_time_unit,
            default.min_data_rate, default.auth_failure_limit, default.auth_failure_window) == (50, 300, 60.0, 500, 10, 300.0)
    server = load_config_text(
        "[server]\nmax_sessions_per_client = 5\nreserved_sessions = 7\nclient_connection_rate_limit = 0\n"
        'client_rate_time_unit = "2m"\nauth_failure_limit = 3\nauth_failure_window = "1h"\n', "r.toml").server
    assert (server.max_sessions_per_client, server.session_reserve(), server.client_connection_rate_limit,
            server.client_rate_time_unit, server.auth_failure_limit, server.auth_failure_window) == (5, 7, 0, 120.0, 3, 3600.0)


@pytest.mark.parametrize("text, message", [
    ("max_sessions_per_client = 0", r"server.max_sessions_per_client: 0 is out of range"),
    ("reserved_sessions = -1", r"server.reserved_sessions: -1 is out of range"),
    ("max_sessions = 10\nreserved_sessions = 10", r"server.reserved_sessions: 10 leaves no session for untrusted"),
    ("client_connection_rate_limit = \"many\"", r"server.client_connection_rate_limit: expected an integer"),
    ("client_rate_time_unit = 0", r"server.client_rate_time_unit: 0 must be a positive, finite duration"),
    ("auth_failure_window = \"soon\"", r"server.auth_failure_window: \"soon\" is not a duration"),
])
def test_limit_key_errors_name_file_and_key(text: str, message: str) -> None:
    """A bad limit is a one-line error naming the file and the key."""
    with pytest.raises(ConfigError, match="^r.toml: " + message):
        load_config_text("[server]\n" + text + "\n", "r.toml")


# -- real sockets ------------------------------------------------------------------------------


PER_SESSION_BOUND = 256 * 1024  # octets of unsent replies, and of unread input, one session may hold


class FloodLoopbackTests(TrialTestCase):
    """A raw client floods a server on a real loopback socket without reading, in clear and after STARTTLS."""

    def start(self, tls_context: Any = None) -> tuple[int, SMTPServerFactory]:
        from twisted.internet import reactor

        server = ServerConfig(trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),))
        factory = SMTPServerFactory("relay.test", server, FakeSpool(), RelayPolicy(server), reactor,
                                    tls_context=tls_context)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory

    def flood(self, port: int, starttls: bool) -> Deferred:
        """Connect, optionally STARTTLS, write EHLO lines until the server stops reading; fires with the socket."""
        from twisted.internet.threads import deferToThread

        def client() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220 ")
            if starttls:
                sock.sendall(b"EHLO c.test\r\n")
                while not reader.readline().startswith(b"250 "):
                    pass
                sock.sendall(b"STARTTLS\r\n")
                assert reader.readline().startswith(b"220 ")
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(sock, server_hostname="relay.test")
            sock.settimeout(1.0)
            chunk, sent, deadline = b"EHLO x\r\n" * 8192, 0, time.monotonic() + 20
            while sent < 16 * 2**20 and time.monotonic() < deadline:
                try:
                    sent += sock.send(chunk)
                except socket.timeout:
                    break
            assert sent < 16 * 2**20, "the server kept reading"
            return sock

        return deferToThread(client)

    def check_held(self, sock: socket.socket, factory: SMTPServerFactory) -> None:
        self.addCleanup(sock.close)
        [session] = factory._live
        self.assertTrue(session.paused)
        self.assertTrue(session._output.blocked)
        self.assertLess(pending_output(session.transport), PER_SESSION_BOUND)
        self.assertGreater(pending_output(session.transport), 0)
        self.assertLess(len(session._buffer), PER_SESSION_BOUND)

    def test_plain_flood_is_held(self) -> Deferred:
        """Over clear TCP the server stops reading, holding under 256 KiB of replies and of input."""
        port, factory = self.start()
        return self.flood(port, starttls=False).addCallback(self.check_held, factory)

    def test_flood_after_starttls_is_held(self) -> Deferred:
        """After STARTTLS the TLS handshake completes and a flood is held the same way."""
        from certs import tls_server_options

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        port, factory = self.start(tls_server_options(directory))

        def check(sock: socket.socket) -> None:
            self.check_held(sock, factory)
            [session] = factory._live
            self.assertTrue(session.tls)

        return self.flood(port, starttls=True).addCallback(check)


def test_timeout_shortened_under_load() -> None:
    """Past 80% of max_sessions open, a new session's lines must come within load_idle_timeout."""
    factory = make_factory(max_sessions=10, reserved_sessions=0, idle_timeout=300, load_idle_timeout=10)
    calm = [opened(factory, f"192.0.2.{i}") for i in range(1, 9)]
    assert factory.timeout() == 300
    loaded = opened(factory, "192.0.2.9")
    assert factory.timeout() == 10
    factory.clock.advance(10)
    assert loaded.closed and not calm[0].closed
    loaded.proto.connectionLost(Failure(ConnectionError()))
    assert factory.timeout() == 300
    calm[0].send(b"NOOP\r\n")
    factory.clock.advance(299)
    assert not calm[0].closed
    factory.clock.advance(1)
    assert calm[0].closed and calm[0].read().endswith(R.idle_timeout("relay.test").to_bytes())
