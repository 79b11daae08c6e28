"""The classification engine: example texts -> cached embeddings -> compiled classifier -> scores.

It glues the text encoder (any callable from texts to normalised vectors: an in-process ``ClipEncoder`` or a remote
BentoML encoder), the embedding cache and the pure scoring in semantic/. The HTTP service and the batch tool both use
it, so a classifier scores the same in-process and over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cache.embeddings import EmbeddingCache, namespace
from semantic.classify import CompiledClassifier, classify, compile_classifier
from semantic.templates import CLIP_TEMPLATES, TEMPLATE_VERSION, ensemble, expand

EncodeFn = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class ClassSpec:
    name: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()


@dataclass
class EmbedStats:
    hits: int = 0
    misses: int = 0
    prompts_encoded: int = 0


@dataclass
class TextEmbedder:
    """Example texts -> vectors through the cache; misses are encoded once, with or without template ensembling."""

    cache: EmbeddingCache
    model_id: str
    encode: EncodeFn
    templates: tuple[str, ...] = CLIP_TEMPLATES
    template_version: str = TEMPLATE_VERSION
    chunk: int = 512  # prompts per encoder call, below the encoder's max batch size
    stats: EmbedStats = field(default_factory=EmbedStats)

    def _encode_chunked(self, prompts: list[str]) -> np.ndarray:
        parts = [self.encode(prompts[i : i + self.chunk]) for i in range(0, len(prompts), self.chunk)]
        self.stats.prompts_encoded += len(prompts)
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def _encode_examples(self, texts: list[str], augment: bool) -> np.ndarray:
        if not augment:
            return self._encode_chunked(texts)
        prompts = expand(texts, self.templates)
        per_prompt = torch.from_numpy(np.asarray(self._encode_chunked(prompts), np.float32))
        return ensemble(per_prompt, len(self.templates)).numpy()

    def namespace(self, augment: bool) -> str:
        return namespace(self.model_id, self.template_version if augment else None)

    def embed(self, texts: Sequence[str], augment: bool) -> tuple[np.ndarray, EmbedStats]:
        """Vectors [N, D] for texts, plus this call's hits/misses/prompts encoded."""
        before = self.stats.prompts_encoded
        vecs, lookup = self.cache.get_or_encode(
            self.namespace(augment), list(texts), lambda todo: self._encode_examples(todo, augment)
        )
        self.stats.hits += lookup.hits
        self.stats.misses += lookup.misses
        return vecs, EmbedStats(lookup.hits, lookup.misses, self.stats.prompts_encoded - before)


def parse_classes(configs: Sequence[dict[str, Any]]) -> list[ClassSpec]:
    """DirectAI classifier_configs -> ClassSpec list (validation of the HTTP body happens in the service)."""
    return [
        ClassSpec(
            name=str(c["name"]),
            include=tuple(c.get("examples_to_include") or ()),
            exclude=tuple(c.get("examples_to_exclude") or ()),
        )
        for c in configs
    ]


def compile_classes(classes: Sequence[ClassSpec], embedder: TextEmbedder, augment: bool) -> CompiledClassifier:
    """Embed every example of every class in one cache lookup and build the flat example matrix."""
    texts: list[str] = []
    for c in classes:
        texts.extend(c.include)
        texts.extend(c.exclude)
    vecs, _ = embedder.embed(texts, augment)
    emb = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32))
    positives, negatives, at = [], [], 0
    for c in classes:
        positives.append(emb[at : at + len(c.include)])
        at += len(c.include)
        negatives.append(emb[at : at + len(c.exclude)])
        at += len(c.exclude)
    return compile_classifier([c.name for c in classes], positives, negatives)


def score_images(image_embeddings: np.ndarray, clf: CompiledClassifier) -> list[dict[str, Any]]:
    """DirectAI-shaped results, one per image: {"scores", "pred", "raw_scores"}."""
    emb = torch.from_numpy(np.ascontiguousarray(image_embeddings, dtype=np.float32))
    raw, probs, pred = classify(emb, clf)
    names = clf.class_names
    raw_l, probs_l, pred_l = raw.tolist(), probs.tolist(), pred.tolist()
    return [
        {
            "scores": dict(zip(names, p)),
            "pred": names[k],
            "raw_scores": dict(zip(names, r)),
        }
        for r, p, k in zip(raw_l, probs_l, pred_l)
    ]
