"""Issue 32 through a real `bentoml serve` with two API workers and BentoML's request timeout at 1 s: the deploy jobs
in flight per tenant are counted in the registry the workers share (a job running in one worker makes the other
refuse the tenant's next deploy), and BentoML's own answers (here the 504 of its request timeout, which its
middleware sends outside the service's) carry the security headers like the routes' answers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from testing.client import assert_error
from testing.models import ClipFiles, clip_env
from testing.server import Server, running_server
from testing.waits import wait_for

pytestmark = pytest.mark.server

TIMEOUT_S = 1


@pytest.fixture(scope="module")
def two_workers(tiny_clip: ClipFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("two-workers")
    env = {
        **clip_env(tiny_clip, base / "data"),
        "BENTOML_CONFIG_OPTIONS": f"services.zeroshot.workers=2 services.zeroshot.traffic.timeout={TIMEOUT_S}",
        "ZSS_DEPLOY_MAX_JOBS_PER_TENANT": "1",
    }
    with running_server(env, base / "serve.log") as srv:
        yield srv


def _classes(tag: str, n: int, per_class: int = 1) -> list[dict[str, Any]]:
    return [
        {"name": f"{tag} {i}", "examples_to_include": [f"{tag} thing {i} {j}" for j in range(per_class)]}
        for i in range(n)
    ]


def _cancel(server: Server, job_id: str) -> dict[str, Any]:
    """Cancel a job through whichever worker takes the request (the other one's job is cancelled through the
    registry), and wait until it has ended. (The DELETE waits for the job to end, so on this server it may meet
    BentoML's 1 s timeout first: the cancel is asked before that.)"""
    r = httpx.delete(f"{server.url}/jobs/{job_id}", timeout=60)
    assert r.status_code in (200, 504) or "already" in r.text, r.text
    return wait_for(
        lambda: (j := httpx.get(f"{server.url}/jobs/{job_id}", timeout=60).json())["state"] != "running" and j,
        f"job {job_id} ended",
        deadline_s=60,
    )


def _workers_answering(log: str, status: int) -> set[str]:
    return set(re.findall(rf"\[entry_service:zeroshot:(\d+)\][^\n]*path=/deploy_classifier[^\n]*status={status}", log))


def test_deploy_jobs_in_flight_per_tenant_are_counted_across_the_api_workers(two_workers: Server) -> None:
    # 80,000 prompts: it runs until cancelled below (tens of seconds at least), however the workers share connections
    body = {"classifier_configs": _classes("big", 100, 10), "augment_examples": True}
    r = httpx.post(f"{two_workers.url}/deploy_classifier", params={"wait": "false"}, json=body, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    try:
        refused = []

        def both_workers_refused() -> bool:
            # A new connection per attempt: the workers share the listening socket, and each takes some of them.
            small = {"classifier_configs": _classes("small", 2)}
            r = httpx.post(f"{two_workers.url}/deploy_classifier", params={"wait": "false"}, json=small, timeout=60)
            refused.append(r.status_code)
            assert_error(r, 429, "ZSS_DEPLOY_MAX_JOBS_PER_TENANT")
            return len(_workers_answering(two_workers.log(), 429)) == 2

        wait_for(both_workers_refused, "a refusal from each API worker", deadline_s=60, every_s=0.1)
        assert httpx.get(f"{two_workers.url}/jobs/{job_id}", timeout=60).json()["state"] == "running"
    finally:
        ended = _cancel(two_workers, job_id)
    assert ended["state"] == "cancelled", ended
    # Its slot is free again, on either worker.
    after = {"classifier_configs": _classes("after", 2)}
    r = httpx.post(f"{two_workers.url}/deploy_classifier", json=after, timeout=60)
    assert r.status_code == 200, r.text


def test_bentomls_own_timeout_answer_carries_the_security_headers(two_workers: Server) -> None:
    body = {"classifier_configs": _classes("slow", 250), "augment_examples": True}  # 20,000 prompts: seconds
    with httpx.Client(base_url=two_workers.url, timeout=60) as c:
        r = c.post("/deploy_classifier", json=body)
        assert r.status_code == 504, r.text
        assert r.json() == {"error": f"Not able to process the request in {TIMEOUT_S} seconds"}
        assert r.headers.get("x-content-type-options") == "nosniff", r.headers
        assert r.headers.get("x-frame-options") == "DENY", r.headers
        # The deploy goes on as a job (the request timed out, not the job): cancelled here to free the machine.
        running = [j for j in c.get("/jobs").json()["jobs"] if j["state"] == "running"]
    for job in running:
        _cancel(two_workers, job["job_id"])
