"""Issue 15: the folder tool's `classify` on Ray Data (`--ray`, a local Ray on this machine) vs in-process, in one run.

    .venv/bin/python -m bench.bench_ray_jobs [--images 160] [--rounds 2] [--batch-size 32]
    .venv/bin/python -m bench.bench_ray_jobs --grid --images 96 --actors 1,2 --batch-sizes 8,32

Generates 640x480 JPEGs and classifies them (10 classes) with ViT-B-32 (seeded random weights), alternating the two
modes round by round on the same engine (model and text embeddings loaded once, the local Ray started once: neither
is timed). A job is timed end to end: the Ray job's time includes starting its actors, which load the model (Ray
hands results over in bursts, so a rate from the first result on would flatter it). ``--grid`` runs only Ray jobs,
one per actors x batch size. Writes nothing but the table; the CSV writing is the same code in both modes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import jpeg, loadavg, machine, table


def timed(batches) -> tuple[int, float]:  # noqa: ANN001 - tools.classify_dir.scored's iterator
    """(images, seconds) of a whole job."""
    t0 = time.perf_counter()
    n = sum(len(batch) for batch in batches)
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default="random")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--grid", action="store_true", help="Ray only: actors x batch sizes")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--batch-sizes", default="8,32")
    args = ap.parse_args()

    from tools import classify_dir, ray_jobs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "imgs"
        folder.mkdir()
        for i in range(args.images):
            (folder / f"{i:04d}.jpg").write_bytes(jpeg(seed=i))
        cfg = root / "clf.json"
        classes = [{"name": f"c{i}", "examples_to_include": [f"thing {i}"]} for i in range(10)]
        cfg.write_text(json.dumps({"classifier_configs": classes, "augment_examples": False}))
        argv = ["classify", str(cfg), str(folder), "--out", str(root / "o.csv")]
        argv += ["--model", args.model, "--pretrained", args.pretrained, "--data-dir", str(root / "d"), "--quiet"]
        base = classify_dir.parser().parse_args([*argv, "--batch-size", str(args.batch_size)])
        rt = classify_dir.build_engine(base)
        clf = rt.compile(classify_dir.load_config(cfg))
        paths = classify_dir.list_inputs(str(folder))
        ray_jobs.start_local(args.ray_cpus)

        def run(ray: bool, batch_size: int, actors: int = 1) -> tuple[int, float]:
            extra = ["--batch-size", str(batch_size), "--actors", str(actors)] + (["--ray"] if ray else [])
            ns = classify_dir.parser().parse_args([*argv, *extra])
            return timed(classify_dir.scored(paths, clf, rt, ns))

        run(False, args.batch_size)  # warm-up (first forward passes, page cache)
        header = f"machine: {machine()}, torch threads {torch.get_num_threads()}, load average {loadavg()}"
        if args.grid:
            rows = []
            for actors in map(int, args.actors.split(",")):
                for bs in map(int, args.batch_sizes.split(",")):
                    n, secs = run(True, bs, actors)
                    rows.append([actors, bs, n, f"{secs:.1f}", f"{n / secs:.1f}"])
                    print(rows[-1], flush=True)
            rt.close()
            print(header)
            print(table(["actors", "batch", "images", "job s", "img/s"], rows))
            return
        got: dict[str, list[float]] = {"in-process": [], "ray": []}
        for r in range(args.rounds):
            for mode in ("in-process", "ray"):
                n, secs = run(mode == "ray", args.batch_size)
                got[mode].append(n / secs)
                print(f"round {r} {mode}: {n} images in {secs:.1f} s, {n / secs:.1f} img/s", flush=True)
        rt.close()
    print(header)
    rows = [[m, args.images, args.batch_size, " / ".join(f"{v:.1f}" for v in got[m])] for m in got]
    ratios = [b / a for a, b in zip(got["in-process"], got["ray"])]
    rows.append(["ratio ray / in-process", "", "", " / ".join(f"{v:.2f}" for v in ratios)])
    print(table(["mode", "images", "batch", "img/s per round"], rows))
    print(f"median ratio: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
