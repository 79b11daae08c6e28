"""The FAISS-backed embedding cache: encode once, persist, survive restarts and corruption."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cache.embeddings import EmbeddingCache, cache_key, namespace


def vecs(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class CountingEncoder:
    def __init__(self, d: int = 8) -> None:
        self.calls: list[list[str]] = []
        self.d = d

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        # Deterministic per text, so a re-encode would be detectable only through the call log.
        return np.stack([vecs(1, self.d, seed=sum(map(ord, t)))[0] for t in texts])


def test_keys_depend_on_model_templates_and_text() -> None:
    a = cache_key(namespace("m1", "tpl.v1"), "cat")
    assert a != cache_key(namespace("m2", "tpl.v1"), "cat")
    assert a != cache_key(namespace("m1", None), "cat")
    assert a != cache_key(namespace("m1", "tpl.v2"), "cat")
    assert a != cache_key(namespace("m1", "tpl.v1"), "cat ")


def test_encodes_each_text_once_and_survives_restart(tmp_path: Path) -> None:
    enc = CountingEncoder()
    ns = namespace("model", None)
    c = EmbeddingCache(tmp_path)
    first, stats = c.get_or_encode(ns, ["a", "b", "a"], enc)
    assert enc.calls == [["a", "b"]]
    assert (stats.hits, stats.misses, stats.encoded) == (0, 3, 2)
    second, stats = c.get_or_encode(ns, ["b", "c"], enc)
    assert enc.calls[-1] == ["c"] and stats.hits == 1
    np.testing.assert_allclose(second[0], first[1])
    c.close()

    c2 = EmbeddingCache(tmp_path)
    again, stats = c2.get_or_encode(ns, ["a", "b", "c"], enc)
    assert len(enc.calls) == 2 and stats.misses == 0
    np.testing.assert_allclose(again[:2], first[:2])


def test_two_processes_share_rows(tmp_path: Path) -> None:
    enc = CountingEncoder()
    ns = namespace("model", None)
    a, b = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)
    a.get_or_encode(ns, ["x"], enc)  # b loads the namespace before "y" exists
    b.get_or_encode(ns, ["x"], enc)
    a.get_or_encode(ns, ["y"], enc)
    _, stats = b.get_or_encode(ns, ["y"], enc)
    assert stats.hits == 1 and len(enc.calls) == 2


def test_snapshot_is_written_atomically_and_corrupt_snapshot_rebuilds(tmp_path: Path) -> None:
    ns = namespace("model", "v1")
    c = EmbeddingCache(tmp_path)
    texts = [f"t{i}" for i in range(10)]
    c.put(ns, texts, vecs(10))
    c.close()
    snaps = list(tmp_path.glob("*.faiss"))
    assert len(snaps) == 1 and not list(tmp_path.glob("*.tmp-*"))
    snaps[0].write_bytes(b"garbage")
    c2 = EmbeddingCache(tmp_path)
    found, missing = c2.get(ns, texts)
    assert missing == []
    np.testing.assert_allclose(np.stack([found[i] for i in range(10)]), vecs(10), rtol=1e-6)


def test_corrupt_key_table_is_moved_aside(tmp_path: Path) -> None:
    c = EmbeddingCache(tmp_path)
    c.put(namespace("m", None), ["a"], vecs(1))
    c.close()
    for f in tmp_path.glob("keys.sqlite3*"):
        f.write_bytes(b"not a database at all" * 100)
    c2 = EmbeddingCache(tmp_path)
    assert c2.count() == 0
    assert list(tmp_path.glob("keys.corrupt-*"))
    c2.put(namespace("m", None), ["a"], vecs(1))
    assert c2.count() == 1


def test_dimension_mismatch_is_refused(tmp_path: Path) -> None:
    c = EmbeddingCache(tmp_path)
    c.put("ns", ["a"], vecs(1, 8))
    with pytest.raises(ValueError, match="dimension"):
        c.put("ns", ["b"], vecs(1, 4))
    db = sqlite3.connect(tmp_path / "keys.sqlite3")
    assert db.execute("select count(*) from vectors").fetchone()[0] == 1
