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


def photo_jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB", exif_orientation: int | None = None) -> bytes:
    """A smooth, photo-like JPEG (gradients and a few shapes: what resizing a real photo meets)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    arr = 255 * (0.5 + 0.5 * np.sin(9 * x * rng.random((1, 1, 3)) + 7 * y + rng.random((1, 1, 3)) * 6))
    arr[height // 4 : height // 2, width // 3 : width // 2] = rng.integers(0, 256, 3)
    img = Image.fromarray(np.broadcast_to(arr, (height, width, 3)).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation  # EXIF Orientation
    img.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()
