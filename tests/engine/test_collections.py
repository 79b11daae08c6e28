"""engine/collections.py's scoring of stored vectors: the same results as ClassifierKind.score (what /classify
answers), whatever the chunking, with the open set's counts and the top items per class."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from engine import collections as cols
from engine.kinds import ClassifierKind
from semantic.classify import compile_classifier


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_classify_rows_equals_classify_in_chunks(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    dim, names = 16, ["a", "b", "c"]
    pos = [torch.from_numpy(unit(rng.standard_normal((2, dim)))) for _ in names]
    neg = [torch.from_numpy(unit(rng.standard_normal((n, dim)))) for n in (1, 0, 2)]
    clf = replace(compile_classifier(names, pos, neg), open_set=("other", 0.6))
    matrix = unit(rng.standard_normal((50, dim)))
    rows = np.arange(3, 50, 2)
    monkeypatch.setattr(cols, "SCORE_CHUNK", 7)  # several chunks
    total, counts, page, results, top = cols.classify_rows(matrix, rows, clf, 2, 5, 3)
    want = ClassifierKind.score(matrix[rows], clf)
    assert total == len(rows) and page == [2, 3, 4, 5, 6]
    for got, w in zip(results, want[2:7]):  # a batch of another size rounds the last float bit differently
        assert (got.pred, got.label, got.rejected) == (w.pred, w.label, w.rejected)
        assert np.allclose(got.raw_scores, w.raw_scores, rtol=0, atol=1e-6)
        assert np.allclose(got.scores, w.scores, rtol=0, atol=1e-6)
    labels = [w.label for w in want]
    assert counts == {n: labels.count(n) for n in [*names, "other"]}
    assert top is not None
    for c, name in enumerate(names):
        members = [i for i, w in enumerate(want) if w.label == name]
        best = sorted(members, key=lambda i: -want[i].raw_scores[c])[:3]
        assert [i for i, _, _ in top[name]] == best


def test_a_sigmoid_model_s_collection_has_its_probabilities_and_probability_open_set(monkeypatch) -> None:
    """A SigLIP deployment (logit scale and bias): stored vectors get the same probabilities and the same
    probability open set as /classify (issue 27 on issue 31's collections)."""
    rng = np.random.default_rng(1)
    dim, names = 16, ["a", "b"]
    pos = [torch.from_numpy(unit(rng.standard_normal((2, dim)))) for _ in names]
    neg = [torch.zeros(0, dim) for _ in names]
    clf = replace(compile_classifier(names, pos, neg), logits=(10.0, -2.0), open_set_probability=("none", 0.5))
    matrix = unit(rng.standard_normal((40, dim)))
    rows = np.arange(40)
    monkeypatch.setattr(cols, "SCORE_CHUNK", 9)
    total, counts, _, results, _ = cols.classify_rows(matrix, rows, clf, 0, 40, None)
    want = ClassifierKind.score(matrix, clf)
    assert all(w.probabilities is not None for w in want)
    for got, w in zip(results, want):
        assert np.allclose(got.probabilities, w.probabilities, rtol=0, atol=1e-6)
        assert (got.label, got.rejected) == (w.label, w.rejected)
    labels = [w.label for w in want]
    assert counts == {n: labels.count(n) for n in [*names, "none"]}
    assert "none" in labels  # the probability open set rejected some (a + b probability below 0.5 at bias -2)
