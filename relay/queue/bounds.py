"""What an envelope read from the queue may contain: the bounds that make a stored envelope safe to use.

The queue store is hostile input to the code that reads it (anyone who can
write to the queue directory can change it), so every envelope read back is
checked before it is used (``read_envelope``):

* its JSON is at most ``MAX_ENVELOPE`` octets; nesting is bounded by the
  format itself: every value the format reads must have its own type (a
  list where text belongs is refused), what it does not read is dropped,
  and JSON nested deeper than Python's recursion limit is refused instead
  of ending in a RecursionError (a scan for the nesting depth before
  parsing cost 20% of the parse, on every read of every envelope);
* every time (arrival, next attempt, attempt) is a finite number between 0
  and the end of year 9999, every count and size an integer from 0 to 2**53;
* fields that hold text, flags or numbers hold nothing else.

An envelope outside them raises EnvelopeFormatError naming what is wrong,
which the daemon answers by moving the entry to ``corrupt/`` with that reason
and the tools by reporting that entry and going on with the rest.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from relay.envelope import ClientInfo, Envelope, EnvelopeFormatError

MAX_ENVELOPE = 4 * 1024 * 1024  # octets of envelope JSON
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, epoch seconds
MAX_COUNT = 2 ** 53

_CLIENT_TYPES = {f.name: f.type for f in fields(ClientInfo)}


def read_envelope(queue_id: str, data: Any) -> Envelope:
    """The envelope stored as ``data`` for ``queue_id``; EnvelopeFormatError when it is outside the bounds."""
    if not isinstance(data, (bytes, str)):
        raise EnvelopeFormatError(f"envelope is stored as {type(data).__name__}, not JSON text")
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > MAX_ENVELOPE:
        raise EnvelopeFormatError(f"envelope of {len(raw)} octets is over the limit of {MAX_ENVELOPE}")
    try:
        envelope = Envelope.from_json(raw)
    except RecursionError:
        raise EnvelopeFormatError("envelope JSON nested too deeply") from None
    except OverflowError as e:
        raise EnvelopeFormatError(f"number out of range in envelope: {e}") from None
    if envelope.queue_id != queue_id:
        raise EnvelopeFormatError(f"envelope names queue id {envelope.queue_id!r}")
    check_envelope(envelope)
    return envelope


def check_envelope(envelope: Envelope) -> None:
    """EnvelopeFormatError naming the first field outside the bounds."""
    _time(envelope.arrival, "arrival")
    _count(envelope.size, "size")
    for name, value in vars(envelope.client).items():
        expected = _CLIENT_TYPES.get(name)
        if expected is not None and not _has_type(value, expected):
            raise EnvelopeFormatError(f"client.{name} is {type(value).__name__}, not {expected}")
    _count(envelope.client.port, "client.port")
    for recipient in envelope.recipients:
        where = f"recipient {recipient.address!r}"
        _count(recipient.attempts, f"{where}: attempts")
        if recipient.next_attempt is not None:
            _time(recipient.next_attempt, f"{where}: next_attempt")
        for attempt in recipient.history:
            _time(attempt.time, f"{where}: history time")


def _time(value: Any, what: str) -> None:
    if not isinstance(value, float) or not math.isfinite(value) or not 0.0 <= value <= MAX_TIME:
        raise EnvelopeFormatError(f"{what} {value!r} is not a time between 0 and {MAX_TIME:.0f}")


def _count(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise EnvelopeFormatError(f"{what} {value!r} is not a count between 0 and 2**53")


def _has_type(value: Any, expected: str) -> bool:
    kinds = {"str": (str,), "int": (int,), "bool": (bool,)}.get(str(expected))
    if kinds is None:
        return True
    if str(expected) == "int" and isinstance(value, bool):
        return False
    return isinstance(value, kinds)
