"""P2: /classify against 1,000 classes x 10 cached examples vs /embed_image, same concurrency, one run.

.venv/bin/python bench/bench_p2_classify.py [--requests 120] [--concurrency 16] [--classes 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import VIT_B32_RANDOM, jpeg, load, machine, served


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--examples", type=int, default=10)
    args = ap.parse_args()
    blob = jpeg()
    files = [("data", ("a.jpg", blob, "image/jpeg"))]
    configs = [
        {"name": f"class {i}", "examples_to_include": [f"object {i} seen as {k}" for k in range(args.examples)]}
        for i in range(args.classes)
    ]
    with tempfile.TemporaryDirectory() as tmp, served(VIT_B32_RANDOM, Path(tmp)) as srv:
        t = time.perf_counter()
        r = httpx.post(
            srv.url + "/deploy_classifier",
            json={"classifier_configs": configs, "augment_examples": False},
            timeout=3600,
        )
        r.raise_for_status()
        deploy_s = time.perf_counter() - t
        deployed = r.json()["deployed_id"]
        url = srv.url

        def classify(c: httpx.Client) -> int:
            return c.post(f"{url}/classify?deployed_id={deployed}", files=files).status_code

        def embed(c: httpx.Client) -> int:
            return c.post(url + "/embed_image", files=files).status_code

        load(classify, args.concurrency, 3 * args.concurrency)  # warm-up (and compile check)
        # Interleave the two measurements so drift of the shared machine hits both alike.
        halves = [load(fn, args.concurrency, args.requests // 2) for fn in (embed, classify, embed, classify)]
    emb = sum(h["per_s"] for h in halves[0::2]) / 2
    clf = sum(h["per_s"] for h in halves[1::2]) / 2
    print(f"machine: {machine()}")
    print(f"deploy of {args.classes} x {args.examples} examples (cold text encoding): {deploy_s:.1f} s")
    print()
    print("| classes x examples | clients | /embed_image img/s | /classify img/s | ratio | classify p50 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    errors = sum(h["errors"] for h in halves)
    p50 = (halves[1]["p50_ms"] + halves[3]["p50_ms"]) / 2
    print(
        f"| {args.classes} x {args.examples} | {args.concurrency} | {emb:.1f} | {clf:.1f} | {clf / emb:.2f} "
        f"| {p50:.0f} | {errors} |"
    )


if __name__ == "__main__":
    main()
