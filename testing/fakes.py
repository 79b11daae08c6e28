"""Deterministic fake encoders for in-process route tests: the engine and the routes run for real, the models do not.

Text vectors come from a hash of the prompt; image vectors from the mean colour of the pixels, so two images that
differ in colour embed differently and a test can predict the result with the reference rule.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cache.stores import open_stores
from engine.kinds import BoxEncoding
from engine.pipelines import Engine
from settings import Settings

DIM = 8
PREPROCESS = {
    "size": [16, 16],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear",
    "resize_mode": "squash",
    "fill_color": 0,
}


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def text_vector(text: str, dim: int = DIM) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return _unit(np.random.default_rng(seed).standard_normal(dim))


class FakeClip:
    """Both CLIP towers; counts what it encodes."""

    def __init__(self, model_id: str = "fake-clip", logits: tuple[float, float] | None = None) -> None:
        self.model_id = model_id
        self.logits = logits  # (logit scale, logit bias): a sigmoid-loss model (SigLIP) has them
        self.prompts_encoded = 0
        self.images_encoded = 0

    def info(self) -> dict[str, Any]:
        info = {"model_id": self.model_id, "dim": DIM, "preprocess": PREPROCESS}
        if self.logits is not None:
            info.update(logit_scale=self.logits[0], logit_bias=self.logits[1])
        return info

    def encode(self, prompts: list[str]) -> np.ndarray:
        self.prompts_encoded += len(prompts)
        return np.stack([text_vector(p) for p in prompts]) if prompts else np.zeros((0, DIM), np.float32)

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(p.split()) + 2 for p in prompts]  # words, plus the start and end markers

    async def encode_pixels(self, pixels: np.ndarray, spent_s: float = 0.0) -> np.ndarray:
        self.images_encoded += len(pixels)
        mean = pixels.reshape(len(pixels), -1, 3).mean(axis=1) / 255.0  # [N, 3]
        feats = np.concatenate([mean - 0.5, np.ones((len(pixels), DIM - 3)) * 0.1], axis=1)
        return _unit(feats)


class FakeDetector:
    """A detector with a fixed grid of boxes per image whose embeddings follow the image's mean colour."""

    input_size = 32

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def info(self) -> dict[str, Any]:
        if not self.enabled:
            return {"enabled": False, "error": "the detector is disabled on this server (ZSS_DETECTOR_MODEL=none)"}
        return {"enabled": True, "model_id": "fake-owl", "input_size": self.input_size, "embed_dim": DIM}

    def encode_texts(self, prompts: list[str]) -> np.ndarray:
        return np.stack([text_vector(p) for p in prompts]) if prompts else np.zeros((0, DIM), np.float32)

    async def encode_images(self, images: list[Image.Image]) -> list[BoxEncoding]:
        out = []
        for im in images:
            w, h = im.size
            boxes = np.array([[0, 0, w / 2, h / 2], [w / 2, 0, w, h / 2], [0, h / 2, w, h]], dtype=np.float32)
            mean = np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255.0
            base = np.concatenate([mean - 0.5, np.full(DIM - 3, 0.1)])
            embeds = _unit(np.stack([base, base[::-1], base * np.arange(1, DIM + 1)]))
            k = len(boxes)
            out.append(BoxEncoding(boxes, embeds, np.zeros(k, np.float32), np.full(k, 4.0, np.float32)))
        return out


def fake_engine(
    data_dir: Path, *, detector: bool = True, logits: tuple[float, float] | None = None, **settings: Any
) -> tuple[Engine, FakeClip]:
    """An engine over the fake encoders with a real registry and embedding cache under ``data_dir`` (in Redis too
    with ``redis_url=...``); ``logits``: a CLIP with a logit scale and bias, as a SigLIP has."""
    s = Settings(data_dir=data_dir, **settings)
    clip = FakeClip(logits=logits)
    registry, vectors = open_stores(s)
    engine = Engine(
        s,
        image_encoder=clip,
        text_encoder=clip,
        detector=FakeDetector(enabled=detector),
        registry=registry,
        cache=vectors,
    )
    return engine, clip
