"""P2: /classify against 1,000 classes x 10 cached examples vs /embed_image, same clients, same server, one run.

    .venv/bin/python -m bench.bench_p2_classify [--concurrency 16] [--seconds 15] [--rounds 4] [--classes 1000]

ViT-B-32 with seeded random weights, a 640x480 JPEG, detector off. The classifier is deployed (cold text encoding)
and classified once, so every example is cached and compiled before measuring. Rounds of /embed_image and /classify
then alternate, so drift of a shared machine hits both alike; the ratio of each pair of rounds is printed, and the
median of those ratios is the result. Each round is a steady state of back-to-back clients
(``bench.common.steady_load``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx

from bench.common import VIT_B32_RANDOM, image_post, jpeg, machine, merge, served, steady_load, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per round")
    ap.add_argument("--ramp", type=float, default=3.0, help="seconds of each round before measuring")
    ap.add_argument("--rounds", type=int, default=4, help="pairs of rounds (embed, classify)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--examples", type=int, default=10)
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    blob = jpeg()
    configs = [
        {"name": f"class {i}", "examples_to_include": [f"object {i} seen as {k}" for k in range(args.examples)]}
        for i in range(args.classes)
    ]
    with tempfile.TemporaryDirectory() as tmp, served(VIT_B32_RANDOM, Path(tmp)) as srv:
        url = srv.url
        t = time.perf_counter()
        r = httpx.post(
            url + "/deploy_classifier", json={"classifier_configs": configs, "augment_examples": False}, timeout=3600
        )
        r.raise_for_status()
        deploy_s = time.perf_counter() - t
        deployed = r.json()["deployed_id"]
        print(f"deploy of {args.classes} x {args.examples} examples (cold text encoding): {deploy_s:.1f} s", flush=True)

        classify = image_post(f"/classify?deployed_id={quote(deployed)}", blob)
        embed = image_post("/embed_image", blob)
        steady_load(url, classify, args.concurrency, 10.0, ramp_s=0.0)  # warm-up: batcher, compile check
        pairs = []
        for k in range(args.rounds):
            e = steady_load(url, embed, args.concurrency, args.seconds, args.ramp)
            c = steady_load(url, classify, args.concurrency, args.seconds, args.ramp)
            pairs.append((e, c))
            print(f"round {k + 1}: embed {e.per_s:.2f} img/s, classify {c.per_s:.2f} img/s", flush=True)

    rows = [
        [
            k + 1,
            f"{e.load}",
            f"{e.per_s:.2f}",
            f"{c.per_s:.2f}",
            f"{c.per_s / e.per_s:.2f}",
            f"{c.p50_ms:.0f}",
            e.errors + c.errors,
        ]
        for k, (e, c) in enumerate(pairs)
    ]
    ratios = [c.per_s / e.per_s for e, c in pairs]
    emb, clf = merge([e for e, _ in pairs]), merge([c for _, c in pairs])
    rows.append(
        [
            "**all**",
            "",
            f"{emb.per_s:.2f}",
            f"{clf.per_s:.2f}",
            f"**{statistics.median(ratios):.2f}** (median)",
            f"{clf.p50_ms:.0f}",
            emb.errors + clf.errors,
        ]
    )
    print()
    print(f"{args.classes} classes x {args.examples} examples (cached), {args.concurrency} clients")
    print()
    print(
        table(
            ["round", "load avg before", "/embed_image img/s", "/classify img/s", "ratio", "classify p50 ms", "errors"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
