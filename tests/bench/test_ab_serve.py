"""bench.ab_serve exports the revision it compares against as a plain tree that `bentoml serve` can start from."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.ab_serve import export_revision
from testing.server import ROOT


def test_export_revision_writes_that_revisions_tree(tmp_path: Path) -> None:
    dest = tmp_path / "tree"
    dest.mkdir()
    short = export_revision("HEAD", dest)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert short == head.strip()
    committed = subprocess.run(["git", "show", "HEAD:service.py"], cwd=ROOT, capture_output=True, text=True).stdout
    assert (dest / "service.py").read_text() == committed
    assert (dest / "runners" / "clip_service.py").is_file()
    assert not (dest / ".git").exists()
