"""One object per deployment kind: its schema, how a config is compiled, and how images are scored with it.

Compiling embeds every example of every class in one cache lookup and builds the flat example matrix that
semantic/ scores with; scoring turns encoder outputs into typed results (the API converts them to DirectAI JSON).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.configs import (
    ClassifierConfig,
    DeployClassifierRequest,
    DeployDetectorRequest,
    Kind,
)
from engine.embedder import TextEmbedder
from engine.exemplars import ImageEmbedder, has_images
from errors import Invalid
from imaging.geometry import scale_boxes
from semantic.classify import (
    CompiledClassifier,
    classify,
    compile_classifier,
    probabilities,
    rejected,
    rejected_by_probability,
)
from semantic.detect import box_class_scores, detect, image_query_index, iou_graph


@dataclass(frozen=True)
class Classification:
    """One image's result: per-class softmax scores and raw two-stage scores (class order), and the prediction."""

    class_names: tuple[str, ...]
    scores: list[float]
    raw_scores: list[float]
    pred: int
    # With an open set: the label a rejected image gets, and whether this one is rejected (None: no open set).
    open_label: str | None = None
    rejected: bool | None = None
    # A sigmoid-loss model's per-class probabilities (class order); None for a CLIP.
    probabilities: list[float] | None = None

    @property
    def label(self) -> str:
        return self.open_label if self.rejected and self.open_label is not None else self.class_names[self.pred]


@dataclass(frozen=True)
class Scored:
    """Images scored by a classifier, as tensors: raw [B, C], softmax [B, C], prediction [B], open-set verdict [B],
    and the sigmoid probabilities [B, C] where the model has a logit bias (SigLIP)."""

    raw: torch.Tensor
    probs: torch.Tensor
    pred: torch.Tensor
    rejected: torch.Tensor | None
    sigmoid: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> Scored:
        pick = None if self.rejected is None else self.rejected[index]
        sig = None if self.sigmoid is None else self.sigmoid[index]
        return Scored(self.raw[index], self.probs[index], self.pred[index], pick, sig)


def open_set_label(clf: CompiledClassifier) -> str | None:
    """The label an open set gives rejected images (by score threshold, or by probability on SigLIP), if any."""
    if clf.open_set is not None:
        return clf.open_set[0]
    if clf.open_set_probability is not None:
        return clf.open_set_probability[0]
    return None


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
    tensors += [t for t in (clf.probe, clf.probe_class) if t is not None]
    if isinstance(compiled, CompiledDetector):
        tensors.append(compiled.thresholds)
    return sum(t.element_size() * t.nelement() for t in tensors)


def compile_examples(
    classes: Sequence[ClassifierConfig],
    embedder: TextEmbedder,
    augment: bool,
    images: ImageEmbedder | None = None,
    images_as_texts: bool = False,
) -> CompiledClassifier:
    """Embed every text example of every class in one cache lookup (and every image example in another, through
    ``images``) and build the flat example matrix. ``images_as_texts``: the image vectors live in the text examples'
    space (a detector's image queries), so they join the text examples' slots with no calibration."""
    texts: list[str] = []
    for c in classes:
        texts.extend(c.texts(True))
        texts.extend(c.texts(False))
    vecs, _ = embedder.embed(texts, augment) if texts else (np.zeros((0, 0), np.float32), None)
    emb = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32))
    positives, negatives, at = [], [], 0
    for c in classes:
        n_pos, n_neg = len(c.texts(True)), len(c.texts(False))
        positives.append(emb[at : at + n_pos])
        at += n_pos
        negatives.append(emb[at : at + n_neg])
        at += n_neg
    names = [c.name for c in classes]
    if not has_images(classes):
        return compile_classifier(names, positives, negatives)
    if images is None:
        raise Invalid("Image examples are not supported for this kind of deployment.")
    found = images.embed_classes(classes)

    def tensors(blocks: list[np.ndarray]) -> list[torch.Tensor]:
        dim = next(b.shape[1] for b in found.positives + found.negatives if b.shape[0])
        return [torch.from_numpy(np.ascontiguousarray(b, np.float32)).reshape(-1, dim) for b in blocks]

    img_pos, img_neg = tensors(found.positives), tensors(found.negatives)
    # Several views per image (CLIP's: the image and its left-right mirror): each view of a positive image example is
    # one more positive image example (the mirror is as much that class); a negative keeps its own view only.
    dim = img_pos[0].shape[1] // images.views
    img_pos = [p.reshape(-1, images.views, dim).transpose(0, 1).reshape(-1, dim) for p in img_pos]
    img_neg = [n[:, :dim] for n in img_neg]
    if texts and emb.shape[1] != dim:
        raise Invalid(f"The text encoder's vectors ({emb.shape[1]}) and the image encoder's ({dim}) differ in size.")
    fix = [p if p.shape[0] else torch.zeros(0, dim) for p in positives]
    fixn = [n if n.shape[0] else torch.zeros(0, dim) for n in negatives]
    if images_as_texts:
        both_pos = [torch.cat([t, i]) for t, i in zip(fix, img_pos)]
        both_neg = [torch.cat([t, i]) for t, i in zip(fixn, img_neg)]
        return compile_classifier(names, both_pos, both_neg)
    return compile_classifier(names, fix, fixn, img_pos, img_neg)


class ClassifierKind:
    kind = Kind.CLASSIFIER
    schema = DeployClassifierRequest

    @staticmethod
    def compile(
        body: DeployClassifierRequest,
        embedder: TextEmbedder,
        images: ImageEmbedder | None = None,
        logits: tuple[float, float] | None = None,
    ) -> CompiledClassifier:
        """``logits``: the model's (logit scale, logit bias) when it has probabilities (SigLIP), else None."""
        open_set = body.open_set
        if open_set is not None:
            if open_set.threshold is not None and open_set.min_probability is not None:
                raise Invalid("Give the open set a threshold or a min_probability, not both.")
            if open_set.min_probability is not None and logits is None:
                raise Invalid("This model has no probabilities (no logit bias): give the open set a threshold.")
            if open_set.threshold is None and logits is None:
                raise Invalid("The open set needs a threshold (on the best class's raw score).")
        clf = compile_examples(body.classifier_configs, embedder, body.augment_examples, images)
        clf = replace(clf, logits=logits)
        if open_set is not None and open_set.threshold is not None:
            clf = replace(clf, open_set=(open_set.label, float(open_set.threshold)))
        elif open_set is not None:
            p = open_set.min_probability
            clf = replace(clf, open_set_probability=(open_set.label, 0.5 if p is None else float(p)))
        return clf

    @staticmethod
    def score(image_embeddings: np.ndarray, clf: CompiledClassifier) -> list[Classification]:
        """Image embeddings [B, D] -> one result per image (with the open set's verdict when it has one, and the
        per-class probabilities when the model has them)."""
        return ClassifierKind.results(ClassifierKind.tensors(image_embeddings, clf), clf)

    @staticmethod
    def tensors(image_embeddings: np.ndarray, clf: CompiledClassifier) -> Scored:
        """The scores of :meth:`score` as tensors (a stored collection is scored whole, its results built per page)."""
        emb = torch.from_numpy(np.ascontiguousarray(image_embeddings, dtype=np.float32))
        raw, probs, pred = classify(emb, clf)
        sig = probabilities(raw, clf.logits) if clf.logits is not None else None
        verdicts = None
        if clf.open_set is not None:
            verdicts = rejected(raw, clf.open_set[1])
        elif clf.open_set_probability is not None and sig is not None:
            verdicts = rejected_by_probability(sig, clf.open_set_probability[1])
        return Scored(raw, probs, pred, verdicts, sig)

    @staticmethod
    def results(s: Scored, clf: CompiledClassifier) -> list[Classification]:
        label = open_set_label(clf) if s.rejected is not None else None
        verdicts = [bool(x) for x in s.rejected.tolist()] if s.rejected is not None else [None] * len(s.pred)
        sigs = s.sigmoid.tolist() if s.sigmoid is not None else [None] * len(s.pred)
        return [
            Classification(clf.class_names, p, r, k, label, x, g)
            for r, p, k, x, g in zip(s.raw.tolist(), s.probs.tolist(), s.pred.tolist(), verdicts, sigs)
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
    def compile(
        body: DeployDetectorRequest, embedder: TextEmbedder, images: ImageEmbedder | None = None
    ) -> CompiledDetector:
        # Image examples become query embeddings in the text queries' space: the same rule scores and vetoes them.
        return CompiledDetector(
            examples=compile_examples(body.detector_configs, embedder, body.augment_examples, images, True),
            thresholds=torch.tensor([c.detection_threshold for c in body.detector_configs], dtype=torch.float32),
            nms_threshold=float(body.nms_threshold),
            class_agnostic_nms=bool(body.class_agnostic_nms),
        )

    @staticmethod
    def image_query(enc: BoxEncoding, size: tuple[int, int]) -> np.ndarray:
        """An example image's query embedding: the class embedding of its box chosen as OWLv2's image-guided
        detection does (``semantic.detect.image_query_index``); ``size`` is the (width, height) the detector saw."""
        k = image_query_index(
            torch.from_numpy(np.ascontiguousarray(enc.boxes, np.float32)), float(size[0]), float(size[1])
        )
        return np.asarray(enc.class_embeds[k], dtype=np.float32)

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
