"""Tiny random-weight SigLIP models the tests write to disk (nothing reaches a hub), in both forms a user has them:
an open_clip config JSON + checkpoint with a tokenizer directory beside it, and a transformers ``save_pretrained``
directory (``SiglipModel`` or ``Siglip2Model``) with its tokenizer and image-processor config. The tokenizer is one
the project trains itself (runners/siglip_tokenizer.py)."""

from __future__ import annotations

import json
from pathlib import Path

from runners.siglip_tokenizer import train_tokenizer
from testing.models import ClipFiles

WORDS = (
    "a photo of a red green blue yellow purple orange cyan white black circle square triangle star cross "
    "cat dog car tree house this is containing images the shape coloured"
).split()
CONTEXT = 16
IMAGE = 32


def corpus() -> list[str]:
    return [" ".join(WORDS[i : i + 5]) for i in range(len(WORDS))] * 4


def tiny_siglip_cfg(vocab_size: int) -> dict:
    """open_clip's SigLIP form (CustomTextCLIP, logit bias, non-causal text tower pooled at the last token, HF
    tokenizer), at toy sizes and with open_clip's own ViT as the image tower."""
    return {
        "embed_dim": 32,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {
            "context_length": CONTEXT,
            "vocab_size": vocab_size,
            "hf_tokenizer_name": "tokenizer",  # relative to the config file
            "tokenizer_kwargs": {"clean": "canonicalize"},
            "width": 64,
            "heads": 2,
            "layers": 2,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"},
    }


def write_tiny_open_clip_siglip(directory: Path, seed: int = 0) -> ClipFiles:
    """config JSON + checkpoint + ``tokenizer/`` beside them."""
    import open_clip
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(corpus(), directory / "tokenizer", vocab_size=64)
    cfg = tiny_siglip_cfg(vocab)
    cfg_path = directory / "tiny-siglip.json"
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model_cfg = {k: v for k, v in cfg.items() if k not in {"preprocess_cfg", "custom_text"}}
    model_cfg["text_cfg"] = {k: v for k, v in cfg["text_cfg"].items() if k not in {"hf_tokenizer_name"}}
    model = open_clip.model.CustomTextCLIP(**model_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)  # exp = ~10, SigLIP's init
    ckpt = directory / "tiny-siglip.pt"
    torch.save(model.state_dict(), ckpt)
    return ClipFiles(cfg_path, ckpt)


def write_tiny_hf_siglip(directory: Path, version: int = 1, seed: int = 0) -> Path:
    """A ``SiglipModel`` (version 1) or ``Siglip2Model`` (version 2) save_pretrained directory with tokenizer and
    image-processor config."""
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(corpus(), directory, vocab_size=64)
    text = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": CONTEXT,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 1,
    }
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(seed)
    if version == 1:
        cfg = transformers.SiglipConfig(
            text_config=text, vision_config={**vision, "image_size": IMAGE, "patch_size": 8}
        )
        model = transformers.SiglipModel(cfg)
        processor = {
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": True,
            "size": {"height": IMAGE, "width": IMAGE},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
    else:
        cfg = transformers.Siglip2Config(text_config=text, vision_config={**vision, "patch_size": 8, "num_patches": 16})
        model = transformers.Siglip2Model(cfg)
        processor = {
            "image_processor_type": "Siglip2ImageProcessor",
            "do_resize": True,
            "patch_size": 8,
            "max_num_patches": 16,
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
    model.save_pretrained(str(directory))
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


def write_full_size_open_clip_siglip(directory: Path, name: str = "ViT-B-16-SigLIP2", seed: int = 0) -> ClipFiles:
    """open_clip's ``name`` at its released size with seeded random weights, for benchmarks: the released image tower
    (what speed depends on), the text tower with the tokenizer trained here instead of the hub's (so its embedding
    table has this small vocabulary). Written once: an existing checkpoint is reused."""
    import open_clip
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt = directory / f"{name}-random.json", directory / f"{name}-random.pt"
    if cfg_path.exists() and ckpt.exists():
        return ClipFiles(cfg_path, ckpt)
    vocab = train_tokenizer(corpus(), directory / "tokenizer", vocab_size=64)
    cfg = open_clip.get_model_config(name)
    cfg["text_cfg"] = {**cfg["text_cfg"], "vocab_size": vocab, "hf_tokenizer_name": "tokenizer"}
    size = cfg["vision_cfg"]["image_size"]
    cfg["preprocess_cfg"] = {
        "size": size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "resize_mode": "squash",
    }
    torch.manual_seed(seed)
    model_cfg = {k: v for k, v in cfg.items() if k not in {"preprocess_cfg", "custom_text"}}
    model_cfg["text_cfg"] = {k: v for k, v in cfg["text_cfg"].items() if k != "hf_tokenizer_name"}
    model = open_clip.model.CustomTextCLIP(**model_cfg)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, ckpt)
    cfg_path.write_text(json.dumps(cfg))
    return ClipFiles(cfg_path, ckpt)
