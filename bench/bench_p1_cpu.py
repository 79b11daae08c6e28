"""Where P1's CPU goes: CPU milliseconds per /embed_image request in each process (image encoder workers, API worker,
the load generator itself), read from /proc around closed-loop rounds of 16 clients, on the machine P1 runs on.

    .venv/bin/python -m bench.bench_p1_cpu [--lanes N] [--hold-ms MS] [--rounds 2] [--seconds 20] [--client httpx]

``--client httpx`` measures the former load generator (httpx in 16 threads, the multipart body built per request)
instead of ``bench.common.steady_load``'s prepared body over ``http.client``.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import (
    LoadResult,
    add_encoder_options,
    closed_loop,
    encoder_env,
    image_files,
    image_post,
    jpeg,
    machine,
    served,
    steady_load,
    table,
)

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
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per round")
    ap.add_argument("--client", choices=["steady", "httpx"], default="steady")
    add_encoder_options(ap)
    args = ap.parse_args()
    env = encoder_env(args)
    print(f"machine: {machine()}", flush=True)
    blob = jpeg()
    files, post = image_files(blob), image_post("/embed_image", blob)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, served(env, Path(tmp)) as srv:
        url = srv.url

        def embed(c: httpx.Client) -> int:
            return c.post(url + "/embed_image", files=files).status_code

        def load() -> LoadResult:
            if args.client == "httpx":
                return closed_loop(embed, 16, max(16, round(16 * args.seconds)))
            # no ramp: the CPU is counted over the whole round, so the rate is too
            return steady_load(url, post, 16, args.seconds, ramp_s=0.0)

        steady_load(url, post, 16, 10.0, ramp_s=0.0)  # warm-up
        for r in range(args.rounds):
            fwd0, before, t0 = srv.metric("zss_image_forward_cpu_seconds_total"), cpu_seconds(), time.perf_counter()
            res = load()
            after, wall = cpu_seconds(), time.perf_counter() - t0
            fwd = srv.metric("zss_image_forward_cpu_seconds_total") - fwd0
            n = sum(res.statuses.values())  # every request answered in the round
            per = {k: 1000 * (after[k] - before.get(k, 0.0)) / n for k in after}
            busy = sum(per.values()) * n / 1000 / wall
            rows.append(
                [r + 1, f"{n / wall:.2f}", f"{per.get('image encoder', 0.0):.0f}", f"{1000 * fwd / n:.0f}"]
                + [f"{per.get(k, 0.0):.0f}" for k in ("API worker", "load generator")]
                + [f"{busy:.2f}", res.errors]
            )
    print()
    print(f"load generator: {args.client}; 16 clients")
    print(
        table(
            [
                "round",
                "img/s",
                "image encoder CPU ms/img",
                "of it in forward passes",
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
