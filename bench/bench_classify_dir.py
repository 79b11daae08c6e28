"""Issue 6: the folder tool's end-to-end throughput vs the bare model's batched forward pass, in one run.

    .venv/bin/python -m bench.bench_classify_dir [--images 200] [--batch-size 32] [--workers 4] [--tiny]

Generates 640x480 JPEGs, measures encode_pixels on ready pixel batches (best of --repeats), then runs
`tools.classify_dir classify` over the folder (decode + resize in threads, encode, score, CSV) with the same model
already loaded, and prints both throughputs and their ratio (goal >= 0.9). ViT-B-32 with seeded random weights by
default; --tiny uses the test suite's tiny random model instead (fast; decoding then dominates, so the ratio is low).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import jpeg, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4, help="decoding threads of the tool")
    ap.add_argument("--repeats", type=int, default=3, help="bare-forward passes; the best counts")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default="random")
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny random-weight model")
    args = ap.parse_args()

    from tools import classify_dir

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.tiny:
            from testing.models import write_tiny_clip

            files = write_tiny_clip(root / "tiny")
            args.model, args.pretrained = str(files.config), str(files.checkpoint)
        folder = root / "imgs"
        folder.mkdir()
        for i in range(args.images):
            (folder / f"{i:04d}.jpg").write_bytes(jpeg(seed=i))
        cfg = root / "clf.json"
        classes = [{"name": f"c{i}", "examples_to_include": [f"thing {i}"]} for i in range(10)]
        cfg.write_text(json.dumps({"classifier_configs": classes, "augment_examples": False}))
        common = [
            "--model",
            args.model,
            "--pretrained",
            args.pretrained,
            "--data-dir",
            str(root / "d"),
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--quiet",
        ]
        ns = classify_dir.parser().parse_args(
            ["classify", str(cfg), str(folder), "--out", str(root / "o.csv"), *common]
        )
        engine = classify_dir.build_engine(ns)
        enc = engine.encoder
        h, w = enc.preprocess.size
        pixels = np.random.default_rng(0).integers(0, 256, (args.batch_size, h, w, 3), dtype=np.uint8)
        enc.encode_pixels(pixels)  # warm-up
        best = 0.0
        for _ in range(args.repeats):
            t = time.perf_counter()
            enc.encode_pixels(pixels)
            best = max(best, args.batch_size / (time.perf_counter() - t))
        engine.compile(classify_dir.load_config(cfg))  # text side cached before timing
        t = time.perf_counter()
        summary = classify_dir.cmd_classify(ns, engine)
        tool = summary["classified"] / (time.perf_counter() - t)
        engine.close()
    name = "tiny (random)" if args.tiny else f"{args.model} ({args.pretrained})"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine()}, torch threads {torch.get_num_threads()}, load average {load}")
    print("| model | images | batch | workers | bare forward img/s | tool end-to-end img/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    row = [name, args.images, args.batch_size, args.workers, f"{best:.1f}", f"{tool:.1f}", f"{tool / best:.2f}"]
    print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
