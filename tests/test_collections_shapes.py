"""Collections' semantics through the real service with the project's trained shapes CLIP (models/shapes-clip): a
collection of drawn shapes, searched by text ("red" finds red shapes first) and classified by a deployment exactly as
/classify scores each image, with no image encoded again."""

from __future__ import annotations

import json

import numpy as np
import pytest

from testing.client import files
from testing.images import encode_png
from testing.server import Server
from tools import shapes

pytestmark = pytest.mark.server

PER_COMBO = 4


@pytest.fixture(scope="module")
def drawn(shapes_server: Server) -> list[tuple[bytes, dict[str, str]]]:
    """A collection "shapes" of 4 drawn images of each colour x shape (72), metadata colour and shape."""
    images: list[tuple[bytes, dict[str, str]]] = []
    for k, (colour, shape) in enumerate(shapes.ALL_COMBOS):
        rng = np.random.default_rng(3000 + k)
        images += [
            (encode_png(shapes.draw(colour, shape, rng)), {"colour": colour, "shape": shape}) for _ in range(PER_COMBO)
        ]
    with shapes_server.client() as c:
        assert c.post("/collections", json={"name": "shapes"}).status_code == 201
        for start in range(0, len(images), 24):
            chunk = images[start : start + 24]
            r = c.post(
                "/collections/shapes/images",
                files=files(*(b for b, _ in chunk)),
                data={"metadata": json.dumps([m for _, m in chunk])},
            )
            assert r.status_code == 200 and r.json()["added"] == len(chunk), r.text
    return images


def test_red_search_finds_red_shapes_first(shapes_server: Server, drawn: list) -> None:
    with shapes_server.client() as c:
        hits = c.post("/collections/shapes/search", json={"text": "red", "k": 10}).json()["results"]
        assert len(hits) == 10
        precision = np.mean([h["metadata"]["colour"] == "red" for h in hits])
        assert precision >= 0.9, [h["metadata"] for h in hits]
        # With a filter, only that shape; still red first.
        hits = c.post("/collections/shapes/search", json={"text": "red", "k": 4, "filter": {"shape": "circle"}}).json()[
            "results"
        ]
        assert [h["metadata"] for h in hits] == [{"colour": "red", "shape": "circle"}] * 4


def test_classifying_the_collection_equals_classify(shapes_server: Server, drawn: list) -> None:
    classes = [{"name": c, "examples_to_include": [f"{c} shape"]} for c in shapes.COLOURS]
    classes[0]["examples_to_exclude"] = ["red square"]  # a negative example takes part in the rule too
    with shapes_server.client() as c:
        deployed = c.post("/deploy_classifier", json={"classifier_configs": classes}).json()["deployed_id"]
        encoded = shapes_server.metric("zss_images_encoded_total")
        out = c.post("/collections/shapes/classify", json={"deployed_id": deployed, "limit": 1000, "top": 3}).json()
        assert out["total"] == len(drawn) and sum(out["counts"].values()) == len(drawn)
        assert shapes_server.metric("zss_images_encoded_total") == encoded
        preds: list[str] = []
        for start in range(0, len(drawn), 24):
            chunk = drawn[start : start + 24]
            direct = c.post("/classify", params={"deployed_id": deployed}, files=files(*(b for b, _ in chunk))).json()
            preds += [d["pred"] for d in direct]
            for item, want in zip(out["results"][start : start + 24], direct):
                assert item["pred"] == want["pred"]
                for name, raw in want["raw_scores"].items():
                    assert abs(item["raw_scores"][name] - raw) <= 1e-6, (name, item["raw_scores"][name], raw)
                    assert abs(item["scores"][name] - want["scores"][name]) <= 1e-6
        # The counts are the tally of /classify's predictions.
        assert out["counts"] == {n: preds.count(n) for n in out["counts"]}
        for label, rows in out["top"].items():
            assert len(rows) == min(3, out["counts"][label]) and all(
                r["raw_score"] >= s["raw_score"] for r, s in zip(rows, rows[1:])
            )
