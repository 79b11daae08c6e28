"""Two-stage nearest-neighbour classification with positive and negative examples. Pure tensor math, no I/O.

For an image embedding v and an example embedding t (both L2-normalised) the relevance is d = (1 + cos(t, v)) / 2.
For each meta-class the single most relevant of its positive and negative examples decides the class's raw score:
+d when that example is positive, 1 - d when it is negative. The prediction is the argmax over classes; ``scores``
are softmax(raw / temperature). With one positive example per class and no negatives this is ordinary zero-shot CLIP
(d is monotone in cos).

The per-class max is a scatter-max (``Tensor.scatter_reduce(..., "amax")``) over the flat example matrix, so a batch of
images against thousands of classes is one matmul and two scatters, with no Python loop over classes or examples.
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

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


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
    return CompiledClassifier(
        class_names=tuple(class_names),
        examples=torch.cat(blocks).contiguous(),
        example_class=torch.cat(cls),
        example_positive=torch.cat(pos),
    )


def relevance(image_embeddings: torch.Tensor, example_embeddings: torch.Tensor) -> torch.Tensor:
    """d = (1 + cos) / 2 for every (image, example) pair: [B, D] x [E, D] -> [B, E]."""
    return (1.0 + image_embeddings @ example_embeddings.T) / 2.0


def _scatter_max(values: torch.Tensor, index: torch.Tensor, n: int, mask: torch.Tensor) -> torch.Tensor:
    """Per-class max of ``values`` [B, E] over the examples selected by ``mask``; -inf where a class has none."""
    out = torch.full((values.shape[0], n), float("-inf"), dtype=values.dtype, device=values.device)
    if bool(mask.any()):
        sel = values[:, mask]
        idx = index[mask].unsqueeze(0).expand_as(sel)
        out.scatter_reduce_(1, idx, sel, reduce="amax", include_self=True)
    return out


def raw_scores(image_embeddings: torch.Tensor, clf: CompiledClassifier) -> torch.Tensor:
    """Two-stage rule: [B, D] image embeddings -> [B, C] raw scores in [0, 1]."""
    d = relevance(image_embeddings.to(torch.float32), clf.examples)
    best_pos = _scatter_max(d, clf.example_class, clf.n_classes, clf.example_positive)
    best_neg = _scatter_max(d, clf.example_class, clf.n_classes, ~clf.example_positive)
    # Ties go to the positive example; a class without negatives has best_neg = -inf.
    return torch.where(best_pos >= best_neg, best_pos, 1.0 - best_neg)


def classify(
    image_embeddings: torch.Tensor, clf: CompiledClassifier, temperature: float = TEMPERATURE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw [B, C], softmax scores [B, C], predicted class index [B])."""
    raw = raw_scores(image_embeddings, clf)
    return raw, torch.softmax(raw / temperature, dim=-1), raw.argmax(dim=-1)
