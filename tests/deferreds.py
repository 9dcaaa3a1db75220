"""Reading a Deferred's result at once in plain pytest tests (as trial's successResultOf and friends)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

_NOTHING = object()


def _take(deferred: Any) -> Any:
    """The result the Deferred holds now (consumed), or _NOTHING."""
    results: list[Any] = []
    ensureDeferred(deferred).addBoth(results.append)
    return results[0] if results else _NOTHING


def success(deferred: Deferred) -> Any:
    """The success result ``deferred`` already has; AssertionError when it has none or failed."""
    result = _take(deferred)
    if result is _NOTHING:
        raise AssertionError(f"{deferred!r} has no result yet")
    if isinstance(result, Failure):
        raise AssertionError(f"{deferred!r} failed: {result.getTraceback()}")
    return result


def failure_of(deferred: Deferred, *types: type) -> Failure:
    """The Failure ``deferred`` already has, of one of ``types`` when given; AssertionError otherwise."""
    result = _take(deferred)
    if result is _NOTHING:
        raise AssertionError(f"{deferred!r} has no result yet")
    if not isinstance(result, Failure):
        raise AssertionError(f"{deferred!r} succeeded with {result!r}")
    if types and not result.check(*types):
        raise AssertionError(f"{deferred!r} failed with {result.type!r}, not one of {types!r}:\n"
                             f"{result.getTraceback()}")
    return result


def no_result(deferred: Deferred) -> None:
    """``deferred`` has no result yet; AssertionError otherwise (a failure is consumed then)."""
    results: list[Any] = []

    def seen(result: Any) -> Any:
        results.append(result)
        return result

    deferred = ensureDeferred(deferred)
    deferred.addBoth(seen)
    if results:
        deferred.addErrback(lambda _: None)
        raise AssertionError(f"{deferred!r} has a result: {results[0]!r}")
