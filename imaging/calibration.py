"""Images that calibrate a statically quantised image tower (ZSS_CLIP_QUANTIZE=int8 on OpenVINO, runners/backends.py).

Static int8 fixes each activation's range once, from what the tower computes on these images, so they should look
like what the service will see: ``ZSS_CLIP_INT8_CALIBRATION`` names a folder of the user's own images (the first
``count`` by name). Without one, a built-in synthetic set stands in: photo-like scenes (smooth lighting, objects of
every colour and size, edges, texture, sensor noise) drawn from a fixed seed, so every machine builds the same export.
The digest names the set in the export's key and, for a user's folder, in the model id: other calibration images give
other vectors, which never share a cache entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from imaging.decode import ImageInputError, decode_image
from imaging.preprocess import Preprocess

# Bump when the synthetic set changes: its exports are then rebuilt.
SYNTHETIC_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 64_000_000


def synthetic_scene(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
    """One photo-like scene: a lit background gradient, 3-12 objects, a blur, texture and noise."""
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    a, b = rng.random((1, 1, 3)), rng.random((1, 1, 3))
    light = 0.5 + 0.5 * np.cos(rng.uniform(1, 6) * x + rng.uniform(1, 6) * y + rng.uniform(0, 6))
    base = 255 * (a * light + b * (1 - light))
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 13))):
        w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.05, 0.6) * height
        x0, y0 = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (x0, y0, x0 + w, y0 + h)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 2.5))))
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, rng.uniform(1.0, 12.0), arr.shape)  # sensor noise and texture
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class CalibrationSet:
    """The images' digest (what keys the export) and a way to get their pixels, uint8 [N, H, W, 3] at the model's
    input size, called only when an export is built: a start that reuses its export draws no synthetic image."""

    digest: str
    pixels: Callable[[], np.ndarray]


def calibration_set(preprocess: Preprocess, directory: Path | None, count: int = 32) -> CalibrationSet:
    """The first ``count`` images (by name) of ``directory``, read now (their digest covers only the images that
    decode), or the synthetic set when it is None, drawn when asked for. ValueError naming the setting when the folder
    holds none."""
    if directory is None:

        def synthetic() -> np.ndarray:
            rng = np.random.default_rng(20261202)
            return np.stack([preprocess.to_pixels(synthetic_scene(rng)) for _ in range(count)])

        return CalibrationSet(hashlib.sha256(f"synthetic-v{SYNTHETIC_VERSION}-{count}".encode()).hexdigest(), synthetic)
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"ZSS_CLIP_INT8_CALIBRATION={directory} is not a folder of images")
    h = hashlib.sha256()
    rows = []
    for path in sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        data = path.read_bytes()
        try:
            img = decode_image(data, max_pixels=MAX_PIXELS, draft_size=preprocess.draft_size)
        except ImageInputError:
            continue  # not an image after all: calibrate on the others
        h.update(hashlib.sha256(data).digest())
        rows.append(preprocess.to_pixels(img))
        if len(rows) == count:
            break
    if not rows:
        raise ValueError(f"ZSS_CLIP_INT8_CALIBRATION={directory} holds no image this service can read")
    pixels = np.stack(rows)
    return CalibrationSet(h.hexdigest(), lambda: pixels)
