"""The embedding cache's commit cost against its size (issue 32, item 10): the time of one commit of
``SNAPSHOT_EVERY`` new rows (what a deploy's chunk commits) in a cache that already holds ``--sizes`` vectors.

.venv/bin/python -m bench.bench_cache_commit [--sizes 1000,1000000] [--dim 128] [--commits 20] [--impl CHECKOUT]

The cache is filled directly (key table rows + one snapshot, as a closed cache leaves them) so the filling takes
seconds; then it is opened and committed to. ``--impl`` measures another checkout's cache/embeddings.py (e.g. ``git
archive <commit> | tar -x -C /tmp/base``) in the same way, for a before/after.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import loadavg, machine  # noqa: E402


def _module(checkout: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"embeddings_{abs(hash(checkout))}", checkout / "cache/embeddings.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fill(mod: ModuleType, root: Path, ns: str, n: int, dim: int) -> None:
    """What a closed cache of n rows leaves: the key table and one snapshot (ids = rowids 1..n)."""
    cache = mod.EmbeddingCache(root)  # creates the table with the cache's own pragmas
    cache.close()
    db = sqlite3.connect(root / "keys.sqlite3", isolation_level=None)
    db.execute("BEGIN")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    for start in range(0, n, 100_000):
        vecs = _unit(min(100_000, n - start), dim, start)
        texts = [f"cached example {i}" for i in range(start, start + len(vecs))]
        db.executemany(
            "INSERT INTO vectors (id, ns, key, text, dim, vec, created_at) VALUES (?,?,?,?,?,?,0)",
            (
                (start + i + 1, ns, hashlib.sha256(f"{ns}\x00{t}".encode()).hexdigest(), t, dim, v.tobytes())
                for i, (t, v) in enumerate(zip(texts, vecs))
            ),
        )
        index.add_with_ids(vecs, np.arange(start + 1, start + len(vecs) + 1, dtype=np.int64))
    db.execute("COMMIT")
    db.close()
    faiss.write_index(index, str(root / f"{hashlib.sha256(ns.encode()).hexdigest()[:24]}.faiss"))


def measure(mod: ModuleType, n: int, dim: int, commits: int) -> dict[str, float]:
    ns = mod.namespace("bench-model", None)
    step = mod.EmbeddingCache.SNAPSHOT_EVERY
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench-tmp" if (ROOT / ".bench-tmp").is_dir() else None) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        _fill(mod, root, ns, n, dim)
        fill_s = time.perf_counter() - t
        t = time.perf_counter()
        cache = mod.EmbeddingCache(root)
        cache.get(ns, ["cached example 0"])  # loads the namespace
        open_s = time.perf_counter() - t
        times = []
        for c in range(commits):
            texts = [f"new {c} {i}" for i in range(step)]
            vecs = _unit(step, dim, 10_000_000 + c)
            t = time.perf_counter()
            cache.put(ns, texts, vecs)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        cache.close()
        close_s = time.perf_counter() - t
        disk_mb = sum(f.stat().st_size for f in root.iterdir()) / 2**20
    return {
        "fill_s": fill_s,
        "open_s": open_s,
        "median_ms": 1000 * statistics.median(times),
        "max_ms": 1000 * max(times),
        "close_s": close_s,
        "disk_mb": disk_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,1000000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--commits", type=int, default=20)
    ap.add_argument("--impl", type=Path, default=ROOT)
    args = ap.parse_args()
    mod = _module(args.impl)
    print(f"machine: {machine()}; implementation: {args.impl}")
    print(
        f"| cached vectors ({args.dim}-d) | commit of {mod.EmbeddingCache.SNAPSHOT_EVERY} rows: median ms | max ms "
        "| open s | close s | disk MB | load |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        r = measure(mod, n, args.dim, args.commits)
        print(
            f"| {n:,} | {r['median_ms']:.1f} | {r['max_ms']:.1f} | {r['open_s']:.1f} | {r['close_s']:.1f} "
            f"| {r['disk_mb']:.0f} | {loadavg()} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
