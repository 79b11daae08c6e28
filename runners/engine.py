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
from semantic.detect import box_class_scores, detect, iou_graph
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
    examples_encoded: int = 0


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
    # Called with each lookup's own stats (thread-safe per call, unlike deltas of the running totals).
    on_lookup: Callable[[EmbedStats], None] | None = None

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
        self.stats.examples_encoded += lookup.encoded
        call = EmbedStats(lookup.hits, lookup.misses, self.stats.prompts_encoded - before, lookup.encoded)
        if self.on_lookup is not None:
            self.on_lookup(call)
        return vecs, call


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


@dataclass(frozen=True)
class CompiledDetector:
    """A detector's examples as one matrix (same layout as a classifier) plus its thresholds and NMS settings."""

    examples: CompiledClassifier
    thresholds: torch.Tensor  # [C]
    nms_threshold: float
    class_agnostic_nms: bool


def compile_detector(
    classes: Sequence[ClassSpec],
    thresholds: Sequence[float],
    embedder: TextEmbedder,
    augment: bool,
    nms_threshold: float,
    class_agnostic_nms: bool,
) -> CompiledDetector:
    return CompiledDetector(
        examples=compile_classes(classes, embedder, augment),
        thresholds=torch.tensor(list(thresholds), dtype=torch.float32),
        nms_threshold=float(nms_threshold),
        class_agnostic_nms=bool(class_agnostic_nms),
    )


def score_detections(
    boxes: np.ndarray,
    class_embeds: np.ndarray,
    logit_shift: np.ndarray,
    logit_scale: np.ndarray,
    det: CompiledDetector,
    scale_xy: tuple[float, float] = (1.0, 1.0),
) -> list[dict[str, Any]]:
    """One image's boxes -> DirectAI-shaped detections [{"tlbr", "score", "class"}], best first.

    ``scale_xy`` maps box coordinates from the image the detector saw back to the original image.
    """
    ex = det.examples
    b = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))
    # Boxes lying wholly in the square's padding clip to zero area: they cover no image content.
    valid = ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).nonzero(as_tuple=True)[0]
    b = b[valid]
    pos, neg = box_class_scores(
        torch.from_numpy(np.ascontiguousarray(class_embeds, dtype=np.float32))[valid],
        ex.examples,
        torch.from_numpy(np.ascontiguousarray(logit_shift, dtype=np.float32))[valid],
        torch.from_numpy(np.ascontiguousarray(logit_scale, dtype=np.float32))[valid],
        ex.example_class,
        ex.example_positive,
        ex.n_classes,
    )
    graph = iou_graph(b, det.nms_threshold)  # once per image, shared by every class
    box_idx, cls_idx, score = detect(
        b, pos, neg, det.thresholds, det.nms_threshold, det.class_agnostic_nms, graph=graph
    )
    sx, sy = scale_xy
    scaled = (b[box_idx] * torch.tensor([sx, sy, sx, sy])).tolist()
    names = ex.class_names
    return [{"tlbr": box, "score": s, "class": names[c]} for box, s, c in zip(scaled, score.tolist(), cls_idx.tolist())]
