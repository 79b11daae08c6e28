"""A real `bentoml serve` of a tiny random-weight SigLIP in transformers' form (a ``SiglipModel`` save_pretrained
directory, as the Triton deployment loads them) through ZSS_CLIP_MODEL: the embedding routes (photofield's too), deploy
and classify with negative examples, the probabilities and the open set on them. The vectors are checked against the
model loaded in this process (runners/clip.py, tests/runners/test_siglip.py checks that against transformers)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api.photofield import decode_embedding
from runners.clip import load_clip_encoder
from settings import Settings
from testing.client import deploy, files
from testing.clip_images import encode_images
from testing.server import Server, running_server
from testing.siglip import write_tiny_hf_siglip


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf_siglip(tmp_path_factory.mktemp("siglip"), version=1)


@pytest.fixture(scope="module")
def siglip_server(siglip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("siglip-serve")
    env = {
        "ZSS_CLIP_MODEL": str(siglip_dir),
        "ZSS_DATA_DIR": str(base / "data"),
        "ZSS_DETECTOR_MODEL": "none",
        "ZSS_BACKEND": "torch",
    }
    with running_server(env, base / "serve.log") as srv:
        yield srv


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), rgb).save(buf, "PNG")
    return buf.getvalue()


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_siglip_served_end_to_end(siglip_server: Server, siglip_dir: Path) -> None:
    local = load_clip_encoder(Settings(clip_model=str(siglip_dir), backend="torch"))
    scale, bias = local.logits or (0.0, 0.0)
    with siglip_server.client() as c:
        info = c.get("/healthz_models").json()["image"]
        assert info["model_id"] == local.model_id and info["context_length"] == 16
        assert info["logit_bias"] == pytest.approx(bias) and info["preprocess"]["resize_mode"] == "squash"

        # Embedding routes: the model's own vectors (max-length padded text).
        texts = ["a red circle", "a blue square"]
        got = np.asarray(c.post("/embed_text", json={"texts": texts}).json()["embeddings"], np.float32)
        np.testing.assert_allclose(got, local.encode_texts(texts), atol=1e-4)
        red = png((220, 30, 30))
        img = np.asarray(c.post("/embed_image", files=files(red)).json()["embeddings"], np.float32)
        expected = encode_images(local, [Image.open(io.BytesIO(red)).convert("RGB")])
        np.testing.assert_allclose(img, expected, atol=1e-4)
        pf = c.post("/text-embeddings", json={"texts": texts}).json()
        vec, _ = decode_embedding(pf["texts"][0])
        assert float(vec @ got[0] / np.linalg.norm(vec)) > 0.999

        # Deploy and classify: negatives veto, probabilities follow the picked score, the open set on them.
        classes = [
            {"name": "red", "examples_to_include": ["a red circle"], "examples_to_exclude": ["a red square"]},
            {"name": "blue", "examples_to_include": ["a blue square"]},
        ]
        dep = deploy(c, classes, augment_examples=False, open_set={"min_probability": 0.5})["deployed_id"]
        out = c.post("/classify", params={"deployed_id": dep}, files=files(red)).json()
        assert set(out) == {"scores", "pred", "raw_scores", "rejected", "probabilities"}
        for name, raw in out["raw_scores"].items():
            assert out["probabilities"][name] == pytest.approx(sigmoid(scale * (2 * raw - 1) + bias), rel=1e-4)
        # Random weights: scale 1, bias 0, so every probability is about 0.5 +- 0.25; the verdict follows them.
        assert out["rejected"] is (max(out["probabilities"].values()) < 0.5)
        cos = img[0] @ local.encode_texts(["a red circle", "a red square", "a blue square"]).T
        red_raw = (1 + cos[0]) / 2 if cos[0] >= cos[1] else 1 - (1 + cos[1]) / 2
        assert out["raw_scores"]["red"] == pytest.approx(float(red_raw), abs=1e-4)

        # Image examples (few-shot) on a SigLIP: the same image as a class's example wins, with its probability.
        shots = [
            {"name": "red", "examples_to_include": [{"image": base64.b64encode(red).decode()}]},
            {"name": "blue", "examples_to_include": [{"image": base64.b64encode(png((30, 40, 220))).decode()}]},
        ]
        dep = deploy(c, shots, augment_examples=False)["deployed_id"]
        out = c.post("/classify", params={"deployed_id": dep}, files=files(red)).json()
        assert out["pred"] == "red" and set(out["probabilities"]) == {"red", "blue"}
        assert out["probabilities"]["red"] >= out["probabilities"]["blue"]
