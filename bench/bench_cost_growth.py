"""Cost growth: scoring latency as classes x examples grow, and the embedding cache's size per 100k examples.

.venv/bin/python bench/bench_cost_growth.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import machine
from cache.embeddings import EmbeddingCache, namespace
from semantic.classify import compile_classifier, raw_scores

D = 512


def unit(n: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def rss_mb() -> float:
    """Current resident set size (not the peak), from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 1e6


def main() -> None:
    torch.set_num_threads(1)  # the API worker scores with one thread
    print(f"machine: {machine()}")
    print("| classes x examples | total examples | raw_scores ms (1 image, median) |")
    print("|---|---:|---:|")
    image = unit(1, 0)
    for classes, per in ((10, 1), (100, 10), (1000, 10), (10_000, 10), (20_000, 5)):
        ex = unit(classes * per, 1)
        clf = compile_classifier([str(i) for i in range(classes)], list(ex.split(per)), [torch.zeros(0, D)] * classes)
        times = []
        for _ in range(15):
            t = time.perf_counter()
            raw_scores(image, clf)
            times.append(time.perf_counter() - t)
        print(f"| {classes} x {per} | {classes * per} | {1000 * float(np.median(times)):.2f} |")

    with tempfile.TemporaryDirectory() as tmp:
        rss0 = rss_mb()
        cache = EmbeddingCache(Path(tmp))
        ns = namespace("ViT-B-32@bench", None)
        n = 100_000
        t = time.perf_counter()
        for start in range(0, n, 10_000):
            vecs = unit(10_000, start).numpy()
            cache.put(ns, [f"example {i}" for i in range(start, start + 10_000)], vecs)
        cache.flush()
        put_s = time.perf_counter() - t
        rss1 = rss_mb()
        files = {f.name: f.stat().st_size for f in Path(tmp).iterdir()}
        disk = sum(files.values())
        cache.close()
        t = time.perf_counter()
        cold = EmbeddingCache(Path(tmp))
        found, missing = cold.get(ns, [f"example {i}" for i in range(0, n, 10)])
        load_s = time.perf_counter() - t
        assert not missing and len(found) == n // 10
    print()
    print("| cached 512-d examples | disk MB | RSS growth MB | put s | cold load + 10k lookups s |")
    print("|---:|---:|---:|---:|---:|")
    print("files: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sorted(files.items())))
    print(f"| {n} | {disk / 1e6:.0f} | {rss1 - rss0:.0f} | {put_s:.1f} | {load_s:.1f} |")


if __name__ == "__main__":
    main()
