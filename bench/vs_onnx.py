"""Our /embed_image against the ONNX Runtime batch-1 baseline (bench/onnx_baseline_server.py), side by side in one
run: the same model and weights, the same load, the two servers loaded in alternating rounds.

    .venv/bin/python -m bench.vs_onnx [--rounds 3] [--seconds 20] [--ramp 3] [--concurrency 16]
        [--backend auto|torch|onnx|openvino] [--quantize none|int8] [--model ViT-B-32]

Each round is ``bench.common.steady_load`` (16 clients back to back with a 640x480 JPEG; only requests that end in
the window count). Only one server is loaded at a time. The ratio is ours / baseline per pair of rounds (the last row:
the median of the rounds' ratios, and the tails over all rounds). Beside it, each server's images per CPU second of
its own processes, and their ratio: on a machine shared with other work that ratio is the steadier one. Before the
rounds, both servers embed the same JPEG once and the cosine of the two vectors is printed (1.0000 for a float32
backend: the same model).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import (
    ROOT,
    LoadResult,
    add_model_options,
    cpu_seconds,
    image_post,
    jpeg,
    machine,
    merge,
    model_env,
    served,
    steady_load,
    table,
)
from testing.server import free_port


@contextlib.contextmanager
def baseline_server(workdir: Path, model: str, pretrained: str, timeout: float = 600.0) -> Iterator[tuple[str, int]]:
    """bench/onnx_baseline_server.py in its own process; yields its URL and process id."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(workdir / "baseline.log", "wb")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "bench.onnx_baseline_server", "--port", str(port), "--model", model]
    cmd += ["--pretrained", pretrained, "--data-dir", str(workdir / "data")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"baseline exited with {proc.returncode}: {(workdir / 'baseline.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the baseline did not start")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def measured(url: str, pid: int, post: Any, args: argparse.Namespace) -> tuple[LoadResult, float]:
    """One round: the load's result and the images the server answered per CPU second it used. On a machine shared
    with other work, a server's throughput follows its share of the cores; its images per CPU second do not (while
    it is CPU-bound), so that ratio is the steadier one here."""
    c0 = cpu_seconds(pid)
    r = steady_load(url, post, args.concurrency, args.seconds, args.ramp)
    used = cpu_seconds(pid) - c0
    done = sum(n for s, n in r.statuses.items() if s == 200)  # ramp included: the CPU time covers it too
    return r, done / max(used, 1e-9)


def embedding(url: str, blob: bytes) -> np.ndarray:
    r = httpx.post(url + "/embed_image", files={"data": ("image.jpg", blob, "image/jpeg")}, timeout=120)
    r.raise_for_status()
    body = r.json()
    return np.asarray(body["embeddings"][0] if "embeddings" in body else body["embedding"], dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per round")
    ap.add_argument("--ramp", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=16)
    add_model_options(ap)  # ours; the baseline serves the same --model and --pretrained
    args = ap.parse_args()
    env = model_env(args)
    print(f"machine: {machine()}", flush=True)
    blob = jpeg()
    post = image_post("/embed_image", blob)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        baseline = baseline_server(base / "baseline", args.model, args.pretrained)
        with baseline as (onnx_url, onnx_pid), served(env, base / "ours") as ours:
            a, b = embedding(onnx_url, blob), embedding(ours.url, blob)
            cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            print(f"cosine(baseline, ours) on one JPEG: {cos:.5f}", flush=True)
            for url in (onnx_url, ours.url):  # warm-up: first batches, allocator, connections
                steady_load(url, post, args.concurrency, 8.0, ramp_s=0.0)
            pairs, per_cpu = [], []
            for r in range(args.rounds):
                x, xc = measured(onnx_url, onnx_pid, post, args)
                y, yc = measured(ours.url, ours.proc.pid, post, args)
                pairs.append((x, y))
                per_cpu.append((xc, yc))
                print(f"round {r + 1}: baseline {x.per_s:.2f}, ours {y.per_s:.2f} img/s; per CPU-s {xc:.2f}, {yc:.2f}")

    rows = []
    for i, ((x, y), (xc, yc)) in enumerate(zip(pairs, per_cpu, strict=True), 1):
        rows.append(
            [
                i,
                x.load,
                f"{x.per_s:.2f}",
                f"{y.per_s:.2f}",
                f"{y.per_s / x.per_s:.2f}",
                f"{xc:.2f} / {yc:.2f}",
                f"{yc / xc:.2f}",
                f"{x.p50_ms:.0f} / {x.p99_ms:.0f}",
                f"{y.p50_ms:.0f} / {y.p99_ms:.0f}",
                f"{x.errors} / {y.errors}",
            ]
        )
    tx, ty = merge([x for x, _ in pairs]), merge([y for _, y in pairs])
    rows.append(
        [
            "**all**",
            "",
            f"{tx.per_s:.2f}",
            f"{ty.per_s:.2f}",
            f"**{statistics.median(y.per_s / x.per_s for x, y in pairs):.2f}** (median)",
            "",
            f"**{statistics.median(yc / xc for xc, yc in per_cpu):.2f}** (median)",
            f"{tx.p50_ms:.0f} / {tx.p99_ms:.0f} ({tx.p99_ms / tx.p50_ms:.2f}×)",
            f"{ty.p50_ms:.0f} / {ty.p99_ms:.0f} ({ty.p99_ms / ty.p50_ms:.2f}×)",
            f"{tx.errors} / {ty.errors}",
        ]
    )
    print()
    print(
        f"{args.model} ({args.pretrained}); ours: ZSS_BACKEND={args.backend}, ZSS_CLIP_QUANTIZE={args.quantize}; "
        f"{args.concurrency} clients, /embed_image, 640x480 JPEG, rounds of {args.ramp:g} s ramp + {args.seconds:g} s"
    )
    print(
        table(
            [
                "round",
                "load avg before",
                "ONNX baseline img/s",
                "ours img/s",
                "ratio",
                "img per CPU-s baseline / ours",
                "CPU ratio",
                "baseline p50 / p99 ms",
                "ours p50 / p99 ms",
                "errors baseline / ours",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
