"""CLIP encoders as BentoML services with adaptive batching.

Each request's value is itself a batch (numpy arrays or lists at the boundary, never torch tensors: BentoML 1.4 cannot
batch tensors). The API service calls ``encode_pixels`` with images already decoded and resized in its own process,
so decoding overlaps the forward pass here; ``encode`` takes PIL images for other callers.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
import numpy as np
from PIL import Image
from prometheus_client import Counter, Histogram

from runners.clip import load_clip_encoder
from runners.device import configure_threads, encoder_workers, service_workers
from runners.serving import RUNNER_CONNECTION, TRAFFIC
from settings import configure_logging, get_settings

log = logging.getLogger(__name__)

# Decorator arguments are fixed when the class is defined, so these few settings are read once at import.
_S = get_settings()

IMAGES_ENCODED = Counter("zss_images_encoded", "Images encoded by the CLIP image tower")
PROMPTS_ENCODED = Counter("zss_text_prompts_encoded", "Prompts encoded by the CLIP text tower (templates expanded)")

# Our own record of the batches the adaptive batcher forms (BentoML's histogram stops after its warm-up phase).
IMAGE_BATCH = Histogram(
    "zss_image_batch_size", "Images per image-encoder call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
TEXT_BATCH = Histogram(
    "zss_text_batch_size", "Prompts per text-encoder call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)


# Image encoder workers: 1 on a GPU, 2 on a CPU with >= 2 cores (measured in BENCHMARKS.md, P1); each worker's torch
# threads are its share of the CPU quota. Override with BENTOML_CONFIG_OPTIONS="services.clip_image_encoder.workers=N"
# (the thread share follows) and ZSS_TORCH_THREADS.
IMAGE_WORKERS = encoder_workers(_S.device)


@bentoml.service(
    name="clip_image_encoder",
    workers=IMAGE_WORKERS,
    threads=4,
    traffic=TRAFFIC,
    runner_connection=RUNNER_CONNECTION,
)
class ClipImageEncoder:
    def __init__(self) -> None:
        settings = get_settings()
        configure_logging(settings)
        workers = service_workers("clip_image_encoder", IMAGE_WORKERS)
        self.threads = configure_threads(settings.torch_threads, share=workers)
        self.encoder = load_clip_encoder(settings, towers="image")
        log.info(
            "image encoder %s ready (%d torch threads, 1 of %d workers)", self.encoder.model_id, self.threads, workers
        )

    @bentoml.api(
        batchable=True, batch_dim=0, max_batch_size=_S.image_max_batch_size, max_latency_ms=_S.image_max_latency_ms
    )
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] at the model's input size -> L2-normalised float32 [N, D]."""
        out = self.encoder.encode_pixels(pixels)
        IMAGES_ENCODED.inc(len(out))
        IMAGE_BATCH.observe(len(out))
        return out

    @bentoml.api(
        batchable=True, batch_dim=0, max_batch_size=_S.image_max_batch_size, max_latency_ms=_S.image_max_latency_ms
    )
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """RGB PIL images -> L2-normalised float32 [N, D]."""
        out = self.encoder.encode_images(images)
        IMAGES_ENCODED.inc(len(out))
        IMAGE_BATCH.observe(len(out))
        return out

    @bentoml.api
    def info(self) -> dict[str, Any]:
        return self.encoder.info


@bentoml.service(name="clip_text_encoder", workers=1, threads=4, traffic=TRAFFIC, runner_connection=RUNNER_CONNECTION)
class ClipTextEncoder:
    def __init__(self) -> None:
        settings = get_settings()
        configure_logging(settings)
        self.threads = configure_threads(settings.torch_threads)
        self.encoder = load_clip_encoder(settings, towers="text")
        # One worker with the whole quota: text encoding comes in bursts (deploys), idle otherwise.
        log.info("text encoder %s ready (%d torch threads)", self.encoder.model_id, self.threads)

    @bentoml.api(
        batchable=True, batch_dim=0, max_batch_size=_S.text_max_batch_size, max_latency_ms=_S.text_max_latency_ms
    )
    def encode(self, texts: list[str]) -> np.ndarray:
        """Prompts (templates already applied by the caller) -> L2-normalised float32 [N, D]."""
        out = self.encoder.encode_texts(texts)
        PROMPTS_ENCODED.inc(len(texts))
        TEXT_BATCH.observe(len(texts))
        return out

    @bentoml.api
    def info(self) -> dict[str, Any]:
        return self.encoder.info
