"""The validation table of issue 27, as the Triton SigLIP deployment published it, for both shapes models.

    .venv/bin/python -m bench.validation_table [--train 10] [--val 20] [--k 10] [--workdir .zss/validation]

On the same images for both models (18 classes, one per colour x shape pair, ``--train`` images per class to learn
from and ``--val`` to score; drawn by tools/shapes.py from seeds training never used), made by the folder tool
(tools/classify_dir.py, in-process, the service's encoders and scoring):

- ``knn``: ``--train``-shot k-NN (``--k`` neighbours) from the train folder;
- ``eval --mapping --template T``: zero-shot with three prompt templates (``TEMPLATES``);
- for the SigLIP, the same three again **without** max-length padding: each prompt encoded alone, cut after its last
  real token (what a tokenizer called with its default ``padding=False`` gives), the images as the service embeds
  them; the folder tool has no such switch, since the service always pads (the way SigLIP was trained).

Top-1 and top-5 accuracy per row; a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.common import machine, table
from runners.clip import load_clip_encoder
from settings import get_settings
from testing.models import SHAPES_CLIP, SHAPES_SIGLIP
from tools import classify_dir, shapes

TEMPLATES = (
    "A photo of {}.",
    "This is a photo containing images of {}.",
    "A drawing of {}, one coloured shape on a plain background, of the kind shown in the collection of shapes.",
)
SEED = 27_000_000  # far from training's small seeds


def draw_folders(root: Path, per_class: dict[str, int]) -> dict[str, str]:
    """``root/<split>/<colour_shape>/<i>.png`` for each split; the mapping (folder name -> class text)."""
    mapping = {f"{c}_{s}": f"a {c} {s}" for c, s in shapes.ALL_COMBOS}
    for split_no, (split, n) in enumerate(per_class.items()):
        for k, (c, s) in enumerate(shapes.ALL_COMBOS):
            folder = root / split / f"{c}_{s}"
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([SEED, split_no, k])
            for i in range(n):
                shapes.draw(c, s, rng).save(folder / f"{i:03d}.png")
    return mapping


def folder_tool(argv: list[str]) -> dict[str, Any]:
    """One command of tools/classify_dir.py, in-process; its metrics (top1, top5, ...)."""
    args = classify_dir.parser().parse_args(argv)
    engine = classify_dir.build_engine(args)
    return {"knn": classify_dir.cmd_knn, "eval": classify_dir.cmd_eval}[args.cmd](args, engine)


def unpadded(model: tuple[str, str], val: Path, mapping: dict[str, str], template: str, data: Path) -> dict[str, float]:
    """Zero-shot top-1/top-5 with every prompt encoded alone, cut after its last real token (no padding)."""
    enc = load_clip_encoder(
        get_settings(
            {
                "ZSS_CLIP_MODEL": model[0],
                "ZSS_CLIP_PRETRAINED": model[1],
                "ZSS_BACKEND": "torch",
                "ZSS_DATA_DIR": str(data),
            }
        )
    )
    names = sorted(mapping)
    texts = [template.format(mapping[n]) for n in names]
    rows = []
    with torch.inference_mode():
        for tokens, n in zip(enc.tokenize(texts), enc.count_tokens(texts)):
            rows.append(F.normalize(enc.model.encode_text(tokens[None, :n]).float(), dim=-1)[0])
    text = torch.stack(rows).numpy()
    truth, images = [], []
    for name in names:
        for path in sorted((val / name).glob("*.png")):
            truth.append(names.index(name))
            images.append(enc.preprocess.to_pixels(Image.open(path).convert("RGB")))
    ranked = np.argsort(-(enc.encode_pixels(np.stack(images)) @ text.T), axis=1)
    t = np.asarray(truth)
    return {"top1": float(np.mean(ranked[:, 0] == t)), "top5": float(np.mean((ranked[:, :5] == t[:, None]).any(1)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=10, help="images per class to learn from (k-NN)")
    ap.add_argument("--val", type=int, default=20, help="images per class to score")
    ap.add_argument("--k", type=int, default=10, help="neighbours of the k-NN")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    print(machine(), flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="zss-validation-"))
    mapping = draw_folders(work / "images", {"train": args.train, "val": args.val})
    (work / "mapping.txt").write_text("".join(f"{k} {v}\n" for k, v in mapping.items()))
    train, val = work / "images" / "train", work / "images" / "val"
    models = {
        "shapes-clip": (str(SHAPES_CLIP / "shapes-clip.json"), str(SHAPES_CLIP / "shapes-clip.fp16.pt")),
        "shapes-siglip": (str(SHAPES_SIGLIP / "shapes-siglip.json"), str(SHAPES_SIGLIP / "shapes-siglip.fp16.pt")),
    }
    rows = []
    for name, (cfg, ckpt) in models.items():
        common = ["--model", cfg, "--pretrained", ckpt, "--data-dir", str(work / "data" / name), "--quiet"]
        m = folder_tool(
            ["knn", str(train), str(val), "--k", str(args.k), "--out-dir", str(work / name / "knn"), *common]
        )
        rows.append([name, f"{args.train}-shot k-NN (k={args.k})", "", f"{m['top1']:.4f}", f"{m['top5']:.4f}"])
        for i, template in enumerate(TEMPLATES):
            out = str(work / name / f"zero-shot-{i}")
            m = folder_tool(
                [
                    "eval",
                    str(val),
                    "--mapping",
                    str(work / "mapping.txt"),
                    "--template",
                    template,
                    "--names",
                    "first",
                    "--out-dir",
                    out,
                    *common,
                ]
            )
            padding = "max length" if name == "shapes-siglip" else "(CLIP: none needed)"
            rows.append([name, f'zero-shot "{template}"', padding, f"{m['top1']:.4f}", f"{m['top5']:.4f}"])
            if name == "shapes-siglip":
                u = unpadded((cfg, ckpt), val, mapping, template, work / "data" / name)
                rows.append([name, f'zero-shot "{template}"', "none", f"{u['top1']:.4f}", f"{u['top5']:.4f}"])
    print(f"{len(shapes.ALL_COMBOS)} classes, {args.train} train and {args.val} validation images per class")
    print(table(["model", "method", "text padding", "top-1", "top-5"], rows, "lllrr"))


if __name__ == "__main__":
    main()
