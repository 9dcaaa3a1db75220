"""Queue ids: 16 characters of ``[0-9A-Za-z]`` that sort by creation time.

Every message in the queue is known by one; operators grep the logs for it.
"""

from __future__ import annotations

import os
import re
import secrets
import string
import threading
from typing import Any

from twisted.internet.interfaces import IReactorTime

_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase  # ASCII order
_TIME_DIGITS = 10  # microseconds since the epoch: 62**10 us is some 26,000 years
_NONCE_DIGITS = 6  # per process: 62**6 is some 5.7e10
QUEUE_ID_LENGTH = _TIME_DIGITS + _NONCE_DIGITS

_id_lock = threading.Lock()
_id_state: dict[str, Any] = {"last": -1, "pid": None, "nonce": ""}
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")


def _encode(number: int, digits: int) -> str:
    out = []
    for _ in range(digits):
        number, rest = divmod(number, 62)
        out.append(_ALPHABET[rest])
    return "".join(reversed(out))


def new_queue_id(clock: IReactorTime) -> str:
    """Return a new queue id: 16 characters of ``[0-9A-Za-z]``.

    The first ten encode the creation time in microseconds, strictly
    increasing within a process (so ids sort by creation time); the last six
    are a random nonce drawn once per process, so ids from other processes
    and earlier runs differ even when clocks agree or step back.
    """
    micros = max(0, int(clock.seconds() * 1_000_000)) % (62**_TIME_DIGITS)
    with _id_lock:
        pid = os.getpid()
        if _id_state["pid"] != pid:
            _id_state["pid"] = pid
            _id_state["nonce"] = _encode(secrets.randbelow(62**_NONCE_DIGITS), _NONCE_DIGITS)
        micros = max(micros, _id_state["last"] + 1)
        _id_state["last"] = micros
        nonce = _id_state["nonce"]
    return _encode(micros, _TIME_DIGITS) + nonce


def queue_id_time(queue_id: str) -> float:
    """When ``queue_id`` was made (epoch seconds), from its first ten characters."""
    micros = 0
    for char in queue_id[:_TIME_DIGITS]:
        micros = micros * 62 + _ALPHABET.index(char)
    return micros / 1_000_000


def valid_queue_id(queue_id: str) -> bool:
    """True when ``queue_id`` could name a queue entry (and is safe as a file name)."""
    return isinstance(queue_id, str) and _QUEUE_ID.fullmatch(queue_id) is not None
