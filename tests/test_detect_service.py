"""/deploy_detector and /detect through a real `bentoml serve` with a tiny random-weight OWLv2."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from runners.owl import OwlDetector
from semantic.templates_detect import DETECTION_TEMPLATES
from testing.client import assert_error, deploy, files
from testing.images import jpeg_bytes
from testing.reference import ref_detect, ref_image_query, reference_box_scores
from testing.server import Server

pytestmark = pytest.mark.server

DETECTOR = {
    "detector_configs": [
        {
            "name": "cat",
            "examples_to_include": ["cat", "kitten"],
            "examples_to_exclude": ["cat toy"],
            "detection_threshold": 0.0,
        },
        {"name": "dog", "examples_to_include": ["dog"], "detection_threshold": 0.0},
    ],
    "nms_threshold": 0.4,
    "class_agnostic_nms": False,
    "augment_examples": True,
}


def png(w: int, h: int, seed: int = 0) -> bytes:
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def deploy_detector(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    with server.client() as c:
        r = c.post("/deploy_detector", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def reference(tiny_owl: Path, image: Image.Image, body: dict[str, Any], scale: tuple[float, float]) -> list[dict]:
    """The expected detections from the model's raw per-box outputs and the plain rule (testing/reference.py).

    Example vectors are the detection templates' normalised mean, written out here; ``scale`` maps the boxes of the
    image the detector saw back to the client's pixels.
    """
    owl = OwlDetector(str(tiny_owl), top_k=48, device="cpu")

    def example(text: str) -> np.ndarray:
        per_template = owl.encode_texts([t.format(text) for t in DETECTION_TEMPLATES]).astype(np.float64)
        per_template /= np.linalg.norm(per_template, axis=1, keepdims=True)
        mean = per_template.mean(axis=0)
        return mean / np.linalg.norm(mean)

    configs = body["detector_configs"]
    classes = [
        ([example(t) for t in c["examples_to_include"]], [example(t) for t in c.get("examples_to_exclude", [])])
        for c in configs
    ]
    return reference_with(owl, image, body, classes, scale)


def reference_with(
    owl: OwlDetector,
    image: Image.Image,
    body: dict[str, Any],
    classes: list[tuple[list[Any], list[Any]]],
    scale: tuple[float, float],
) -> list[dict]:
    """The expected detections for given example vectors per class (positives, negatives)."""
    configs = body["detector_configs"]
    enc = owl.encode_images([image])[0]
    keep = [i for i, b in enumerate(enc["boxes"].tolist()) if b[2] > b[0] and b[3] > b[1]]  # not wholly padding
    boxes = [tuple(enc["boxes"][i].tolist()) for i in keep]
    pos, neg = reference_box_scores(
        [enc["class_embeds"][i].tolist() for i in keep],
        [float(enc["logit_shift"][i]) for i in keep],
        [float(enc["logit_scale"][i]) for i in keep],
        classes,
    )
    found = ref_detect(
        boxes,
        pos,
        neg,
        [c.get("detection_threshold", 0.1) for c in configs],
        body.get("nms_threshold", 0.4),
        body.get("class_agnostic_nms", True),
    )
    sx, sy = scale
    return [
        {
            "tlbr": [boxes[i][0] * sx, boxes[i][1] * sy, boxes[i][2] * sx, boxes[i][3] * sy],
            "score": score,
            "class": configs[k]["name"],
        }
        for i, k, score in found
    ]


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected) > 0
    assert [d["class"] for d in got] == [d["class"] for d in expected]
    for g, e in zip(got, expected):
        assert g["score"] == pytest.approx(e["score"], abs=1e-4)
        assert g["tlbr"] == pytest.approx(e["tlbr"], abs=2e-2)


def test_detect_matches_the_reference_rule_on_raw_outputs(server: Server, tiny_owl: Path) -> None:
    dep = deploy_detector(server, DETECTOR)
    blob = png(60, 40, seed=3)  # smaller than the model input: the server sends it as is
    with server.client() as c:
        r = c.post("/detect", params={"deployed_id": dep["deployed_id"]}, files=files(blob))
    assert r.status_code == 200, r.text
    got = r.json()
    assert isinstance(got, list) and len(got) == 1
    assert_same(got[0], reference(tiny_owl, Image.open(io.BytesIO(blob)).convert("RGB"), DETECTOR, (1.0, 1.0)))
    scores = [d["score"] for d in got[0]]
    assert scores == sorted(scores, reverse=True)


def test_boxes_in_original_pixels_for_large_non_square_images(server: Server, tiny_owl: Path) -> None:
    """A 640x200 image reaches the 64-px detector as 64x20 (x10 both ways), a 90x300 one as 19x64 (x90/19, x300/64):
    the boxes come back multiplied by exactly those factors."""
    body = {
        "detector_configs": [{"name": "thing", "examples_to_include": ["thing"], "detection_threshold": 0.0}],
        "nms_threshold": 1.0,
        "class_agnostic_nms": False,
    }
    dep = deploy_detector(server, body)
    wide_png, tall_png = png(640, 200, seed=1), png(90, 300, seed=2)
    with server.client() as c:
        r = c.post("/detect", params={"deployed_id": dep["deployed_id"]}, files=files(wide_png, tall_png))
    assert r.status_code == 200, r.text
    wide, tall = r.json()
    for blob, got, small, factors in (
        (wide_png, wide, (64, 20), (10.0, 10.0)),
        (tall_png, tall, (19, 64), (90 / 19, 300 / 64)),
    ):
        seen = Image.open(io.BytesIO(blob)).convert("RGB").resize(small, Image.Resampling.BILINEAR)
        assert_same(got, reference(tiny_owl, seen, body, factors))
        assert all(set(d) == {"tlbr", "score", "class"} for d in got)
    assert max(d["tlbr"][2] for d in wide) > 64  # beyond the model's own input: scaled back to the original


def test_class_agnostic_nms_and_thresholds(server: Server) -> None:
    blob = png(60, 60, seed=4)
    single = {
        "detector_configs": [{"name": "cat", "examples_to_include": ["cat"], "detection_threshold": 0.0}],
        "nms_threshold": 0.3,
    }
    results = []
    with server.client() as c:
        for agnostic in (True, False):
            dep = deploy_detector(server, {**single, "class_agnostic_nms": agnostic})
            results.append(c.post("/detect", params={"deployed_id": dep["deployed_id"]}, files=files(blob)).json())
        # A single class: class-agnostic NMS changes nothing.
        assert results[0] == results[1]
        # A threshold between the scores keeps only the boxes at or above it.
        scores = sorted({d["score"] for d in results[0][0]})
        assert len(scores) >= 2, results
        thr = (scores[0] + scores[-1]) / 2
        strict = {**single, "detector_configs": [{**single["detector_configs"][0], "detection_threshold": thr}]}
        dep = deploy_detector(server, strict)
        kept = c.post("/detect", params={"deployed_id": dep["deployed_id"]}, files=files(blob)).json()[0]
        assert kept and all(d["score"] >= thr for d in kept) and len(kept) < len(results[0][0])
        for d in kept:  # no degenerate boxes from the padding
            assert d["tlbr"][2] > d["tlbr"][0] and d["tlbr"][3] > d["tlbr"][1]


def test_detector_deploy_messages_config_and_errors(server: Server) -> None:
    with server.client() as c:
        first = deploy_detector(server, DETECTOR)
        assert first["message"] == "New model deployed."
        again = c.post("/deploy_detector", json={**DETECTOR, "deployed_id": first["deployed_id"]}).json()
        assert again["message"] == "Model updated."
        cfg = c.get("/model_config", params={"deployed_id": first["deployed_id"]}).json()
        dog = {**DETECTOR["detector_configs"][1], "examples_to_exclude": []}  # the default filled in
        assert cfg == {
            **DETECTOR,
            "detector_configs": [DETECTOR["detector_configs"][0], dog],
            "deployed_id": first["deployed_id"],
        }
        listed = {d["deployed_id"]: d for d in c.get("/deployments").json()["deployments"]}
        assert listed[first["deployed_id"]]["kind"] == "detector"
        clf = deploy(c)
        assert_error(
            c.post("/detect", params={"deployed_id": clf["deployed_id"]}, files=files(jpeg_bytes())),
            400,
            "not a detector",
        )
        assert_error(
            c.post("/classify", params={"deployed_id": first["deployed_id"]}, files=files(jpeg_bytes())),
            400,
            "not a classifier",
        )
        assert_error(c.post("/detect", params={"deployed_id": "nope"}, files=files(jpeg_bytes())), 400, "Key not")
        assert_error(c.post("/deploy_detector", json={"detector_configs": []}), 422, "Class list is empty.")
        bad = {"detector_configs": [{"name": "a", "examples_to_include": ["a"], "detection_threshold": 2}]}
        assert_error(c.post("/deploy_detector", json=bad), 422, "detection_threshold")
        r = c.post("/detect", params={"deployed_id": first["deployed_id"]}, files=files(b"not an image"))
        assert_error(r, 422, "Invalid image received, unable to open.")


def test_an_image_example_is_an_owl_image_query(server: Server, tiny_owl: Path) -> None:
    """The example image's query is the class embedding of its box nearest the whole image with the most objectness
    (OWLv2's image-guided detection); detecting with it follows the same rule as a text query's vector."""
    example_blob, scene_blob = png(60, 40, seed=5), png(60, 40, seed=6)
    body = {
        "detector_configs": [
            {
                "name": "thing",
                "examples_to_include": [{"image": base64.b64encode(example_blob).decode()}],
                "detection_threshold": 0.0,
            },
        ],
        "nms_threshold": 0.4,
    }
    dep = deploy_detector(server, body)
    with server.client() as c:
        r = c.post("/detect", params={"deployed_id": dep["deployed_id"]}, files=files(scene_blob))
    assert r.status_code == 200, r.text
    owl = OwlDetector(str(tiny_owl), top_k=48, device="cpu")
    example = Image.open(io.BytesIO(example_blob)).convert("RGB")
    enc = owl.encode_images([example])[0]
    boxes = [tuple(b) for b in enc["boxes"].tolist()]
    query = enc["class_embeds"][ref_image_query(boxes, enc["objectness"].tolist(), *example.size)]
    scene = Image.open(io.BytesIO(scene_blob)).convert("RGB")
    assert_same(r.json()[0], reference_with(owl, scene, body, [([query], [])], (1.0, 1.0)))
