"""Loading and encoding through runners.clip, with models the tests write to disk."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from runners.clip import Preprocess, load_clip_encoder, quantize_mode, resolve_model
from settings import Settings, get_settings
from testing.clip_images import encode_images
from testing.models import ClipFiles, write_tiny_clip


def settings_for(files: ClipFiles, **kw: object) -> Settings:
    return Settings(clip_model=str(files.config), clip_pretrained=str(files.checkpoint), **kw)  # type: ignore[arg-type]


def test_loads_local_config_and_checkpoint(tiny_clip: ClipFiles) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip))
    ref = open_clip.model.CLIP(**json.loads(tiny_clip.config.read_text()))
    ref.load_state_dict(torch.load(tiny_clip.checkpoint, weights_only=True))
    ref.eval()
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a red circle"])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_texts(["a red circle"]), expected, atol=1e-5)
    assert enc.dim == 32


def test_model_id_keys_on_checkpoint_content(tmp_path: Path) -> None:
    a = write_tiny_clip(tmp_path / "a", seed=0)
    b = write_tiny_clip(tmp_path / "b", seed=1)
    c = write_tiny_clip(tmp_path / "c", seed=0)
    ida, idb, idc = (resolve_model(settings_for(f)).model_id for f in (a, b, c))
    assert ida != idb  # other weights, other cache namespace
    assert ida == idc  # same content, same id wherever the file lies


def test_random_weights_are_seeded_and_warned(tiny_clip: ClipFiles, caplog: pytest.LogCaptureFixture) -> None:
    s = Settings(clip_model=str(tiny_clip.config), clip_pretrained="random", random_seed=3)
    with caplog.at_level(logging.WARNING):
        e1 = load_clip_encoder(s).encode_texts(["x"])
    assert "RANDOM weights" in caplog.text
    np.testing.assert_array_equal(e1, load_clip_encoder(s).encode_texts(["x"]))
    assert "random-seed3" in resolve_model(s).model_id


def test_trimmed_context_equals_padding_to_77(tiny_clip: ClipFiles) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip))
    assert enc.can_trim_context
    texts = ["a", "a photo of a cat", "a " * 40 + "very long prompt", "unicode ✨ 猫", "x" * 500]
    np.testing.assert_allclose(
        enc.encode_texts(texts, trim_context=True), enc.encode_texts(texts, trim_context=False), atol=1e-6
    )


def test_text_order_is_preserved_across_length_sorted_chunks(tiny_clip: ClipFiles) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip))
    enc.text_batch_size = 2
    texts = ["a long long long prompt here", "b", "c c", "d d d d d d", "e"]
    together = enc.encode_texts(texts)
    one_by_one = np.concatenate([enc.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)


@pytest.fixture(scope="module")
def vit_b32_preprocessing() -> tuple[Preprocess, object]:
    model, _, transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return Preprocess.from_open_clip(model.visual.preprocess_cfg), transform


@pytest.mark.parametrize("size", [(50, 70), (70, 50), (224, 224), (9, 300)])
def test_preprocessing_matches_open_clip_transform(
    size: tuple[int, int], vit_b32_preprocessing: tuple[Preprocess, object]
) -> None:
    pre, transform = vit_b32_preprocessing
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
    ours = pre.normalise(torch.from_numpy(pre.to_pixels(img).copy())[None])
    expected = transform(img)[None]  # type: ignore[operator]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_image_embeddings_are_normalised_and_batch_independent(tiny_clip: ClipFiles) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip), towers="image")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    batch = encode_images(enc, imgs)
    assert batch.dtype == np.float32 and batch.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch[1:2], encode_images(enc, imgs[1:2]), atol=1e-5)


def test_the_served_encoder_carries_no_preprocessing_pool(tiny_clip: ClipFiles) -> None:
    """The image encoder service gets pixels (the API worker preprocesses): PIL-image encoding and its thread pool
    are bench/test-only (testing/clip_images.py), not members of the served encoder."""
    before = {t.name for t in threading.enumerate()}
    enc = load_clip_encoder(settings_for(tiny_clip), towers="image")
    assert not hasattr(enc, "encode_images") and not hasattr(enc, "images_to_pixels")
    assert not [v for v in vars(enc).values() if isinstance(v, Executor)]
    assert not [n for n in {t.name for t in threading.enumerate()} - before if n.startswith("clip-pre")]


def test_settings_from_env() -> None:
    s = get_settings({"ZSS_CLIP_MODEL": "RN50", "ZSS_FP16": "false", "ZSS_DETECTOR_TOP_K": "7", "ZSS_DATA_DIR": "/x"})
    assert (s.clip_model, s.fp16, s.detector_top_k, str(s.data_dir)) == ("RN50", False, 7, "/x")
    with pytest.raises(ValueError, match="ZSS_FP16"):
        get_settings({"ZSS_FP16": "maybe"})
    assert get_settings({"ZSS_DETECTOR_MODEL": "none"}).detector_enabled is False


def test_bad_model_config_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="not an open_clip model config"):
        resolve_model(Settings(clip_model=str(bad), clip_pretrained="random"))
    with pytest.raises(FileNotFoundError):
        resolve_model(Settings(clip_model=str(tmp_path / "missing.json"), clip_pretrained="random"))


def test_int8_backend_has_its_own_model_id_and_stays_close_to_float(tiny_clip: ClipFiles) -> None:
    fp32 = load_clip_encoder(settings_for(tiny_clip))
    int8 = load_clip_encoder(settings_for(tiny_clip, clip_quantize="int8"))
    assert int8.model_id == fp32.model_id + "+int8"  # its vectors never share the float model's cache entries
    quantized = [m for m in int8.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert quantized, "no Linear layer was quantised"
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in fp32.model.modules())
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a, b = fp32.encode_pixels(pixels), int8.encode_pixels(pixels)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(a, b)  # it really runs another computation
    # Measured on this tiny model: images >= 0.99993, texts 0.9993 (ViT-B-32: 0.9997+, BENCHMARKS.md). The bounds
    # leave about ten times the measured gap, so a real regression of the int8 path fails here.
    assert float((a * b).sum(axis=1).min()) > 0.999
    t = int8.encode_texts(["a red circle", "a blue square"])
    assert float((t * fp32.encode_texts(["a red circle", "a blue square"])).sum(axis=1).min()) > 0.993


def test_quantize_setting_is_validated() -> None:
    assert quantize_mode("", torch.device("cpu")) == "none"
    assert quantize_mode(" INT8 ", torch.device("cpu")) == "int8"
    with pytest.raises(ValueError, match="ZSS_CLIP_QUANTIZE"):
        quantize_mode("int4", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU precision"):
        quantize_mode("int8", torch.device("cuda"))
    # bf16: only where the CPU executes it natively, never on a GPU (ZSS_FP16 is the GPU's half precision).
    assert quantize_mode("bf16", torch.device("cpu"), bf16=True) == "bf16"
    with pytest.raises(ValueError, match="executes bf16 natively.*avx512_bf16"):
        quantize_mode("BF16", torch.device("cpu"), bf16=False)
    with pytest.raises(ValueError, match="ZSS_FP16"):
        quantize_mode("bf16", torch.device("cuda"), bf16=True)
    assert get_settings({"ZSS_CLIP_QUANTIZE": "int8"}).clip_quantize == "int8"
