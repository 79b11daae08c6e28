"""Deploys as jobs through the routes (issue 18): ``?wait=false`` answers 202 with a job to poll; a waiting deploy
behaves as before; a job outlives a waiting request that is cancelled; jobs are per tenant."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from engine.tenancy import Tenant
from service import build_app
from testing.client import CLASSES, assert_error
from testing.fakes import FakeClip, fake_engine


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, FakeClip]]:
    engine, clip = fake_engine(tmp_path / "data")
    with TestClient(build_app(engine), raise_server_exceptions=True) as client:
        yield client, clip
    engine.close()


def _poll(c: TestClient, url: str, until: str = "done", timeout: float = 60) -> dict:
    start = time.monotonic()
    while True:
        job = c.get(url).json()
        if job["state"] == until:
            return job
        assert job["state"] == "running" and time.monotonic() - start < timeout, job
        time.sleep(0.02)


def test_deploy_without_waiting_answers_202_and_the_job_reports_progress_to_done(
    served: tuple[TestClient, FakeClip],
) -> None:
    c, clip = served
    gate = threading.Event()
    real = clip.encode

    def slow(prompts: list[str]) -> np.ndarray:
        gate.wait(30)
        return real(prompts)

    clip.encode = slow  # type: ignore[method-assign]
    classes = [{"name": f"c{i}", "examples_to_include": [f"thing {i}"]} for i in range(30)]
    r = c.post("/deploy_classifier", params={"wait": "false"}, json={"classifier_configs": classes})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["state"] == "running" and r.headers["location"] == accepted["status_url"]
    running = c.get(accepted["status_url"]).json()
    assert running["state"] == "running" and running["deployed_id"] is None
    assert running["total"] in (0, 30) and running["done"] == 0  # 0 of 0 until the lookup starts
    gate.set()
    done = _poll(c, accepted["status_url"])
    assert (done["done"], done["total"], done["kind"]) == (30, 30, "classifier") and done["finished_at"]
    config = c.get("/model_config", params={"deployed_id": done["deployed_id"]}).json()
    assert [cl["name"] for cl in config["classifier_configs"]] == [f"c{i}" for i in range(30)]
    assert [j["job_id"] for j in c.get("/jobs").json()["jobs"]] == [accepted["job_id"]]


def test_waiting_deploy_is_unchanged_and_bad_bodies_are_refused_before_any_job(
    served: tuple[TestClient, FakeClip],
) -> None:
    c, _ = served
    r = c.post("/deploy_classifier", json={"classifier_configs": CLASSES})
    assert r.status_code == 200 and r.json()["message"] == "New model deployed."
    assert_error(c.post("/deploy_classifier", params={"wait": "false"}, json={"classifier_configs": []}), 422)
    assert_error(c.post("/deploy_detector", params={"wait": "false"}, json={"detector_configs": []}), 422)
    assert [j["state"] for j in c.get("/jobs").json()["jobs"]] == ["done"]  # the waiting deploy was a job too
    assert_error(c.get("/jobs/no-such-job"), 404, "Job not found")


def test_a_detector_deploy_job_and_a_failed_job_report(served: tuple[TestClient, FakeClip]) -> None:
    c, _ = served
    body = {"detector_configs": [{"name": "cat", "examples_to_include": ["cat"]}]}
    r = c.post("/deploy_detector", params={"wait": "false"}, json=body)
    assert r.status_code == 202
    done = _poll(c, r.json()["status_url"])
    assert done["kind"] == "detector" and done["deployed_id"]


def test_a_failed_job_reports_what_the_waiting_request_would_have_answered(tmp_path: Path) -> None:
    engine, _ = fake_engine(tmp_path / "data", detector=False)
    with TestClient(build_app(engine), raise_server_exceptions=True) as c:
        body = {"detector_configs": [{"name": "cat", "examples_to_include": ["cat"]}]}
        assert_error(c.post("/deploy_detector", json=body), 503, "Detection is unavailable")
        r = c.post("/deploy_detector", params={"wait": "false"}, json=body)
        assert r.status_code == 202
        failed = _poll(c, r.json()["status_url"], until="failed")
        assert "Detection is unavailable" in failed["message"] and failed["deployed_id"] is None
    engine.close()


def test_a_job_outlives_its_waiting_request_and_is_its_tenants_only(tmp_path: Path) -> None:
    engine, clip = fake_engine(tmp_path / "data")
    gate = threading.Event()
    real = clip.encode
    clip.encode = lambda prompts: (gate.wait(30), real(prompts))[1]  # type: ignore[method-assign]
    a, b, admin = Tenant("a"), Tenant("b"), Tenant("ops", admin=True)
    from engine.configs import DeployClassifierRequest

    body = DeployClassifierRequest.model_validate({"classifier_configs": CLASSES})

    async def scenario() -> None:
        waiting = asyncio.ensure_future(engine.deploy(body, caller=a))
        await asyncio.sleep(0.2)
        (job,) = engine.jobs.list(a)
        waiting.cancel()  # the client went away
        await asyncio.sleep(0.1)
        assert job.state == "running"
        gate.set()
        out = await engine.jobs.wait(job)
        assert job.state == "done" and job.deployed_id == out.deployed_id
        assert engine.jobs.get(job.job_id, b) is None and engine.jobs.list(b) == []
        assert engine.jobs.get(job.job_id, admin) is job

    asyncio.run(scenario())
    assert engine.deployments.store.get(engine.jobs.list(a)[0].deployed_id, "a") is not None
    engine.close()


# -- issue 32: bounded deploys, cancellable jobs -----------------------------------------------------------------------
def test_deploys_over_a_limit_are_refused_with_the_setting_named_before_any_encoding(tmp_path: Path) -> None:
    engine, clip = fake_engine(
        tmp_path / "data",
        deploy_max_example_chars=50,
        deploy_max_examples_per_class=2,
        deploy_max_classes=3,
        deploy_max_prompts=160,
    )
    calls = []
    real = clip.encode
    clip.encode = lambda prompts: (calls.append(len(prompts)), real(prompts))[1]  # type: ignore[method-assign]

    def cls(n: int, examples: int = 1, length: int = 5) -> list[dict[str, object]]:
        return [
            {"name": f"c{i}", "examples_to_include": [f"{i}{j}".ljust(length, "x") for j in range(examples)]}
            for i in range(n)
        ]

    with TestClient(build_app(engine), raise_server_exceptions=True) as c:
        for wait in ("true", "false"):
            deploy = lambda body: c.post("/deploy_classifier", params={"wait": wait}, json=body)  # noqa: E731
            assert_error(deploy({"classifier_configs": cls(1, length=51)}), 422, "ZSS_DEPLOY_MAX_EXAMPLE_CHARS")
            assert_error(deploy({"classifier_configs": cls(4)}), 413, "ZSS_DEPLOY_MAX_CLASSES")
            assert_error(deploy({"classifier_configs": cls(1, examples=3)}), 413, "ZSS_DEPLOY_MAX_EXAMPLES_PER_CLASS")
            # 3 texts x 80 templates = 240 prompts; without templates, 3.
            assert_error(deploy({"classifier_configs": cls(3)}), 413, "ZSS_DEPLOY_MAX_PROMPTS")
            assert_error(
                c.post("/deploy_detector", params={"wait": wait}, json={"detector_configs": cls(1, length=51)}), 422
            )
        assert calls == [] and c.get("/jobs").json()["jobs"] == []  # refused before any job or encoder call
        assert c.post("/deploy_classifier", json={"classifier_configs": cls(3), "augment_examples": False}).is_success
        # At the default limits: the probe's example (a 4 MB text of 333,333 words) is a 422 at once.
        engine.deploy_limits = type(engine.deploy_limits)()
        probe = {"classifier_configs": [{"name": "big", "examples_to_include": ["word " * 333_333]}]}
        assert_error(c.post("/deploy_classifier", json=probe), 422, "at most 1000")
    engine.close()


def test_the_prompt_limit_counts_only_the_texts_the_cache_lacks(tmp_path: Path) -> None:
    """Issue 32: texts already in the embedding cache cost no encoding, so they do not count against
    ZSS_DEPLOY_MAX_PROMPTS (160 here: two augmented texts); texts a deploy repeats count once."""
    engine, clip = fake_engine(tmp_path / "data", deploy_max_prompts=160)
    calls: list[int] = []
    real = clip.encode
    clip.encode = lambda prompts: (calls.append(len(prompts)), real(prompts))[1]  # type: ignore[method-assign]

    def body(*texts: str) -> dict[str, object]:
        return {"classifier_configs": [{"name": t, "examples_to_include": [t]} for t in texts]}

    with TestClient(build_app(engine)) as c:
        assert_error(c.post("/deploy_classifier", json=body("a", "b", "c")), 413, "240 (3 example texts not cached")
        assert c.post("/deploy_classifier", json=body("a", "b")).status_code == 200
        calls.clear()
        # 4 texts, 2 of them cached: 160 prompts to encode.
        assert c.post("/deploy_classifier", json=body("a", "b", "c", "d")).status_code == 200
        assert sum(calls) == 160, calls
        assert_error(
            c.post("/deploy_classifier", json=body("a", "e", "f", "g")), 413, "240 (3 example texts not cached, of 4"
        )
    engine.close()


def test_a_cancelled_job_stops_before_its_next_encoder_call(served: tuple[TestClient, FakeClip]) -> None:
    c, clip = served
    calls: list[int] = []
    real = clip.encode

    def slow(prompts: list[str]) -> np.ndarray:
        calls.append(len(prompts))
        time.sleep(0.05)
        return real(prompts)

    clip.encode = slow  # type: ignore[method-assign]
    classes = [{"name": f"c{i}", "examples_to_include": [f"thing {i}"]} for i in range(300)]  # 24,000 prompts
    job = c.post("/deploy_classifier", params={"wait": "false"}, json={"classifier_configs": classes}).json()
    while not calls:
        time.sleep(0.01)
    t0 = time.monotonic()
    r = c.delete(job["status_url"])
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled" and r.json()["message"] == "Job cancelled." and r.json()["finished_at"]
    assert time.monotonic() - t0 < 2
    seen = len(calls)
    time.sleep(0.3)
    assert len(calls) == seen < 24_000 // 512  # nothing encoded after the cancel
    assert c.get(job["status_url"]).json()["state"] == "cancelled"
    assert_error(c.delete(job["status_url"]), 409, "Job already cancelled")
    assert_error(c.delete("/jobs/no-such-job"), 404, "Job not found")
    assert c.get("/deployments").json()["deployments"] == []  # nothing registered


def test_deploy_jobs_in_flight_are_limited_per_tenant_and_stopping_refuses_new_ones(tmp_path: Path) -> None:
    engine, clip = fake_engine(tmp_path / "data", deploy_max_jobs_per_tenant=1)
    gate = threading.Event()
    real = clip.encode
    clip.encode = lambda prompts: (gate.wait(30), real(prompts))[1]  # type: ignore[method-assign]
    a, b = Tenant("a"), Tenant("b")
    from engine.configs import DeployClassifierRequest
    from errors import ZssError

    body = DeployClassifierRequest.model_validate({"classifier_configs": CLASSES})

    async def scenario() -> None:
        first = await engine.start_deploy(body, caller=a)
        with pytest.raises(ZssError) as refused:
            await engine.start_deploy(body, caller=a)
        assert refused.value.status_code == 429 and "ZSS_DEPLOY_MAX_JOBS_PER_TENANT" in refused.value.message
        assert refused.value.headers == {"Retry-After": "5"}
        other = await engine.start_deploy(body, caller=b)  # another tenant is not held up
        gate.set()
        await engine.jobs.wait(first)
        await engine.jobs.wait(other)
        await engine.start_deploy(body, caller=a)  # a's slot is free again
        gate.clear()
        slow = await engine.start_deploy(body, caller=b)
        engine.jobs.stop()  # SIGTERM: the running job stops, new ones are refused
        gate.set()
        with pytest.raises(ZssError) as stopped:
            await engine.jobs.wait(slow)
        assert stopped.value.status_code == 503
        with pytest.raises(ZssError) as late:
            await engine.start_deploy(body, caller=b)
        assert late.value.status_code == 503

    asyncio.run(scenario())
    engine.close()


def test_a_dead_processs_job_is_resumed_from_the_registry_and_a_finished_one_stays_readable(tmp_path: Path) -> None:
    """Issue 32, item 9, in-process: a job record left running by a dead process is taken over by the next engine on
    the same data dir and deployed from its stored body; finished jobs are read from the registry after a restart."""
    import subprocess
    import sys

    from engine.jobs import this_process

    first, _ = fake_engine(tmp_path / "data")
    with TestClient(build_app(first)) as c:
        done = c.post("/deploy_classifier", json={"classifier_configs": CLASSES}).json()
        (finished,) = c.get("/jobs").json()["jobs"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    body = {"classifier_configs": CLASSES[:2], "deployed_id": None, "augment_examples": False, "open_set": None}
    record = {
        "job_id": "left",
        "kind": "classifier",
        "tenant": "a",
        "admin": False,
        "state": "running",
        "done": 1,
        "total": 3,
        "created_at": 1.0,
        "body": body,
        "owner": f"{this_process().rsplit(':', 1)[0]}:{dead.stdout.strip()}",
    }
    first.deployments.store.put_job(record)  # type: ignore[attr-defined]
    first.close()

    second, _ = fake_engine(tmp_path / "data")
    with TestClient(build_app(second)) as c:
        assert c.get(f"/jobs/{finished['job_id']}").json()["deployed_id"] == done["deployed_id"]  # after a restart

        async def resume() -> None:
            assert second.resume_jobs() == 1 and second.resume_jobs() == 0  # taken over once
            await second.jobs.wait(second.jobs.get("left", Tenant("a")))  # type: ignore[arg-type]

        asyncio.run(resume())
        job = second.jobs.get("left", Tenant("a"))
        assert job is not None and job.state == "done" and second.jobs.get("left", Tenant("b")) is None
        dep = second.deployments.store.get(job.deployed_id, "a")  # type: ignore[arg-type]
        assert dep is not None and [k["name"] for k in dep.config["classifier_configs"]] == ["cat", "car"]
        assert second.deployments.store.get_job("left")["state"] == "done"  # type: ignore[attr-defined]
    second.close()


def _limit_across_engines(make: Any) -> None:
    """Two engines over one shared store (the API workers of one registry file, or replicas of one Redis), one job
    in flight per tenant: a's running job on the first makes the second refuse a's next deploy, not b's."""
    from engine.configs import DeployClassifierRequest
    from errors import ZssError

    (one, clip), (two, _) = make(), make()
    gate = threading.Event()
    real = clip.encode
    clip.encode = lambda prompts: (gate.wait(30), real(prompts))[1]  # type: ignore[method-assign]
    body = DeployClassifierRequest.model_validate({"classifier_configs": CLASSES})
    a, b = Tenant("a"), Tenant("b")

    async def scenario() -> None:
        first = await one.start_deploy(body, caller=a)
        with pytest.raises(ZssError) as refused:
            await two.start_deploy(body, caller=a)
        assert refused.value.status_code == 429 and "ZSS_DEPLOY_MAX_JOBS_PER_TENANT" in refused.value.message
        await two.jobs.wait(await two.start_deploy(body, caller=b))  # another tenant is not held up
        gate.set()
        await one.jobs.wait(first)
        await two.jobs.wait(await two.start_deploy(body, caller=a))  # a's slot is free again, on either

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        one.close()
        two.close()


def test_deploy_jobs_in_flight_are_limited_per_tenant_across_workers_of_one_registry(tmp_path: Path) -> None:
    """Issue 32: the limit is the registry's (shared by the API workers of a server), not one worker's."""
    _limit_across_engines(lambda: fake_engine(tmp_path / "data", deploy_max_jobs_per_tenant=1))


def test_deploy_jobs_in_flight_are_limited_per_tenant_across_replicas_of_one_redis(
    redis_server: Any, redis_prefix: str, tmp_path: Path
) -> None:
    """Issue 32: with ZSS_REDIS_URL the limit is Redis's, shared by the replicas (each with a data dir of its own)."""
    n = iter(range(2))
    _limit_across_engines(
        lambda: fake_engine(
            tmp_path / f"replica-{next(n)}",
            deploy_max_jobs_per_tenant=1,
            redis_url=redis_server.url,
            redis_prefix=redis_prefix,
        )
    )


def test_a_started_deploy_job_is_committed_before_start_deploy_returns(tmp_path: Path) -> None:
    """Issue 32: the 202 of ``?wait=false`` follows the job's record: when ``start_deploy`` returns, before the job
    has run at all, another connection to the registry file (what the next start would read after a kill -9) finds
    it running, with the body to resume from."""
    from cache.registry import Registry
    from engine.configs import DeployClassifierRequest

    engine, _ = fake_engine(tmp_path / "data")
    body = DeployClassifierRequest.model_validate({"classifier_configs": CLASSES})

    async def scenario() -> None:
        job = await engine.start_deploy(body, caller=Tenant("a"))
        other = Registry(engine.deployments.store.path)  # type: ignore[attr-defined]
        try:
            rec = other.get_job(job.job_id)
        finally:
            other.close()
        assert rec is not None and rec["state"] == "running" and rec["tenant"] == "a", rec
        assert rec["body"]["classifier_configs"][0]["name"] == CLASSES[0]["name"]
        await engine.jobs.wait(job)

    asyncio.run(scenario())
    engine.close()


def test_a_job_running_in_another_worker_is_cancelled_through_the_registry(tmp_path: Path) -> None:
    """DELETE /jobs/{id} taken by an API worker that does not run the job: the request goes through the registry and
    the worker running it stops at its next heartbeat (after the chunk it is encoding)."""
    from engine.configs import DeployClassifierRequest

    (one, clip), (two, _) = (fake_engine(tmp_path / "data") for _ in range(2))
    gate = threading.Event()
    calls: list[int] = []
    real = clip.encode
    clip.encode = lambda prompts: (calls.append(len(prompts)), gate.wait(30), real(prompts))[2]  # type: ignore[method-assign]
    texts = [{"name": f"c{i}", "examples_to_include": [f"thing {i}"]} for i in range(60)]  # 60 x 80: 5 chunks
    body = DeployClassifierRequest.model_validate({"classifier_configs": texts, "augment_examples": True})

    async def scenario() -> None:
        job = await one.start_deploy(body, caller=Tenant("a"))
        seen = two.jobs.get(job.job_id, Tenant("a"))
        assert seen is not None and seen.task is None  # another process's job, read from the registry
        cancelling = asyncio.create_task(two.jobs.cancel(seen, wait_s=30))
        await asyncio.sleep(0.5)
        gate.set()  # the first chunk ends; its heartbeat finds the request
        ended = await cancelling
        assert ended.state == "cancelled" and job.state == "cancelled", (ended, job)
        assert len(calls) < 5  # stopped before the rest of the deploy was encoded

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        one.close()
        two.close()
