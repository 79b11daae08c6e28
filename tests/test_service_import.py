"""Importing service.py declares the service and does nothing else (issue 28): in a fresh interpreter, no app is
built, nothing of BentoML or uvicorn is patched, no thread or signal handler is added and the command line is not
read. What BentoML 1.4 gives no later hook for happens at import only in its own processes: in its command line (the
server's metrics folder, the build's recorded settings) and in its workers (uvicorn's protocol, the request timers).
That `bentoml serve` still serves is every served test's business (tests/test_service.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: the state of everything service.py could touch, before and after importing it.
PROBE = r"""
import gc, json, signal, sys, threading
reads = []

class Argv(list):  # records who reads the command line
    pass

def _spy(name):
    base = getattr(list, name)
    def method(self, *a, **k):
        f = sys._getframe(1)
        reads.append(f"{f.f_code.co_filename}:{f.f_lineno}")
        return base(self, *a, **k)
    return method

for _n in ("__getitem__", "__iter__", "__len__", "__contains__", "index", "count", "copy"):
    setattr(Argv, _n, _spy(_n))

import uvicorn.config
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.server.http.traffic import TimeoutMiddleware
if PRETEND_CLI:
    import bentoml_cli.cli  # what `bentoml serve` / `bentoml build` have loaded when they import the service

def state():
    return {
        "protocols": dict(uvicorn.config.HTTP_PROTOCOLS),
        "timeout_middleware": id(TimeoutMiddleware.__call__),
        "metrics_dir": BentoMLContainer.prometheus_multiproc_dir.get(),
        "bento_arguments": dict(BentoMLContainer.bento_arguments.get()),
        "threads": sorted(t.name for t in threading.enumerate()),
        "sigterm": repr(signal.getsignal(signal.SIGTERM)),
    }

before = state()
sys.argv = Argv(["-c"])
import service
after = state()
from fastapi import FastAPI
print("PROBE" + json.dumps({
    "before": before,
    "after": after,
    "built": service.routes.built,
    "fastapi_apps": sum(isinstance(o, FastAPI) for o in gc.get_objects()),
    "argv_reads": reads,
}))
"""


def probe(pretend_cli: bool = False, **env: str) -> dict[str, Any]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "ZSS_DETECTOR_MODEL": "none", **env}
    if "BENTOML_RUNNER_MAP" not in env:
        full.pop("BENTOML_RUNNER_MAP", None)
    code = f"PRETEND_CLI = {pretend_cli!r}\n" + PROBE
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("PROBE"))
    return json.loads(line.removeprefix("PROBE"))


def project_reads(reads: list[str]) -> list[str]:
    return [r for r in reads if r.startswith(str(ROOT)) and "/.venv/" not in r and "site-packages" not in r]


def test_importing_the_service_changes_nothing(tmp_path: Path) -> None:
    got = probe(BENTOML_HOME=str(tmp_path / "home"))
    assert not got["built"] and got["fastapi_apps"] == 0  # the routes' app is built when the service starts
    assert got["after"] == got["before"]  # uvicorn, BentoML's middleware and configuration, threads, signals
    assert project_reads(got["argv_reads"]) == []


def test_in_bentomls_command_line_the_server_gets_its_own_metrics_folder(tmp_path: Path) -> None:
    got = probe(pretend_cli=True, BENTOML_HOME=str(tmp_path / "home"))
    before, after = got["before"], got["after"]
    assert after["metrics_dir"] != before["metrics_dir"] and "/zss-metrics/" in after["metrics_dir"]
    assert "ZSS_DETECTOR_MODEL" in after["bento_arguments"]  # recorded for `bentoml build`
    # Nothing of the workers' part: that process serves nothing.
    assert after["protocols"] == before["protocols"] and after["timeout_middleware"] == before["timeout_middleware"]
    assert not got["built"] and project_reads(got["argv_reads"]) == []


def test_in_a_bentoml_worker_uvicorn_and_the_timers_are_prepared(tmp_path: Path) -> None:
    # BentoML's arbiter starts every worker with BENTOML_RUNNER_MAP in its environment.
    got = probe(BENTOML_RUNNER_MAP="{}", BENTOML_HOME=str(tmp_path / "home"))
    before, after = got["before"], got["after"]
    assert after["protocols"]["auto"] == after["protocols"]["h11"] == "api.connections:GuardedH11Protocol"
    assert after["timeout_middleware"] != before["timeout_middleware"]
    assert after["metrics_dir"] == before["metrics_dir"]  # the server's business, not a worker's
    assert not got["built"]  # still built when the service starts, not at import
