"""SigLIP / SigLIP 2 from Hugging Face transformers (``SiglipModel``, ``Siglip2Model``): a ``save_pretrained``
directory or a hub id, wrapped so runners/clip.py serves it exactly like an open_clip model (``visual`` /
``encode_image`` take normalised [B, 3, H, W] pixels, ``encode_text`` takes token ids, ``logit_scale`` /
``logit_bias`` are the model's own parameters). No BentoML in here.

What travels with the model as data: the preprocessing read from its ``preprocessor_config.json`` (SigLIP resizes
straight to its square input, "squash"; mean/std; resample filter), and the tokenisation: the directory's own
tokenizer, always with ``padding="max_length"`` to the text tower's full context (``max_position_embeddings``, 64 for
Google's checkpoints), as SigLIP was trained: its text tower pools the LAST position, so padding changes the vector.

SigLIP 2's NaFlex image processor picks a patch grid per image that keeps its aspect ratio; here every image is
resized to the square grid of ``max_num_patches`` (e.g. 16 x 16 patches of 16 px = 256 px), the fixed-resolution
form open_clip's SigLIP 2 models use, so a batch is one tensor and the tower exports to ONNX / OpenVINO.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

HF_TYPES = {"siglip": "SiglipModel", "siglip2": "Siglip2Model"}
# transformers' PIL resample codes -> imaging.geometry's interpolation names.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Files whose content identifies a checkpoint directory (weights, configs, tokenizer files).
_ID_SUFFIXES = {".json", ".safetensors", ".bin", ".txt", ".model"}


def hf_model_type(source: str) -> str | None:
    """``siglip`` / ``siglip2`` when ``source`` is a transformers directory of one; None when it is not such a
    directory (a hub id is checked at load)."""
    cfg = Path(source).expanduser() / "config.json"
    if not cfg.is_file():
        return None
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return model_type if model_type in HF_TYPES else None


def content_hash(root: Path) -> str:
    """A hash of a directory's config / weights / tokenizer files: their relative names and contents."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if f.is_file() and f.suffix in _ID_SUFFIXES and not any(p.startswith(".") for p in rel.parts):
            h.update(str(rel).encode() + b"\0")
            with f.open("rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def preprocess_cfg(root: Path, model: Any) -> dict[str, Any]:
    """open_clip's preprocess_cfg form of the directory's image-processor config."""
    path = root / "preprocessor_config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    vision = model.config.vision_config
    if "max_num_patches" in raw or not hasattr(vision, "image_size"):  # SigLIP 2 NaFlex: the square grid
        patch = int(raw.get("patch_size", vision.patch_size))
        side = math.isqrt(int(raw.get("max_num_patches", getattr(vision, "num_patches", 256)))) * patch
        size = [side, side]
    else:
        s = raw.get("size", {})
        size = [int(s.get("height", vision.image_size)), int(s.get("width", vision.image_size))]
    return {
        "size": size,
        "mean": list(raw.get("image_mean", [0.5, 0.5, 0.5])),
        "std": list(raw.get("image_std", [0.5, 0.5, 0.5])),
        "interpolation": _RESAMPLE.get(int(raw.get("resample", 3)), "bicubic"),
        "resize_mode": "squash",
    }


class _Vision(torch.nn.Module):
    """Normalised [B, 3, H, W] -> pooled image features (SigLIP 2: cut into its patch sequence first)."""

    def __init__(self, vision_model: torch.nn.Module, patch: int | None) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            return self.vision_model(pixel_values=x).pooler_output
        b, c, h, w = x.shape
        p = self.patch
        nh, nw = h // p, w // p
        # Siglip2ImageProcessor's order: (row, column) patches, each flattened (y, x, channel).
        seq = x.reshape(b, c, nh, p, nw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, nh * nw, p * p * c)
        mask = torch.ones((b, nh * nw), dtype=torch.int32, device=x.device)
        shapes = torch.tensor([[nh, nw]], dtype=torch.int64, device=x.device).expand(b, 2)
        return self.vision_model(pixel_values=seq, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output


class _FixedGridEmbeddings(torch.nn.Module):
    """SigLIP 2's patch embeddings with the position embeddings already resized to one patch grid: what the NaFlex
    embeddings compute for that grid, without the run-time resize the ONNX exporter cannot translate."""

    def __init__(self, embeddings: torch.nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.patch_embedding = embeddings.patch_embedding
        size = int(embeddings.position_embedding_size)
        table = embeddings.position_embedding.weight.reshape(size, size, -1)
        with torch.no_grad():
            pos = embeddings.resize_positional_embeddings(table, torch.tensor([grid]), grid[0] * grid[1])
        self.register_buffer("pos", pos.detach().clone())

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)) + self.pos


def export_visual(visual: torch.nn.Module, size: tuple[int, int]) -> torch.nn.Module:
    """The image tower to export at the input ``size`` (height, width): SigLIP 2's with its position embeddings fixed
    to that size's patch grid (exact for that size: tested), any other tower as it is."""
    if not isinstance(visual, _Vision) or visual.patch is None:
        return visual
    grid = (size[0] // visual.patch, size[1] // visual.patch)
    vm = copy.copy(visual.vision_model)
    vm._modules = dict(vm._modules)  # a copy that shares every layer but its embeddings
    vm.embeddings = _FixedGridEmbeddings(visual.vision_model.embeddings, grid)
    return _Vision(vm, visual.patch)


class _Text(torch.nn.Module):
    def __init__(self, text_model: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # No attention mask: SigLIP's text tower attends over the padding, as it was trained.
        return self.text_model(input_ids=tokens).pooler_output


class HFSiglip(torch.nn.Module):
    """The towers of a transformers SigLIP model behind open_clip's interface."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        siglip2 = model.config.model_type == "siglip2"
        self.visual = _Vision(model.vision_model, int(model.config.vision_config.patch_size) if siglip2 else None)
        # SigLIP 2's NaFlex tower resizes its position embeddings from the patch grid given as data at run time,
        # which torch.onnx.export does not translate (aten._is_all_true): ``export_visual`` fixes them to the
        # model's input size first.
        self.text: _Text | None = _Text(model.text_model)
        self.logit_scale = model.logit_scale
        self.logit_bias = model.logit_bias
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.embed_dim = int(model.config.vision_config.hidden_size)  # = the text head's projection size

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text is None:
            raise RuntimeError("the text tower was dropped")
        return self.text(tokens)


class MaxLengthTokenizer:
    """A transformers tokenizer called as open_clip's are: texts -> int64 [N, context], padded to the full context."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        ).input_ids


def load_hf(source: str, random: bool = False) -> tuple[HFSiglip, MaxLengthTokenizer, dict[str, Any]]:
    """(model, tokenizer, preprocess_cfg) of a transformers SigLIP directory or hub id; ``random``: its
    architecture with seeded random weights (the caller seeds torch)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    local = Path(source).expanduser()
    root = str(local.resolve()) if local.is_dir() else source
    config = AutoConfig.from_pretrained(root)
    if config.model_type not in HF_TYPES:
        raise ValueError(f"{source}: not a SigLIP / SigLIP 2 checkpoint (model_type={config.model_type!r})")
    cls = getattr(transformers, HF_TYPES[config.model_type])
    model = cls(config) if random else cls.from_pretrained(root)
    model.eval()
    wrapped = HFSiglip(model)
    tokenizer = MaxLengthTokenizer(AutoTokenizer.from_pretrained(root), wrapped.context_length)
    pp = preprocess_cfg(local if local.is_dir() else Path(_hub_file_dir(root)), model)
    return wrapped, tokenizer, pp


def _hub_file_dir(repo_id: str) -> str:
    """The local snapshot directory of a hub id's preprocessor config (from the cache, or downloaded)."""
    from huggingface_hub import hf_hub_download

    return str(Path(hf_hub_download(repo_id, "preprocessor_config.json")).parent)
