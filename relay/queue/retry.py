"""The retry policy: when a recipient that failed temporarily is tried again.

One pure function, ``next_attempt``: the delay starts at ``[queue]
min_retry``, doubles with every attempt up to ``max_retry``, and is shortened
by a random part of up to ``JITTER`` of itself (from an injected random
source), so messages deferred together do not all fall due together.  A
recipient is never scheduled past its deadline (arrival + ``max_lifetime``):
the last attempt happens at the deadline, and a transient failure at or after
it means giving up (``None``), which the scheduler turns into Status 4.4.7.
"""

from __future__ import annotations

from typing import Optional, Protocol

from relay.config import QueueConfig

# Each delay is shortened by up to this fraction of itself, at random.
JITTER = 0.1
# Doubling beyond this many attempts changes nothing (and keeps 2**n small).
_MAX_DOUBLINGS = 64


class RandomSource(Protocol):
    """What the policy needs of a random generator (``random.Random`` fits)."""

    def random(self) -> float:
        """A float in [0, 1)."""


def retry_delay(attempts: int, config: QueueConfig) -> float:
    """The nominal delay after ``attempts`` attempts (1 -> min_retry, doubling, capped)."""
    doublings = min(max(attempts, 1) - 1, _MAX_DOUBLINGS)
    return min(config.min_retry * 2.0**doublings, config.max_retry)


def deadline(first_arrival: float, config: QueueConfig) -> float:
    """When a message that arrived at ``first_arrival`` expires."""
    return first_arrival + config.max_lifetime


def next_attempt(
    attempts: int, first_arrival: float, now: float, config: QueueConfig, rng: RandomSource
) -> Optional[float]:
    """The time of the next attempt after ``attempts`` attempts failed temporarily at ``now``.

    ``None`` means give up: ``now`` is at or past the deadline.  Otherwise
    the result lies in ``(now + 0.9 * delay, now + delay]`` and never after
    the deadline.
    """
    expires = deadline(first_arrival, config)
    if now >= expires:
        return None
    delay = retry_delay(attempts, config)
    delay *= 1.0 - JITTER * rng.random()
    return min(now + delay, expires)
