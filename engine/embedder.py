"""Example texts -> vectors through the embedding cache, with or without prompt-template ensembling.

The encoder is any callable from prompts to L2-normalised vectors (an in-process ``ClipEncoder``, a remote BentoML
encoder, the OWL text tower); the cache key is the model id + template version + text, so each text is encoded once
per model and template setting, by whichever process meets it first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cache.embeddings import LookupStats, namespace
from cache.interfaces import VectorStore
from errors import ZssError
from semantic.templates import CLIP_TEMPLATES, TEMPLATE_VERSION, ensemble, expand

EncodeFn = Callable[[list[str]], np.ndarray]
# Prompts of a whole lookup up to which it is encoded in calls of ``short_chunk`` (the text encoder's short lane, see
# engine/encoders.py): a small deploy is answered beside a big one's batches instead of queueing behind them.
SMALL_LOOKUP_PROMPTS = 1024


class Cancelled(ZssError):
    """A job cancelled (DELETE /jobs/{id}) or stopped by its stopping server, seen between encoder calls."""

    status_code = 409

    def __init__(self, message: str = "Job cancelled.", status_code: int = 409) -> None:
        super().__init__(message, status_code)


@dataclass
class EmbedStats:
    hits: int = 0
    misses: int = 0
    prompts_encoded: int = 0
    examples_encoded: int = 0


@dataclass
class Progress:
    """Texts of one embed call looked up so far (a deploy job reports it); written by the embedding thread between
    committed chunks, read by anyone."""

    done: int = 0
    total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # Set to stop the lookup: checked before every encoder call, so the encoder stops within one call.
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    reason: str = "Job cancelled."
    status_code: int = 409
    # Called after each committed chunk (a job's heartbeat to its store), from the embedding thread.
    on_advance: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def cancel(self, reason: str = "Job cancelled.", status_code: int = 409) -> None:
        self.reason, self.status_code = reason, status_code
        self.cancelled.set()

    def check(self) -> None:
        """Raise :class:`Cancelled` once the job is cancelled."""
        if self.cancelled.is_set():
            raise Cancelled(self.reason, self.status_code)

    def start(self, total: int) -> None:
        with self._lock:
            self.done, self.total = 0, total

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
        if self.on_advance is not None:
            self.on_advance()

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.done, self.total


@dataclass
class TextEmbedder:
    """Example texts -> vectors through the cache; misses are encoded once, with or without template ensembling."""

    cache: VectorStore
    model_id: str
    encode: EncodeFn
    templates: tuple[str, ...] = CLIP_TEMPLATES
    template_version: str = TEMPLATE_VERSION
    chunk: int = 512  # prompts per encoder call, below the encoder's max batch size
    short_chunk: int = 128  # prompts per encoder call of a small lookup (SMALL_LOOKUP_PROMPTS)
    stats: EmbedStats = field(default_factory=EmbedStats)
    # Called with each lookup's own stats (thread-safe per call, unlike deltas of the running totals).
    on_lookup: Callable[[EmbedStats], None] | None = None
    # Prompts per committed chunk of a lookup (issue 18): each chunk's vectors are in the cache as soon as it is
    # encoded, so a killed process loses at most one chunk of a long deploy and a retry resumes from the cache.
    commit_prompts: int = 1024
    progress: Progress | None = None

    def with_progress(self, progress: Progress) -> TextEmbedder:
        """This embedder reporting its lookups to ``progress`` (same cache, encoder and running stats)."""
        return replace(self, progress=progress)

    def _encode_chunked(self, prompts: list[str], chunk: int) -> np.ndarray:
        parts = []
        for i in range(0, len(prompts), chunk):
            if self.progress is not None:
                self.progress.check()
            parts.append(self.encode(prompts[i : i + chunk]))
        self.stats.prompts_encoded += len(prompts)
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def _encode_examples(self, texts: list[str], augment: bool, chunk: int) -> np.ndarray:
        if not augment:
            return self._encode_chunked(texts, chunk)
        prompts = expand(texts, self.templates)
        per_prompt = torch.from_numpy(np.asarray(self._encode_chunked(prompts, chunk), np.float32))
        return ensemble(per_prompt, len(self.templates)).numpy()

    def namespace(self, augment: bool) -> str:
        return namespace(self.model_id, self.template_version if augment else None)

    def embed(self, texts: Sequence[str], augment: bool) -> tuple[np.ndarray, EmbedStats]:
        """Vectors [N, D] for texts, plus this call's hits/misses/prompts encoded."""
        before = self.stats.prompts_encoded
        vecs, lookup = self._lookup_in_chunks(list(texts), augment)
        self.stats.hits += lookup.hits
        self.stats.misses += lookup.misses
        self.stats.examples_encoded += lookup.encoded
        call = EmbedStats(lookup.hits, lookup.misses, self.stats.prompts_encoded - before, lookup.encoded)
        if self.on_lookup is not None:
            self.on_lookup(call)
        return vecs, call

    def _lookup_in_chunks(self, texts: list[str], augment: bool) -> tuple[np.ndarray, LookupStats]:
        """The store's ``get_or_encode`` once per chunk of about ``commit_prompts`` prompts, so every store commits
        as it goes (the store protocol is unchanged)."""
        ns = self.namespace(augment)
        # Looked up shortest first (by characters, the tokens' proxy before the remote tokenizer sees them): the text
        # tower trims each batch to its longest prompt, so a batch of like lengths pads least. Without this a deploy
        # of mixed lengths ran at 0.83x the bare tower's prompts per CPU-second (BENCHMARKS.md, issue 29).
        order = np.argsort([len(t) for t in texts], kind="stable")
        texts = [texts[i] for i in order]
        per_text = len(self.templates) if augment else 1
        step = max(1, self.commit_prompts // per_text)
        chunk = self.short_chunk if len(texts) * per_text <= SMALL_LOOKUP_PROMPTS else self.chunk
        if self.progress is not None:
            self.progress.start(len(texts))
        parts: list[np.ndarray] = []
        total = LookupStats()
        for start in range(0, len(texts), step):
            part = texts[start : start + step]
            if self.progress is not None:
                self.progress.check()
            vecs, stats = self.cache.get_or_encode(ns, part, lambda todo: self._encode_examples(todo, augment, chunk))
            parts.append(vecs)
            total.hits += stats.hits
            total.misses += stats.misses
            total.encoded += stats.encoded
            if self.progress is not None:
                self.progress.advance(len(part))
        if not parts:
            return np.zeros((0, 0), np.float32), total
        looked_up = parts[0] if len(parts) == 1 else np.concatenate(parts)
        vecs = np.empty_like(looked_up)
        vecs[order] = looked_up  # back in the caller's order
        return vecs, total
