"""Fairness of deploys (issue 32): a small deploy's latency while another tenant's big deploy encodes, against the
same small deploy on an idle server, and the big deploy's rate (from which the time of the largest deploy the
default limits accept follows).

.venv/bin/python -m bench.bench_deploy_fairness [--root CHECKOUT] [--model tiny|vit-b-32] [--big-texts 120]
    [--small-texts 3] [--rounds 4] [--two-tenants]

``--root`` serves another checkout (e.g. ``git archive <commit> | tar -x -C /tmp/base``) for a before/after in one
session. ``--model tiny`` serves the tests' tiny random CLIP (fast batches: the measure in batches is the point
on a loaded machine where ViT-B-32's 512-prompt batches take 20-60 s). Every deploy has texts of its own (no cache
hits); templates on (80 prompts per text). ``--two-tenants``: API keys on, the big deploy by one tenant and the small
ones by another (otherwise one caller, no keys).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.common import ROOT, VIT_B32_RANDOM, loadavg, machine
from semantic.templates import CLIP_TEMPLATES
from testing.client import bearer
from testing.models import clip_env, write_tiny_clip
from testing.server import running_server

# Keys of the --two-tenants run (32 characters, the minimum): the big deploy's tenant, the small ones', an admin.
BIG_KEY, SMALL_KEY, ADMIN_KEY = "b" * 32, "s" * 32, "a" * 32


def _classes(tag: str, n: int) -> list[dict[str, object]]:
    return [{"name": f"{tag} {i}", "examples_to_include": [f"a {tag} thing number {i}"]} for i in range(n)]


def _small(c: httpx.Client, n: int) -> float:
    t = time.perf_counter()
    r = c.post("/deploy_classifier", json={"classifier_configs": _classes(uuid.uuid4().hex[:8], n)})
    r.raise_for_status()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--big-texts", type=int, default=120)
    ap.add_argument("--small-texts", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", choices=("tiny", "vit-b-32"), default="vit-b-32")
    ap.add_argument("--two-tenants", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = VIT_B32_RANDOM
        if args.model == "tiny":
            env = {
                **clip_env(write_tiny_clip(Path(tmp) / "tiny"), Path(tmp) / "data"),
                "ZSS_DETECTOR_MODEL": "none",
                "ZSS_BACKEND": "torch",
            }
        _run(args, env, Path(tmp))


def _run(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> None:
    admin = None
    if args.two_tenants:
        env = {**env, "ZSS_API_KEYS": f"{BIG_KEY}:big-tenant,{SMALL_KEY}:small-tenant,{ADMIN_KEY}:ops:admin"}
        admin = ADMIN_KEY
    work = tmp / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {**env, "ZSS_DATA_DIR": str(work / "data")}
    with running_server(env, work / "serve.log", root=args.root, admin_key=admin) as srv:
        small_key, big_key = (SMALL_KEY, BIG_KEY) if args.two_tenants else (None, None)
        with (
            httpx.Client(base_url=srv.url, timeout=600, headers=bearer(small_key)) as c,
            httpx.Client(base_url=srv.url, timeout=600, headers=bearer(big_key)) as big,
        ):
            _small(c, args.small_texts)  # warm-up
            idle = [_small(c, args.small_texts) for _ in range(args.rounds)]
            t0 = time.perf_counter()
            r = big.post(
                "/deploy_classifier",
                params={"wait": "false"},
                json={"classifier_configs": _classes("big", args.big_texts)},
            )
            job = r.json()["job_id"]
            while big.get(f"/jobs/{job}").json()["done"] == 0:
                time.sleep(0.1)
            loaded, overlapped = [], 0
            for _ in range(args.rounds):
                loaded.append(_small(c, args.small_texts))
                overlapped += big.get(f"/jobs/{job}").json()["state"] == "running"
            while (state := big.get(f"/jobs/{job}").json())["state"] == "running":
                time.sleep(0.2)
            big_s = time.perf_counter() - t0
            assert state["state"] == "done", state
    prompts = args.big_texts * len(CLIP_TEMPLATES)
    rate = prompts / big_s
    batch_s = 512 / rate  # one encoder call of a big deploy (512 prompts)
    tenants = "two tenants (API keys)" if args.two_tenants else "one caller"
    print(f"machine: {machine()}; load after: {loadavg()}; served: {args.root}; model: {args.model}; {tenants}")
    print(
        f"big deploy: {args.big_texts} texts x {len(CLIP_TEMPLATES)} = {prompts} prompts in {big_s:.1f} s "
        f"({rate:.0f} prompts/s; one 512-prompt batch ~{batch_s:.2f} s; 100,000 prompts ~{100_000 / rate / 60:.1f} min)"
    )
    print(
        f"small deploy: {args.small_texts} texts x {len(CLIP_TEMPLATES)} = "
        f"{args.small_texts * len(CLIP_TEMPLATES)} prompts"
    )
    print("| small deploy | median s | max s | median in big batches |")
    print("|---|---:|---:|---:|")
    for name, xs in (("idle server", idle), (f"during the big deploy ({overlapped}/{len(loaded)} overlapped)", loaded)):
        med = statistics.median(xs)
        print(f"| {name} | {med:.2f} | {max(xs):.2f} | {med / batch_s:.1f} |")
    print(f"ratio loaded/idle (medians): {statistics.median(loaded) / statistics.median(idle):.2f}x")


if __name__ == "__main__":
    main()
