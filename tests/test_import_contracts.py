"""The layer contracts in pyproject.toml catch what the README's layout forbids: on a copy of the tree, one forbidden
import of each kind (those issue 28 found uncaught) makes `lint-imports` fail, naming the import; the untouched copy
passes. One run for all the imports together (each is named in the report), one for the untouched copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["api", "bench", "cache", "engine", "imaging", "runners", "semantic", "testing", "tests", "tools"]
FILES = ["service.py", "settings.py", "errors.py", "pyproject.toml"]

# (file, module it becomes, the forbidden import added to it, what the graph calls the imported module)
FORBIDDEN = [
    ("runners/device.py", "runners.device", "import cache.embeddings", "cache.embeddings"),
    ("runners/device.py", "runners.device", "import semantic.classify", "semantic.classify"),
    ("tools/shapes.py", "tools.shapes", "import api.errors", "api.errors"),
    ("tools/shapes.py", "tools.shapes", "import service", "service"),
    ("tools/shapes.py", "tools.shapes", "import testing.images", "testing.images"),
    ("service.py", "service", "import testing.images", "testing.images"),
    ("settings.py", "settings", "import bentoml", "bentoml"),
    ("errors.py", "errors", "import engine.tenancy", "engine.tenancy"),
    # the bench/test-only image encoding (issue 28 item 4) stays off the served path
    ("runners/clip_service.py", "runners.clip_service", "import testing.clip_images", "testing.clip_images"),
]


def copy_tree(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in FILES:
        shutil.copy2(ROOT / name, dest / name)
    return dest


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1", "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_tree(tmp_path_factory.mktemp("contracts"))


def test_the_untouched_copy_keeps_every_contract(tree: Path) -> None:
    out = lint_imports(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " broken" in out.stdout and "0 broken" in out.stdout


def test_a_forbidden_import_of_each_kind_breaks_a_contract(tree: Path, tmp_path: Path) -> None:
    broken = copy_tree(tmp_path / "broken")
    for path, _, line, _ in FORBIDDEN:
        with (broken / path).open("a", encoding="utf-8") as fh:
            fh.write(f"\n{line}  # forbidden: tests/test_import_contracts.py\n")
    out = lint_imports(broken)
    report = out.stdout + out.stderr
    assert out.returncode != 0, report
    for _, importer, _, imported in FORBIDDEN:
        assert f"{importer} -> {imported}" in report, f"{importer} -> {imported} not reported:\n{report}"
    # settings -> bentoml is also a way for the engine to reach BentoML: that contract breaks too, through it.
    assert "the engine has no HTTP and no BentoML (nor through settings or errors) BROKEN" in report, report
