"""Issue 6: the folder tool's end-to-end throughput vs the bare model's batched forward pass, in one run.

    .venv/bin/python -m bench.bench_classify_dir [--images 96] [--batch-size 32] [--tiny]

Generates 640x480 JPEGs, measures encode_pixels on ready pixel batches (best of 3), then runs
`tools.classify_dir classify` over the folder (decode + resize in threads, encode, score, CSV) with the same model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import jpeg, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default="random")
    args = ap.parse_args()

    from tools import classify_dir

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
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
            "--quiet",
        ]
        ns = classify_dir.parser().parse_args(
            ["classify", str(cfg), str(folder), "--out", str(root / "o.csv"), *common]
        )
        engine = classify_dir.build_engine(ns)
        enc = engine.encoder
        h, w = enc.preprocess.size
        pixels = np.random.default_rng(0).integers(0, 256, (args.batch_size, h, w, 3), dtype=np.uint8)
        enc.encode_pixels(pixels)
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            enc.encode_pixels(pixels)
            best = max(best, args.batch_size / (time.perf_counter() - t))
        engine.compile(classify_dir.parse_classes(classes), False)  # text side cached before timing
        t = time.perf_counter()
        summary = classify_dir.cmd_classify(ns, engine)
        tool = summary["classified"] / (time.perf_counter() - t)
    print(f"machine: {machine()}")
    print("| model | images | batch | bare forward img/s | tool end-to-end img/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| {args.model} ({args.pretrained}) | {args.images} | {args.batch_size} | {best:.1f} | {tool:.1f} "
        f"| {tool / best:.2f} |"
    )


if __name__ == "__main__":
    main()
