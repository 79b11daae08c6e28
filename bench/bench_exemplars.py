"""Image exemplars and the open set on the project's shapes CLIP (models/shapes-clip), in-process through the engine.

The classifier bodies are exactly what a client posts to /deploy_classifier (image examples as base64 PNG); they are
compiled by the engine (engine/kinds.py, the image embedder and the embedding cache) and images are scored with
``ClassifierKind.score``, the code behind /classify. tests/test_exemplars_shapes.py posts the same bodies to a real
`bentoml serve` and asserts the goals on fewer images.

Three measurements (every image freshly drawn; exemplars, calibration and test images from disjoint seed streams):

1. few-shot: the 18 "a {colour} {shape}" classes, each with K image exemplars of its own pair (and, in a second
   series, the K exemplars alone, without the text); accuracy on the held-out pairs (never drawn in training; 64.7%
   zero-shot) and on all pairs, K = 0, 1, 2, 5, 10, each the mean over 5 independent draws of the exemplars;
2. veto: "red" = "red shape" minus ONE image of a red square, against "other" = blue/green/yellow shape; red squares
   turned away from "red", red circles and triangles kept;
3. open set: the 18 classes with 5 exemplars; the threshold is calibrated on in-class images (another seed) for a
   2% false-rejection rate; rejected share of shapes in colours no class names (cyan, pink, grey) and kept share of
   in-class test images.

Reproduce::

    .venv/bin/python -m bench.bench_exemplars --per-pair 40
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testing.images import encode_png  # noqa: E402
from tools.shapes import ALL_COMBOS, HELD_OUT, SHAPES, UNNAMED_COMBOS, draw  # noqa: E402

SHOTS = (0, 1, 2, 5, 10)
EXEMPLAR_SEED, CALIBRATION_SEED, TEST_SEED = 41, 42, 43
TARGET_FRR = 0.02
EXEMPLAR_DRAWS = 5


def drawn(colour: str, shape: str, n: int, seed: int) -> list[Image.Image]:
    """``n`` images of one pair from the pair's own stream of ``seed``."""
    k = [*ALL_COMBOS, *UNNAMED_COMBOS].index((colour, shape))
    rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
    return [draw(colour, shape, rng) for _ in range(n)]


def b64(img: Image.Image) -> dict[str, str]:
    return {"image": base64.b64encode(encode_png(img)).decode()}


def few_shot_body(shots: int, text: bool = True, seed: int = EXEMPLAR_SEED) -> dict[str, Any]:
    """The 18 colour x shape classes, each "a {colour} {shape}" (unless not ``text``) plus ``shots`` image exemplars
    of its pair."""
    return {
        "classifier_configs": [
            {
                "name": f"{c} {s}",
                "examples_to_include": [*([f"a {c} {s}"] if text else []), *map(b64, drawn(c, s, shots, seed))],
            }
            for c, s in ALL_COMBOS
        ],
        "augment_examples": False,
    }


def veto_body(negative: bool) -> dict[str, Any]:
    red: dict[str, Any] = {"name": "red", "examples_to_include": ["red shape"]}
    if negative:
        red["examples_to_exclude"] = [b64(drawn("red", "square", 1, EXEMPLAR_SEED)[0])]
    other = {"name": "other", "examples_to_include": ["blue shape", "green shape", "yellow shape"]}
    return {"classifier_configs": [red, other], "augment_examples": False}


def labelled_images(combos: Sequence[tuple[str, str]], per_pair: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    images, truth = [], []
    for c, s in combos:
        images += drawn(c, s, per_pair, seed)
        truth += [f"{c} {s}"] * per_pair
    return images, truth


def threshold_for(best_raw: np.ndarray, frr: float) -> float:
    """The open-set threshold that rejects a share ``frr`` of in-distribution images: their ``frr`` quantile of the
    best class's raw score (what the folder tool's ``calibrate`` does)."""
    return float(np.quantile(best_raw, frr, method="lower"))


@dataclass
class Scorer:
    """The engine in-process with the shipped shapes CLIP (as the folder tool builds it)."""

    engine: Any
    encoder: Any

    @classmethod
    def build(cls, data_dir: Path) -> Scorer:
        from cache.embeddings import EmbeddingCache
        from cache.registry import Registry
        from engine.encoders import LocalClip, LocalDetector
        from engine.pipelines import Engine
        from runners.clip import load_clip_encoder
        from settings import Settings
        from testing.models import shapes_clip_env

        env = shapes_clip_env(data_dir)
        settings = Settings(
            clip_model=env["ZSS_CLIP_MODEL"], clip_pretrained=env["ZSS_CLIP_PRETRAINED"], data_dir=data_dir
        )
        encoder = load_clip_encoder(settings, towers="both")
        local = LocalClip(encoder)
        engine = Engine(
            settings,
            image_encoder=local,
            text_encoder=local,
            detector=LocalDetector(None),
            registry=Registry(settings.registry_path),
            cache=EmbeddingCache(settings.cache_dir),
        )
        return cls(engine, encoder)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        pre = self.encoder.preprocess
        return np.concatenate(
            [
                self.encoder.encode_pixels(np.stack([pre.to_pixels(im) for im in images[i : i + 256]]))
                for i in range(0, len(images), 256)
            ]
        )

    def score(self, body: dict[str, Any], emb: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(predicted class per image, best raw score per image)."""
        from engine.configs import DeployClassifierRequest
        from engine.kinds import ClassifierKind

        clf = self.engine.compile(DeployClassifierRequest.model_validate(body))
        results = ClassifierKind.score(emb, clf)
        return [r.label for r in results], np.array([max(r.raw_scores) for r in results])


def run(per_pair: int) -> list[tuple[str, float, int]]:
    rows: list[tuple[str, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sc = Scorer.build(Path(tmp))
        held = sorted(HELD_OUT)
        held_img, held_truth = labelled_images(held, per_pair, TEST_SEED)
        all_img, all_truth = labelled_images(ALL_COMBOS, per_pair, TEST_SEED)
        all_emb = sc.embed(all_img)
        held_emb = sc.embed(held_img)
        for text in (True, False):
            for k in SHOTS if text else SHOTS[1:]:
                what = f"{'text + ' if text else ''}{k} image exemplars per class"
                # The mean over EXEMPLAR_DRAWS independent draws of the exemplars: with few shots, which images are
                # drawn moves accuracy by several points.
                h, a = [], []
                for draw_k in range(EXEMPLAR_DRAWS if k else 1):
                    body = few_shot_body(k, text, EXEMPLAR_SEED + 100 * draw_k)
                    h.append(pct(sc.score(body, held_emb)[0], held_truth))
                    a.append(pct(sc.score(body, all_emb)[0], all_truth))
                rows.append((f"held-out pairs, {what}", float(np.mean(h)), len(held_truth)))
                rows.append((f"all 18 pairs, {what}", float(np.mean(a)), len(all_truth)))

        squares = sc.embed(drawn("red", "square", per_pair * 3, TEST_SEED))
        others = sc.embed(
            drawn("red", "circle", per_pair * 3, TEST_SEED) + drawn("red", "triangle", per_pair * 3, TEST_SEED)
        )
        for negative in (False, True):
            label = "with" if negative else "without"
            body = veto_body(negative)
            away = np.mean([p != "red" for p in sc.score(body, squares)[0]])
            kept = np.mean([p == "red" for p in sc.score(body, others)[0]])
            rows.append((f"red squares turned away from red, {label} 1 negative image", 100 * away, len(squares)))
            rows.append((f"red circles + triangles kept red, {label} 1 negative image", 100 * kept, len(others)))

        body = few_shot_body(5)
        cal_img, _ = labelled_images(ALL_COMBOS, per_pair, CALIBRATION_SEED)
        _, cal_best = sc.score(body, sc.embed(cal_img))
        t = threshold_for(cal_best, TARGET_FRR)
        _, in_best = sc.score(body, all_emb)
        unnamed_img, _ = labelled_images(UNNAMED_COMBOS, per_pair * 2, TEST_SEED)
        _, out_best = sc.score(body, sc.embed(unnamed_img))
        rows.append((f"open set: calibrated threshold (raw score, {TARGET_FRR:.0%} FRR target)", t, len(cal_img)))
        rows.append(("open set: in-class test images kept", 100 * float(np.mean(in_best >= t)), len(in_best)))
        rows.append(("open set: cyan/pink/grey shapes rejected", 100 * float(np.mean(out_best < t)), len(out_best)))
        for c in ("cyan", "pink", "grey"):
            n = per_pair * 2  # images per pair, in UNNAMED_COMBOS order
            sel = [k * n + j for k, (cc, _) in enumerate(UNNAMED_COMBOS) if cc == c for j in range(n)]
            rows.append((f"open set: {c} shapes rejected", 100 * float(np.mean(out_best[sel] < t)), len(sel)))
        sc.engine.close()
    return rows


def pct(pred: Sequence[str], truth: Sequence[str]) -> float:
    return 100.0 * float(np.mean([p == t for p, t in zip(pred, truth)]))


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-pair", type=int, default=40, help="test images per colour/shape pair")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args.per_pair)
    print("| measurement | value | images |\n|---|---:|---:|")
    for name, value, n in rows:
        print(f"| {name} | {value:.3f} | {n} |" if "threshold" in name else f"| {name} | {value:.1f} | {n} |")
    print(f"\nshapes: {SHAPES}; took {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
