"""bench.tail: the per-request tail probe of issue 29 (slow requests in clusters, the collector's pauses beside them),
its pieces on known inputs and one short run through a real `bentoml serve` of the tests' tiny CLIP."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bench.tail import Request, clusters, gc_pauses, report
from testing.models import ClipFiles
from testing.server import ROOT

pytestmark = pytest.mark.timeout(900)

METRICS = """\
# HELP zss_gc_pause_seconds Pauses of Python's garbage collector in a service process, by generation.
zss_gc_pause_seconds_bucket{generation="2",le="0.1"} 1.0
zss_gc_pause_seconds_bucket{generation="2",le="0.25"} 2.0
zss_gc_pause_seconds_bucket{generation="2",le="0.5"} 3.0
zss_gc_pause_seconds_bucket{generation="2",le="+Inf"} 3.0
zss_gc_pause_seconds_count{generation="2"} 3.0
zss_gc_pause_seconds_sum{generation="2"} 0.61
zss_gc_pause_seconds_bucket{generation="0",le="0.001"} 40.0
zss_gc_pause_seconds_bucket{generation="0",le="+Inf"} 40.0
zss_gc_pause_seconds_count{generation="0"} 40.0
zss_gc_pause_seconds_sum{generation="0"} 0.01
zss_image_batch_size_count 7.0
"""


def test_pauses_are_read_per_generation_with_the_bucket_that_holds_the_longest() -> None:
    assert gc_pauses(METRICS) == [["0", 40, "0.01", "<= 0.001"], ["2", 3, "0.61", "<= 0.5"]]
    assert gc_pauses("zss_image_batch_size_count 7.0\n") == []


def test_slow_requests_that_end_together_form_one_cluster() -> None:
    slow = [Request(0.0, 1.0, 200), Request(0.1, 1.2, 200), Request(3.0, 4.0, 200), Request(0, 1.4, 200)]
    assert [len(g) for g in clusters(slow)] == [3, 1]


def test_the_report_counts_after_the_ramp_and_flags_the_slow_ones() -> None:
    fast = [Request(t, t + 0.1, 200) for t in (3.0, 3.2, 3.4, 3.6, 3.8, 4.0, 4.2, 4.4, 4.6, 4.8)]
    requests = [Request(0.0, 1.0, 200), *fast, Request(5.0, 5.5, 200), Request(5.1, 5.2, 503)]
    text, ratio = report(requests, seconds=8.0, ramp_s=3.0)
    assert "requests 11 in 5 s: 2.2 img/s, errors 1" in text
    assert "slow requests (> 1.5x p50): 1, in 1 clusters" in text
    assert ratio == pytest.approx(5.0)  # p99 is the 0.5-s request, p50 0.1 s


def test_a_short_run_reports_rates_clusters_and_pauses(tiny_clip: ClipFiles) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.tail",
            "--model",
            str(tiny_clip.config),
            "--pretrained",
            str(tiny_clip.checkpoint),
            "--quantize",
            "none",
            "--seconds",
            "5",
            "--ramp",
            "1",
            "--clients",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"^requests \d+ in 4 s: [0-9.]+ img/s, errors 0$", run.stdout, re.M), run.stdout
    assert re.search(r"^p50 \d+ ms, p90 \d+ ms, p99 \d+ ms, max \d+ ms, p99/p50 [0-9.]+$", run.stdout, re.M)
    # Every service measures its collector's pauses: at least the young generation collected under load.
    assert re.search(r"^\| 0 \| [1-9]\d* \| [0-9.]+ \| <= [0-9.inf]+ \|$", run.stdout, re.M), run.stdout
