"""The CLIP towers' backends (runners/backends.py): ONNX Runtime and OpenVINO against torch for the image and the text
tower, the export cache, the ZSS_BACKEND setting, and one real `bentoml serve` on the CPU defaults."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import runners.backends as backends
from imaging.decode import decode_image
from runners.clip import ClipEncoder, compute_precision, load_clip_encoder
from runners.device import native_bf16
from settings import Settings, get_settings
from testing.client import CLASSES, deploy, files
from testing.clip_images import encode_images, images_to_pixels
from testing.images import jpeg_bytes
from testing.models import ClipFiles, clip_env, shapes_clip_env, shapes_siglip_env
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


# Prompts of many lengths: the empty one (SOT + EOT only), deploy-like ones, one past the context (truncated), and
# enough for two chunks of the encoder's text batches, each trimmed to its own longest prompt.
TEXTS = ["", "a", "a red circle", "a photo of a big dog on the grass.", "x " * 100] + [
    f"a photo of thing number {i} {'and more ' * (i % 7)}" for i in range(300)
]


@pytest.mark.parametrize("backend", FLOAT_BACKENDS)
def test_float_text_backend_gives_torchs_vectors(
    backend: str, tiny_clip: ClipFiles, torch_encoder: ClipEncoder, exports_dir: Path
) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip, exports_dir, backend=backend), towers="text")
    assert enc.info["text_backend"] == backend and enc.model.transformer is None  # torch's tower is dropped
    assert enc.model_id == torch_encoder.model_id  # the same vectors: the same embedding cache
    want = torch_encoder.encode_texts(TEXTS)
    for got in (enc.encode_texts(TEXTS), enc.encode_texts(TEXTS[:7], trim_context=False)):
        assert got.dtype == np.float32 and got.shape[1] == torch_encoder.dim
        assert cosines(got, want[: len(got)]).min() >= 0.9999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert enc.encode_texts(["a dog"]).shape == (1, torch_encoder.dim)  # batch of one, dynamic length
    assert len(list((exports_dir / "exports").glob(f"text-{backend}-none-*/export.json"))) == 1


def test_text_tower_that_cannot_be_exported_stays_in_torch(
    tiny_clip: ClipFiles, torch_encoder: ClipEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text tower TextGraph would not reproduce (not open_clip's causal transformer) runs in torch (here untrimmed,
    as such a tower must be), exported never."""
    import runners.clip

    monkeypatch.setattr(runners.clip, "text_exportable", lambda model: False)
    enc = load_clip_encoder(settings_for(tiny_clip, tmp_path, backend="onnx"), towers="text")
    assert enc.info["text_backend"] == "torch" and enc.text_runtime is None
    np.testing.assert_allclose(enc.encode_texts(TEXTS[:3]), torch_encoder.encode_texts(TEXTS[:3]), atol=1e-5)
    assert not (tmp_path / "exports").exists()


def test_both_towers_on_one_backend(tiny_clip: ClipFiles, torch_encoder: ClipEncoder, exports_dir: Path) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip, exports_dir, backend="onnx"))
    assert (enc.info["backend"], enc.info["text_backend"]) == ("onnx", "onnx")
    assert cosines(enc.encode_texts(TEXTS[:5]), torch_encoder.encode_texts(TEXTS[:5])).min() >= 0.9999
    assert cosines(enc.encode_pixels(pixels(3)), torch_encoder.encode_pixels(pixels(3))).min() >= 0.9999


def test_onnx_int8_is_close_and_keyed_apart(tiny_clip: ClipFiles, torch_encoder: ClipEncoder, tmp_path: Path) -> None:
    enc = load_clip_encoder(settings_for(tiny_clip, tmp_path, backend="onnx", clip_quantize="int8"))
    # Keyed apart from the float model and from torch's int8 (another quantisation, other vectors).
    assert enc.model_id == torch_encoder.model_id + "+int8-onnx"
    assert enc.info["text_backend"] == "onnx"
    assert cosines(enc.encode_pixels(pixels(4)), torch_encoder.encode_pixels(pixels(4))).min() >= 0.99
    assert cosines(enc.encode_texts(TEXTS[:40]), torch_encoder.encode_texts(TEXTS[:40])).min() >= 0.99
    assert len(list((tmp_path / "exports").glob("onnx-int8-*/model.onnx"))) == 1
    assert len(list((tmp_path / "exports").glob("text-onnx-int8-*/model.onnx"))) == 1


def test_openvino_int8_is_static_calibrated_and_keyed_apart(
    tiny_clip: ClipFiles, torch_encoder: ClipEncoder, tmp_path: Path
) -> None:
    """OpenVINO's int8 image tower: a QDQ graph calibrated on images (the built-in set unless ZSS_CLIP_INT8_CALIBRATION
    names a folder), close to float32, keyed apart from float32 and from ONNX Runtime's dynamic int8; a user's folder
    is part of the model id and of the export's key; its text tower computes in float32."""
    enc = load_clip_encoder(settings_for(tiny_clip, tmp_path, backend="openvino", clip_quantize="int8"))
    assert (enc.info["precision"], enc.info["text_precision"]) == ("int8", "fp32")
    assert enc.model_id == torch_encoder.model_id + "+int8-openvino"
    (export,) = (tmp_path / "exports").glob("openvino-int8-*")
    assert "FakeQuantize" in (export / "model.xml").read_text()  # int8 layers, not a relabelled float graph
    px = pixels(6, seed=4)
    got = enc.encode_pixels(px)
    assert got.dtype == np.float32 and cosines(got, torch_encoder.encode_pixels(px)).min() >= 0.99
    assert cosines(enc.encode_texts(TEXTS[:9]), torch_encoder.encode_texts(TEXTS[:9])).min() >= 0.9999
    import imaging.calibration

    def no_drawing(rng: np.random.Generator) -> None:
        raise AssertionError("calibration images drawn for an export that exists")

    with pytest.MonkeyPatch.context() as mp:  # a second start reuses the export: no calibration work at all
        mp.setattr(imaging.calibration, "synthetic_scene", no_drawing)
        reused = load_clip_encoder(settings_for(tiny_clip, tmp_path, backend="openvino", clip_quantize="int8"))
    np.testing.assert_array_equal(reused.encode_pixels(px), got)

    folder = tmp_path / "calibration"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    (folder / "notes.txt").write_text("not an image")
    mine = load_clip_encoder(
        settings_for(tiny_clip, tmp_path, backend="openvino", clip_quantize="int8", clip_int8_calibration=folder),
        towers="image",
    )
    assert mine.model_id.startswith(torch_encoder.model_id + "+int8-openvino-cal")
    assert len(list((tmp_path / "exports").glob("openvino-int8-*"))) == 2  # its own export
    assert cosines(mine.encode_pixels(px), torch_encoder.encode_pixels(px)).min() >= 0.99
    (folder / "3.jpg").write_bytes(jpeg_bytes(seed=9))  # other images: another model id
    again = settings_for(tiny_clip, tmp_path, backend="openvino", clip_quantize="int8", clip_int8_calibration=folder)
    assert load_clip_encoder(again, towers="image").model_id != mine.model_id
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="ZSS_CLIP_INT8_CALIBRATION"):
        load_clip_encoder(
            settings_for(tiny_clip, tmp_path, backend="openvino", clip_quantize="int8", clip_int8_calibration=empty),
            towers="image",
        )


@pytest.mark.parametrize(
    ("model", "backend", "precision"),
    [
        ("shapes-clip", "onnx", "int8"),
        ("shapes-clip", "openvino", "bf16"),
        ("shapes-clip", "auto", "int8"),
        ("shapes-siglip", "onnx", "int8"),
    ],
)
def test_reduced_precision_keeps_the_shapes_accuracy(tmp_path: Path, model: str, backend: str, precision: str) -> None:
    """Issue 19's goal for int8 (and issue 29's for bf16): within 0.5 points of float32 on the shapes evaluation, on
    the project's trained shapes CLIP with both towers on the reduced precision (what ZSS_CLIP_QUANTIZE serves on a
    CPU): zero-shot accuracy over 900 fresh images, and the predictions themselves agree with float32's. A broken
    quantisation (a bad scale, a quantised layer that should not be) moves these by many points. Where the CPU has
    no native bf16, bf16 must be refused instead. The shapes SigLIP's towers both export (its text tower over the full
    context) and quantise like the CLIP's (issue 27)."""
    from tools import eval_shapes_clip as ev

    model_env = {"shapes-clip": shapes_clip_env, "shapes-siglip": shapes_siglip_env}[model]
    env = {**model_env(tmp_path), "ZSS_BACKEND": backend, "ZSS_CLIP_QUANTIZE": precision}
    if precision == "bf16" and not native_bf16():
        with pytest.raises(ValueError, match="natively"):
            load_clip_encoder(get_settings(env))
        return
    fp32 = load_clip_encoder(get_settings({**model_env(tmp_path), "ZSS_BACKEND": "torch"}))
    low = load_clip_encoder(get_settings(env))
    if backend == "auto":  # int8: OpenVINO's static image tower beside ONNX Runtime's dynamic text tower
        assert (low.info["backend"], low.info["text_backend"]) == ("openvino", "onnx")
    else:
        assert (low.info["backend"], low.info["text_backend"]) == (backend, backend)
    assert (low.info["precision"], low.info["text_precision"]) == (precision, precision)
    ts = ev.draw_test_set(50)
    px = images_to_pixels(fp32, ts.images)
    images = {"fp32": fp32.encode_pixels(px), "low": low.encode_pixels(px)}
    encoders = {"fp32": fp32, "low": low}
    for prompts, truth in (
        ([f"a {c} {s}" for c, s in ev.ALL_COMBOS], [ev.ALL_COMBOS.index(p) for p in zip(ts.colours, ts.shapes)]),
        ([f"a {c} shape" for c in ev.COLOURS], [list(ev.COLOURS).index(c) for c in ts.colours]),
        ([f"a {s}" for s in ev.SHAPES], [ev.SHAPES.index(s) for s in ts.shapes]),
    ):
        pred = {k: (images[k] @ encoders[k].encode_texts(prompts).T).argmax(axis=1) for k in encoders}
        acc = {k: 100 * float(np.mean(pred[k] == np.asarray(truth))) for k in pred}
        # The trained model, not noise (chance: 6-33%); the shapes SigLIP is the weaker model (81.6% on one set).
        assert acc["fp32"] > {"shapes-clip": 90, "shapes-siglip": 75}[model], (prompts[0], acc)
        assert abs(acc["low"] - acc["fp32"]) <= 0.5, (prompts[0], acc)
        assert np.mean(pred["low"] == pred["fp32"]) >= 0.99, prompts[0]


@pytest.mark.parametrize(
    ("tower", "backend", "pattern", "exporter"),
    [("image", "onnx", "onnx-none-*", "export_onnx"), ("text", "openvino", "text-openvino-none-*", "export_text_onnx")],
)
def test_export_is_cached_and_reused(
    tiny_clip: ClipFiles,
    exports_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tower: str,
    backend: str,
    pattern: str,
    exporter: str,
) -> None:
    def encode(enc: ClipEncoder) -> np.ndarray:
        return enc.encode_pixels(pixels(2)) if tower == "image" else enc.encode_texts(TEXTS[:9])

    s = settings_for(tiny_clip, exports_dir, backend=backend)
    first = load_clip_encoder(s, towers=tower)  # exported by now (here or by an earlier test of this module)
    (export,) = (exports_dir / "exports").glob(pattern)
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}

    def no_export(*args: object, **kw: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(backends, exporter, no_export)
    second = load_clip_encoder(s, towers=tower)
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before
    np.testing.assert_array_equal(encode(second), encode(first))
    with pytest.raises(AssertionError, match="exported again"):  # another precision is another export
        load_clip_encoder(settings_for(tiny_clip, exports_dir, backend="onnx", clip_quantize="int8"), towers=tower)


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


def test_damaged_text_export_is_rebuilt(
    tiny_clip: ClipFiles, torch_encoder: ClipEncoder, exports_dir: Path, tmp_path: Path
) -> None:
    load_clip_encoder(settings_for(tiny_clip, exports_dir, backend="onnx"), towers="text")  # the module's export
    (export,) = (exports_dir / "exports").glob("text-onnx-none-*")
    s = settings_for(tiny_clip, tmp_path, backend="onnx")
    shutil.copytree(export, tmp_path / "exports" / export.name)
    (model,) = (tmp_path / "exports").glob("text-onnx-none-*/model.onnx")
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # cut short, as by a crash mid-write
    enc = load_clip_encoder(s, towers="text")
    assert cosines(enc.encode_texts(TEXTS[:6]), torch_encoder.encode_texts(TEXTS[:6])).min() >= 0.9999
    assert [p.name[:15] for p in (tmp_path / "exports").iterdir()] == ["text-onnx-none-"]


def test_bf16_is_openvinos_own_precision_on_a_native_cpu(
    tiny_clip: ClipFiles, torch_encoder: ClipEncoder, exports_dir: Path
) -> None:
    """ZSS_CLIP_QUANTIZE=bf16: OpenVINO's bf16 inference of the same float32 export, close to torch's vectors, keyed
    apart from them; with ZSS_BACKEND=auto the text tower (ONNX Runtime, no bf16) computes in float32 under the same
    key. On a CPU without native bf16 the start is refused, naming the setting."""
    if not native_bf16():
        with pytest.raises(ValueError, match="ZSS_CLIP_QUANTIZE=bf16 needs a CPU that executes bf16 natively"):
            load_clip_encoder(settings_for(tiny_clip, exports_dir, backend="openvino", clip_quantize="bf16"))
        return
    enc = load_clip_encoder(settings_for(tiny_clip, exports_dir, backend="openvino", clip_quantize="bf16"))
    assert (enc.info["backend"], enc.info["text_backend"]) == ("openvino", "openvino")
    assert (enc.info["precision"], enc.info["text_precision"]) == ("bf16", "bf16")
    assert enc.model_id == torch_encoder.model_id + "+bf16"
    px = pixels(6, seed=3)
    got, want = enc.encode_pixels(px), torch_encoder.encode_pixels(px)
    assert got.dtype == np.float32 and 0.999 <= cosines(got, want).min() < 1.0 - 1e-7  # bf16: close, not equal
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert cosines(enc.encode_texts(TEXTS[:40]), torch_encoder.encode_texts(TEXTS[:40])).min() >= 0.999
    # One float32 export serves float32 and bf16 alike (the precision is chosen when OpenVINO compiles it).
    assert len(list((exports_dir / "exports").glob("openvino-bf16-*"))) == 0
    auto = load_clip_encoder(settings_for(tiny_clip, exports_dir, backend="auto", clip_quantize="bf16"))
    assert (auto.info["backend"], auto.info["precision"]) == ("openvino", "bf16")
    assert (auto.info["text_backend"], auto.info["text_precision"]) == ("onnx", "fp32")
    assert auto.model_id == enc.model_id
    plain = load_clip_encoder(settings_for(tiny_clip, exports_dir, backend="auto"))
    assert (plain.info["precision"], plain.model_id) == ("fp32", torch_encoder.model_id)  # never picked unasked


def test_compute_precision_per_tower() -> None:
    assert compute_precision("none", "openvino") == "fp32"
    assert compute_precision("bf16", "openvino") == "bf16"
    assert compute_precision("bf16", "onnx") == "fp32"
    assert compute_precision("int8", "onnx") == "int8"
    assert compute_precision("int8", "torch") == "int8"
    assert compute_precision("int8", "openvino") == "int8"
    assert compute_precision("int8", "openvino", tower="text") == "fp32"  # static int8 is calibrated on images
    assert compute_precision("int8", "onnx", tower="text") == "int8"
    with pytest.raises(ValueError, match="ZSS_BACKEND=onnx has no bf16"):
        backends.choose_backend("onnx", "bf16", torch.device("cpu"))
    with pytest.raises(ValueError, match="ZSS_BACKEND=torch has no bf16"):
        backends.choose_backend("torch", "bf16", torch.device("cpu"))


def test_bad_backend_setting_names_the_variable() -> None:
    with pytest.raises(ValueError, match="ZSS_BACKEND"):
        get_settings({"ZSS_BACKEND": "tensorrt"})
    assert get_settings({"ZSS_BACKEND": " OpenVINO "}).backend == "openvino"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match="ZSS_BACKEND=torch has no bf16"):
        backends.choose_backend("torch", "bf16", cpu)
    with pytest.raises(ValueError, match="ZSS_BACKEND=onnx is a CPU backend"):
        backends.choose_backend("onnx", "none", cuda)


def test_auto_picks_the_measured_cpu_default_and_torch_on_a_gpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.choose_backend("auto", "none", cpu) == backends.AUTO_CPU["none"] == "openvino"
    assert backends.choose_backend("auto", "int8", cpu) == backends.AUTO_CPU["int8"] == "openvino"
    assert backends.choose_backend("auto", "none", cpu, tower="text") == backends.AUTO_CPU_TEXT["none"] == "onnx"
    assert backends.choose_backend("auto", "int8", cpu, tower="text") == backends.AUTO_CPU_TEXT["int8"] == "onnx"
    assert backends.choose_backend("auto", "none", cuda) == "torch"
    assert backends.choose_backend("auto", "none", cuda, tower="text") == "torch"
    assert backends.choose_backend("torch", "int8", cpu) == "torch"


def test_served_default_backends_embed_deploy_and_classify_like_torch(
    tiny_clip: ClipFiles, torch_encoder: ClipEncoder, tmp_path: Path
) -> None:
    """A real `bentoml serve` with ZSS_BACKEND unset: each tower on its CPU default (exported at start) answers
    /embed_image and /embed_text with torch's vectors, and a classifier deploys and classifies."""
    image_backend, text_backend = backends.AUTO_CPU["none"], backends.AUTO_CPU_TEXT["none"]
    assert text_backend != "torch"  # what this test is for
    blob = jpeg_bytes(seed=3)
    texts = ["cat", "a photo of a pine tree"]
    env = {**clip_env(tiny_clip, tmp_path / "data"), "ZSS_DEVICE": "cpu"}
    with running_server(env, tmp_path / "serve.log", unset=("ZSS_BACKEND",)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/embed_image", files=files(blob))
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["embeddings"], dtype=np.float32)
            r = c.post("/embed_text", json={"texts": texts, "augment_examples": False})
            assert r.status_code == 200, r.text
            got_text = np.asarray(r.json()["embeddings"], dtype=np.float32)
            deployed = deploy(c, CLASSES)["deployed_id"]  # 80 templates per example through the text tower
            r = c.post("/classify", params={"deployed_id": deployed}, files=files(blob))
            assert r.status_code == 200, r.text
            assert r.json()["pred"] in {cls["name"] for cls in CLASSES}
        log = srv.log()
        assert f"image tower on {image_backend}" in log and f"text tower on {text_backend}" in log
    img = decode_image(blob, max_pixels=10**8, draft_size=torch_encoder.preprocess.draft_size)
    assert cosines(got, encode_images(torch_encoder, [img])).min() >= 0.9999
    assert cosines(got_text, torch_encoder.encode_texts(texts)).min() >= 0.9999
    exports = tmp_path / "data" / "exports"
    assert len(list(exports.glob(f"{image_backend}-none-*"))) == 1
    assert len(list(exports.glob(f"text-{text_backend}-none-*"))) == 1
