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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEMPERATURE = 0.07


@dataclass(frozen=True)
class CompiledClassifier:
    """A classifier's examples flattened into one matrix, built once at deploy time."""

    class_names: tuple[str, ...]
    examples: torch.Tensor  # [E, D] float32, L2-normalised
    example_class: torch.Tensor  # [E] int64, index into class_names
    example_positive: torch.Tensor  # [E] bool
    # [E] int64: class for a positive example, n_classes + class for a negative one (the scatter-max target row).
    example_slot: torch.Tensor

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


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


def compile_classifier(
    class_names: list[str],
    positives: list[torch.Tensor],
    negatives: list[torch.Tensor],
) -> CompiledClassifier:
    """Flatten per-class positive [P_j, D] and negative [N_j, D] example embeddings into one matrix."""
    if not class_names:
        raise ValueError("Class list is empty.")
    if not (len(class_names) == len(positives) == len(negatives)):
        raise ValueError("class_names, positives and negatives must have the same length")
    blocks: list[torch.Tensor] = []
    cls: list[torch.Tensor] = []
    pos: list[torch.Tensor] = []
    for j, (p, n) in enumerate(zip(positives, negatives)):
        if p.shape[0] == 0:
            raise ValueError(f"class {class_names[j]!r} has no positive examples")
        for block, is_pos in ((p, True), (n, False)):
            if block.shape[0]:
                blocks.append(block.to(torch.float32))
                cls.append(torch.full((block.shape[0],), j, dtype=torch.int64))
                pos.append(torch.full((block.shape[0],), is_pos, dtype=torch.bool))
    example_class, example_positive = torch.cat(cls), torch.cat(pos)
    return CompiledClassifier(
        class_names=tuple(class_names),
        examples=torch.cat(blocks).contiguous(),
        example_class=example_class,
        example_positive=example_positive,
        example_slot=example_slots(example_class, example_positive, len(class_names)),
    )


def relevance(image_embeddings: torch.Tensor, example_embeddings: torch.Tensor) -> torch.Tensor:
    """d = (1 + cos) / 2 for every (image, example) pair: [B, D] x [E, D] -> [B, E]."""
    return (1.0 + image_embeddings @ example_embeddings.T) / 2.0


def raw_scores(image_embeddings: torch.Tensor, clf: CompiledClassifier) -> torch.Tensor:
    """Two-stage rule: [B, D] image embeddings -> [B, C] raw scores in [0, 1]."""
    # [E, B]: contiguous along examples, so the scatter runs down the leading dimension (as in semantic/detect.py).
    cos_t = clf.examples @ image_embeddings.to(torch.float32).T
    c = clf.n_classes
    d = slot_max(cos_t, clf.example_slot, 2 * c).add_(1.0).div_(2.0).T  # [B, 2C]; a slot without examples stays -inf
    best_pos, best_neg = d[:, :c], d[:, c:]
    # Ties go to the positive example; a class without negatives has best_neg = -inf.
    return torch.where(best_pos >= best_neg, best_pos, 1.0 - best_neg)


def classify(
    image_embeddings: torch.Tensor, clf: CompiledClassifier, temperature: float = TEMPERATURE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw [B, C], softmax scores [B, C], predicted class index [B])."""
    raw = raw_scores(image_embeddings, clf)
    return raw, torch.softmax(raw / temperature, dim=-1), raw.argmax(dim=-1)
