"""Train ``shapes-clip``: a small open_clip CLIP learnt from scratch on procedurally drawn coloured shapes.

It is the project's offline model: a test fixture and demo model that needs no model hub. Reproduce the shipped files
(531 s, under 9 minutes, on the 2-core AMD EPYC development machine, 2026-11-23) with::

    .venv/bin/python -m tools.train_shapes_clip --steps 1800 --batch 128 --lr 1.5e-3 --seed 0 --out models/shapes-clip

Outputs, both loadable by plain open_clip (see ``tools/eval_shapes_clip.py``):

- ``<out>/shapes-clip.json``: the open_clip model config; the model name is the file stem, ``shapes-clip``.
- ``<out>/shapes-clip.fp16.pt``: the state_dict in float16.

Images are normalised with open_clip's default (OpenAI) mean/std and the config's 64-px size, so the transform
``create_model_and_transforms`` builds matches training and the config needs no "preprocess_cfg" (open_clip rejects
that key in a config registered with ``add_model_config``).

Training is deterministic for a given seed and thread count (deterministic algorithms, per-step seeded data).
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
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from semantic.templates import CLIP_TEMPLATES
from tools import shapes

MODEL_NAME = "shapes-clip"

# Sized for 2 CPU cores: 6-px patches at 48 px give an 8x8 grid, fine enough to tell a small square from a circle
# (8-px patches, a 6x6 grid, left shape recognition at 70%); about 0.3 s a step of 128 here.
MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 48, "layers": 3, "width": 96, "head_width": 32, "patch_size": 6},
    # vocab_size stays at open_clip's BPE size so the stock tokenizer works; the table is most of the file.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2},
}

# Logit scale held fixed at 1/0.07 (the value semantic.classify uses as its softmax temperature). A learnt scale grows
# and lets cosines stay bunched near 0; the fixed, modest one forces matching pairs towards cos 1 and the rest far
# below, which the relevance rule d = (1 + cos) / 2 of negative examples depends on.
LOGIT_SCALE = 1.0 / 0.07
# Image->text target weight of a caption that names only the colour or only the shape, relative to a full caption.
# Below 1, so "a red square" ends up closer to a red square than "a red shape" does: a negative "red square" then
# outranks the positive "red shape" for red squares only.
PARTIAL_WEIGHT = 0.4
# Share of captions wrapped in one of CLIP's 80 prompt templates, so ensembled prompts stay in distribution.
TEMPLATE_SHARE = 0.25
# Share of images drawn in a colour no caption names (shapes.UNNAMED_COLOURS), captioned by their shape only: shape
# features must then not depend on the colour, which is what recognising held-out colour/shape pairs needs.
UNNAMED_SHARE = 0.2


def batch_captions(
    rng: np.random.Generator, batch: int
) -> tuple[np.ndarray, list[str], list[str | None], list[str | None], list[str], list[str]]:
    """A batch of (uint8 images [B,H,W,3], captions, caption colour|None, caption shape|None, image colours, shapes)."""
    size = int(MODEL_CONFIG["vision_cfg"]["image_size"])
    imgs: list[np.ndarray] = []
    caps: list[str] = []
    cap_c: list[str | None] = []
    cap_s: list[str | None] = []
    img_c: list[str] = []
    img_s: list[str] = []
    for _ in range(batch):
        if rng.random() < UNNAMED_SHARE:
            img, cap, colour, shape, kind = shapes.sample(rng, shapes.UNNAMED_COMBOS, size, kind="shape")
        else:
            img, cap, colour, shape, kind = shapes.sample(rng, shapes.SEEN_COMBOS, size)
        if rng.random() < TEMPLATE_SHARE:
            core = {"full": f"{colour} {shape}", "colour": f"{colour} shape", "shape": shape}[kind]
            cap = CLIP_TEMPLATES[int(rng.integers(len(CLIP_TEMPLATES)))].replace("{}", core)
        imgs.append(np.asarray(img))
        caps.append(cap)
        cap_c.append(colour if kind in ("full", "colour") else None)
        cap_s.append(shape if kind in ("full", "shape") else None)
        img_c.append(colour)
        img_s.append(shape)
    return np.stack(imgs), caps, cap_c, cap_s, img_c, img_s


def targets(
    cap_c: Sequence[str | None], cap_s: Sequence[str | None], img_c: Sequence[str], img_s: Sequence[str]
) -> torch.Tensor:
    """[B images, B captions] match weights: a caption matches every image it is true for, not only its own.

    Plain CLIP loss would treat the many other true captions in a batch (18 pairs, colour-only captions) as negatives
    and fight itself; multi-positive targets remove those false negatives.
    """
    b = len(img_c)
    w = torch.zeros(b, b)
    for i in range(b):
        for j in range(b):
            if (cap_c[j] is None or cap_c[j] == img_c[i]) and (cap_s[j] is None or cap_s[j] == img_s[i]):
                w[i, j] = 1.0 if (cap_c[j] is not None and cap_s[j] is not None) else PARTIAL_WEIGHT
    return w


def loss_fn(img_emb: torch.Tensor, txt_emb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Symmetric soft-target cross-entropy over the batch similarity matrix."""
    logits = LOGIT_SCALE * img_emb @ txt_emb.T
    # Image->text: the weights rank full captions above partial ones. Text->image: every matching image counts alike.
    t_i2t = w / w.sum(dim=1, keepdim=True)
    match = (w > 0).float()
    t_t2i = match / match.sum(dim=0, keepdim=True)
    l_i2t = -(t_i2t * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    l_t2i = -(t_t2i * F.log_softmax(logits, dim=0)).sum(dim=0).mean()
    return (l_i2t + l_t2i) / 2


def to_pixels(imgs: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def write_config(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{MODEL_NAME}.json"
    path.write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    return path


def train(steps: int, out: Path, seed: int, batch: int = 96, lr: float = 1e-3, threads: int = 2) -> Path:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    cfg_path = write_config(out)
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(LOGIT_SCALE))
    model.logit_scale.requires_grad_(False)
    model.train()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)

    # No weight decay on gains, biases and embedding tables (most token rows never occur here).
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    token_cache: dict[str, torch.Tensor] = {}

    t0 = time.perf_counter()
    for step in range(steps):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0, step]))
        imgs, caps, cap_c, cap_s, img_c, img_s = batch_captions(rng, batch)
        missing = [c for c in dict.fromkeys(caps) if c not in token_cache]
        if missing:
            token_cache.update(zip(missing, tokenizer(missing)))
        tokens = torch.stack([token_cache[c] for c in caps])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 12))
        img_emb = model.encode_image(to_pixels(imgs), normalize=True)
        txt_emb = model.encode_text(tokens, normalize=True)
        loss = loss_fn(img_emb, txt_emb, targets(cap_c, cap_s, img_c, img_s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s", flush=True)

    model.eval()
    ckpt = out / f"{MODEL_NAME}.fp16.pt"
    torch.save({k: v.detach().half() for k, v in model.state_dict().items()}, ckpt)
    print(
        f"trained {steps} steps in {time.perf_counter() - t0:.1f}s; wrote {cfg_path} and {ckpt} "
        f"({ckpt.stat().st_size / 1e6:.1f} MB)"
    )
    return ckpt


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--out", type=Path, default=Path("models") / MODEL_NAME)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation of the written checkpoint")
    args = ap.parse_args(argv)
    train(args.steps, args.out, args.seed, args.batch, args.lr, args.threads)
    if not args.no_eval:
        from tools import eval_shapes_clip as ev

        print(ev.markdown(ev.evaluate(ev.load(args.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
