"""Python's garbage collector in a serving process: the objects made while starting are set aside, and every pause is
measured.

A service process holds millions of objects from its start (torch, BentoML, the model's modules, the settings), all
of them in the collector's oldest generation. Under load the request path makes enough short-lived cycles that a full
collection runs every few seconds, and each one walked all of those objects: 300-540 ms with the event loop (or a lane
of the encoder) stopped, which every request in flight waited out; that was most of /embed_image's p99 under 16 clients
(BENCHMARKS.md, issue 29). :func:`freeze_startup_heap` moves what exists after the start into the permanent generation
(``gc.freeze``), which collections never walk: they then cost only what the requests made since. Nothing is disabled:
garbage made later is still collected.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import Histogram

log = logging.getLogger(__name__)

GC_PAUSE = Histogram(
    "zss_gc_pause_seconds",
    "Pauses of Python's garbage collector in a service process, by generation.",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


class _PauseClock:
    """A ``gc.callbacks`` entry that observes each collection's duration (the collector runs on one thread at a time,
    under the GIL, so one start time suffices)."""

    def __init__(self) -> None:
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started:
            GC_PAUSE.labels(str(info.get("generation", "?"))).observe(time.perf_counter() - self.started)
            self.started = 0.0


_clock = _PauseClock()


def freeze_startup_heap() -> int:
    """Collect once, then move every object this process holds into the permanent generation, and measure the
    collector's pauses from now on. Call it at the end of a service's start, when its models are loaded. Returns how
    many objects were set aside."""
    gc.collect()
    gc.freeze()
    if _clock not in gc.callbacks:
        gc.callbacks.append(_clock)
    frozen = gc.get_freeze_count()
    log.info("%d objects from the start set aside from garbage collection", frozen)
    return frozen
