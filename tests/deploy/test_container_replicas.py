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
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from testing import containers as pc
from testing.client import assert_error, files
from testing.images import encode_png
from testing.server import ROOT, free_port
from testing.waits import wait_for
from tools import shapes

pytestmark = pytest.mark.server

HAPROXY = ROOT / "deploy" / "haproxy"
RED = {
    "classifier_configs": [
        {"name": "red", "examples_to_include": ["red shape"]},
        {"name": "other", "examples_to_include": ["blue shape", "green shape", "yellow shape"]},
    ],
    "augment_examples": False,
}


@dataclass
class Cluster:
    network: str
    redis: pc.Container
    replicas: list[pc.Container]
    balancer: pc.Container
    stats: str  # HAProxy's statistics page (deploy/haproxy/haproxy.cfg)

    def servers(self) -> dict[str, str]:
        """The balancer's view of its servers api1, api2: their status (UP, DOWN, MAINT ...)."""
        rows = httpx.get(self.stats + "/;csv", timeout=10).text.splitlines()
        head = rows[0].lstrip("# ").split(",")
        cells = [dict(zip(head, row.split(","))) for row in rows[1:]]
        return {c["svname"]: c["status"] for c in cells if c.get("pxname") == "api" and c["svname"] != "BACKEND"}

    def in_rotation(self) -> set[str]:
        """The replicas the balancer sends to now."""
        return {name for name, status in self.servers().items() if status == "UP"}


def red(seed: int) -> bytes:
    return encode_png(shapes.draw("red", "circle", np.random.default_rng(seed)))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    pc.cleanup()
    image = pc.image_under_test()
    pc.podman("image", "exists", pc.INFRA_IMAGE)
    names: list[str] = []
    with pc.network() as net, pc.volume() as redis_data:
        try:
            redis = pc.run_container(
                pc.INFRA_IMAGE,
                name=pc.unique("redis"),
                network=net,
                publish=None,
                volumes={redis_data: "/data"},
                extra=["--user", "redis"],
                command=["redis-server", "--appendonly", "yes", "--dir", "/data", "--protected-mode", "no"],
            )
            names.append(redis.name)
            env = {"ZSS_REDIS_URL": f"redis://{redis.name}:6379/0", "ZSS_DATA_DIR": "/tmp/zss"}
            replicas = [pc.run_container(image, name=pc.unique(f"api{i}"), network=net, env=env) for i in (1, 2)]
            names += [r.name for r in replicas]
            stats_port = free_port()
            balancer = pc.run_container(
                pc.INFRA_IMAGE,
                name=pc.unique("lb"),
                network=net,
                env={"ZSS_API1": replicas[0].name, "ZSS_API2": replicas[1].name},
                volumes={str(HAPROXY): "/usr/local/etc/zss:ro"},
                extra=["--user", "haproxy", "-p", f"127.0.0.1:{stats_port}:8404"],
                command=["haproxy", "-W", "-db", "-f", "/usr/local/etc/zss/haproxy.cfg"],
            )
            names.append(balancer.name)
            with cf.ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda r: pc.wait_ready(r, timeout=420), replicas))
            pc.wait_ready(balancer, timeout=60)
            yield Cluster(net, redis, replicas, balancer, f"http://127.0.0.1:{stats_port}")
        finally:
            pc.remove(*names)


def classify(c: httpx.Client, dep: str, seed: int) -> httpx.Response:
    return c.post("/classify", params={"deployed_id": dep}, files=files(red(seed)))


def test_deploy_through_the_balancer_classify_on_each_replica(cluster: Cluster) -> None:
    with cluster.balancer.client() as lb:
        r = lb.post("/deploy_classifier", json=RED)
        assert r.status_code == 200, r.text
        dep = r.json()["deployed_id"]
    for replica in cluster.replicas:
        with replica.client() as c:
            r = classify(c, dep, 1)
            assert r.status_code == 200, (replica.name, r.text)
            assert r.json()["pred"] == "red"


def test_redis_stop_gives_envelopes_then_recovers_without_restarting_replicas(cluster: Cluster) -> None:
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


def test_killing_a_replica_under_load_loses_no_request_and_no_deployment(cluster: Cluster) -> None:
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
