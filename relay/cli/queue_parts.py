"""The queue as ``relay-queue`` reads and changes it: every part, one message at a time.

This module owns the tool's access to a spool.  A ``Queue`` is every part of
the queue in a directory that exists (``relay.queue.partitions``: part 0 is
the directory itself, part ``i`` is ``<DIR>/worker-<i>``), each a ``Part``
with its own store; ``open_queue`` finds them without creating or
recovering anything.  ``Queue.find`` names the part that holds an id;
``read_headers`` reads a message's header section; ``change_one`` deletes,
holds or releases one message in its part and then tells that part's daemon
over its control socket (``tell_daemon``), and ``become_owner`` makes the
tool the spool's owner before it changes files.  Files are read and changed
only through ``relay.queue.store.Spool``.  The two errors of the tool are
here too: ``UsageError`` (exit 2) and ``Failed`` (exit 1), each a line to
print.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from relay import control
from relay.cli.queue_text import HEADER_LIMIT, error_text
from relay.envelope import Envelope, EnvelopeFormatError
from relay.queue.partitions import part_directory, part_indexes
from relay.queue.store import Spool


class UsageError(Exception):
    """A bad option, configuration, queue id or directory; ``str()`` is the line to print."""


class Failed(Exception):
    """The command could not do what was asked; ``str()`` is the line to print."""


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
                raise Failed(f"{queue_id}: cannot read the envelope: {error_text(e)}") from None
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
        raise Failed(f"{queue_id}: cannot change the message: {error_text(e)}") from None
    command = control.Reschedule if action == "released" else control.Forget
    return Change(queue_id, action, changed, tell_daemon(part.directory, command, queue_id))
