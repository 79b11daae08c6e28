"""The optional int8 CPU backend (ZSS_CLIP_QUANTIZE=int8): speed on ViT-B-32, accuracy on the project's shapes CLIP.

    .venv/bin/python -m bench.bench_int8 [--batches 1,8,32] [--rounds 3]

1. Speed: the bare ViT-B-32 image tower (seeded random weights: the released architecture and cost) loaded through
   ``runners.clip.load_clip_encoder`` twice, float32 and int8, in one process with the CPU quota's torch threads.
   Rounds alternate the two models at each batch size, so drift of a shared machine hits both alike; the best round
   of each is kept.
2. Accuracy: ``tools.eval_shapes_clip`` on models/shapes-clip, float32 and int8, on the same freshly drawn images,
   plus the cosine between the two models' image embeddings of those images.

This is torch's int8 alone; ``bench.bench_backends`` measures every backend's, ONNX Runtime's int8 (what ``auto``
serves with ZSS_CLIP_QUANTIZE=int8, both towers) included.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import VIT_B32_RANDOM, machine, table
from runners.clip import ClipEncoder, load_clip_encoder, quantize_int8
from runners.device import configure_threads
from settings import get_settings
from tools import eval_shapes_clip as ev

SHAPES_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes-clip"


def img_per_s(enc: ClipEncoder, pixels: np.ndarray, reps: int) -> float:
    enc.encode_pixels(pixels)  # warm-up at this shape
    t = time.perf_counter()
    for _ in range(reps):
        enc.encode_pixels(pixels)
    return reps * len(pixels) / (time.perf_counter() - t)


def speed(batches: list[int], rounds: int) -> str:
    threads = configure_threads(0)
    encs = {
        # torch's own int8 (ZSS_BACKEND=torch); bench.bench_backends compares every backend.
        mode: load_clip_encoder(
            get_settings({**VIT_B32_RANDOM, "ZSS_BACKEND": "torch", "ZSS_CLIP_QUANTIZE": mode}), towers="image"
        )
        for mode in ("none", "int8")
    }
    h, w = encs["none"].preprocess.size
    best: dict[tuple[str, int], float] = {}
    for b in batches:
        pixels = np.random.default_rng(0).integers(0, 256, (b, h, w, 3), dtype=np.uint8)
        a, q = encs["none"].encode_pixels(pixels), encs["int8"].encode_pixels(pixels)
        cos = float((a * q).sum(axis=1).mean())
        best[("cos", b)] = cos
        for _ in range(rounds):
            for mode, enc in encs.items():
                v = img_per_s(enc, pixels, reps=max(1, 32 // b))
                best[(mode, b)] = max(best.get((mode, b), 0.0), v)
    rows = [
        [
            f"b{b}",
            f"{best[('none', b)]:.2f}",
            f"{best[('int8', b)]:.2f}",
            f"{best[('int8', b)] / best[('none', b)]:.2f}",
            f"{best[('cos', b)]:.4f}",
        ]
        for b in batches
    ]
    return f"ViT-B-32 image tower, {threads} torch threads, best of {rounds} alternating rounds\n\n" + table(
        ["batch", "float32 img/s", "int8 img/s", "speed-up", "mean cos(float32, int8)"], rows
    )


def accuracy() -> str:
    torch.set_num_threads(configure_threads(0))
    fp32 = ev.load(SHAPES_DIR)
    int8 = ev.load(SHAPES_DIR)
    int8.model = quantize_int8(int8.model)  # type: ignore[assignment]
    rows_f, rows_q = ev.evaluate(fp32), ev.evaluate(int8)
    ts = ev.draw_test_set(20)
    cos = (ev.encode_images(fp32, ts.images) * ev.encode_images(int8, ts.images)).sum(dim=1)
    rows = [
        [f.name, f"{f.value:.1f}", f"{q.value:.1f}", f"{q.value - f.value:+.1f}", f.n]
        for f, q in zip(rows_f, rows_q, strict=True)
    ]
    return (
        f"models/shapes-clip, tools.eval_shapes_clip metrics; image embeddings float32 vs int8: mean cos "
        f"{float(cos.mean()):.4f}, min {float(cos.min()):.4f} ({len(ts.images)} images)\n\n"
        + table(["metric", "float32 %", "int8 %", "difference", "images"], rows)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    print()
    print(speed([int(b) for b in args.batches.split(",")], args.rounds), flush=True)
    print()
    print(accuracy())


if __name__ == "__main__":
    main()
