"""``relay-queue``: look at and change a spool, whether or not the daemon runs.

This module owns the command::

    relay-queue [--queue DIR | --config FILE] [--json] SUBCOMMAND ...

    list                     queued messages, oldest first, with their pending recipients
    show ID                  envelope, per-recipient attempt history, message headers
    delete ID...             remove messages (no DSN)
    hold ID...               never attempt these messages until released
    release ID...            attempt them again now
    flush [DOMAIN] [--subdomains]
                             the running daemon attempts every deferred recipient now
    shape [--state S] [--top N]
                             pending recipients by destination domain and age (qshape)

Options may stand before or after the subcommand.  The spool is
``--queue DIR``, else the ``[queue] directory`` of ``--config FILE``
(relative to the current directory, as for the daemon), else
``./relay-queue``.

The whole queue, every part.  With ``[server] workers = N`` the queue
directory is split into parts, one per worker (``relay.queue.partitions``):
part 0 is the directory itself, part ``i`` is ``<DIR>/worker-<i>``, each a
complete store with its own daemon and control socket.  The tool acts on
every part whose directory exists (it never creates one): ``list`` merges
the messages of all parts oldest first (queue ids sort by creation time
across parts) under one totals line; ``show``, ``delete``, ``hold`` and
``release`` find the part that holds each id and tell that part's daemon;
``flush`` asks the daemon of every part and adds up their counts.  With one
part (one worker, the default) nothing differs from a single store.

Files are read and changed only through ``relay.queue.store.Spool``
(``ids``, ``load``, ``open_message``, ``modify_sync``, ``remove_sync``),
which lock against a daemon writing the same envelope; ``Spool.recover`` is
never called here.  After a change the daemon of that part is told over its
control socket (``relay.control``); when none runs the change simply takes
effect at its next start.

Exit status: 0 done; 1 an unknown queue id, an unreadable entry, or the
daemon could not be reached (flush) or failed to act; 2 a bad option,
configuration, queue id or queue directory.  With several parts, flush
exits 0 when at least one daemon acted and every daemon that answered
acted; parts with no daemon running are named in one line on stderr (exit
1 only when no part has one).  Every error is one line on stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence, TextIO

from relay import control
from relay.cli import shape
from relay.cli.queue_parts import (
    Change,
    Failed,
    Part,
    Queue,
    UsageError,
    become_owner,
    change_one,
    open_queue,
    read_headers,
)
from relay.cli.queue_text import (
    error_text,
    list_human,
    list_json,
    one_line,
    plural,
    show_human,
    show_json,
)
from relay.config import load_config
from relay.config_values import ConfigError
from relay.envelope import Envelope, EnvelopeFormatError
from relay.queue.schema import StoreError
from relay.queue.store import valid_queue_id

PROG = "relay-queue"
DEFAULT_QUEUE = "relay-queue"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Clock = Callable[[], float]


# -- arguments ---------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options accepted before and after the subcommand.

    The subcommand's copies default to SUPPRESS, so a value given before the
    subcommand is not overwritten by the subcommand's default.
    """
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--queue", metavar="DIR", help="the spool directory (default: ./relay-queue)", **keep)
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration; its [queue] directory is the spool", **keep
    )
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output (list, show, flush, shape, changes)", **keep
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Inspect and change a relay spool.")
    _common(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    commands.required = True

    def add(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        _common(sub, defaults=False)
        return sub

    add("list", "queued messages, oldest first, with their pending recipients")
    add("show", "one message: envelope, attempt history, headers").add_argument("id", metavar="ID")
    for name, text in (
        ("delete", "remove messages from the queue (no DSN is sent)"),
        ("hold", "never attempt these messages until released"),
        ("release", "attempt held messages again, now"),
    ):
        add(name, text).add_argument("ids", metavar="ID", nargs="+")
    flush = add("flush", "the running daemon attempts every deferred recipient now")
    flush.add_argument("domain", metavar="DOMAIN", nargs="?", help="only recipients in this domain")
    flush.add_argument("--subdomains", action="store_true", help="with DOMAIN: its subdomains too")
    shape.add_arguments(add("shape", "pending recipients by destination domain and age, like qshape"))
    return parser


def queue_directory(options: argparse.Namespace) -> str:
    """``--queue``, else the configuration's ``[queue] directory``, else the default."""
    if options.queue:
        return options.queue
    if options.config:
        return load_config(options.config).queue.directory
    return DEFAULT_QUEUE


def check_ids(ids: Sequence[str]) -> None:
    """Every id is a possible queue id, checked before any file is touched."""
    for queue_id in ids:
        if not valid_queue_id(queue_id):
            raise UsageError(f"{queue_id!r} is not a queue id")


# -- list ----------------------------------------------------------------------------


@dataclass
class Totals:
    messages: int = 0
    held: int = 0
    pending: int = 0
    unreadable: int = 0

    def summary(self) -> str:
        held = f" ({self.held} held)" if self.held else ""
        return f"{plural(self.messages, 'message')}{held}, {plural(self.pending, 'pending recipient')}"


def envelopes(queue: Queue, err: TextIO, totals: Totals) -> Iterator[Envelope]:
    """Queued envelopes of every part, oldest first (queue ids sort by creation time), one at a time.

    Entries removed meanwhile are skipped; unreadable ones are reported on
    ``err`` and counted.  An id in two parts (a message caught while being
    moved between parts at start-up) is listed once, from the lower part,
    where it is bound.  Message bodies are never read.
    """
    streams = [_tagged(part) for part in queue.parts]
    previous = None
    for queue_id, part in heapq.merge(*streams, key=lambda entry: entry[0]):
        if queue_id == previous:
            continue
        previous = queue_id
        try:
            envelope = part.spool.load(queue_id)
        except KeyError:
            continue
        except (OSError, EnvelopeFormatError) as e:
            totals.unreadable += 1
            err.write(f"{PROG}: {queue_id}: cannot read the envelope: {error_text(e)}\n")
            continue
        totals.messages += 1
        totals.held += envelope.held
        totals.pending += len(envelope.pending())
        yield envelope


def _tagged(part: Part) -> Iterator[tuple[str, Part]]:
    return ((queue_id, part) for queue_id in part.spool.ids())


def cmd_list(queue: Queue, options: argparse.Namespace, out: TextIO, err: TextIO, now: float) -> int:
    totals = Totals()
    if options.json:
        out.write("[")
        for position, envelope in enumerate(envelopes(queue, err, totals)):
            out.write(",\n" if position else "\n")
            out.write(json.dumps(list_json(envelope), ensure_ascii=False, sort_keys=True))
        out.write("\n]\n" if totals.messages else "]\n")
    else:
        for envelope in envelopes(queue, err, totals):
            out.write(list_human(envelope, now))
        out.write(totals.summary() + "\n")
    return EXIT_FAILED if totals.unreadable else EXIT_OK


def cmd_shape(queue: Queue, options: argparse.Namespace, out: TextIO, err: TextIO, now: float) -> int:
    totals = Totals()
    shape.write_shape(envelopes(queue, err, totals), options, out, now)
    return EXIT_FAILED if totals.unreadable else EXIT_OK


# -- show ----------------------------------------------------------------------------


def cmd_show(queue: Queue, options: argparse.Namespace, out: TextIO, err: TextIO, now: float) -> int:
    part, envelope = queue.find(options.id)
    try:
        headers, truncated = read_headers(part.spool, options.id)
    except KeyError:
        raise queue.missing(options.id) from None
    except OSError as e:
        raise Failed(f"{options.id}: cannot read the message: {error_text(e)}") from None
    if options.json:
        out.write(json.dumps(show_json(envelope, headers, truncated), ensure_ascii=False, indent=2, sort_keys=True))
        out.write("\n")
    else:
        out.write(show_human(envelope, headers, truncated, now))
    return EXIT_OK


# -- delete / hold / release ---------------------------------------------------------------


def change_text(change: Change) -> str:
    """``ID: held``, ``ID: already held``, with a note when no daemon heard of a hold or release."""
    text = f"{change.queue_id}: {change.action if change.changed else 'already ' + change.action}"
    if change.daemon == "not running" and change.action != "deleted":
        text += " (no relay daemon is running: it takes effect when one starts)"
    return text


def cmd_change(queue: Queue, options: argparse.Namespace, out: TextIO, err: TextIO, now: float) -> int:
    action = {"delete": "deleted", "hold": "held", "release": "released"}[options.command]
    status = EXIT_OK
    results = []
    for queue_id in options.ids:
        try:
            change = change_one(queue, action, queue_id)
        except Failed as e:
            err.write(f"{PROG}: {e}\n")
            status = EXIT_FAILED
            continue
        results.append(change)
        if change.daemon not in ("told", "not running"):
            err.write(f"{PROG}: {queue_id}: {action} on disk, but {change.daemon}\n")
            status = EXIT_FAILED
        if not options.json:
            out.write(change_text(change) + "\n")
    if options.json:
        out.write(json.dumps([_change_json(c) for c in results], ensure_ascii=False, sort_keys=True) + "\n")
    return status


def _change_json(change: Change) -> dict[str, Any]:
    return {
        "id": change.queue_id,
        "action": change.action,
        "changed": change.changed,
        "daemon": change.daemon if change.daemon in ("told", "not running") else "error",
    }


# -- flush ------------------------------------------------------------------------------------


def cmd_flush(queue: Queue, options: argparse.Namespace, out: TextIO, err: TextIO, now: float) -> int:
    if options.subdomains and not options.domain:
        raise UsageError("--subdomains needs a DOMAIN")
    if len(queue.parts) == 1:
        try:
            answer = control.call(queue.directory, control.Flush, domain=options.domain, subdomains=options.subdomains)
        except control.ControlError as e:
            raise Failed(str(e)) from None
        count = int(answer["count"])
        if options.json:
            out.write(json.dumps({"scheduled": count}) + "\n")
        else:
            out.write(_flush_text(count, options) + "\n")
        return EXIT_OK
    return flush_parts(queue, options, out, err)


@dataclass(frozen=True)
class Flushed:
    """What the daemon of one part made of a flush."""

    part: Part
    count: int = 0
    daemon: str = "told"  # "told", "not running", or the one-line error


def flush_parts(queue: Queue, options: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Flush every part; the sum on stdout, each failure and the parts without a daemon on stderr."""
    results = []
    for part in queue.parts:
        try:
            answer = control.call(part.directory, control.Flush, domain=options.domain, subdomains=options.subdomains)
        except control.DaemonNotRunning:
            results.append(Flushed(part, daemon="not running"))
            continue
        except control.ControlError as e:
            results.append(Flushed(part, daemon=one_line(str(e))))
            err.write(f"{PROG}: part {part.index} ({part.directory}): {one_line(str(e))}\n")
            continue
        results.append(Flushed(part, int(answer["count"])))
    absent = [r.part for r in results if r.daemon == "not running"]
    if absent:
        err.write(f"{PROG}: {_not_running_text(queue, absent)}\n")
    told = [r for r in results if r.daemon == "told"]
    if not told:
        return EXIT_FAILED
    count = sum(r.count for r in told)
    if options.json:
        parts = [
            {
                "part": r.part.index,
                "scheduled": r.count,
                "daemon": r.daemon if r.daemon in ("told", "not running") else "error",
            }
            for r in results
        ]
        out.write(json.dumps({"scheduled": count, "parts": parts}) + "\n")
    else:
        out.write(_flush_text(count, options) + "\n")
    return EXIT_OK if len(told) + len(absent) == len(results) else EXIT_FAILED


def _flush_text(count: int, options: argparse.Namespace) -> str:
    scope = f" for {options.domain}{' and its subdomains' if options.subdomains else ''}" if options.domain else ""
    return f"flush: {plural(count, 'message')} scheduled{scope}"


def _not_running_text(queue: Queue, parts: Sequence[Part]) -> str:
    """One line naming the parts of ``queue`` that no daemon answers for."""
    if len(parts) == 1:
        part = parts[0]
        return (
            f"no relay daemon is running for part {part.index} of {queue.directory}"
            f" (cannot connect to {control.socket_path(part.directory)})"
        )
    numbers = ", ".join(str(part.index) for part in parts)
    return (
        f"no relay daemon is running for parts {numbers} of {queue.directory}"
        f" (cannot connect to their {control.SOCKET_NAME})"
    )


COMMANDS: dict[str, Callable[[Any, argparse.Namespace, TextIO, TextIO, float], int]] = {
    "list": cmd_list,
    "show": cmd_show,
    "delete": cmd_change,
    "hold": cmd_change,
    "release": cmd_change,
    "flush": cmd_flush,
    "shape": cmd_shape,
}


# -- the command --------------------------------------------------------------------------


def run(
    argv: Sequence[str],
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    clock: Clock = time.time,
) -> int:
    """Run ``relay-queue argv``; the exit status.  ``clock`` gives "now" for ages."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        options = _parser().parse_args(list(argv))
        directory = queue_directory(options)
        if options.command in ("show", "delete", "hold", "release"):
            check_ids([options.id] if options.command == "show" else options.ids)
        queue = open_queue(directory)
        if options.command in ("delete", "hold", "release"):
            become_owner(directory)
        return COMMANDS[options.command](queue, options, out, err, clock())
    except (UsageError, ConfigError) as e:
        err.write(f"{PROG}: {one_line(str(e))}\n")
        return EXIT_USAGE
    except (Failed, StoreError) as e:
        err.write(f"{PROG}: {one_line(str(e))}\n")
        return EXIT_FAILED
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        err.write(f"{PROG}: {error_text(e)}\n")
        return EXIT_FAILED


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Console entry point ``relay-queue``."""
    try:
        status = run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``relay-queue list | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = EXIT_OK
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except Exception as e:  # never a traceback for an operator
        sys.stderr.write(f"{PROG}: internal error: {type(e).__name__}: {one_line(str(e))}\n")
        status = EXIT_FAILED
    raise SystemExit(status)


if __name__ == "__main__":
    main()
