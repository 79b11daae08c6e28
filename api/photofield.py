"""photofield's embedding wire format, as served by photofield-ai and read by photofield.

Each embedding travels as two JSON fields (photofield-ai ``main.py`` ``encode_embedding``; photofield
``internal/clip/ai.go`` ``encodedEmbedding``):

* ``embedding_f16_b64``: standard base64 (with padding) of the vector as float16 values in little-endian byte order
  (photofield reinterprets the decoded bytes in place as ``[]float16``). photofield-ai sends the model's *raw*
  projection output, not a unit vector;
* ``embedding_inv_norm_f16_uint16``: ``1 / ||v||`` rounded to float16, sent as the integer value of its 16 bits.

photofield computes cosine similarity as ``dot(a, b) * inv_norm(a) * inv_norm(b)``, so it works whether the vector
is raw or already unit length, as long as the inverse norm matches the vector that was sent. (It stores the inverse
norm as an offset from 11843, about 1/10.2, the typical inverse norm of raw CLIP ViT-B/32 embeddings; any uint16
value round-trips.)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np

F16 = np.dtype("<f2")
U16 = np.dtype("<u2")


def encode_embedding(vec: np.ndarray) -> dict[str, str | int]:
    """A 1-D vector -> ``{"embedding_f16_b64": str, "embedding_inv_norm_f16_uint16": int}``.

    The vector is sent as given (pass the raw features to match photofield-ai byte for byte). The norm is taken of
    the float16 values actually sent, so ``dot * inv_norm`` is consistent on the receiving side. A zero vector gets
    inverse norm 0 (similarity 0 in photofield) instead of infinity.
    """
    arr = np.asarray(vec)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"expected a non-empty 1-D vector, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("embedding contains NaN or infinity")
    with np.errstate(over="ignore"):  # overflow to inf is detected just below, with a clearer error
        half = arr.astype(F16)
        if not np.all(np.isfinite(half)):
            raise ValueError("embedding values overflow float16")
        norm = float(np.linalg.norm(half.astype(np.float64)))
        inv = np.array(1.0 / norm if norm > 0 else 0.0, dtype=np.float64).astype(F16)
    if not np.isfinite(inv):
        raise ValueError(f"embedding norm {norm:g} is too small for a float16 inverse norm")
    return {
        "embedding_f16_b64": base64.b64encode(half.tobytes()).decode("ascii"),
        "embedding_inv_norm_f16_uint16": int(inv.reshape(1).view(U16)[0]),
    }


def decode_embedding(d: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    """The inverse of :func:`encode_embedding`: (float32 vector as sent, inverse norm as a float).

    A missing ``embedding_inv_norm_f16_uint16`` reads as 0, as in photofield (its Go struct uses ``omitempty``).
    """
    try:
        raw = base64.b64decode(d["embedding_f16_b64"], validate=True)
    except KeyError as exc:
        raise ValueError("missing embedding_f16_b64") from exc
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ValueError(f"embedding_f16_b64 is not valid base64: {exc}") from exc
    if len(raw) % 2:
        raise ValueError(f"embedding_f16_b64 holds {len(raw)} bytes, not a whole number of float16 values")
    bits = int(d.get("embedding_inv_norm_f16_uint16", 0))
    if not 0 <= bits <= 0xFFFF:
        raise ValueError(f"embedding_inv_norm_f16_uint16 {bits} is not a uint16")
    vec = np.frombuffer(raw, dtype=F16).astype(np.float32)
    inv_norm = float(np.array([bits], dtype=U16).view(F16)[0])
    return vec, inv_norm


def cosine_similarity(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Cosine similarity of two encoded embeddings, computed the way photofield does (dot * inv_a * inv_b)."""
    va, ia = decode_embedding(a)
    vb, ib = decode_embedding(b)
    if va.shape != vb.shape:
        raise ValueError(f"embedding lengths differ: {va.size} and {vb.size}")
    return float(np.dot(va, vb)) * ia * ib
