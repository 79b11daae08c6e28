"""Evaluate the shipped ``shapes-clip`` model on freshly drawn shapes and print a markdown accuracy table.

The model is loaded exactly as a user of open_clip would load it (no project code involved)::

    open_clip.add_model_config("models/shapes-clip/shapes-clip.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "shapes-clip", pretrained="models/shapes-clip/shapes-clip.fp16.pt")
    tokenizer = open_clip.get_tokenizer("shapes-clip")

Test images come from ``EVAL_SEED``, a seed stream training never uses. The feedback rows use the project's own
two-stage rule (``semantic.classify``).

Reproduce::

    .venv/bin/python -m tools.eval_shapes_clip --model-dir models/shapes-clip
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from semantic.classify import classify, compile_classifier
from tools.shapes import ALL_COMBOS, COLOURS, HELD_OUT, SEEN_COMBOS, SHAPES, draw

MODEL_NAME = "shapes-clip"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "models" / MODEL_NAME
EVAL_SEED = 20261122  # disjoint from training, which uses SeedSequence([seed, 0, step]) with small seeds

Tokenizer = Callable[[Sequence[str]], torch.Tensor]
Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass
class Loaded:
    model: open_clip.CLIP
    preprocess: Preprocess
    tokenizer: Tokenizer
    # Another runtime of the same model (bench/bench_backends.py: the service's encoder on ONNX Runtime, OpenVINO,
    # int8): images / texts -> L2-normalised float tensors, used instead of ``model``.
    image_fn: Callable[[Sequence[Image.Image]], torch.Tensor] | None = None
    text_fn: Callable[[Sequence[str]], torch.Tensor] | None = None


def load(model_dir: Path = DEFAULT_DIR, device: str = "cpu") -> Loaded:
    """Load config + fp16 checkpoint through open_clip's public API only (float32 on CPU)."""
    open_clip.add_model_config(model_dir / f"{MODEL_NAME}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(model_dir / f"{MODEL_NAME}.fp16.pt"), device=device
    )
    model.eval()
    return Loaded(model, preprocess, open_clip.get_tokenizer(MODEL_NAME))


@torch.no_grad()
def encode_images(m: Loaded, images: Sequence[Image.Image], batch: int = 256) -> torch.Tensor:
    if m.image_fn is not None:
        return torch.cat([m.image_fn(images[i : i + batch]) for i in range(0, len(images), batch)]).float()
    out = [
        m.model.encode_image(torch.stack([m.preprocess(im) for im in images[i : i + batch]]), normalize=True)
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).float()


@torch.no_grad()
def encode_texts(m: Loaded, texts: Sequence[str]) -> torch.Tensor:
    if m.text_fn is not None:
        return m.text_fn(list(texts)).float()
    return m.model.encode_text(m.tokenizer(list(texts)), normalize=True).float()


@dataclass
class TestSet:
    images: list[Image.Image] = field(default_factory=list)
    colours: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)

    def mask(self, pred: Callable[[str, str], bool]) -> np.ndarray:
        return np.array([pred(c, s) for c, s in zip(self.colours, self.shapes)])


def draw_test_set(per_combo: int, seed: int = EVAL_SEED, combos: Sequence[tuple[str, str]] = ALL_COMBOS) -> TestSet:
    """``per_combo`` images of every colour/shape pair; each pair has its own seed stream."""
    ts = TestSet()
    for k, (c, s) in enumerate(combos):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, k]))
        for _ in range(per_combo):
            ts.images.append(draw(c, s, rng))
            ts.colours.append(c)
            ts.shapes.append(s)
    return ts


def zero_shot(img: torch.Tensor, m: Loaded, prompts: Sequence[str]) -> np.ndarray:
    """Index of the most similar prompt per image."""
    return (img @ encode_texts(m, prompts).T).argmax(dim=1).numpy()


def two_stage(img: torch.Tensor, m: Loaded, classes: Sequence[tuple[str, Sequence[str], Sequence[str]]]) -> list[str]:
    """Predicted class names under the project's positive/negative example rule. classes: (name, pos, neg)."""
    dim = img.shape[1]
    pos = [encode_texts(m, p) for _, p, _ in classes]
    neg = [encode_texts(m, n) if n else torch.zeros(0, dim) for _, _, n in classes]
    clf = compile_classifier([name for name, _, _ in classes], pos, neg)
    _, _, idx = classify(img, clf)
    return [clf.class_names[i] for i in idx.tolist()]


def pct(x: np.ndarray) -> float:
    return 100.0 * float(np.mean(x)) if len(x) else float("nan")


@dataclass
class Row:
    name: str
    value: float
    n: int
    note: str = ""


def evaluate(m: Loaded, per_combo: int = 50, seed: int = EVAL_SEED) -> list[Row]:
    ts = draw_test_set(per_combo, seed)
    img = encode_images(m, ts.images)
    seen = ts.mask(lambda c, s: (c, s) not in HELD_OUT)
    held = ~seen
    colours, shapes = list(COLOURS), list(SHAPES)
    rows: list[Row] = []

    combo_prompts = [f"a {c} {s}" for c, s in ALL_COMBOS]
    truth = np.array([ALL_COMBOS.index((c, s)) for c, s in zip(ts.colours, ts.shapes)])
    hit = zero_shot(img, m, combo_prompts) == truth
    rows.append(
        Row(
            "colour x shape, seen combos",
            pct(hit[seen]),
            int(seen.sum()),
            f'{len(ALL_COMBOS)} prompts "a {{colour}} {{shape}}"',
        )
    )
    rows.append(
        Row("colour x shape, held-out combos", pct(hit[held]), int(held.sum()), "pairs never drawn in training")
    )

    c_truth = np.array([colours.index(c) for c in ts.colours])
    c_hit = zero_shot(img, m, [f"a {c} shape" for c in colours]) == c_truth
    rows.append(Row("colour only, all images", pct(c_hit), len(c_hit), f'{len(colours)} prompts "a {{colour}} shape"'))
    rows.append(Row("colour only, held-out combos", pct(c_hit[held]), int(held.sum())))

    s_truth = np.array([shapes.index(s) for s in ts.shapes])
    s_hit = zero_shot(img, m, [f"a {s}" for s in shapes]) == s_truth
    rows.append(Row("shape only, all images", pct(s_hit), len(s_hit), f'{len(shapes)} prompts "a {{shape}}"'))
    rows.append(Row("shape only, held-out combos", pct(s_hit[held]), int(held.sum())))

    # Feedback: "red" defined by "red shape", optionally with the negative example "red square".
    other = ("other", ["blue shape", "green shape", "yellow shape"], [])
    plain = two_stage(img, m, [("red", ["red shape"], []), other])
    neg = two_stage(img, m, [("red", ["red shape"], ["red square"]), other])
    red = ts.mask(lambda c, s: c == "red")
    for shape in SHAPES:
        sel = red & ts.mask(lambda c, s, shape=shape: s == shape)
        is_red_plain = np.array([p == "red" for p in plain])[sel]
        is_red_neg = np.array([p == "red" for p in neg])[sel]
        rows.append(Row(f"red {shape}s -> red, no negative", pct(is_red_plain), int(sel.sum()), '+ "red shape"'))
        rows.append(
            Row(f"red {shape}s -> red, with negative", pct(is_red_neg), int(sel.sum()), '+ "red shape", - "red square"')
        )
    rows.extend(more_positives(img, ts, m))
    return rows


def more_positives(img: torch.Tensor, ts: TestSet, m: Loaded) -> list[Row]:
    """Recall on held-out pairs when a class gets more positive examples.

    Classes are the three shapes, first each defined by its bare word ("circle"), then by the word plus the six
    "{colour} {shape}" texts, held-out pairs included: texts the model has read but never seen drawn.
    """
    held = ts.mask(lambda c, s: (c, s) in HELD_OUT)
    rows: list[Row] = []
    for label, classes in (
        ("1 positive per shape class", [(s, [s], []) for s in SHAPES]),
        ("+ 6 '{colour} {shape}' positives", [(s, [s, *(f"{c} {s}" for c in COLOURS)], []) for s in SHAPES]),
    ):
        pred = two_stage(img, m, classes)
        hit = np.array([p == s for p, s in zip(pred, ts.shapes)])
        rows.append(Row(f"shape recall on held-out pairs, {label}", pct(hit[held]), int(held.sum())))
    return rows


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| metric | accuracy % | images | prompts / notes |", "|---|---:|---:|---|"]
    lines += [f"| {r.name} | {r.value:.1f} | {r.n} | {r.note} |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--per-combo", type=int, default=50, help="test images per colour/shape pair")
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    m = load(args.model_dir)
    rows = evaluate(m, args.per_combo, args.seed)
    print(markdown(rows))
    print(
        f"\nseen pairs: {len(SEEN_COMBOS)}, held-out pairs: {sorted(HELD_OUT)}; "
        f"eval took {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
