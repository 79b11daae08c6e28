"""The CLIP towers' backends (ZSS_BACKEND, runners/backends.py): throughput on ViT-B-32 (images at batch 1-32,
prompts at batch 1-256) and accuracy against torch, in one process.

    .venv/bin/python -m bench.bench_backends [--batches 1,2,4,8,16,32] [--rounds 2] [--threads 1]
        [--text-batches 1,8,64,256] [--text-threads 0]
        [--data-dir .zss/bench-exports] [--only torch,onnx,openvino,torch+int8,onnx+int8] [--per-combo 150]
        [--skip-speed] [--skip-text] [--skip-accuracy]

1. Speed: ViT-B-32 with seeded random weights (the released architecture and cost) loaded through
   ``runners.clip.load_clip_encoder`` once per backend and precision (exports are cached in ``--data-dir``), each with
   ``--threads`` threads (1: what one of the image encoder's two lanes has on 2 cores), calling ``encode_pixels`` on
   ready uint8 batches. At each batch size the backends take turns, round after round, so a shared machine's slow
   spells hit all alike; the best round of each is kept, in images per CPU second of the process (what an
   oversubscribed machine distorts least) and per wall second. The cosine to torch float32's vectors of the same
   pixels is printed beside each.
2. Text speed: the ViT-B-32 text tower on each backend (``--text-threads``, 0 = the CPU quota: the text encoder's
   threads), ``encode_texts`` on deploy prompts (labels expanded with the 80 CLIP templates, so 8-20 tokens each, the
   context trimmed to each batch's longest as the service does), alternating rounds, best kept; prompts per CPU
   second / per wall second, and the cosine to torch float32's vectors. Then the short lane (issue 18): the latency of
   one prompt encoded alone and beside a long deploy's batch in another thread, as ``encode_now`` runs beside
   ``encode`` in the text encoder (a runtime that serialises calls makes the one prompt wait for the batch).
3. Accuracy: ``tools.eval_shapes_clip`` on the project's shapes CLIP (models/shapes-clip) through each backend
   (the service's encoder: its preprocessing, its text tower), against open_clip's own float32 model.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import ROOT, VIT_B32_RANDOM, machine, table
from runners.clip import ClipEncoder, load_clip_encoder
from runners.device import configure_threads
from semantic.templates import expand
from settings import get_settings
from testing.clip_images import encode_images
from testing.models import shapes_clip_env
from tools import eval_shapes_clip as ev

CONFIGS = ("torch", "onnx", "openvino", "openvino+bf16", "torch+int8", "onnx+int8")


def encoder(config: str, env: dict[str, str], data_dir: Path, towers: str = "image") -> ClipEncoder:
    backend, _, precision = config.partition("+")
    s = {**env, "ZSS_BACKEND": backend, "ZSS_CLIP_QUANTIZE": precision or "none", "ZSS_DATA_DIR": str(data_dir)}
    return load_clip_encoder(get_settings(s), towers=towers)


def per_s(encode: Callable[[], object], n: int, reps: int) -> tuple[float, float]:
    """(items per second of wall time, items per CPU second of this process: all its threads, the runtimes' own pools
    included) for ``encode`` of ``n`` items. The second is what a shared, oversubscribed machine distorts least."""
    encode()  # warm-up at this shape
    t, c = time.perf_counter(), time.process_time()
    for _ in range(reps):
        encode()
    return reps * n / (time.perf_counter() - t), reps * n / max(1e-9, time.process_time() - c)


Rates = dict[tuple[str, int], float]


def sweep(
    encs: dict[str, ClipEncoder],
    batches: list[int],
    rounds: int,
    make: Callable[[int], Any],
    encode: Callable[[ClipEncoder, Any], np.ndarray],
    reps: int,
) -> tuple[Rates, Rates, Rates]:
    """For each batch size ``b`` (inputs ``make(b)``): each config's best (wall, CPU) rate over ``rounds`` with
    ``reps // b`` calls of ``encode`` per measurement, and its vectors' lowest cosine to torch's (when torch is one)."""
    best: Rates = {}
    best_cpu: Rates = {}
    cos: Rates = {}
    for b in batches:
        x = make(b)
        ref = encode(encs["torch"], x) if "torch" in encs else None
        for c, enc in encs.items():
            if ref is not None:
                cos[(c, b)] = float((encode(enc, x) * ref).sum(axis=1).min())
        for _ in range(rounds):
            for c, enc in encs.items():
                wall, cpu = per_s(lambda enc=enc, x=x: encode(enc, x), b, max(1, reps // b))
                best[(c, b)] = max(best.get((c, b), 0.0), wall)
                best_cpu[(c, b)] = max(best_cpu.get((c, b), 0.0), cpu)
        print(f"b{b}: " + ", ".join(f"{c} {best[(c, b)]:.1f} ({best_cpu[(c, b)]:.1f}/cpu-s)" for c in encs), flush=True)
    return best, best_cpu, cos


def speed(configs: list[str], batches: list[int], rounds: int, data_dir: Path, threads: int) -> str:
    threads = configure_threads(threads)
    t0 = time.perf_counter()
    encs = {c: encoder(c, {**VIT_B32_RANDOM, "ZSS_DEVICE": "cpu"}, data_dir) for c in configs}
    print(f"loaded (exports included) in {time.perf_counter() - t0:.0f} s", flush=True)
    h, w = next(iter(encs.values())).preprocess.size
    best, best_cpu, cos = sweep(
        encs,
        batches,
        rounds,
        lambda b: np.random.default_rng(b).integers(0, 256, (b, h, w, 3), dtype=np.uint8),
        lambda enc, pixels: enc.encode_pixels(pixels),
        reps=16,
    )

    def top(c: str, d: dict[tuple[str, int], float]) -> float:
        return max(d[(c, b)] for b in batches)

    rows = []
    for c in configs:
        row = [c] + [f"{best_cpu[(c, b)]:.1f} / {best[(c, b)]:.1f}" for b in batches]
        if "torch" in encs:
            row += [f"{top(c, best_cpu) / top('torch', best_cpu):.2f}", f"{min(cos[(c, b)] for b in batches):.5f}"]
        rows.append(row)
    headers = ["backend"] + [f"b{b}" for b in batches]
    if "torch" in encs:
        headers += ["best batch / torch's best (CPU time)", "min cos to torch"]
    return (
        f"ViT-B-32 image tower (random weights), {threads} thread{'s' if threads > 1 else ''}, best of {rounds} "
        "alternating rounds; each cell: images per CPU second / images per wall second\n\n" + table(headers, rows)
    )


LABELS = [
    "dog", "golden retriever", "tabby cat", "red sports car", "fire truck", "espresso machine", "mountain bike",
    "snow-capped mountain", "lighthouse on a cliff", "bowl of ramen", "grand piano", "hot air balloon",
]  # fmt: skip


def text_speed(configs: list[str], batches: list[int], rounds: int, data_dir: Path, threads: int) -> str:
    threads = configure_threads(threads)
    t0 = time.perf_counter()
    encs = {c: encoder(c, {**VIT_B32_RANDOM, "ZSS_DEVICE": "cpu"}, data_dir, towers="text") for c in configs}
    print(f"text towers loaded (exports included) in {time.perf_counter() - t0:.0f} s", flush=True)
    prompts = expand(LABELS)  # 80 templates per label, in the order a deploy sends them
    best, best_cpu, cos = sweep(
        encs,
        batches,
        rounds,
        lambda b: [prompts[i % len(prompts)] for i in range(b * 7, b * 8)],  # another slice per size
        lambda enc, texts: enc.encode_texts(texts),
        reps=64,
    )
    lane_rows = []
    for c, enc in encs.items():
        alone, beside = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            enc.encode_texts(prompts[:1])
            alone.append(time.perf_counter() - t)
            long = threading.Thread(target=enc.encode_texts, args=(prompts[:512],))
            long.start()
            time.sleep(0.2)  # the long batch is running
            t = time.perf_counter()
            enc.encode_texts(prompts[1:2])
            beside.append(time.perf_counter() - t)
            long.join()
        lane_rows.append([c, f"{1000 * min(alone):.0f}", f"{1000 * min(beside):.0f}"])
    rows = []
    for c in configs:
        row = [c] + [f"{best_cpu[(c, b)]:.0f} / {best[(c, b)]:.0f}" for b in batches]
        if "torch" in encs:
            row += [f"{best_cpu[(c, b)] / best_cpu[('torch', b)]:.2f}" for b in batches]
            row += [f"{min(cos[(c, b)] for b in batches):.5f}"]
        rows.append(row)
    headers = ["backend"] + [f"b{b}" for b in batches]
    if "torch" in encs:
        headers += [f"b{b} / torch (CPU)" for b in batches] + ["min cos to torch"]
    return (
        f"ViT-B-32 text tower (random weights), {threads} thread{'s' if threads > 1 else ''}, best of {rounds} "
        "alternating rounds; each cell: prompts per CPU second / prompts per wall second\n\n"
        + table(headers, rows)
        + f"\n\nOne prompt (best of {rounds}), alone and beside a 512-prompt batch running in another thread\n\n"
        + table(["backend", "alone ms", "beside a long batch ms"], lane_rows)
    )


def accuracy(configs: list[str], data_dir: Path, per_combo: int) -> str:
    torch.set_num_threads(configure_threads(0))
    reference = ev.load(ev.DEFAULT_DIR)
    ref_rows = ev.evaluate(reference, per_combo)
    results = {}
    for c in configs:
        enc = encoder(c, shapes_clip_env(data_dir), data_dir, towers="both")
        m = ev.Loaded(
            reference.model,
            reference.preprocess,
            reference.tokenizer,
            image_fn=lambda images, enc=enc: torch.from_numpy(encode_images(enc, list(images))),
            text_fn=lambda texts, enc=enc: torch.from_numpy(enc.encode_texts(list(texts))),
        )
        results[c] = ev.evaluate(m, per_combo)
    rows = [
        [r.name, f"{r.value:.1f}"] + [f"{results[c][i].value - r.value:+.1f}" for c in configs]
        for i, r in enumerate(ref_rows)
    ]
    rows.append(
        ["**largest difference**", ""]
        + [f"**{max(abs(results[c][i].value - r.value) for i, r in enumerate(ref_rows)):.1f}**" for c in configs]
    )
    return (
        f"models/shapes-clip, tools.eval_shapes_clip (per metric: open_clip float32 %, then each backend's difference "
        f"in points; {ref_rows[0].n + ref_rows[1].n} images)\n\n"
        + table(["metric", "open_clip float32 %"] + configs, rows)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per call (the service: 1 per lane on 2 cores)")
    ap.add_argument("--text-batches", default="1,8,64,256")
    ap.add_argument("--text-threads", type=int, default=0, help="threads of the text tower (0: the CPU quota)")
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".zss" / "bench-exports")
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--per-combo", type=int, default=150, help="shapes evaluation: images per colour/shape pair")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    configs = [c for c in args.only.split(",") if c]
    print(f"machine: {machine()}", flush=True)
    if not args.skip_speed:
        print()
        print(
            speed(configs, [int(b) for b in args.batches.split(",")], args.rounds, args.data_dir, args.threads),
            flush=True,
        )
    if not args.skip_text:
        print()
        batches = [int(b) for b in args.text_batches.split(",")]
        print(text_speed(configs, batches, args.rounds, args.data_dir, args.text_threads), flush=True)
    if not args.skip_accuracy:
        print()
        print(accuracy(configs, args.data_dir, args.per_combo))


if __name__ == "__main__":
    main()
