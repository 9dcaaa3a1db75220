"""Benchmark: durable commits per second of the queue store alone, no SMTP.

Runs a real reactor and a ``Spool`` (relay.queue.store) with its own
threads in a temporary directory; C writers each commit a message (4 KB by
default), wait for the commit to fire and start the next, like C SMTP
sessions would, until N messages are committed.  With ``--update`` each
committed envelope is also rewritten once (as the deferral of a failed
first attempt does).  Prints commits per second and CPU per message.

    .venv/bin/python bench/spool_rate.py [--messages N] [--writers C] [--update] [--tmpdir DIR]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor  # noqa: E402

from relay.envelope import ClientInfo, Envelope, Recipient  # noqa: E402
from relay.queue.store import Spool  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import settle  # noqa: E402

MAX_MESSAGES = 100_000
TIME_LIMIT = 120.0


def envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id=queue_id, sender="bench@example.org",
                    recipients=(Recipient("sink@example.net"),),
                    client=ClientInfo(address="127.0.0.1", helo="bench.example.org", trusted=True))


async def writer(spool: Spool, body: bytes, left: list[int], update: bool, deadline: float) -> None:
    while left[0] > 0 and time.monotonic() < deadline:
        left[0] -= 1
        message = spool.new_message()
        message.write(body)
        queue_id = await message.commit(envelope(message.queue_id))
        if update:
            await spool.modify(queue_id, lambda e: replace(e, recipients=(replace(e.recipients[0], attempts=1, next_attempt=1e10),)))


async def main(args: argparse.Namespace) -> None:
    settle()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory(prefix="relay-spool-bench-", dir=args.tmpdir) as tmp:
        spool = Spool(tmp)
        spool.recover()
        spool.start()
        body = b"x" * 57 + b"\r\n"
        body = body * (args.size // len(body))
        left = [min(args.messages, MAX_MESSAGES)]
        total = left[0]
        start = time.monotonic()
        await defer.gatherResults([
            defer.Deferred.fromCoroutine(writer(spool, body, left, args.update, start + TIME_LIMIT))
            for _ in range(args.writers)
        ])
        elapsed = time.monotonic() - start
        await spool.stop()
    done = total - max(0, left[0])
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
    print(f"writers={args.writers} update={args.update} "
          f"messages={done} rate={done / elapsed:.1f} commits/s "
          f"cpu={1000 * (user + system) / max(1, done):.2f}ms/msg (system {1000 * system / max(1, done):.2f})")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--update", action="store_true")
    parser.add_argument("--tmpdir")
    args = parser.parse_args()
    failure: list = []
    d = defer.Deferred.fromCoroutine(main(args))
    d.addErrback(failure.append).addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(lambda: None)
    reactor.run()
    if failure:
        failure[0].printTraceback()
        sys.exit(1)


if __name__ == "__main__":
    run()
