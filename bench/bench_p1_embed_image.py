"""P1: /embed_image throughput with 16 concurrent clients vs the bare model's best batched throughput (one run).

    .venv/bin/python bench/bench_p1_embed_image.py [--requests 160] [--concurrency 16]

ViT-B-32 with random weights (same architecture and cost as the released weights), a 640x480 JPEG.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import httpx

from bench.common import VIT_B32_RANDOM, bare_image_throughput, jpeg, load, machine, served


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    bare = bare_image_throughput()
    blob = jpeg()

    def embed(c: httpx.Client) -> int:
        return c.post(url + "/embed_image", files=[("data", ("a.jpg", blob, "image/jpeg"))]).status_code

    with tempfile.TemporaryDirectory() as tmp, served(VIT_B32_RANDOM, Path(tmp)) as srv:
        url = srv.url
        load(embed, args.concurrency, 3 * args.concurrency)  # warm-up: the dispatcher's first batches are singles
        r = load(embed, args.concurrency, args.requests)
    best_b = max(bare, key=bare.get)
    print(f"machine: {machine()}")
    print("| bare model img/s by batch | " + ", ".join(f"b{b}: {v:.1f}" for b, v in bare.items()) + " |")
    print()
    print("| route | clients | requests | img/s | bare best img/s | ratio | p50 ms | p99 ms | p99/p50 | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| /embed_image | {args.concurrency} | {r['requests']} | {r['per_s']:.1f} | {bare[best_b]:.1f} (b{best_b}) "
        f"| {r['per_s'] / bare[best_b]:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['p99_ms'] / r['p50_ms']:.2f} "
        f"| {r['errors']} |"
    )


if __name__ == "__main__":
    main()
