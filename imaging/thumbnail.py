"""A collection item's thumbnail (README "Collections"): the decoded image, its longer side shrunk to at most ``side``
pixels, as a small JPEG (a few kilobytes), made at add time from the image already decoded for the encoder."""

from __future__ import annotations

import io

from PIL import Image

QUALITY = 80


def thumbnail(img: Image.Image, side: int) -> bytes:
    """JPEG bytes of ``img`` (RGB) with its longer side at most ``side`` (never enlarged); the caller's image is left
    as it is."""
    small = img.convert("RGB") if img.mode != "RGB" else img.copy()
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=QUALITY, optimize=True)
    return buf.getvalue()
