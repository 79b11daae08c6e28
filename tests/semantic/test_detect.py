"""semantic.detect against a plain-Python reference of the detection rule, torchvision's NMS, and HF's class head."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import semantic.detect as detect_module
from semantic.detect import (
    box_class_scores,
    box_example_fit,
    class_scores,
    detect,
    image_query_index,
    iou_graph,
    iou_matrix,
)
from testing.reference import ref_detect

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def as_triples(result: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[tuple[int, int, float]]:
    b, k, s = result
    return list(zip(b.tolist(), k.tolist(), s.tolist()))


# --------------------------------------------------------------------------------------------------------------------
# Strategies. Integer box coordinates and scores on a 1/8 grid make IoU/threshold ties and score ties common (they are
# the interesting cases) while keeping float32 and float64 comparisons identical.
# --------------------------------------------------------------------------------------------------------------------


@st.composite
def detection_problems(draw: st.DrawFn) -> dict:
    n = draw(st.integers(0, 12))
    c = draw(st.integers(1, 4))
    boxes = []
    for _ in range(n):
        x = draw(st.integers(0, 24))
        y = draw(st.integers(0, 24))
        boxes.append((float(x), float(y), float(x + draw(st.integers(0, 12))), float(y + draw(st.integers(0, 12)))))
    grid = st.integers(0, 8).map(lambda v: v / 8)
    pos = [[draw(grid) for _ in range(c)] for _ in range(n)]
    # Often a class has no negatives at all (column of zeros), as in real use.
    neg_cols = [draw(st.booleans()) for _ in range(c)]
    neg = [[draw(grid) if neg_cols[k] else 0.0 for k in range(c)] for _ in range(n)]
    thresholds = [draw(grid) for _ in range(c)]
    nms_threshold = draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]))
    return {"boxes": boxes, "pos": pos, "neg": neg, "thresholds": thresholds, "nms_threshold": nms_threshold}


def run_both(p: dict, agnostic: bool) -> tuple[list, list]:
    n, c = len(p["boxes"]), len(p["thresholds"])
    boxes = torch.tensor(p["boxes"], dtype=torch.float32).reshape(n, 4)
    pos = torch.tensor(p["pos"], dtype=torch.float32).reshape(n, c)
    neg = torch.tensor(p["neg"], dtype=torch.float32).reshape(n, c)
    thr = torch.tensor(p["thresholds"], dtype=torch.float32)
    got = as_triples(detect(boxes, pos, neg, thr, p["nms_threshold"], agnostic))
    want = ref_detect(p["boxes"], p["pos"], p["neg"], p["thresholds"], p["nms_threshold"], agnostic)
    return got, want


@settings(max_examples=300, deadline=None)
@given(detection_problems())
def test_matches_reference_per_class_nms(p: dict) -> None:
    got, want = run_both(p, agnostic=False)
    assert got == want


@settings(max_examples=300, deadline=None)
@given(detection_problems())
def test_matches_reference_class_agnostic_nms(p: dict) -> None:
    got, want = run_both(p, agnostic=True)
    assert got == want


@settings(max_examples=100, deadline=None)
@given(detection_problems(), st.booleans())
def test_matches_reference_when_work_is_chunked(p: dict, agnostic: bool) -> None:
    """Tiny chunks force the multi-chunk paths (several NMS chunks of whole classes, several veto chunks)."""
    with mock.patch.object(detect_module, "_CHUNK_ELEMENTS", 16):
        got, want = run_both(p, agnostic)
    assert got == want


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 80), st.integers(1, 5), st.sampled_from([0.2, 0.5, 0.8]))
def test_no_negatives_equals_torchvision_nms_per_class(seed: int, n: int, c: int, nms_thr: float) -> None:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 40], 1)
    pos = torch.rand(n, c, generator=g)  # continuous: no ties, no IoU exactly at the threshold
    neg = torch.zeros(n, c)
    thr = torch.rand(c, generator=g) * 0.6
    got = set(as_triples(detect(boxes, pos, neg, thr, nms_thr, class_agnostic_nms=False)))
    want = set()
    for k in range(c):
        idx = (pos[:, k] >= thr[k]).nonzero(as_tuple=True)[0]
        for i in idx[torchvision.ops.nms(boxes[idx], pos[idx, k], nms_thr)].tolist():
            want.add((i, k, pos[i, k].item()))
    assert got == want


def test_output_sorted_by_score() -> None:
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 20], 1)
    pos = torch.rand(50, 3, generator=g)
    for agnostic in (False, True):
        _, _, s = detect(boxes, pos, torch.zeros_like(pos), torch.full((3,), 0.2), 0.5, agnostic)
        assert s.numel() > 0 and bool((s[:-1] >= s[1:]).all())


@settings(max_examples=100, deadline=None)
@given(detection_problems())
def test_class_agnostic_changes_nothing_for_one_class(p: dict) -> None:
    c = len(p["thresholds"])
    one = {
        "boxes": p["boxes"],
        "pos": [row[:1] for row in p["pos"]],
        "neg": [row[:1] for row in p["neg"]],
        "thresholds": p["thresholds"][:1],
        "nms_threshold": p["nms_threshold"],
    }
    assert c >= 1
    per_class, _ = run_both(one, agnostic=False)
    agnostic, _ = run_both(one, agnostic=True)
    assert per_class == agnostic


def test_class_agnostic_changes_nothing_when_classes_do_not_overlap() -> None:
    # Each class lives in its own 100-px tile of the image; boxes of different classes cannot overlap.
    g = torch.Generator().manual_seed(3)
    c, per = 4, 15
    boxes, pos = [], torch.zeros(c * per, c)
    for k in range(c):
        xy = torch.rand(per, 2, generator=g) * 50 + torch.tensor([200.0 * k, 0.0])
        boxes.append(torch.cat([xy, xy + 10 + torch.rand(per, 2, generator=g) * 30], 1))
        pos[k * per : (k + 1) * per, k] = torch.rand(per, generator=g)
    b = torch.cat(boxes)
    thr = torch.full((c,), 0.1)
    a = as_triples(detect(b, pos, torch.zeros_like(pos), thr, 0.3, class_agnostic_nms=False))
    bb = as_triples(detect(b, pos, torch.zeros_like(pos), thr, 0.3, class_agnostic_nms=True))
    assert a == bb and len({k for _, k, _ in a}) == c


def test_negative_on_overlapping_box_removes_positive() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    thr = torch.tensor([0.5])
    pos = torch.tensor([[0.8], [0.0], [0.0]])
    for agnostic in (False, True):
        # Negative fits the overlapping box 1 better than the positive fits box 0: box 0 is vetoed.
        neg = torch.tensor([[0.0], [0.9], [0.0]])
        assert detect(boxes, pos, neg, thr, 0.5, agnostic)[0].tolist() == []
        # A weaker negative does not veto.
        neg = torch.tensor([[0.0], [0.7], [0.0]])
        assert detect(boxes, pos, neg, thr, 0.5, agnostic)[0].tolist() == [0]
        # A strong negative on a box that does not overlap does not veto.
        neg = torch.tensor([[0.0], [0.0], [0.95]])
        assert detect(boxes, pos, neg, thr, 0.5, agnostic)[0].tolist() == [0]
        # Its own negative beats it too.
        neg = torch.tensor([[0.85], [0.0], [0.0]])
        assert detect(boxes, pos, neg, thr, 0.5, agnostic)[0].tolist() == []


def test_negative_end_to_end_through_embeddings() -> None:
    d = 8
    e = torch.eye(d)
    box_embeds = torch.stack([e[0], e[1]])  # box 0 looks like "cat", box 1 (overlapping) like "cat toy"
    examples = torch.stack([e[0], e[1]])  # positive "cat", negative "cat toy", both class 0
    # Box 1's larger logit shift makes the negative fit it better than the positive fits box 0 (ties keep the box).
    fit = box_example_fit(box_embeds, examples, torch.tensor([0.0, 0.5]), torch.full((2,), 5.0))
    pos, neg = class_scores(fit, torch.tensor([0, 0]), torch.tensor([True, False]), 1)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.5, 0.5, 10.5, 10.5]])
    assert detect(boxes, pos, neg, torch.tensor([0.9]), 0.5, False)[0].tolist() == []
    far = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    assert detect(far, pos, neg, torch.tensor([0.9]), 0.5, False)[0].tolist() == [0]


def test_class_scores_matches_loops() -> None:
    g = torch.Generator().manual_seed(5)
    n, c = 7, 4
    example_class = torch.tensor([0, 0, 1, 2, 2, 2, 0, 1])
    positive = torch.tensor([True, False, True, True, False, True, True, True])
    fit = torch.rand(n, len(example_class), generator=g)
    pos, neg = class_scores(fit, example_class, positive, c)
    for i in range(n):
        for k in range(c):
            ps = [fit[i, e].item() for e in range(len(example_class)) if example_class[e] == k and positive[e]]
            ns = [fit[i, e].item() for e in range(len(example_class)) if example_class[e] == k and not positive[e]]
            assert pos[i, k].item() == (max(ps) if ps else 0.0)
            assert neg[i, k].item() == (max(ns) if ns else 0.0)


def test_box_class_scores_equals_fit_then_class_scores() -> None:
    g = torch.Generator().manual_seed(11)
    n, e, d, c = 50, 30, 16, 6
    boxes = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    examples = torch.nn.functional.normalize(torch.randn(e, d, generator=g), dim=-1)
    shift = torch.randn(n, generator=g)
    scale = torch.nn.functional.elu(torch.randn(n, generator=g) * 3) + 1
    example_class = torch.randint(0, c - 1, (e,), generator=g)  # class c-1 has no examples at all
    positive = torch.rand(e, generator=g) > 0.3
    want = class_scores(box_example_fit(boxes, examples, shift, scale), example_class, positive, c)
    got = box_class_scores(boxes, examples, shift, scale, example_class, positive, c)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert float(got[0][:, c - 1].abs().max()) == 0.0 and float(got[1][:, c - 1].abs().max()) == 0.0


def test_box_example_fit_matches_hf_class_head() -> None:
    from transformers import Owlv2Config
    from transformers.models.owlv2.modeling_owlv2 import Owlv2ClassPredictionHead

    torch.manual_seed(0)
    cfg = Owlv2Config(text_config={"hidden_size": 16}, vision_config={"hidden_size": 24}, projection_dim=16)
    head = Owlv2ClassPredictionHead(cfg).eval()
    feats = torch.randn(1, 10, 24)
    queries = torch.randn(1, 3, 16)
    with torch.no_grad():
        logits, class_embeds = head(feats, queries, None)
        box = torch.nn.functional.normalize(head.dense0(feats[0]), dim=-1)
        shift = head.logit_shift(feats[0])[:, 0]
        scale = torch.nn.functional.elu(head.logit_scale(feats[0])[:, 0]) + 1
        ours = box_example_fit(box, torch.nn.functional.normalize(queries[0], dim=-1), shift, scale)
    torch.testing.assert_close(ours, torch.sigmoid(logits[0]), atol=1e-5, rtol=1e-5)


def test_iou_matrix_matches_torchvision_and_graph() -> None:
    g = torch.Generator().manual_seed(7)
    xy = torch.rand(40, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 1 + torch.rand(40, 2, generator=g) * 30], 1)
    iou = iou_matrix(boxes)
    torch.testing.assert_close(iou, torchvision.ops.box_iou(boxes, boxes))
    graph = iou_graph(boxes, 0.4)
    assert graph.dtype == torch.bool and bool(graph.diagonal().all())
    assert torch.equal(graph, (iou >= 0.4) | torch.eye(40, dtype=torch.bool))
    # Degenerate boxes: IoU 0 instead of NaN, still their own neighbour.
    flat = torch.tensor([[1.0, 1.0, 1.0, 5.0], [1.0, 1.0, 1.0, 5.0]])
    assert iou_matrix(flat).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert iou_graph(flat, 0.5).tolist() == [[True, False], [False, True]]


def test_precomputed_graph_is_used() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    pos = torch.tensor([[0.9], [0.8]])
    no_edges = torch.eye(2, dtype=torch.bool)
    assert detect(boxes, pos, torch.zeros_like(pos), torch.tensor([0.5]), 0.5, False)[0].tolist() == [0]
    assert detect(boxes, pos, torch.zeros_like(pos), torch.tensor([0.5]), 0.5, False, graph=no_edges)[0].tolist() == [
        0,
        1,
    ]


def test_image_query_is_the_first_box_near_the_whole_image() -> None:
    # Sorted by objectness: a small part first, then a box almost the whole 100 x 80 image, then the whole image.
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [2.0, 2.0, 98.0, 78.0], [0.0, 0.0, 100.0, 80.0]])
    assert image_query_index(boxes, 100, 80) == 1  # IoU 0.93 >= 0.8 x 1.0, and more objectness than the whole box
    assert image_query_index(boxes, 100, 80, ratio=0.95) == 2
    assert image_query_index(boxes[:1], 100, 80) == 0
    with pytest.raises(ValueError):
        image_query_index(torch.zeros(0, 4), 100, 80)
