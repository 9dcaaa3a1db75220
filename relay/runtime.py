"""The Python runtime set for a long-running mail server: the cyclic garbage collector.

Nearly everything a message makes (Deferreds, log events, envelopes,
replies) is freed by reference counting the moment it is done with; the
cyclic collector is only for what refers to itself.  With CPython's default
thresholds (700, 10, 10) it ran every few messages and, every few thousand,
walked every object the process has held since start-up (modules, classes,
the configuration, Twisted's machinery): a tenth of the CPU of a relayed
message, and pauses of 30 to 50 ms.  Once started, the relay freezes what
exists (``gc.freeze``: those objects are never walked again, and are still
freed by reference counting) and collects the young generation every
``GC_THRESHOLDS[0]`` new container objects instead of 700.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 20, 100)  # young, middle, old: see gc.set_threshold


def tune_collector() -> None:
    """Freeze the objects of start-up and set the collector's thresholds (idempotent)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
