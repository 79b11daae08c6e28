"""Image examples and the open set through the routes in-process (fake encoders, real engine, registry and cache)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from engine.exemplars import image_key
from engine.pipelines import Engine
from service import build_app
from testing.client import assert_error, deploy, files
from testing.fakes import FakeClip, fake_engine

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)


def png(rgb: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def b64(rgb: tuple[int, int, int]) -> str:
    return base64.b64encode(png(rgb)).decode()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, FakeClip, Engine]]:
    engine, clip = fake_engine(tmp_path / "data")
    with TestClient(build_app(engine), raise_server_exceptions=True) as client:
        yield client, clip, engine
    engine.close()


def classify(client: TestClient, deployed_id: str, *blobs: bytes) -> Any:
    r = client.post("/classify", params={"deployed_id": deployed_id}, files=files(*blobs))
    assert r.status_code == 200, r.text
    return r.json()


def test_image_examples_classify_and_come_back_as_given(served: tuple[TestClient, FakeClip, Engine]) -> None:
    client, clip, _ = served
    classes = [
        {"name": "red", "examples_to_include": [{"image": b64(RED)}]},
        {"name": "green", "examples_to_include": [{"image": "data:image/png;base64," + b64(GREEN)}]},
        {"name": "blue", "examples_to_include": [{"image": b64(BLUE)}], "examples_to_exclude": []},
    ]
    deployed = deploy(client, classes)["deployed_id"]
    assert clip.images_encoded == 6  # each image example and its mirror
    out = classify(client, deployed, png((200, 40, 40)), png((40, 180, 60)), png((40, 50, 200)))
    assert [o["pred"] for o in out] == ["red", "green", "blue"]
    assert all("rejected" not in o for o in out)  # no open set: DirectAI's shape
    config = client.get("/model_config", params={"deployed_id": deployed}).json()
    assert config["classifier_configs"][1]["examples_to_include"] == [{"image": "data:image/png;base64," + b64(GREEN)}]
    assert config["classifier_configs"][2]["examples_to_exclude"] == []
    assert "open_set" not in config


def test_image_examples_are_cached_by_content(served: tuple[TestClient, FakeClip, Engine]) -> None:
    client, clip, engine = served
    deploy(client, [{"name": "red", "examples_to_include": ["red", {"image": b64(RED)}]}])
    before = clip.images_encoded
    # The same bytes as a data URI, in another deployment: a cache hit, nothing encoded.
    deploy(
        client,
        [
            {"name": "r", "examples_to_include": ["r"], "examples_to_exclude": [{"image": "data:;base64," + b64(RED)}]},
            {"name": "g", "examples_to_include": ["g"]},
        ],
    )
    assert clip.images_encoded == before
    ns = engine.image_embedder().namespace
    assert ns.startswith("fake-clip|image-") and engine.cache.count(ns) == 1
    vec, stats = engine.cache.get_or_encode(ns, [image_key(png(RED))], lambda todo: pytest.fail(str(todo)))
    assert stats.hits == 1 and vec.shape == (1, 16)  # the image's vector and its mirror's, side by side


def test_mixed_class_scores_with_the_calibrated_rule(served: tuple[TestClient, FakeClip, Engine]) -> None:
    client, _, engine = served
    classes = [
        {"name": "red", "examples_to_include": ["a red thing", {"image": b64(RED)}]},
        {"name": "green", "examples_to_include": ["a green thing", {"image": b64(GREEN)}]},
        {"name": "blue", "examples_to_include": ["a blue thing"], "examples_to_exclude": [{"image": b64(BLUE)}]},
    ]
    deployed = deploy(client, classes)["deployed_id"]
    out = classify(client, deployed, png(RED))
    compiled = engine.deployments._lru[deployed].compiled
    assert compiled.has_images and compiled.image_map != (1.0, 0.0)
    # Each positive image example and its mirror (2 + 2 rows); the negative alone (1 row). Slots 2C.. are images.
    assert int((compiled.example_slot >= 6).sum()) == 5 and int((compiled.example_slot >= 9).sum()) == 1
    assert compiled.probe_class is not None and compiled.probe_class.tolist() == [0, 1]  # red and green: probed
    assert out["pred"] == "red"  # an exact copy of the red exemplar: the highest calibrated evidence there is


@pytest.mark.parametrize(
    ("example", "status", "message"),
    [
        ({"image": "not base64 at all!"}, 422, "Class 'b', examples_to_include[1]: Invalid base64 image data"),
        ({"image": base64.b64encode(b"not an image").decode()}, 422, "Class 'b', examples_to_include[1]: Invalid"),
        ({"url": "http://127.0.0.1/x.png"}, 400, "Class 'b', examples_to_include[1]: Image URLs are disabled"),
    ],
)
def test_an_unreadable_image_example_is_a_4xx_naming_class_and_entry(
    served: tuple[TestClient, FakeClip, Engine], example: dict[str, str], status: int, message: str
) -> None:
    client = served[0]
    body = {
        "classifier_configs": [
            {"name": "a", "examples_to_include": ["a"]},
            {"name": "b", "examples_to_include": ["b", example]},
        ]
    }
    r = client.post("/deploy_classifier", json=body)
    assert_error(r, status)
    assert r.json()["message"].startswith(message), r.json()
    assert client.get("/deployments").json()["deployments"] == []  # nothing half-deployed


@pytest.mark.parametrize("example", [{"image": "x", "url": "http://a/b.png"}, {"picture": "x"}, {"image": ""}, 3])
def test_a_malformed_example_entry_is_422(served: tuple[TestClient, FakeClip, Engine], example: Any) -> None:
    body = {"classifier_configs": [{"name": "a", "examples_to_include": [example]}]}
    assert_error(served[0].post("/deploy_classifier", json=body), 422)


def detect(client: TestClient, body: dict[str, Any], blob: bytes) -> list[dict[str, Any]]:
    r = client.post("/deploy_detector", json=body)
    assert r.status_code == 200, r.text
    got = client.post("/detect", params={"deployed_id": r.json()["deployed_id"]}, files=files(blob))
    assert got.status_code == 200, got.text
    return list(got.json()[0])


def test_detector_image_examples_are_owl_image_queries(served: tuple[TestClient, FakeClip, Engine]) -> None:
    client, _, engine = served
    # The fake detector's boxes: two top quarters and the bottom half. The example's query is the bottom half's
    # embedding (the box closest to the whole image); a same-coloured image's bottom half matches it exactly (cos 1).
    bottom = [0.0, 12.0, 24.0, 24.0]
    cls = {"name": "red thing", "examples_to_include": [{"image": b64(RED)}], "detection_threshold": 0.98}
    got = detect(client, {"detector_configs": [cls], "nms_threshold": 1.0}, png(RED))
    assert [(d["class"], d["tlbr"]) for d in got] == [("red thing", bottom)]
    assert got[0]["score"] == pytest.approx(1 / (1 + np.exp(-4.0)), abs=1e-5)  # sigmoid((cos 1 + shift 0) * scale 4)
    assert engine.cache.count(engine.detector_image_embedder().namespace) == 1
    # The same picture as a negative example vetoes that box, exactly as a negative text would.
    vetoed = {
        "name": "thing",
        "examples_to_include": ["thing"],
        "examples_to_exclude": [{"image": b64(RED)}],
        "detection_threshold": 0.0,
    }
    got = detect(client, {"detector_configs": [vetoed], "nms_threshold": 1.0}, png(RED))
    assert bottom not in [d["tlbr"] for d in got]
    plain = {**vetoed, "examples_to_exclude": []}
    assert bottom in [d["tlbr"] for d in detect(client, {"detector_configs": [plain], "nms_threshold": 1.0}, png(RED))]
    config = client.get("/deployments").json()["deployments"]
    assert len(config) == 3


def test_open_set_rejects_below_the_threshold(served: tuple[TestClient, FakeClip, Engine]) -> None:
    client = served[0]
    classes = [
        {"name": "red", "examples_to_include": [{"image": b64(RED)}]},
        {"name": "green", "examples_to_include": [{"image": b64(GREEN)}]},
    ]
    open_set = {"label": "none of these", "threshold": 0.99}
    deployed = deploy(client, classes, open_set=open_set)["deployed_id"]
    near, far = classify(client, deployed, png(RED), png(BLUE))
    assert near["pred"] == "red" and near["rejected"] is False
    assert far["pred"] == "none of these" and far["rejected"] is True
    assert max(far["raw_scores"].values()) < 0.99 <= max(near["raw_scores"].values())
    # scores and raw scores are those of the same deployment without an open set
    plain = classify(client, deploy(client, classes)["deployed_id"], png(RED), png(BLUE))[1]
    assert far["scores"] == plain["scores"] and far["raw_scores"] == plain["raw_scores"]
    config = client.get("/model_config", params={"deployed_id": deployed}).json()
    assert config["open_set"] == open_set


@pytest.mark.parametrize(
    "open_set",
    [{"label": "red", "threshold": 0.5}, {"label": "x", "threshold": 1.5}, {"label": "x"}, {"threshold": 0.5, "y": 1}],
)
def test_a_bad_open_set_is_422(served: tuple[TestClient, FakeClip, Engine], open_set: dict[str, Any]) -> None:
    body = {"classifier_configs": [{"name": "red", "examples_to_include": ["red"]}], "open_set": open_set}
    assert_error(served[0].post("/deploy_classifier", json=body), 422)
