"""A short headless Locust run against the real server: every route of the mix, no failed request."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testing.server import ROOT, Server

pytestmark = pytest.mark.server


def test_locust_smoke_has_no_failures(server: Server, tmp_path: Path) -> None:
    exe = shutil.which("locust", path=str(Path(sys.executable).parent)) or "locust"
    prefix = tmp_path / "smoke"
    cmd = [
        exe,
        "-f",
        str(ROOT / "locustfile.py"),
        "--headless",
        "-u",
        "8",
        "-r",
        "8",
        "-t",
        "30s",
        "--host",
        server.url,
        "--only-summary",
        "--csv",
        str(prefix),
        "--class-sizes",
        "10,100",
        "--stop-timeout",
        "10",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(f"{prefix}_stats.csv", newline="") as fh:
        rows = {r["Name"]: r for r in csv.DictReader(fh)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 20, out
    assert int(total["Failure Count"]) == 0, out
    names = set(rows)
    for route in ("/embed_image", "/embed_text", "/detect"):
        assert route in names, (route, sorted(names))
    assert any(n.startswith("/classify [") for n in names), sorted(names)
    assert proc.returncode == 0, out
