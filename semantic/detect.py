"""Open-vocabulary detection scoring with positive and negative examples, and NMS. Pure tensor math, no I/O.

Inputs per image come from the detector (``runners.owl``): N candidate boxes with a normalised class embedding each and
OWLv2's per-box logit shift and scale. A detector's examples are flattened into one matrix [E, D] with the class and
the polarity of every example (same layout as ``semantic.classify.CompiledClassifier``).

The rule, for box i and class c:

- ``fit[i, e] = sigmoid((cos(box_i, example_e) + shift_i) * scale_i)``: OWLv2's class probability of example e.
- ``pos[i, c]`` / ``neg[i, c]``: the best fit over the positive / negative examples of class c (0 when none).
- Box i survives for class c when ``pos[i, c] >= threshold[c]`` and ``pos[i, c] >= neg[j, c]`` for every neighbour j
  of i (boxes with IoU >= nms_threshold, i itself included): a negative example that fits an overlapping box better
  vetoes the positive detection ("a cat, but not a cat toy").
- Per-class greedy NMS on the same IoU graph (or, class-agnostic, every box keeps its best surviving class and one
  greedy NMS runs over all classes).

The IoU graph is computed once per image and reused for every class. Nothing loops in Python over boxes or classes.
Work is proportional to the candidates P (box, class pairs above threshold), which are few in practice: the negative
veto looks at P x N (candidate pairs x boxes), NMS at a P x P "outranks and overlaps, same class" matrix. Both run in
chunks bounded by ``_CHUNK_ELEMENTS`` (NMS chunks hold whole classes), so a pathological call (threshold 0, thousands
of classes) costs time, not unbounded memory.
"""

from __future__ import annotations

import math

import torch

from semantic.classify import example_slots, slot_max

# Bound on the elements of one [pairs, N] veto tensor, and (up to 4x for NMS chunks of whole classes) of one NMS matrix.
_CHUNK_ELEMENTS = 4_000_000

__all__ = [
    "box_class_scores",
    "box_example_fit",
    "class_scores",
    "detect",
    "iou_graph",
    "iou_matrix",
]


def box_example_fit(
    box_embeds: torch.Tensor,
    example_embeds: torch.Tensor,
    logit_shift: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """[N, D] x [E, D] -> [N, E] class probabilities, as in transformers' ``Owlv2ClassPredictionHead``.

    Both embedding sets must already be L2-normalised. ``logit_scale`` is the head's final scale, i.e. already
    ``elu(linear(x)) + 1`` (what ``runners.owl`` stores), not the raw linear output. HF returns the logits and applies
    the sigmoid in post-processing; here the sigmoid is applied directly so every score is a probability in [0, 1].

    The result is a transposed view of a contiguous [E, N] tensor: ``class_scores`` reduces over examples, and a
    scatter along the leading, contiguous dimension is several times faster than one across rows.
    """
    # (cos + shift) * scale, fused into one matmul-with-bias and in-place ops on the [E, N] result.
    fit_t = torch.addmm(logit_shift.unsqueeze(0), example_embeds, box_embeds.T)
    return fit_t.mul_(logit_scale.unsqueeze(0)).sigmoid_().T


def class_scores(
    fit: torch.Tensor,
    example_class: torch.Tensor,
    example_is_positive: torch.Tensor,
    n_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class max of ``fit`` [N, E] over positive and over negative examples -> (pos [N, C], neg [N, C]).

    A class without negative (or positive) examples gets 0 there. 0 is the neutral element for probabilities (fit is a
    sigmoid, so >= 0): ``pos >= neg`` then always holds for a class without negatives, and the tensors stay finite.
    One scatter-max over all examples: row ``class`` for positives, row ``n_classes + class`` for negatives.
    """
    fit_t = fit.T  # [E, N]; contiguous when fit comes from box_example_fit
    slot = example_slots(example_class, example_is_positive, n_classes)
    out_t = slot_max(fit_t, slot, 2 * n_classes).clamp_(min=0.0).T
    return out_t[:, :n_classes], out_t[:, n_classes:]


def box_class_scores(
    box_embeds: torch.Tensor,
    example_embeds: torch.Tensor,
    logit_shift: torch.Tensor,
    logit_scale: torch.Tensor,
    example_class: torch.Tensor,
    example_is_positive: torch.Tensor,
    n_classes: int,
    slot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``class_scores(box_example_fit(...), ...)`` without materialising the [N, E] probabilities: (pos, neg) [N, C].

    For a fixed box, e -> sigmoid((cos_e + shift) * scale) is non-decreasing in cos_e (scale = elu + 1 >= 0), so the
    per-class max may be taken over raw cosines and the shift, scale and sigmoid applied to [N, 2C] values only. That
    leaves one matmul and one scatter over the [E, N] cosines. Classes without negatives get 0 (sigmoid(-inf)).
    """
    cos_t = example_embeds @ box_embeds.T  # [E, N], contiguous: the scatter runs along its leading dimension
    if slot is None:  # a compiled detector passes the slots it computed once at deploy time
        slot = example_slots(example_class, example_is_positive, n_classes)
    best = slot_max(cos_t, slot, 2 * n_classes)
    best.add_(logit_shift.unsqueeze(0)).mul_(logit_scale.unsqueeze(0)).sigmoid_()
    # Slots without examples hold sigmoid(-inf * scale): 0, or NaN where scale underflowed to 0. Pin them to 0.
    empty = torch.bincount(slot, minlength=2 * n_classes) == 0
    out_t = best.masked_fill_(empty.unsqueeze(1), 0.0).T
    return out_t[:, :n_classes], out_t[:, n_classes:]


def iou_matrix(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: [N, 4] -> [N, N]. Pairs with zero union (degenerate boxes) get 0, not NaN."""
    x1, y1, x2, y2 = boxes.T.contiguous().unbind(0)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    # Few [N, N] temporaries, updated in place: at N = 300 this is memory traffic, not arithmetic.
    iw = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :])).clamp_(min=0)
    ih = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :])).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (area[:, None] + area[None, :]).sub_(inter)
    iou = inter.div_(union)
    if not bool((area > 0).all()):  # union >= max(area_i, area_j), so only degenerate boxes can give 0 / 0
        iou.masked_fill_(union <= 0, 0.0)
    return iou


def iou_graph(boxes: torch.Tensor, nms_threshold: float) -> torch.Tensor:
    """bool [N, N]: True where IoU >= nms_threshold; the diagonal is always True (a box is its own neighbour)."""
    g = iou_matrix(boxes) >= nms_threshold
    g.fill_diagonal_(True)
    return g


def _vetoed(
    pos_p: torch.Tensor,
    box_p: torch.Tensor,
    cls_p: torch.Tensor,
    neg: torch.Tensor,
    thresholds: torch.Tensor,
    graph: torch.Tensor,
) -> torch.Tensor:
    """bool [P]: candidate pair p = (box, class) has a neighbour (itself included) whose negative beats pos_p.

    Only classes with a "hot" negative can veto: neg[j, c] > pos[i, c] >= threshold[c] implies neg[j, c] >
    threshold[c]. For the pairs of those classes one [P', N] masked max of row gathers (graph rows of the boxes,
    negative rows of the classes) finds each pair's strongest neighbouring negative.
    """
    veto = torch.zeros(pos_p.shape[0], dtype=torch.bool, device=pos_p.device)
    hot_class = (neg > thresholds.unsqueeze(0)).any(0)
    if pos_p.numel() == 0 or not bool(hot_class.any()):
        return veto
    sel = hot_class[cls_p].nonzero(as_tuple=True)[0]
    neg_t = neg.T.contiguous()  # [C, N]: a class's negatives as one contiguous row
    step = max(1, _CHUNK_ELEMENTS // max(1, graph.shape[0]))
    for s in range(0, sel.shape[0], step):  # usually a single chunk
        i = sel[s : s + step]
        nbr = graph.index_select(0, box_p[i])  # [P', N] neighbours of each pair's box
        strongest = torch.where(nbr, neg_t.index_select(0, cls_p[i]), float("-inf")).amax(1)
        veto[i] = pos_p[i] < strongest
    return veto


def _greedy_nms(box: torch.Tensor, group: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
    """Greedy NMS within each group, for (box, group) items sorted by group, then best first -> keep [P] bool.

    Greedy NMS (visit items best first; keep one unless an already kept overlapping item of its group outranks it) is
    the unique solution of ``keep[p] = not any(keep[q] for q < p in p's group with graph[box[q], box[p]])``. With the
    "q outranks and overlaps p" relation gathered from the IoU graph as a strictly lower-triangular matrix A, the
    equation is solved by fixed-point (Jacobi) iteration from ``keep = all``, one mat-vec per round: after t rounds
    every item whose longest chain of higher-ranked overlapping items is shorter than t is final, and any fixed point
    is the greedy result, so the loop stops at the first round that changes nothing. A round is O(T^2) for a chunk
    of T items; clusters of mutually overlapping boxes settle in 2 rounds, the worst case (a chain of pairwise
    overlapping boxes with decreasing scores) needs O(T). Every group of a detector usually fits one chunk; chunks
    hold whole groups, of about sqrt(_CHUNK_ELEMENTS) / 2 items unless one group alone is larger.
    """
    p = box.shape[0]
    keep = torch.ones(p, dtype=torch.bool, device=box.device)
    if p < 2:
        return keep
    limit = max(1, math.isqrt(_CHUNK_ELEMENTS) // 2)
    if p <= limit:
        bounds = [0, p]
    else:  # chunk id = where a group starts // limit; groups are never split
        _, counts = torch.unique_consecutive(group, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        _, chunk_sizes = torch.unique_consecutive(starts // limit, return_counts=True)
        group_ends = torch.cumsum(counts, 0)
        bounds = [0, *group_ends[torch.cumsum(chunk_sizes, 0) - 1].tolist()]
    for s, e in zip(bounds[:-1], bounds[1:]):  # usually a single chunk
        b, g = box[s:e], group[s:e]
        t = e - s
        # a[p, q] = 1 when q ranks higher (q < p), is in p's group and overlaps p. Row gathers are far faster than
        # 2-D advanced indexing; rows are converted to float once so the mat-vec below needs no further conversion.
        a = graph.index_select(0, b).to(torch.float32).index_select(1, b)
        a.masked_fill_(g.unsqueeze(1) != g.unsqueeze(0), 0.0).tril_(-1)
        kept = keep[s:e]
        for _ in range(t + 1):  # bounded by the longest chain; see docstring
            new_kept = (a @ kept.to(torch.float32)) == 0
            if torch.equal(new_kept, kept):
                break
            kept = new_kept
        keep[s:e] = kept
    return keep


def detect(
    boxes: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    thresholds: torch.Tensor,
    nms_threshold: float,
    class_agnostic_nms: bool,
    graph: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the detection rule (module docstring) to one image.

    boxes [N, 4] xyxy, pos / neg [N, C] from ``class_scores``, thresholds [C]. ``graph`` is ``iou_graph(boxes,
    nms_threshold)`` when the caller already has it. Returns (box index [K] int64, class index [K] int64, score [K]),
    sorted by descending score (ties: lower box index, then lower class index first).
    """
    if graph is None:
        graph = iou_graph(boxes, nms_threshold)
    thresholds = thresholds.to(pos.dtype)
    box_p, cls_p = (pos >= thresholds.unsqueeze(0)).nonzero(as_tuple=True)  # candidate pairs, box-major
    pos_p = pos[box_p, cls_p]
    ok = ~_vetoed(pos_p, box_p, cls_p, neg, thresholds, graph)  # the diagonal covers the box's own negatives
    box_p, cls_p, pos_p = box_p[ok], cls_p[ok], pos_p[ok]
    if class_agnostic_nms:
        surv = torch.zeros_like(pos, dtype=torch.bool)
        surv[box_p, cls_p] = True
        masked = torch.where(surv, pos, float("-inf"))
        best_cls = masked.argmax(1)  # argmax documents "first maximal index" for ties; Tensor.max(dim) does not
        box_p = surv.any(1).nonzero(as_tuple=True)[0]
        cls_p = best_cls[box_p]
        pos_p = pos[box_p, cls_p]
        rank = torch.sort(pos_p, descending=True, stable=True).indices
        final = rank[_greedy_nms(box_p[rank], torch.zeros_like(box_p), graph)]
    else:
        # Best first over all pairs (stable: ties keep box-major order), then grouped by class (stable again).
        rank = torch.sort(pos_p, descending=True, stable=True).indices
        by_class = torch.sort(cls_p[rank], stable=True).indices
        perm = rank[by_class]
        keep_sorted = _greedy_nms(box_p[perm], cls_p[perm], graph)
        keep_ranked = torch.zeros_like(keep_sorted)
        keep_ranked[by_class] = keep_sorted  # back to global rank order = the output order
        final = rank[keep_ranked]
    return box_p[final], cls_p[final], pos_p[final]


QUERY_RULE_VERSION = "v1"  # the rule below; part of the cache namespace of image queries


def image_query_index(boxes: torch.Tensor, width: float, height: float, ratio: float = 0.8) -> int:
    """Which box of an example image stands for it (OWLv2's image-guided detection): among the boxes whose IoU with
    the whole image is at least ``ratio`` times the best such IoU, the one with the highest objectness. ``boxes``
    [k, 4] xyxy are sorted by objectness (the detector's order), so that is the first such box."""
    if boxes.shape[0] == 0:
        raise ValueError("the example image has no boxes")
    b = boxes.to(torch.float32)
    iw = (torch.minimum(b[:, 2], torch.tensor(width)) - b[:, 0].clamp(min=0.0)).clamp(min=0.0)
    ih = (torch.minimum(b[:, 3], torch.tensor(height)) - b[:, 1].clamp(min=0.0)).clamp(min=0.0)
    inter = iw * ih
    area = (b[:, 2] - b[:, 0]).clamp(min=0.0) * (b[:, 3] - b[:, 1]).clamp(min=0.0)
    iou = inter / (area + width * height - inter).clamp(min=1e-9)
    keep = (iou >= ratio * iou.max()).nonzero(as_tuple=True)[0]
    return int(keep[0])
