"""End-to-end semantics through the real service with the project's own trained toy CLIP (models/shapes-clip).

The feedback test asserts the product goal itself (>= 90% both ways); the other thresholds are the shipped model's
measured behaviour with a margin (BENCHMARKS.md has the table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from testing.images import encode_png
from testing.models import SHAPES_CLIP
from testing.server import Server
from tools import shapes

pytestmark = pytest.mark.server


def predictions(server: Server, classes: list[dict[str, Any]], images: list[Image.Image], augment: bool) -> list[str]:
    with server.client() as c:
        r = c.post("/deploy_classifier", json={"classifier_configs": classes, "augment_examples": augment})
        assert r.status_code == 200, r.text
        deployed = r.json()["deployed_id"]
        preds: list[str] = []
        for start in range(0, len(images), 30):
            files = [
                ("data", (f"{i}.png", encode_png(im), "image/png")) for i, im in enumerate(images[start : start + 30])
            ]
            out = c.post("/classify", params={"deployed_id": deployed}, files=files).json()
            preds += [o["pred"] for o in (out if isinstance(out, list) else [out])]
    return preds


def drawn(colour: str, shape: str, n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [shapes.draw(colour, shape, rng) for _ in range(n)]


@pytest.mark.parametrize("augment", [False, True])
def test_zero_shot_colour_accuracy(shapes_server: Server, augment: bool) -> None:
    classes = [{"name": c, "examples_to_include": [f"{c} shape"]} for c in shapes.COLOURS]
    images, truth = [], []
    for k, (c, s) in enumerate(shapes.ALL_COMBOS):
        images += drawn(c, s, 6, seed=1000 + k)
        truth += [c] * 6
    preds = predictions(shapes_server, classes, images, augment)
    accuracy = np.mean([p == t for p, t in zip(preds, truth)])
    # Measured 99.9% over 900 images (BENCHMARKS.md); two points of margin, about two of these 108 images.
    assert accuracy >= 0.98, accuracy


def test_negative_example_is_feedback(shapes_server: Server) -> None:
    others = [{"name": "other", "examples_to_include": ["blue shape", "green shape", "yellow shape"]}]
    without = [{"name": "red", "examples_to_include": ["red shape"]}, *others]
    with_neg = [{"name": "red", "examples_to_include": ["red shape"], "examples_to_exclude": ["red square"]}, *others]
    squares, circles = drawn("red", "square", 50, seed=7), drawn("red", "circle", 50, seed=8)

    red_squares_before = np.mean([p == "red" for p in predictions(shapes_server, without, squares, False)])
    red_squares_after = np.mean([p == "red" for p in predictions(shapes_server, with_neg, squares, False)])
    red_circles_after = np.mean([p == "red" for p in predictions(shapes_server, with_neg, circles, False)])
    assert red_squares_before >= 0.9  # without the negative, red squares ARE red
    assert red_squares_after <= 0.1  # the negative turns >= 90% of them away
    assert red_circles_after >= 0.9  # ...while >= 90% of red circles stay red


def test_more_positive_examples_raise_recall_on_held_out_combos(shapes_server: Server) -> None:
    one = [{"name": s, "examples_to_include": [s]} for s in shapes.SHAPES]
    many = [{"name": s, "examples_to_include": [s, *(f"{c} {s}" for c in shapes.COLOURS)]} for s in shapes.SHAPES]
    images, truth = [], []
    for k, (c, s) in enumerate(sorted(shapes.HELD_OUT)):
        images += drawn(c, s, 40, seed=2000 + k)
        truth += [s] * 40
    recall_one = np.mean([p == t for p, t in zip(predictions(shapes_server, one, images, False), truth)])
    recall_many = np.mean([p == t for p, t in zip(predictions(shapes_server, many, images, False), truth)])
    assert recall_many >= recall_one + 0.05, (recall_one, recall_many)


def test_shipped_model_files_are_small() -> None:
    assert (SHAPES_CLIP / "shapes-clip.fp16.pt").stat().st_size < 20_000_000
    assert Path(SHAPES_CLIP / "shapes-clip.json").is_file()
