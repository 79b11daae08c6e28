"""bench.around_tower runs every stage on the tests' tiny CLIP and prints a positive CPU time for each, so the script
that BENCHMARKS.md quotes is known to work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from testing.models import ClipFiles
from testing.server import ROOT


def test_every_stage_reports_a_positive_cpu_time(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.around_tower",
            "--model",
            str(tiny_clip.config),
            "--pretrained",
            str(tiny_clip.checkpoint),
            "--images",
            "8",
            "--batch",
            "4",
            # float32 and the static int8 graph run on any x86 CPU; bf16 only where it is native.
            "--precisions",
            "none,int8",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout.replace("**", "")
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+%?) \|$", table, flags=re.M))
    for stage in (
        "decode (640x480 JPEG, draft)",
        "stack the request's pixels",
        "wire: pickle + unpickle the pixels",
        "tower, batch 4, openvino fp32",
        "tower, batch 4, openvino int8",
        "around the tower (1-4)",
    ):
        assert stage in rows, (stage, list(rows))
    resize = [name for name in rows if name.startswith("resize to ")]
    assert len(resize) == 1, sorted(rows)
    assert float(rows["tower, batch 4, openvino fp32"]) > 0 and float(rows["tower, batch 4, openvino int8"]) > 0
    assert float(rows["decode (640x480 JPEG, draft)"]) > 0 and float(rows[resize[0]]) > 0
    assert rows["around / (around + tower fp32)"].endswith("%")
