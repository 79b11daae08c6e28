"""A CLIP model's input preprocessing as data (it travels with the weights, as open_clip's ``preprocess_cfg``).

The API process turns decoded images into uint8 pixels at the model's input size with it (so decoding and resizing
overlap the encoder's forward pass), and the encoder normalises them on the tensor side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from imaging.geometry import clip_resize


@dataclass(frozen=True)
class Preprocess:
    """open_clip's inference preprocessing: resize + crop/pad in PIL, normalisation on the tensor side."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> Preprocess:
        """From open_clip's ``preprocess_cfg`` (also the form ``as_dict`` writes, so it round-trips over the wire)."""
        size = cfg["size"]
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return cls(
            size=hw,
            mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
            fill_color=int(cfg.get("fill_color", 0)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": list(self.size), "mean": list(self.mean), "std": list(self.std)}

    @property
    def draft_size(self) -> int:
        """The smallest edge a JPEG may be draft-decoded to without losing resolution the model would see."""
        return max(self.size)

    def to_pixels(self, img: Image.Image) -> np.ndarray:
        """An RGB PIL image -> uint8 [H, W, 3] at the model's input size (the resize matches torchvision's)."""
        img = img.convert("RGB") if img.mode != "RGB" else img
        out = clip_resize(img, self.size, self.resize_mode, self.interpolation, self.fill_color)
        return np.asarray(out, dtype=np.uint8)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W], scaled to [0, 1] and normalised."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std
