"""deploy/compose.yaml, run as a Docker user runs it, here with podman-compose (PyPI) on podman: two replicas, Redis
and HAProxy come up, and a classification with an API key goes through the balancer. The images are the one under
test and the infrastructure image (Debian's redis-server and haproxy) in place of the official redis and haproxy."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from testing import containers as pc
from testing.client import files
from testing.images import encode_png
from testing.server import ROOT, free_port
from testing.waits import wait_for
from tools import shapes

pytestmark = pytest.mark.server

COMPOSE = ROOT / "deploy" / "compose.yaml"
KEY = "c" * 40
RED = {
    "classifier_configs": [
        {"name": "red", "examples_to_include": ["red shape"]},
        {"name": "other", "examples_to_include": ["blue shape", "green shape", "yellow shape"]},
    ],
    "augment_examples": False,
}


def compose(project: str, env: dict[str, str], *args: str, timeout: float = 600) -> str:
    exe = Path(sys.executable).with_name("podman-compose")
    cmd = [str(exe), "-p", project, "-f", str(COMPOSE), *args]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def stack() -> Iterator[str]:
    image = pc.image_under_test()
    port = free_port()
    project = f"{pc.PREFIX}compose-{uuid.uuid4().hex[:6]}"
    env = {
        "ZSS_IMAGE": image,
        "ZSS_REDIS_IMAGE": pc.INFRA_IMAGE,
        "ZSS_LB_IMAGE": pc.INFRA_IMAGE,
        "ZSS_API_KEYS": f"{KEY}:ops:admin",
        "ZSS_PORT": str(port),
    }
    try:
        compose(project, env, "up", "-d")
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(
            [str(Path(sys.executable).with_name("podman-compose")), "-p", project, "-f", str(COMPOSE), "down", "-v"],
            env={**os.environ, **env},
            capture_output=True,
            timeout=300,
        )


def test_compose_stack_classifies_through_the_balancer(stack: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=stack, timeout=60, headers=headers) as c:

        def ready() -> bool:
            try:
                return c.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "the balancer finds a ready replica", deadline_s=420, every_s=1)
        r = c.post("/deploy_classifier", json=RED)
        assert r.status_code == 200, r.text
        blob = encode_png(shapes.draw("red", "circle", np.random.default_rng(6)))
        r = c.post("/classify", params={"deployed_id": r.json()["deployed_id"]}, files=files(blob))
        assert r.status_code == 200 and r.json()["pred"] == "red", r.text
        assert c.get("/deployments", headers={"Authorization": "Bearer " + "x" * 40}).status_code == 401
