"""Shared test set-up: every test leaves the garbage collector as it found it."""

from __future__ import annotations

import gc
from typing import Iterator

import pytest


@pytest.fixture(autouse=True)
def collector_as_found() -> Iterator[None]:
    """A relay started in the test process freezes and re-tunes the collector; undo that after the test."""
    thresholds = gc.get_threshold()
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
    gc.set_threshold(*thresholds)
