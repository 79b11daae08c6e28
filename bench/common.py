"""Shared pieces of the benchmarks: a served ViT-B-32 with random weights, a load generator, a JPEG."""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import Server, running_server  # noqa: E402

VIT_B32_RANDOM = {"ZSS_CLIP_MODEL": "ViT-B-32", "ZSS_CLIP_PRETRAINED": "random", "ZSS_DETECTOR_MODEL": "none"}


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def jpeg(width: int = 640, height: int = 480, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth content (not noise), so the JPEG has a realistic size.
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    arr = (255 * (0.5 + 0.5 * np.sin(6 * x + 4 * y + rng.random((1, 1, 3)) * 6))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(arr, (height, width, 3)).copy()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@contextmanager
def served(env: dict[str, str], workdir: Path) -> Iterator[Server]:
    workdir.mkdir(parents=True, exist_ok=True)
    with running_server({**env, "ZSS_DATA_DIR": str(workdir / "data")}, workdir / "serve.log") as srv:
        yield srv


def load(fn: Callable[[httpx.Client], int], concurrency: int, requests: int) -> dict[str, float]:
    """Run ``requests`` calls of ``fn`` from ``concurrency`` threads (one keep-alive client each)."""
    lat: list[float] = []
    errors = 0
    tls = threading.local()

    def one(_: int) -> None:
        nonlocal errors
        if not hasattr(tls, "client"):
            tls.client = httpx.Client(timeout=600)
        t = time.perf_counter()
        status = fn(tls.client)
        lat.append(time.perf_counter() - t)
        if status != 200:
            errors += 1

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": requests,
        "per_s": requests / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "errors": errors,
    }


def bare_image_throughput(batch_sizes: tuple[int, ...] = (1, 8, 16, 32), repeats: int = 3) -> dict[int, float]:
    """The bare ViT-B-32 image tower's img/s per batch size (best of ``repeats``), same settings as the encoder."""
    from runners.clip import load_clip_encoder
    from runners.device import configure_threads
    from settings import get_settings

    settings = get_settings(VIT_B32_RANDOM)
    configure_threads(settings.torch_threads)
    enc = load_clip_encoder(settings, towers="image")
    h, w = enc.preprocess.size
    out = {}
    for b in batch_sizes:
        pixels = np.random.default_rng(0).integers(0, 256, (b, h, w, 3), dtype=np.uint8)
        enc.encode_pixels(pixels)  # warm-up
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            enc.encode_pixels(pixels)
            best = max(best, b / (time.perf_counter() - t))
        out[b] = best
    del enc
    return out
