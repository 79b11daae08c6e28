"""runners.owl on a tiny random OWLv2 built offline (tests/owl_fixtures.py); no network, CPU only."""

from __future__ import annotations

import os
import resource
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from runners.owl import OwlDetector, model_id_for  # noqa: E402
from semantic.detect import box_example_fit  # noqa: E402
from settings import Settings  # noqa: E402
from testing.owl import (  # noqa: E402
    TINY_EMBED_DIM,
    TINY_IMAGE_SIZE,
    TINY_NUM_BOXES,
    build_tiny_owlv2,
    build_tiny_owlvit,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_owlv2(tmp_path_factory.mktemp("owl") / "tiny-owlv2")


@pytest.fixture(scope="module")
def detector(tiny_dir: Path) -> OwlDetector:
    settings = Settings(detector_model=str(tiny_dir), detector_top_k=10, device="cpu", fp16=True)
    return OwlDetector.from_settings(settings)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_loads_local_dir_with_stable_id(detector: OwlDetector, tiny_dir: Path) -> None:
    assert detector.model_type == "owlv2"
    assert detector.input_size == TINY_IMAGE_SIZE
    assert detector.dtype == torch.float32  # fp16 is ignored on CPU
    assert detector.model_id.startswith(str(tiny_dir.resolve()) + "#sha256:")
    assert model_id_for(str(tiny_dir)) == detector.model_id  # stable across loads
    assert model_id_for("google/owlv2-base-patch16-ensemble") == "google/owlv2-base-patch16-ensemble"
    assert detector.model.config._attn_implementation == "sdpa"


def test_image_outputs_shapes_dtypes_and_top_k(detector: OwlDetector) -> None:
    encs = detector.encode_images([_noise(40, 90), _noise(120, 30, seed=1)])
    assert len(encs) == 2
    for enc in encs:
        assert set(enc) == {"boxes", "class_embeds", "logit_shift", "logit_scale", "objectness"}
        assert enc["boxes"].shape == (10, 4)
        assert enc["class_embeds"].shape == (10, TINY_EMBED_DIM)
        for name in ("logit_shift", "logit_scale", "objectness"):
            assert enc[name].shape == (10,)
        assert all(v.dtype == np.float32 for v in enc.values())
        np.testing.assert_allclose(np.linalg.norm(enc["class_embeds"], axis=1), 1.0, atol=1e-5)
        obj = enc["objectness"]
        assert np.all((obj >= 0) & (obj <= 1)) and np.all(obj[:-1] >= obj[1:])  # sorted, best first
        assert np.all(enc["logit_scale"] > 0)  # elu(x) + 1 > 0


def test_top_k_clipped_to_number_of_boxes(tiny_dir: Path) -> None:
    det = OwlDetector(str(tiny_dir), top_k=10_000, device="cpu")
    (enc,) = det.encode_images([_noise(50, 50)])
    assert enc["boxes"].shape == (TINY_NUM_BOXES, 4)
    assert det.encode_images([]) == []


def test_boxes_in_original_image_coordinates(detector: OwlDetector, tiny_dir: Path) -> None:
    from transformers import Owlv2ForObjectDetection

    width, height = 40, 90
    (enc,) = detector.encode_images([_noise(width, height)])
    b = enc["boxes"]
    assert np.all(b[:, 0] >= 0) and np.all(b[:, 2] <= width) and np.all(b[:, 1] >= 0) and np.all(b[:, 3] <= height)
    assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
    # Recompute the raw cxcywh boxes of the same pixels and map them by hand: x, y scale by the longer side (90).
    model = Owlv2ForObjectDetection.from_pretrained(tiny_dir).eval()
    with torch.inference_mode():
        px = detector.preprocess([_noise(width, height)])
        fmap, _ = model.image_embedder(pixel_values=px)
        feats = fmap.reshape(1, -1, fmap.shape[-1])
        raw = model.box_predictor(feats, fmap)[0]
        order = torch.topk(model.objectness_predictor(feats)[0], 10).indices
    cx, cy, w, h = raw[order].unbind(-1)
    want = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * height
    want = torch.minimum(want.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))
    np.testing.assert_allclose(b, want.numpy(), atol=1e-4)


def test_padding_is_bottom_right_and_scale_kept(detector: OwlDetector) -> None:
    px = detector.preprocess([Image.new("RGB", (40, 90), (255, 255, 255))])[0]
    s = TINY_IMAGE_SIZE
    content_w = round(40 * s / 90)
    pad_value = (0 - detector._mean) / detector._std  # black in pixel space, as HF pads
    white = (1 - detector._mean) / detector._std
    torch.testing.assert_close(px[:, :, :content_w], white.expand(3, s, content_w))
    torch.testing.assert_close(px[:, :, content_w:], pad_value.expand(3, s, s - content_w))


def test_matches_hf_forward_on_square_image(detector: OwlDetector, tiny_dir: Path) -> None:
    """On a square image at the model's size (no resize, no padding) the pieces reproduce HF's end-to-end logits."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    model = Owlv2ForObjectDetection.from_pretrained(tiny_dir).eval()
    proc = Owlv2Processor.from_pretrained(tiny_dir)
    image = _noise(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, seed=3)
    texts = ["a photo of a cat", "a photo of a dog"]
    inputs = proc(text=[texts], images=image, return_tensors="pt")
    with torch.inference_mode():
        out = model(**inputs)
    det = OwlDetector(str(tiny_dir), top_k=TINY_NUM_BOXES, device="cpu")
    (enc,) = det.encode_images([image])
    q = det.encode_texts(texts)
    torch.testing.assert_close(torch.from_numpy(q), torch.nn.functional.normalize(out.text_embeds[0], dim=-1))
    order = torch.topk(out.objectness_logits[0], TINY_NUM_BOXES).indices
    fit = box_example_fit(
        torch.from_numpy(enc["class_embeds"]),
        torch.from_numpy(q),
        torch.from_numpy(enc["logit_shift"]),
        torch.from_numpy(enc["logit_scale"]),
    )
    torch.testing.assert_close(fit, torch.sigmoid(out.logits[0, order]), atol=1e-4, rtol=1e-4)
    hf_boxes = out.pred_boxes[0, order]
    cx, cy, w, h = hf_boxes.unbind(-1)
    xyxy = (torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * TINY_IMAGE_SIZE).clamp(
        0, TINY_IMAGE_SIZE
    )
    # The preprocessing differs slightly from HF's (PIL vs HF resampling of a same-size image): compare loosely.
    np.testing.assert_allclose(enc["boxes"], xyxy.numpy(), atol=0.5)


def test_owlvit_keeps_every_box(tmp_path: Path) -> None:
    det = OwlDetector(str(build_tiny_owlvit(tmp_path / "tiny-owlvit")), top_k=10, device="cpu")
    assert det.model_type == "owlvit" and not det.has_objectness
    (enc,) = det.encode_images([_noise(90, 40)])
    assert enc["boxes"].shape == (TINY_NUM_BOXES, 4)  # no objectness head: top_k cannot rank, all boxes kept
    assert np.all(enc["objectness"] == 1.0)
    assert np.all(enc["boxes"][:, 2] <= 90) and np.all(enc["boxes"][:, 3] <= 40)
    assert det.encode_texts(["a cat"]).shape == (1, TINY_EMBED_DIM)


def test_text_embeddings_normalised(detector: OwlDetector) -> None:
    q = detector.encode_texts(["a photo of a cat.", "a dog", "x" * 500])  # the last one is truncated, not an error
    assert q.shape == (3, TINY_EMBED_DIM) and q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert detector.encode_texts([]).shape == (0, TINY_EMBED_DIM)
    # Deterministic: the same text gives the same vector alone or in a batch.
    np.testing.assert_allclose(detector.encode_texts(["a dog"])[0], q[1], atol=1e-6)


def test_extreme_aspect_ratio_is_cheap(detector: OwlDetector) -> None:
    """800x15000 must not allocate a 15000x15000 intermediate (HF's pad-then-resize needs ~2.7 GB of float32).
    Memory, not time, shows it: the time would depend on the machine.

    ru_maxrss is the process's peak RSS: it can only grow by at least (new allocation - headroom below the old
    peak), so a 2.7 GB intermediate would show here even if earlier tests left some headroom.
    """
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (15000, 800, 3), dtype=np.uint8))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (enc,) = detector.encode_images([img])
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert enc["boxes"].shape == (10, 4)
    assert enc["boxes"][:, 2].max() <= 800 and enc["boxes"][:, 3].max() <= 15000
    assert grew_mb < 1000, f"peak RSS grew by {grew_mb:.0f} MB"
