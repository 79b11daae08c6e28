"""/deploy_detector and /detect through a real `bentoml serve` with a tiny random-weight OWLv2."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from runners.engine import ClassSpec, CompiledDetector, score_detections
from runners.owl import OwlDetector
from semantic.classify import compile_classifier
from semantic.templates import ensemble, expand
from semantic.templates_detect import DETECTION_TEMPLATES
from tests.conftest import Server, jpeg_bytes
from tests.test_service import assert_error, deploy, files

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


def in_process(tiny_owl: Path, image: Image.Image, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The same detector computed without the server: same model files, templates and scoring code."""
    owl = OwlDetector(str(tiny_owl), top_k=48, device="cpu")
    specs = [
        ClassSpec(c["name"], tuple(c["examples_to_include"]), tuple(c.get("examples_to_exclude", ())))
        for c in body["detector_configs"]
    ]

    def emb(texts: tuple[str, ...]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, owl.embed_dim)
        per_prompt = torch.from_numpy(owl.encode_texts(expand(list(texts), DETECTION_TEMPLATES)))
        return ensemble(per_prompt, len(DETECTION_TEMPLATES))

    det = CompiledDetector(
        examples=compile_classifier(
            [s.name for s in specs], [emb(s.include) for s in specs], [emb(s.exclude) for s in specs]
        ),
        thresholds=torch.tensor([c["detection_threshold"] for c in body["detector_configs"]]),
        nms_threshold=body["nms_threshold"],
        class_agnostic_nms=body["class_agnostic_nms"],
    )
    enc = owl.encode_images([image])[0]
    return score_detections(enc["boxes"], enc["class_embeds"], enc["logit_shift"], enc["logit_scale"], det)


def test_detect_matches_in_process_rule(server: Server, tiny_owl: Path) -> None:
    dep = deploy_detector(server, DETECTOR)
    blob = png(60, 40, seed=3)  # smaller than the model input: the server sends it as is
    with server.client() as c:
        r = c.post("/detect", params={"deployed_id": dep["deployed_id"]}, files=files(blob))
    assert r.status_code == 200, r.text
    got = r.json()
    assert isinstance(got, list) and len(got) == 1 and len(got[0]) > 0
    expected = in_process(tiny_owl, Image.open(io.BytesIO(blob)).convert("RGB"), DETECTOR)
    assert [d["class"] for d in got[0]] == [d["class"] for d in expected]
    for g, e in zip(got[0], expected):
        assert g["score"] == pytest.approx(e["score"], abs=1e-4)
        assert g["tlbr"] == pytest.approx(e["tlbr"], abs=1e-2)
    scores = [d["score"] for d in got[0]]
    assert scores == sorted(scores, reverse=True)


def test_boxes_in_original_coordinates_for_large_non_square_images(server: Server) -> None:
    plain = {"detector_configs": [{"name": "thing", "examples_to_include": ["thing"], "detection_threshold": 0.0}]}
    dep = deploy_detector(server, {**plain, "nms_threshold": 1.0, "class_agnostic_nms": False})
    with server.client() as c:
        r = c.post(
            "/detect",
            params={"deployed_id": dep["deployed_id"]},
            files=files(png(640, 200, seed=1), jpeg_bytes(2, size=(90, 300))),
        )
    assert r.status_code == 200, r.text
    wide, tall = r.json()
    assert wide or tall
    for dets, (w, h) in ((wide, (640, 200)), (tall, (90, 300))):
        for d in dets:
            x1, y1, x2, y2 = d["tlbr"]
            assert -1e-3 <= x1 <= x2 <= w + 1e-3 and -1e-3 <= y1 <= y2 <= h + 1e-3
            assert set(d) == {"tlbr", "score", "class"}
    # The wide image spans its whole width (boxes scaled back from the 64-px model input).
    assert max(d["tlbr"][2] for d in wide + tall) > 64


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
        assert cfg["kind"] == "detector" and cfg["nms_threshold"] == 0.4
        assert [d["name"] for d in cfg["detector_configs"]] == ["cat", "dog"]
        assert cfg["detector_configs"][0]["detection_threshold"] == 0.0
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
