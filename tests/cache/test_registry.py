"""The deployment store's contract (cache/interfaces.py DeploymentStore), tenants included, for every store: today the
SQLite registry and the Redis one (against a real redis-server) for several replicas. Plus the SQLite file's migration
from before tenants."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cache.interfaces import DeploymentStore
from cache.redis_store import RedisRegistry, connect
from cache.registry import DEFAULT_TENANT, OtherTenant, Registry
from testing.redis import RedisServer


def _redis(request: pytest.FixtureRequest, tmp: Path) -> DeploymentStore:
    server: RedisServer = request.getfixturevalue("redis_server")  # a real redis-server, keys under a test prefix
    return RedisRegistry(connect(server.url), prefix=request.getfixturevalue("redis_prefix"))


STORES: dict[str, Callable[[pytest.FixtureRequest, Path], DeploymentStore]] = {
    "sqlite": lambda request, tmp: Registry(tmp / "registry.sqlite3"),
    "redis": _redis,
}
CONFIG = {"classifier_configs": [{"name": "a", "examples_to_include": ["a"]}]}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeploymentStore]:
    s = STORES[request.param](request, tmp_path)
    yield s
    s.close()


def test_a_deployment_belongs_to_its_tenant(store: DeploymentStore) -> None:
    dep, existed = store.put("x", "classifier", CONFIG, "a")
    assert not existed and dep.tenant == "a" and dep.version == 1
    assert store.get("x", "a") == dep and store.get("x") == dep  # None: any tenant (an admin)
    assert store.get("x", "b") is None and store.version("x", "b") is None
    assert store.version("x", "a") == 1 and store.version("x") == 1
    assert not store.delete("x", "b") and store.get("x") is not None


def test_list_by_tenant_and_kind(store: DeploymentStore) -> None:
    store.put("a1", "classifier", CONFIG, "a")
    store.put("b1", "detector", CONFIG, "b")
    store.put("a2", "detector", CONFIG, "a")
    assert [d.id for d in store.list(tenant="a")] == ["a1", "a2"]
    assert [d.id for d in store.list(tenant="b")] == ["b1"]
    assert [d.id for d in store.list(tenant="c")] == []
    assert [d.id for d in store.list()] == ["a1", "b1", "a2"]
    assert [d.id for d in store.list("detector", tenant="a")] == ["a2"]
    assert [d.id for d in store.list("detector")] == ["b1", "a2"]


def test_an_update_keeps_the_owner_and_another_tenant_cannot_take_the_id(store: DeploymentStore) -> None:
    store.put("x", "classifier", CONFIG, "a")
    dep, existed = store.put("x", "classifier", {**CONFIG, "augment_examples": False}, "a")
    assert existed and dep.version == 2 and dep.tenant == "a"
    with pytest.raises(OtherTenant):
        store.put("x", "classifier", CONFIG, "b")
    after = store.get("x")
    assert after is not None and (after.tenant, after.version, after.config["augment_examples"]) == ("a", 2, False)
    assert store.delete("x", "a") and store.get("x") is None


def test_the_default_tenant(store: DeploymentStore) -> None:
    dep, _ = store.put("x", "classifier", CONFIG)
    assert dep.tenant == DEFAULT_TENANT == "default"
    assert store.get("x", "default") == dep


# -- SQLite: files written before tenants -----------------------------------------------------------------------------
OLD_SCHEMA = """
CREATE TABLE deployments (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, config TEXT NOT NULL, version INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
INSERT INTO deployments VALUES ('old1', 'classifier', '{"classifier_configs": []}', 3, 1.0, 2.0);
INSERT INTO deployments VALUES ('old2', 'detector', '{"detector_configs": []}', 1, 5.0, 5.0);
"""


def old_file(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    return path


def test_a_file_from_before_tenants_is_migrated_in_place_to_the_default_tenant(tmp_path: Path) -> None:
    path = old_file(tmp_path / "registry.sqlite3")
    reg = Registry(path)
    assert [(d.id, d.tenant, d.version) for d in reg.list()] == [("old1", "default", 3), ("old2", "default", 1)]
    assert reg.get("old1", "default") is not None and reg.get("old1", "a") is None
    new, _ = reg.put("n", "classifier", CONFIG, "a")
    assert new.tenant == "a"
    reg.close()
    again = Registry(path)  # a second open finds the column and changes nothing
    assert [(d.id, d.tenant) for d in again.list()] == [("old1", "default"), ("old2", "default"), ("n", "a")]
    columns = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(deployments)")]
    assert columns.count("tenant") == 1


def test_workers_opening_an_old_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    path = old_file(tmp_path / "registry.sqlite3")
    start = threading.Barrier(4)
    opened: list[Registry] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        start.wait()
        try:
            opened.append(Registry(path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(opened) == 4
    assert all([d.tenant for d in r.list()] == ["default", "default"] for r in opened)


def _job(job_id: str, tenant: str, state: str = "running", owner: str = "host:1", at: float = 1.0) -> dict:
    return {"job_id": job_id, "tenant": tenant, "state": state, "owner": owner, "created_at": at, "body": {"x": [1]}}


def test_job_records_outlive_their_process_and_a_dead_owners_job_is_claimed_once(store: DeploymentStore) -> None:
    """Issue 32: deploy jobs' records (JobStore), in both registries."""
    jobs: Any = store
    jobs.put_job(_job("j1", "a", at=1.0))
    jobs.put_job(_job("j2", "b", at=2.0))
    got = jobs.get_job("j1")
    assert got["state"] == "running" and got["body"] == {"x": [1]} and got["owner"] == "host:1" and got["updated_at"]
    assert jobs.get_job("nope") is None
    assert [j["job_id"] for j in jobs.list_jobs()] == ["j1", "j2"]
    assert [j["job_id"] for j in jobs.list_jobs("b")] == ["j2"]
    assert jobs.claim_job("j1", "host:1", "host:2") and not jobs.claim_job("j1", "host:1", "host:3")  # once
    assert jobs.get_job("j1")["owner"] == "host:2"
    jobs.put_job(_job("j1", "a", state="done", owner="host:2"))
    assert jobs.get_job("j1")["state"] == "done" and not jobs.claim_job("j1", "host:2", "host:3")  # ended


def test_begin_job_admits_up_to_the_limit_per_tenant_among_fresh_running_jobs(store: DeploymentStore) -> None:
    """Issue 32: the global per-tenant job limit (one atomic count-and-write) and cancels asked through the store."""
    jobs: Any = store
    assert jobs.begin_job(_job("j1", "a"), 2, 300) and jobs.begin_job(_job("j2", "a"), 2, 300)
    assert not jobs.begin_job(_job("j3", "a"), 2, 300) and jobs.get_job("j3") is None  # refused: nothing written
    assert jobs.begin_job(_job("j4", "b"), 2, 300)  # another tenant
    assert jobs.begin_job(_job("j5", "a"), 0, 300)  # 0: no limit
    jobs.put_job(_job("j1", "a", state="done"))
    jobs.put_job(_job("j5", "a", state="cancelled"))
    assert jobs.begin_job(_job("j6", "a"), 2, 300)  # the ended ones no longer count
    assert jobs.begin_job(_job("j7", "a"), 2, -1)  # a heartbeat older than fresh_s does not count
    assert jobs.get_job("j6")["state"] == "running"
    assert not jobs.cancel_requested("j6")
    jobs.request_cancel("j6")
    assert jobs.cancel_requested("j6") and not jobs.cancel_requested("j2")
