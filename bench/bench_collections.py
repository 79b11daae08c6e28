"""Collections (issue 31): classifying stored vectors, searching them, and adding images, one run.

    .venv/bin/python -m bench.bench_collections [--classify-n 100000] [--search-n 1000000] [--adds 8]
        [--model shapes|vit-b-32] [--skip classify search add]

* classify: N stored 512-d unit vectors scored by a 100-class deployment with 10 positive examples per class (1,000
  example vectors), through the route's own path (engine/collections.py ``classify_rows``: the engine's scoring,
  counts per class, one page of 100 results, top 10 per class), with torch on 1 thread (as the API worker runs it) and
  on every core;
* search: N synthetic clustered 512-d vectors (200 centres, noise of the same norm as the centre: points about 0.6
  cosine from their centre) in the approximate index (cache/collections.py ``VectorIndex``), p50/p95 of single queries,
  and recall@10 against exact search for held-out queries of the same distribution and for random directions (the
  worst case); also exact search at the exact threshold (ZSS_COLLECTION_EXACT_MAX);
* add: images per second of ``POST /collections/{name}/images`` against ``POST /embed_image``, fresh images (no
  dedup) in batches of 8, alternating rounds, through a real `bentoml serve` of the shapes CLIP (``--model shapes``,
  the tiniest real model here: the encoder costs least, so the collection's own overhead weighs most) or ViT-B-32
  with random weights (``--model vit-b-32``, the released architecture's cost).
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

from bench.common import VIT_B32_RANDOM, loadavg, machine
from cache.collections import VectorIndex, top_k
from engine.collections import classify_rows
from semantic.classify import compile_classifier


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def bench_classify(n: int, threads: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    matrix = unit(rng.standard_normal((n, 512)))
    pos = [torch.from_numpy(unit(rng.standard_normal((10, 512)))) for _ in range(100)]
    neg = [torch.zeros(0, 512) for _ in range(100)]
    clf = compile_classifier([f"class {i}" for i in range(100)], pos, neg)
    torch.set_num_threads(threads)
    rows = np.arange(n)
    times, cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        total, counts, _, results, _ = classify_rows(matrix, rows, clf, 0, 100, 10)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    assert total == n and sum(counts.values()) == n and len(results) == 100
    # CPU seconds next to wall seconds: on a shared machine the wall time includes waiting for a core.
    return {"best_s": min(times), "median_s": statistics.median(times), "cpu_s_median": statistics.median(cpu)}


def clustered(n: int, seed: int, dim: int = 512) -> np.ndarray:
    centres = unit(np.random.default_rng(12345).standard_normal((200, dim)))
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # in blocks: the float64 noise of a million rows would double the memory
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        out[start : start + m] = unit(centres[rng.integers(0, 200, m)] + noise)
    return out


def recall(matrix: np.ndarray, index: VectorIndex, queries: np.ndarray) -> float:
    exact = np.argpartition(-(queries @ matrix.T), 9, axis=1)[:, :10]
    got = [set(index.search(q, 10)[0].tolist()) for q in queries]
    return float(np.mean([len(set(e.tolist()) & g) / 10 for e, g in zip(exact, got)]))


def bench_search(n: int, exact_n: int) -> dict[str, float]:
    torch.set_num_threads(1)
    data = clustered(n, seed=1)
    t0 = time.perf_counter()
    index = VectorIndex(data, nprobe=16)
    build = time.perf_counter() - t0
    queries = clustered(200, seed=2)
    lat, cpu = [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        index.search(q, 10)
        lat.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    random_dirs = unit(np.random.default_rng(3).standard_normal((50, 512)))
    out = {
        "n": n,
        "nlist": index.index.nlist,
        "nprobe": index.index.nprobe,
        "build_s": build,
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * float(np.percentile(lat, 95)),
        "cpu_p50_ms": 1000 * statistics.median(cpu),
        "recall10_held_out": recall(data, index, queries[:50]),
        "recall10_random_directions": recall(data, index, random_dirs),
        "calibration_recall": index.recall,
    }
    sub = data[:exact_n]
    lat = []
    for q in queries[:50]:
        t = time.perf_counter()
        top_k(sub, q, 10)
        lat.append(time.perf_counter() - t)
    out["exact_n"] = exact_n
    out["exact_p50_ms"] = 1000 * statistics.median(lat)
    return out


def bench_add(adds: int, batch: int, model: str) -> dict[str, float]:
    from testing.client import files
    from testing.images import encode_png
    from testing.models import shapes_clip_env
    from testing.server import running_server
    from tools import shapes

    rng = np.random.default_rng(7)
    combos = shapes.ALL_COMBOS

    def fresh(k: int) -> list[bytes]:
        return [encode_png(shapes.draw(*combos[(k + j) % len(combos)], rng)) for j in range(batch)]

    with tempfile.TemporaryDirectory() as tmp:
        # The shapes CLIP (the cheapest encoder: the collection's own overhead weighs most), or ViT-B-32 with random
        # weights (the released architecture's cost).
        env = {
            **(shapes_clip_env(Path(tmp) / "data") if model == "shapes" else VIT_B32_RANDOM),
            "ZSS_DATA_DIR": str(Path(tmp) / "data"),
        }
        with running_server(env, Path(tmp) / "serve.log") as srv, srv.client() as c:
            assert c.post("/collections", json={"name": "bench"}).status_code == 201
            c.post("/embed_image", files=files(*fresh(0)))  # warm
            rates: dict[str, list[float]] = {"embed_image": [], "collection_add": []}
            for r in range(adds):
                for route in ("embed_image", "collection_add") if r % 2 == 0 else ("collection_add", "embed_image"):
                    blobs = fresh(1000 * r + (route == "embed_image"))
                    path = "/embed_image" if route == "embed_image" else "/collections/bench/images"
                    t0 = time.perf_counter()
                    resp = c.post(path, files=files(*blobs))
                    rates[route].append(len(blobs) / (time.perf_counter() - t0))
                    assert resp.status_code == 200, resp.text
            out = {k: statistics.median(v) for k, v in rates.items()}
            out["ratio"] = out["collection_add"] / out["embed_image"]
            return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classify-n", type=int, default=100_000)
    ap.add_argument("--search-n", type=int, default=1_000_000)
    ap.add_argument("--exact-n", type=int, default=100_000)
    ap.add_argument("--adds", type=int, default=8, help="rounds of each add route")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--model", choices=["shapes", "vit-b-32"], default="shapes", help="the served model of the add runs"
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["classify", "search", "add"])
    args = ap.parse_args()
    print(json.dumps({"machine": machine(), "loadavg": loadavg()}))
    if "classify" not in args.skip:
        for threads in (1, max(1, torch.get_num_threads())):
            print(
                json.dumps(
                    {"classify": args.classify_n, "threads": threads, **bench_classify(args.classify_n, threads)}
                )
            )
    if "search" not in args.skip:
        print(json.dumps({"search": bench_search(args.search_n, args.exact_n), "loadavg": loadavg()}))
    if "add" not in args.skip:
        print(
            json.dumps({"add": bench_add(args.adds, args.batch, args.model), "model": args.model, "loadavg": loadavg()})
        )


if __name__ == "__main__":
    main()
