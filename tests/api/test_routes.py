"""The routes in-process (ASGI client, fake encoders, real engine, registry and cache): DirectAI's contract exactly.

The same routes run through a real `bentoml serve` in tests/test_service.py; here every rule of the HTTP edge is
checked quickly and without models.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from engine.admission import Refused
from service import build_app
from testing.client import CLASSES, assert_error, deploy, files
from testing.fakes import FakeClip, fake_engine
from testing.images import jpeg_bytes, png_bytes
from testing.reference import reference_scores

SNAPSHOT = Path(__file__).with_name("openapi.snapshot.json")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, FakeClip]]:
    engine, clip = fake_engine(tmp_path / "data")
    with TestClient(build_app(engine), raise_server_exceptions=True) as client:
        yield client, clip
    engine.close()


@pytest.fixture
def client(served: tuple[TestClient, FakeClip]) -> TestClient:
    return served[0]


# -- DirectAI's validation messages, character for character ------------------------------------------------------
@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        (
            "/deploy_classifier",
            {},
            "1 validation error for Request body -> classifier_configs field required (type=value_error.missing)",
        ),
        (
            "/deploy_classifier",
            {
                "classifier_configs": [
                    {"name": "bottle", "examples_to_exclude": []},
                    {"name": "can", "examples_to_include": ["can"]},
                ]
            },
            "1 validation error for Request body -> classifier_configs -> 0 -> examples_to_include field required "
            "(type=value_error.missing)",
        ),
        (
            "/deploy_detector",
            {},
            "1 validation error for Request body -> detector_configs field required (type=value_error.missing)",
        ),
        (
            "/deploy_detector",
            {
                "detector_configs": [{"name": "bottle", "examples_to_exclude": [], "detection_threshold": 0.1}],
                "nms_threshold": 0.4,
            },
            "1 validation error for Request body -> detector_configs -> 0 -> examples_to_include field required "
            "(type=value_error.missing)",
        ),
        (
            "/deploy_detector",
            {"detector_configs": [{"name": "a", "examples_to_include": ["a"], "detection_threshold": "high"}]},
            "1 validation error for Request body -> detector_configs -> 0 -> detection_threshold value is not a valid "
            "float (type=type_error.float)",
        ),
        (
            "/deploy_detector",
            {"detector_configs": [{"name": "a", "examples_to_include": ["a"]}], "nms_threshold": 2},
            "1 validation error for Request body -> nms_threshold ensure this value is less than or equal to 1.0 "
            "(type=value_error.number.not_le; limit_value=1.0)",
        ),
        (
            "/deploy_classifier",
            {"classifier_configs": [{"examples_to_include": "x"}]},
            "2 validation errors for Request body -> classifier_configs -> 0 -> name field required "
            "(type=value_error.missing) body -> classifier_configs -> 0 -> examples_to_include value is not a valid "
            "list (type=type_error.list)",
        ),
    ],
)
def test_validation_errors_read_as_directai_wrote_them(
    client: TestClient, route: str, body: dict[str, Any], message: str
) -> None:
    r = client.post(route, json=body)
    assert r.status_code == 422
    assert r.json() == {"status_code": 422, "message": message, "data": None}


def test_query_parameter_errors_use_the_same_form(client: TestClient) -> None:
    r = client.post("/classify", files=files(jpeg_bytes()))
    assert r.json() == {
        "status_code": 422,
        "message": "1 validation error for Request query -> deployed_id field required (type=value_error.missing)",
        "data": None,
    }


def test_empty_include_list_uses_directai_wording(client: TestClient) -> None:
    body = {"classifier_configs": [{"name": "bottle", "examples_to_include": []}]}
    r = client.post("/deploy_classifier", json=body)
    assert r.json() == {"status_code": 422, "message": "Model lacks example_to_include for bottle class.", "data": None}
    assert_error(client.post("/deploy_classifier", json={"classifier_configs": []}), 422, "Class list is empty.")


# -- deploy, model_config, list, delete -----------------------------------------------------------------------------
def test_deploy_messages(client: TestClient) -> None:
    first = deploy(client)
    assert first["message"] == "New model deployed." and len(first["deployed_id"]) == 32
    again = deploy(client, deployed_id=first["deployed_id"])
    assert again == {"deployed_id": first["deployed_id"], "message": "Model updated."}
    other = deploy(client, deployed_id="gone")
    assert other["message"] == "gone model not found. Generated new model." and other["deployed_id"] != "gone"


def test_model_config_is_the_deployed_body_with_defaults_and_nothing_else(client: TestClient) -> None:
    sent = {"classifier_configs": [{"name": "cat", "examples_to_include": ["cat"]}]}
    dep = client.post("/deploy_classifier", json=sent).json()
    cfg = client.get("/model_config", params={"deployed_id": dep["deployed_id"]}).json()
    assert cfg == {
        "classifier_configs": [{"name": "cat", "examples_to_include": ["cat"], "examples_to_exclude": []}],
        "augment_examples": True,
        "deployed_id": dep["deployed_id"],
    }
    det_sent = {"detector_configs": [{"name": "cat", "examples_to_include": ["cat"]}]}
    det = client.post("/deploy_detector", json=det_sent).json()
    cfg = client.get("/model_config", params={"deployed_id": det["deployed_id"]}).json()
    assert cfg == {
        "detector_configs": [
            {"name": "cat", "examples_to_include": ["cat"], "examples_to_exclude": [], "detection_threshold": 0.1}
        ],
        "nms_threshold": 0.4,
        "class_agnostic_nms": True,
        "augment_examples": True,
        "deployed_id": det["deployed_id"],
    }
    kinds = {d["deployed_id"]: d["kind"] for d in client.get("/deployments").json()["deployments"]}
    assert kinds == {dep["deployed_id"]: "classifier", det["deployed_id"]: "detector"}


def test_unknown_ids_answer_key_not_found_everywhere(client: TestClient) -> None:
    img = files(jpeg_bytes())
    assert_error(client.post("/classify", params={"deployed_id": "nope"}, files=img), 400, "Key not found")
    assert_error(client.post("/detect", params={"deployed_id": "nope"}, files=img), 400, "Key not found")
    assert_error(client.get("/model_config", params={"deployed_id": "nope"}), 400, "Key not found")
    assert_error(client.delete("/deployments/nope"), 400, "Key not found")


def test_an_unreadable_image_is_422_before_the_id_is_looked_up(client: TestClient) -> None:
    # DirectAI's server checks the image first: its own tests expect 422 for a junk image on an unknown id.
    r = client.post("/classify", params={"deployed_id": "b5d1bdec"}, files=files(b"This is not an image file"))
    assert r.json() == {"status_code": 422, "message": "Invalid image received, unable to open.", "data": None}


def test_delete_then_the_id_is_gone(client: TestClient) -> None:
    dep = deploy(client)
    r = client.delete(f"/deployments/{dep['deployed_id']}")
    assert r.json() == {"deployed_id": dep["deployed_id"], "message": "Model deleted."}
    assert_error(client.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(jpeg_bytes())), 400)


# -- scoring through the routes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("augment", [False, True])
def test_classify_equals_the_reference_rule_on_the_embedding_routes(client: TestClient, augment: bool) -> None:
    dep = deploy(client, augment_examples=augment)
    blobs = [jpeg_bytes(1), png_bytes(2)]
    out = client.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(*blobs)).json()
    images = np.asarray(client.post("/embed_image", files=files(*blobs)).json()["embeddings"])
    texts = sorted({t for c in CLASSES for t in c["examples_to_include"] + c["examples_to_exclude"]})
    vecs = client.post("/embed_text", json={"texts": texts, "augment_examples": augment}).json()["embeddings"]
    vec = dict(zip(texts, np.asarray(vecs)))
    for image, got in zip(images, out):
        want = reference_scores(image, CLASSES, vec)
        assert got["raw_scores"] == pytest.approx(want, abs=1e-5)
        assert got["pred"] == max(want, key=want.__getitem__)
        assert list(got["scores"]) == [c["name"] for c in CLASSES] and sum(got["scores"].values()) == pytest.approx(1)
    one = client.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(blobs[0])).json()
    assert one == out[0]  # one image: an object, not a list


def test_examples_are_encoded_once_across_deployments(served: tuple[TestClient, FakeClip]) -> None:
    client, clip = served
    deploy(client, augment_examples=False)
    first = clip.prompts_encoded
    deploy(client, augment_examples=False)
    assert first == 9 and clip.prompts_encoded == first  # 9 distinct texts in CLASSES; the second deploy hits the cache


def test_detector_off_is_a_503_with_the_reason(tmp_path: Path) -> None:
    engine, _ = fake_engine(tmp_path, detector=False)
    with TestClient(build_app(engine)) as client:
        r = client.post("/deploy_detector", json={"detector_configs": [{"name": "a", "examples_to_include": ["a"]}]})
        assert_error(r, 503, "Detection is unavailable: the detector is disabled")
    engine.close()


def test_detect_returns_directai_detections(client: TestClient) -> None:
    body = {
        "detector_configs": [{"name": "a", "examples_to_include": ["a"], "detection_threshold": 0.0}],
        "nms_threshold": 1.0,
    }
    dep = client.post("/deploy_detector", json=body).json()
    got = client.post("/detect", params={"deployed_id": dep["deployed_id"]}, files=files(png_bytes(1, (60, 40)))).json()
    assert len(got) == 1 and len(got[0]) == 3  # the fake detector's three boxes, none suppressed at NMS 1.0
    assert all(set(d) == {"tlbr", "score", "class"} and d["class"] == "a" for d in got[0])
    assert sorted(tuple(d["tlbr"]) for d in got[0]) == sorted([(0, 0, 30, 20), (30, 0, 60, 20), (0, 20, 60, 40)])


def test_errors_never_escape_as_500(client: TestClient) -> None:
    assert_error(client.post("/classify", params={"deployed_id": "x"}, content=b"{}"), 422)
    assert_error(client.post("/classify", params={"deployed_id": "x"}, json={"data": 3}), 422)
    assert_error(client.get("/no-such-route"), 404)
    assert_error(client.post("/embed_text", json={"texts": [" "]}), 422, "Texts must not be empty.")


# -- OpenAPI snapshot -----------------------------------------------------------------------------------------------
def openapi_outline(spec: dict[str, Any]) -> dict[str, Any]:
    """Routes, methods, parameters, request schemas and response codes: what clients generate code from."""
    out: dict[str, Any] = {}
    for path, methods in sorted(spec["paths"].items()):
        for method, op in sorted(methods.items()):
            body = op.get("requestBody", {}).get("content", {})
            out[f"{method.upper()} {path}"] = {
                "parameters": sorted(f"{p['in']}:{p['name']}" for p in op.get("parameters", [])),
                "body": {ctype: json.dumps(c.get("schema", {}), sort_keys=True) for ctype, c in sorted(body.items())},
                "responses": sorted(op.get("responses", {})),
            }
    out["schemas"] = {
        name: sorted(s.get("properties", {})) for name, s in sorted(spec["components"]["schemas"].items())
    }
    return out


def test_openapi_matches_the_snapshot(client: TestClient) -> None:
    """An API change must be deliberate: regenerate with ZSS_UPDATE_SNAPSHOT=1 and review the diff."""
    outline = openapi_outline(client.get("/openapi.json").json())
    import os

    if os.environ.get("ZSS_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(outline, indent=1, sort_keys=True) + "\n")
    assert outline == json.loads(SNAPSHOT.read_text())


def test_image_urls_are_refused_unless_enabled(client: TestClient) -> None:
    r = client.post("/embed_image", json={"url": "http://127.0.0.1/cat.jpg"})
    assert_error(r, 400, "Image URLs are disabled on this server (set ZSS_ALLOW_URL_FETCH=true to enable).")


def test_the_web_page_is_served_at_ui(client: TestClient, tmp_path: Path) -> None:
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="app.js">' in page.text
    for asset, ctype in (("app.js", "javascript"), ("app.css", "text/css")):
        r = client.get(f"/ui/{asset}")
        assert r.status_code == 200 and ctype in r.headers["content-type"], asset
    assert client.get("/ui", follow_redirects=False).status_code in (307, 308)  # to /ui/
    assert client.get("/ui/settings.json").json() == {"allow_url_fetch": False, "detector_enabled": True}
    engine, _ = fake_engine(tmp_path / "off", detector=False)
    with TestClient(build_app(engine)) as off:
        assert off.get("/ui/settings.json").json()["detector_enabled"] is False
    engine.close()
    assert_error(client.get("/ui/nope.js"), 404)  # the envelope, as everywhere


# -- the image latency bound: admission before decoding (engine/admission.py) ----------------------------------------
def test_image_routes_count_the_bound_from_arrival_and_a_refusal_is_a_503_with_retry_after(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    dep = deploy(client)
    seen: list[tuple[int, float]] = []

    @asynccontextmanager
    async def refuse(n: int, arrived: float) -> AsyncIterator[None]:
        seen.append((n, arrived))
        raise Refused("The image encoder cannot answer within 3 s now (ZSS_IMAGE_MAX_LATENCY_MS); retry later.", 2.2)
        yield  # pragma: no cover - never admitted

    monkeypatch.setattr(engine.admission, "admit", refuse)
    monkeypatch.setattr(engine.detect_admission, "admit", refuse)  # /detect: its own admission, the same bound
    before = time.monotonic()
    for route, params in [
        ("/embed_image", {}),
        ("/image-embeddings", {}),
        ("/classify", {"deployed_id": dep["deployed_id"]}),
        ("/detect", {"deployed_id": "asked-before-the-id-is-looked-up"}),
    ]:
        # Bytes no decoder accepts: a route that decoded before asking would answer 422, not the refusal.
        r = client.post(route, params=params, files=files(b"not an image", b"\xff\xd8 nor this"))
        assert_error(r, 503, "cannot answer within 3 s")
        assert r.headers["retry-after"] == "3"
    after = time.monotonic()
    # Each route asked before decoding, with its images and the arrival its middleware stamped.
    assert [n for n, _ in seen] == [2, 2, 2, 2]
    assert all(before <= t <= after for _, t in seen)
    assert sorted(t for _, t in seen) == [t for _, t in seen]
    monkeypatch.undo()  # admitted, the same bytes are the decoder's 422
    assert_error(client.post("/embed_image", files=files(b"not an image")), 422)
