"""Models the tests and benchmarks make themselves (nothing reaches a model hub): a tiny open_clip CLIP written as
config JSON + checkpoint of seeded random weights, loaded through the same settings a user sets; the tiny OWLv2
lives in testing/owl.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class ClipFiles:
    config: Path
    checkpoint: Path


def write_tiny_clip(directory: Path, seed: int = 0) -> ClipFiles:
    """A tiny open_clip model: config JSON + checkpoint of seeded random weights."""
    import open_clip
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    cfg_path = directory / "tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CFG))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CLIP_CFG)
    ckpt = directory / "tiny-clip.pt"
    torch.save(model.state_dict(), ckpt)
    return ClipFiles(cfg_path, ckpt)


def clip_env(files: ClipFiles, data_dir: Path) -> dict[str, str]:
    return {
        "ZSS_CLIP_MODEL": str(files.config),
        "ZSS_CLIP_PRETRAINED": str(files.checkpoint),
        "ZSS_DATA_DIR": str(data_dir),
    }


SHAPES_CLIP = Path(__file__).resolve().parents[1] / "models" / "shapes-clip"  # the project's trained toy CLIP


def shapes_clip_env(data_dir: Path) -> dict[str, str]:
    """Settings that serve the shipped shapes CLIP from its files."""
    return {
        "ZSS_CLIP_MODEL": str(SHAPES_CLIP / "shapes-clip.json"),
        "ZSS_CLIP_PRETRAINED": str(SHAPES_CLIP / "shapes-clip.fp16.pt"),
        "ZSS_DATA_DIR": str(data_dir),
    }


SHAPES_SIGLIP = Path(__file__).resolve().parents[1] / "models" / "shapes-siglip"  # the project's trained toy SigLIP


def shapes_siglip_env(data_dir: Path) -> dict[str, str]:
    """Settings that serve the shipped shapes SigLIP from its files (its tokenizer folder lies beside them)."""
    return {
        "ZSS_CLIP_MODEL": str(SHAPES_SIGLIP / "shapes-siglip.json"),
        "ZSS_CLIP_PRETRAINED": str(SHAPES_SIGLIP / "shapes-siglip.fp16.pt"),
        "ZSS_DATA_DIR": str(data_dir),
    }
