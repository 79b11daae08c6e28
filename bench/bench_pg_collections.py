"""Collections on the shared PostgreSQL + pgvector store (issue 31, ZSS_COLLECTION_URL) beside the SQLite store, one
run: search latency (exact scan, then through the HNSW index) and classifying a collection read out of the database.

    .venv/bin/python -m bench.bench_pg_collections [--n 100000] [--queries 50] [--hnsw] [--classify]

A real PostgreSQL 16 with pgvector 0.6 (testing/postgres.py: pgserver's binaries) on this machine. N clustered
512-d unit vectors (bench/bench_collections.py ``clustered``) are loaded with COPY (the bench's loader; the service's
adds go through cache/pg_collections.py ``add``), the same vectors into the SQLite store. Per store: p50/p95 of
``search`` (k=10, unfiltered, one query at a time, as the route calls it; SQLite's snapshot loaded beforehand), and
recall@10 against exact search for held-out queries; with ``--hnsw`` the HNSW index is built (m=16,
ef_construction=64; its build time) and searched with the default ef_search; with ``--classify`` the collection is
classified by a 100-class x 10-example deployment through the route's path (``snapshot`` paged out of the database,
then ``classify_rows``), cold (snapshot read) and warm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_collections import clustered, unit
from bench.common import loadavg, machine
from cache.collections import CollectionStore, NewItem, top_k
from cache.pg_collections import PgCollectionStore, _items
from engine.collections import classify_rows
from semantic.classify import compile_classifier
from testing.postgres import running_postgres


def copy_in(store: PgCollectionStore, cid: int, data: np.ndarray) -> float:
    """The vectors as items ``i<k>`` with metadata {"n": k}, through COPY (binary), then the version moved."""
    t0 = time.perf_counter()
    with store._pool.conn() as c, c.transaction():
        with c.cursor().copy(
            f"COPY {_items(cid)} (id, hash, metadata, embedding, created_at) FROM STDIN WITH (FORMAT BINARY)"
        ) as cp:
            cp.set_types(["text", "text", "jsonb", "vector", "float8"])
            for k, v in enumerate(data):
                cp.write_row((f"i{k}", f"h{k}", json.dumps({"n": k}), v, 0.0))
        c.execute("UPDATE zss_collections SET version = version + 1 WHERE cid=%s", (cid,))
        c.execute(f"ANALYZE {_items(cid)}")
    return time.perf_counter() - t0


def build_bounded(store: PgCollectionStore, cid: int, timeout_s: float, mem: str) -> bool:
    """The HNSW index as the store builds it, on one connection with a time limit and a maintenance memory of
    ``mem`` (the graph of a million 512-d vectors does not fit the server's default and would build on disk)."""
    import psycopg

    with store._pool.conn() as c:
        c.execute(f"SET statement_timeout = {int(timeout_s * 1000)}")
        c.execute(f"SET maintenance_work_mem = '{mem}'")
        try:
            c.execute(
                f"CREATE INDEX {_items(cid)}_hnsw ON {_items(cid)} USING hnsw (embedding vector_ip_ops) "
                f"WITH (m = {store.hnsw_m}, ef_construction = 64)"
            )
        except psycopg.errors.QueryCanceled:
            return False
        finally:
            c.execute("RESET statement_timeout")
    return store.has_index(cid)


def timed_search(store: object, cid: int, queries: np.ndarray, data: np.ndarray) -> dict[str, float]:
    lat, rec = [], []
    for q in queries:
        t = time.perf_counter()
        hits = store.search(cid, data.shape[1], q, 10, None, None)  # type: ignore[attr-defined]
        lat.append(time.perf_counter() - t)
        exact, _ = top_k(data, q, 10)
        rec.append(len({f"i{p}" for p in exact.tolist()} & {h[0] for h in hits}) / 10)
    return {
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * float(np.percentile(lat, 95)),
        "recall10": float(np.mean(rec)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--hnsw", action="store_true")
    ap.add_argument("--classify", action="store_true")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--ef", type=lambda v: [int(x) for x in v.split(",")], default=[200], help="hnsw.ef_search values")
    ap.add_argument("--hnsw-timeout-s", type=float, default=0, help="give up the index build after this long")
    ap.add_argument("--maintenance-mem", default="512MB", help="maintenance_work_mem of a bounded build")
    ap.add_argument("--sqlite", action="store_true", help="the SQLite store's search beside it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out: dict[str, object] = {"machine": machine(), "n": args.n, "load_before": loadavg()}
    data = clustered(args.n, seed=1)
    queries = clustered(args.queries, seed=2)
    with running_postgres() as pg:
        store = PgCollectionStore(pg.url, exact_max=10**12)  # no index built by adds: built below when asked
        info = store.create("bench", "c", "m", 512)
        out["pg_copy_s"] = copy_in(store, info.cid, data)
        store.search(info.cid, 512, queries[0], 10, None, None)  # warm the table's pages
        if not args.skip_exact:
            out["pg_exact"] = timed_search(store, info.cid, queries, data)
        if args.hnsw:
            t0 = time.perf_counter()
            if args.hnsw_timeout_s:
                built = build_bounded(store, info.cid, args.hnsw_timeout_s, args.maintenance_mem)
            else:
                store.ensure_index(info.cid)
                built = store.has_index(info.cid)
            out["pg_hnsw_build_s"] = time.perf_counter() - t0
            out["pg_hnsw_built"] = built
            if built:
                t0 = time.perf_counter()
                out["pg_hnsw_calibrated_ef"], out["pg_hnsw_calibration_recall"] = store.calibrate(info.cid)
                out["pg_hnsw_calibration_s"] = time.perf_counter() - t0
                out["pg_hnsw_calibrated"] = timed_search(store, info.cid, queries, data)  # what the server would do
                for ef in args.ef:
                    with store._pool.conn() as c:
                        c.execute("UPDATE zss_collections SET hnsw_ef = %s WHERE cid=%s", (ef, info.cid))
                    out[f"pg_hnsw_ef{ef}"] = timed_search(store, info.cid, queries, data)
        if args.classify:
            rng = np.random.default_rng(0)
            pos = [torch.from_numpy(unit(rng.standard_normal((10, 512)))) for _ in range(100)]
            clf = compile_classifier([f"class {i}" for i in range(100)], pos, [torch.zeros(0, 512)] * 100)
            torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
            for label in ("cold", "warm"):
                t0 = time.perf_counter()
                snap = store.snapshot(info.cid, 512)
                read = time.perf_counter() - t0
                total, counts, _, _, _ = classify_rows(snap.matrix, np.arange(snap.size), clf, 0, 100, 10)
                assert total == args.n and np.array_equal(snap.matrix, data)
                out[f"pg_classify_{label}_s"] = time.perf_counter() - t0
                out[f"pg_snapshot_{label}_s"] = read
            torch.set_num_threads(1)
        store.close()
    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            lite = CollectionStore(Path(tmp) / "c.sqlite3")
            info = lite.create("bench", "c", "m", 512)
            t0 = time.perf_counter()
            for s in range(0, args.n, 10_000):
                lite.add(
                    info.cid,
                    [NewItem(f"i{k}", f"h{k}", {"n": k}, data[k]) for k in range(s, min(args.n, s + 10_000))],
                    str,
                )
            out["sqlite_add_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            lite.search(info.cid, 512, queries[0], 10, None, None)  # the snapshot (and above exact_max the index)
            out["sqlite_first_search_s"] = time.perf_counter() - t0
            out["sqlite"] = timed_search(lite, info.cid, queries, data)
            lite.close()
    out["load_after"] = loadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
