"""tools/redis_migrate.py: one server's SQLite registry and embedding cache copied into a real Redis, so replicas
started on empty data dirs serve its deployments and encode none of its examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache.embeddings import EmbeddingCache, namespace
from cache.redis_store import RedisRegistry, SharedVectors, connect
from cache.registry import Registry
from testing.redis import RedisServer
from testing.server import ROOT
from tools.redis_migrate import migrate

CONFIG = {"classifier_configs": [{"name": "a", "examples_to_include": ["a"]}]}
NS = namespace("model", "v1")


def old_server(data: Path) -> np.ndarray:
    """A data dir as a server without Redis leaves it: three deployments of two tenants, one updated; two vectors."""
    reg = Registry(data / "registry.sqlite3")
    reg.put("first", "classifier", CONFIG, "a")
    reg.put("second", "detector", CONFIG, "b")
    reg.put("first", "classifier", {**CONFIG, "augment_examples": False}, "a")
    reg.put("third", "classifier", CONFIG, "a")
    reg.close()
    cache = EmbeddingCache(data / "embeddings")
    vecs = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    cache.put(NS, ["cat", "dog"], vecs)
    cache.close()
    return vecs


def test_the_registry_and_vectors_are_copied_once(redis_server: RedisServer, redis_prefix: str, tmp_path: Path) -> None:
    vecs = old_server(tmp_path / "old")
    done = migrate(tmp_path / "old", redis_server.url, redis_prefix)
    assert (done.deployments, done.deployments_there, done.vectors, done.vectors_there) == (3, 0, 2, 0)

    target = RedisRegistry(connect(redis_server.url), redis_prefix)
    before = Registry(tmp_path / "old" / "registry.sqlite3").list()
    assert target.list() == before  # ids, kinds, configs, versions, timestamps, tenants and order
    assert [d.id for d in target.list(tenant="a")] == ["first", "third"] and target.version("first", "a") == 2
    assert target.put("first", "classifier", CONFIG, "a")[0].version == 3  # updates go on from the old version

    replica = SharedVectors(connect(redis_server.url), EmbeddingCache(tmp_path / "new"), redis_prefix)
    got, stats = replica.get_or_encode(NS, ["dog", "cat"], lambda texts: pytest.fail(f"encoded {texts}"))
    np.testing.assert_array_equal(got, vecs[[1, 0]])
    assert stats.encoded == 0

    again = migrate(tmp_path / "old", redis_server.url, redis_prefix)  # nothing twice, nothing overwritten
    assert (again.deployments, again.deployments_there, again.vectors, again.vectors_there) == (0, 3, 0, 2)
    assert target.version("first", "a") == 3


def test_the_command_line(redis_server: RedisServer, redis_prefix: str, tmp_path: Path) -> None:
    old_server(tmp_path / "old")
    cmd = [sys.executable, "-m", "tools.redis_migrate", "--data-dir", str(tmp_path / "old")]
    out = subprocess.run(
        [*cmd, "--redis-url", redis_server.url, "--prefix", redis_prefix], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "deployments: 3 copied, 0 already in Redis" in out.stdout and "vectors: 2 copied" in out.stdout
    nowhere = [sys.executable, "-m", "tools.redis_migrate", "--data-dir", str(tmp_path / "nowhere")]
    missing = subprocess.run([*nowhere, "--redis-url", redis_server.url], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "holds no registry" in missing.stderr
    dead = subprocess.run(
        [*cmd, "--redis-url", "redis://127.0.0.1:1/0"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert dead.returncode != 0 and "Redis at 127.0.0.1:1 unavailable" in dead.stderr
