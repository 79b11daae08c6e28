"""The project's rules written plainly, for clarity rather than speed: what tests compare the fast code against.

One copy of each rule for every test and tool that needs it (classification's two-stage nearest neighbour, the
detection rule from the model's raw per-box outputs, IoU and greedy NMS).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def reference_raw(image: Any, classes: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[float]:
    """Raw classification scores of one image: per class (positive vectors, negative vectors), the most relevant
    example decides, +d if positive, 1 - d if negative, with d = (1 + cos) / 2 (ties go to the positive)."""
    out = []
    for pos, neg in classes:
        best, best_is_pos = -math.inf, True
        for vecs, is_pos in ((pos, True), (neg, False)):
            for v in vecs:
                d = float((1 + image @ v) / 2)
                if d > best or (d == best and is_pos):
                    best, best_is_pos = d, is_pos
        out.append(best if best_is_pos else 1 - best)
    return out


def reference_raw_mixed(
    image: Any,
    classes: Sequence[tuple[Sequence[Any], Sequence[Any], Sequence[Any], Sequence[Any]]],
    image_map: tuple[float, float],
    probe: Mapping[int, Any] | None = None,
) -> list[float]:
    """The same rule with image examples: per class (text positives, text negatives, image positives, image
    negatives); an image example's cosine is first mapped onto the text scale, cos' = clamp(scale * cos + shift,
    -1, 1), then every example competes as a text example does. ``probe``: class index -> probe weight vector w; where
    such a class is not vetoed, its score is (1 + max(clamp(image . w, -1, 1), its best mapped image example)) / 2
    instead (its texts no longer count)."""
    scale, shift = image_map
    out = []
    for j, (pos, neg, ipos, ineg) in enumerate(classes):
        best, best_is_pos = -math.inf, True
        for vecs, is_pos, is_img in ((pos, True, False), (neg, False, False), (ipos, True, True), (ineg, False, True)):
            for v in vecs:
                cos = float(image @ v)
                if is_img:
                    cos = min(1.0, max(-1.0, scale * cos + shift))
                d = (1 + cos) / 2
                if d > best or (d == best and is_pos):
                    best, best_is_pos = d, is_pos
        if best_is_pos and probe is not None and j in probe:  # not vetoed: the probe or the best image example
            cos = min(1.0, max(-1.0, float(image @ probe[j])))
            for v in ipos:
                cos = max(cos, min(1.0, max(-1.0, scale * float(image @ v) + shift)))
            best = (1 + cos) / 2
        out.append(best if best_is_pos else 1 - best)
    return out


Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------------------------------------------------
# Reference implementation: the rule exactly as specified, in plain Python, written for clarity rather than speed.
# --------------------------------------------------------------------------------------------------------------------


def ref_iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def ref_image_query(boxes: Sequence[Box], objectness: Sequence[float], width: float, height: float) -> int:
    """Which box of an example image stands for it (OWLv2's image-guided detection): of the boxes whose IoU with the
    whole image is at least 0.8 of the best such IoU, the one with the most objectness (ties: the first)."""
    whole = (0.0, 0.0, float(width), float(height))
    ious = [ref_iou(b, whole) for b in boxes]
    near = [i for i, iou in enumerate(ious) if iou >= 0.8 * max(ious)]
    return max(near, key=lambda i: (objectness[i], -i))


def ref_greedy_nms(candidates: list[int], score: dict[int, float], neighbours: list[set[int]]) -> list[int]:
    """Visit by descending score (ties: lower index first); keep a box unless a kept box is its neighbour."""
    kept: list[int] = []
    for i in sorted(candidates, key=lambda i: (-score[i], i)):
        if not any(k in neighbours[i] for k in kept):
            kept.append(i)
    return kept


def ref_detect(
    boxes: list[Box],
    pos: list[list[float]],
    neg: list[list[float]],
    thresholds: list[float],
    nms_threshold: float,
    class_agnostic_nms: bool,
) -> list[tuple[int, int, float]]:
    n = len(boxes)
    c = len(thresholds)
    neighbours = [{j for j in range(n) if j == i or ref_iou(boxes[i], boxes[j]) >= nms_threshold} for i in range(n)]

    def survives(i: int, k: int) -> bool:
        if pos[i][k] < thresholds[k]:
            return False
        return all(pos[i][k] >= neg[j][k] for j in neighbours[i])  # includes j == i

    out: list[tuple[int, int, float]] = []
    if not class_agnostic_nms:
        for k in range(c):
            cands = [i for i in range(n) if survives(i, k)]
            for i in ref_greedy_nms(cands, {i: pos[i][k] for i in cands}, neighbours):
                out.append((i, k, pos[i][k]))
    else:
        best: dict[int, tuple[int, float]] = {}
        for i in range(n):
            for k in range(c):
                if survives(i, k) and (i not in best or pos[i][k] > best[i][1]):
                    best[i] = (k, pos[i][k])
        for i in ref_greedy_nms(list(best), {i: best[i][1] for i in best}, neighbours):
            out.append((i, best[i][0], best[i][1]))
    return sorted(out, key=lambda t: (-t[2], t[0], t[1]))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def reference_box_scores(
    class_embeds: Sequence[Sequence[float]],
    logit_shift: Sequence[float],
    logit_scale: Sequence[float],
    classes: Sequence[tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]]],
) -> tuple[list[list[float]], list[list[float]]]:
    """(pos, neg) [N][C]: per box and class the best fit over the class's positive (negative) examples, where fit is
    OWL's class head, sigmoid((cos + shift) * scale); a class without negatives has 0 there."""

    def fit(i: int, example: Sequence[float]) -> float:
        cos = sum(a * b for a, b in zip(class_embeds[i], example))
        return sigmoid((cos + logit_shift[i]) * logit_scale[i])

    pos = [[max(fit(i, e) for e in p) for p, _ in classes] for i in range(len(class_embeds))]
    neg = [[max((fit(i, e) for e in n), default=0.0) for _, n in classes] for i in range(len(class_embeds))]
    return pos, neg


def reference_scores(image: Any, classes: Sequence[dict[str, Any]], vectors: dict[str, Any]) -> dict[str, float]:
    """``reference_raw`` for DirectAI class configs, given each example text's vector: {class name: raw score}."""
    per_class = [
        ([vectors[t] for t in c["examples_to_include"]], [vectors[t] for t in c.get("examples_to_exclude", [])])
        for c in classes
    ]
    return dict(zip([c["name"] for c in classes], reference_raw(image, per_class)))
