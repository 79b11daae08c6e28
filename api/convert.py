"""Engine results -> the JSON bodies clients expect (DirectAI's classify/detect shapes, photofield's embeddings)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from api.photofield import encode_embedding
from engine.deployments import DeploymentInfo
from engine.kinds import Classification, Detection
from imaging.sources import ImageSource


def classification(c: Classification) -> dict[str, Any]:
    """``{"scores", "pred", "raw_scores"}`` with classes in their deployed order, plus ``"rejected"`` with an open
    set."""
    names = c.class_names
    out = {"scores": dict(zip(names, c.scores)), "pred": c.label, "raw_scores": dict(zip(names, c.raw_scores))}
    if c.rejected is not None:  # only a deployment with an open set says whether the image was turned away
        out["rejected"] = c.rejected
    if c.probabilities is not None:  # only a model with probabilities (SigLIP) has them
        out["probabilities"] = dict(zip(names, c.probabilities))
    return out


def classifications(results: Sequence[Classification]) -> dict[str, Any] | list[dict[str, Any]]:
    """One image -> an object (DirectAI's form); several -> a list."""
    out = [classification(c) for c in results]
    return out[0] if len(out) == 1 else out


def detections(results: Sequence[Sequence[Detection]]) -> list[list[dict[str, Any]]]:
    """One list per image of ``{"tlbr", "score", "class"}``, best first."""
    return [[{"tlbr": d.tlbr, "score": d.score, "class": d.label} for d in image] for image in results]


def deployment_summary(d: DeploymentInfo) -> dict[str, Any]:
    return {
        "deployed_id": d.deployed_id,
        "kind": d.kind,
        "tenant": d.tenant,
        "n_classes": d.n_classes,
        "version": d.version,
        "created_at": d.created_at,
        "updated_at": d.updated_at,
    }


def photofield_texts(texts: Sequence[str], vecs: np.ndarray) -> dict[str, Any]:
    return {"texts": [{"text": t, **encode_embedding(v)} for t, v in zip(texts, vecs)]}


def photofield_images(sources: Sequence[ImageSource], vecs: np.ndarray) -> dict[str, Any]:
    return {
        "images": [{"field": s.field, "filename": s.filename, **encode_embedding(v)} for s, v in zip(sources, vecs)]
    }
