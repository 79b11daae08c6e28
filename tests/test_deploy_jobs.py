"""Long deploys as jobs through a real `bentoml serve` (issue 18, item 3): a deploy sent with ``?wait=false`` reports
its progress to the end; a one-text /embed_text sent meanwhile is answered in the text encoder's short lane while the
deploy still runs; a waiting deploy whose client gives up finishes as a job."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from testing.server import Server
from testing.waits import wait_for

pytestmark = pytest.mark.server

# The session's shared server (tests/conftest.py: tiny CLIP and tiny OWLv2): no server of its own.


def _classes(tag: str, n: int) -> list[dict[str, object]]:
    # Templates on: 80 prompts per text. The tiny CLIP encodes a few hundred prompts per second on 2 busy cores, so
    # n texts take about n / 5 seconds.
    return [{"name": f"{tag} {i}", "examples_to_include": [f"{tag} example {i}"]} for i in range(n)]


def _wait_done(c: httpx.Client, job_id: str) -> tuple[dict, list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []

    def finished() -> dict | None:
        job = c.get(f"/jobs/{job_id}").json()
        seen.append((job["done"], job["total"]))
        return job if job["state"] != "running" else None

    return wait_for(finished, f"job {job_id} finished", deadline_s=300), seen


def test_a_deploy_job_reports_progress_and_short_texts_take_their_own_lane(server: Server) -> None:
    with server.client(timeout=60) as c:
        r = c.post("/deploy_classifier", params={"wait": "false"}, json={"classifier_configs": _classes("long", 120)})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        wait_for(lambda: c.get(f"/jobs/{job_id}").json()["done"] > 0, "the first chunk (12 texts) committed")
        lane_before = server.metric("zss_text_short_lane_prompts_total")
        r = c.post("/embed_text", json={"texts": ["one short text"], "augment_examples": False})
        assert r.status_code == 200, r.text
        # Answered in the short lane while the deploy was still encoding (not after it, not inside its batches). An
        # order, not a time: the deploy is ~10,000 prompts, the short request one.
        assert c.get(f"/jobs/{job_id}").json()["state"] == "running"
        assert server.metric("zss_text_short_lane_prompts_total") == lane_before + 1
        job, seen = _wait_done(c, job_id)
        assert job["state"] == "done" and (job["done"], job["total"]) == (120, 120), job
        assert any(0 < done < 120 for done, _ in seen) and seen == sorted(seen)  # progress, in whole chunks
        assert c.get("/model_config", params={"deployed_id": job["deployed_id"]}).status_code == 200


def test_a_waiting_deploy_whose_client_gives_up_finishes_as_a_job(server: Server) -> None:
    body = {"classifier_configs": _classes("abandoned", 200)}
    with server.client(timeout=60) as c:
        before = {j["job_id"] for j in c.get("/jobs").json()["jobs"]}
        # The client sends a waiting deploy and hangs up as soon as the server has made it a job: no timing decides
        # whether it gave up in time (a bare socket: the server sees the connection close, as a client timeout would).
        payload = json.dumps(body).encode()
        raw = b"POST /deploy_classifier HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        raw += b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as impatient:
            impatient.sendall(raw)
            jobs = wait_for(
                lambda: [j for j in c.get("/jobs").json()["jobs"] if j["job_id"] not in before], "the deploy's job"
            )
        assert len(jobs) == 1, jobs
        job, _ = _wait_done(c, jobs[0]["job_id"])
        assert job["state"] == "done", job
        ids = [d["deployed_id"] for d in c.get("/deployments").json()["deployments"]]
        assert job["deployed_id"] in ids
        # The same deploy again is all cache hits: the abandoned request's work was kept.
        misses = server.metric("zss_embedding_cache_misses_total")
        assert c.post("/deploy_classifier", json=body).status_code == 200
        assert server.metric("zss_embedding_cache_misses_total") == misses


def test_a_cancelled_job_stops_encoding_within_seconds_and_oversized_deploys_are_refused(server: Server) -> None:
    """Issue 32: DELETE /jobs/{id} stops a long deploy's encoding (the text encoder's prompt count stops moving);
    the probe's 4 MB example and a deploy over the prompt limit are refused at once."""
    with server.client(timeout=60) as c:
        probe = {"classifier_configs": [{"name": "big", "examples_to_include": ["word " * 333_333]}]}
        r = c.post("/deploy_classifier", json=probe)
        assert r.status_code == 422 and "ZSS_DEPLOY_MAX_EXAMPLE_CHARS" in r.json()["message"], r.text[:300]
        many = [{"name": f"m{i}", "examples_to_include": [f"m {i} {j}" for j in range(40)]} for i in range(40)]
        r = c.post("/deploy_classifier", json={"classifier_configs": many})  # 1,600 texts x 80 = 128,000 prompts
        assert r.status_code == 413 and "ZSS_DEPLOY_MAX_PROMPTS" in r.json()["message"], r.text[:300]

        r = c.post("/deploy_classifier", params={"wait": "false"}, json={"classifier_configs": _classes("cut", 600)})
        job_id = r.json()["job_id"]
        wait_for(lambda: c.get(f"/jobs/{job_id}").json()["done"] > 0, "the job has started encoding")
        r = c.delete(f"/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        assert r.json()["done"] < 600

        def encoder_idle() -> bool:  # two reads a second apart agree: nothing more is being encoded
            before = server.metric("zss_text_prompts_encoded_total")
            time.sleep(1.0)
            return server.metric("zss_text_prompts_encoded_total") == before

        wait_for(encoder_idle, "the text encoder stops encoding the cancelled job", deadline_s=60)
        assert c.get(f"/jobs/{job_id}").json()["state"] == "cancelled"
