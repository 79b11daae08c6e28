"""The two-stage scoring rule on hand-made embeddings."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from semantic import classify as classify_module
from semantic.classify import (
    IDENTITY,
    PROBE_STEPS,
    classify,
    compile_classifier,
    fit_probe,
    raw_scores,
    rejected,
)
from testing.reference import reference_raw, reference_raw_mixed


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
    d_neg = (1 + 1 / math.sqrt(1 + 0.05**2)) / 2  # (1 + cos) / 2, cos of (1, 0, 0) and (1, 0, 0.05) by hand
    assert raw[0, 0].item() == pytest.approx(1 - d_neg, abs=1e-6)  # float32


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


# -- image examples and the open set -----------------------------------------------------------------------------------
def _random_mixed(g: torch.Generator, dim: int = 8) -> list[tuple[torch.Tensor, ...]]:
    classes = []
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        sizes = [int(torch.randint(lo, 3, (1,), generator=g)) for lo in (0, 0, 0, 0)]
        if sizes[0] + sizes[2] == 0:
            sizes[2] = 1
        classes.append(tuple(F.normalize(torch.randn(k, dim, generator=g), dim=-1) for k in sizes))
    return classes


def test_mixed_vectorised_matches_reference() -> None:
    """The scoring rule against the plain one, with a calibration map and probe weights the test chooses (not the
    ones the classifier fitted: those are checked on their own below), so neither side hands the other its values."""
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        classes = _random_mixed(g)
        names = [str(i) for i in range(len(classes))]
        with_images = [j for j, c in enumerate(classes) if c[2].shape[0] > 0]
        for steps in (0, PROBE_STEPS):  # the max rule alone, and with the probe of classes with image positives
            clf = compile_classifier(names, *([c[k] for c in classes] for k in range(4)), probe_steps=steps)
            assert (clf.probe is None) == (steps == 0 or not with_images)
            if clf.probe is not None:
                assert clf.probe_class.tolist() == with_images  # type: ignore[union-attr]
            image_map = (float(torch.rand(1, generator=g)) + 0.5, float(torch.rand(1, generator=g)) - 0.5)
            probe = {j: torch.randn(8, generator=g) * 0.3 for j in with_images} if clf.probe is not None else {}
            if probe:
                chosen = torch.stack([probe[j] for j in with_images])
                clf = replace(clf, probe=chosen, probe_class=torch.tensor(with_images))
            clf = replace(clf, image_map=image_map)
            images = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
            raw = raw_scores(images, clf)
            for b in range(6):
                want = reference_raw_mixed(images[b], classes, image_map, probe)
                assert raw[b].tolist() == pytest.approx(want, abs=1e-5)


def test_text_only_classes_keep_the_seed_rule_exactly() -> None:
    # The same text examples with and without (empty) image lists: bit-identical scores, identity map, 2C slots.
    g = torch.Generator().manual_seed(4)
    pos = [F.normalize(torch.randn(2, 8, generator=g), dim=-1) for _ in range(3)]
    neg = [F.normalize(torch.randn(1, 8, generator=g), dim=-1) for _ in range(3)]
    images = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    plain = compile_classifier(["a", "b", "c"], pos, neg)
    with_empty = compile_classifier(["a", "b", "c"], pos, neg, [torch.zeros(0, 8)] * 3, [torch.zeros(0, 8)] * 3)
    assert not with_empty.has_images and with_empty.image_map == IDENTITY and with_empty.n_slots == 6
    assert torch.equal(raw_scores(images, plain), raw_scores(images, with_empty))


def test_calibration_maps_unrelated_image_pairs_onto_unrelated_text_pairs() -> None:
    g = torch.Generator().manual_seed(5)
    # Many image examples (3 per class) and texts: the data outweighs the prior; a cosine at the mean of unrelated
    # image pairs maps to the mean of unrelated image-text pairs.
    n_cls, dim = 8, 16
    texts = [F.normalize(torch.randn(1, dim, generator=g), dim=-1) for _ in range(n_cls)]
    imgs = [F.normalize(torch.randn(3, dim, generator=g) + 2.0, dim=-1) for _ in range(n_cls)]  # a common offset
    clf = compile_classifier([str(j) for j in range(n_cls)], texts, [torch.zeros(0, dim)] * n_cls, imgs)
    all_img, all_txt = torch.cat(imgs), torch.cat(texts)
    cls_img = torch.arange(n_cls).repeat_interleave(3)
    img_pairs = (all_img @ all_img.T)[cls_img[:, None] != cls_img[None, :]]
    txt_pairs = (all_img @ all_txt.T)[cls_img[:, None] != torch.arange(n_cls)[None, :]]
    scale, shift = clf.image_map
    mapped_mean = scale * float(img_pairs.mean()) + shift
    assert abs(mapped_mean - float(txt_pairs.mean())) < 0.1
    assert scale > 1  # unrelated image pairs are higher and tighter here: the map lowers and stretches them


def test_images_only_deployment_uses_plain_image_cosines() -> None:
    a, b = unit(1, 0, 0), unit(0, 1, 0)
    clf = compile_classifier(["a", "b"], [torch.zeros(0, 3)] * 2, [torch.zeros(0, 3)] * 2, [a, b])
    assert clf.image_map == IDENTITY
    raw = raw_scores(unit(1, 0.1, 0), clf)
    assert raw[0, 0].item() == pytest.approx((1 + 1 / math.sqrt(1 + 0.1**2)) / 2, abs=1e-6)  # cos by hand


def test_unrelated_image_example_does_not_beat_a_matching_text() -> None:
    # Class "x" has a text the image matches moderately (cos 0.4); class "y" has only image examples, one at cos 0.6
    # from the image: the level of unrelated image pairs (IMAGE_PRIOR), so a plain max would wrongly give "y".
    text_x = unit(1, 0, 0, 0)
    ys = torch.cat([unit(0, 1, 0, 0), unit(0, 0, 1, 0)])
    image = torch.tensor([[0.4, 0.6, 0.0, (1 - 0.16 - 0.36) ** 0.5]])
    none = torch.zeros(0, 4)
    clf = compile_classifier(["x", "y"], [text_x, none], [none, none], [none, ys], probe_steps=0)  # the max rule
    assert int(raw_scores(image, replace(clf, image_map=IDENTITY)).argmax()) == 1  # uncalibrated: "y" wins
    assert int(raw_scores(image, clf).argmax()) == 0


def test_negative_image_example_vetoes_like_a_negative_text() -> None:
    red_shape, other = unit(1, 1.2, 0, 0), unit(0, 0, 1, 0)  # the text matches the square at cos 0.64
    red_square_photo = unit(1, 0, 0, 0.05)
    more = [unit(0, 0, 1, 1), unit(0, 1, 0, 1)]  # more image examples elsewhere, so the image scale is estimated
    clf = compile_classifier(
        ["red", "other"],
        [red_shape, other],
        [torch.zeros(0, 4)] * 2,
        [torch.zeros(0, 4), torch.cat(more)],
        [red_square_photo, torch.zeros(0, 4)],
        probe_steps=0,  # the max rule; the probe's veto: test_negative_image_example_vetoes_a_probed_class
    )
    square = unit(1, 0, 0, 0.06)  # nearly the negative exemplar
    raw = raw_scores(square, clf)
    assert int(raw.argmax()) == 1
    scale, shift = clf.image_map
    d_neg = (1 + min(1.0, scale * float(square @ red_square_photo.T) + shift)) / 2
    assert raw[0, 0].item() == pytest.approx(1 - d_neg, abs=1e-6)


def test_open_set_rejects_below_the_threshold_on_the_best_raw_score() -> None:
    raw = torch.tensor([[0.7, 0.2], [0.55, 0.5], [0.59, 0.61]])
    assert rejected(raw, 0.6).tolist() == [False, True, False]
    assert rejected(raw, 0.0).tolist() == [False, False, False]


def test_calibration_maps_matching_image_pairs_onto_matching_image_text_pairs() -> None:
    # Classes with structure: each class's text and images lie around the class's centre, images with a common offset
    # (another modality). The map sends the mean matching image pair to the mean matching image-text pair, exactly.
    g = torch.Generator().manual_seed(8)
    n_cls, dim = 6, 24
    centres = torch.randn(n_cls, dim, generator=g)
    offset = 1.5 * torch.randn(dim, generator=g)
    texts = [F.normalize(centres[j] + 0.5 * torch.randn(1, dim, generator=g), dim=-1) for j in range(n_cls)]
    imgs = [F.normalize(centres[j] + offset + 0.5 * torch.randn(3, dim, generator=g), dim=-1) for j in range(n_cls)]
    none = [torch.zeros(0, dim)] * n_cls
    clf = compile_classifier([str(j) for j in range(n_cls)], texts, none, imgs, probe_steps=0)  # the max rule
    all_img, all_txt = torch.cat(imgs), torch.cat(texts)
    cls_img = torch.arange(n_cls).repeat_interleave(3)
    same = (cls_img[:, None] == cls_img[None, :]) & ~torch.eye(len(cls_img), dtype=torch.bool)
    match_i = float((all_img @ all_img.T)[same].mean())
    match_t = float((all_img @ all_txt.T)[cls_img[:, None] == torch.arange(n_cls)[None, :]].mean())
    scale, shift = clf.image_map
    assert scale * match_i + shift == pytest.approx(match_t, abs=1e-5)
    # A query image near class 2's images is class 2 although its cosine to class 2's text is lower than to them.
    query = F.normalize(centres[2] + offset, dim=0)[None]
    assert int(raw_scores(query, clf).argmax()) == 2


# -- the text-anchored probe -------------------------------------------------------------------------------------------
def _shapes_like(g: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Toy colour x shape world: an image is colour + shape + noise. Class (c, s)'s text is right, except class
    (0, 0)'s, which points away from its shape (a confidently wrong text, like the held-out pairs'); 4 exemplars per
    class."""
    dim, n_col, n_shape = 12, 3, 3
    colour = F.normalize(torch.randn(n_col, dim, generator=g), dim=-1)
    shape = F.normalize(torch.randn(n_shape, dim, generator=g), dim=-1)
    texts, exemplars = [], []
    for c in range(n_col):
        for s in range(n_shape):
            wrong = shape[1] - shape[0] if (c, s) == (0, 0) else shape[s]  # (0, 0)'s text: "not this shape"
            texts.append(F.normalize(colour[c] + wrong, dim=0)[None])
            exemplars.append(F.normalize(colour[c] + shape[s] + 0.15 * torch.randn(4, dim, generator=g), dim=-1))
    queries = F.normalize(colour[0] + shape[0] + 0.15 * torch.randn(50, dim, generator=g), dim=-1)
    return texts, exemplars, queries, torch.zeros(50, dtype=torch.int64)


def test_probe_learns_from_the_exemplars_what_the_text_gets_wrong() -> None:
    texts, exemplars, queries, truth = _shapes_like(torch.Generator().manual_seed(9))
    n, none = len(texts), [torch.zeros(0, 12)] * len(texts)
    text_only = compile_classifier([str(j) for j in range(n)], texts, none)
    probed = compile_classifier([str(j) for j in range(n)], texts, none, exemplars, none)
    assert probed.probe is not None and probed.probe_class is not None
    assert probed.probe_class.tolist() == list(range(n))
    assert float((raw_scores(queries, text_only).argmax(1) == truth).float().mean()) < 0.2  # the wrong text wins
    assert float((raw_scores(queries, probed).argmax(1) == truth).float().mean()) > 0.9
    # Deterministic: the same examples give bit-identical weights.
    again = compile_classifier([str(j) for j in range(n)], texts, none, exemplars, none)
    assert torch.equal(probed.probe, again.probe)  # type: ignore[arg-type]


def test_probe_leaves_text_only_classes_exactly_as_the_seed_rule() -> None:
    # Classes 0-2 have texts only (with a negative), classes 3-4 image examples: columns 0-2 are bit-identical to a
    # deployment of the text classes alone, and to the plain reference.
    g = torch.Generator().manual_seed(10)
    pos = [F.normalize(torch.randn(2, 8, generator=g), dim=-1) for _ in range(5)]
    neg = [F.normalize(torch.randn(1, 8, generator=g), dim=-1) for _ in range(3)] + [torch.zeros(0, 8)] * 2
    imgs = [torch.zeros(0, 8)] * 3 + [F.normalize(torch.randn(3, 8, generator=g), dim=-1) for _ in range(2)]
    mixed = compile_classifier([str(j) for j in range(5)], pos, neg, imgs, [torch.zeros(0, 8)] * 5)
    alone = compile_classifier(["0", "1", "2"], pos[:3], neg[:3])
    assert mixed.probe_class is not None and mixed.probe_class.tolist() == [3, 4]
    images = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    assert torch.equal(raw_scores(images, mixed)[:, :3], raw_scores(images, alone))
    for b in range(7):
        want = reference_raw(images[b], list(zip(pos[:3], neg[:3])))
        assert raw_scores(images, mixed)[b, :3].tolist() == pytest.approx(want, abs=1e-6)


def test_negative_examples_veto_a_probed_class_as_without_the_probe() -> None:
    texts, exemplars, queries, _ = _shapes_like(torch.Generator().manual_seed(11))
    n, none = len(texts), [torch.zeros(0, 12)] * len(texts)
    # Class 1 excludes a look-alike of class 0 (the mean of class 0's exemplars), as an image and as a text: the veto
    # fires exactly where it fires under the max rule, with the same score.
    look_alike = F.normalize(exemplars[0].mean(0), dim=0)[None]
    negs = [none[0], look_alike, *none[2:]]
    for text_negs, image_negs in ((none, negs), (negs, none)):
        probed = compile_classifier([str(j) for j in range(n)], texts, text_negs, exemplars, image_negs)
        plain = compile_classifier([str(j) for j in range(n)], texts, text_negs, exemplars, image_negs, probe_steps=0)
        assert probed.probe is not None
        unvetoed = compile_classifier([str(j) for j in range(n)], texts, none, exemplars, none, probe_steps=0)
        unvetoed = replace(unvetoed, image_map=plain.image_map)  # the same positives' evidence, no negatives
        max_cols = raw_scores(queries, plain)
        vetoed = max_cols != raw_scores(queries, unvetoed)
        assert bool(vetoed[:, 1].any()) and not bool(vetoed[:, [0, *range(2, n)]].any())
        assert torch.equal(raw_scores(queries, probed)[vetoed], max_cols[vetoed])
        assert bool((max_cols[vetoed] < 0.5).all())


def test_fit_probe_lowers_the_loss_and_keeps_its_start_at_zero_steps() -> None:
    g = torch.Generator().manual_seed(12)
    xs = F.normalize(torch.randn(20, 6, generator=g), dim=-1)
    ys = torch.arange(4).repeat_interleave(5)
    init = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    trainable = torch.tensor([0, 1, 3])
    fixed = (xs @ F.normalize(torch.randn(4, 6, generator=g), dim=-1).T).clone()

    def loss(w: torch.Tensor) -> float:
        logits = fixed.clone()
        logits[:, trainable] = xs @ w.T
        return float(F.cross_entropy(logits / 0.07, ys))

    assert torch.equal(fit_probe(init, trainable, xs, ys, fixed, steps=0), init)
    trained = fit_probe(init, trainable, xs, ys, fixed)
    assert loss(trained) < 0.5 * loss(init)
    assert bool((trained.norm(dim=1) <= 1 + 1e-6).all())  # in the unit ball: x . w <= 1
    # A huge step size cannot blow it up: a step that raises the loss is not taken.
    assert loss(fit_probe(init, trainable, xs, ys, fixed, lr=1e6)) <= loss(init)
    fixed_copy = fixed.clone()
    fit_probe(init, trainable, xs, ys, fixed)
    assert torch.equal(fixed, fixed_copy)  # inputs not mutated


def test_probe_is_skipped_above_its_work_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    texts, exemplars, _, _ = _shapes_like(torch.Generator().manual_seed(13))
    none = [torch.zeros(0, 12)] * len(texts)
    monkeypatch.setattr(classify_module, "PROBE_MAX_WORK", 9 * 36 * 12 - 1)  # classes x examples x dims, just over
    assert compile_classifier([str(j) for j in range(9)], texts, none, exemplars, none).probe is None
    monkeypatch.setattr(classify_module, "PROBE_MAX_WORK", 9 * 36 * 12)
    assert compile_classifier([str(j) for j in range(9)], texts, none, exemplars, none).probe is not None


def test_an_image_example_still_counts_in_full_for_a_probed_class() -> None:
    # Images only (the identity map). Class 0's last exemplar is an outlier right next to one of class 1's: no probe
    # fits both twins, yet as queries each is its own class's (cos 1 to itself; a probe, in the unit ball, scores
    # below 1 anything but its own vector), as under the max rule; every other exemplar is its own class too.
    _, exemplars, _, _ = _shapes_like(torch.Generator().manual_seed(14))
    outlier = F.normalize(exemplars[1][0] + 0.002 * torch.ones(12), dim=0)  # next to one of class 1's exemplars
    exemplars[0] = torch.cat([exemplars[0][:3], outlier[None]])
    n, none = len(exemplars), [torch.zeros(0, 12)] * len(exemplars)
    clf = compile_classifier([str(j) for j in range(n)], none, none, exemplars, none)
    assert clf.probe is not None and clf.image_map == IDENTITY
    queries, truth = torch.cat(exemplars), torch.arange(n).repeat_interleave(4)
    assert not torch.equal((queries @ clf.probe.T).argmax(1), truth)  # the probe alone gets one of the twins wrong
    assert torch.equal(raw_scores(queries, clf).argmax(1), truth)


def test_sigmoid_probabilities_read_the_picked_score_on_the_cosine_scale() -> None:
    from semantic.classify import probabilities, rejected_by_probability

    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]])
    clf = compile_classifier(["a", "b"], [pos, torch.tensor([[0.0, 1.0]])], [neg, torch.zeros(0, 2)])
    v = torch.tensor([[0.6, 0.8]])  # exactly the negative of "a": the veto decides "a"
    raw = raw_scores(v, clf)
    probs = probabilities(raw, (10.0, -10.0))
    assert float(probs[0, 0]) == pytest.approx(float(torch.sigmoid(torch.tensor(-10.0 * 1.0 - 10.0))))  # vetoed
    assert float(probs[0, 1]) == pytest.approx(float(torch.sigmoid(torch.tensor(10.0 * 0.8 - 10.0))))  # ~0.12
    assert rejected_by_probability(probs, 0.5).tolist() == [True]  # no class reaches 0.5
    assert rejected_by_probability(probs, 0.1).tolist() == [False]
