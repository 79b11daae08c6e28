"""Image factories for tests and benchmarks: random-pixel JPEG and PNG bytes, reproducible by seed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 48), quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encode_png(img: Image.Image) -> bytes:
    """A PIL image as PNG bytes (lossless: what a test draws is what the server decodes)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
