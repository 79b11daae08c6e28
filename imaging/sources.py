"""Images as clients send them (uploaded bytes, base64 text, a URL) and how each becomes a decoded RGB image.

The API parses a request into :class:`ImageSource` values without touching pixels; the engine loads them in a
worker thread with :func:`load_image`, under the server's limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

from errors import ZssError
from imaging.decode import base64_bytes, decode_base64_image, decode_image
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


def load_image(src: ImageSource, limits: ImageLimits, draft: int = 0) -> Image.Image:
    """Decode (or fetch, then decode) one image; refusals raise :class:`~errors.ZssError` with the right status."""
    if src.kind == "bytes":
        return decode_image(bytes(src.value), max_pixels=limits.max_pixels, draft_size=draft)  # type: ignore[arg-type]
    if src.kind == "base64":
        return decode_base64_image(
            str(src.value), max_pixels=limits.max_pixels, draft_size=draft, max_bytes=limits.max_bytes
        )
    return decode_image(source_bytes(src, limits), max_pixels=limits.max_pixels, draft_size=draft)


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
