"""A cold deploy through the service against the bare text tower (issue 29, item 4: >= 0.9x its prompts/s).

    .venv/bin/python -m bench.deploy_vs_text [--classes 1000] [--examples 10] [--rounds 3] [--backend auto]
        [--quantize none] [--model ViT-B-32]

One ``bentoml serve`` stays up; each round deploys ``classes`` x ``examples`` texts it has never seen (so every
prompt goes through the text tower: ``augment_examples`` false, the round's number in every text) and, in the same
round, the bare text tower of the same settings (``ClipEncoder.encode_texts``: the backend, precision and thread
count the service's text encoder uses, sorted by length and trimmed, nothing else) encodes the same texts. The two
sides alternate which goes first. Printed per round: prompts/s of each side by the wall clock, and prompts per CPU
second of each side's own processes (the server's whole process tree; the bare tower's process), which is the
steadier ratio on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import add_model_options, cpu_seconds, loadavg, machine, model_env, served, table
from runners.clip import ClipEncoder, load_clip_encoder
from runners.device import configure_threads
from settings import get_settings


def texts_for(round_no: int, classes: int, examples: int) -> list[list[str]]:
    """Distinct, plausible texts of varied length: every one new to the cache in its round."""
    kinds = ["forklift", "red pallet jack", "cracked windscreen of a delivery van", "dog", "stack of cardboard boxes"]
    return [
        [f"{kinds[(c + e) % len(kinds)]} number {c} seen from side {e} in round {round_no}" for e in range(examples)]
        for c in range(classes)
    ]


def run_bare(bare: ClipEncoder, texts: list[str]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds for the bare tower to encode ``texts``."""
    c0, t0 = time.process_time(), time.perf_counter()
    bare.encode_texts(texts)
    return time.perf_counter() - t0, time.process_time() - c0


def run_served(client: httpx.Client, pid: int, body: dict[str, Any]) -> tuple[float, float]:
    """Wall seconds and the server's CPU seconds (its whole process tree) for one deploy, from the request to its
    job's ``done`` (``?wait=false`` and polling, as a client of a long deploy does: a waiting request would meet the
    service's request timeout first)."""
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    resp = client.post("/deploy_classifier", params={"wait": "false"}, json=body)
    resp.raise_for_status()
    status_url = resp.json()["status_url"]
    while True:
        job = client.get(status_url).raise_for_status().json()
        if job["state"] != "running":
            break
        time.sleep(0.5)  # each poll costs the server a request: rare enough not to count
    wall = time.perf_counter() - t0
    if job["state"] != "done":
        raise RuntimeError(f"the deploy ended {job['state']}: {job}")
    return wall, cpu_seconds(pid) - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    add_model_options(ap)
    args = ap.parse_args()
    env = model_env(args)
    print(f"machine: {machine()}", flush=True)
    rows, wall_ratios, cpu_ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp, served(env, Path(tmp) / "served") as srv:
        settings = get_settings({**env, "ZSS_DATA_DIR": str(Path(tmp) / "bare")})
        configure_threads(settings.torch_threads)
        bare = load_clip_encoder(settings, towers="text")
        bare.encode_texts([t for c in texts_for(-1, 8, 8) for t in c])  # warm-up, as the server's was
        with httpx.Client(base_url=srv.url, timeout=3600) as client:
            warm = {
                "classifier_configs": [
                    {"name": f"w{c}", "examples_to_include": e} for c, e in enumerate(texts_for(-2, 8, 8))
                ],
                "augment_examples": False,
            }
            client.post("/deploy_classifier", json=warm).raise_for_status()
            for r in range(args.rounds):
                groups = texts_for(r, args.classes, args.examples)
                flat = [t for g in groups for t in g]
                body = {
                    "classifier_configs": [{"name": f"c{c}", "examples_to_include": g} for c, g in enumerate(groups)],
                    "augment_examples": False,  # the examples themselves: prompts = classes x examples
                }
                load = loadavg()

                if r % 2 == 0:
                    b, s = run_bare(bare, flat), run_served(client, srv.proc.pid, body)
                else:
                    s, b = run_served(client, srv.proc.pid, body), run_bare(bare, flat)
                n = len(flat)
                wall_ratio, cpu_ratio = b[0] / s[0], b[1] / s[1]
                wall_ratios.append(wall_ratio)
                cpu_ratios.append(cpu_ratio)
                rows.append(
                    [
                        r + 1,
                        load,
                        f"{n / b[0]:.0f}",
                        f"{n / s[0]:.0f}",
                        f"{wall_ratio:.2f}",
                        f"{n / b[1]:.0f}",
                        f"{n / s[1]:.0f}",
                        f"{cpu_ratio:.2f}",
                    ]
                )
                print(f"round {r + 1}: bare {n / b[0]:.0f}, served {n / s[0]:.0f} prompts/s", flush=True)
    print()
    print(
        f"{args.model} ({args.pretrained}), ZSS_BACKEND={args.backend}, ZSS_CLIP_QUANTIZE={args.quantize}; "
        f"{args.classes} classes x {args.examples} examples per round, no templates, cold"
    )
    rows.append(
        [
            "**median**",
            "",
            "",
            "",
            f"**{statistics.median(wall_ratios):.2f}**",
            "",
            "",
            f"**{statistics.median(cpu_ratios):.2f}**",
        ]
    )
    print(
        table(
            [
                "round",
                "load",
                "bare prompts/s",
                "deploy prompts/s",
                "wall ratio",
                "bare per CPU-s",
                "deploy per CPU-s",
                "CPU ratio",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
