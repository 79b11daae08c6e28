"""Decode untrusted image bytes into RGB ``PIL.Image`` objects, refusing bad input with an HTTP-ready status.

Everything a client sends goes through :func:`decode_image` (or :func:`decode_base64_image`), so this is the one place
that guards against decompression bombs, truncated files and odd pixel modes. Errors are :class:`ImageInputError`
carrying the HTTP status the service should answer with (413 too large, 422 not a usable image).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re

import numpy as np
from PIL import Image, ImageOps

from errors import ZssError
from imaging.budget import PixelBudget

INVALID_IMAGE_MESSAGE = "Invalid image received, unable to open."

# Mid-grey: transparent pixels become a neutral colour instead of black or white, which would bias CLIP.
FLATTEN_BACKGROUND = (128, 128, 128)

# Formats Pillow may try. Restricting the list keeps risky or exotic decoders (EPS runs Ghostscript, JPEG 2000,
# PSD, FITS, ...) away from untrusted bytes; ICO is out because an icon's embedded PNG is decoded without a size
# check. MPO (multi-picture JPEGs from phones) is opened by the JPEG plugin.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "PPM")

_DATA_URI = re.compile(r"^data:(?P<type>[^,;]*)(?P<params>(;[^,;]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_ORIENTATION = 0x0112  # EXIF tag
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageInputError(ZssError):
    """A client sent an image we refuse; ``status_code`` is the HTTP status to answer with, ``message`` the text."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message, status_code)


def _too_large(width: int, height: int, max_pixels: int) -> ImageInputError:
    return ImageInputError(
        f"Image too large: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels.",
        413,
    )


def _bomb(exc: Exception, max_pixels: int) -> ImageInputError:
    # Pillow's message carries the pixel count but not the dimensions: "Image size (N pixels) exceeds limit ...".
    found = _PIL_BOMB_PIXELS.search(str(exc))
    size = f"{found.group(1)} pixels" if found else "the image"
    return ImageInputError(f"Image too large: {size} exceeds the limit of {max_pixels} pixels.", 413)


def _open_formats() -> list[str]:
    # Image.open raises KeyError for a format name this Pillow build does not have (AVIF is optional), so filter.
    Image.init()
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]


def decode_image(
    data: bytes, *, max_pixels: int, draft_size: int | None = None, budget: PixelBudget | None = None
) -> Image.Image:
    """Decode ``data`` into an upright RGB image (first frame of animations, alpha flattened onto mid-grey).

    ``max_pixels`` bounds the pixel count declared in the header; larger images are refused with 413 before any pixel
    is decoded. ``draft_size`` lets JPEGs decode at a reduced DCT scale whose both sides stay >= ``draft_size``
    (a JPEG larger than ``max_pixels`` is still refused: the limit is a property of the input, not of the decoder).
    ``budget`` (imaging/budget.py): the pixels to decode are held from it while they are decoded and converted.
    """
    if not data:
        raise ImageInputError(INVALID_IMAGE_MESSAGE, 422)
    with contextlib.ExitStack() as held:
        # Pillow's WebP decoder allocates its whole canvas when the file is opened (a 62 MP WebP: 250 MB at once), so
        # a WebP's size is read from its header and checked, and its pixels held, before it is opened.
        early = webp_size(data)
        if early is not None:
            if early[0] * early[1] > max_pixels:
                raise _too_large(early[0], early[1], max_pixels)
            if budget is not None:
                held.enter_context(budget.hold(early[0] * early[1]))
        return _decode(data, max_pixels, draft_size, budget if early is None else None, held)


def webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a WebP file's header (simple lossy, lossless or extended), None for anything else."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _decode(
    data: bytes, max_pixels: int, draft_size: int | None, budget: PixelBudget | None, held: contextlib.ExitStack
) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=_open_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (MAX_IMAGE_PIXELS) fired inside open(); the warning class only arrives here as an
        # exception when warnings are configured as errors.
        raise _bomb(exc, max_pixels) from exc
    except Exception as exc:  # Pillow plugins raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageInputError(INVALID_IMAGE_MESSAGE, 422) from exc

    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageInputError(INVALID_IMAGE_MESSAGE, 422)
        # Image.open only parsed the header; refuse by declared size before allocating or decoding anything.
        if width * height > max_pixels:
            raise _too_large(width, height, max_pixels)
        if draft_size is not None and draft_size > 0 and img.format in ("JPEG", "MPO"):
            # A square request makes EXIF rotation (which swaps width and height later) irrelevant: both sides of
            # the drafted image are >= draft_size whichever way up it ends.
            img.draft("RGB", (draft_size, draft_size))
        if budget is not None:  # held (in ``held``) until the caller's block ends
            held.enter_context(budget.hold(img.size[0] * img.size[1]))
        try:
            img.load()  # force the full decode so truncated or corrupt data fails here, not later in a worker
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(exc, max_pixels) from exc
        except Exception as exc:
            raise ImageInputError(INVALID_IMAGE_MESSAGE, 422) from exc
        if img.size[0] * img.size[1] > max_pixels:  # belt and braces: a plugin may settle the size on load
            raise _too_large(img.size[0], img.size[1], max_pixels)
        upright = _exif_upright(img)
        try:
            rgb = _to_rgb(upright)
        except Exception as exc:  # an exotic mode Pillow cannot convert
            raise ImageInputError(INVALID_IMAGE_MESSAGE, 422) from exc
        # Closing the opened image invalidates its pixels, so hand back a copy when no step made a new image.
        return rgb.copy() if rgb is img else rgb


def decode_base64_image(
    s: str, *, max_pixels: int, draft_size: int | None = None, max_bytes: int | None = None
) -> Image.Image:
    """Decode plain base64 (standard or URL-safe alphabet, padding optional) or a ``data:...;base64,`` URI.

    ``max_bytes`` (optional) bounds the decoded size: 413 without decoding when the text is obviously too long.
    """
    return decode_image(base64_bytes(s, max_bytes=max_bytes), max_pixels=max_pixels, draft_size=draft_size)


def base64_bytes(s: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes behind plain base64 or a ``data:...;base64,`` URI (the checks of :func:`decode_base64_image`)."""
    if not isinstance(s, str):
        raise ImageInputError("Invalid base64 image data: expected a string.", 422)
    text = s.strip()
    match = _DATA_URI.match(text)
    if match is not None:
        params = [p.strip().lower() for p in match.group("params").split(";") if p.strip()]
        if "base64" not in params:
            raise ImageInputError("Invalid image data URI: only base64-encoded data URIs are supported.", 422)
        text = text[match.end() :]
    elif text[:5].lower() == "data:":
        raise ImageInputError("Invalid image data URI: expected 'data:<type>;base64,<data>'.", 422)
    text = _WHITESPACE.sub("", text)  # MIME-style base64 wraps lines
    if not text:
        raise ImageInputError(INVALID_IMAGE_MESSAGE, 422)
    if max_bytes is not None and len(text) // 4 * 3 > max_bytes + 3:
        raise ImageInputError(
            f"Image too large: about {len(text) // 4 * 3} bytes after base64 decoding exceeds the limit of "
            f"{max_bytes} bytes.",
            413,
        )
    text = text.rstrip("=")
    if len(text) % 4 == 1:  # no amount of padding makes this length valid
        raise ImageInputError("Invalid base64 image data: the length is not valid for base64.", 422)
    padded = text + "=" * (-len(text) % 4)
    try:
        if "-" in padded or "_" in padded:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        else:
            raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(
            "Invalid base64 image data: it contains characters outside the base64 alphabet.", 422
        ) from exc
    if max_bytes is not None and len(raw) > max_bytes:
        raise ImageInputError(f"Image too large: {len(raw)} bytes exceeds the limit of {max_bytes} bytes.", 413)
    return raw


def _exif_upright(img: Image.Image) -> Image.Image:
    """The image turned upright per its EXIF Orientation tag (a new image), or ``img`` itself when upright already."""
    try:
        if img.getexif().get(_ORIENTATION, 1) in (1, None):
            return img  # skip exif_transpose, which would copy the whole image just to change nothing
        out = ImageOps.exif_transpose(img)
    except Exception:
        # Malformed EXIF should not cost the user the image: decode it as stored, like browsers do.
        return img
    return out if out is not None else img


def _flatten(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*FLATTEN_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_l(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Scale a 16/32-bit integer greyscale image to 8 bits (Pillow's own convert clips at 255 instead)."""
    wide = np.asarray(img).astype(np.int64)  # also normalises big-endian I;16B
    # Mode I holds 16-bit PNG/TIFF samples in practice, so both modes are read on the 0..65535 scale.
    grey = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    alpha = None
    trns = img.info.get("transparency")
    if isinstance(trns, int):
        alpha = Image.fromarray(np.where(wide == trns, 0, 255).astype(np.uint8))
    return Image.fromarray(grey), alpha


def _float_to_l(img: Image.Image) -> Image.Image:
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    # Float images come either on a 0..1 scale (scientific/HDR exports) or on the 0..255 scale.
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, flattening transparency onto FLATTEN_BACKGROUND."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        grey, alpha = _sixteen_bit_to_l(img)
        if alpha is not None:
            grey.putalpha(alpha)
            return _flatten(grey.convert("RGBA"))
        return grey.convert("RGB")
    if mode == "F":
        return _float_to_l(img).convert("RGB")
    palette_alpha = mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info or palette_alpha:
        # convert("RGBA") turns palette transparency, tRNS colour keys and premultiplied alpha into plain alpha.
        return _flatten(img.convert("RGBA"))
    if mode == "RGB":
        return img
    # CMYK (Pillow undoes Adobe's inverted CMYK on load), P, L, 1, YCbCr, ... have direct conversions.
    return img.convert("RGB")
