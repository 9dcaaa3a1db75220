"""Benchmark: the cost of DKIM signing, and how much of it the reactor feels.

Prints, for RSA-1024, RSA-2048 and Ed25519 keys and 4 KiB and 100 KiB
messages, the time dkimpy takes to sign one message (best of three rounds) (``Signer.sign_with``,
as the daemon calls it).  Then it runs a reactor with a 1 ms heartbeat and
signs ``--count`` messages (RSA-2048, 4 KiB) twice: in the signing thread
(``relay.dkim.SigningThread``), as the daemon does, and on the reactor thread itself, for contrast;
for each it prints the longest and the 99th-percentile gap between
heartbeats.  Bounded in count; no network.

    python bench/dkim_sign.py [--count 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cryptography.hazmat.primitives import serialization as s  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa  # noqa: E402

from relay.dkim import Signer, key_from_pem  # noqa: E402

HEADER = (b"Received: from app.example.org ([192.0.2.7])\r\n\tby relay.example.org (relay) with ESMTP id Q1;"
          b" Tue, 01 Dec 2026 10:00:00 +0000\r\nFrom: app@example.org\r\nTo: user@example.net\r\n"
          b"Subject: benchmark\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <b@example.org>\r\n\r\n")
LINE = b"The quick brown fox jumps over the lazy dog; the quick brown fox jumps over.\r\n"


def message(size: int) -> bytes:
    return HEADER + LINE * max(1, (size - len(HEADER)) // len(LINE))


def make_key(kind: str, bits: int = 2048):
    key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else rsa.generate_private_key(
        public_exponent=65537, key_size=bits)
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    return key_from_pem(pem, "example.org", "bench", "<memory>")


def per_message(signer: Signer, key, data: bytes, count: int) -> float:
    """Milliseconds per signature: the best of three rounds of ``count`` (the least disturbed)."""
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(count):
            signer.sign_with((key,), data)
        rounds.append((time.perf_counter() - start) / count * 1000)
    return min(rounds)


def reactor_gaps(signer: Signer, key, data: bytes, count: int, mode: str) -> tuple[float, float]:
    """(max, p99) milliseconds between 1 ms heartbeats while ``count`` messages are signed
    (mode "thread" or "inline"), or for as many heartbeats without signing ("idle")."""
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred, DeferredList
    from relay.dkim import SigningThread

    thread = SigningThread(reactor)
    gaps: list[float] = []
    last = [time.perf_counter()]

    def beat() -> None:
        now = time.perf_counter()
        gaps.append((now - last[0]) * 1000)
        last[0] = now

    beat_loop = task.LoopingCall(beat)
    results = {}

    def start() -> None:
        beat_loop.start(0.001)
        if mode == "idle":
            ds = [task.deferLater(reactor, count * 0.01, lambda: None)]
        elif mode == "thread":
            ds = [thread(signer.sign_with, (key,), data) for _ in range(count)]
        else:  # one per reactor turn, as sessions ending one after another would
            finished = Deferred()

            def step(left: int) -> None:
                signer.sign_with((key,), data)
                if left > 1:
                    reactor.callLater(0, step, left - 1)
                else:
                    finished.callback(None)
            reactor.callLater(0, step, count)
            ds = [finished]
        DeferredList(ds).addCallback(done)

    def done(_: object) -> None:
        beat_loop.stop()
        thread.close()
        ordered = sorted(gaps[1:]) or [0.0]
        results["gaps"] = (ordered[-1], ordered[int(len(ordered) * 0.99) - 1 if len(ordered) > 1 else 0])
        reactor.stop()

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    return results["gaps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="messages signed in the reactor runs (max 2000)")
    options = parser.parse_args()
    count = max(1, min(options.count, 2000))
    keys = {"rsa-1024": make_key("rsa", 1024), "rsa-2048": make_key("rsa", 2048), "ed25519": make_key("ed25519")}
    signer = Signer(list(keys.values()))
    for name, key in keys.items():
        for size in (4096, 102400):
            ms = per_message(signer, key, message(size), 30)
            print(f"sign {name:9} {size // 1024:4} KiB: {ms:6.2f} ms per message")
    key = keys["rsa-2048"]
    data = message(4096)
    # The reactor runs once per process: each case runs in a child process.
    mode = os.environ.get("DKIM_BENCH_MODE")
    if mode:
        worst, p99 = reactor_gaps(signer, key, data, count, mode)
        print(f"heartbeat gap max {worst:.1f} ms, p99 {p99:.1f} ms")
        return
    import subprocess

    for mode, what in (("idle", "no signing (baseline)"), ("thread", "in the signing thread"),
                       ("inline", "on the reactor thread")):
        env = dict(os.environ, DKIM_BENCH_MODE=mode)
        out = subprocess.run([sys.executable, __file__, "--count", str(count)], env=env, capture_output=True,
                             text=True, timeout=300).stdout
        print(f"{count} x rsa-2048 4 KiB, {what:22}: {out.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
