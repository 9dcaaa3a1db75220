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
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence, TextIO

from relay import control
from relay.cli import shape
from relay.config import ConfigError, load_config
from relay.envelope import DELIVERED, FAILED, PENDING, Attempt, Envelope, EnvelopeFormatError, Recipient
from relay.queue.partitions import part_directory, part_indexes
from relay.queue.schema import StoreError
from relay.queue.store import Spool, valid_queue_id

PROG = "relay-queue"
DEFAULT_QUEUE = "relay-queue"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
HEADER_LIMIT = 1024 * 1024  # octets of header section shown by ``show``

Clock = Callable[[], float]


class UsageError(Exception):
    """A bad option, configuration, queue id or directory; ``str()`` is the line to print."""


class Failed(Exception):
    """The command could not do what was asked; ``str()`` is the line to print."""


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


@dataclass(frozen=True)
class Part:
    """One part of the queue: its number and its store."""

    index: int
    spool: Spool

    @property
    def directory(self) -> str:
        return self.spool.directory


@dataclass(frozen=True)
class Queue:
    """Every part of the queue in ``directory`` that exists, part 0 first."""

    directory: str
    parts: tuple[Part, ...]

    def find(self, queue_id: str) -> tuple[Part, Envelope]:
        """The part that holds ``queue_id`` and its envelope; Failed when no part does or it is unreadable."""
        for part in self.parts:
            try:
                return part, part.spool.load(queue_id)
            except KeyError:
                continue
            except (OSError, EnvelopeFormatError) as e:
                raise Failed(f"{queue_id}: cannot read the envelope: {_error_text(e)}") from None
        raise self.missing(queue_id)

    def missing(self, queue_id: str) -> Failed:
        return Failed(f"{queue_id}: no such message in {self.directory}")


def open_queue(directory: str) -> Queue:
    """Every part of the queue in ``directory``, which must exist (nothing is created or recovered)."""
    if not os.path.isdir(directory):
        raise UsageError(f"no queue directory at {directory} (give --queue DIR or --config FILE)")
    return Queue(directory, tuple(Part(i, Spool(part_directory(directory, i))) for i in part_indexes(directory)))


def become_owner(directory: str) -> None:
    """Run as the owner of the spool when started as root, before changing files.

    Envelopes rewritten as root (mode 0600) would be unreadable to a daemon
    running as its own user; like Postfix's postsuper, the tool takes on the
    spool owner's identity instead.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    owner = os.stat(directory)
    if owner.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)


def check_ids(ids: Sequence[str]) -> None:
    """Every id is a possible queue id, checked before any file is touched."""
    for queue_id in ids:
        if not valid_queue_id(queue_id):
            raise UsageError(f"{queue_id!r} is not a queue id")


# -- formatting helpers ------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """``42s``, ``5m``, ``2h``, ``3d`` (rounded down; never negative)."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def human_size(octets: int) -> str:
    """``812B``, ``4.1kB``, ``35.0MB`` (decimal units, as in the configuration)."""
    if octets < 1000:
        return f"{octets}B"
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if octets >= size:
            return f"{octets / size:.1f}{unit}"
    return f"{octets}B"  # not reached


def local_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def sender_text(sender: str) -> str:
    return f"<{sender}>"


def next_attempt_text(recipient: Recipient, held: bool, now: float) -> str:
    if held:
        return "held"
    when = recipient.next_attempt
    if when is None or when <= now:
        return "due now"
    clock = time.strftime("%H:%M" if when - now < 86400 else "%Y-%m-%d %H:%M", time.localtime(when))
    return f"next in {human_duration(when - now)} ({clock})"


def one_line(text: str) -> str:
    return " ".join(text.split())


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


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
            err.write(f"{PROG}: {queue_id}: cannot read the envelope: {_error_text(e)}\n")
            continue
        totals.messages += 1
        totals.held += envelope.held
        totals.pending += len(envelope.pending())
        yield envelope


def _tagged(part: Part) -> Iterator[tuple[str, Part]]:
    return ((queue_id, part) for queue_id in part.spool.ids())


def list_human(envelope: Envelope, now: float) -> str:
    """The block for one message: a head line, then one line per pending recipient."""
    head = [
        envelope.queue_id,
        f"{human_duration(now - envelope.arrival):>4}",
        f"{human_size(envelope.size):>7}",
        sender_text(envelope.sender),
    ]
    if envelope.held:
        head.append("HELD")
    lines = ["  ".join(head)]
    for r in envelope.pending():
        parts = [r.status, plural(r.attempts, "attempt"), next_attempt_text(r, envelope.held, now)]
        line = f"    {r.address}  {', '.join(parts)}"
        last = last_words(r)
        if last:
            line += f"  last: {last}"
        lines.append(line)
    done = [
        f"{count} {state}"
        for state in (DELIVERED, FAILED)
        if (count := sum(1 for r in envelope.recipients if r.status == state))
    ]
    if done:
        lines.append(f"    ({', '.join(done)})")
    return "\n".join(lines) + "\n"


def recipient_json(recipient: Recipient) -> dict[str, Any]:
    return {
        "address": recipient.address,
        "status": recipient.status,
        "attempts": recipient.attempts,
        "last_error": recipient.last_error,
        "next_attempt": recipient.next_attempt,
        "last_attempt": attempt_json(recipient.history[-1]) if recipient.history else None,
    }


def attempt_json(a: Attempt) -> dict[str, Any]:
    """One attempt's facts; ``reply`` is the one line they make (as version 1 stored it)."""
    return {
        "time": a.time, "outcome": a.outcome, "host": a.host, "route": a.route, "code": a.code,
        "status": a.status, "text": a.text, "remote": a.remote, "reason": a.reason, "tls": a.tls,
        "tls_fallback": a.tls_fallback, "dsn_passed": a.dsn_passed, "reply": a.reply,
    }


def attempt_words(a: Attempt) -> str:
    """An attempt's words, saying whose: the remote reply as sent, or "relay: ..." with the reason."""
    if a.remote:
        return one_line(a.reply)
    return f"relay: {one_line(a.reply)}" + (f" ({a.reason})" if a.reason else "")


def last_words(r: Recipient) -> str:
    """The last attempt's words, for a recipient that has not been delivered."""
    if r.status == DELIVERED:
        return ""
    if r.history and r.history[-1].outcome != DELIVERED:
        return attempt_words(r.history[-1])
    return one_line(r.last_error)


def list_json(envelope: Envelope) -> dict[str, Any]:
    """The stable JSON object of one message in ``list --json``."""
    return {
        "id": envelope.queue_id,
        "sender": envelope.sender,
        "arrival": envelope.arrival,
        "size": envelope.size,
        "held": envelope.held,
        "recipients": [recipient_json(r) for r in envelope.recipients],
    }


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


def read_headers(spool: Any, queue_id: str, limit: int = HEADER_LIMIT) -> tuple[list[str], bool]:
    """The header lines of the message (unfolded lines kept as stored) and whether cut at ``limit``."""
    lines: list[str] = []
    taken = 0
    with spool.open_message(queue_id) as f:
        for raw in f:
            if raw in (b"\r\n", b"\n"):
                return lines, False
            taken += len(raw)
            if taken > limit:
                return lines, True
            lines.append(raw.rstrip(b"\r\n").decode("utf-8", "replace"))
    return lines, False


def show_json(envelope: Envelope, headers: list[str], truncated: bool) -> dict[str, Any]:
    client = envelope.client
    return {
        **list_json(envelope),
        "body": envelope.body,
        "smtputf8": envelope.smtputf8,
        "client": {
            "address": client.address,
            "port": client.port,
            "helo": client.helo,
            "protocol": client.protocol,
            "trusted": client.trusted,
            "auth_user": client.auth_user,
            "tls": client.tls,
        },
        "recipients": [
            {
                **recipient_json(r),
                "history": [attempt_json(a) for a in r.history],
            }
            for r in envelope.recipients
        ],
        "headers": headers,
        "headers_truncated": truncated,
    }


def show_human(envelope: Envelope, headers: list[str], truncated: bool, now: float) -> str:
    client = envelope.client
    where = client.address or "unknown"
    if client.port:
        where += f" port {client.port}"
    about = [f"helo {client.helo or '-'}", client.protocol]
    if client.trusted:
        about.append("trusted")
    if client.auth_user:
        about.append(f"authenticated as {client.auth_user}")
    if client.tls:
        about.append(client.tls)
    lines = [
        f"queue id:  {envelope.queue_id}",
        f"sender:    {sender_text(envelope.sender)}",
        f"arrival:   {local_time(envelope.arrival)} ({human_duration(now - envelope.arrival)} ago)",
        f"size:      {envelope.size} octets",
        f"client:    {where}, {', '.join(about)}",
        f"body:      {envelope.body}, smtputf8 {'yes' if envelope.smtputf8 else 'no'}",
        f"held:      {'yes' if envelope.held else 'no'}",
        "recipients:",
    ]
    for r in envelope.recipients:
        lines.extend(_recipient_block(r, envelope.held, now))
    lines.append("headers:")
    lines.extend(f"  {line}" for line in headers)
    if truncated:
        lines.append(f"  [header section longer than {HEADER_LIMIT} octets: cut here]")
    return "\n".join(lines) + "\n"


def _recipient_block(r: Recipient, held: bool, now: float) -> list[str]:
    state = [r.status, plural(r.attempts, "attempt")]
    if r.status == PENDING:
        state.append(next_attempt_text(r, held, now))
    lines = [f"  {r.address}: {', '.join(state)}"]
    if r.source_route:
        lines.append(f"    source route: {','.join('@' + hop for hop in r.source_route)}")
    last = last_words(r)
    if last:
        lines.append(f"    last error: {last}")
    for a in r.history:
        where = f" {a.host}" if a.host else ""
        rule = f" [{a.route}]" if a.route else ""
        tls = f" ({a.tls})" if a.tls else (" (in clear after a failed TLS handshake)" if a.tls_fallback else "")
        lines.append(f"    {local_time(a.time)}  {a.outcome}{where}{rule}{tls}: {attempt_words(a)}")
    return lines


def cmd_show(queue: Queue, options: argparse.Namespace, out: TextIO, err: TextIO, now: float) -> int:
    part, envelope = queue.find(options.id)
    try:
        headers, truncated = read_headers(part.spool, options.id)
    except KeyError:
        raise queue.missing(options.id) from None
    except OSError as e:
        raise Failed(f"{options.id}: cannot read the message: {_error_text(e)}") from None
    if options.json:
        out.write(json.dumps(show_json(envelope, headers, truncated), ensure_ascii=False, indent=2, sort_keys=True))
        out.write("\n")
    else:
        out.write(show_human(envelope, headers, truncated, now))
    return EXIT_OK


# -- delete / hold / release ---------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One change made by delete, hold or release, and what the daemon heard of it."""

    queue_id: str
    action: str  # "deleted", "held", "released"
    changed: bool = True  # False when the message already was in that state
    daemon: str = "told"  # "told", "not running", or the one-line error


def tell_daemon(directory: str, command: Any, queue_id: str) -> str:
    """Tell a running daemon about ``queue_id``; what came of it, in a word or a line."""
    try:
        control.call(directory, command, queue_id=queue_id)
    except control.DaemonNotRunning:
        return "not running"
    except control.ControlError as e:
        return str(e)
    return "told"


def change_one(queue: Queue, action: str, queue_id: str) -> Change:
    """Make one change in the part that holds ``queue_id``, then tell that part's daemon; Failed for an unknown id."""
    part, _ = queue.find(queue_id)
    spool = part.spool
    try:
        if action == "deleted":
            spool.remove_sync(queue_id)
            changed = True
        else:
            want = action == "held"
            before: list[bool] = []

            def set_held(current: Envelope) -> Envelope:
                before.append(current.held)
                return replace(current, held=want)

            spool.modify_sync(queue_id, set_held)
            changed = before[-1] != want
    except KeyError:
        raise queue.missing(queue_id) from None
    except (OSError, EnvelopeFormatError) as e:
        raise Failed(f"{queue_id}: cannot change the message: {_error_text(e)}") from None
    command = control.Reschedule if action == "released" else control.Forget
    return Change(queue_id, action, changed, tell_daemon(part.directory, command, queue_id))


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
        err.write(f"{PROG}: {_error_text(e)}\n")
        return EXIT_FAILED


def _error_text(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return one_line(str(error)) or type(error).__name__


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
