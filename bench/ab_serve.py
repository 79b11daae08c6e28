"""A/B of two checkouts under the same load, in one run: /embed_image throughput of this tree against another git
revision, the two servers loaded in alternating rounds so that a shared machine's slow spells hit both alike.

    .venv/bin/python -m bench.ab_serve --before REV [--rounds 3] [--seconds 20] [--ramp 3] [--concurrency 16]
        [--lanes N] [--hold-ms MS] [--image-workers N] [--max-batch-size N] [--quantize int8]

The revision is exported with ``git archive`` into a temporary directory and served with this tree's virtual
environment; both servers get the same settings (ViT-B-32 with random weights, detector off; the encoder options apply
to both, and a revision that does not know an option ignores it). Only one server is loaded at a time; the idle one
takes no CPU. Each round is ``bench.common.steady_load`` (16 clients back to back, only requests that end in the window
count). The table's ratio is after / before per pair of rounds; the last row is the median.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tarfile
import tempfile
from pathlib import Path

from bench.common import (
    ROOT,
    add_encoder_options,
    encoder_env,
    image_post,
    jpeg,
    machine,
    merge,
    served,
    steady_load,
    table,
)


def export_revision(rev: str, dest: Path) -> str:
    """Write ``rev``'s tree into ``dest``; return its short hash."""
    short = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = dest.parent / f"{short}.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), rev], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return short


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision to compare against (e.g. HEAD~1, a commit hash)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per round")
    ap.add_argument("--ramp", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=16)
    add_encoder_options(ap)
    args = ap.parse_args()
    env = encoder_env(args)
    print(f"machine: {machine()}", flush=True)
    post = image_post("/embed_image", jpeg())
    head = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        tree = base / "before"
        tree.mkdir()
        short = export_revision(args.before, tree)
        with served(env, base / "a", root=tree) as before, served(env, base / "b") as after:
            for srv in (before, after):  # warm-up: first batches, allocator, connections
                steady_load(srv.url, post, args.concurrency, 10.0, ramp_s=0.0)
            pairs = []
            for r in range(args.rounds):
                a = steady_load(before.url, post, args.concurrency, args.seconds, args.ramp)
                b = steady_load(after.url, post, args.concurrency, args.seconds, args.ramp)
                pairs.append((a, b))
                print(f"round {r + 1}: before {a.per_s:.2f}, after {b.per_s:.2f} img/s", flush=True)

    rows = []
    for i, (a, b) in enumerate(pairs, 1):
        rows.append(
            [
                i,
                a.load,
                f"{a.per_s:.2f}",
                f"{b.per_s:.2f}",
                f"{b.per_s / a.per_s:.2f}",
                f"{a.p50_ms:.0f} / {b.p50_ms:.0f}",
                f"{a.p99_ms:.0f} / {b.p99_ms:.0f}",
                f"{a.errors} / {b.errors}",
            ]
        )
    ta, tb = merge([a for a, _ in pairs]), merge([b for _, b in pairs])
    rows.append(
        [
            "**all**",
            "",
            f"{ta.per_s:.2f}",
            f"{tb.per_s:.2f}",
            f"**{statistics.median(b.per_s / a.per_s for a, b in pairs):.2f}** (median)",
            f"{ta.p50_ms:.0f} / {tb.p50_ms:.0f}",
            f"{ta.p99_ms:.0f} / {tb.p99_ms:.0f}",
            f"{ta.errors} / {tb.errors}",
        ]
    )
    print()
    print(f"before: {short}; after: {head} (this tree); {args.concurrency} clients, /embed_image, 640x480 JPEG")
    print(
        table(
            [
                "round",
                "load avg before",
                f"{short} img/s",
                "this tree img/s",
                "ratio",
                "p50 ms before / after",
                "p99 ms before / after",
                "errors before / after",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
