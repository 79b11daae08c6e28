"""CLIP encoders as BentoML services.

Each request's value is itself a batch (numpy arrays or lists at the boundary, never torch tensors). The image encoder
batches requests itself, on lanes that share one queue (runners/batcher.py); the text encoder uses BentoML's adaptive
batching (its work comes in bursts at deploy time). The API service calls ``encode_pixels`` with images already decoded
and resized in its own process, so decoding overlaps the forward pass here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bentoml
import numpy as np
from prometheus_client import Counter, Histogram
from starlette.responses import PlainTextResponse

from imaging.device_decode import UNDECODABLE, decode_to_pixels, unpack
from runners.batcher import LaneBatcher, Overloaded
from runners.clip import load_clip_encoder
from runners.clip_wire import SHORT_LANE_PROMPTS
from runners.device import configure_threads, encoder_lanes, service_workers
from runners.heap import freeze_startup_heap
from runners.serving import RUNNER_CONNECTION, TRAFFIC, bento_model, service_settings
from settings import LimitedLog, configure_logging

log = logging.getLogger(__name__)

# The one read of settings at import: decorator arguments (the text encoder's batch size and latency bound) and the
# model reference are fixed when the class is defined. Everything else is read in the constructors.
_S = service_settings()
# ZSS_CLIP_MODEL=bentoml:NAME[:VERSION] (environment or bento argument): both encoders declare that stored model, so
# `bentoml build` packs it into the bento and a served bento finds it there. Files, names and tags declare nothing.
_CLIP_MODEL = bento_model("ZSS_CLIP_MODEL", _S.clip_model)

IMAGES_ENCODED = Counter("zss_images_encoded", "Images encoded by the CLIP image tower")
IMAGES_SHED = Counter("zss_images_shed", "Images refused (503) because they could not be answered within the bound")
# CPU time of the image tower's forward passes, to tell the model's cost from serving's: the lane threads' own time,
# which is all of it with 1 torch thread per lane (the CPU default with <= 3 cores); with more, helper threads' time
# is not counted.
IMAGE_FORWARD_CPU = Counter("zss_image_forward_cpu_seconds", "CPU seconds spent in image-tower forward passes")
PROMPTS_ENCODED = Counter("zss_text_prompts_encoded", "Prompts encoded by the CLIP text tower (templates expanded)")
SHORT_LANE = Counter("zss_text_short_lane_prompts", "Prompts encoded in the text encoder's short lane (encode_now)")

# Our own record of the batches the encoders run (BentoML's histogram stops after its warm-up phase).
IMAGE_BATCH = Histogram(
    "zss_image_batch_size", "Images per image-encoder call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
IMAGE_BATCH_SECONDS = Histogram(
    "zss_image_batch_seconds",
    "Wall time of an image-encoder forward pass (a batch): the 'one batch' of the latency bound",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
)
TEXT_BATCH = Histogram(
    "zss_text_batch_size", "Prompts per text-encoder call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)


class BadPixels(bentoml.exceptions.InvalidArgument):
    """A pixel batch that is not uint8 [N, H, W, 3] at the model's input size (400, before it can join a batch)."""


# Batch sizes each lane of the image encoder runs once before it reports ready.
WARM_UP_SIZES = (1, 8)


@bentoml.service(
    name="clip_image_encoder",
    # One process: its lanes share one queue (runners/batcher.py). More workers would each batch on their own;
    # BENTOML_CONFIG_OPTIONS="services.clip_image_encoder.workers=N" still works; lanes and threads share the quota.
    workers=1,
    threads=4,
    traffic=TRAFFIC,
    runner_connection=RUNNER_CONNECTION,
)
class ClipImageEncoder:
    if _CLIP_MODEL is not None:
        clip_model = _CLIP_MODEL

    def __init__(self) -> None:
        settings = service_settings()
        configure_logging(settings)
        workers = service_workers("clip_image_encoder", 1)
        lanes = encoder_lanes(settings.device, settings.image_lanes, workers)
        self.threads = configure_threads(settings.torch_threads, share=workers * lanes)
        self.encoder = load_clip_encoder(settings, towers="image", lanes=lanes)
        self.size = tuple(self.encoder.preprocess.size)
        # Not BentoML's adaptive batching: its per-worker queues hand a free worker batches of 1-2 images under load
        # on a CPU (BENCHMARKS.md, P1). Created here; its dispatcher starts on the first request, in the server's loop.
        self.shed_log = LimitedLog(log)
        # ZSS_DEVICE_DECODE's JPEG decoding, off the event loop and off the lanes (torch releases the GIL in both).
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="clip-decode")
        self.batcher = LaneBatcher(
            self._forward,
            lanes=lanes,
            max_batch=settings.image_max_batch_size,
            max_hold_s=settings.image_batch_hold_ms / 1000,
            max_wait_s=settings.image_max_latency_ms / 1000,
            name="clip-image",
        )
        # Each lane runs the tower before ready (issue 29: full speed from the first request).
        zeros = np.zeros((WARM_UP_SIZES[-1], *self.size, 3), np.uint8)
        warm_s = self.batcher.warm_up(zeros, WARM_UP_SIZES, fn=self.encoder.encode_pixels)
        log.info(
            "image encoder %s ready (%d lanes x %d torch threads, 1 of %d workers) on %s %s, warmed up in %.1f s",
            self.encoder.model_id,
            lanes,
            self.threads,
            workers,
            self.encoder.backend,
            self.encoder.precision,
            warm_s,
        )
        freeze_startup_heap()  # full collections under load stopped a lane for 0.3-0.5 s (runners/heap.py)

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        t0, w0 = time.thread_time(), time.perf_counter()
        out = self.encoder.encode_pixels(pixels)
        IMAGE_FORWARD_CPU.inc(time.thread_time() - t0)
        IMAGE_BATCH_SECONDS.observe(time.perf_counter() - w0)
        IMAGES_ENCODED.inc(len(out))
        IMAGE_BATCH.observe(len(out))
        return out

    def _check(self, pixels: np.ndarray) -> np.ndarray:
        # One malformed request must not fail the other requests of the batch it would join.
        h, w = self.size
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape[1:] != (h, w, 3):
            got = f"{pixels.dtype} {tuple(pixels.shape)}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise BadPixels(f"expected uint8 [N, {h}, {w}, 3] pixels, got {got}")
        return pixels

    @bentoml.api
    async def encode_pixels(self, pixels: np.ndarray, spent_s: float = 0.0, ctx=None) -> np.ndarray:  # noqa: ANN001
        """uint8 [N, H, W, 3] at the model's input size -> L2-normalised float32 [N, D]. ``spent_s``: how long the
        request already took in the API; it counts towards the latency bound (ZSS_IMAGE_MAX_LATENCY_MS).

        A request that cannot be answered in time gets a 503 set on the response rather than raised: BentoML logs
        every exception an API raises at ERROR with a traceback, and shedding under overload is expected (``ctx`` is
        BentoML's request context; it stays unannotated so that BentoML recognises it by name). An in-process call
        (no context) gets ``ServiceUnavailable`` raised.
        """
        return await self._encode(self._check(pixels), spent_s, ctx)

    @bentoml.api
    async def encode_jpegs(
        self,
        blob: np.ndarray,
        ends: np.ndarray,
        spent_s: float = 0.0,
        ctx=None,  # noqa: ANN001
    ) -> np.ndarray:
        """JPEG files (``imaging.device_decode.pack``: their bytes end to end, and where each ends) -> the vectors of
        ``encode_pixels``, decoded and resized on this encoder's device (ZSS_DEVICE_DECODE). A JPEG the device cannot
        decode answers ``UNDECODABLE`` for the whole request: the API then decodes them on its CPU path."""
        t0 = time.monotonic()
        try:
            pixels = await asyncio.get_running_loop().run_in_executor(self._decoder, self._decode, blob, ends)
        except (RuntimeError, ValueError) as exc:
            if ctx is None:
                raise bentoml.exceptions.InvalidArgument(f"undecodable JPEG: {exc}") from exc
            ctx.response.status_code = UNDECODABLE
            return PlainTextResponse(f"undecodable JPEG: {exc}", status_code=UNDECODABLE)  # type: ignore[return-value]
        return await self._encode(pixels, spent_s + time.monotonic() - t0, ctx)

    def _decode(self, blob: np.ndarray, ends: np.ndarray) -> np.ndarray:
        encoded = unpack(blob, ends)
        return decode_to_pixels(encoded, self.encoder.preprocess, self.encoder.device).cpu().numpy()

    async def _encode(self, pixels: np.ndarray, spent_s: float, ctx: Any) -> np.ndarray:
        try:
            return await self.batcher.submit(pixels, spent_s)
        except Overloaded as exc:
            IMAGES_SHED.inc(len(pixels))
            self.shed_log.warning("image encoder overloaded: a request was shed (%s)", exc)
            if ctx is None:
                raise bentoml.exceptions.ServiceUnavailable(f"image encoder overloaded: {exc}") from exc
            ctx.response.status_code = 503  # BentoML copies the context's status onto whatever the API returns
            return PlainTextResponse(f"image encoder overloaded: {exc}", status_code=503)  # type: ignore[return-value]

    @bentoml.api
    def info(self) -> dict[str, Any]:
        return self.encoder.info


@bentoml.service(name="clip_text_encoder", workers=1, threads=4, traffic=TRAFFIC, runner_connection=RUNNER_CONNECTION)
class ClipTextEncoder:
    """Two lanes: ``encode`` (BentoML's adaptive batching, for the chunks of deploys) and ``encode_now`` (a few
    prompts at once, beside the batches; the service's 4 threads run both)."""

    if _CLIP_MODEL is not None:
        clip_model = _CLIP_MODEL

    def __init__(self) -> None:
        settings = service_settings()
        configure_logging(settings)
        self.threads = configure_threads(settings.torch_threads)
        self.encoder = load_clip_encoder(settings, towers="text")
        # One worker with the whole quota: text encoding comes in bursts (deploys), idle otherwise.
        log.info(
            "text encoder %s ready (%d threads) on %s", self.encoder.model_id, self.threads, self.encoder.text_backend
        )
        freeze_startup_heap()

    @bentoml.api(
        batchable=True, batch_dim=0, max_batch_size=_S.text_max_batch_size, max_latency_ms=_S.text_max_latency_ms
    )
    def encode(self, texts: list[str]) -> np.ndarray:
        """Prompts (templates already applied by the caller) -> L2-normalised float32 [N, D]."""
        out = self.encoder.encode_texts(texts)
        if texts:  # empty batches only train BentoML's dispatcher (engine/encoders.py)
            PROMPTS_ENCODED.inc(len(texts))
            TEXT_BATCH.observe(len(texts))
        return out

    @bentoml.api
    def encode_now(self, texts: list[str]) -> np.ndarray:
        """The short lane (issue 18): a few prompts (an /embed_text, a small deploy) encoded at once on a thread of
        their own, not queued behind the chunks of a long deploy in ``encode``'s batches."""
        if len(texts) > SHORT_LANE_PROMPTS:
            raise bentoml.exceptions.InvalidArgument(f"at most {SHORT_LANE_PROMPTS} prompts in the short lane")
        out = self.encoder.encode_texts(texts)
        PROMPTS_ENCODED.inc(len(texts))
        SHORT_LANE.inc(len(texts))
        return out

    @bentoml.api
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the text tower reads them (the OpenAI route's ``usage``)."""
        return self.encoder.count_tokens(texts)

    @bentoml.api
    def info(self) -> dict[str, Any]:
        return self.encoder.info
