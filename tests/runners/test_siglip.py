"""SigLIP / SigLIP 2 through runners/clip.py (the same settings as CLIP), with tiny random-weight models the tests
write to disk in both forms (open_clip config + checkpoint + tokenizer; transformers save_pretrained directories) and
a tokenizer the project trains itself: what is loaded, the max-length padding, the preprocessing that travels with
the model, the model id, and the model store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models import ModelStore
from PIL import Image

from runners import clip
from runners.clip import load_clip_encoder, resolve_model
from settings import Settings
from testing.clip_images import encode_images
from testing.models import ClipFiles
from testing.siglip import CONTEXT, write_tiny_hf_siglip, write_tiny_open_clip_siglip

TEXTS = ["a red circle", "a photo of a blue square", "this is a photo containing images of a cat"]


@pytest.fixture(scope="module")
def oc_siglip(tmp_path_factory: pytest.TempPathFactory) -> ClipFiles:
    return write_tiny_open_clip_siglip(tmp_path_factory.mktemp("oc-siglip"))


@pytest.fixture(scope="module", params=[1, 2], ids=["siglip", "siglip2"])
def hf_siglip(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf_siglip(tmp_path_factory.mktemp(f"hf-siglip{request.param}"), version=request.param)


def oc_settings(files: ClipFiles, **kw: object) -> Settings:
    return Settings(clip_model=str(files.config), clip_pretrained=str(files.checkpoint), backend="torch", **kw)  # type: ignore[arg-type]


def hf_settings(path: Path, **kw: object) -> Settings:
    return Settings(clip_model=str(path), backend="torch", **kw)  # type: ignore[arg-type]


def test_open_clip_siglip_matches_open_clip(oc_siglip: ClipFiles) -> None:
    enc = load_clip_encoder(oc_settings(oc_siglip))
    cfg = json.loads(oc_siglip.config.read_text())
    ref = open_clip.model.CustomTextCLIP(**{k: v for k, v in cfg.items() if k not in {"preprocess_cfg", "custom_text"}})
    ref.load_state_dict(torch.load(oc_siglip.checkpoint, weights_only=True))
    ref.eval()
    tok = open_clip.tokenizer.HFTokenizer(str(oc_siglip.config.parent / "tokenizer"), CONTEXT, clean="canonicalize")
    tokens = tok(TEXTS)
    assert tokens.shape == (3, CONTEXT) and int((tokens == 0).sum()) > 0  # padded to the full context
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_texts(TEXTS), expected, atol=1e-5)
    info = enc.info
    assert info["preprocess"]["resize_mode"] == "squash" and info["preprocess"]["mean"] == [0.5] * 3
    assert info["context_length"] == CONTEXT
    assert info["logit_bias"] == pytest.approx(-10.0) and info["logit_scale"] == pytest.approx(np.exp(2.3), rel=1e-5)
    assert not enc.can_trim_context  # non-causal, pooled at the last position: never trimmed


def test_max_length_padding_changes_the_vectors(oc_siglip: ClipFiles, hf_siglip: Path) -> None:
    """The text towers pool the last position: without padding to the full context the vectors differ, so the
    encoder must pad (it does: it equals the padded reference above and below)."""
    for enc in (load_clip_encoder(oc_settings(oc_siglip)), load_clip_encoder(hf_settings(hf_siglip))):
        padded = enc.tokenize(TEXTS[:1])
        assert padded.shape[1] == CONTEXT
        length = int((padded != 0).sum())
        with torch.inference_mode():
            short = torch.nn.functional.normalize(enc.model.encode_text(padded[:, :length]).float(), dim=-1).numpy()
        served = enc.encode_texts(TEXTS[:1])
        assert float((served * short).sum()) < 0.999  # another vector without the padding


def test_transformers_siglip_matches_transformers(hf_siglip: Path) -> None:
    import transformers

    enc = load_clip_encoder(hf_settings(hf_siglip))
    model = transformers.AutoModel.from_pretrained(str(hf_siglip)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_siglip))
    tokens = tok(TEXTS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    processor = transformers.AutoImageProcessor.from_pretrained(str(hf_siglip))
    with torch.inference_mode():
        t = model.get_text_features(input_ids=tokens.input_ids).pooler_output
        i = model.get_image_features(**processor(images=[img], return_tensors="pt")).pooler_output
    np.testing.assert_allclose(enc.encode_texts(TEXTS), torch.nn.functional.normalize(t, dim=-1).numpy(), atol=1e-5)
    # The processors' resampling differs a little from PIL's in imaging/; the vectors agree closely.
    got = encode_images(enc, [img])[0]
    assert float(got @ torch.nn.functional.normalize(i, dim=-1).numpy()[0]) > 0.99
    info = enc.info
    assert info["preprocess"]["size"] == [32, 32] and info["preprocess"]["resize_mode"] == "squash"
    assert info["context_length"] == CONTEXT and "logit_bias" in info
    assert info["model_id"].startswith(f"hf:{hf_siglip.name}:")


def test_model_id_keys_on_content(tmp_path: Path, oc_siglip: ClipFiles) -> None:
    a = write_tiny_hf_siglip(tmp_path / "a", seed=0)
    b = write_tiny_hf_siglip(tmp_path / "b", seed=1)
    ida, idb = (resolve_model(hf_settings(p)).model_id for p in (a, b))
    assert ida.split(":")[-1] != idb.split(":")[-1]
    # The tokenizer beside an open_clip config keys the id: another tokenizer, another cache namespace.
    copy = tmp_path / "oc"
    shutil.copytree(oc_siglip.config.parent, copy)
    files = ClipFiles(copy / oc_siglip.config.name, copy / oc_siglip.checkpoint.name)
    before = resolve_model(oc_settings(files)).model_id
    assert before == resolve_model(oc_settings(oc_siglip)).model_id
    cfg = json.loads((copy / "tokenizer" / "tokenizer_config.json").read_text())
    (copy / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 7}))
    assert resolve_model(oc_settings(files)).model_id != before


def test_random_weights_of_a_transformers_config(hf_siglip: Path) -> None:
    s = hf_settings(hf_siglip, clip_pretrained="random", random_seed=4)
    assert resolve_model(s).model_id.endswith("@random-seed4")
    np.testing.assert_array_equal(load_clip_encoder(s).encode_texts(["x"]), load_clip_encoder(s).encode_texts(["x"]))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "bentoml-models"
    root.mkdir()
    with BentoMLContainer.model_store.patch(ModelStore(root)), BentoMLContainer.bento_arguments.patch({}):
        yield root


def test_both_forms_go_through_the_model_store(store: Path, oc_siglip: ClipFiles, hf_siglip: Path) -> None:
    for source in (oc_settings(oc_siglip), hf_settings(hf_siglip)):
        tag, created = clip.import_to_store(source.clip_model, source.clip_pretrained)
        assert created
        stored = Settings(clip_model=f"bentoml:{tag}", backend="torch")
        a, b = load_clip_encoder(source), load_clip_encoder(stored)
        assert a.model_id == b.model_id and a.info["preprocess"] == b.info["preprocess"]
        np.testing.assert_array_equal(a.encode_texts(TEXTS), b.encode_texts(TEXTS))


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_towers_give_torchs_vectors(
    backend: str, oc_siglip: ClipFiles, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """open_clip's and transformers' SigLIP towers on ONNX Runtime / OpenVINO (fp32): torch's vectors, torch's model
    id. The text towers (non-causal, reading the padding to the full context) are exported with the context fixed,
    never trimmed. SigLIP 2's NaFlex image tower is exported with its position embeddings fixed to the input size."""
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    data = tmp_path_factory.mktemp("exports")
    hf1 = write_tiny_hf_siglip(tmp_path_factory.mktemp("hf-export"), version=1)
    hf2 = write_tiny_hf_siglip(tmp_path_factory.mktemp("hf2-export"), version=2)
    texts = [*TEXTS, "a " * 200]  # one past the context: cut by the tokenizer, as in torch
    for source in (oc_settings(oc_siglip), hf_settings(hf1), hf_settings(hf2)):
        ref = load_clip_encoder(source)
        enc = load_clip_encoder(source.model_copy(update={"backend": backend, "data_dir": data}))
        assert (enc.backend, enc.text_backend) == (backend, backend) and enc.model_id == ref.model_id
        assert enc.text_runtime is not None and not enc.can_trim_context
        got, want = enc.encode_pixels(pixels), ref.encode_pixels(pixels)
        assert float((got * want).sum(axis=1).min()) >= 0.9999
        got, want = enc.encode_texts(texts), ref.encode_texts(texts)
        assert got.shape == want.shape and float((got * want).sum(axis=1).min()) >= 0.9999
        assert float((enc.encode_texts(["a"]) * ref.encode_texts(["a"])).sum()) >= 0.9999  # a batch of one


def test_int8_in_torch_is_close_and_keyed_apart(oc_siglip: ClipFiles, hf_siglip: Path) -> None:
    """ZSS_CLIP_QUANTIZE=int8 on both forms (open_clip's SigLIP text projection, a Linear with a bias, stays float)."""
    pixels = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for source in (oc_settings(oc_siglip), hf_settings(hf_siglip)):
        ref = load_clip_encoder(source)
        enc = load_clip_encoder(source.model_copy(update={"clip_quantize": "int8"}))
        assert enc.model_id == ref.model_id + "+int8"
        assert float((enc.encode_pixels(pixels) * ref.encode_pixels(pixels)).sum(axis=1).min()) >= 0.99
        assert float((enc.encode_texts(TEXTS) * ref.encode_texts(TEXTS)).sum(axis=1).min()) >= 0.99


def test_what_names_a_transformers_model() -> None:
    """A hub id (``org/name``) is transformers' (keyed by itself, resolved without loading); open_clip's names,
    ``hf-hub:`` ids and config files stay open_clip's."""
    spec = resolve_model(Settings(clip_model="google/siglip-so400m-patch14-384", clip_pretrained="ignored"))
    assert (spec.form, spec.model_id) == ("transformers", "hf:google/siglip-so400m-patch14-384")
    for name in ("ViT-B-16-SigLIP2", "hf-hub:timm/ViT-B-16-SigLIP2", "models/shapes-clip/shapes-clip.json"):
        assert not clip.is_transformers(name)


def test_image_tower_needs_no_tokenizer(tmp_path: Path, oc_siglip: ClipFiles) -> None:
    """The image encoder service never tokenises: a SigLIP whose tokenizer is not here (e.g. open_clip's names, whose
    tokenizers live on the hub, with random weights for benchmarks) still loads as an image tower."""
    shutil.copy(oc_siglip.config, tmp_path / oc_siglip.config.name)
    shutil.copy(oc_siglip.checkpoint, tmp_path / oc_siglip.checkpoint.name)
    files = ClipFiles(tmp_path / oc_siglip.config.name, tmp_path / oc_siglip.checkpoint.name)
    enc = load_clip_encoder(oc_settings(files), towers="image")
    assert enc.dim == 32 and encode_images(enc, [Image.new("RGB", (8, 8))]).shape == (1, 32)
    with pytest.raises(RuntimeError, match="image tower only"):
        enc.tokenize(["x"])


def test_named_siglip_with_random_weights_gets_its_tags_preprocessing() -> None:
    spec = resolve_model(Settings(clip_model="ViT-B-16-SigLIP2", clip_pretrained="random"))
    assert spec.preprocess_override == {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
        "resize_mode": "squash",
    }
    assert resolve_model(Settings(clip_model="ViT-B-32", clip_pretrained="random")).preprocess_override == {}
