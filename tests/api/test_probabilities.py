"""Sigmoid probabilities on /classify for a model that has them (a logit bias, as SigLIP), and the open set on them;
a CLIP answers as before. In process, with fake encoders whose info carries a logit scale and bias."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import build_app
from testing.client import assert_error, deploy
from testing.fakes import fake_engine
from tests.api.test_exemplars import BLUE, RED, b64, classify, png

SCALE, BIAS = 10.0, -5.0


def client_for(tmp_path: Path, logits: tuple[float, float] | None) -> Iterator[TestClient]:
    engine, _ = fake_engine(tmp_path / "data", logits=logits)
    with TestClient(build_app(engine), raise_server_exceptions=True) as client:
        yield client
    engine.close()


@pytest.fixture
def siglip(tmp_path: Path) -> Iterator[TestClient]:
    yield from client_for(tmp_path, (SCALE, BIAS))


@pytest.fixture
def clip(tmp_path: Path) -> Iterator[TestClient]:
    yield from client_for(tmp_path, None)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def image_classes() -> list[dict[str, Any]]:
    return [
        {"name": "red", "examples_to_include": [{"image": b64(RED)}]},
        {"name": "blue", "examples_to_include": [{"image": b64(BLUE)}]},
    ]


def test_probabilities_follow_the_raw_score_the_rule_picked(siglip: TestClient) -> None:
    deployed = deploy(siglip, image_classes())["deployed_id"]
    out = classify(siglip, deployed, png(RED))
    assert set(out) == {"scores", "pred", "raw_scores", "probabilities"}
    for name, raw in out["raw_scores"].items():
        assert out["probabilities"][name] == pytest.approx(sigmoid(SCALE * (2 * raw - 1) + BIAS), rel=1e-5)
    assert out["pred"] == "red" and out["probabilities"]["red"] > 0.99  # the same image as its example: cos 1


def test_a_negative_example_that_decides_makes_the_probability_small(siglip: TestClient) -> None:
    classes = image_classes()
    # A near-red positive, the very image as a negative: the negative is the more relevant, it decides.
    classes[0] = {
        "name": "red",
        "examples_to_include": [{"image": b64((200, 70, 60))}],
        "examples_to_exclude": [{"image": b64(RED)}],
    }
    out = classify(siglip, deploy(siglip, classes)["deployed_id"], png(RED))
    assert out["probabilities"]["red"] < 1e-3  # sigmoid(-scale * cos_neg + bias) with cos_neg = 1


def test_open_set_on_probability(siglip: TestClient) -> None:
    for open_set, rejected in (({}, False), ({"min_probability": 0.5}, False), ({"min_probability": 0.9999999}, True)):
        body_open = {"label": "none of these", **open_set}
        deployed = deploy(siglip, image_classes(), open_set=body_open)["deployed_id"]
        out = classify(siglip, deployed, png(RED))
        assert out["rejected"] is rejected and out["pred"] == ("none of these" if rejected else "red")
        config = siglip.get("/model_config", params={"deployed_id": deployed}).json()
        assert config["open_set"] == body_open  # as given, no null of the other rule
    # No class reaches 0.5: a colour no example is near.
    far = classify(
        siglip, deploy(siglip, image_classes(), open_set={"min_probability": 0.99})["deployed_id"], png((0, 255, 0))
    )
    assert far["rejected"] is True and max(far["probabilities"].values()) < 0.99


def test_clip_answers_as_before(clip: TestClient) -> None:
    deployed = deploy(clip, image_classes())["deployed_id"]
    assert set(classify(clip, deployed, png(RED))) == {"scores", "pred", "raw_scores"}


@pytest.mark.parametrize(
    ("model", "open_set"),
    [
        ("clip", {"label": "x"}),
        ("clip", {"min_probability": 0.5}),
        ("siglip", {"threshold": 0.5, "min_probability": 0.5}),
    ],
)
def test_an_open_set_the_model_cannot_apply_is_422(
    request: pytest.FixtureRequest, model: str, open_set: dict[str, Any]
) -> None:
    client: TestClient = request.getfixturevalue(model)
    body = {"classifier_configs": [{"name": "red", "examples_to_include": ["red"]}], "open_set": open_set}
    assert_error(client.post("/deploy_classifier", json=body), 422)
