"""Where P1's CPU goes: CPU milliseconds per /embed_image request in each process (image encoder workers, API worker,
the load generator itself), read from /proc around closed-loop rounds of 16 clients, on the machine P1 runs on.

    .venv/bin/python -m bench.bench_p1_cpu [--image-workers 2] [--rounds 2] [--requests 64]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import VIT_B32_RANDOM, closed_loop, image_files, jpeg, machine, served, table

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of the bentoml processes by role, and of this process (the load generator)."""
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if "bentoml" not in cmd:
            continue
        role = "API worker" if "--service-name zeroshot" in cmd else "image encoder" if "clip_image" in cmd else "other"
        out[role] = out.get(role, 0.0) + (int(stat[11]) + int(stat[12])) / _TICK
    me = resource.getrusage(resource.RUSAGE_SELF)
    out["load generator"] = me.ru_utime + me.ru_stime
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-workers", type=int, default=0, help="override the image encoder's workers (0: default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    args = ap.parse_args()
    env = dict(VIT_B32_RANDOM)
    if args.image_workers:
        env["BENTOML_CONFIG_OPTIONS"] = f"services.clip_image_encoder.workers={args.image_workers}"
    print(f"machine: {machine()}", flush=True)
    files = image_files(jpeg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp, served(env, Path(tmp)) as srv:
        url = srv.url

        def embed(c: httpx.Client) -> int:
            return c.post(url + "/embed_image", files=files).status_code

        closed_loop(embed, 16, 64)  # warm-up
        for r in range(args.rounds):
            before, t0 = cpu_seconds(), time.perf_counter()
            res = closed_loop(embed, 16, args.requests)
            after, wall = cpu_seconds(), time.perf_counter() - t0
            per = {k: 1000 * (after[k] - before.get(k, 0.0)) / args.requests for k in after}
            busy = sum(per.values()) * args.requests / 1000 / wall
            rows.append(
                [r + 1, f"{res.per_s:.2f}"]
                + [f"{per.get(k, 0.0):.0f}" for k in ("image encoder", "API worker", "load generator")]
                + [f"{busy:.2f}", res.errors]
            )
    print()
    print(
        table(
            [
                "round",
                "img/s",
                "image encoder CPU ms/img",
                "API CPU ms/img",
                "load generator CPU ms/img",
                "cores busy",
                "errors",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
