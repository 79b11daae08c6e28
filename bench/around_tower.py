"""What an /embed_image costs around the image tower, per image, in CPU milliseconds of one thread (issue 29, item 3).

    .venv/bin/python -m bench.around_tower [--images 200] [--batch 16] [--precisions none,bf16,int8]
        [--backend auto] [--model ViT-B-32 --pretrained random]

Each stage of the served path runs alone in this process on one thread and is timed with ``time.thread_time`` (CPU
time: what a shared machine's load distorts least), on the same 640x480 JPEG (``bench.common.jpeg``):

1. decode: ``imaging.decode.decode_image`` with the model's draft size (the JPEG decodes at 1/2 scale), as the API does;
2. resize: the model's preprocessing to uint8 pixels (``Preprocess.to_pixels``, PIL's resize and crop);
3. stack: the request's pixels gathered into one array (``np.stack``), as the API sends them;
4. wire: the pixels pickled and unpickled once (protocol 5), an upper bound on what the hop between the API and the
   encoder process copies (BentoML sends numpy arrays between services as pickles);
5. tower: the image tower itself at batch ``--batch`` on ``--backend`` (``auto``: OpenVINO on x86) at each precision,
   with one thread (what one of the encoder's two lanes has on 2 cores), normalisation inside the exported graph.

Printed: CPU ms per image per stage, and each stage's share of the whole.
"""

from __future__ import annotations

import argparse
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, VIT_B32_RANDOM, jpeg, machine, table
from imaging.decode import decode_image
from runners.clip import load_clip_encoder
from settings import get_settings


def cpu_ms(fn: Callable[[], object], n: int, per: int = 1) -> float:
    """CPU milliseconds of this thread per item: ``fn`` run ``n`` times, each handling ``per`` items (one warm-up)."""
    fn()
    t = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - t) * 1000 / (n * per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200, help="images per stage")
    ap.add_argument("--batch", type=int, default=16, help="the tower's batch size")
    ap.add_argument("--precisions", default="none,bf16,int8", help="ZSS_CLIP_QUANTIZE values to time the tower at")
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".zss" / "bench-exports")
    ap.add_argument("--backend", default="auto", help="ZSS_BACKEND (auto: what the service picks on this CPU)")
    ap.add_argument("--model", default=VIT_B32_RANDOM["ZSS_CLIP_MODEL"], help="ZSS_CLIP_MODEL")
    ap.add_argument("--pretrained", default=VIT_B32_RANDOM["ZSS_CLIP_PRETRAINED"], help="ZSS_CLIP_PRETRAINED")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine(), flush=True)

    towers = {}
    for precision in args.precisions.split(","):
        env = {
            **VIT_B32_RANDOM,
            "ZSS_CLIP_MODEL": args.model,
            "ZSS_CLIP_PRETRAINED": args.pretrained,
            "ZSS_BACKEND": args.backend,
            "ZSS_CLIP_QUANTIZE": precision,
            "ZSS_DATA_DIR": str(args.data_dir),
        }
        towers[precision] = load_clip_encoder(get_settings(env), towers="image", lanes=1)
    enc = next(iter(towers.values()))
    pp = enc.preprocess
    data = jpeg()
    img = decode_image(data, max_pixels=64_000_000, draft_size=pp.draft_size)
    one = pp.to_pixels(img)
    rows_px = [one] * args.batch
    batch = np.stack(rows_px)
    n, b = args.images, args.batch

    stages: list[tuple[str, float]] = [
        (
            "decode (640x480 JPEG, draft)",
            cpu_ms(lambda: decode_image(data, max_pixels=64_000_000, draft_size=pp.draft_size), n),
        ),
        (f"resize to {pp.size[0]}x{pp.size[1]} ({pp.interpolation})", cpu_ms(lambda: pp.to_pixels(img), n)),
        ("stack the request's pixels", cpu_ms(lambda: np.stack(rows_px), max(1, n // b), b)),
        (
            "wire: pickle + unpickle the pixels",
            cpu_ms(lambda: pickle.loads(pickle.dumps(batch, protocol=5)), max(1, n // b), b),
        ),
    ]
    around = sum(ms for _, ms in stages)
    tower_ms = {}
    for tower in towers.values():
        label = f"tower, batch {b}, {tower.info['backend']} {tower.info['precision']}"
        tower_ms[tower.info["precision"]] = cpu_ms(lambda tower=tower: tower.encode_pixels(batch), max(1, n // b), b)
        stages.append((label, tower_ms[tower.info["precision"]]))

    rows = [[name, f"{ms:.2f}"] for name, ms in stages]
    rows.append(["**around the tower (1-4)**", f"**{around:.2f}**"])
    for precision, ms in tower_ms.items():
        rows.append([f"around / (around + tower {precision})", f"{around / (around + ms):.0%}"])
    print(table(["stage (one thread)", "CPU ms per image"], rows))


if __name__ == "__main__":
    main()
