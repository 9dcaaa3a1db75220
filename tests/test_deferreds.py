"""Tests for tests/deferreds.py: the helpers that read a Deferred's result must fail when they should."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from deferreds import failure_of, no_result, success


def test_success_returns_the_result_and_refuses_pending_or_failed() -> None:
    """success() gives a fired Deferred's value and raises for a pending or failed one."""
    assert success(succeed(7)) == 7
    with pytest.raises(AssertionError):
        success(Deferred())
    with pytest.raises(AssertionError):
        success(fail(ValueError("x")))


def test_failure_of_checks_the_type() -> None:
    """failure_of() gives the Failure of the expected type and raises for another type or a success."""
    assert failure_of(fail(ValueError("x")), ValueError).check(ValueError)
    with pytest.raises(AssertionError):
        failure_of(fail(KeyError("x")), ValueError)
    with pytest.raises(AssertionError):
        failure_of(succeed(1))


def test_no_result_raises_once_fired_and_keeps_the_value() -> None:
    """no_result() passes on a pending Deferred without changing the value it fires with later."""
    d: Deferred = Deferred()
    no_result(d)
    d.callback(3)
    assert success(d) == 3
    with pytest.raises(AssertionError):
        no_result(succeed(1))
