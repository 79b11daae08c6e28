"""The collections' stores in-process: items and metadata across reopening, one worker (or replica) seeing another's
writes, metadata filters, dedup and search answered alike by the SQLite store and the PostgreSQL + pgvector store (a
real server: tests/conftest.py ``postgres``); each one's approximate index keeping recall against exact search; and no
acknowledged item lost to kill -9 (SQLite)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache.collections import CollectionStore, FilterError, NewItem, content_hash, top_k
from cache.interfaces import CollectionBackend
from cache.pg_collections import PgCollectionStore
from testing.postgres import PostgresServer, fresh_database

ROOT = Path(__file__).resolve().parents[2]
Opener = Callable[..., CollectionBackend]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store (again: the same file or database, as another worker or replica would), closed at the end."""
    opened: list[CollectionBackend] = []
    url = fresh_database(request.getfixturevalue("postgres")) if request.param == "postgres" else None

    def opener(**kw: Any) -> CollectionBackend:
        store: CollectionBackend
        if url is not None:
            store = PgCollectionStore(url, **kw)
        else:
            store = CollectionStore(tmp_path / "c.sqlite3", **kw)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def items(vecs: np.ndarray, start: int = 0, meta: bool = True) -> list[NewItem]:
    return [
        NewItem(
            f"i{start + k}",
            content_hash(f"{start + k}".encode()),
            {"n": start + k, "odd": bool(k % 2)} if meta else None,
            v,
        )
        for k, v in enumerate(vecs)
    ]


def test_items_survive_reopening_and_another_worker_sees_writes(open_store: Opener) -> None:
    a, b = open_store(), open_store()
    info = a.create("t", "photos", "m", 4)
    vecs = unit(np.random.default_rng(0).standard_normal((6, 4)))
    a.add(info.cid, items(vecs[:4]), lambda: "x")
    snap = b.snapshot(info.cid, 4)
    assert snap.ids == ["i0", "i1", "i2", "i3"] and np.array_equal(snap.matrix, vecs[:4])
    a.add(info.cid, items(vecs[4:], start=4), lambda: "x")
    grown = b.snapshot(info.cid, 4)  # only the new rows read
    assert grown.ids[-2:] == ["i4", "i5"] and np.array_equal(grown.matrix, vecs)
    assert a.delete_item(info.cid, "i1")
    assert b.snapshot(info.cid, 4).ids == ["i0", "i2", "i3", "i4", "i5"]
    a.close(), b.close()
    c = open_store()
    again = c.get("t", "photos")
    assert again is not None and again.count == 5 and c.get("other-tenant", "photos") is None
    assert c.item(again.cid, "i4").metadata == {"n": 4, "odd": False}  # type: ignore[union-attr]
    assert np.array_equal(c.item(again.cid, "i4").vector, vecs[4])  # type: ignore[union-attr]
    assert c.drop("t", "photos") and c.get("t", "photos") is None and not c.drop("t", "photos")


def test_filters(open_store: Opener) -> None:
    store = open_store()
    info = store.create("t", "c", "m", 3)
    vecs = unit(np.random.default_rng(1).standard_normal((10, 3)))
    store.add(info.cid, items(vecs), lambda: "x")
    store.add(info.cid, [NewItem("s", content_hash(b"s"), {"name": "sun", "n": None}, vecs[0])], lambda: "x")

    def ids(flt: dict) -> list[int]:
        return store.matching(info.cid, flt).tolist()

    assert len(ids({"n": 3})) == 1
    assert len(ids({"n": {"gte": 2, "lt": 6}, "odd": True})) == 2  # n = 3, 5
    assert len(ids({"n": {"in": [1, 2, 42]}})) == 2
    assert len(ids({"n": {"ne": 3}})) == 9  # NULL is not "not 3" (SQL)
    assert len(ids({"n": None})) == 1 and len(ids({"name": "sun"})) == 1
    for bad in ({"size": 1}, {"n": {"near": 1}}, {"n": {"in": []}}, {"n": [1, 2]}, {"n": {}}, {"n": 2**64}):
        with pytest.raises(FilterError):
            store.matching(info.cid, bad)


def test_dedup_by_content_and_ids_replace(open_store: Opener) -> None:
    store = open_store()
    info = store.create("t", "c", "m", 2)
    v = unit(np.ones((1, 2)))[0]
    first = store.add(info.cid, [NewItem(None, "h1", {"a": 1}, v)], lambda: "new-1")
    again = store.add(info.cid, [NewItem(None, "h1", None, v)], lambda: "new-2")
    assert [(x.id, x.added) for x in first + again] == [("new-1", True), ("new-1", False)]
    assert store.known_vectors(info.cid, ["h1", "h2"]).keys() == {"h1"}
    store.add(info.cid, [NewItem("new-1", "h2", {"b": 2}, v)], lambda: "unused")  # an id replaces its item
    assert store.get("t", "c").count == 1 and store.item(info.cid, "new-1").metadata == {"b": 2}  # type: ignore[union-attr]


def test_search_answers_exact_nearest_with_filters_and_tenants_apart(open_store: Opener) -> None:
    store = open_store()
    info = store.create("t", "c", "m", 8)
    assert store.create("u", "c", "m", 8).cid != info.cid  # same name, another tenant: another collection
    vecs = unit(np.random.default_rng(5).standard_normal((50, 8)))
    store.add(info.cid, items(vecs), lambda: "x")
    assert store.get("u", "c").count == 0 and [c.name for c in store.list("u")] == ["c"]  # type: ignore[union-attr]
    q = vecs[7]
    hits = store.search(info.cid, 8, q, 5, None, "i7")
    exact, scores = top_k(vecs, q, 6)
    assert [h[0] for h in hits] == [f"i{p}" for p in exact[1:]]  # itself left out
    assert np.allclose([h[1] for h in hits], scores[1:], atol=1e-5)
    assert hits[0][2] == {"n": int(exact[1]), "odd": bool(exact[1] % 2)}
    odd = store.search(info.cid, 8, q, 50, {"odd": True, "n": {"lt": 40}}, None)
    assert len(odd) == 20 and all(m["odd"] and m["n"] < 40 for _, _, m in odd)
    rows = np.array([p for p in range(50) if p % 2 and p < 40])
    want, _ = top_k(vecs, q, 20, rows)
    assert [h[0] for h in odd] == [f"i{p}" for p in want]
    with pytest.raises(FilterError):
        store.search(info.cid, 8, q, 5, {"colour": "red"}, None)


def clustered(n: int, dim: int, seed: int, centres_seed: int = 0) -> np.ndarray:
    """Vectors around 200 centres, as image embeddings cluster (random directions would not); ``seed`` draws the
    points, ``centres_seed`` the centres (held-out queries: the same centres, other points)."""
    centres = unit(np.random.default_rng(centres_seed).standard_normal((200, dim)))
    rng = np.random.default_rng(seed)
    return unit(centres[rng.integers(0, 200, n)] + 1.4 * rng.standard_normal((n, dim)) / np.sqrt(dim))


def test_approximate_index_above_the_threshold_keeps_recall(tmp_path: Path) -> None:
    store = CollectionStore(tmp_path / "c.sqlite3", exact_max=1000, nprobe=1)
    info = store.create("t", "c", "m", 32)
    vecs = clustered(6000, 32, seed=2)
    store.add(info.cid, items(vecs[:5000], meta=False), lambda: "x")
    snap = store.snapshot(info.cid, 32)
    assert snap.index is None  # built by the first search, not by reading the vectors (classification)
    store.nearest(snap, vecs[0], 10)
    assert snap.index is not None and snap.index.ntotal == 5000
    store.add(info.cid, items(vecs[5000:], start=5000, meta=False), lambda: "x")
    snap = store.snapshot(info.cid, 32)  # appended rows join the index without retraining
    assert snap.index is not None and snap.index.ntotal == 6000
    queries = clustered(100, 32, seed=3)
    recall = []
    for q in queries:
        exact, _ = top_k(snap.matrix, q, 10)
        approx, _ = store.nearest(snap, q, 10)
        recall.append(len(set(exact.tolist()) & set(approx.tolist())) / 10)
    assert np.mean(recall) >= 0.95, np.mean(recall)
    # A filtered search is exact over the rows that pass.
    rows = np.arange(0, 6000, 7)
    pos, _ = store.nearest(snap, queries[0], 5, rows)
    exact, _ = top_k(snap.matrix[rows], queries[0], 5)
    assert pos.tolist() == rows[exact].tolist()


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from cache.collections import CollectionStore, NewItem
    store = CollectionStore(sys.argv[1])
    info = store.get("t", "c") or store.create("t", "c", "m", 16)
    k = 0
    while True:
        batch = [NewItem(f"{k}-{j}", f"h{k}-{j}", {"k": k}, np.full(16, 0.25, np.float32)) for j in range(20)]
        store.add(info.cid, batch, lambda: "x")
        print(k, flush=True)  # acknowledged: committed before this line
        k += 1
    """
)


def test_no_acknowledged_item_is_lost_to_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ
    )
    acked: list[int] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while len(acked) < 30 and time.monotonic() < deadline:
        acked.append(int(proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 30
    store = CollectionStore(path)
    info = store.get("t", "c")
    assert info is not None and info.count >= 20 * len(acked)
    have = set(store.snapshot(info.cid, 16).ids)
    assert all(f"{k}-{j}" in have for k in acked for j in range(20))
    assert info.count % 20 == 0  # whole requests only: a transaction is all or nothing


def test_postgres_hnsw_index_above_the_threshold_keeps_recall(postgres: PostgresServer) -> None:
    store = PgCollectionStore(fresh_database(postgres), exact_max=1000)
    info = store.create("t", "c", "m", 32)
    vecs = clustered(3000, 32, seed=2)
    store.add(info.cid, items(vecs, meta=False), lambda: "x")
    assert not store.has_index(info.cid)  # an add past the threshold starts its build in the background
    deadline = time.monotonic() + 60
    while store.hnsw_ef(info.cid) is None and time.monotonic() < deadline:  # built, then calibrated
        time.sleep(0.1)
    assert store.has_index(info.cid) and store.hnsw_ef(info.cid) > 0  # type: ignore[operator]
    queries = clustered(100, 32, seed=3)

    def recall() -> float:
        found = []
        for q in queries:
            exact, _ = top_k(vecs, q, 10)
            approx = [int(h[0][1:]) for h in store.search(info.cid, 32, q, 10, None, None)]
            found.append(len(set(exact.tolist()) & set(approx)) / 10)
        return float(np.mean(found))

    assert recall() >= 0.95
    store.ef_search = 1  # the least ef: the index misses...
    with store._pool.conn() as c:
        c.execute("UPDATE zss_collections SET hnsw_ef = 1 WHERE cid=%s", (info.cid,))
    assert recall() < 0.95
    assert store.calibrate(info.cid, target=1.01)[0] == -1  # ...and where no ef reaches the target, search is exact
    assert recall() == 1.0
    store.close()
