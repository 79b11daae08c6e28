"""Several replicas, one state: two (then three) real `bentoml serve` replicas on data dirs of their own and one real
Redis (ZSS_REDIS_URL). A deployment made, updated or deleted through one replica is what the others serve; examples
encoded by one are encoded by none of the others; Redis dying under load gives 503 envelopes (never a hang, never a
500) and its return gives 200s again without a restart of the replicas.

The replicas run the tiny CLIP with the detector off: cheap to start, and the same weights everywhere, so the same
deployment scores alike on every replica."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testing.client import CLASSES, assert_error, deploy, files
from testing.images import jpeg_bytes
from testing.models import ClipFiles, clip_env
from testing.redis import RedisServer, running_redis
from testing.server import Server, running_server, start_server, stop_server
from testing.waits import wait_for

ENCODED = "zss_text_examples_encoded_total"
HANG_S = 60.0  # a request this slow is a hang, on any machine


@pytest.fixture(scope="module")
def redis_for_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The replicas' Redis, their own: the last test kills it."""
    with running_redis(tmp_path_factory.mktemp("replicas-redis")) as srv:
        yield srv


def replica_env(tiny_clip: ClipFiles, redis: RedisServer, data: Path) -> dict[str, str]:
    return {**clip_env(tiny_clip, data), "ZSS_REDIS_URL": redis.url}


@pytest.fixture(scope="module")
def replicas(
    tiny_clip: ClipFiles, redis_for_replicas: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    base = tmp_path_factory.mktemp("replicas")
    env_a = replica_env(tiny_clip, redis_for_replicas, base / "a")
    env_b = replica_env(tiny_clip, redis_for_replicas, base / "b")
    with cf.ThreadPoolExecutor(2) as pool:  # started side by side: half the wait
        starting = [pool.submit(start_server, env, base / f"{name}.log") for name, env in (("a", env_a), ("b", env_b))]
        errors = [f.exception() for f in cf.wait(starting).done]
    started = [f.result() for f in starting if f.exception() is None]
    try:
        if any(errors):
            raise RuntimeError(f"a replica did not start: {errors}")
        yield started[0], started[1]
    finally:
        with cf.ThreadPoolExecutor(2) as pool:  # stopped side by side too
            list(pool.map(stop_server, started))


def classify(server: Server, deployed_id: str) -> dict[str, Any]:
    with server.client() as c:
        r = c.post("/classify", params={"deployed_id": deployed_id}, files=files(jpeg_bytes(3)))
    assert r.status_code == 200, r.text
    return r.json()


def test_a_deployment_made_updated_or_deleted_on_one_replica_is_what_the_other_serves(
    replicas: tuple[Server, Server],
) -> None:
    a, b = replicas
    with a.client() as ca:
        dep = deploy(ca, CLASSES[:2])
    deployed_id = dep["deployed_id"]
    on_a = classify(a, deployed_id)
    assert classify(b, deployed_id) == on_a and set(on_a["scores"]) == {"cat", "car"}

    with b.client() as cb:
        updated = deploy(cb, CLASSES, deployed_id=deployed_id)
    assert updated == {"deployed_id": deployed_id, "message": "Model updated."}
    assert set(classify(a, deployed_id)["scores"]) == {"cat", "car", "tree"}  # A had v1 compiled: it notices v2
    with a.client() as ca:
        assert ca.get("/model_config", params={"deployed_id": deployed_id}).json()["classifier_configs"] == CLASSES
        assert deployed_id in {d["deployed_id"] for d in ca.get("/deployments").json()["deployments"]}
        assert ca.delete(f"/deployments/{deployed_id}").status_code == 200
    with b.client() as cb:
        r = cb.post("/classify", params={"deployed_id": deployed_id}, files=files(jpeg_bytes(3)))
        assert_error(r, 400, "Key not found")
        assert_error(cb.get("/model_config", params={"deployed_id": deployed_id}), 400, "Key not found")


def test_examples_encoded_by_one_replica_are_encoded_by_no_other_even_one_started_later(
    replicas: tuple[Server, Server], tiny_clip: ClipFiles, redis_for_replicas: RedisServer, tmp_path: Path
) -> None:
    a, b = replicas
    classes = [{"name": "fresh", "examples_to_include": ["a red kite", "a blue kite"], "examples_to_exclude": []}]
    before_a, before_b = a.metric(ENCODED), b.metric(ENCODED)
    with a.client() as ca:
        first = deploy(ca, classes)["deployed_id"]
    assert a.metric(ENCODED) - before_a == 2
    with b.client() as cb:
        second = deploy(cb, classes)["deployed_id"]  # a deployment of its own, with the same examples
    assert b.metric(ENCODED) == before_b  # B encoded none of them: A's vectors came from Redis
    assert classify(b, second)["scores"] == classify(a, first)["scores"]

    env_c = replica_env(tiny_clip, redis_for_replicas, tmp_path / "c")
    with running_server(env_c, tmp_path / "c.log") as c, c.client() as cc:
        deploy(cc, classes)
        assert classify(c, first) == classify(a, first)
        assert c.metric(ENCODED) == 0


def test_redis_dying_under_load_gives_503_envelopes_and_its_return_gives_200s(
    replicas: tuple[Server, Server], redis_for_replicas: RedisServer
) -> None:
    a, b = replicas
    with a.client() as ca:
        deployed_id = deploy(ca, CLASSES)["deployed_id"]
    classify(b, deployed_id)  # both replicas have it compiled: each request only checks its version in Redis
    image = files(jpeg_bytes(5))
    seen: list[tuple[float, int, str, float]] = []  # (start, status, message, seconds)
    stop = threading.Event()

    def load(server: Server) -> None:
        with server.client(timeout=HANG_S) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                r = c.post("/classify", params={"deployed_id": deployed_id}, files=image)
                body = r.json()
                message = body.get("message", "") if r.status_code != 200 else ""
                seen.append((t0, r.status_code, message, time.monotonic() - t0))

    def answered(after: float, status: int, n: int) -> bool:
        return sum(t0 >= after and s == status for t0, s, _, _ in list(seen)) >= n

    with cf.ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load, s) for s in (a, b, a, b)]
        wait_for(lambda: answered(0.0, 200, 8), "200s under load before the kill")
        kill_sent = time.monotonic()  # Redis may be gone from here on: a request answered after it may get a 503
        redis_for_replicas.kill()  # returns once the process is gone (SIGKILL, then wait)
        killed_at = time.monotonic()  # Redis is gone: every request started from now on needs it and fails
        wait_for(lambda: answered(killed_at, 503, 8), "503s after the kill")
        with httpx.Client(timeout=10) as probe:
            assert probe.get(a.url + "/readyz").status_code == 503  # readiness says it too
        stop.set()
        for w in workers:
            w.result(timeout=60)

    before = [s for t0, s, _, t in seen if t0 + t < kill_sent]  # answered before the kill
    after = [(s, m) for t0, s, m, _ in seen if t0 > killed_at]
    assert before and set(before) == {200}
    # Requests in flight when Redis died had checked their version already: 200 or 503, nothing else.
    assert {s for _, s, _, _ in seen} <= {200, 503}
    assert after and {s for s, _ in after} == {503}, {s for s, _ in after}
    assert all(f"Redis at 127.0.0.1:{redis_for_replicas.port} unavailable" in m for _, m in after)
    assert max(t for _, _, _, t in seen) < HANG_S / 2  # never a hang (the Redis client waits 0.5 s at most)
    with a.client() as ca:  # a deploy needs Redis too
        r = ca.post("/deploy_classifier", json={"classifier_configs": CLASSES})
        assert_error(r, 503, "unavailable")

    redis_for_replicas.start()  # same port, same append-only file: the deployments are back
    for server in (a, b):

        def classified(server: Server = server) -> httpx.Response | None:
            with server.client() as c:
                r = c.post("/classify", params={"deployed_id": deployed_id}, files=image)
            return r if r.status_code == 200 else None

        wait_for(classified, "a 200 after Redis came back")  # recovered without a restart
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    for server in (a, b):
        assert "Traceback" not in server.log(), server.log()[-3000:]
