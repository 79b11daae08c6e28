"""bench.gpu_suite --smoke: every stage of the GPU suite runs on the CPU with tiny models and reports every row, so
the script is known to work before a GPU runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testing.server import ROOT

# Longer than the suite's 600 s per test (pyproject): its smoke run may take up to 600 s.
pytestmark = pytest.mark.timeout(1200)

EXPECTED = (
    "bare image tower, batch 1",
    "bare image tower, best batch",
    "tiny SigLIP image tower, best batch",
    "JPEG decode + resize, torchvision on cpu",
    "decode on cpu + tower together",
    "/embed_image",
    "cold deploy, 20 x 2 examples",
    "/classify (20 classes x 2)",
    "/detect (3 classes)",
    "/embed_image, decoded on the device",
)


def test_smoke_run_measures_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["stages"] == {"tower": "ok", "serve": "ok", "decode": "ok"}
    rows = {r["what"]: r for r in report["rows"]}
    for what in EXPECTED:
        assert rows[what]["value"] > 0, what
    served = ["/embed_image", "/classify (20 classes x 2)", "/detect (3 classes)"]
    served.append("/embed_image, decoded on the device")
    for what in served:
        assert rows[what]["errors"] == 0 and rows[what]["p99_ms"] >= rows[what]["p50_ms"] > 0, rows[what]
    assert "| goal | /embed_image over the bare tower's best batch |" in run.stdout  # the one table


def test_without_cuda_it_says_to_use_smoke() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "--smoke" in run.stderr
