"""Other ways to combine a class's text with its image exemplars, against the shipped rule, on the shapes CLIP.

bench/bench_exemplars.py measures the shipped rule (semantic/classify.py: image cosines mapped onto the text scale,
then the two-stage max over text and image slots, the "max rule", plus the text-anchored probe of classes with image
examples) end to end. This script asks whether a rule that *accumulates* evidence across modalities, reads the
exemplars differently or learns from them, does better on the held-out colour x shape pairs.
The same images and exemplar draws as bench_exemplars (its seeds and ``drawn``), embedded once by the shipped model;
the rules are then plain tensor math on those embeddings, every row the mean over the same exemplar draws (5, or
``--draws``). Accuracy on the held-out pairs / on all 18 pairs, in %.

Rules (v an image, t_j class j's text, e_jk its K exemplars; cosines of L2-normalised embeddings):

- max rule: max(cos(v, t_j), map(max_k cos(v, e_jk))), map = the deploy-time calibration; "images alone": the max
  image cosine;
- Tip-Adapter (training-free): d(v, t_j) + alpha * mean_k exp(-beta * (1 - cos(v, e_jk))), d = (1 + cos) / 2 (the
  paper's sum over the cache is K times this mean, so its alpha is alpha / K here); a grid of alpha and beta;
- linear: cos(v, t_j) + gamma * (max, or mean of the top 3, of cos(v, e_jk)), gamma swept: every fixed mix of the
  text logit and the image evidence, since a calibration's shift does not change the argmax;
- image side alone, read differently: nearest class mean (prototype); nearest exemplar after centring on the
  exemplars' mean; shared-covariance discriminant (LDA) and nearest exemplar in the whitened space (covariance from
  the exemplars, shrunk towards a multiple of the identity by lambda);
- leave-one-out text gate: at deploy time each class's text is dropped when that improves the leave-one-out
  accuracy of the deployment's own exemplars under the max rule (training-free, per deployment);
- contradicted-text gate: a class's text is dropped when, alone, it claims an exemplar of another class;
- mirrored exemplars: each exemplar's vector is the normalised mean of the embeddings of the image and its
  left-right mirror (Tip-Adapter builds its cache from augmented views likewise), with the max rule and alone;
- the text-anchored linear probe (shipped; semantic/classify.py ``fit_probe``): against the max rule (the rule before
  it, ``probe_steps=0``), its spread over the draws, with each exemplar's mirror as one more training example, and a
  sensitivity grid (steps, decay, temperature, centring, a nearest-exemplar term). ``--probe-only``: these rows only.

Reproduce::

    .venv/bin/python -m bench.bench_exemplar_rules --per-pair 40
    .venv/bin/python -m bench.bench_exemplar_rules --per-pair 100 --draws 10 --probe-only
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
from semantic.classify import PROBE_DECAY, PROBE_STEPS, compile_classifier, fit_probe, raw_scores  # noqa: E402
from tools.shapes import ALL_COMBOS, HELD_OUT  # noqa: E402

SHOTS = (1, 2, 5, 10)
NAMES = [f"{c} {s}" for c, s in ALL_COMBOS]

# A rule: (image embeddings [B, D], texts [C, D], exemplars [C, K, D]) -> class scores [B, C].
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def shipped(text: bool, probe_steps: int = PROBE_STEPS) -> Rule:
    """semantic/classify.py's rule (``probe_steps`` = 0: the max rule without the probe). Exemplars [C, K, D], or
    [C, K, V, D] with V views of each (an image and its mirror, as the engine embeds them): all V * K are the class's
    image examples, views first (engine/kinds.py)."""

    def rule(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        none = torch.zeros(0, t.shape[1])
        c = len(t)
        imgs = list(ex) if ex.ndim == 3 else list(ex.transpose(1, 2).flatten(1, 2))
        clf = compile_classifier(
            NAMES, [t[j : j + 1] if text else none for j in range(c)], [none] * c, imgs, [none] * c, probe_steps
        )
        return raw_scores(x, clf)

    return rule


def probe_grid(
    steps: int = PROBE_STEPS, decay: float = PROBE_DECAY, temperature: float = 0.07, centre: bool = False, nn: float = 0
) -> Rule:
    """The text-anchored probe alone (every class trainable), other settings: a sensitivity grid. ``centre``: the
    embeddings centred on the exemplars' mean; ``nn``: that times the nearest exemplar's cosine added to the logit."""

    def rule(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        c, k, dim = ex.shape
        xs, ys = ex.reshape(-1, dim), torch.arange(c).repeat_interleave(k)
        mu = xs.mean(0) if centre else torch.zeros(dim)
        fixed = torch.zeros(len(xs), c)
        w = fit_probe(t, torch.arange(c), xs - mu, ys, fixed, steps=steps, decay=decay, temperature=temperature)
        return (x - mu) @ w.T + nn * image_cos(x, ex).amax(-1)

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
    """Max rule, minus the texts whose removal improves the exemplars' leave-one-out accuracy."""
    c, k, dim = ex.shape
    if k < 2:
        return shipped(True, 0)(x, t, ex)
    none = torch.zeros(0, dim)

    def loo_correct(keep: list[bool]) -> int:
        right = 0
        for j in range(c):
            for i in range(k):
                rest = [torch.cat([ex[j, :i], ex[j, i + 1 :]]) if m == j else ex[m] for m in range(c)]
                clf = compile_classifier(
                    NAMES, [t[m : m + 1] if keep[m] else none for m in range(c)], [none] * c, rest, [none] * c, 0
                )
                right += int(raw_scores(ex[j, i : i + 1], clf).argmax()) == j
        return right

    base = loo_correct([True] * c)
    keep = [loo_correct([m != j for m in range(c)]) <= base for j in range(c)]
    clf = compile_classifier(
        NAMES, [t[m : m + 1] if keep[m] else none for m in range(c)], [none] * c, list(ex), [none] * c, 0
    )
    return raw_scores(x, clf)


def steal_text_gate(x: torch.Tensor, t: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
    """Max rule, minus the texts that, alone, claim an exemplar of another class (a text the deployment's own
    labelled images contradict)."""
    c, k, dim = ex.shape
    truth = torch.arange(c).repeat_interleave(k)
    claimed = (ex.reshape(-1, dim) @ t.T).argmax(1)
    keep = torch.bincount(claimed[claimed != truth], minlength=c) == 0
    none = torch.zeros(0, dim)
    clf = compile_classifier(
        NAMES, [t[m : m + 1] if keep[m] else none for m in range(c)], [none] * c, list(ex), [none] * c, 0
    )
    return raw_scores(x, clf)


def mirror(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def run(per_pair: int, draws: int, full: bool) -> list[tuple[str, str, str]]:
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
        plain, mirrored, views = [], [], []
        k_max = max(SHOTS)
        for draw_k in range(draws):
            imgs = [im for c, s in ALL_COMBOS for im in drawn(c, s, k_max, EXEMPLAR_SEED + 100 * draw_k)]
            e = torch.from_numpy(sc.embed(imgs)).reshape(len(ALL_COMBOS), k_max, -1)
            m = torch.from_numpy(sc.embed([mirror(im) for im in imgs])).reshape(e.shape)
            plain.append(e)
            mirrored.append(unit(e + m))
            views.append(torch.stack([e, m], dim=2))
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

    def spread(rule: Rule, draws: Sequence[torch.Tensor] = plain, k: int = 5) -> tuple[str, str]:
        """Mean, standard deviation and range over the draws, at K = k."""
        out = []
        for which in ("held", "all"):
            x, y = sets[which]
            a = [100.0 * float((rule(x, texts, ex[:, :k]).argmax(1) == y).float().mean()) for ex in draws]
            out.append(f"{np.mean(a):.1f} ± {np.std(a):.1f} ({min(a):.1f}-{max(a):.1f})")
        return out[0], out[1]

    rows: list[tuple[str, str, str]] = []
    rows.append(("max rule (before the probe): text + K", *curve(shipped(True, 0))))
    rows.append(("max rule: K images alone", *curve(shipped(False, 0))))
    rows.append(("shipped: the exemplars and their mirrors as image examples, text + K", *curve(shipped(True), views)))
    rows.append(("shipped (with mirrors): K images alone", *curve(shipped(False), views)))
    rows.append(("probe without the mirrors: text + K", *curve(shipped(True))))
    rows.append(("probe without the mirrors: K images alone", *curve(shipped(False))))
    rows.append(("max rule, text + 5: mean ± sd (range) over the draws", *spread(shipped(True, 0))))
    rows.append(("shipped (with mirrors), text + 5: mean ± sd (range)", *spread(shipped(True), views)))
    rows.append(("probe without the mirrors, text + 5: mean ± sd (range)", *spread(shipped(True))))
    for steps in (10, 30, 50, 100, 300):
        for decay in (0.0, 1e-3, 1e-2, 1e-1):
            rows.append((f"probe grid: steps={steps} decay={decay:g}, text + K", *curve(probe_grid(steps, decay))))
    for temperature in (0.03, 0.15):
        rows.append(
            (f"probe, temperature {temperature:g}, text + 5", *curve(probe_grid(temperature=temperature), shots=(5,)))
        )
    rows.append(
        ("probe on embeddings centred on the exemplars' mean, text + 5", *curve(probe_grid(centre=True), shots=(5,)))
    )
    for nn in (0.5, 1.0, 2.0):
        rows.append(
            (f"probe logit + {nn:g} x nearest exemplar's cosine, text + 5", *curve(probe_grid(nn=nn), shots=(5,)))
        )
    if not full:
        return rows
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-pair", type=int, default=40, help="test images per colour/shape pair")
    ap.add_argument("--draws", type=int, default=EXEMPLAR_DRAWS, help="independent draws of the exemplars")
    ap.add_argument("--probe-only", action="store_true", help="only the max-rule and probe rows (not the older rules)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args.per_pair, args.draws, not args.probe_only)
    print("| rule | held-out pairs, K = 1 / 2 / 5 / 10 (or as named) | all 18 pairs |\n|---|---:|---:|")
    for name, held, every in rows:
        print(f"| {name} | {held} | {every} |")
    print(f"\ntook {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
