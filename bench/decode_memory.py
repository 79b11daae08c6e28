"""Peak and after-burst RSS of an API worker's decoding under 16 concurrent 60 MP uploads, with and without the pixel
budget (issue 32, item 2).

    .venv/bin/python -m bench.decode_memory [--images 16] [--side 7800] [--budget-mp 128]

What an API worker does per image (imaging/sources.load_image, then the CLIP preprocessing to 224 px), in ``--images``
threads at once, each in a fresh process (so one side's arenas do not flatter the other): ``budget`` with
``ZSS_DECODE_BUDGET_MP``'s default and the malloc_trim after the burst, ``none`` without either. RSS is sampled every
10 ms; "after" is the RSS 1 s after the burst ended. The image is a lossless WebP of ``--side`` squared pixels (the
probe's was a 111 KB WebP of 7900x7900: a small file, a huge decode), and a JPEG of the same size for comparison
(draft-decoded at 1/8 scale: small either way).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_image(path: Path, side: int, fmt: str) -> None:
    # Flat colour bands: a tiny file whose decode is as big as any photo's.
    arr = np.zeros((side, side, 3), np.uint8)
    arr[: side // 2] = (200, 30, 30)
    arr[side // 2 :] = (30, 30, 200)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"lossless": True, "method": 0} if fmt == "WEBP" else {"quality": 80}))
    path.write_bytes(buf.getvalue())


def run_one(path: Path, images: int, budget_mp: float) -> dict[str, float]:
    from imaging.budget import PixelBudget
    from imaging.preprocess import Preprocess
    from imaging.sources import ImageLimits, ImageSource, load_image

    blob = path.read_bytes()
    budget = PixelBudget(int(budget_mp * 1e6), wait_s=600) if budget_mp > 0 else None
    limits = ImageLimits(max_pixels=64_000_000, max_bytes=64 * 2**20, budget=budget)
    pre = Preprocess(size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)  # type: ignore[arg-type]
    proc = psutil.Process()
    rest = proc.memory_info().rss
    peak = rest
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    with ThreadPoolExecutor(images) as pool:
        shapes = list(
            pool.map(lambda _: pre.to_pixels(load_image(ImageSource("bytes", blob), limits, 224)).shape, range(images))
        )
    took = time.monotonic() - start
    done.set()
    sampler.join()
    assert all(s == (224, 224, 3) for s in shapes)
    time.sleep(1.0)
    mib = 2**20
    return {
        "rest_mib": rest / mib,
        "peak_mib": peak / mib,
        "after_mib": proc.memory_info().rss / mib,
        "seconds": took,
        "held_peak_mp": (budget.peak / 1e6) if budget else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--side", type=int, default=7800)  # 60.8 MP, under the 64 MP cap
    ap.add_argument("--budget-mp", type=float, default=128.0)
    # Without the budget 16 at once would want ~11 GB of a shared machine: the "before" side decodes fewer.
    ap.add_argument("--baseline-images", type=int, default=4)
    ap.add_argument("--child", nargs=3, metavar=("PATH", "IMAGES", "BUDGET_MP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(Path(args.child[0]), int(args.child[1]), float(args.child[2]))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("WEBP", "JPEG"):
            path = Path(tmp) / f"big.{fmt.lower()}"
            make_image(path, args.side, fmt)
            for side, budget, n in (("budget", args.budget_mp, args.images), ("none", 0.0, args.baseline_images)):
                out = subprocess.run(
                    [sys.executable, "-m", "bench.decode_memory", "--child", str(path), str(n), str(budget)],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((fmt, path.stat().st_size, side, n, r))
                print(fmt, side, r, flush=True)
    mp = args.side * args.side / 1e6
    print(f"\n{mp:.1f} MP images, load average {psutil.getloadavg()[0]:.1f}\n")
    print("| format (file) | at once | budget | RSS at rest | peak RSS | peak over rest | 1 s after | wall | MP held |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fmt, size, side, n, r in rows:
        label = f"{args.budget_mp:.0f} MP + malloc_trim" if side == "budget" else "none (before)"
        print(
            f"| {fmt} ({size / 1024:.0f} KB) | {n} | {label} | {r['rest_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB | "
            f"{r['peak_mib'] - r['rest_mib']:.0f} MiB | {r['after_mib']:.0f} MiB | {r['seconds']:.1f} s | "
            f"{r['held_peak_mp']:.0f} |"
        )


if __name__ == "__main__":
    main()
