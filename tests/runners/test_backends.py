"""The image tower's backends (runners/backends.py): ONNX Runtime and OpenVINO against torch, the export cache, the
ZSS_BACKEND setting, and one real `bentoml serve` on the CPU default."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import runners.backends as backends
from imaging.decode import decode_image
from runners.clip import ClipEncoder, load_clip_encoder
from settings import Settings, get_settings
from testing.images import jpeg_bytes
from testing.models import ClipFiles, clip_env
from testing.server import running_server

FLOAT_BACKENDS = ("onnx", "openvino")


def settings_for(files: ClipFiles, data_dir: Path, **kw: object) -> Settings:
    return Settings(
        clip_model=str(files.config),
        clip_pretrained=str(files.checkpoint),
        data_dir=data_dir,
        device="cpu",
        **kw,  # type: ignore[arg-type]
    )


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def torch_encoder(tiny_clip: ClipFiles, tmp_path_factory: pytest.TempPathFactory) -> ClipEncoder:
    return load_clip_encoder(settings_for(tiny_clip, tmp_path_factory.mktemp("torch"), backend="torch"))


@pytest.fixture(scope="module")
def exports_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the module's float exports (each backend exported once)."""
    return tmp_path_factory.mktemp("exports")


@pytest.mark.parametrize("backend", FLOAT_BACKENDS)
def test_float_backend_gives_torchs_vectors(
    backend: str, tiny_clip: ClipFiles, torch_encoder: ClipEncoder, exports_dir: Path
) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip, exports_dir, backend=backend), towers="image")
    assert enc.info["backend"] == backend and enc.model.visual is None  # torch's tower is dropped
    assert enc.model_id == torch_encoder.model_id  # the same vectors: the same cache namespace
    for n in (1, 5):  # the batch dimension is dynamic
        px = pixels(n, seed=n)
        got, want = enc.encode_pixels(px), torch_encoder.encode_pixels(px)
        assert got.shape == want.shape and got.dtype == np.float32
        assert cosines(got, want).min() >= 0.9999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert enc.encode_pixels(pixels(0)).shape == (0, torch_encoder.dim)


def test_both_towers_text_stays_in_torch(tiny_clip: ClipFiles, torch_encoder: ClipEncoder, exports_dir: Path) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip, exports_dir, backend="onnx"))
    np.testing.assert_allclose(enc.encode_texts(["a red circle"]), torch_encoder.encode_texts(["a red circle"]))
    assert cosines(enc.encode_pixels(pixels(3)), torch_encoder.encode_pixels(pixels(3))).min() >= 0.9999


def test_onnx_int8_is_close_and_keyed_apart(tiny_clip: ClipFiles, torch_encoder: ClipEncoder, tmp_path: Path) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip, tmp_path, backend="onnx", clip_quantize="int8"))
    assert enc.model_id == torch_encoder.model_id + "+int8"
    assert cosines(enc.encode_pixels(pixels(4)), torch_encoder.encode_pixels(pixels(4))).min() >= 0.99
    # The text tower is torch's, quantised like ZSS_BACKEND=torch's int8.
    torch_int8 = load_clip_encoder(settings_for(tiny_clip, tmp_path, backend="torch", clip_quantize="int8"))
    np.testing.assert_allclose(enc.encode_texts(["a dog"]), torch_int8.encode_texts(["a dog"]))
    assert len(list((tmp_path / "exports").glob("onnx-int8-*/model.onnx"))) == 1


def test_export_is_cached_and_reused(tiny_clip: ClipFiles, exports_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_for(tiny_clip, exports_dir, backend="onnx")
    first = load_clip_encoder(s, towers="image")  # exported by now (here or by an earlier test of this module)
    (export,) = (exports_dir / "exports").glob("onnx-none-*")
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}

    def no_export(*args: object, **kw: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(backends, "export_onnx", no_export)
    second = load_clip_encoder(s, towers="image")
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before
    np.testing.assert_array_equal(second.encode_pixels(pixels(2)), first.encode_pixels(pixels(2)))
    # Another precision or model is another export.
    with pytest.raises(AssertionError, match="exported again"):
        load_clip_encoder(settings_for(tiny_clip, exports_dir, backend="onnx", clip_quantize="int8"), towers="image")


def test_corrupt_export_is_rebuilt(tiny_clip: ClipFiles, torch_encoder: ClipEncoder, tmp_path: Path) -> None:
    s = settings_for(tiny_clip, tmp_path, backend="onnx")
    load_clip_encoder(s, towers="image")
    (model,) = (tmp_path / "exports").glob("onnx-none-*/model.onnx")
    blob = bytearray(model.read_bytes())
    blob[-2000:-1000] = b"\xff" * 1000  # same size, other weights, a file that still loads: only the digest tells
    model.write_bytes(bytes(blob))
    enc = load_clip_encoder(s, towers="image")
    assert cosines(enc.encode_pixels(pixels(3)), torch_encoder.encode_pixels(pixels(3))).min() >= 0.9999
    assert len(list((tmp_path / "exports").iterdir())) == 1  # the damaged copy and the build's temporaries are gone


def test_bad_backend_setting_names_the_variable() -> None:
    with pytest.raises(ValueError, match="ZSS_BACKEND"):
        get_settings({"ZSS_BACKEND": "tensorrt"})
    assert get_settings({"ZSS_BACKEND": " OpenVINO "}).backend == "openvino"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match="ZSS_BACKEND=openvino has no int8"):
        backends.choose_backend("openvino", "int8", cpu)
    with pytest.raises(ValueError, match="ZSS_BACKEND=onnx is a CPU backend"):
        backends.choose_backend("onnx", "none", cuda)


def test_auto_picks_the_measured_cpu_default_and_torch_on_a_gpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.choose_backend("auto", "none", cpu) == backends.AUTO_CPU["none"] == "openvino"
    assert backends.choose_backend("auto", "int8", cpu) == backends.AUTO_CPU["int8"] == "onnx"
    assert backends.choose_backend("auto", "none", cuda) == "torch"
    assert backends.choose_backend("torch", "int8", cpu) == "torch"


def test_served_default_backend_embeds_like_torch(
    tiny_clip: ClipFiles, torch_encoder: ClipEncoder, tmp_path: Path
) -> None:
    """A real `bentoml serve` with ZSS_BACKEND unset: the CPU default (exported at start) answers /embed_image with
    torch's vectors."""
    blob = jpeg_bytes(seed=3)
    env = {**clip_env(tiny_clip, tmp_path / "data"), "ZSS_DEVICE": "cpu"}
    with running_server(env, tmp_path / "serve.log", unset=("ZSS_BACKEND",)) as srv:
        r = httpx.post(srv.url + "/embed_image", files={"data": ("a.jpg", blob, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["embeddings"], dtype=np.float32)
        assert f"on {backends.AUTO_CPU['none']}" in srv.log()
    img = decode_image(blob, max_pixels=10**8, draft_size=torch_encoder.preprocess.draft_size)
    assert cosines(got, torch_encoder.encode_images([img])).min() >= 0.9999
    assert len(list((tmp_path / "data" / "exports").glob(f"{backends.AUTO_CPU['none']}-none-*"))) == 1
