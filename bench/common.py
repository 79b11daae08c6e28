"""Shared pieces of the benchmarks: a served ViT-B-32 with random weights, a JPEG, the bare image tower in worker
processes, two load generators that keep every latency and status (``steady_load``, which the throughput benchmarks
use, and the httpx ``closed_loop`` kept for comparison), the machine's description and load, and markdown tables.

The development machines are small (2 cores) and shared, so the scripts measure every ratio within one run and
interleave the two sides of a ratio in rounds, printing the load average next to each round.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import http.client
import io
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testing.server import Server, running_server  # noqa: E402

VIT_B32_RANDOM = {"ZSS_CLIP_MODEL": "ViT-B-32", "ZSS_CLIP_PRETRAINED": "random", "ZSS_DETECTOR_MODEL": "none"}


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
def served(env: dict[str, str], workdir: Path, root: Path = ROOT) -> Iterator[Server]:
    """`bentoml serve` of the checkout at ``root`` (this one by default) with its data and log under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    with running_server({**env, "ZSS_DATA_DIR": str(workdir / "data")}, workdir / "serve.log", root=root) as srv:
        yield srv


def add_encoder_options(ap: argparse.ArgumentParser) -> None:
    """Command-line options for the image encoder's layout and batching, shared by the serving benchmarks."""
    ap.add_argument("--image-workers", type=int, default=0, help="image encoder processes (0: default, 1)")
    ap.add_argument("--lanes", type=int, default=0, help="ZSS_IMAGE_LANES, model threads per process (0: default)")
    ap.add_argument("--hold-ms", type=float, default=-1, help="ZSS_IMAGE_BATCH_HOLD_MS (negative: default)")
    ap.add_argument("--max-batch-size", type=int, default=0, help="ZSS_IMAGE_MAX_BATCH_SIZE (0: default)")
    ap.add_argument("--quantize", default="", help="ZSS_CLIP_QUANTIZE (and the bare tower's, where there is one)")
    ap.add_argument("--clip-model", default="", help="ZSS_CLIP_MODEL instead of ViT-B-32 (a config file, a name)")
    ap.add_argument("--clip-pretrained", default="", help="ZSS_CLIP_PRETRAINED with --clip-model")


def encoder_env(args: argparse.Namespace, base: dict[str, str] = VIT_B32_RANDOM) -> dict[str, str]:
    """The server's environment for ``add_encoder_options``' options."""
    env = dict(base)
    if args.image_workers:
        env["BENTOML_CONFIG_OPTIONS"] = f"services.clip_image_encoder.workers={args.image_workers}"
    if args.lanes:
        env["ZSS_IMAGE_LANES"] = str(args.lanes)
    if args.hold_ms >= 0:
        env["ZSS_IMAGE_BATCH_HOLD_MS"] = str(args.hold_ms)
    if args.max_batch_size:
        env["ZSS_IMAGE_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.quantize:
        env["ZSS_CLIP_QUANTIZE"] = args.quantize
    if getattr(args, "clip_model", ""):
        env["ZSS_CLIP_MODEL"] = args.clip_model
        env["ZSS_CLIP_PRETRAINED"] = args.clip_pretrained or "random"
    return env


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """The served CLIP and its runtime, for the benchmarks that compare one server with a baseline."""
    ap.add_argument("--backend", default="auto", help="ZSS_BACKEND")
    ap.add_argument("--quantize", default="none", help="ZSS_CLIP_QUANTIZE")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default="random")


def model_env(args: argparse.Namespace) -> dict[str, str]:
    """The server's environment for ``add_model_options``' options (no detector)."""
    return {
        "ZSS_CLIP_MODEL": args.model,
        "ZSS_CLIP_PRETRAINED": args.pretrained,
        "ZSS_DETECTOR_MODEL": "none",
        "ZSS_BACKEND": args.backend,
        "ZSS_CLIP_QUANTIZE": args.quantize,
    }


# -- the machine -------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def loadavg() -> str:
    """The 1-minute load average (runnable threads on the whole machine, ours included)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def machine() -> str:
    import torch

    from runners.device import cpu_quota

    return (
        f"{dt.date.today().isoformat()}; {platform.machine()}, nproc {os.cpu_count()}, CPU quota {cpu_quota()} "
        f"({cpu_model()}), Python {platform.python_version()}, torch {torch.__version__}, "
        f"load average at start {loadavg()}"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (a server's workers)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        pass
    return total


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column, "l" or "r" (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# -- load --------------------------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    requests: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    load: str = ""
    by_status: dict[int, list[float]] = field(default_factory=dict)  # latencies of the counted requests, per status

    @property
    def per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200)

    def pct_ms(self, q: float) -> float:
        lat = sorted(self.latencies_s)
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]

    @property
    def p50_ms(self) -> float:
        return 1000 * statistics.median(self.latencies_s)

    @property
    def p99_ms(self) -> float:
        return self.pct_ms(0.99)


def merge(results: list[LoadResult]) -> LoadResult:
    out = LoadResult(sum(r.requests for r in results), sum(r.wall_s for r in results))
    for r in results:
        out.latencies_s += r.latencies_s
        for s, n in r.statuses.items():
            out.statuses[s] = out.statuses.get(s, 0) + n
    return out


def closed_loop(fn: Callable[[httpx.Client], int], concurrency: int, requests: int) -> LoadResult:
    """``requests`` calls of ``fn`` from ``concurrency`` threads (one keep-alive client each), each sending its next
    request as soon as its last one is answered. A transport error counts as status -1."""
    lat: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    tls = threading.local()
    clients: list[httpx.Client] = []

    def one(_: int) -> None:
        if not hasattr(tls, "client"):
            tls.client = httpx.Client(timeout=600)
            with lock:
                clients.append(tls.client)
        t = time.perf_counter()
        try:
            status = fn(tls.client)
        except httpx.HTTPError:
            status = -1
        elapsed = time.perf_counter() - t
        with lock:
            lat.append(elapsed)
            statuses[status] = statuses.get(status, 0) + 1

    load_before = loadavg()
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return LoadResult(requests, wall, lat, statuses, load_before)


def image_files(blob: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("data", ("image.jpg", blob, "image/jpeg"))]


@dataclass(frozen=True)
class Post:
    """One POST prepared once (path with its query, encoded body, content type). The load generator runs on the same
    cores as the server; with the body encoded once it spends under a millisecond of CPU per request (httpx building
    the form per request: about 2 ms, ``bench.bench_p1_cpu --client httpx``)."""

    path: str
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()  # more request headers (Triton's Inference-Header-Content-Length)


def image_post(path: str, blob: bytes, field_name: str = "data") -> Post:
    """A multipart/form-data POST of one JPEG, as a browser or ``curl -F data=@image.jpg`` sends it."""
    boundary = "zss-bench-" + os.urandom(8).hex()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="image.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + blob
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return Post(path, body, f"multipart/form-data; boundary={boundary}")


def timed_requests(
    url: str, post: Post, concurrency: int, seconds: float, clock: Callable[[], float] = time.perf_counter
) -> list[tuple[float, float, int]]:
    """``concurrency`` clients (threads with one keep-alive ``http.client`` connection each) send ``post`` back to
    back for ``seconds``; every request as (start, end, status) on ``clock``, in no particular order. A transport
    error is status -1 and reconnects."""
    u = urlsplit(url)
    headers = {"Content-Type": post.content_type, "Content-Length": str(len(post.body)), **dict(post.headers)}
    done: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    stop = clock() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        mine = []
        while clock() < stop:
            t = clock()
            try:
                conn.request("POST", post.path, body=post.body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = -1
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
            mine.append((t, clock(), status))
        conn.close()
        with lock:
            done.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return done


def steady_load(
    url: str,
    post: Post,
    concurrency: int,
    duration_s: float,
    ramp_s: float = 2.0,
    clock: Callable[[], float] = time.perf_counter,
) -> LoadResult:
    """``concurrency`` clients send ``post`` back to back for ``ramp_s + duration_s`` seconds (``timed_requests``).
    Only requests that end inside the last ``duration_s`` seconds count, so the rate is the steady state at full
    concurrency, without the ramp-up or the drain of a fixed request count (with 48 requests over 16 clients the ramp
    and drain cost P1 about a tenth, BENCHMARKS.md). A transport error counts as status -1. ``clock`` is for tests (a
    clock the test server moves)."""
    load_before = loadavg()
    t0 = clock()
    start, stop = t0 + ramp_s, t0 + ramp_s + duration_s
    done = timed_requests(url, post, concurrency, ramp_s + duration_s, clock)
    counted = [(end - begun, st) for begun, end, st in done if start <= end <= stop]
    statuses: dict[int, int] = {}
    for _, _, st in done:  # every response counts for errors, ramp included
        statuses[st] = statuses.get(st, 0) + 1
    by_status: dict[int, list[float]] = {}
    for lat, st in counted:
        by_status.setdefault(st, []).append(lat)
    return LoadResult(len(counted), duration_s, [lat for lat, _ in counted], statuses, load_before, by_status)


# -- the bare image tower, in worker processes ------------------------------------------------------------------------
def _bare_worker(conn: Any, env: dict[str, str], threads: int, barrier: Any) -> None:
    import torch

    from runners.clip import load_clip_encoder
    from settings import get_settings

    torch.set_num_threads(threads)
    enc = load_clip_encoder(get_settings(env), towers="image")
    h, w = enc.preprocess.size
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        batch, reps = msg
        pixels = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        enc.encode_pixels(pixels)  # warm-up at this shape
        barrier.wait()
        t = time.perf_counter()
        for _ in range(reps):
            enc.encode_pixels(pixels)
        conn.send(time.perf_counter() - t)


class BareImageTower:
    """The image tower without any serving: ``workers`` processes with ``threads`` torch threads each, all running
    ``runners.clip.ClipEncoder.encode_pixels`` on ready uint8 batches at once (the best the encoder service's
    workers could do on the same cores)."""

    def __init__(self, workers: int, threads: int, env: dict[str, str] = VIT_B32_RANDOM) -> None:
        self.workers, self.threads = workers, threads
        ctx = mp.get_context("spawn")
        self._barrier = ctx.Barrier(workers)
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_bare_worker, args=(child, env, threads, self._barrier), daemon=True)
            p.start()
            self._conns.append(parent)
            self._procs.append(p)
        for c, p in zip(self._conns, self._procs):
            if not c.poll(600) or c.recv() != "ready":
                raise RuntimeError(f"bare worker {p.pid} did not start")

    @property
    def label(self) -> str:
        return f"{self.workers} x {self.threads} thread{'s' if self.threads > 1 else ''}"

    def throughput(self, batch: int, reps: int = 2) -> float:
        """Images per second of all workers together, each encoding ``reps`` batches of ``batch``."""
        for c in self._conns:
            c.send((batch, reps))
        elapsed = []
        for c, p in zip(self._conns, self._procs):
            if not c.poll(1800):
                raise RuntimeError(f"bare worker {p.pid} did not answer")
            elapsed.append(c.recv())
        return self.workers * batch * reps / max(elapsed)

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()

    def __enter__(self) -> BareImageTower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
