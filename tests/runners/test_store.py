"""Models in BentoML's model store (runners/store.py, the import_to_store functions): what a stored model serves, its
model id (the embedding cache's key) against its source's, and the model references the services declare."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models import ModelStore
from PIL import Image

from runners import clip, owl
from runners.clip import load_clip_encoder, resolve_model
from runners.owl import OwlDetector, model_id_for
from runners.serving import (
    BUILD_SETTINGS,
    bento_arguments,
    bento_model,
    detector_declared,
    record_build_settings,
    service_settings,
)
from runners.store import pin, store_tag
from settings import Settings, get_settings
from testing.clip_images import encode_images
from testing.models import TINY_CLIP_CFG, ClipFiles, write_tiny_clip
from testing.owl import build_tiny_owlv2


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    """A model store of this test's own (what BENTOML_HOME=... gives a process), and no bento arguments."""
    root = tmp_path / "bentoml-models"
    root.mkdir()
    with BentoMLContainer.model_store.patch(ModelStore(root)), BentoMLContainer.bento_arguments.patch({}):
        yield root


def files_settings(files: ClipFiles) -> Settings:
    return Settings(clip_model=str(files.config), clip_pretrained=str(files.checkpoint))


def test_store_tag_syntax() -> None:
    assert store_tag("bentoml:shapes-clip") == "shapes-clip"
    assert store_tag(" bentoml:shapes-clip:abc ") == "shapes-clip:abc"
    for value in ("ViT-B-32", "models/x.json", "google/owlv2-base-patch16-ensemble", "random", "none"):
        assert store_tag(value) is None
    with pytest.raises(ValueError, match="give a model-store tag"):
        store_tag("bentoml:")


def test_stored_clip_keeps_its_model_id_and_embeddings(store: Path, tiny_clip: ClipFiles) -> None:
    tag, created = clip.import_to_store(str(tiny_clip.config), str(tiny_clip.checkpoint))
    assert created and tag.startswith("tiny-clip:")
    again, created_again = clip.import_to_store(str(tiny_clip.config), str(tiny_clip.checkpoint))
    assert (again, created_again) == (tag, False)  # the same files are found, not stored twice
    from_files = files_settings(tiny_clip)
    for value in (f"bentoml:{tag}", "bentoml:tiny-clip"):  # pinned, and the newest version
        from_store = Settings(clip_model=value, clip_pretrained="ignored-then")
        assert resolve_model(from_store).model_id == resolve_model(from_files).model_id
    a, b = load_clip_encoder(from_files), load_clip_encoder(Settings(clip_model=f"bentoml:{tag}"))
    assert a.model_id == b.model_id and a.info["preprocess"] == b.info["preprocess"]
    np.testing.assert_array_equal(a.encode_texts(["a red circle", "x"]), b.encode_texts(["a red circle", "x"]))
    img = [Image.new("RGB", (40, 30), (200, 30, 30))]
    np.testing.assert_array_equal(encode_images(a, img), encode_images(b, img))


def test_stored_clip_of_a_named_model_and_tag_keeps_name_at_tag_id(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open_clip name + pretrained tag (here a tiny config registered under a name, and a tag whose weights
    open_clip finds in a local file instead of downloading them) is stored with the tag's preprocessing."""
    name = "zss-test-tiny-named"
    cfg_file = tmp_path / f"{name}.json"
    cfg_file.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_file)
    ckpt = write_tiny_clip(tmp_path / "w", seed=5).checkpoint
    tag_cfg = {"file": str(ckpt), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {"faketag": tag_cfg})
    source = Settings(clip_model=name, clip_pretrained="faketag")
    tag, _ = clip.import_to_store(name, "faketag", name="tiny-named")
    stored = Settings(clip_model=f"bentoml:{tag}")
    assert resolve_model(stored).model_id == resolve_model(source).model_id == f"{name}@faketag"
    a, b = load_clip_encoder(source), load_clip_encoder(stored)
    assert b.info["preprocess"] == a.info["preprocess"] and list(b.preprocess.mean) == [0.5, 0.5, 0.5]
    np.testing.assert_array_equal(a.encode_texts(["a cat"]), b.encode_texts(["a cat"]))


def test_a_changed_stored_checkpoint_is_refused(store: Path, tiny_clip: ClipFiles) -> None:
    tag, _ = clip.import_to_store(str(tiny_clip.config), str(tiny_clip.checkpoint), name="tampered")
    (ckpt,) = (store / "tampered").glob(f"*/{tiny_clip.checkpoint.name}")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ValueError, match="does not match the digest"):
        resolve_model(Settings(clip_model=f"bentoml:{tag}"))


def test_missing_and_random_models(store: Path, tiny_clip: ClipFiles) -> None:
    with pytest.raises(FileNotFoundError, match="not in BentoML's model store"):
        resolve_model(Settings(clip_model="bentoml:no-such-model"))
    with pytest.raises(ValueError, match="nothing to store"):
        clip.import_to_store(str(tiny_clip.config), "random")
    with pytest.raises(ValueError, match="not a checkpoint to store"):
        owl.import_to_store("random")


def test_stored_detector_keeps_its_model_id_and_outputs(store: Path, tiny_owl: Path) -> None:
    tag, created = owl.import_to_store(str(tiny_owl), name="tiny-owl")
    assert created
    assert model_id_for(f"bentoml:{tag}") == model_id_for("bentoml:tiny-owl") == model_id_for(str(tiny_owl))
    a, b = OwlDetector(str(tiny_owl), device="cpu"), OwlDetector(f"bentoml:{tag}", device="cpu")
    assert a.model_id == b.model_id
    np.testing.assert_array_equal(a.encode_texts(["a cat"]), b.encode_texts(["a cat"]))
    img = [Image.new("RGB", (50, 30), (10, 200, 30))]
    for name, value in a.encode_images(img)[0].items():
        np.testing.assert_array_equal(value, b.encode_images(img)[0][name], err_msg=name)


def test_a_stored_model_of_the_other_kind_is_refused(store: Path, tiny_clip: ClipFiles, tiny_owl: Path) -> None:
    clip_tag, _ = clip.import_to_store(str(tiny_clip.config), str(tiny_clip.checkpoint))
    owl_tag, _ = owl.import_to_store(str(tiny_owl))
    with pytest.raises(ValueError, match="not an owl model"):
        OwlDetector(f"bentoml:{clip_tag}", device="cpu")
    with pytest.raises(ValueError, match="not an open_clip model"):
        resolve_model(Settings(clip_model=f"bentoml:{owl_tag}"))


def test_a_changed_stored_detector_is_refused(store: Path, tmp_path: Path) -> None:
    tag, _ = owl.import_to_store(str(build_tiny_owlv2(tmp_path / "owl")), name="owl-tampered")
    (cfg,) = (store / "owl-tampered").glob("*/config.json")
    cfg.write_text(cfg.read_text().replace('"owlv2"', '"owlv2" '))
    with pytest.raises(ValueError, match="content hash"):
        OwlDetector(f"bentoml:{tag}", device="cpu")


def test_services_declare_stored_models_and_record_them_pinned(store: Path, tiny_clip: ClipFiles) -> None:
    """What a service class attribute gets: a BentoModel pinned to the concrete version, recorded as the bento argument
    a built bento restores; files, names and hub ids declare nothing and record nothing."""
    tag, _ = clip.import_to_store(str(tiny_clip.config), str(tiny_clip.checkpoint), name="pinned")
    for value in (str(tiny_clip.config), "ViT-B-32", "google/owlv2-base-patch16-ensemble", "none"):
        assert bento_model("ZSS_CLIP_MODEL", value) is None
    assert bento_arguments() == {}
    ref = bento_model("ZSS_CLIP_MODEL", "bentoml:pinned")
    assert str(ref.tag) == tag == pin("pinned")
    assert bento_arguments() == {"ZSS_CLIP_MODEL": f"bentoml:{tag}"}
    # A tag that is not stored is declared as given (`bentoml build` then fails naming it).
    assert str(bento_model("ZSS_DETECTOR_MODEL", "bentoml:absent:v1").tag) == "absent:v1"


def test_environment_wins_over_bento_arguments(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    BentoMLContainer.bento_arguments.set({"ZSS_CLIP_MODEL": "bentoml:from-bento", "ZSS_DETECTOR_TOP_K": 12, "x": 1})
    monkeypatch.delenv("ZSS_DETECTOR_TOP_K", raising=False)
    monkeypatch.setenv("ZSS_CLIP_MODEL", "from-env")
    s = service_settings()
    assert (s.clip_model, s.detector_top_k) == ("from-env", 12)
    monkeypatch.delenv("ZSS_CLIP_MODEL")
    assert service_settings().clip_model == "bentoml:from-bento"
    assert get_settings(fallback={"zss_fp16": "false"}).fp16 is False
    with pytest.raises(ValueError, match="ZSS_DETECTOR_TOP_K"):
        get_settings(fallback={"ZSS_DETECTOR_TOP_K": "many"})


def test_a_build_records_every_setting_that_shapes_the_bento(store: Path, tiny_clip: ClipFiles) -> None:
    """What `bentoml build` keeps (issue 26): each setting that decides the services and their models, with the value
    built with; a model tag already pinned by its service is kept, not replaced by the unpinned setting."""
    tag, _ = clip.import_to_store(str(tiny_clip.config), str(tiny_clip.checkpoint), name="pinned")
    bento_model("ZSS_CLIP_MODEL", "bentoml:pinned")
    record_build_settings(Settings(clip_model="bentoml:pinned", detector_model="none", random_seed=7))
    assert bento_arguments() == {
        "ZSS_CLIP_MODEL": f"bentoml:{tag}",
        "ZSS_CLIP_PRETRAINED": "laion2b_s34b_b79k",
        "ZSS_CLIP_QUANTIZE": "none",
        "ZSS_DETECTOR_MODEL": "none",
        "ZSS_RANDOM_SEED": "7",
    }
    assert set(bento_arguments()) == set(BUILD_SETTINGS)


def test_an_environment_variable_cannot_add_a_detector_to_a_bento_built_without(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Served from the checkout (nothing recorded): the settings decide.
    assert detector_declared(Settings(detector_model="random")) is True
    assert detector_declared(Settings(detector_model="none")) is False
    # A bento built without a detector: the environment's detector is ignored, and the log says so.
    BentoMLContainer.bento_arguments.set({"ZSS_DETECTOR_MODEL": "none"})
    with caplog.at_level("WARNING"):
        assert detector_declared(Settings(detector_model="random")) is False
    assert "this bento was built without a detector" in caplog.text
    # A bento built with one can still have it turned off.
    BentoMLContainer.bento_arguments.set({"ZSS_DETECTOR_MODEL": "random"})
    assert detector_declared(Settings(detector_model="none")) is False
    assert detector_declared(Settings(detector_model="random")) is True
