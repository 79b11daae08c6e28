"""`bentoml build` packages the service offline (operators containerize the bento elsewhere): here the CUDA variant,
with no model in the store (tests/test_bento_models.py builds the CPU bento with its models and serves it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runners.serving import BUILD_SETTINGS
from settings import Settings
from testing.server import ROOT

# Longer than the suite's 600 s per test (pyproject): `bentoml build` runs up to 300 s each.
pytestmark = pytest.mark.timeout(1200)


def test_cpu_and_gpu_bentofiles_package_the_same_service() -> None:
    cpu, gpu = (yaml.safe_load((ROOT / name).read_text()) for name in ("bentofile.yaml", "bentofile.gpu.yaml"))
    for key in ("service", "include", "exclude"):
        assert cpu[key] == gpu[key], key
    assert cpu["python"]["requirements_txt"] == gpu["python"]["requirements_txt"]
    # Every package the service imports is in the bento (a bento that serves must not need the checkout).
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "testing", "tools", "bench"}
    assert {f"{p}/*.py" for p in packages} <= set(cpu["include"])


def test_bentoml_build_packages_the_gpu_variant(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    for name in ("ZSS_CLIP_MODEL", "ZSS_DETECTOR_MODEL"):
        env.pop(name, None)  # the default models: nothing from the model store, a code-only bento
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", "bentofile.gpu.yaml", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bentos = list((tmp_path / "home" / "bentos" / "zeroshot-server-gpu").glob("*/src"))
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
            # the web page is mounted
            " assert any(getattr(r, 'path', '') == '/ui' for r in service.routes.app.routes)",
        ],
        cwd=src,
        env={**clean, "ZSS_DETECTOR_MODEL": "none"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    reqs = (src.parent / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.14.1" in reqs and "bentoml" in reqs
    assert "--extra-index-url https://download.pytorch.org/whl/cu130" in reqs  # torch's CUDA 13.0 build
    docker = (src.parent / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:13.0.1-base-ubuntu24.04 AS base-container" in docker
    assert any("apt-get install" in ln and "curl" in ln and "python3-pip" in ln for ln in docker.splitlines())
    assert "uv venv --python 3.11" in docker
    assert "ENV PIP_BREAK_SYSTEM_PACKAGES=" in docker  # Ubuntu's pip may then install uv
    info = yaml.safe_load((src.parent / "bento.yaml").read_text())
    # Code only (no model from the store); the settings it was built with are recorded (issue 26), the defaults here.
    assert all(not s.get("models") for s in info["services"])
    assert set(info["args"]) == set(BUILD_SETTINGS)
    assert info["args"]["ZSS_DETECTOR_MODEL"] == Settings.model_fields["detector_model"].default


def test_a_build_naming_a_model_that_is_not_in_the_store_fails_naming_it(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "home"),
        "BENTOML_DO_NOT_TRACK": "true",
        "ZSS_CLIP_MODEL": "bentoml:no-such-clip",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "no-such-clip" in proc.stdout + proc.stderr
    assert not (tmp_path / "home" / "bentos").exists() or not any((tmp_path / "home" / "bentos").rglob("bento.yaml"))
