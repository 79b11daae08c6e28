"""One object per deployment kind: its schema, how a config is compiled, and how images are scored with it.

Compiling embeds every example of every class in one cache lookup and builds the flat example matrix that
semantic/ scores with; scoring turns encoder outputs into typed results (the API converts them to DirectAI JSON).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.configs import (
    ClassifierConfig,
    DeployClassifierRequest,
    DeployDetectorRequest,
    Kind,
)
from engine.embedder import TextEmbedder
from imaging.geometry import scale_boxes
from semantic.classify import CompiledClassifier, classify, compile_classifier
from semantic.detect import box_class_scores, detect, iou_graph


@dataclass(frozen=True)
class Classification:
    """One image's result: per-class softmax scores and raw two-stage scores (class order), and the prediction."""

    class_names: tuple[str, ...]
    scores: list[float]
    raw_scores: list[float]
    pred: int

    @property
    def label(self) -> str:
        return self.class_names[self.pred]


@dataclass(frozen=True)
class Detection:
    tlbr: list[float]  # x1, y1, x2, y2 in the client's original pixels
    score: float
    label: str


@dataclass(frozen=True)
class CompiledDetector:
    """A detector's examples as one matrix (the classifier layout) plus its thresholds and NMS settings."""

    examples: CompiledClassifier
    thresholds: torch.Tensor  # [C]
    nms_threshold: float
    class_agnostic_nms: bool


def tensor_bytes(compiled: CompiledClassifier | CompiledDetector) -> int:
    """Memory a compiled deployment holds (what the compiled-deployment cache is bounded by)."""
    clf = compiled.examples if isinstance(compiled, CompiledDetector) else compiled
    tensors = [clf.examples, clf.example_class, clf.example_positive, clf.example_slot]
    if isinstance(compiled, CompiledDetector):
        tensors.append(compiled.thresholds)
    return sum(t.element_size() * t.nelement() for t in tensors)


def compile_examples(classes: Sequence[ClassifierConfig], embedder: TextEmbedder, augment: bool) -> CompiledClassifier:
    """Embed every example of every class in one cache lookup and build the flat example matrix."""
    texts: list[str] = []
    for c in classes:
        texts.extend(c.examples_to_include)
        texts.extend(c.examples_to_exclude)
    vecs, _ = embedder.embed(texts, augment)
    emb = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32))
    positives, negatives, at = [], [], 0
    for c in classes:
        positives.append(emb[at : at + len(c.examples_to_include)])
        at += len(c.examples_to_include)
        negatives.append(emb[at : at + len(c.examples_to_exclude)])
        at += len(c.examples_to_exclude)
    return compile_classifier([c.name for c in classes], positives, negatives)


class ClassifierKind:
    kind = Kind.CLASSIFIER
    schema = DeployClassifierRequest

    @staticmethod
    def compile(body: DeployClassifierRequest, embedder: TextEmbedder) -> CompiledClassifier:
        return compile_examples(body.classifier_configs, embedder, body.augment_examples)

    @staticmethod
    def score(image_embeddings: np.ndarray, clf: CompiledClassifier) -> list[Classification]:
        """Image embeddings [B, D] -> one result per image."""
        emb = torch.from_numpy(np.ascontiguousarray(image_embeddings, dtype=np.float32))
        raw, probs, pred = classify(emb, clf)
        return [
            Classification(clf.class_names, p, r, k) for r, p, k in zip(raw.tolist(), probs.tolist(), pred.tolist())
        ]


@dataclass(frozen=True)
class BoxEncoding:
    """The detector's per-box outputs for one image, in the pixels of the image it saw (see runners/owl.py)."""

    boxes: np.ndarray  # [k, 4] xyxy
    class_embeds: np.ndarray  # [k, D], L2-normalised
    logit_shift: np.ndarray  # [k]
    logit_scale: np.ndarray  # [k]


class DetectorKind:
    kind = Kind.DETECTOR
    schema = DeployDetectorRequest

    @staticmethod
    def compile(body: DeployDetectorRequest, embedder: TextEmbedder) -> CompiledDetector:
        return CompiledDetector(
            examples=compile_examples(body.detector_configs, embedder, body.augment_examples),
            thresholds=torch.tensor([c.detection_threshold for c in body.detector_configs], dtype=torch.float32),
            nms_threshold=float(body.nms_threshold),
            class_agnostic_nms=bool(body.class_agnostic_nms),
        )

    @staticmethod
    def score(enc: BoxEncoding, det: CompiledDetector, scale_xy: tuple[float, float] = (1.0, 1.0)) -> list[Detection]:
        """One image's boxes -> detections, best first; ``scale_xy`` maps the boxes back to the original pixels."""
        ex = det.examples
        b = torch.from_numpy(np.ascontiguousarray(enc.boxes, dtype=np.float32))
        # Boxes lying wholly in the square's padding clip to zero area: they cover no image content.
        valid = ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).nonzero(as_tuple=True)[0]
        b = b[valid]

        def rows(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[valid]

        pos, neg = box_class_scores(
            rows(enc.class_embeds),
            ex.examples,
            rows(enc.logit_shift),
            rows(enc.logit_scale),
            ex.example_class,
            ex.example_positive,
            ex.n_classes,
            slot=ex.example_slot,
        )
        graph = iou_graph(b, det.nms_threshold)  # once per image, shared by every class
        box_idx, cls_idx, score = detect(
            b, pos, neg, det.thresholds, det.nms_threshold, det.class_agnostic_nms, graph=graph
        )
        scaled = scale_boxes(b[box_idx], *scale_xy).tolist()
        names = ex.class_names
        return [Detection(box, s, names[c]) for box, s, c in zip(scaled, score.tolist(), cls_idx.tolist())]


KINDS: dict[Kind, type[ClassifierKind] | type[DetectorKind]] = {
    Kind.CLASSIFIER: ClassifierKind,
    Kind.DETECTOR: DetectorKind,
}
