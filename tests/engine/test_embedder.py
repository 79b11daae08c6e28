"""engine.embedder: a long lookup commits chunk by chunk (issue 18): a process killed mid-way loses at most one chunk,
and the same lookup again encodes only what is missing; progress is reported per chunk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cache.embeddings import EmbeddingCache
from engine.embedder import Progress, TextEmbedder

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ("a {}.", "the {}.", "a photo of {}.", "{}!")  # 4 templates: 8 prompts per chunk of 2 texts


def fake_encode(calls: list[list[str]]):  # type: ignore[no-untyped-def]
    def encode(prompts: list[str]) -> np.ndarray:
        calls.append(list(prompts))
        rng = np.random.default_rng(abs(hash(tuple(prompts))) % 2**32)
        v = rng.standard_normal((len(prompts), 8)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return encode


def test_a_lookup_commits_per_chunk_and_reports_progress(tmp_path: Path) -> None:
    calls: list[list[str]] = []
    cache = EmbeddingCache(tmp_path)
    emb = TextEmbedder(cache, "m", fake_encode(calls), templates=TEMPLATES, commit_prompts=8)
    progress = Progress()
    seen: list[tuple[int, int]] = []
    real_put = cache.put

    def put(ns: str, texts: list[str], vectors: np.ndarray) -> None:
        seen.append(progress.snapshot())  # before this chunk is counted
        real_put(ns, texts, vectors)

    cache.put = put  # type: ignore[method-assign]
    texts = [f"thing {i}" for i in range(7)]
    vecs, stats = emb.with_progress(progress).embed(texts, augment=True)
    assert vecs.shape == (7, 8) and stats.misses == 7 and stats.prompts_encoded == 28
    assert [len(c) for c in calls] == [8, 8, 8, 4]  # 2 texts x 4 templates per chunk, each chunk its own call
    assert seen == [(0, 7), (2, 7), (4, 7), (6, 7)] and progress.snapshot() == (7, 7)
    # The same texts again, in one chunk or many: all from the cache, the same vectors.
    again, stats2 = TextEmbedder(cache, "m", fake_encode(calls), templates=TEMPLATES).embed(texts, augment=True)
    assert stats2.hits == 7 and len(calls) == 4
    np.testing.assert_array_equal(again, vecs)
    assert emb.progress is None  # with_progress made a copy


_WORKER = """
import sys, time
import numpy as np
sys.path.insert(0, {root!r})
from cache.embeddings import EmbeddingCache
from engine.embedder import TextEmbedder

def encode(prompts):
    time.sleep(0.2)  # a slow encoder: the parent kills this process mid-way
    v = np.ones((len(prompts), 8), np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)

cache = EmbeddingCache({root_cache!r})
TextEmbedder(cache, "m", encode, templates=("a {{}}.", "the {{}}."), commit_prompts=4).embed(
    [f"text {{i}}" for i in range(200)], augment=True
)
print("finished", flush=True)
"""


def test_kill_9_mid_lookup_loses_at_most_one_chunk_and_a_retry_resumes(tmp_path: Path) -> None:
    script = _WORKER.format(root=str(ROOT), root_cache=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    probe = EmbeddingCache(tmp_path / "cache")
    deadline = time.monotonic() + 120
    while probe.count() < 10:  # five chunks of 2 texts committed
        assert proc.poll() is None and time.monotonic() < deadline, "the worker did not commit its first chunks"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    committed = probe.count()
    assert 10 <= committed < 200 and committed % 2 == 0  # whole chunks only: nothing half-written
    # A retry encodes only what the killed process had not committed.
    calls: list[list[str]] = []
    cache = EmbeddingCache(tmp_path / "cache")
    emb = TextEmbedder(cache, "m", fake_encode(calls), templates=("a {}.", "the {}."), commit_prompts=4)
    _, stats = emb.embed([f"text {i}" for i in range(200)], augment=True)
    assert stats.hits == committed and stats.misses == 200 - committed
    assert sum(len(c) for c in calls) == 2 * (200 - committed)


def test_a_lookup_encodes_like_lengths_together_and_answers_in_the_callers_order(tmp_path: Path) -> None:
    """The text tower trims each batch to its longest prompt, so a lookup hands the encoder its texts shortest first
    (issue 29: a deploy of mixed lengths padded every batch to its longest text) and still answers in input order."""
    calls: list[list[str]] = []

    def encode(prompts: list[str]) -> np.ndarray:
        calls.append(list(prompts))
        return np.array([[len(p), float(p.split()[-1]), 1.0] for p in prompts], np.float32)  # each text's own row

    texts = ["a very long text about a forklift 0", "dog 1", "a medium text 2", "cat 3", "another long text here 4"]
    emb = TextEmbedder(EmbeddingCache(tmp_path), "m", encode, commit_prompts=2, short_chunk=2)
    vecs, _ = emb.embed(texts, augment=False)
    assert calls == [["dog 1", "cat 3"], ["a medium text 2", "another long text here 4"], [texts[0]]]
    np.testing.assert_array_equal(vecs[:, 1], [0, 1, 2, 3, 4])  # the caller's order
    np.testing.assert_array_equal(vecs[:, 0], [len(t) for t in texts])
