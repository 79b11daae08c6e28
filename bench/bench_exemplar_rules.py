"""Other ways to combine a class's text with its image exemplars, against the shipped rule, on the shapes CLIP.

bench/bench_exemplars.py measures the shipped rule (semantic/classify.py: image cosines mapped onto the text scale,
then the two-stage max over text and image slots) end to end. This script asks whether a rule that *accumulates*
evidence across modalities, or reads the exemplars differently, does better on the held-out colour x shape pairs.
The same images and exemplar draws as bench_exemplars (its seeds and ``drawn``), embedded once by the shipped model;
the rules are then plain tensor math on those embeddings, every row the mean over the same 5 exemplar draws.
Accuracy on the held-out pairs / on all 18 pairs, in %.

Rules (v an image, t_j class j's text, e_jk its K exemplars; cosines of L2-normalised embeddings):

- shipped: max(cos(v, t_j), map(max_k cos(v, e_jk))), map = the deploy-time calibration; "images alone": the max
  image cosine;
- Tip-Adapter (training-free): d(v, t_j) + alpha * mean_k exp(-beta * (1 - cos(v, e_jk))), d = (1 + cos) / 2 (the
  paper's sum over the cache is K times this mean, so its alpha is alpha / K here); a grid of alpha and beta;
- linear: cos(v, t_j) + gamma * (max, or mean of the top 3, of cos(v, e_jk)), gamma swept: every fixed mix of the
  text logit and the image evidence, since a calibration's shift does not change the argmax;
- image side alone, read differently: nearest class mean (prototype); nearest exemplar after centring on the
  exemplars' mean; shared-covariance discriminant (LDA) and nearest exemplar in the whitened space (covariance from
  the exemplars, shrunk towards a multiple of the identity by lambda);
- leave-one-out text gate: at deploy time each class's text is dropped when that improves the leave-one-out
  accuracy of the deployment's own exemplars under the shipped rule (training-free, per deployment);
- contradicted-text gate: a class's text is dropped when, alone, it claims an exemplar of another class;
- mirrored exemplars: each exemplar's vector is the normalised mean of the embeddings of the image and its
  left-right mirror (Tip-Adapter builds its cache from augmented views likewise), with the shipped rule and alone.

Reproduce::

    .venv/bin/python -m bench.bench_exemplar_rules --per-pair 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_exemplars import EXEMPLAR_DRAWS, EXEMPLAR_SEED, TEST_SEED, Scorer, drawn, labelled_images  # noqa: E402
from semantic.classify import compile_classifier, raw_scores  # noqa: E402
from tools.shapes import ALL_COMBOS, HELD_OUT  # noqa: E402

SHOTS = (1, 2, 5, 10)
NAMES = [f"{c} {s}" for c, s in ALL_COMBOS]

# A rule: (image embeddings [B, D], texts [C, D], exemplars [C, K, D]) -> class scores [B, C].
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def shipped(text: bool) -> Rule:
    def rule(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        none = torch.zeros(0, t.shape[1])
        c = len(t)
        clf = compile_classifier(
            NAMES, [t[j : j + 1] if text else none for j in range(c)], [none] * c, list(ex), [none] * c
        )
        return raw_scores(x, clf)

    return rule


def image_cos(x: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bd,jkd->bjk", x, ex)  # [B, C, K]


def tip_adapter(alpha: float, beta: float) -> Rule:
    def rule(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        affinity = torch.exp(-beta * (1.0 - image_cos(x, ex))).mean(-1)
        return (1.0 + x @ t.T) / 2.0 + alpha * affinity

    return rule


def linear(gamma: float, top: int) -> Rule:
    def rule(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        cos = image_cos(x, ex)
        return x @ t.T + gamma * cos.topk(min(top, cos.shape[-1]), dim=-1).values.mean(-1)

    return rule


def prototype(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
    return x @ unit(ex.mean(1)).T


def centred(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
    mu = ex.reshape(-1, ex.shape[-1]).mean(0)
    return image_cos(unit(x - mu), unit(ex - mu)).amax(-1)


def shrunk_precision(ex: torch.Tensor, lam: float) -> torch.Tensor:
    """Inverse of the exemplars' pooled within-class covariance, shrunk towards trace / D times the identity."""
    ex = ex.double()
    resid = (ex - ex.mean(1, keepdim=True)).reshape(-1, ex.shape[-1])
    cov = resid.T @ resid / max(resid.shape[0] - ex.shape[0], 1)
    d = cov.shape[0]
    return torch.linalg.inv((1 - lam) * cov + lam * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype))


def lda(lam: float) -> Rule:
    def rule(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        p, mu = shrunk_precision(ex, lam), ex.double().mean(1)
        w = mu @ p
        return x.double() @ w.T - 0.5 * (w * mu).sum(-1)

    return rule


def whitened_nn(lam: float) -> Rule:
    def rule(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        chol = torch.linalg.cholesky(shrunk_precision(ex, lam))
        xw, ew = x.double() @ chol, ex.double() @ chol
        return -torch.cdist(xw, ew.reshape(-1, ew.shape[-1])).reshape(len(x), *ex.shape[:2]).amin(-1)

    return rule


def loo_text_gate(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
    """Shipped rule, minus the texts whose removal improves the exemplars' leave-one-out accuracy."""
    c, k, dim = ex.shape
    if k < 2:
        return shipped(True)(x, t, ex)
    none = torch.zeros(0, dim)

    def loo_correct(keep: list[bool]) -> int:
        right = 0
        for j in range(c):
            for i in range(k):
                rest = [torch.cat([ex[j, :i], ex[j, i + 1 :]]) if m == j else ex[m] for m in range(c)]
                clf = compile_classifier(
                    NAMES, [t[m : m + 1] if keep[m] else none for m in range(c)], [none] * c, rest, [none] * c
                )
                right += int(raw_scores(ex[j, i : i + 1], clf).argmax()) == j
        return right

    base = loo_correct([True] * c)
    keep = [loo_correct([m != j for m in range(c)]) <= base for j in range(c)]
    clf = compile_classifier(
        NAMES, [t[m : m + 1] if keep[m] else none for m in range(c)], [none] * c, list(ex), [none] * c
    )
    return raw_scores(x, clf)


def steal_text_gate(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
    """Shipped rule, minus the texts that, alone, claim an exemplar of another class (a text the deployment's own
    labelled images contradict)."""
    c, k, dim = ex.shape
    truth = torch.arange(c).repeat_interleave(k)
    claimed = (ex.reshape(-1, dim) @ t.T).argmax(1)
    keep = torch.bincount(claimed[claimed != truth], minlength=c) == 0
    none = torch.zeros(0, dim)
    clf = compile_classifier(
        NAMES, [t[m : m + 1] if keep[m] else none for m in range(c)], [none] * c, list(ex), [none] * c
    )
    return raw_scores(x, clf)


def mirror(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def run(per_pair: int) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        sc = Scorer.build(Path(tmp))
        from engine.configs import DeployClassifierRequest

        texts = sc.engine.compile(
            DeployClassifierRequest.model_validate(
                {
                    "classifier_configs": [
                        {"name": f"{c} {s}", "examples_to_include": [f"a {c} {s}"]} for c, s in ALL_COMBOS
                    ],
                    "augment_examples": False,
                }
            )
        ).examples
        held_img, held_truth = labelled_images(sorted(HELD_OUT), per_pair, TEST_SEED)
        all_img, all_truth = labelled_images(ALL_COMBOS, per_pair, TEST_SEED)
        sets = {
            "held": (torch.from_numpy(sc.embed(held_img)), torch.tensor([NAMES.index(n) for n in held_truth])),
            "all": (torch.from_numpy(sc.embed(all_img)), torch.tensor([NAMES.index(n) for n in all_truth])),
        }
        plain, mirrored = [], []
        k_max = max(SHOTS)
        for draw_k in range(EXEMPLAR_DRAWS):
            imgs = [im for c, s in ALL_COMBOS for im in drawn(c, s, k_max, EXEMPLAR_SEED + 100 * draw_k)]
            e = torch.from_numpy(sc.embed(imgs)).reshape(len(ALL_COMBOS), k_max, -1)
            m = torch.from_numpy(sc.embed([mirror(im) for im in imgs])).reshape(e.shape)
            plain.append(e)
            mirrored.append(unit(e + m))
        sc.engine.close()

    def acc(rule: Rule, k: int, which: str, draws: Sequence[torch.Tensor]) -> float:
        x, y = sets[which]
        return 100.0 * float(
            np.mean([float((rule(x, texts, ex[:, :k]).argmax(1) == y).float().mean()) for ex in draws])
        )

    def curve(rule: Rule, draws: Sequence[torch.Tensor] = plain, shots: Sequence[int] = SHOTS) -> tuple[str, str]:
        held = " / ".join(f"{acc(rule, k, 'held', draws):.1f}" for k in shots)
        every = " / ".join(f"{acc(rule, k, 'all', draws):.1f}" for k in shots)
        return held, every

    rows: list[tuple[str, str, str]] = []
    rows.append(("shipped: text + K (max of text and mapped image)", *curve(shipped(True))))
    rows.append(("shipped: K images alone", *curve(shipped(False))))
    for beta in (1.0, 5.5, 20.0):
        for alpha in (0.3, 1.0, 3.0, 10.0):
            rows.append((f"Tip-Adapter alpha={alpha:g} beta={beta:g}", *curve(tip_adapter(alpha, beta))))
    for top in (1, 3):
        for gamma in (1.0, 2.0, 4.0, 10.0):
            rows.append(
                (
                    f"linear cos_text + {gamma:g} x {'max' if top == 1 else 'top-3 mean'} image cos",
                    *curve(linear(gamma, top)),
                )
            )
    rows.append(("prototype (class mean), images alone", *curve(prototype)))
    rows.append(("nearest exemplar after centring, images alone", *curve(centred)))
    for lam in (0.1, 0.4, 0.7):
        rows.append((f"LDA lambda={lam:g}, images alone", *curve(lda(lam), shots=(2, 5, 10))))
        rows.append(
            (f"whitened nearest exemplar lambda={lam:g}, images alone", *curve(whitened_nn(lam), shots=(2, 5, 10)))
        )
    rows.append(("leave-one-out text gate + shipped rule (K = 2, 5)", *curve(loo_text_gate, shots=(2, 5))))
    rows.append(("contradicted-text gate + shipped rule", *curve(steal_text_gate)))
    rows.append(("mirrored exemplars: text + K, shipped rule", *curve(shipped(True), mirrored)))
    rows.append(("mirrored exemplars: K images alone", *curve(shipped(False), mirrored)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-pair", type=int, default=40, help="test images per colour/shape pair")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args.per_pair)
    print("| rule | held-out pairs, K = 1 / 2 / 5 / 10 (or as named) | all 18 pairs |\n|---|---:|---:|")
    for name, held, every in rows:
        print(f"| {name} | {held} | {every} |")
    print(f"\ntook {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
