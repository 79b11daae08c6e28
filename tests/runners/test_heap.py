"""runners.heap: a service's start-up objects leave the collector's walks, and its pauses are measured (issue 29: full
collections that walked the start-up heap were most of /embed_image's p99)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# In a child process: freezing is for the rest of a process's life, not for the test runner's.
CHILD = r"""
import gc, json, time
startup = [[i, str(i), {"k": [i]}] for i in range(300_000)]  # a start-up heap: ~0.9 M tracked objects

def full_collection_s():
    t = time.perf_counter(); gc.collect(); return time.perf_counter() - t

before = min(full_collection_s() for _ in range(3))
from prometheus_client import REGISTRY
from runners.heap import drain_pauses, freeze_startup_heap
frozen = freeze_startup_heap()
after = min(full_collection_s() for _ in range(3))
cycle = []
cycle.append(cycle)  # garbage made after the freeze is still collected
del cycle
collected = gc.collect()
drain_pauses()  # the service's thread does this every second
pauses = REGISTRY.get_sample_value("zss_gc_pause_seconds_count", {"generation": "2"})
print(json.dumps({"frozen": frozen, "before": before, "after": after, "collected": collected, "pauses": pauses}))
"""


def test_the_start_up_heap_is_set_aside_and_later_garbage_still_collected() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["frozen"] > 900_000  # the start-up objects are in the permanent generation
    # A full collection no longer walks them: far cheaper than before (a ratio, not a time: any machine's speed).
    assert got["after"] < got["before"] / 5, got
    assert got["collected"] >= 1  # the cycle made afterwards
    assert got["pauses"] >= 4  # each collection since the freeze was measured (3 timed + 1)


# A collection can start inside prometheus_client while it holds its lock (multiprocess mode, as BentoML runs it): the
# pause must not be recorded there. With a threshold of 1 a collection starts at nearly every allocation, so creating
# labelled series (whose keys are built under that lock) meets one within the first few; recording from the callback
# deadlocked here, as it did the API worker that resumed a killed job (tests/test_job_restart.py).
UNDER_LOCK = r"""
import gc, json
from prometheus_client import Counter, REGISTRY
from runners.heap import drain_pauses, freeze_startup_heap
freeze_startup_heap(drain_period_s=3600)  # drained below, by hand
series = Counter("zss_test_series", "labelled series made under prometheus_client's lock", ["i"])
gc.set_threshold(1, 1, 1)
for i in range(200):
    series.labels(str(i)).inc()
gc.set_threshold(700, 10, 10)
recorded = drain_pauses()
print(json.dumps({"recorded": recorded, "series": REGISTRY.get_sample_value("zss_test_series_total", {"i": "199"})}))
"""


def test_a_collection_inside_prometheus_lock_neither_deadlocks_nor_goes_unmeasured(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", UNDER_LOCK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["series"] == 1.0
    assert got["recorded"] >= 200  # at least one collection per labelled series made
