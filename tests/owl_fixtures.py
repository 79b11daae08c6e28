"""Build a tiny random-weight OWLv2 checkpoint on disk, fully offline (no model hub).

The tokenizer files are written from the BPE vocabulary that ships inside open_clip, which is the same CLIP BPE the
real OWLv2 checkpoints use, so tokenisation behaves like the real model; only the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Small enough to build and run in well under a second on 2 CPU cores: 64x64 input, 8x8 patches -> 64 boxes.
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8
TINY_NUM_BOXES = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2
TINY_EMBED_DIM = 32
TINY_CONTEXT = 16


def _write_clip_bpe(path: Path) -> tuple[Path, Path]:
    """Write CLIP's vocab.json / merges.txt from open_clip's shipped BPE, with CLIPTokenizer's special-token names."""
    from open_clip.tokenizer import SimpleTokenizer

    sp = SimpleTokenizer()
    # open_clip names the specials <start_of_text>/<end_of_text>; the HF files use <|startoftext|>/<|endoftext|>.
    # Renaming keeps them at ids 49406/49407 (as in the real checkpoints) instead of appending two new tokens.
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): int(v) for k, v in sp.encoder.items()}
    merges = sorted(sp.bpe_ranks.items(), key=lambda kv: kv[1])
    vocab_file = path / "vocab.json"
    merges_file = path / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges), encoding="utf-8")
    return vocab_file, merges_file


def build_tiny_owlv2(path: str | Path, seed: int = 0) -> Path:
    """Save a seeded random tiny ``Owlv2ForObjectDetection`` plus its processor into ``path``; return the path."""
    return _build(path, seed, v2=True)


def build_tiny_owlvit(path: str | Path, seed: int = 0) -> Path:
    """The same for OWL-ViT (v1), which has no objectness head."""
    return _build(path, seed, v2=False)


def _build(path: str | Path, seed: int, v2: bool) -> Path:
    import transformers
    from transformers import CLIPTokenizer

    prefix = "Owlv2" if v2 else "OwlViT"
    Config = getattr(transformers, f"{prefix}Config")
    Model = getattr(transformers, f"{prefix}ForObjectDetection")
    ImageProcessor = getattr(transformers, f"{prefix}ImageProcessor")
    Processor = getattr(transformers, f"{prefix}Processor")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = _write_clip_bpe(out)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="!")
    processor = Processor(
        image_processor=ImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}),
        tokenizer=tokenizer,
    )
    # The class head compares text-projected queries with vectors of the text tower's width, so the text hidden size
    # must equal projection_dim (512 and 512 in the real base model).
    cfg = Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TINY_EMBED_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": TINY_CONTEXT,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": TINY_PATCH_SIZE,
        },
        projection_dim=TINY_EMBED_DIM,
    )
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
