"""Benchmark: CPU per message of an inbound SMTP session, without disk or network.

Drives ``SMTPServerProtocol`` over a StringTransport, with the real relay
policy, the default server configuration and a spool whose commits fire at
once (nothing touches a disk), through N transactions of one message each
(MAIL, RCPT, DATA, the message, the end of data), as one pipelining client
would send them.  Prints microseconds per message; ``--profile`` prints the
top of a cProfile of the same loop.  This isolates the Python cost of the
protocol (parsing, policy, the Received header, the envelope, logging)
from everything the accept benchmark adds.

    .venv/bin/python bench/session_cpu.py [--messages N] [--size BYTES] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import address, defer  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogPublisher  # noqa: E402

from relay.config import ServerConfig  # noqa: E402
from relay.envelope import Envelope  # noqa: E402
from relay.policy import RelayPolicy  # noqa: E402
from relay.smtp.factory import SMTPServerFactory  # noqa: E402

MAX_MESSAGES = 200_000


class _Message:
    """An IncomingMessage that keeps nothing and commits at once."""

    count = 0

    def __init__(self) -> None:
        _Message.count += 1
        self.queue_id = f"{_Message.count:016d}"
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def commit(self, envelope: Envelope) -> defer.Deferred:
        envelope.to_json()  # the spool encodes every envelope it stores
        return defer.succeed(self.queue_id)

    def abort(self) -> None:
        pass


class _Spool:
    def new_message(self) -> _Message:
        return _Message()


def transaction(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog 0123456789.\r\n"
    body = line * max(1, size // len(line))
    return (b"MAIL FROM:<bench@example.org> SIZE=%d\r\nRCPT TO:<sink@example.net>\r\nDATA\r\n" % size
            + b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n" + body + b".\r\n")


def session(count: int, size: int) -> float:
    clock = Clock()
    clock.advance(1700000000)
    config = ServerConfig()
    factory = SMTPServerFactory("bench.relay.test", config, _Spool(), RelayPolicy(config), clock)
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=address.IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"EHLO bench.example.org\r\n")
    data = transaction(size)
    start = time.perf_counter()
    for _ in range(count):
        protocol.dataReceived(data)
        transport.clear()
    elapsed = time.perf_counter() - start
    protocol.connectionLost(None)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--log", action="store_true", help="keep a log observer (a file, as twistd has)")
    args = parser.parse_args()
    count = min(args.messages, MAX_MESSAGES)
    if args.log:
        from twisted.logger import textFileLogObserver

        sink = open("/dev/null", "w")
        globalLogPublisher.addObserver(textFileLogObserver(sink))
    session(200, args.size)  # warm up
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        elapsed = session(count, args.size)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    else:
        elapsed = session(count, args.size)
    print(f"messages={count} size={args.size}B {1e6 * elapsed / count:.1f} us per message (protocol only)")


if __name__ == "__main__":
    main()
