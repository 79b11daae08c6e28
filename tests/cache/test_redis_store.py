"""The Redis stores against a real redis-server: versions seen across replicas, shared vectors (set-if-absent under a
race, read-through local copies), and Redis going away and coming back (the contract itself: test_registry.py)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cache.embeddings import EmbeddingCache, namespace
from cache.interfaces import StoreUnavailable
from cache.redis_store import RedisRegistry, SharedVectors, connect
from testing.redis import RedisServer, running_redis
from testing.server import free_port

CONFIG = {"classifier_configs": [{"name": "a", "examples_to_include": ["a"]}]}
NS = namespace("model", "v1")


def encoder(seed: int, calls: list[list[str]], d: int = 8) -> Callable[[list[str]], np.ndarray]:
    """A fake encoder whose vectors depend on ``seed``: two replicas with different seeds would store different
    vectors for one text unless the store keeps the first."""

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        rng = np.random.default_rng([seed, *(sum(map(ord, t)) for t in texts)])
        return rng.standard_normal((len(texts), d)).astype(np.float32)

    return encode


def in_threads(fn: Callable[..., None], *args: tuple[object, ...], deadline_s: float = 60) -> None:
    """``fn(*a)`` for each ``a`` in ``args``, each on its own thread at once; an assertion or error raised in any thread
    fails the test (a bare Thread would only warn), and so does a thread still running after ``deadline_s``."""
    with cf.ThreadPoolExecutor(len(args)) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        for f in futures:
            f.result(timeout=deadline_s)


def within(deadline_s: float, fn: Callable[[], object]) -> object:
    """``fn()``'s result or exception, failing with TimeoutError if it has not finished after ``deadline_s``: a
    deadline that catches a hang only. The bounded wait itself comes from the client's timeouts (``connect``'s 0.5 s),
    checked as values in test_the_client_waits_at_most_half_a_second."""
    pool = cf.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=deadline_s)
    finally:
        pool.shutdown(wait=False)


def replica(server: RedisServer, prefix: str, data: Path) -> SharedVectors:
    """One replica's vector store: its own client and local cache, the shared Redis."""
    return SharedVectors(connect(server.url), EmbeddingCache(data), prefix)


def test_a_version_moves_on_each_update_and_every_replica_sees_it(redis_server: RedisServer, redis_prefix: str) -> None:
    a = RedisRegistry(connect(redis_server.url), redis_prefix)
    b = RedisRegistry(connect(redis_server.url), redis_prefix)
    a.put("x", "classifier", CONFIG, "t")
    assert b.version("x", "t") == 1
    b.put("x", "classifier", {**CONFIG, "augment_examples": False}, "t")
    assert a.version("x", "t") == 2 and a.version("x", "u") is None
    dep = a.get("x", "t")
    assert dep is not None and dep.config["augment_examples"] is False and dep.created_at <= dep.updated_at
    assert b.delete("x") and a.version("x") is None and a.list() == []


def test_concurrent_puts_of_one_id_never_lose_a_version(redis_server: RedisServer, redis_prefix: str) -> None:
    stores = [RedisRegistry(connect(redis_server.url), redis_prefix) for _ in range(4)]
    stores[0].put("x", "classifier", CONFIG, "t")
    versions: list[int] = []
    start = threading.Barrier(len(stores))

    def update(s: RedisRegistry) -> None:
        start.wait()
        for _ in range(10):
            versions.append(s.put("x", "classifier", CONFIG, "t")[0].version)

    in_threads(update, *((s,) for s in stores))
    assert sorted(versions) == list(range(2, 42))  # every update its own version, none lost or repeated
    assert [d.id for d in stores[1].list(tenant="t")] == ["x"]


def test_a_vector_written_by_one_replica_is_not_encoded_by_another(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    calls_a: list[list[str]] = []
    calls_b: list[list[str]] = []
    a = replica(redis_server, redis_prefix, tmp_path / "a")
    b = replica(redis_server, redis_prefix, tmp_path / "b")
    va, sa = a.get_or_encode(NS, ["cat", "dog", "cat"], encoder(1, calls_a))
    assert calls_a == [["cat", "dog"]] and (sa.hits, sa.misses, sa.encoded) == (0, 3, 2)
    vb, sb = b.get_or_encode(NS, ["dog", "cat", "eel"], encoder(2, calls_b))
    assert calls_b == [["eel"]] and (sb.hits, sb.misses, sb.encoded) == (2, 1, 1)
    np.testing.assert_array_equal(vb[:2], va[[1, 0]])  # B uses A's vectors, not its own encoder's
    assert a.count(NS) == 3 and a.count() == 3 and a.count("other") == 0
    assert b.local.count(NS) == 3  # B's local copy now holds all three


def test_concurrent_deploys_of_the_same_new_texts_store_one_vector_per_key(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    """Both replicas miss, both encode at once (held on a barrier inside the encoder), both write: set-if-absent keeps
    the first vector per key and the loser adopts it, so both answer with the same vectors."""
    texts = [f"text {i}" for i in range(300)]  # more than one Redis batch
    both_encoding = threading.Barrier(2)
    calls: dict[str, list[list[str]]] = {"a": [], "b": []}
    out: dict[str, np.ndarray] = {}

    def deploy(name: str, seed: int) -> None:
        store = replica(redis_server, redis_prefix, tmp_path / name)
        enc = encoder(seed, calls[name])

        def held(todo: list[str]) -> np.ndarray:
            both_encoding.wait(30)
            return enc(todo)

        out[name] = store.get_or_encode(NS, texts, held)[0]
        again, stats = store.get_or_encode(NS, texts, enc)  # the local copy holds the winners
        np.testing.assert_array_equal(again, out[name])
        assert stats.encoded == 0

    in_threads(deploy, ("a", 1), ("b", 2))
    assert set(out) == {"a", "b"}
    assert [len(c) for c in calls.values()] == [1, 1]  # each replica encoded each text once, at most
    np.testing.assert_array_equal(out["a"], out["b"])
    fresh = replica(redis_server, redis_prefix, tmp_path / "c")
    stored, stats = fresh.get_or_encode(NS, texts, encoder(3, []))
    assert stats.encoded == 0 and fresh.count(NS) == len(texts)
    np.testing.assert_array_equal(stored, out["a"])


def test_a_warm_lookup_needs_no_redis_and_a_cold_one_fails_fast(tmp_path: Path) -> None:
    calls: list[list[str]] = []
    with running_redis(tmp_path / "redis") as server:
        store = replica(server, "zss:", tmp_path / "a")
        first, _ = store.get_or_encode(NS, ["cat"], encoder(1, calls))
        server.kill()
        again, stats = store.get_or_encode(NS, ["cat"], encoder(1, calls))  # the local copy: Redis not asked
        np.testing.assert_array_equal(again, first)
        assert stats.hits == 1 and len(calls) == 1
        with pytest.raises(StoreUnavailable, match=rf"Redis at 127\.0\.0\.1:{server.port} unavailable"):
            within(30, lambda: store.get_or_encode(NS, ["dog"], encoder(1, calls)))
        assert len(calls) == 1  # nothing encoded before Redis was asked


def test_redis_down_is_store_unavailable_and_the_same_client_recovers(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as server:
        reg = RedisRegistry(connect(server.url))
        reg.put("x", "classifier", CONFIG)
        server.kill()
        for call in (lambda: reg.version("x"), lambda: reg.put("y", "classifier", CONFIG), reg.ping, reg.list):
            with pytest.raises(StoreUnavailable, match="unavailable"):
                within(30, call)
        server.start()  # same port and files: the append-only file brings the deployment back
        assert reg.version("x") == 1  # the pool reconnects by itself


def test_the_client_waits_at_most_half_a_second() -> None:
    """The bound on every Redis wait is the client's configuration (one retry, no backoff), not the machine's speed."""
    kw = connect("redis://127.0.0.1:1/0").connection_pool.connection_kwargs
    assert (kw["socket_connect_timeout"], kw["socket_timeout"]) == (0.5, 0.5)
    retry = kw["retry"]
    assert retry._retries == 1


def test_an_unroutable_or_silent_redis_times_out_instead_of_hanging(tmp_path: Path) -> None:
    """A listening socket that never answers (a hung Redis): the socket timeout, not a hang."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", free_port()))
        silent.listen(16)
        port = silent.getsockname()[1]
        reg = RedisRegistry(connect(f"redis://127.0.0.1:{port}/0"))
        with pytest.raises(StoreUnavailable, match=f"Redis at 127.0.0.1:{port} unavailable"):
            within(30, lambda: reg.version("x"))


def test_uncached_counts_what_neither_the_local_copy_nor_redis_holds(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    """Issue 32: the deploy prompt limit counts only texts to encode; a replica sees another's vectors as cached."""
    a = replica(redis_server, redis_prefix, tmp_path / "a")
    b = replica(redis_server, redis_prefix, tmp_path / "b")
    assert b.uncached(NS, ["cat", "dog", "cat"]) == ["cat", "dog"]
    a.get_or_encode(NS, ["cat"], encoder(1, []))
    assert b.uncached(NS, ["dog", "cat", "eel", "dog"]) == ["dog", "eel"]  # cat: in Redis, not yet in b's copy
    assert a.local.uncached(NS, ["cat", "eel"]) == ["eel"] and b.local.uncached(NS, ["cat"]) == ["cat"]
