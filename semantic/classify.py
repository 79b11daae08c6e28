"""Two-stage nearest-neighbour classification with positive and negative examples. Pure tensor math, no I/O.

For an image embedding v and an example embedding t (both L2-normalised) the relevance is d = (1 + cos(t, v)) / 2.
For each meta-class the single most relevant of its positive and negative examples decides the class's raw score:
+d when that example is positive, 1 - d when it is negative. The prediction is the argmax over classes; ``scores``
are softmax(raw / temperature). With one positive example per class and no negatives this is ordinary zero-shot CLIP
(d is monotone in cos).

The per-class max is one scatter-max (``Tensor.scatter_reduce(..., "amax")``) of the raw cosines into 2C slots
(class j's positives in slot j, its negatives in slot C + j; every example's slot is fixed at deploy time), so a batch
of images against thousands of classes is one matmul and one scatter, with no Python loop over classes or examples
and no per-request copy of the [B, E] matrix. d is monotone in cos, so it is applied to the [2C, B] maxima only.

Image examples (few-shot exemplars) sit in two more slots per class (2C + j positive, 3C + j negative). Image-to-image
cosines live on another scale than image-to-text ones (an unrelated photo is often closer to an exemplar than a
matching caption is), so before they compete with text examples they are mapped onto the text scale by an affine
per-modality calibration fixed at deploy time from the deployment's own examples (:func:`image_calibration`): the mean
cosine of unrelated image pairs goes to that of unrelated image-text pairs, and the mean of matching image pairs (two
image examples of one class) to that of matching image-text pairs (an image example and its class's text), or, without
matches in both modalities, the unrelated pairs' spreads are matched (a z-score); the result is clamped to [-1, 1].
The mapped cosine then takes part in the same rule (the most relevant example decides, a negative vetoes), so a class
with text examples only scores exactly as before, and a deployment of image examples only uses plain image cosines.
The map is monotone, so it too is applied to the slot maxima only.

A class with positive image examples then gets a *text-anchored linear probe* (:func:`fit_probe`), learnt at deploy
time from the deployment's own positive image examples: one weight vector per such class, initialised at the
normalised mean of its positive text examples (of its positive image examples when it has no text), and trained by
full-batch gradient descent on the softmax cross-entropy of the image examples (logits cos / TEMPERATURE) with a weak
L2 pull back to that start, for a fixed number of steps (deterministic, a few ms). Classes without image examples
take part in the softmax with their fixed scores under the rule above and are not changed. Vetoes are decided
exactly as without the probe (the class's most relevant example, text or mapped image, is a negative); where none
fires, the class's positive evidence is the higher of the probe's score clamp(v . w, -1, 1) and its best mapped image
example, as d = (1 + that) / 2: the probe stands in for the class's texts, and an image example still counts in full
(an image identical to one is as strongly that class as without the probe). The probe learns from every class's
examples at once, so directions that tell shapes apart in the seen classes help the held-out ones, where the text
alone is confidently wrong and the nearest exemplar alone confuses same-coloured shapes (BENCHMARKS.md, issue 17).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

TEMPERATURE = 0.07

# Calibration priors, as pseudo-observations (PRIOR_WEIGHT of them) that the deployment's own unrelated pairs outweigh
# as they grow: what a deployment with a single image example (no unrelated image pair) falls back on. Unrelated
# image pairs under CLIP-like models sit well above unrelated image-text pairs.
TEXT_PRIOR = (0.0, 0.25)  # (mean, std) of unrelated image-text cosines
IMAGE_PRIOR = (0.5, 0.2)  # (mean, std) of unrelated image-image cosines
PRIOR_WEIGHT = 4.0
IDENTITY = (1.0, 0.0)

# The text-anchored probe (fit_probe). Chosen a priori (fit the exemplars from the text; a weak pull towards it); the
# seen colour x shape pairs cannot tell the settings near these apart, and BENCHMARKS.md has the held-out sensitivity.
PROBE_STEPS = 50
PROBE_LR = 1.0
PROBE_DECAY = 1e-3
# Bound on a probe's work per step (trainable classes x training examples x dimensions): about a second at this size
# on two CPU cores. A larger deployment keeps the max rule rather than stall its compile (or a recompile after the
# compiled cache dropped it) for minutes.
PROBE_MAX_WORK = 2.5e8


@dataclass(frozen=True)
class CompiledClassifier:
    """A classifier's examples flattened into one matrix, built once at deploy time."""

    class_names: tuple[str, ...]
    examples: torch.Tensor  # [E, D] float32, L2-normalised
    example_class: torch.Tensor  # [E] int64, index into class_names
    example_positive: torch.Tensor  # [E] bool
    # [E] int64: class for a positive example, n_classes + class for a negative one (the scatter-max target row);
    # 2 * n_classes more for an image example.
    example_slot: torch.Tensor
    # cos' = scale * cos + shift maps image-example cosines onto the text scale (see image_calibration).
    image_map: tuple[float, float] = IDENTITY
    has_images: bool = False
    # Open set: (label, threshold on the best class's raw score), or None.
    open_set: tuple[str, float] | None = None
    # Text-anchored probe: [P, D] weight vectors (not normalised) and [P] the class each replaces the positive
    # evidence of; None without positive image examples (or when compiled with probe_steps=0).
    probe: torch.Tensor | None = None
    probe_class: torch.Tensor | None = None
    # A sigmoid-loss model's (logit scale, logit bias) (SigLIP): each class then also gets a probability
    # (:func:`probabilities`); None for a CLIP.
    logits: tuple[float, float] | None = None
    # Open set on those probabilities: (label, p): rejected when no class's probability reaches p.
    open_set_probability: tuple[str, float] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_slots(self) -> int:
        return (4 if self.has_images else 2) * self.n_classes


def example_slots(example_class: torch.Tensor, example_positive: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Scatter-max target row of each example: its class if positive, n_classes + its class if negative."""
    return example_class + n_classes * (~example_positive).to(example_class.dtype)


def slot_max(values: torch.Tensor, slot: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Max of the rows of ``values`` [E, N] that share a slot: -> [n_slots, N]; a slot with no row stays -inf.

    The one scatter-max behind classification and detection. ``values`` should be contiguous along E (the leading
    dimension): a scatter down the leading dimension is several times faster than one across rows.
    """
    out = torch.full((n_slots, values.shape[1]), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, slot.unsqueeze(1).expand_as(values), values, reduce="amax", include_self=True)


def _shrunk_stats(values: torch.Tensor, prior: tuple[float, float]) -> tuple[float, float]:
    """Mean and std of ``values`` with PRIOR_WEIGHT pseudo-observations of the prior (mean, std)."""
    n, (m0, s0) = values.numel(), prior
    v = values.to(torch.float64)
    mean = (float(v.sum()) + PRIOR_WEIGHT * m0) / (n + PRIOR_WEIGHT)
    var = (float(((v - mean) ** 2).sum()) + PRIOR_WEIGHT * (s0**2 + (m0 - mean) ** 2)) / (n + PRIOR_WEIGHT)
    return mean, max(var**0.5, 1e-3)


def image_calibration(examples: torch.Tensor, slot: torch.Tensor, is_image: torch.Tensor) -> tuple[float, float]:
    """(scale, shift) of the affine map of image-example cosines onto the text scale.

    Anchors: the mean cosine of *unrelated* image pairs maps to that of unrelated image-text pairs, and, where the
    deployment shows what a *match* looks like in both modalities, the mean cosine of matching image pairs maps to
    that of matching image-text pairs (a typical match is equally strong evidence in either modality). Unrelated
    pairs are those of different slots (another class, or the other sign); matching pairs are two image examples of
    the same slot, and an image example with a text example of its slot. Without matches in both modalities the
    slope is the ratio of the unrelated pairs' stds instead (a z-score among unrelated image pairs becomes the same
    z-score among unrelated image-text pairs). Unrelated means and stds are shrunk towards their priors (TEXT_PRIOR,
    IMAGE_PRIOR) by PRIOR_WEIGHT pseudo-observations. Without text examples, or without image examples, there is one
    modality only: the identity.
    """
    is_text = ~is_image
    if not bool(is_image.any()) or not bool(is_text.any()):
        return IDENTITY
    img, base = examples[is_image], slot[is_image]
    txt, txt_base = examples[is_text], slot[is_text]
    cos_t = img @ txt.T
    cos_i = img @ img.T
    same_t = base[:, None] == txt_base[None, :]
    same_i = base[:, None] == base[None, :]
    mu_t, sd_t = _shrunk_stats(cos_t[~same_t], TEXT_PRIOR)
    mu_i, sd_i = _shrunk_stats(cos_i[~same_i], IMAGE_PRIOR)
    scale = sd_t / sd_i
    match_i = cos_i[same_i & ~torch.eye(len(base), dtype=torch.bool)]
    match_t = cos_t[same_t]
    if match_i.numel() and match_t.numel():
        gap_i, gap_t = float(match_i.mean()) - mu_i, float(match_t.mean()) - mu_t
        if gap_i > sd_i / 4 and gap_t > sd_t / 4:  # both modalities tell matches from unrelated pairs
            scale = gap_t / gap_i
    return scale, mu_t - scale * mu_i


def fit_probe(
    init: torch.Tensor,
    probe_class: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    fixed: torch.Tensor,
    steps: int = PROBE_STEPS,
    lr: float = PROBE_LR,
    decay: float = PROBE_DECAY,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """Text-anchored linear probe: -> [P, D] weights, one per trainable class, from ``init`` [P, D].

    ``xs`` [N, D] are training embeddings of classes ``ys`` [N] (class indices); ``fixed`` [N, C] their cosine-scale
    scores under the fixed rule for every class (columns of trainable classes are ignored). Minimises the mean softmax
    cross-entropy of logits / temperature, where trainable class ``probe_class[p]``'s logit is xs . w_p and every
    other class's is its fixed score, plus ``decay`` * ||W - init||^2, by ``steps`` full-batch projected gradient
    steps of size ``lr``: each w stays in the unit ball (||w|| <= 1), so xs . w is at most 1, reached only by x = w,
    and a probe never outscores an exact image match; a step that would raise the loss is not taken and the step size
    halves (so the loss never rises, whatever the embeddings' scale). ``init`` rows should be unit vectors (or
    shorter). Deterministic: no randomness.
    """
    start = init.to(torch.float32)
    x = xs.to(torch.float32)
    rows = torch.arange(len(ys))
    base = fixed.to(torch.float32).clone()

    def loss_and_grad(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        logits = base.index_copy(1, probe_class, x @ w.T).div_(temperature)
        logp = torch.log_softmax(logits, dim=1)
        loss = float(-logp[rows, ys].mean()) + decay * float(((w - start) ** 2).sum())
        dlogits = logp.exp_()
        dlogits[rows, ys] -= 1.0
        grad = dlogits[:, probe_class].T @ x / (temperature * len(x)) + 2.0 * decay * (w - start)
        return loss, grad

    w = start.clone()
    loss, grad = loss_and_grad(w)
    for _ in range(steps):
        trial = w - lr * grad
        trial = trial / trial.norm(dim=1, keepdim=True).clamp(min=1.0)  # back into the unit ball
        trial_loss, trial_grad = loss_and_grad(trial)
        if trial_loss <= loss:
            w, loss, grad = trial, trial_loss, trial_grad
        else:
            lr /= 2.0
    return w


def _with_probe(clf: CompiledClassifier, is_image: torch.Tensor, steps: int, temperature: float) -> CompiledClassifier:
    """``clf`` plus a probe for every class with positive image examples, trained on those examples."""
    train = is_image & clf.example_positive
    xs, ys = clf.examples[train], clf.example_class[train]
    classes = torch.unique(ys)  # sorted
    text_pos = ~is_image & clf.example_positive
    init = []
    for j in classes.tolist():
        own_text = text_pos & (clf.example_class == j)
        src = clf.examples[own_text] if bool(own_text.any()) else xs[ys == j]
        init.append(torch.nn.functional.normalize(src.mean(0), dim=0))
    fixed = raw_scores(xs, clf).mul(2.0).sub(1.0)  # the rule's scores on the cosine scale
    w = fit_probe(torch.stack(init), classes, xs, ys, fixed, steps=steps, temperature=temperature)
    return replace(clf, probe=w.contiguous(), probe_class=classes)


def compile_classifier(
    class_names: list[str],
    positives: list[torch.Tensor],
    negatives: list[torch.Tensor],
    image_positives: list[torch.Tensor] | None = None,
    image_negatives: list[torch.Tensor] | None = None,
    probe_steps: int = PROBE_STEPS,
) -> CompiledClassifier:
    """Flatten per-class positive [P_j, D] and negative [N_j, D] example embeddings (texts), and optionally image
    examples' embeddings in the same form, into one matrix; a class needs at least one positive of either kind.
    Classes with positive image examples get the text-anchored probe (``probe_steps`` = 0: none, the max rule)."""
    if not class_names:
        raise ValueError("Class list is empty.")
    n = len(class_names)
    if not (n == len(positives) == len(negatives)):
        raise ValueError("class_names, positives and negatives must have the same length")
    dim = next(t.shape[1] for t in (*positives, *negatives) if t.ndim == 2)
    empty = [torch.zeros(0, dim)] * n
    img_pos = image_positives if image_positives is not None else empty
    img_neg = image_negatives if image_negatives is not None else empty
    if not (n == len(img_pos) == len(img_neg)):
        raise ValueError("image_positives and image_negatives must have one entry per class")
    blocks: list[torch.Tensor] = []
    cls: list[torch.Tensor] = []
    pos: list[torch.Tensor] = []
    image: list[torch.Tensor] = []
    for j in range(n):
        if positives[j].shape[0] == 0 and img_pos[j].shape[0] == 0:
            raise ValueError(f"class {class_names[j]!r} has no positive examples")
        for block, is_pos, is_img in (
            (positives[j], True, False),
            (negatives[j], False, False),
            (img_pos[j], True, True),
            (img_neg[j], False, True),
        ):
            if block.shape[0]:
                blocks.append(block.to(torch.float32))
                cls.append(torch.full((block.shape[0],), j, dtype=torch.int64))
                pos.append(torch.full((block.shape[0],), is_pos, dtype=torch.bool))
                image.append(torch.full((block.shape[0],), is_img, dtype=torch.bool))
    example_class, example_positive, example_image = torch.cat(cls), torch.cat(pos), torch.cat(image)
    examples = torch.cat(blocks).contiguous()
    base_slot = example_slots(example_class, example_positive, n)
    has_images = bool(example_image.any())
    clf = CompiledClassifier(
        class_names=tuple(class_names),
        examples=examples,
        example_class=example_class,
        example_positive=example_positive,
        example_slot=base_slot + 2 * n * example_image.to(torch.int64),
        image_map=image_calibration(examples, base_slot, example_image) if has_images else IDENTITY,
        has_images=has_images,
    )
    train = example_image & example_positive
    if probe_steps > 0 and bool(train.any()):
        work = int(train.sum()) * len(torch.unique(example_class[train])) * dim
        if work <= PROBE_MAX_WORK:
            clf = _with_probe(clf, example_image, probe_steps, TEMPERATURE)
    return clf


def relevance(image_embeddings: torch.Tensor, example_embeddings: torch.Tensor) -> torch.Tensor:
    """d = (1 + cos) / 2 for every (image, example) pair: [B, D] x [E, D] -> [B, E]."""
    return (1.0 + image_embeddings @ example_embeddings.T) / 2.0


def raw_scores(image_embeddings: torch.Tensor, clf: CompiledClassifier) -> torch.Tensor:
    """Two-stage rule: [B, D] image embeddings -> [B, C] raw scores in [0, 1]."""
    # [E, B]: contiguous along examples, so the scatter runs down the leading dimension (as in semantic/detect.py).
    cos_t = clf.examples @ image_embeddings.to(torch.float32).T
    c = clf.n_classes
    best = slot_max(cos_t, clf.example_slot, clf.n_slots)
    image_pos: torch.Tensor | None = None
    if clf.has_images:  # image slots onto the text scale (monotone, so on the maxima), then the max of both
        scale, shift = clf.image_map
        img = best[2 * c :]
        mapped = torch.where(torch.isinf(img), img, img.mul(scale).add_(shift).clamp_(-1.0, 1.0))
        image_pos = mapped[:c]
        best = torch.maximum(best[: 2 * c], mapped)
    d = best.add_(1.0).div_(2.0).T  # [B, 2C]; a slot without examples stays -inf
    best_pos, best_neg = d[:, :c], d[:, c:]
    # Ties go to the positive example; a class without negatives has best_neg = -inf.
    keep = best_pos >= best_neg
    if clf.probe is not None and clf.probe_class is not None and image_pos is not None:
        # The veto is decided as above; where none fires, these classes' positive evidence is the probe's score or
        # their best (mapped) image example, whichever is higher: the probe stands in for their texts.
        probed = (image_embeddings.to(torch.float32) @ clf.probe.T).clamp_(-1.0, 1.0)
        probed = torch.maximum(probed, image_pos[clf.probe_class].T).add_(1.0).div_(2.0)
        best_pos = best_pos.index_copy(1, clf.probe_class, probed)
    return torch.where(keep, best_pos, 1.0 - best_neg)


def rejected(raw: torch.Tensor, threshold: float) -> torch.Tensor:
    """Open set: [B] True where the best class's raw score (its evidence, in [0, 1]) is below ``threshold``."""
    return raw.max(dim=-1).values < threshold


def probabilities(raw: torch.Tensor, logits: tuple[float, float]) -> torch.Tensor:
    """Per-class sigmoid probabilities [B, C] of a sigmoid-loss model from the rule's raw scores [B, C].

    The raw score is taken back to the cosine scale (c = 2 * raw - 1) and read as SigLIP reads an (image, text)
    pair: sigmoid(scale * c + bias). Where a positive example decided the class, c is its cosine, so a class with one
    text example gets exactly SigLIP's own probability for that text. Where a negative example decided it (the veto),
    c is minus that negative's cosine, so the probability is sigmoid(-scale * cos_neg + bias): near 0 (with SigLIP's
    bias of about -10 and scale of about 110 it is below 1e-4 for any cos_neg >= 0), the class reads as "not this".
    Each probability stands on its own (several classes may pass 0.5, or none), unlike the softmax ``scores``.
    """
    scale, bias = logits
    return torch.sigmoid(raw.mul(2.0).sub(1.0).mul(scale).add(bias))


def rejected_by_probability(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Open set on probabilities: [B] True where no class's probability reaches ``p``."""
    return probs.max(dim=-1).values < p


def classify(
    image_embeddings: torch.Tensor, clf: CompiledClassifier, temperature: float = TEMPERATURE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw [B, C], softmax scores [B, C], predicted class index [B])."""
    raw = raw_scores(image_embeddings, clf)
    return raw, torch.softmax(raw / temperature, dim=-1), raw.argmax(dim=-1)
