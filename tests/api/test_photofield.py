"""api.photofield: the embedding wire format photofield reads (float16 base64 + float16 inverse norm bits)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from api.photofield import cosine_similarity, decode_embedding, encode_embedding


def photofield_ai_reference(emb: np.ndarray) -> tuple[str, int]:
    """photofield-ai's encode_embedding (main.py), restated: raw vector as float16, 1/||v|| computed in float16."""
    inv_norm = np.divide(1, np.linalg.norm(emb), dtype=np.float16)
    return base64.b64encode(emb.astype(np.float16).tobytes()).decode(), int.from_bytes(inv_norm.tobytes(), "little")


def test_exact_bytes() -> None:
    d = encode_embedding(np.array([1.0, -2.0], dtype=np.float32))
    assert set(d) == {"embedding_f16_b64", "embedding_inv_norm_f16_uint16"}
    assert base64.b64decode(d["embedding_f16_b64"]) == b"\x00\x3c\x00\xc0"  # 1.0, -2.0 as little-endian float16
    assert d["embedding_f16_b64"] == "ADwAwA=="
    expected_bits = int(np.array(1 / np.sqrt(5), dtype=np.float16).view(np.uint16))
    assert d["embedding_inv_norm_f16_uint16"] == expected_bits
    assert isinstance(d["embedding_inv_norm_f16_uint16"], int)


def test_unit_vector_has_inverse_norm_one() -> None:
    v = np.zeros(512, dtype=np.float32)
    v[3] = 1.0
    assert encode_embedding(v)["embedding_inv_norm_f16_uint16"] == 0x3C00  # float16 1.0


def test_raw_clip_scale_lands_near_photofields_mean() -> None:
    # photofield stores inv_norm as an offset from 11843 (float16 bits of ~1/10.2), typical of raw CLIP ViT-B/32.
    rng = np.random.default_rng(0)
    v = rng.normal(size=512).astype(np.float32)
    v *= 10.2 / np.linalg.norm(v)
    assert abs(encode_embedding(v)["embedding_inv_norm_f16_uint16"] - 11843) < 20


def test_matches_photofield_ai_for_model_outputs() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        emb = (rng.normal(size=512) * 0.45).astype(np.float16)  # what photofield-ai's float16 ONNX models emit
        ref_b64, ref_bits = photofield_ai_reference(emb)
        d = encode_embedding(emb)
        assert d["embedding_f16_b64"] == ref_b64
        # photofield-ai rounds the norm to float16 before dividing; we divide exactly and round once: <= 1 ulp apart
        assert abs(int(d["embedding_inv_norm_f16_uint16"]) - ref_bits) <= 1


def test_round_trip_and_cosine() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 768)).astype(np.float32)
    da, db = encode_embedding(a), encode_embedding(b)
    vec, inv = decode_embedding(da)
    assert vec.dtype == np.float32 and vec.shape == (768,)
    assert np.array_equal(vec, a.astype(np.float16).astype(np.float32))
    assert inv == pytest.approx(1 / np.linalg.norm(a), rel=1e-3)
    true_cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine_similarity(da, db) == pytest.approx(true_cos, abs=2e-3)
    assert cosine_similarity(da, da) == pytest.approx(1.0, abs=2e-3)


def test_input_is_not_mutated_and_any_float_dtype_works() -> None:
    v = np.linspace(-1, 1, 16, dtype=np.float64)
    before = v.copy()
    d = encode_embedding(v)
    assert np.array_equal(v, before)
    assert d == encode_embedding(v.astype(np.float32)) == encode_embedding(v.tolist())  # type: ignore[arg-type]


def test_zero_vector_gets_inverse_norm_zero() -> None:
    d = encode_embedding(np.zeros(8, dtype=np.float32))
    assert d["embedding_inv_norm_f16_uint16"] == 0
    vec, inv = decode_embedding(d)
    assert inv == 0.0 and not vec.any()


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 4), dtype=np.float32),
        np.zeros(0, dtype=np.float32),
        np.array([1.0, np.nan], dtype=np.float32),
        np.array([1.0, np.inf], dtype=np.float32),
        np.array([1e6, 1.0], dtype=np.float32),  # overflows float16
        np.array([1e-7, 0.0], dtype=np.float32),  # 1/norm overflows float16
    ],
)
def test_encode_rejects(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_embedding(bad)


@pytest.mark.parametrize(
    "d",
    [
        {},
        {"embedding_f16_b64": "not base64!"},
        {"embedding_f16_b64": base64.b64encode(b"\x00\x3c\x00").decode()},  # odd byte count
        {"embedding_f16_b64": "ADwAwA==", "embedding_inv_norm_f16_uint16": 70000},
        {"embedding_f16_b64": "ADwAwA==", "embedding_inv_norm_f16_uint16": -1},
    ],
)
def test_decode_rejects(d: dict) -> None:
    with pytest.raises(ValueError):
        decode_embedding(d)


def test_missing_inverse_norm_reads_as_zero_like_photofield() -> None:
    vec, inv = decode_embedding({"embedding_f16_b64": "ADwAwA=="})
    assert vec.tolist() == [1.0, -2.0] and inv == 0.0


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(-100, 100, width=32).filter(lambda x: x == 0 or abs(x) > 1e-3),
    )
)
def test_round_trip_property(v: np.ndarray) -> None:
    half = v.astype(np.float16).astype(np.float64)
    norm = float(np.linalg.norm(half))
    d = encode_embedding(v)
    vec, inv = decode_embedding(d)
    assert np.array_equal(vec, half.astype(np.float32))
    if norm == 0:
        assert inv == 0.0
    else:
        assert inv == pytest.approx(1 / norm, rel=1e-3)
