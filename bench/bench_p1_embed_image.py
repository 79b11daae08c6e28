"""P1: /embed_image throughput with 16 concurrent clients vs the bare image tower's best batched throughput, one run.

    .venv/bin/python -m bench.bench_p1_embed_image [--concurrency 16] [--seconds 20] [--rounds 3]
        [--lanes N] [--hold-ms MS] [--image-workers N] [--max-batch-size N] [--quantize int8]

ViT-B-32 with seeded random weights (the released architecture and cost), a 640x480 JPEG, detector off. The script
starts its own `bentoml serve`, warms it up, sweeps the bare tower (``ClipEncoder.encode_pixels`` on ready uint8
batches of 1..32, in worker processes: one process with all the CPU quota's threads, and the served layout of
workers x threads when it differs), then alternates rounds of served load and bare passes at the best batch size so
that other users of a shared machine slow both sides alike. The ratio compares the server with the best bare layout.
Each served round is a steady state: 16 clients send back to back, and only the requests that end in the last
``--seconds`` count (see ``bench.common.steady_load``); the clients send a body encoded once with ``http.client``, so
the load generator takes little of the cores the server and the bare tower share.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

from bench.common import (
    BareImageTower,
    add_encoder_options,
    encoder_env,
    image_post,
    jpeg,
    loadavg,
    machine,
    merge,
    served,
    steady_load,
    table,
)
from runners.device import cpu_quota


def served_layout(log: str) -> tuple[int, int]:
    """(workers x lanes, torch threads per lane) of the image encoder, from the serve log."""
    m = re.findall(r"image encoder .* ready \((\d+) lanes x (\d+) torch threads?, 1 of (\d+) workers\)", log)
    if not m:
        return 1, cpu_quota()
    lanes, threads, workers = m[-1]
    return int(workers) * int(lanes), int(threads)


def batch_histogram(lines: list[str]) -> dict[float, float]:
    """Cumulative encoder calls per batch-size bucket (upper bound -> count), summed over workers."""
    hist: dict[float, float] = {}
    for ln in lines:
        m = re.match(r'zss_image_batch_size_bucket\{.*?le="([^"]+)".*?\} ([\d.e+]+)', ln)
        if m and m.group(1) != "+Inf":
            le = float(m.group(1))
            hist[le] = hist.get(le, 0.0) + float(m.group(2))
    return hist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per served round")
    ap.add_argument("--ramp", type=float, default=3.0, help="seconds of each round before measuring")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,2,4,8,16,32", help="bare batch sizes to sweep")
    add_encoder_options(ap)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    env = encoder_env(args)
    print(f"machine: {machine()}", flush=True)
    post = image_post("/embed_image", jpeg())

    with tempfile.TemporaryDirectory() as tmp, served(env, Path(tmp)) as srv:
        url = srv.url

        workers, threads = served_layout(srv.log())
        # Warm-up: the dispatcher's first dispatches per worker are singles and tiny batches.
        steady_load(url, post, args.concurrency, 10.0, ramp_s=0.0)
        layouts = [(1, cpu_quota())]
        if (workers, threads) != layouts[0]:
            layouts.append((workers, threads))
        batches_before = batch_histogram(srv.metric_lines("zss_image_batch_size"))
        bares = [BareImageTower(w, t, env) for w, t in layouts]
        try:
            sweep = {b.label: {n: b.throughput(n, 2) for n in batches} for b in bares}
            best = {b.label: max(sweep[b.label], key=sweep[b.label].get) for b in bares}
            rounds = []
            for r in range(args.rounds):
                res = steady_load(url, post, args.concurrency, args.seconds, args.ramp)
                bare_now = {b.label: b.throughput(best[b.label], 2) for b in bares}
                rounds.append((r + 1, res, bare_now, loadavg()))
                print(f"round {r + 1}: {res.per_s:.2f} img/s served, bare {bare_now}", flush=True)
        finally:
            for b in bares:
                b.close()
        batches_after = batch_histogram(srv.metric_lines("zss_image_batch_size"))

    print()
    print(f"Served image encoder: {workers} lane(s) x {threads} torch thread(s); {args.concurrency} clients.")
    print()
    print(
        table(
            ["bare image tower (img/s)", *[f"b{n}" for n in batches]],
            [[label, *[f"{sweep[label][n]:.2f}" for n in batches]] for label in sweep],
        )
    )
    print()
    rows = []
    ratios = []
    for r, res, bare_now, load_after in rounds:
        top = max(bare_now, key=bare_now.get)
        ratio = res.per_s / bare_now[top]
        ratios.append(ratio)
        rows.append(
            [
                r,
                f"{res.load} / {load_after}",
                f"{res.per_s:.2f}",
                f"{bare_now[top]:.2f} ({top}, b{best[top]})",
                f"{ratio:.2f}",
                f"{res.p50_ms:.0f}",
                f"{res.p99_ms:.0f}",
                res.errors,
            ]
        )
    total = merge([res for _, res, _, _ in rounds])
    rows.append(
        [
            "**all**",
            "",
            f"{total.per_s:.2f}",
            "",
            f"**{statistics.median(ratios):.2f}** (median)",
            f"{total.p50_ms:.0f}",
            f"{total.p99_ms:.0f} (p99/p50 {total.p99_ms / total.p50_ms:.2f})",
            total.errors,
        ]
    )
    print(
        table(
            [
                "round",
                "load avg before / after",
                "/embed_image img/s",
                "bare best img/s",
                "ratio",
                "p50 ms",
                "p99 ms",
                "errors",
            ],
            rows,
        )
    )
    hist = {le: n - batches_before.get(le, 0.0) for le, n in batches_after.items()}
    prev, parts = 0.0, []
    for le, v in sorted(hist.items()):
        if v - prev:
            parts.append(f"<= {le:g}: {v - prev:.0f}")
        prev = v
    if parts:
        print()
        print("encoder calls by batch size (the measured rounds, ramps included): " + ", ".join(parts))


if __name__ == "__main__":
    main()
