"""Issue 27, item 6: a full-size SigLIP served on the CPU, /embed_image against its bare image tower in one run.

    .venv/bin/python -m bench.bench_siglip_cpu [--name ViT-B-16-SigLIP2] [--workdir .zss/siglip-random] [P1 options]

Writes open_clip's ``--name`` at its released size with seeded random weights (``testing.siglip.
write_full_size_open_clip_siglip``: the released image tower; the text tower with a tokenizer trained here, since the
hub's cannot be fetched), then runs ``bench.bench_p1_embed_image`` on it: the served /embed_image (the default
backend, so the image tower on OpenVINO) against the bare tower on the same backend, alternating rounds, one run. Every
other option is P1's (``--seconds``, ``--rounds``, ``--concurrency``, ...).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT
from testing.siglip import write_full_size_open_clip_siglip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="ViT-B-16-SigLIP2", help="an open_clip SigLIP name")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".zss" / "siglip-random")
    args, p1 = ap.parse_known_args()
    files = write_full_size_open_clip_siglip(args.workdir / args.name, args.name)
    cmd = [sys.executable, "-m", "bench.bench_p1_embed_image", "--clip-model", str(files.config)]
    cmd += ["--clip-pretrained", str(files.checkpoint), *p1]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
