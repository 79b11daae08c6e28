"""CLIP image encoding straight from PIL images, for bench/ and tests only.

The served path never needs it: the API worker preprocesses each image (imaging/) and sends the image encoder uint8
pixels (``ClipEncoder.encode_pixels`` behind runners/clip_service.py). So the encoder carries no preprocessing pool;
this module holds the one that bench/ and the tests use, made on first use (nothing at import). The import contracts
(pyproject.toml: nothing served imports ``testing``) keep it off the served path.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _preprocess_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="clip-pre")
        return _pool


def images_to_pixels(encoder: Any, images: list[Image.Image]) -> np.ndarray:
    """The encoder's preprocessing in a thread pool (PIL releases the GIL while resizing): uint8 [N, H, W, 3]."""
    if not images:
        return np.zeros((0, *encoder.preprocess.size, 3), np.uint8)
    return np.stack(list(_preprocess_pool().map(encoder.preprocess.to_pixels, images)))


def encode_images(encoder: Any, images: list[Image.Image]) -> np.ndarray:
    """RGB PIL images -> L2-normalised float32 [N, D], through ``encoder`` (a ``runners.clip.ClipEncoder``)."""
    return np.asarray(encoder.encode_pixels(images_to_pixels(encoder, list(images))), dtype=np.float32)
