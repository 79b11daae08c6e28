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
import threading
import time
from collections import deque
from typing import Any

from prometheus_client import Histogram

log = logging.getLogger(__name__)

GC_PAUSE = Histogram(
    "zss_gc_pause_seconds",
    "Pauses of Python's garbage collector in a service process, by generation.",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
DRAIN_PERIOD_S = 1.0  # how often the noted pauses reach the histogram
PENDING_MAX = 10_000  # pauses noted and not yet recorded (the oldest are dropped beyond it)


class _PauseClock:
    """A ``gc.callbacks`` entry that notes each collection's duration. It takes no lock and calls no metric: a
    collection can start anywhere an object is allocated, including inside prometheus_client while that thread holds
    its (non-reentrant) lock, and observing the histogram there deadlocked the process (the API worker that resumed a
    killed job hung before ready, tests/test_job_restart.py). The pauses wait in a bounded deque, whose append is
    atomic under the GIL, until :func:`drain_pauses` records them from a thread of its own."""

    def __init__(self) -> None:
        self.started = 0.0  # the collector runs on one thread at a time, under the GIL: one start time suffices
        self.pending: deque[tuple[int, float]] = deque(maxlen=PENDING_MAX)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started:
            self.pending.append((int(info.get("generation", -1)), time.perf_counter() - self.started))
            self.started = 0.0


_clock = _PauseClock()
_drainer: threading.Thread | None = None


def drain_pauses() -> int:
    """Record the pauses noted since the last drain in ``zss_gc_pause_seconds``; how many (never from a GC callback)."""
    n = 0
    while True:
        try:
            generation, seconds = _clock.pending.popleft()
        except IndexError:
            return n
        GC_PAUSE.labels(str(generation)).observe(seconds)
        n += 1


def _drain_forever(period_s: float) -> None:
    while True:
        time.sleep(period_s)
        try:
            drain_pauses()
        except Exception:  # noqa: BLE001 - a metric must never end the thread that records the others
            log.exception("recording the collector's pauses failed")


def freeze_startup_heap(drain_period_s: float = DRAIN_PERIOD_S) -> int:
    """Collect once, then move every object this process holds into the permanent generation, and measure the
    collector's pauses from now on. Call it at the end of a service's start, when its models are loaded. Returns how
    many objects were set aside."""
    global _drainer
    gc.collect()
    gc.freeze()
    if _clock not in gc.callbacks:
        gc.callbacks.append(_clock)
    if _drainer is None:
        _drainer = threading.Thread(target=_drain_forever, args=(drain_period_s,), name="zss-gc-pauses", daemon=True)
        _drainer.start()
    frozen = gc.get_freeze_count()
    log.info("%d objects from the start set aside from garbage collection", frozen)
    return frozen
