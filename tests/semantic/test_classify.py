"""The two-stage scoring rule on hand-made embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semantic.classify import classify, compile_classifier, raw_scores, relevance
from testing.reference import reference_raw


def unit(*xs: float) -> torch.Tensor:
    return F.normalize(torch.tensor([xs], dtype=torch.float32), dim=-1)


def test_negative_example_flips_prediction() -> None:
    # Image close to "red square"; class "red" includes "red shape" but excludes "red square".
    red_shape, red_square, other = unit(1, 0.2, 0), unit(1, 0, 0.05), unit(0, 1, 0)
    image = unit(1, 0, 0)
    without = compile_classifier(["red", "other"], [red_shape, other], [torch.zeros(0, 3), torch.zeros(0, 3)])
    with_neg = compile_classifier(["red", "other"], [red_shape, other], [red_square, torch.zeros(0, 3)])
    assert int(classify(image, without)[2][0]) == 0
    raw = raw_scores(image, with_neg)
    assert int(raw.argmax()) == 1
    d_neg = float(relevance(image, red_square)[0, 0])
    assert raw[0, 0].item() == pytest.approx(1 - d_neg)


def test_one_positive_per_class_is_zero_shot_clip() -> None:
    torch.manual_seed(0)
    texts = F.normalize(torch.randn(7, 16), dim=-1)
    images = F.normalize(torch.randn(20, 16), dim=-1)
    clf = compile_classifier([f"c{i}" for i in range(7)], [t[None] for t in texts], [torch.zeros(0, 16)] * 7)
    _, probs, pred = classify(images, clf)
    assert torch.equal(pred, (images @ texts.T).argmax(dim=1))
    assert torch.allclose(probs.sum(dim=1), torch.ones(20))


def test_vectorised_matches_reference_on_random_classes() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        n_cls = int(torch.randint(1, 6, (1,), generator=g))
        classes = []
        for _ in range(n_cls):
            p = int(torch.randint(1, 4, (1,), generator=g))
            n = int(torch.randint(0, 3, (1,), generator=g))
            pos = F.normalize(torch.randn(p, 8, generator=g), dim=-1)
            neg = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
            classes.append((pos, neg))
        images = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
        clf = compile_classifier([str(i) for i in range(n_cls)], [c[0] for c in classes], [c[1] for c in classes])
        raw = raw_scores(images, clf)
        for b in range(5):
            assert raw[b].tolist() == pytest.approx(reference_raw(images[b], classes), abs=1e-6)


def test_inputs_are_not_mutated() -> None:
    pos = [unit(1, 0), unit(0, 1)]
    neg = [unit(1, 1), torch.zeros(0, 2)]
    copies = [t.clone() for t in pos + neg]
    image = unit(1, 0.5)
    image_copy = image.clone()
    raw_scores(image, compile_classifier(["a", "b"], pos, neg))
    for t, c in zip(pos + neg, copies):
        assert torch.equal(t, c)
    assert torch.equal(image, image_copy)


def test_compile_rejects_bad_classes() -> None:
    with pytest.raises(ValueError, match="Class list is empty"):
        compile_classifier([], [], [])
    with pytest.raises(ValueError, match="no positive examples"):
        compile_classifier(["a"], [torch.zeros(0, 2)], [unit(1, 0)])
