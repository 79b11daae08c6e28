"""A generated corpus of awkward and hostile image inputs, shared by the decoder tests and the HTTP API tests.

Every builder returns fresh bytes (or bytes plus what decoding them should give); nothing is downloaded.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

GREY = (128, 128, 128)  # imaging.decode.FLATTEN_BACKGROUND

# Upright test picture: four flat quadrants, so JPEG noise stays small and any rotation or flip is unmistakable.
QUADRANTS = ((230, 30, 30), (30, 200, 30), (30, 30, 220), (240, 240, 240))  # TL, TR, BL, BR


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def upright_image(width: int = 64, height: int = 48) -> Image.Image:
    """An RGB image whose quadrant colours tell its orientation (width != height, so a 90° turn shows too)."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    arr[:h2, :w2], arr[:h2, w2:], arr[h2:, :w2], arr[h2:, w2:] = QUADRANTS
    return Image.fromarray(arr, "RGB")


# -- inputs that must be refused with 422 ------------------------------------------------------------------------
def empty() -> bytes:
    return b""


def text_file() -> bytes:
    return b"This is a plain text file, not an image.\nSecond line.\n"


def html_page() -> bytes:
    return b"<!doctype html><html><body><img src='cat.png'></body></html>"


def svg_image() -> bytes:
    """SVG is an image type for browsers but not for Pillow: refused as not decodable."""
    return b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def jpeg(width: int = 64, height: int = 48, quality: int = 90) -> bytes:
    return _save(noise_image(width, height), "JPEG", quality=quality)


def png(width: int = 64, height: int = 48) -> bytes:
    return _save(noise_image(width, height), "PNG")


def truncated_jpeg() -> bytes:
    """A valid header followed by only half of the entropy-coded data."""
    data = jpeg(256, 256)
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    data = png(256, 256)
    return data[: len(data) // 2]


def jpeg_header_only() -> bytes:
    """SOI + APP0 only: Pillow cannot even find a frame header."""
    data = jpeg()
    return data[:20]


def corrupt_png_crc() -> bytes:
    """A PNG whose IHDR CRC is wrong."""
    data = bytearray(png(8, 8))
    data[29] ^= 0xFF  # last byte of the IHDR CRC (8 signature + 4 length + 4 type + 13 data = 29)
    return bytes(data)


def eps_file() -> bytes:
    """An EPS header Pillow's EPS plugin recognises; decoding it would run Ghostscript, so it must be refused."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"


def invalid_inputs() -> dict[str, bytes]:
    """Name -> bytes that must all give 422 ``Invalid image received, unable to open.``"""
    return {
        "empty": empty(),
        "text": text_file(),
        "html": html_page(),
        "svg": svg_image(),
        "truncated_jpeg": truncated_jpeg(),
        "truncated_png": truncated_png(),
        "jpeg_header_only": jpeg_header_only(),
        "corrupt_png_crc": corrupt_png_crc(),
        "eps": eps_file(),
        "nul_bytes": b"\x00" * 1024,
    }


# -- size limits -------------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def huge_header_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny file whose IHDR claims ``width`` x ``height`` 8-bit RGB pixels (a decompression bomb's header).

    The IDAT holds one compressed empty row, so anything that tries to decode it allocates first and fails later.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB), no interlace
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 1024)))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def one_by_one_png(color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    return _save(Image.new("RGB", (1, 1), color), "PNG")


def large_jpeg(width: int = 2000, height: int = 1000) -> bytes:
    return _save(upright_image(width, height), "JPEG", quality=85)


# -- modes and containers that must decode correctly --------------------------------------------------------------
def cmyk_jpeg(cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)) -> tuple[bytes, tuple[int, int, int]]:
    """A CMYK JPEG of one flat colour, and the RGB it should decode to (default: pure red)."""
    c, m, y, k = cmyk
    expected = tuple(round((255 - v) * (255 - k) / 255) for v in (c, m, y))
    return _save(Image.new("CMYK", (32, 32), cmyk), "JPEG", quality=95), expected  # type: ignore[return-value]


def png_16bit_grey() -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale PNG spanning 0..65535 and the 8-bit values it should scale to (not clip to)."""
    values = np.array([0, 257, 4096, 32768, 40000, 65535], dtype=np.uint16)
    arr = np.tile(values, (4, 1))
    data = _save(Image.fromarray(arr), "PNG")
    return data, np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)


def png_16bit_rgb() -> tuple[bytes, np.ndarray]:
    """A 16-bit-per-channel RGB PNG built by hand (Pillow cannot write one) and its expected 8-bit RGB."""
    w, h = 4, 2
    rgb16 = np.zeros((h, w, 3), dtype=np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 1] = np.array([0, 21845, 43690, 65535], dtype=np.uint16)
    rgb16[..., 2] = 32896  # 128 * 257
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )
    return data, np.rint(rgb16.astype(np.float64) / 257.0).astype(np.uint8)


def palette_png_transparent() -> tuple[bytes, np.ndarray]:
    """A palette PNG, left half fully transparent (tRNS), right half opaque red; expected RGB after flattening."""
    img = Image.new("P", (8, 4), 0)
    img.putpalette([0, 0, 255] + [255, 0, 0] + [0, 0, 0] * 254)
    img.paste(1, (4, 0, 8, 4))
    data = _save(img, "PNG", transparency=0)
    expected = np.zeros((4, 8, 3), dtype=np.uint8)
    expected[:, :4] = GREY
    expected[:, 4:] = (255, 0, 0)
    return data, expected


def rgba_png() -> tuple[bytes, np.ndarray]:
    """RGBA: transparent, half-transparent white and opaque green columns; expected RGB on the grey background."""
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[:, 0] = (255, 0, 0, 0)
    arr[:, 1] = (255, 255, 255, 128)
    arr[:, 2] = (0, 255, 0, 255)
    expected = np.zeros((2, 3, 3), dtype=np.uint8)
    expected[:, 0] = GREY
    expected[:, 1] = round((255 * 128 + 128 * 127) / 255)
    expected[:, 2] = (0, 255, 0)
    return _save(Image.fromarray(arr, "RGBA"), "PNG"), expected


def la_png() -> tuple[bytes, np.ndarray]:
    """Greyscale + alpha: transparent white left, opaque black right."""
    arr = np.zeros((2, 2, 2), dtype=np.uint8)
    arr[:, 0] = (255, 0)
    arr[:, 1] = (0, 255)
    expected = np.zeros((2, 2, 3), dtype=np.uint8)
    expected[:, 0] = GREY
    return _save(Image.fromarray(arr, "LA"), "PNG"), expected


def bilevel_png() -> tuple[bytes, np.ndarray]:
    img = Image.new("1", (4, 2), 0)
    img.paste(1, (2, 0, 4, 2))
    expected = np.zeros((2, 4, 3), dtype=np.uint8)
    expected[:, 2:] = 255
    return _save(img, "PNG"), expected


def grey_jpeg() -> bytes:
    return _save(Image.new("L", (16, 16), 100), "JPEG", quality=95)


def float_tiff() -> tuple[bytes, np.ndarray]:
    """A 32-bit float greyscale TIFF on the 0..1 scale, and its expected 8-bit RGB."""
    arr = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    expected = np.repeat(np.rint(arr * 255).astype(np.uint8)[..., None], 3, axis=2)
    return _save(Image.fromarray(arr, "F"), "TIFF"), expected


# EXIF orientation -> the PIL transpose that turns an upright image into what the camera stored.
_STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # displayed by turning 90° clockwise, so stored turned 90° anticlockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_rotated(
    orientation: int = 6, fmt: str = "JPEG", width: int = 64, height: int = 48
) -> tuple[bytes, Image.Image]:
    """(file whose stored pixels are turned and whose EXIF Orientation says how to undo it, the upright image).

    ``fmt="PNG"`` stores the EXIF in an eXIf chunk, so the decoded image can be compared losslessly.
    """
    upright = upright_image(width, height)
    stored = upright.transpose(_STORE_FOR_ORIENTATION[orientation]) if orientation != 1 else upright.copy()
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    kw: dict[str, object] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        kw["quality"] = 95
        kw["subsampling"] = 0  # 4:4:4 keeps colour edges sharp, so the comparison tolerance can stay tight
    return _save(stored, fmt, **kw), upright


def exif_rotated_jpeg(orientation: int = 6, width: int = 64, height: int = 48) -> tuple[bytes, Image.Image]:
    return exif_rotated(orientation, "JPEG", width, height)


def animated_gif() -> tuple[bytes, tuple[int, int, int]]:
    """Three frames of different flat colours; decoding must give the first (red)."""
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return data, (255, 0, 0)


def animated_webp() -> tuple[bytes, tuple[int, int, int]]:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    return data, (255, 0, 0)


def webp() -> tuple[bytes, Image.Image]:
    """A lossless WebP and the image it holds."""
    img = upright_image()
    return _save(img, "WEBP", lossless=True), img


def webp_rgba() -> tuple[bytes, np.ndarray]:
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[:, 0] = (255, 0, 0, 0)
    arr[:, 1] = (0, 0, 255, 255)
    expected = np.zeros((2, 2, 3), dtype=np.uint8)
    expected[:, 0] = GREY
    expected[:, 1] = (0, 0, 255)
    return _save(Image.fromarray(arr, "RGBA"), "WEBP", lossless=True, exact=True), expected


def bmp() -> tuple[bytes, Image.Image]:
    img = upright_image()
    return _save(img, "BMP"), img


def mpo() -> tuple[bytes, tuple[int, int, int]]:
    """A two-picture MPO (the JPEG variant phones write for depth/stereo shots); the first picture is red."""
    first, second = Image.new("RGB", (800, 600), (255, 0, 0)), Image.new("RGB", (800, 600), (0, 0, 255))
    return _save(first, "MPO", save_all=True, append_images=[second]), (255, 0, 0)


def avif() -> tuple[bytes, tuple[int, int, int]]:
    """A flat-colour AVIF (needs Pillow built with libavif)."""
    return _save(Image.new("RGB", (16, 16), (0, 200, 0)), "AVIF"), (0, 200, 0)


def ico() -> bytes:
    """An icon: refused, because Pillow decodes an icon's embedded PNG without a size check."""
    return _save(Image.new("RGB", (16, 16), (0, 200, 0)), "ICO")


# -- hostile request bodies (issue 32's probe): each must be a 4xx, never a 500 ------------------------------------
def nested_json(levels: int = 1000, key: str = "data") -> bytes:
    """``{"<key>": [[[ ... ]]]}`` nested ``levels`` deep (Python's json parser recursed until RecursionError)."""
    return b'{"' + key.encode() + b'": ' + b"[" * levels + b"]" * levels + b"}"


def nested_objects(levels: int = 1000, key: str = "url") -> bytes:
    """``{"<key>": {"a": {"a": ... }}}``: nested objects in a field."""
    return b'{"' + key.encode() + b'": ' + b'{"a": ' * levels + b"1" + b"}" * levels + b"}"


# The routes that take a JSON body of images, and the bodies with text.
IMAGE_JSON_ROUTES = ("/classify?deployed_id=x", "/detect?deployed_id=x", "/embed_image", "/image-embeddings")
LONE_SURROGATE_ESCAPED = b'"\\ud800"'  # JSON's escape for a lone high surrogate
LONE_SURROGATE_RAW = b'"\xed\xa0\x80"'  # the same surrogate's three bytes (invalid UTF-8 that json decodes)
LONE_LOW_SURROGATE_ESCAPED = b'"ok \\udc00 ok"'


def surrogate_bodies() -> list[tuple[str, bytes, str]]:
    """(route, JSON body, the field the 422 must name) for each way a lone surrogate reaches a text."""
    out = []
    for text in (LONE_SURROGATE_ESCAPED, LONE_SURROGATE_RAW, LONE_LOW_SURROGATE_ESCAPED):
        out += [
            ("/embed_text", b'{"texts": ["fine", ' + text + b"]}", "texts"),
            ("/text-embeddings", b'{"texts": [' + text + b"]}", "texts"),
            (
                "/deploy_classifier",
                b'{"classifier_configs": [{"name": "a", "examples_to_include": ["x", ' + text + b"]}]}",
                "examples_to_include",
            ),
            (
                "/deploy_classifier?wait=false",
                b'{"classifier_configs": [{"name": "a", "examples_to_include": ["x"], "examples_to_exclude": ['
                + text
                + b"]}]}",
                "examples_to_exclude",
            ),
            (
                "/deploy_detector",
                b'{"detector_configs": [{"name": ' + text + b', "examples_to_include": ["x"]}]}',
                "name",
            ),
            ("/embed_image", b'{"url": [' + text + b"]}", "url"),
            ("/classify?deployed_id=x", b'{"data": ' + text + b"}", "data"),
        ]
    return out


# -- hostile connections (issue 32): sent over a raw socket ---------------------------------------------------------
def trickled_body_head(length: int = 1000, route: str = "/embed_text") -> bytes:
    """A request head announcing a ``length``-byte JSON body, which the client then sends one byte every few seconds:
    never idle for the body timeout, far under the minimum rate (408)."""
    return (
        f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode("latin-1")
