"""The encoder interface the engine depends on, with an in-process and a remote implementation.

- ``Local*``: the models in this process (the folder tool, benchmarks, tests with fake models).
- ``Remote*``: BentoML dependency clients of the encoder services (runners/*_service.py). The engine never imports
  BentoML: a remote encoder only needs the handle's methods (``handle.info()``, ``handle.to_async.encode_pixels``).
  The remote implementations own the retry of transient connection failures.

Text encoding is synchronous (the engine calls it from worker threads while it holds the embedding cache's flow);
image encoding is awaitable (many requests wait on one batching encoder at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import aiohttp
import anyio.to_thread
import numpy as np
from PIL import Image

from engine.kinds import BoxEncoding
from errors import Unavailable
from imaging import device_decode
from runners.clip_wire import SHORT_LANE_PROMPTS
from runners.owl_wire import unpack

log = logging.getLogger(__name__)

T = TypeVar("T")

# BentoML's adaptive-batching dispatcher (1.4) trains itself on a process's first requests: after 9 batches of one
# request it holds the 10th until 2 requests are queued and the 11th until 3 are, for up to (2k + 1) * a + b, and its
# fit counts requests, not items. A deploy sends its 512-prompt chunks one at a time, so its 10th and 11th chunks
# waited about 7 s and 9 s on top of their own 4-5 s (BENCHMARKS.md, issue 29). Trained on empty requests, a and b
# are milliseconds. 12: the 11 training requests and one more.
DISPATCHER_TRAINING_REQUESTS = 12


class ImageEncoder(Protocol):
    def info(self) -> dict[str, Any]:
        """``model_id``, ``dim`` and ``preprocess`` (open_clip's preprocess_cfg form)."""
        ...

    async def encode_pixels(self, pixels: np.ndarray, spent_s: float = 0.0) -> np.ndarray:
        """uint8 [N, H, W, 3] at the model's input size -> L2-normalised float32 [N, D]; ``spent_s`` (time the request
        already took) counts towards the encoder's latency bound."""
        ...

    async def encode_jpegs(self, jpegs: list[bytes], spent_s: float = 0.0) -> np.ndarray | None:
        """JPEG files -> the same vectors, decoded and resized on the encoder's device (ZSS_DEVICE_DECODE); None when
        the device could not decode one of them (the caller then decodes them itself)."""
        ...


class TextEncoder(Protocol):
    def info(self) -> dict[str, Any]: ...

    def encode(self, prompts: list[str]) -> np.ndarray:
        """Prompts (templates already applied) -> L2-normalised float32 [N, D]."""
        ...

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt as the text tower reads them (its tokenizer, cut at its context)."""
        ...


class DetectorEncoder(Protocol):
    def info(self) -> dict[str, Any]:
        """``enabled`` (and ``error`` when not), ``model_id``, ``input_size``, ``embed_dim``."""
        ...

    async def encode_images(self, images: list[Image.Image]) -> list[BoxEncoding]: ...

    def encode_texts(self, prompts: list[str]) -> np.ndarray: ...


# -- in-process -------------------------------------------------------------------------------------------------------
class LocalClip:
    """Both CLIP towers of an in-process ``runners.clip.ClipEncoder`` (or anything with its three members)."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def info(self) -> dict[str, Any]:
        return dict(self.encoder.info)

    async def encode_pixels(self, pixels: np.ndarray, spent_s: float = 0.0) -> np.ndarray:
        return await anyio.to_thread.run_sync(self.encoder.encode_pixels, pixels)

    async def encode_jpegs(self, jpegs: list[bytes], spent_s: float = 0.0) -> np.ndarray | None:
        enc = self.encoder

        def run() -> np.ndarray | None:
            try:
                encoded = device_decode.unpack(*device_decode.pack(jpegs))
                pixels = device_decode.decode_to_pixels(encoded, enc.preprocess, enc.device)
            except (RuntimeError, ValueError):  # torchvision's refusal of a JPEG
                return None
            return enc.encode_pixels(pixels.cpu().numpy())

        return await anyio.to_thread.run_sync(run)

    def encode(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode_texts(prompts), dtype=np.float32)

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return list(self.encoder.count_tokens(prompts))


class LocalDetector:
    """An in-process ``runners.owl.OwlDetector``, or ``None`` for a server without a detector."""

    def __init__(self, detector: Any | None, error: str = "the detector is disabled on this server") -> None:
        self.detector = detector
        self.error = error

    def info(self) -> dict[str, Any]:
        d = self.detector
        if d is None:
            return {"enabled": False, "error": self.error}
        return {"enabled": True, "model_id": d.model_id, "input_size": d.input_size, "embed_dim": d.embed_dim}

    async def encode_images(self, images: list[Image.Image]) -> list[BoxEncoding]:
        encs = await anyio.to_thread.run_sync(self.detector.encode_images, images)  # type: ignore[union-attr]
        return [box_encoding(e) for e in encs]

    def encode_texts(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(self.detector.encode_texts(prompts), dtype=np.float32)  # type: ignore[union-attr]


def box_encoding(e: dict[str, np.ndarray]) -> BoxEncoding:
    return BoxEncoding(e["boxes"], e["class_embeds"], e["logit_shift"], e["logit_scale"])


# -- remote (BentoML dependency clients) ------------------------------------------------------------------------------
# BentoML 1.4.39's dependency client closed its aiohttp session every 100 requests with requests in flight on it
# (runners/serving.py keeps it from doing so); encoder calls are idempotent, so a connection failure is retried.
TRANSIENT: tuple[type[BaseException], ...] = (aiohttp.ClientConnectionError,)
ATTEMPTS = 3
UNREACHABLE = "The encoder could not be reached; retry later."


async def call_async(method: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await method(*args)``, retrying transient connection failures; 503 if they persist."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await method(*args)
        except TRANSIENT as exc:
            if attempt == ATTEMPTS:
                raise Unavailable(UNREACHABLE) from exc
            log.warning("encoder call failed (%s: %s); retry %d", type(exc).__name__, exc, attempt)
            await asyncio.sleep(0.05 * attempt)
    raise Unavailable(UNREACHABLE)


def call_sync(method: Callable[..., T], *args: Any) -> T:
    """The same for the blocking client (called from worker threads)."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return method(*args)
        except TRANSIENT as exc:
            if attempt == ATTEMPTS:
                raise Unavailable(UNREACHABLE) from exc
            log.warning("encoder call failed (%s: %s); retry %d", type(exc).__name__, exc, attempt)
            time.sleep(0.05 * attempt)
    raise Unavailable(UNREACHABLE)


class _Remote:
    """A BentoML dependency handle of one encoder service; every encoder service answers ``info``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def info(self) -> dict[str, Any]:
        return call_sync(self.handle.info)


class RemoteClipImage(_Remote):
    async def encode_pixels(self, pixels: np.ndarray, spent_s: float = 0.0) -> np.ndarray:
        out = await call_async(lambda: self.handle.to_async.encode_pixels(pixels, spent_s=spent_s))
        return np.asarray(out, dtype=np.float32)

    async def encode_jpegs(self, jpegs: list[bytes], spent_s: float = 0.0) -> np.ndarray | None:
        blob, ends = device_decode.pack(jpegs)
        try:
            out = await call_async(lambda: self.handle.to_async.encode_jpegs(blob, ends, spent_s=spent_s))
        except Exception as exc:
            # The device refused a JPEG (not an error: the caller decodes it itself).
            code = getattr(exc, "error_code", None)  # BentoML's client errors carry the status (an HTTPStatus)
            if isinstance(code, int) and int(code) == device_decode.UNDECODABLE:
                return None
            raise
        return np.asarray(out, dtype=np.float32)


class RemoteClipText(_Remote):
    def encode(self, prompts: list[str]) -> np.ndarray:
        method = self.handle.encode_now if len(prompts) <= SHORT_LANE_PROMPTS else self.handle.encode
        return np.asarray(call_sync(method, prompts), dtype=np.float32)

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [int(n) for n in call_sync(self.handle.count_tokens, prompts)]

    async def train_batching(self, requests: int = DISPATCHER_TRAINING_REQUESTS) -> None:
        """Send ``encode``'s batching ``requests`` empty requests, one after another (no prompt is encoded), so that
        a deploy's chunks never meet its training waits. Not through ``call_async``: it runs while the encoder starts,
        and its caller retries the whole sequence (empty requests are harmless). Async, on the event loop: BentoML's
        blocking client only works from AnyIO's worker threads."""
        for _ in range(requests):
            out = np.asarray(await self.handle.to_async.encode([]))
            if out.size:
                raise RuntimeError(f"an empty request to the text encoder answered {out.shape}")


class RemoteDetector(_Remote):
    async def encode_images(self, images: list[Image.Image]) -> list[BoxEncoding]:
        packed = np.asarray(await call_async(self.handle.to_async.encode_images, images), dtype=np.float32)
        return [box_encoding(unpack(one)) for one in packed]

    def encode_texts(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(call_sync(self.handle.encode_texts, prompts), dtype=np.float32)
