"""Images as clients send them (uploaded bytes, base64 text, a URL) and how each becomes a decoded RGB image.

The API parses a request into :class:`ImageSource` values without touching pixels; the engine loads them in a
worker thread with :func:`load_image`, under the server's limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from errors import ZssError
from imaging.budget import PixelBudget
from imaging.decode import base64_bytes, decode_image
from imaging.fetch import fetch_image_url, parse_allow_hosts


@dataclass(frozen=True)
class ImageSource:
    """One image as the client sent it; ``field`` and ``filename`` are echoed by the photofield routes."""

    kind: Literal["bytes", "base64", "url"]
    value: bytes | str
    field: str = "data"
    filename: str | None = None


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    max_bytes: int
    allow_url_fetch: bool = False
    url_allow_hosts: str = ""  # comma-separated; "" = any public host
    url_allow_networks: str = ""  # comma-separated addresses / CIDRs trusted although not public
    url_timeout_s: float = 10.0
    budget: PixelBudget | None = field(default=None, compare=False)  # pixels decoded at once (imaging/budget.py)


def load_image(src: ImageSource, limits: ImageLimits, draft: int = 0) -> Image.Image:
    """Decode (or fetch, then decode) one image; refusals raise :class:`~errors.ZssError` with the right status."""
    return decode_image(source_bytes(src, limits), max_pixels=limits.max_pixels, draft_size=draft, budget=limits.budget)


def source_bytes(src: ImageSource, limits: ImageLimits) -> bytes:
    """The encoded bytes of one image as sent (base64 decoded, a URL fetched), without decoding pixels."""
    if src.kind == "bytes":
        return bytes(src.value)  # type: ignore[arg-type]
    if src.kind == "base64":
        return base64_bytes(str(src.value), max_bytes=limits.max_bytes)
    if not limits.allow_url_fetch:
        raise ZssError("Image URLs are disabled on this server (set ZSS_ALLOW_URL_FETCH=true to enable).", 400)
    return fetch_image_url(
        str(src.value),
        allow_hosts=parse_allow_hosts(limits.url_allow_hosts),
        timeout_s=limits.url_timeout_s,
        max_bytes=limits.max_bytes,
        allow_networks=limits.url_allow_networks.split(","),
    )
