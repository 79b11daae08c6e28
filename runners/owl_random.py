"""OWLv2 / OWL-ViT checkpoints with seeded random weights, written to disk without any model hub.

``ZSS_DETECTOR_MODEL=random`` serves the full-size OWLv2 base architecture (patch 16, 960 px) with random weights, for
benchmarks and offline smoke runs; tests write tiny configs through the same function. The tokenizer files come from
the CLIP BPE that ships inside open_clip (the same vocabulary the released OWL checkpoints use), so tokenisation is
real and only the weights are random. The directory is then loaded through the ordinary local-directory path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# The released owlv2-base-patch16 geometry: 960 px input, 16 px patches (3,600 boxes), 512-d queries.
OWLV2_BASE = {
    "text_config": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 16,
    },
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 960,
        "patch_size": 16,
    },
    "projection_dim": 512,
}


def _write_clip_bpe(path: Path) -> tuple[Path, Path]:
    """CLIP's vocab.json / merges.txt from open_clip's shipped BPE, with CLIPTokenizer's special-token names."""
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


def write_random_owl(path: str | Path, seed: int = 0, geometry: dict[str, Any] | None = None, v2: bool = True) -> Path:
    """Save a seeded random ``Owlv2ForObjectDetection`` (or OWL-ViT) plus its processor into ``path``."""
    import transformers
    from transformers import CLIPTokenizer

    prefix = "Owlv2" if v2 else "OwlViT"
    geo = geometry or OWLV2_BASE
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = _write_clip_bpe(out)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="!")
    size = int(geo["vision_config"]["image_size"])
    processor = getattr(transformers, f"{prefix}Processor")(
        image_processor=getattr(transformers, f"{prefix}ImageProcessor")(size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )
    # The class head compares text-projected queries with vectors of the text tower's width, so the text hidden
    # size must equal projection_dim (512 and 512 in the real base model).
    cfg = getattr(transformers, f"{prefix}Config")(
        text_config={**geo["text_config"], "vocab_size": len(tokenizer)},
        vision_config=dict(geo["vision_config"]),
        projection_dim=int(geo["projection_dim"]),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForObjectDetection")(cfg).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def random_owl_dir(data_dir: Path, seed: int) -> Path:
    """The full-size random OWLv2 under ``data_dir``, written once (atomically: a crash leaves no half directory)."""
    target = Path(data_dir) / "models" / f"owlv2-base-random-seed{seed}"
    if (target / "config.json").exists():
        return target
    log.warning("ZSS_DETECTOR_MODEL=random: writing OWLv2 base with RANDOM weights (seed %d) to %s", seed, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".owl-", dir=target.parent))
    try:
        write_random_owl(tmp, seed)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # another worker may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
