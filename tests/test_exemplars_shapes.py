"""Image exemplars, negative image examples and the open set through `bentoml serve`, with the project's own trained
shapes CLIP (models/shapes-clip). The bodies are bench/bench_exemplars.py's (BENCHMARKS.md has its numbers on more
images); the tests assert the product goals themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.bench_exemplars import (
    CALIBRATION_SEED,
    EXEMPLAR_DRAWS,
    EXEMPLAR_SEED,
    TARGET_FRR,
    TEST_SEED,
    drawn,
    few_shot_body,
    labelled_images,
    threshold_for,
    veto_body,
)
from testing.images import encode_png
from testing.server import Server
from tools.shapes import ALL_COMBOS, HELD_OUT, UNNAMED_COMBOS

pytestmark = pytest.mark.server


@pytest.fixture
def server(shapes_server: Server) -> Server:
    return shapes_server  # tests/conftest.py: one server of the shapes CLIP for the session


def deploy(server: Server, body: dict[str, Any]) -> str:
    with server.client() as c:
        r = c.post("/deploy_classifier", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["deployed_id"])


def classify(server: Server, deployed_id: str, images: list[Image.Image]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with server.client() as c:
        for start in range(0, len(images), 60):
            batch = images[start : start + 60]
            files = [("data", (f"{i}.png", encode_png(im), "image/png")) for i, im in enumerate(batch)]
            r = c.post("/classify", params={"deployed_id": deployed_id}, files=files)
            assert r.status_code == 200, r.text
            got = r.json()
            out += got if isinstance(got, list) else [got]
    return out


def accuracy(results: list[dict[str, Any]], truth: list[str]) -> float:
    return float(np.mean([r["pred"] == t for r, t in zip(results, truth)]))


def test_five_image_exemplars_reach_90_percent_on_held_out_pairs(server: Server) -> None:
    # Issue 17's goal: the held-out colour x shape pairs (never drawn in training) with each class's text + 5 image
    # exemplars, >= 90% held-out accuracy. Mean over bench_exemplars' 5 exemplar draws on 300 held-out images (1500
    # classifications): measured 67.7% zero-shot -> 92.6% (draws 88.7-94.3%); the max rule before the probe gave 88.2%
    # on the same images and 10 draws (BENCHMARKS.md). Deterministic (fixed seeds).
    images, truth = labelled_images(sorted(HELD_OUT), 100, TEST_SEED)
    zero = accuracy(classify(server, deploy(server, few_shot_body(0)), images), truth)
    five = [
        accuracy(classify(server, deploy(server, few_shot_body(5, seed=EXEMPLAR_SEED + 100 * d)), images), truth)
        for d in range(EXEMPLAR_DRAWS)
    ]
    assert float(np.mean(five)) >= 0.9, (zero, five)
    assert float(np.mean(five)) >= zero + 0.2, (zero, five)


def test_one_negative_image_turns_away_its_look_alikes(server: Server) -> None:
    squares = drawn("red", "square", 30, TEST_SEED)
    rest = drawn("red", "circle", 15, TEST_SEED) + drawn("red", "triangle", 15, TEST_SEED)
    plain, vetoed = deploy(server, veto_body(False)), deploy(server, veto_body(True))
    assert np.mean([r["pred"] == "red" for r in classify(server, plain, squares)]) >= 0.9  # without: they ARE red
    assert np.mean([r["pred"] != "red" for r in classify(server, vetoed, squares)]) >= 0.9
    assert np.mean([r["pred"] == "red" for r in classify(server, vetoed, rest)]) >= 0.9


def test_open_set_at_the_calibrated_threshold(server: Server) -> None:
    body = few_shot_body(5)
    calibration, _ = labelled_images(ALL_COMBOS, 5, CALIBRATION_SEED)
    best = np.array([max(r["raw_scores"].values()) for r in classify(server, deploy(server, body), calibration)])
    t = threshold_for(best, TARGET_FRR)
    encoded = server.metric("zss_image_examples_encoded_total")
    open_id = deploy(server, {**body, "open_set": {"label": "none of these", "threshold": t}})
    # The same 90 image examples again: all from the embedding cache, none encoded.
    assert server.metric("zss_image_examples_encoded_total") == encoded > 0
    assert server.metric("zss_image_example_cache_hits_total") >= 90

    inside, truth = labelled_images(ALL_COMBOS, 5, TEST_SEED)
    got_in = classify(server, open_id, inside)
    kept = np.mean([not r["rejected"] for r in got_in])
    outside, _ = labelled_images(UNNAMED_COMBOS, 6, TEST_SEED)
    got_out = classify(server, open_id, outside)
    rejected = np.mean([r["rejected"] and r["pred"] == "none of these" for r in got_out])
    assert kept >= 0.95, (t, kept)
    assert rejected >= 0.9, (t, rejected)
    assert (
        accuracy([r for r in got_in if not r["rejected"]], [t_ for r, t_ in zip(got_in, truth) if not r["rejected"]])
        >= 0.9
    )
