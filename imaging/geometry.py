"""Every geometric transform of the project in one place: resizing for the encoders, and boxes back to pixels.

- CLIP: open_clip's inference resize (``shortest`` = torchvision Resize + CenterCrop, ``longest`` = fit and pad,
  ``squash``), on PIL images so the API can do it in its own process before the encoder sees the pixels.
- OWL: the longer side scaled to the input size, padded bottom/right to a square; the detector's boxes come back
  in that square and are mapped to the image the detector saw, then scaled to the client's original pixels.
Nothing here knows about models or HTTP.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

INTERPOLATION: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def clip_resize(
    img: Image.Image,
    size: tuple[int, int],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
) -> Image.Image:
    """An RGB image at the model's input ``size`` (height, width), as open_clip's inference transform resizes it."""
    th, tw = size
    w, h = img.size
    resample = INTERPOLATION.get(interpolation, Image.Resampling.BICUBIC)
    if resize_mode == "squash":
        return img.resize((tw, th), resample)
    if resize_mode == "longest":
        scale = min(th / h, tw / w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = img.resize((nw, nh), resample)
        out = Image.new("RGB", (tw, th), (fill_color,) * 3)
        out.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
        return out
    # "shortest": torchvision Resize(int) then CenterCrop (int() truncation as torchvision does)
    if th == tw:
        nw, nh = (th, int(th * h / w)) if w <= h else (int(th * w / h), th)
    else:
        scale = max(th / h, tw / w)
        nw, nh = round(w * scale), round(h * scale)
    resized = img.resize((nw, nh), resample) if (nw, nh) != (w, h) else img
    top = int(round((nh - th) / 2.0))
    left = int(round((nw - tw) / 2.0))
    return resized.crop((left, top, left + tw, top + th))


def fit_longer_side(width: int, height: int, side: int) -> tuple[int, int]:
    """(w, h) scaled with the aspect kept so the longer side is ``side`` (each at least 1 and at most ``side``)."""
    scale = side / max(width, height)
    return max(1, min(side, round(width * scale))), max(1, min(side, round(height * scale)))


def shrink_to(img: Image.Image, max_side: int) -> tuple[Image.Image, float, float]:
    """Shrink so the longer side is at most ``max_side``: (image, sx, sy) where original = shrunk * (sx, sy).

    Images already small enough come back unchanged with factors 1.0 (never enlarged).
    """
    w, h = img.size
    if max(w, h) <= max_side:
        return img, 1.0, 1.0
    nw, nh = fit_longer_side(w, h, max_side)
    small = img.resize((nw, nh), Image.Resampling.BILINEAR)
    return small, w / nw, h / nh


def pad_to_square(images: list[Image.Image], side: int) -> np.ndarray:
    """Images scaled so the longer side is ``side``, padded bottom/right with zeros: float32 [B, 3, S, S] in [0, 1]."""
    batch = np.zeros((len(images), 3, side, side), dtype=np.float32)
    for i, im in enumerate(images):
        nw, nh = fit_longer_side(im.size[0], im.size[1], side)
        # Resize before anything else touches the full-resolution pixels; reducing_gap lets PIL shrink huge images
        # by fast integer reduction first. Mode conversion happens on the small image where possible.
        src = im if im.mode in ("RGB", "L", "RGBA") else im.convert("RGB")
        small = src.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0).convert("RGB")
        batch[i, :, :nh, :nw] = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return batch


def padded_square_cxcywh_to_xyxy(boxes: torch.Tensor, width: int, height: int, clip: bool = True) -> torch.Tensor:
    """Map boxes from the model's padded square to image pixels: [N, 4] normalised cxcywh -> [N, 4] xyxy.

    The image was scaled (aspect kept) so its longer side fills the square, and padded at the bottom/right, so the
    square spans ``max(width, height)`` image pixels along both axes and its origin is the image's top-left.
    With ``clip`` the boxes are clipped to the image: parts lying in the padding are not image content.
    """
    side = float(max(width, height))
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1) * side
    if clip:
        limit = torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
        xyxy = torch.minimum(xyxy.clamp(min=0), limit)
    return xyxy


def scale_boxes(boxes: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """xyxy boxes in a resized image -> the original image's pixels (a new tensor)."""
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
