"""JPEG decoding and the CLIP resize on the image encoder's own device (ZSS_DEVICE_DECODE; issue 29, item 5).

On a GPU, ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG) decodes a batch of JPEGs and the resize runs there
too, so the API's CPUs neither decode nor resize, and no full-size pixels cross the host. The API keeps every check
that needs no pixels (``eligible``: the format, the declared size against the pixel limit, the EXIF orientation) and
sends the encoded bytes; anything not eligible, and any batch the device fails to decode, takes the CPU path
(imaging/decode.py), so errors and odd files answer exactly as without the setting.

The geometry is ``imaging.geometry.clip_resize``'s (open_clip's inference resize), here on uint8 tensors with
``torch.nn.functional.interpolate`` (antialiased, as PIL resizes): the pixels differ from PIL's by rounding
(tests/imaging/test_device_decode.py measures how much, and the vectors they give).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imaging.preprocess import Preprocess

JPEG_MAGIC = b"\xff\xd8\xff"
# The image encoder's status for JPEGs its device could not decode; the API then decodes them on the CPU path.
UNDECODABLE = 422
EXIF_ORIENTATION = 0x0112
# Resamplings torch offers with antialiasing; another interpolation (nearest, lanczos) keeps the CPU path.
TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear"}


def eligible(data: bytes, max_pixels: int, pp: Preprocess) -> bool:
    """Whether ``data`` can be decoded on the device with the CPU path's result: a baseline or progressive JPEG in RGB
    or greyscale, upright (no EXIF rotation), within ``max_pixels``, for a model whose interpolation torch has. Reads
    the header only."""
    if not data.startswith(JPEG_MAGIC) or pp.interpolation not in TORCH_MODES:
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            w, h = img.size
            if w * h > max_pixels or min(w, h) < 1:
                return False
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - anything PIL cannot read goes the CPU path, which words the error
        return False
    return orientation in (1, None)


def pack(datas: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Encoded images -> (uint8 blob, int64 end offsets): two arrays cross the service boundary like pixels do."""
    blob = np.frombuffer(b"".join(datas), dtype=np.uint8)
    return blob, np.cumsum([len(d) for d in datas], dtype=np.int64)


def unpack(blob: np.ndarray, ends: np.ndarray) -> list[torch.Tensor]:
    """``pack``'s arrays -> one uint8 tensor per image (views of the blob; ValueError when the offsets do not fit)."""
    ends = np.asarray(ends, dtype=np.int64).reshape(-1)
    blob = np.asarray(blob, dtype=np.uint8).reshape(-1)
    if len(ends) and (ends[-1] != len(blob) or np.any(np.diff(ends, prepend=0) <= 0)):
        raise ValueError("offsets do not match the encoded images")
    data = torch.from_numpy(blob.copy())
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return [data[int(s) : int(e)] for s, e in zip(starts, ends)]


def _resize(img: torch.Tensor, nh: int, nw: int, mode: str) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, nh, nw], antialiased like PIL's resize."""
    if img.shape[1:] == (nh, nw):
        return img
    x = F.interpolate(img[None].float(), size=(nh, nw), mode=mode, antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def resize_like_clip(img: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [H', W', 3] at the model's input size, with ``clip_resize``'s geometry."""
    th, tw = pp.size
    _, h, w = img.shape
    mode = TORCH_MODES[pp.interpolation]
    if pp.resize_mode == "squash":
        return _resize(img, th, tw, mode).permute(1, 2, 0)
    if pp.resize_mode == "longest":
        scale = min(th / h, tw / w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        out = torch.full((3, th, tw), pp.fill_color, dtype=torch.uint8, device=img.device)
        top, left = (th - nh) // 2, (tw - nw) // 2
        out[:, top : top + nh, left : left + nw] = _resize(img, nh, nw, mode)
        return out.permute(1, 2, 0)
    if th == tw:  # "shortest": torchvision's Resize(int) then CenterCrop, int() truncation as there
        nw, nh = (th, int(th * h / w)) if w <= h else (int(th * w / h), th)
    else:
        scale = max(th / h, tw / w)
        nw, nh = round(w * scale), round(h * scale)
    resized = _resize(img, nh, nw, mode)
    top = int(round((nh - th) / 2.0))
    left = int(round((nw - tw) / 2.0))
    return resized[:, top : top + th, left : left + tw].permute(1, 2, 0)


def decode_to_pixels(encoded: list[torch.Tensor], pp: Preprocess, device: torch.device) -> torch.Tensor:
    """JPEGs (``unpack``'s tensors) -> uint8 [N, H, W, 3] at the model's input size, on ``device`` (decoded there:
    nvJPEG in one batched call on CUDA). Raises RuntimeError (torchvision's) for a JPEG the decoder refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return torch.zeros((0, *pp.size, 3), dtype=torch.uint8, device=device)
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return torch.stack([resize_like_clip(img, pp) for img in decoded])
