"""One command that measures a GPU (issue 19): everything a CUDA machine should be asked, in under 8 minutes, with no
set-up beyond the project's own install (random-weight models, nothing downloaded).

    .venv/bin/python -m bench.gpu_suite [--json bench/results/gpu_suite.json]
    .venv/bin/python -m bench.gpu_suite --smoke      # every stage on the CPU with tiny models, in about a minute

Stages, each in its own process with its own time limit (a stage that runs over is stopped, its server with it, and
the suite goes on with what it measured):

1. ``tower``: the bare ViT-B-32 image tower in fp16 at batch 1-512 (uint8 pixels from pinned host memory, copied
   asynchronously, normalised on the GPU); JPEG decoding + resizing on the GPU (``torchvision.io.decode_jpeg(device=
   "cuda")``, nvJPEG) against PIL on every CPU core (the service's decoding); and both together (decode on the GPU,
   then the tower), the ceiling of a service that decoded on the GPU.
2. ``serve``: one `bentoml serve` (ViT-B-32 fp16, full-size OWLv2 with random weights, API workers and image lanes
   for a GPU) loaded by several client processes: ``/embed_image``; a cold deploy of 1,000 classes x 10 examples
   (text-tower throughput); ``/classify`` against it; and ``/detect`` with a 20-class detector.
3. ``decode``: ``serve``'s /embed_image again with ZSS_DEVICE_DECODE and ZSS_PIN_MEMORY (the image encoder decodes
   the JPEGs on the GPU; the API neither decodes nor resizes).

The suite prints one markdown table and writes every number as JSON. ``--smoke`` runs the same code on the CPU with the
tests' tiny CLIP and OWLv2 and tiny sizes, so the script is known to work before a GPU ever runs it
(tests/bench/test_gpu_suite.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from bench.common import ROOT, LoadResult, Post, image_post, jpeg, machine, steady_load, table


@dataclass
class Plan:
    """Sizes and limits of one run; ``gpu_plan`` and ``smoke_plan`` are the two there are."""

    device: str
    env: dict[str, str]  # the server's settings (the tower stage reads the CLIP ones)
    batches: list[int]
    tower_seconds: float  # per batch size
    decode_images: int
    clients: int
    load_procs: int
    seconds: float
    ramp: float
    classes: int
    examples: int
    detect_clients: int
    detect_classes: int
    timeouts: dict[str, float] = field(default_factory=dict)
    server_start_s: float = 300.0
    # The SigLIP image tower measured beside the CLIP's in the tower stage (issue 27).
    siglip_name: str = "SigLIP SO400M-384"
    siglip_env: dict[str, str] = field(default_factory=dict)
    siglip_batches: list[int] = field(default_factory=lambda: [1, 32, 128])


def gpu_plan() -> Plan:
    return Plan(
        device="cuda",
        env={
            "ZSS_CLIP_MODEL": "ViT-B-32",
            "ZSS_CLIP_PRETRAINED": "random",
            "ZSS_DEVICE": "cuda",
            "ZSS_FP16": "true",
            "ZSS_DETECTOR_MODEL": "random",
            # Two lanes: one batch's copies and pre/post-processing overlap the other's forward pass.
            "ZSS_IMAGE_LANES": "2",
            "ZSS_IMAGE_MAX_BATCH_SIZE": "256",
            # The API processes decode and resize every JPEG (PIL): enough of them to feed the GPU.
            "BENTOML_CONFIG_OPTIONS": f"services.zeroshot.workers={max(2, min(12, (os.cpu_count() or 4) - 4))}",
        },
        batches=[1, 8, 32, 64, 128, 256, 512],
        siglip_env={"ZSS_CLIP_MODEL": "ViT-SO400M-14-SigLIP-384", "ZSS_CLIP_PRETRAINED": "random"},
        tower_seconds=2.0,
        decode_images=256,
        clients=256,
        load_procs=4,
        seconds=20.0,
        ramp=5.0,
        classes=1000,
        examples=10,
        detect_clients=32,
        detect_classes=20,
        timeouts={"tower": 120.0, "serve": 330.0, "decode": 150.0, "container": 300.0},
    )


def smoke_plan(workdir: Path) -> Plan:
    from testing.models import ClipFiles, write_tiny_clip
    from testing.owl import build_tiny_owlv2
    from testing.siglip import write_tiny_open_clip_siglip

    clip = ClipFiles(workdir / "tiny-clip" / "tiny-clip.json", workdir / "tiny-clip" / "tiny-clip.pt")
    if not clip.checkpoint.exists():  # the stages' processes reuse what the driver wrote
        clip = write_tiny_clip(workdir / "tiny-clip")
    owl = workdir / "tiny-owl"
    if not (owl / "config.json").exists():
        owl = build_tiny_owlv2(owl)
    siglip = ClipFiles(workdir / "tiny-siglip" / "tiny-siglip.json", workdir / "tiny-siglip" / "tiny-siglip.pt")
    if not siglip.checkpoint.exists():
        siglip = write_tiny_open_clip_siglip(workdir / "tiny-siglip")
    return Plan(
        device="cpu",
        env={
            "ZSS_CLIP_MODEL": str(clip.config),
            "ZSS_CLIP_PRETRAINED": str(clip.checkpoint),
            "ZSS_DEVICE": "cpu",
            "ZSS_BACKEND": "torch",
            "ZSS_DETECTOR_MODEL": str(owl),
            "ZSS_DETECTOR_TOP_K": "48",
        },
        batches=[1, 4],
        siglip_name="tiny SigLIP",
        siglip_env={"ZSS_CLIP_MODEL": str(siglip.config), "ZSS_CLIP_PRETRAINED": str(siglip.checkpoint)},
        siglip_batches=[1, 4],
        tower_seconds=0.3,
        decode_images=8,
        clients=4,
        load_procs=2,
        seconds=3.0,  # long enough that a loaded CI machine still finishes requests inside the window
        ramp=0.5,
        classes=20,
        examples=2,
        detect_clients=2,
        detect_classes=3,
        timeouts={"tower": 120.0, "serve": 240.0, "decode": 200.0, "container": 240.0},
        server_start_s=200.0,
    )


# -- results -----------------------------------------------------------------------------------------------------------
class Results:
    """Rows (stage, what, value, unit, note) written to a JSON file after each one, so a stage stopped for running
    over its limit keeps what it measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def add(self, stage: str, what: str, value: float, unit: str, note: str = "", **extra: Any) -> None:
        row = {"stage": stage, "what": what, "value": round(float(value), 3), "unit": unit, "note": note}
        self.rows.append({**row, **extra})
        print(f"  {stage}: {what}: {value:.1f} {unit} {note}", flush=True)
        self.path.write_text(json.dumps(self.rows, indent=2))


# -- stage 1: the bare tower and decoding ------------------------------------------------------------------------------
def stage_tower(plan: Plan, out: Results) -> None:
    import torch
    import torch.nn.functional as F

    from runners.clip import load_clip_encoder
    from runners.device import configure_threads
    from settings import get_settings

    configure_threads(0)
    settings = get_settings({**plan.env, "ZSS_BACKEND": "torch"})
    enc = load_clip_encoder(settings, towers="image")
    device, dtype, pre = enc.device, enc.dtype, enc.preprocess

    def tower(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(enc.model.encode_image(pre.normalise(x).to(dtype)).float(), dim=-1)

    best = bare_tower(enc, plan.batches, plan.tower_seconds, out, "bare image tower")
    out.add("tower", "bare image tower, best batch", best, "img/s", "", best=True)
    # The SigLIP tower the Triton deployment this project replaces served (issue 27): SO400M at 384 px on a GPU.
    siglip = load_clip_encoder(get_settings({**plan.env, **plan.siglip_env, "ZSS_BACKEND": "torch"}), towers="image")
    best_siglip = bare_tower(siglip, plan.siglip_batches, plan.tower_seconds, out, f"{plan.siglip_name} image tower")
    out.add("tower", f"{plan.siglip_name} image tower, best batch", best_siglip, "img/s", "")
    del siglip

    blobs = [jpeg(seed=i % 16) for i in range(plan.decode_images)]
    what = f"JPEG decode + resize, CPU PIL ({os.cpu_count()} threads)"
    out.add("tower", what, cpu_decode(blobs, pre), "img/s", "640x480, as the API processes do")
    rate, both = gpu_decode(blobs, pre, device, tower)
    out.add("tower", f"JPEG decode + resize, torchvision on {device.type}", rate, "img/s", "640x480, batched")
    out.add("tower", f"decode on {device.type} + tower together", both, "img/s", f"batch {len(blobs)}")


def bare_tower(enc: Any, batches: list[int], seconds: float, out: Results, label: str) -> float:
    """``enc``'s image tower alone (uint8 pixels from pinned host memory, copied asynchronously, normalised on the
    device) at each batch size, ``seconds`` each; one row per batch, the best rate returned."""
    import torch
    import torch.nn.functional as F

    device, dtype, pre = enc.device, enc.dtype, enc.preprocess
    h, w = pre.size
    cuda = device.type == "cuda"

    def tower(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(enc.model.encode_image(pre.normalise(x).to(dtype)).float(), dim=-1)

    best = 0.0
    for b in batches:
        host = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8)
        if cuda:
            host = host.pin_memory()
        with torch.inference_mode():
            for _ in range(2):  # warm-up: kernels picked for this shape
                tower(host.to(device, non_blocking=True)).cpu()
            if cuda:
                torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                tower(host.to(device, non_blocking=True)).cpu()
                n += b
            rate = n / (time.perf_counter() - t0)
        best = max(best, rate)
        out.add("tower", f"{label}, batch {b}", rate, "img/s", f"{dtype}".replace("torch.", ""), batch=b)
    return best


def cpu_decode(blobs: list[bytes], pre: Any) -> float:
    """What the service's API processes do per image (imaging.decode + open_clip's resize), on every core."""
    from imaging.decode import decode_image

    def one(blob: bytes) -> np.ndarray:
        return pre.to_pixels(decode_image(blob, max_pixels=64_000_000, draft_size=pre.draft_size))

    with cf.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, blobs[:4]))
        t0 = time.perf_counter()
        list(pool.map(one, blobs))
        return len(blobs) / (time.perf_counter() - t0)


def gpu_decode(blobs: list[bytes], pre: Any, device: Any, tower: Any) -> tuple[float, float]:
    """torchvision's batched JPEG decode on ``device``, then the shortest-side resize and centre crop there."""
    import torch
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    h, w = pre.size

    def decode() -> torch.Tensor:
        imgs = decode_jpeg(data, device=device)
        out = [TF.center_crop(TF.resize(im, min(h, w), antialias=True), [h, w]) for im in imgs]
        return torch.stack(out).permute(0, 2, 3, 1).contiguous()  # uint8 [N, H, W, 3], as encode_pixels takes

    def timed(fn: Any) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(blobs) / (time.perf_counter() - t0)

    with torch.inference_mode():
        rate = timed(decode)
        both = timed(lambda: tower(decode()).cpu())
    return rate, both


# -- stage 2: the service ----------------------------------------------------------------------------------------------
def parallel_load(url: str, post: Post, clients: int, procs: int, seconds: float, ramp: float) -> LoadResult:
    """``steady_load`` from ``procs`` processes at once (one Python process cannot send a GPU's worth of requests);
    the rate is all of them together over the same window."""
    procs = max(1, min(procs, clients))
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        parts = pool.starmap(steady_load, [(url, post, n, seconds, ramp) for n in per])
    out = LoadResult(sum(p.requests for p in parts), seconds, load=parts[0].load)
    for p in parts:
        out.latencies_s += p.latencies_s
        for s, n in p.statuses.items():
            out.statuses[s] = out.statuses.get(s, 0) + n
    return out


def add_load(out: Results, stage: str, what: str, r: LoadResult, clients: int) -> None:
    tail = f"p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms" if r.latencies_s else "no answers"
    note = f"{clients} clients, {tail}, errors {r.errors}"
    tails = {"p50_ms": r.p50_ms, "p99_ms": r.p99_ms} if r.latencies_s else {}
    statuses = {str(k): v for k, v in r.statuses.items()}
    out.add(stage, what, r.per_s, "img/s", note, errors=r.errors, statuses=statuses, **tails)


def stage_serve(plan: Plan, out: Results, workdir: Path) -> None:
    from testing.server import running_server

    blob = jpeg()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**plan.env, "ZSS_DATA_DIR": str(workdir / "data")}
    t0 = time.perf_counter()
    with running_server(env, workdir / "serve.log") as srv:  # stopped on SIGTERM too (see main)
        out.add("serve", "server start (models loaded)", time.perf_counter() - t0, "s", "")
        embed = image_post("/embed_image", blob)
        steady_load(srv.url, embed, min(plan.clients, 32), plan.ramp, ramp_s=0.0)  # warm-up
        r = parallel_load(srv.url, embed, plan.clients, plan.load_procs, plan.seconds, plan.ramp)
        add_load(out, "serve", "/embed_image", r, plan.clients)

        configs = [
            {"name": f"class {i}", "examples_to_include": [f"object {i} seen as {k}" for k in range(plan.examples)]}
            for i in range(plan.classes)
        ]
        t = time.perf_counter()
        body = {"classifier_configs": configs, "augment_examples": False}
        resp = httpx.post(srv.url + "/deploy_classifier", json=body, timeout=plan.timeouts["serve"])
        resp.raise_for_status()
        took = time.perf_counter() - t
        what = f"cold deploy, {plan.classes} x {plan.examples} examples"
        out.add("serve", what, plan.classes * plan.examples / took, "prompts/s", f"{took:.1f} s (text tower)")
        classify = image_post(f"/classify?deployed_id={quote(resp.json()['deployed_id'])}", blob)
        steady_load(srv.url, classify, min(plan.clients, 32), plan.ramp, ramp_s=0.0)  # compiled, cached
        r = parallel_load(srv.url, classify, plan.clients, plan.load_procs, plan.seconds, plan.ramp)
        add_load(out, "serve", f"/classify ({plan.classes} classes x {plan.examples})", r, plan.clients)

        dconfigs = [{"name": f"thing {i}", "examples_to_include": [f"thing {i}"]} for i in range(plan.detect_classes)]
        resp = httpx.post(srv.url + "/deploy_detector", json={"detector_configs": dconfigs}, timeout=600)
        resp.raise_for_status()
        detect = image_post(f"/detect?deployed_id={quote(resp.json()['deployed_id'])}", blob)
        steady_load(srv.url, detect, plan.detect_clients, plan.ramp, ramp_s=0.0)
        r = parallel_load(srv.url, detect, plan.detect_clients, 1, plan.seconds, plan.ramp)
        add_load(out, "serve", f"/detect ({plan.detect_classes} classes)", r, plan.detect_clients)


DEVICE_DECODE_ROW = "/embed_image, decoded on the device"


def stage_decode(plan: Plan, out: Results, workdir: Path) -> None:
    """``serve``'s /embed_image with ZSS_DEVICE_DECODE and ZSS_PIN_MEMORY (issue 29): the image encoder decodes the
    JPEGs (nvJPEG on a GPU) and the API neither decodes nor resizes; the same load, beside ``serve``'s row."""
    from testing.server import running_server

    workdir.mkdir(parents=True, exist_ok=True)
    env = {**plan.env, "ZSS_DATA_DIR": str(workdir / "data"), "ZSS_DEVICE_DECODE": "true", "ZSS_PIN_MEMORY": "true"}
    with running_server(env, workdir / "serve.log") as srv:
        embed = image_post("/embed_image", jpeg())
        steady_load(srv.url, embed, min(plan.clients, 32), plan.ramp, ramp_s=0.0)  # warm-up
        r = parallel_load(srv.url, embed, plan.clients, plan.load_procs, plan.seconds, plan.ramp)
        add_load(out, "decode", DEVICE_DECODE_ROW, r, plan.clients)


def stage_container(plan: Plan, out: Results, image: str) -> None:
    """The GPU image (bentoml build -f bentofile.gpu.yaml, then containerize) run as an operator runs it, with the
    GPU passed in (podman: CDI ``--device nvidia.com/gpu=all``; docker: ``--gpus all``), loaded like ``serve``."""
    from testing import containers as pc

    if plan.device == "cpu":
        gpu: list[str] = []
    elif os.environ.get("ZSS_CONTAINER_ENGINE") == "docker":
        gpu = ["--gpus", "all"]
    else:
        gpu = ["--device", "nvidia.com/gpu=all"]
    t0 = time.perf_counter()
    with pc.running(image, env={"ZSS_DATA_DIR": "/tmp/zss"}, extra=gpu) as c:
        pc.wait_ready(c, timeout=plan.timeouts["container"])
        out.add("container", "container start (ready)", time.perf_counter() - t0, "s", image)
        assert c.url is not None
        embed = image_post("/embed_image", jpeg())
        steady_load(c.url, embed, min(plan.clients, 32), plan.ramp, ramp_s=0.0)  # warm-up
        r = parallel_load(c.url, embed, plan.clients, plan.load_procs, plan.seconds, plan.ramp)
        add_load(out, "container", "/embed_image (container)", r, plan.clients)


# -- the driver --------------------------------------------------------------------------------------------------------
def run_stage(name: str, args: argparse.Namespace, plan: Plan, workdir: Path) -> tuple[list[dict[str, Any]], str]:
    """Run one stage in its own process under its time limit; (its rows, how it ended)."""
    part = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "bench.gpu_suite", "--stage", name, "--workdir", str(workdir)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--container", args.container] if args.container else []
    limit = plan.timeouts[name]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        rc = proc.wait(timeout=limit)
        how = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the stage stops its server on SIGTERM
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        how = f"stopped at its {limit:.0f} s limit"
    rows = json.loads(part.read_text()) if part.exists() else []
    print(f"stage {name}: {how} after {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, how


def summary(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = [[r["stage"], r["what"], f"{r['value']:.1f}", r["unit"], r["note"]] for r in rows]
    best = next((r["value"] for r in rows if r.get("best")), None)
    embed = next((r["value"] for r in rows if r["what"] == "/embed_image"), None)
    if best and embed is not None:
        out.append(["goal", "/embed_image over the bare tower's best batch", f"{embed / best:.2f}", "x", "goal >= 0.9"])
    if embed is not None:
        out.append(["goal", "/embed_image", f"{embed:.0f}", "img/s", "goal >= 2,000 on a GPU (ViT-B-32 fp16)"])
    decoded = next((r["value"] for r in rows if r["what"] == DEVICE_DECODE_ROW), None)
    if decoded is not None and embed:
        out.append(["goal", "device decode over the API's decode", f"{decoded / embed:.2f}", "x", "/embed_image"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every stage on the CPU with tiny models (seconds)")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default bench/results/)")
    ap.add_argument(
        "--container",
        metavar="IMAGE",
        help="also run the GPU image under podman (docker where ZSS_CONTAINER_ENGINE=docker) and load its /embed_image",
    )
    ap.add_argument("--stage", choices=("tower", "serve", "decode", "container"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.stage:  # one stage, in the process run_stage started
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: running_server stops its server
        plan = smoke_plan(args.workdir / "models") if args.smoke else gpu_plan()
        out = Results(args.workdir / f"{args.stage}.json")
        if args.stage == "tower":
            stage_tower(plan, out)
        elif args.stage == "container":
            stage_container(plan, out, args.container)
        elif args.stage == "decode":
            stage_decode(plan, out, args.workdir / "decode")
        else:
            stage_serve(plan, out, args.workdir / "serve")
        return 0

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zss-gpu-suite-") as tmp:
        workdir = Path(tmp)
        plan = smoke_plan(workdir / "models") if args.smoke else gpu_plan()
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "none (smoke run)"
        print(f"machine: {machine()}; GPU: {gpu}", flush=True)
        rows: list[dict[str, Any]] = []
        ended: dict[str, str] = {}
        for name in ("tower", "serve", "decode", *(["container"] if args.container else [])):
            got, ended[name] = run_stage(name, args, plan, workdir)
            rows += got
    took = time.perf_counter() - started
    print()
    print(f"gpu_suite{' --smoke' if args.smoke else ''}: {took:.0f} s; stages: {ended}")
    print(table(["stage", "what", "value", "unit", "notes"], summary(rows), "llrll"))
    path = args.json or ROOT / "bench" / "results" / f"gpu_suite-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(),
        "gpu": gpu,
        "smoke": args.smoke,
        "seconds": round(took, 1),
        "stages": ended,
        "plan": {k: v for k, v in asdict(plan).items() if k != "env"} | {"env": plan.env},
        "rows": rows,
    }
    path.write_text(json.dumps(report, indent=2))
    print(f"written: {path}")
    return 0 if all(v == "ok" for v in ended.values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
