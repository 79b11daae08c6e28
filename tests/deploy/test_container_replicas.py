"""Replicas in containers (issue 26, item 4): two containers of the bento's image and a Redis container (Debian's
redis-server, append-only file on a volume) on one podman network, behind HAProxy (deploy/haproxy/haproxy.cfg,
health-checked on /readyz). Deploy through the balancer, classify on each replica directly; kill one replica under
load: nothing is lost (the balancer retries what the dead one dropped and stops sending to it), no deployment is
lost; stop and restart Redis: enveloped 503s, then 200s again with no replica restarted.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from testing import containers as pc
from testing.client import assert_error, files
from testing.images import encode_png
from testing.waits import wait_for
from tools import shapes

pytestmark = pytest.mark.server

RED = {
    "classifier_configs": [
        {"name": "red", "examples_to_include": ["red shape"]},
        {"name": "other", "examples_to_include": ["blue shape", "green shape", "yellow shape"]},
    ],
    "augment_examples": False,
}


def red(seed: int) -> bytes:
    return encode_png(shapes.draw("red", "circle", np.random.default_rng(seed)))


@pytest.fixture(scope="module")
def cluster() -> Iterator[pc.ReplicaSet]:
    pc.cleanup()
    with pc.replica_set(pc.image_under_test()) as replica_set:
        yield replica_set


def classify(c: httpx.Client, dep: str, seed: int) -> httpx.Response:
    return c.post("/classify", params={"deployed_id": dep}, files=files(red(seed)))


def test_deploy_through_the_balancer_classify_on_each_replica(cluster: pc.ReplicaSet) -> None:
    with cluster.balancer.client() as lb:
        r = lb.post("/deploy_classifier", json=RED)
        assert r.status_code == 200, r.text
        dep = r.json()["deployed_id"]
    for replica in cluster.replicas:
        with replica.client() as c:
            r = classify(c, dep, 1)
            assert r.status_code == 200, (replica.name, r.text)
            assert r.json()["pred"] == "red"


def test_redis_stop_gives_envelopes_then_recovers_without_restarting_replicas(cluster: pc.ReplicaSet) -> None:
    with cluster.balancer.client() as lb:
        dep = lb.post("/deploy_classifier", json=RED).json()["deployed_id"]
    pc.podman("stop", "-t", "2", cluster.redis.name)
    try:
        for replica in cluster.replicas:
            with replica.client(timeout=30) as c:
                # The deployment lives in Redis: no answer from a stale copy, an enveloped 503 instead.
                assert_error(c.post("/deploy_classifier", json=RED), 503)
                assert c.get("/readyz").status_code == 503
        # Through the balancer: the replicas' own 503 envelopes until its health checks take both out, then its
        # own 503 in the same envelope, never an HTML page.
        with cluster.balancer.client(timeout=30) as lb:

            def balancer_gave_up() -> bool:
                r = lb.get("/deployments")
                assert_error(r, 503)
                return "No replica is ready" in r.json()["message"]

            wait_for(balancer_gave_up, "the balancer answers that no replica is ready", deadline_s=60)
    finally:
        pc.podman("start", cluster.redis.name)
    # Back (the append-only file kept the deployments), with the same replica processes.
    started = {r.name: r.state()["StartedAt"] for r in cluster.replicas}
    for replica in cluster.replicas:
        pc.wait_ready(replica, timeout=60)
        with replica.client() as c:
            r = classify(c, dep, 2)
            assert r.status_code == 200 and r.json()["pred"] == "red", r.text
    assert {r.name: r.state()["StartedAt"] for r in cluster.replicas} == started


def test_killing_a_replica_under_load_loses_no_request_and_no_deployment(cluster: pc.ReplicaSet) -> None:
    with cluster.balancer.client() as lb:
        # Both replicas in rotation (the balancer takes a replica back after two good health checks).
        try:
            wait_for(lambda: cluster.in_rotation() == {"api1", "api2"}, "both replicas in rotation", 120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the balancer's servers: {cluster.servers()}") from None
        dep = lb.post("/deploy_classifier", json=RED).json()["deployed_id"]
        before = {d["deployed_id"] for d in lb.get("/deployments").json()["deployments"]}
    stop = threading.Event()
    answered = threading.Semaphore(0)

    def load(worker: int) -> list[int]:
        statuses = []
        with cluster.balancer.client(timeout=120) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    statuses.append(classify(c, dep, worker * 10_000 + i).status_code)
                except httpx.HTTPError as exc:  # a reset reaching the client: a lost request
                    statuses.append(-1)
                    print("lost:", exc)
                answered.release()
        return statuses

    victim, survivor = cluster.replicas
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, w) for w in range(4)]
        for _ in range(20):  # the load is flowing (the deadline only catches a hang)
            assert answered.acquire(timeout=120)
        pc.podman("kill", victim.name)
        for _ in range(60):  # and keeps flowing on the survivor alone
            assert answered.acquire(timeout=120)
        stop.set()
        statuses = [s for f in futures for s in f.result(timeout=420)]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    # The balancer takes the dead one out of rotation.
    wait_for(lambda: cluster.in_rotation() == {"api2"}, "the killed replica out of rotation", deadline_s=60)
    with cluster.balancer.client() as lb:
        after = {d["deployed_id"] for d in lb.get("/deployments").json()["deployments"]}
    assert before <= after
    with survivor.client() as c:
        assert classify(c, dep, 3).json()["pred"] == "red"
