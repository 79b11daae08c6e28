"""Train ``shapes-siglip``: a small SigLIP (sigmoid loss, logit bias) learnt from scratch on the coloured shapes of
``shapes-clip``, with a tokenizer trained here (``tokenizers``, runners/siglip_tokenizer.py): the project's offline
SigLIP, whose probabilities the tests check.

Shipped in models/shapes-siglip (1.2 MB), trained on 2026-12-02 on the shared 2-core machine (load average 4-10) in
1,365 s with::

    nice -n 5 .venv/bin/python -m tools.train_shapes_siglip --steps 1200 --threads 1 --out models/shapes-siglip

One thread: under load two threads took 5.4 s a step against 1.45 s for one (each step's matrices are small, and
two threads wait on each other whenever one is descheduled).

Outputs, in open_clip's SigLIP form (served with ZSS_CLIP_MODEL=<out>/shapes-siglip.json and
ZSS_CLIP_PRETRAINED=<out>/shapes-siglip.fp16.pt):

- ``shapes-siglip.json``: the model config (CustomTextCLIP with ``init_logit_bias``, a non-causal text tower pooled at
  the last position, ``hf_tokenizer_name`` = ``tokenizer``, the folder beside it) and its ``preprocess_cfg``;
- ``tokenizer/``: the tokenizer (a transformers tokenizer directory; texts padded to the full context);
- ``shapes-siglip.fp16.pt``: the state_dict in float16.

Same data as shapes-clip (tools/train_shapes_clip.py: seen colour x shape pairs, the same held-out pairs, captions
naming the colour, the shape or both, some in CLIP's templates). The loss is SigLIP's pairwise sigmoid loss over the
batch's image x caption matrix with the model's own learnt logit scale and bias; a caption true of an image is a
positive for it (not only its own caption). A caption naming only the colour or only the shape is a softer positive
(target ``PARTIAL_TARGET``), so "a red square" ends closer to a red square than "a red shape" does while both keep a
probability above 0.5: a negative "red square" then outranks a positive "red" on red squares only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from runners.siglip_tokenizer import train_tokenizer
from semantic.templates import CLIP_TEMPLATES
from tools import shapes
from tools.train_shapes_clip import batch_captions, lr_at, targets

MODEL_NAME = "shapes-siglip"
CONTEXT = 24
MEAN = STD = (0.5, 0.5, 0.5)
PARTIAL_TARGET = 0.75


def model_config(vocab_size: int) -> dict[str, Any]:
    return {
        "embed_dim": 64,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"image_size": 48, "layers": 3, "width": 96, "head_width": 32, "patch_size": 6},
        "text_cfg": {
            "context_length": CONTEXT,
            "vocab_size": vocab_size,
            "hf_tokenizer_name": "tokenizer",
            "tokenizer_kwargs": {"clean": "canonicalize"},
            "width": 96,
            "heads": 3,
            "layers": 2,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
        },
        "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "resize_mode": "squash", "interpolation": "bicubic"},
    }


def tokenizer_corpus() -> list[str]:
    """Every caption form training draws, and the prompts users write (all colour names, CLIP's templates)."""
    colours = [*shapes.COLOURS, *shapes.UNNAMED_COLOURS]
    cores = [f"{c} {s}" for c in colours for s in shapes.SHAPES] + [f"{c} shape" for c in colours]
    cores += list(shapes.SHAPES) + colours
    out = [t.replace("{}", core) for t in CLIP_TEMPLATES for core in cores[::3]]
    for tpls in (shapes.FULL_TEMPLATES, shapes.COLOUR_TEMPLATES, shapes.SHAPE_TEMPLATES):
        for t in tpls:
            for c in colours:
                for s in shapes.SHAPES:
                    for bg in ("dark", "light"):
                        out.append(t.replace("{c}", c).replace("{s}", s).replace("{bg}", bg))
    return out


def siglip_loss(
    img: torch.Tensor, txt: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Pairwise sigmoid loss: every (image, caption) pair is a binary "does it match" with target 1 for a full
    caption true of the image, PARTIAL_TARGET for a partial one, 0 otherwise; mean over pairs times the batch size
    (SigLIP's normalisation)."""
    logits = scale.exp() * img @ txt.T + bias
    target = torch.where(w >= 1.0, 1.0, torch.where(w > 0, PARTIAL_TARGET, 0.0))
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / img.shape[0]


def to_pixels(imgs: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def train(
    steps: int, out: Path, seed: int, batch: int = 128, lr: float = 1.5e-3, threads: int = 1, max_s: float = 1200
) -> Path:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(tokenizer_corpus(), out / "tokenizer", vocab_size=320)
    cfg = model_config(vocab)
    cfg_path = out / f"{MODEL_NAME}.json"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    build = {k: v for k, v in cfg.items() if k not in {"preprocess_cfg", "custom_text"}}
    model = open_clip.model.CustomTextCLIP(**build)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
    model.train()
    tokenizer = open_clip.tokenizer.HFTokenizer(str(out / "tokenizer"), CONTEXT, clean="canonicalize")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    token_cache: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for step in range(steps):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, step]))
        imgs, caps, cap_c, cap_s, img_c, img_s = batch_captions(rng, batch)
        missing = [c for c in dict.fromkeys(caps) if c not in token_cache]
        if missing:
            token_cache.update(zip(missing, tokenizer(missing)))
        tokens = torch.stack([token_cache[c] for c in caps])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 12))
        img_emb = model.encode_image(to_pixels(imgs), normalize=True)
        txt_emb = model.encode_text(tokens, normalize=True)
        loss = siglip_loss(img_emb, txt_emb, targets(cap_c, cap_s, img_c, img_s), model.logit_scale, model.logit_bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.perf_counter() - t0
        if step % 50 == 0 or step == steps - 1:
            print(
                f"step {step:4d}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():.1f} "
                f"bias {model.logit_bias.item():.2f}  {elapsed:6.1f}s",
                flush=True,
            )
        if elapsed > max_s:
            print(f"stopped at step {step}: the {max_s:.0f} s cap", flush=True)
            break
    model.eval()
    ckpt = out / f"{MODEL_NAME}.fp16.pt"
    torch.save({k: v.detach().half() for k, v in model.state_dict().items()}, ckpt)
    size = ckpt.stat().st_size / 1e6
    print(f"trained in {time.perf_counter() - t0:.1f}s; wrote {cfg_path} and {ckpt} ({size:.2f} MB)")
    return ckpt


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--out", type=Path, default=Path("models") / MODEL_NAME)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=1200, help="stop (and save) after this much training time")
    args = ap.parse_args(argv)
    train(args.steps, args.out, args.seed, args.batch, args.lr, args.threads, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
