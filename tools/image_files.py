"""Image files for the folder tool: listing (folders, list files, fsspec URLs) and loading them into the model's input
pixels exactly as the service does. Light on purpose (no model code): Ray's decoding tasks import it
(``decode_batch``), and a worker that imports less starts sooner.

What can be read: local paths, and any URL fsspec has a backend for on every machine that reads it (``file://``,
``http(s)://`` with aiohttp; ``s3://`` needs s3fs, ``gs://`` gcsfs, ``abfs://`` adlfs: install them yourself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imaging.decode import ImageInputError, decode_image
from imaging.preprocess import Preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".ppm"}


@dataclass
class Loaded:
    path: str
    pixels: np.ndarray | None
    error: str | None


def list_images(folder: Path) -> list[Path]:
    """Every file with an image suffix below ``folder``, sorted (so runs and resumes are reproducible)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_url(location: str) -> bool:
    """``s3://bucket/a.jpg``, ``gs://...``, ``file:///...``: read through fsspec (its backends: s3fs, gcsfs, ...)."""
    return "://" in location


def list_inputs(source: str) -> list[str]:
    """The images of ``source``: a folder (recursive), a list file (one path or URL a line; blank and ``#`` lines
    skipped), or an fsspec URL of a folder (``s3://bucket/photos/``: every image below it). Sorted, except a list
    file's order, which is kept."""
    if is_url(source):
        import fsspec

        fs, root = fsspec.core.url_to_fs(source)
        found = [p for p in fs.find(root) if Path(p).suffix.lower() in IMAGE_SUFFIXES]
        return sorted(fs.unstrip_protocol(p) for p in found)
    path = Path(source)
    if path.is_file():
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        return list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not path.is_dir():
        raise SystemExit(f"{source}: no such folder or list file")
    return [str(p) for p in list_images(path)]


def read_bytes(location: str) -> bytes:
    if is_url(location):
        import fsspec

        with fsspec.open(location, "rb") as fh:
            return fh.read()
    return Path(location).read_bytes()


def load_pixels(location: str, preprocess: Preprocess, max_pixels: int, path: str | None = None) -> Loaded:
    """One file -> the model's input pixels, decoded and resized exactly as the service does (imaging/), or the
    reason it is unreadable. Both the in-process mode and the Ray tasks (tools/ray_jobs.py) load through here."""
    shown = location if path is None else path
    try:
        img = decode_image(read_bytes(location), max_pixels=max_pixels, draft_size=preprocess.draft_size)
        return Loaded(shown, preprocess.to_pixels(img), None)
    except ImageInputError as exc:
        return Loaded(shown, None, exc.message)
    except Exception as exc:  # noqa: BLE001 - one bad file (unreadable, odd mode, vanished) never stops the run
        return Loaded(shown, None, f"{type(exc).__name__}: {exc}")


def decode_batch(batch: dict[str, np.ndarray], preprocess: Preprocess, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data task (tools/ray_jobs.py): files -> the model's input pixels, zeros and the reason for an unreadable
    file ("" when readable)."""
    n = len(batch["path"])
    pixels = np.zeros((n, *preprocess.size, 3), np.uint8)
    errors = np.empty(n, dtype=object)
    for i, (path, location) in enumerate(zip(batch["path"], batch["location"])):
        item = load_pixels(str(location), preprocess, max_pixels, path=str(path))
        errors[i] = "" if item.error is None else item.error
        if item.pixels is not None:
            pixels[i] = item.pixels
    return {"path": batch["path"], "error": errors, "pixels": pixels}
