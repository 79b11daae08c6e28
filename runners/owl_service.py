"""The OWLv2 / OWL-ViT detector as a BentoML service with adaptive batching.

Per-image outputs cross the process boundary packed into one float32 array (runners/owl_wire.py).
With ``ZSS_DETECTOR_MODEL=none``, or when the model cannot be loaded, the service runs without a model (no memory
held) and reports why through ``info``; the API then answers /detect with 503 and that reason.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
import numpy as np
from PIL import Image

from runners.device import configure_threads
from runners.heap import freeze_startup_heap
from runners.owl import OwlDetector, load_detector
from runners.owl_wire import pack
from runners.serving import RUNNER_CONNECTION, TRAFFIC, bento_model, service_settings
from settings import configure_logging

log = logging.getLogger(__name__)

# The one read of settings at import: decorator arguments (batch sizes) and the model reference are fixed when the
# class is defined.
_S = service_settings()
# ZSS_DETECTOR_MODEL=bentoml:NAME[:VERSION]: declared, so `bentoml build` packs that stored model into the bento.
_DETECTOR_MODEL = bento_model("ZSS_DETECTOR_MODEL", _S.detector_model) if _S.detector_enabled else None


@bentoml.service(name="owl_detector", workers=1, threads=4, traffic=TRAFFIC, runner_connection=RUNNER_CONNECTION)
class OwlDetectorEncoder:
    if _DETECTOR_MODEL is not None:
        detector_model = _DETECTOR_MODEL

    def __init__(self) -> None:
        settings = service_settings()
        configure_logging(settings)
        self.detector: OwlDetector | None = None
        self.error: str | None = None
        if not settings.detector_enabled:
            self.error = "the detector is disabled on this server (ZSS_DETECTOR_MODEL=none)"
            freeze_startup_heap()
            return
        configure_threads(settings.torch_threads)
        try:
            self.detector = load_detector(settings)
        except Exception as exc:  # serve the classifier routes even when the detector cannot load
            self.error = f"the detector {settings.detector_model!r} could not be loaded: {type(exc).__name__}: {exc}"
            log.error("%s", self.error)
        freeze_startup_heap()

    def _require(self) -> OwlDetector:
        if self.detector is None:
            raise RuntimeError(self.error or "no detector")
        return self.detector

    @bentoml.api
    def info(self) -> dict[str, Any]:
        d = self.detector
        if d is None:
            return {"enabled": False, "error": self.error}
        return {
            "enabled": True,
            "model_id": d.model_id,
            "input_size": d.input_size,
            "embed_dim": d.embed_dim,
            "model_type": d.model_type,
            "device": str(d.device),
        }

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=_S.detector_max_batch_size, max_latency_ms=600_000)
    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """RGB PIL images -> packed per-box data [N, k, 7 + D], boxes in each image's own pixel coordinates."""
        return pack(self._require().encode_images(images))

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=_S.text_max_batch_size, max_latency_ms=600_000)
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Prompts (templates applied by the caller) -> L2-normalised float32 query embeddings [N, D]."""
        return self._require().encode_texts(texts)
