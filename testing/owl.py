"""Build a tiny random-weight OWLv2 checkpoint on disk, fully offline (no model hub).

The tokenizer files are written from the BPE vocabulary that ships inside open_clip, which is the same CLIP BPE the
real OWLv2 checkpoints use, so tokenisation behaves like the real model; only the weights are random.
"""

from __future__ import annotations

from pathlib import Path

from runners.owl_random import write_random_owl

# Small enough to build and run in well under a second on 2 CPU cores: 64x64 input, 8x8 patches -> 64 boxes.
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8
TINY_NUM_BOXES = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2
TINY_EMBED_DIM = 32
TINY_CONTEXT = 16


TINY_GEOMETRY = {
    # The class head compares text-projected queries with vectors of the text tower's width, so the text hidden size
    # must equal projection_dim (512 and 512 in the real base model).
    "text_config": {
        "hidden_size": TINY_EMBED_DIM,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": TINY_CONTEXT,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": TINY_PATCH_SIZE,
    },
    "projection_dim": TINY_EMBED_DIM,
}


def build_tiny_owlv2(path: str | Path, seed: int = 0) -> Path:
    """Save a seeded random tiny ``Owlv2ForObjectDetection`` plus its processor into ``path``; return the path."""
    return write_random_owl(path, seed, TINY_GEOMETRY, v2=True)


def build_tiny_owlvit(path: str | Path, seed: int = 0) -> Path:
    """The same for OWL-ViT (v1), which has no objectness head."""
    return write_random_owl(path, seed, TINY_GEOMETRY, v2=False)
