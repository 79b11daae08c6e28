"""Overload: many more clients than the CPU can serve, with a latency bound. Every answer, 200 or 503, must come
within the bound plus about one batch (issue 18, item 2).

    .venv/bin/python -m bench.overload [--clients 64] [--bound-ms 3000] [--seconds 40] [--ramp 5] [--root DIR]

Serves ViT-B-32 with random weights (detector off) with ``ZSS_IMAGE_MAX_LATENCY_MS`` = the bound and loads
``/embed_image`` with a 640x480 JPEG from ``--clients`` back-to-back clients; prints the status counts and the latency
percentiles of each status over the steady window.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import VIT_B32_RANDOM, image_post, jpeg, machine, served, steady_load, table
from testing.server import Server


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return 1000 * v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def mean_batch_s(server: Server) -> float | None:
    """The image encoder's mean forward-pass wall time over the run (None: a build without that metric)."""
    try:
        return server.metric("zss_image_batch_seconds_sum") / server.metric("zss_image_batch_seconds_count")
    except (AssertionError, KeyError, ValueError, ZeroDivisionError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--bound-ms", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--ramp", type=float, default=5.0)
    ap.add_argument("--root", type=Path, default=None, help="serve another checkout (an A/B against main)")
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    env = {**VIT_B32_RANDOM, "ZSS_IMAGE_MAX_LATENCY_MS": str(args.bound_ms)}
    root = {"root": args.root} if args.root is not None else {}
    with tempfile.TemporaryDirectory() as tmp, served(env, Path(tmp), **root) as server:
        res = steady_load(server.url, image_post("/embed_image", jpeg()), args.clients, args.seconds, args.ramp)
        batch_s = mean_batch_s(server)
    rows = [
        [
            status,
            len(lat),
            f"{len(lat) / args.seconds:.1f}",
            f"{pct(lat, 0.5):.0f}",
            f"{pct(lat, 0.99):.0f}",
            f"{1000 * max(lat):.0f}",
        ]
        for status, lat in sorted(res.by_status.items())
    ]
    print(f"{args.clients} clients, /embed_image 640x480 JPEG, bound {args.bound_ms} ms, {args.seconds:g} s window")
    print(table(["status", "answers", "per s", "p50 ms", "p99 ms", "max ms"], rows))
    print(f"all responses, ramp included: {dict(sorted(res.statuses.items()))}")
    if batch_s is not None:
        ms = 1000 * batch_s
        print(f"mean image-encoder batch {ms:.0f} ms: bound + one batch = {args.bound_ms + ms:.0f} ms")


if __name__ == "__main__":
    main()
