"""`bentoml build` packages the service offline (operators containerize the bento elsewhere)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from testing.server import ROOT


def test_bentoml_build_packages_the_service(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bentos = list((tmp_path / "home" / "bentos" / "zeroshot-server").glob("*/src"))
    assert len(bentos) == 1
    src = bentos[0]
    for rel in (
        "service.py",
        "settings.py",
        "runners/clip_service.py",
        "runners/owl_service.py",
        "semantic/classify.py",
        "cache/embeddings.py",
        "ui/index.html",
        "ui/app.js",
        "ui/app.css",
    ):
        assert (src / rel).is_file(), rel
    assert not (src / "tests").exists() and not (src / ".venv").exists()
    # The bento's code is self-contained: the service imports from the bento alone (no checkout on the path).
    clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import service, sys; assert not any('/tests' in p for p in sys.path);"
            " assert any(getattr(r, 'path', '') == '/ui' for r in service.app.routes)",  # the web page is mounted
        ],
        cwd=src,
        env={**clean, "ZSS_DETECTOR_MODEL": "none"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    reqs = next((src.parent / "env" / "python").glob("requirements.txt")).read_text()
    assert "torch==2.14.1" in reqs and "bentoml" in reqs
