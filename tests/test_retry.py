"""Tests for relay.queue.retry: the pure retry policy."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, strategies as st

from relay.config import QueueConfig
from relay.queue.retry import JITTER, deadline, next_attempt, retry_delay

CONFIG = QueueConfig(min_retry=300.0, max_retry=14400.0, max_lifetime=5 * 86400.0)
ARRIVAL = 1_700_000_000.0


class Fixed:
    """A random source that always answers the same value."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_delay_doubles_from_min_retry_up_to_max_retry():
    """The nominal delays are min_retry, then doubled per attempt, then capped at max_retry."""
    delays = [retry_delay(n, CONFIG) for n in range(1, 10)]
    assert delays == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400, 14400]


def test_delay_of_huge_attempt_counts_is_the_cap():
    """Attempt counts far beyond the cap neither overflow nor exceed max_retry."""
    assert retry_delay(10_000, CONFIG) == CONFIG.max_retry
    assert retry_delay(0, CONFIG) == CONFIG.min_retry


def test_next_attempt_sequence_without_jitter():
    """With the random part at zero, the schedule is now plus the nominal delay."""
    now = ARRIVAL
    times = []
    for attempts in range(1, 9):
        when = next_attempt(attempts, ARRIVAL, now, CONFIG, Fixed(0.0))
        times.append(when - now)
        now = when
    assert times == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400]


def test_jitter_shortens_by_at_most_the_jitter_fraction():
    """The random part takes off up to JITTER of the delay, never adds to it."""
    assert next_attempt(1, ARRIVAL, ARRIVAL, CONFIG, Fixed(0.0)) == ARRIVAL + 300
    almost_one = next_attempt(1, ARRIVAL, ARRIVAL, CONFIG, Fixed(0.999999))
    assert ARRIVAL + 300 * (1 - JITTER) < almost_one < ARRIVAL + 300 * (1 - JITTER) + 0.001


def test_jitter_with_a_seeded_source_stays_in_bounds_and_spreads():
    """Seeded draws stay within (0.9 d, d] of the nominal delay and are not all equal."""
    rng = random.Random(1234)
    for attempts in (1, 3, 7, 20):
        nominal = retry_delay(attempts, CONFIG)
        delays = {next_attempt(attempts, ARRIVAL, ARRIVAL + 10, CONFIG, rng) - (ARRIVAL + 10) for _ in range(200)}
        assert all(nominal * (1 - JITTER) < d <= nominal for d in delays)
        assert len(delays) > 100


def test_same_seed_gives_same_schedule():
    """The policy is a pure function of its inputs and the random source."""
    a = [next_attempt(n, ARRIVAL, ARRIVAL, CONFIG, random.Random(7)) for n in range(1, 6)]
    b = [next_attempt(n, ARRIVAL, ARRIVAL, CONFIG, random.Random(7)) for n in range(1, 6)]
    assert a == b


def test_next_attempt_never_passes_the_deadline():
    """Close to the end of the lifetime, the last attempt is placed at the deadline itself."""
    end = deadline(ARRIVAL, CONFIG)
    assert end == ARRIVAL + CONFIG.max_lifetime
    assert next_attempt(30, ARRIVAL, end - 60, CONFIG, Fixed(0.0)) == end


@pytest.mark.parametrize("late", [0.0, 0.5, 3600.0])
def test_at_or_past_the_deadline_gives_up(late):
    """A transient failure at or after arrival + max_lifetime means giving up (None)."""
    assert next_attempt(12, ARRIVAL, deadline(ARRIVAL, CONFIG) + late, CONFIG, Fixed(0.5)) is None


@given(
    attempts=st.integers(min_value=1, max_value=200),
    age=st.floats(min_value=0, max_value=10 * 86400),
    u=st.floats(min_value=0, max_value=0.999999),
)
def test_properties(attempts, age, u):
    """Any result lies after now, within the nominal delay, and never past the deadline."""
    now = ARRIVAL + age
    when = next_attempt(attempts, ARRIVAL, now, CONFIG, Fixed(u))
    if now >= deadline(ARRIVAL, CONFIG):
        assert when is None
    else:
        assert now < when <= min(now + retry_delay(attempts, CONFIG), deadline(ARRIVAL, CONFIG))
