"""Runtimes of the CLIP towers on a CPU: torch (the reference), ONNX Runtime and OpenVINO, float32 or int8.

Each tower is exported once, at the first start that asks for it, into ``ZSS_DATA_DIR/exports/`` under a key made of
the model id, the precision, the export format version and the versions of every library the file depends on (torch's
exporter, onnx, the runtime); a later start with the same key loads the file. Every export records its files' digests;
a file that no longer matches (a crash mid-write, a disk error, an edit) is rebuilt, never loaded.

The exported image graph takes what ``ClipEncoder.encode_pixels`` takes, uint8 [N, H, W, 3] at the model's input size,
and returns L2-normalised float32 [N, D]: normalisation happens inside it, with the model's own mean and std. The text
graph takes int64 tokens [N, L] with L dynamic (2 .. the context length) and returns L2-normalised float32 [N, D]: the
caller trims the context to the longest prompt of the batch, exact for causal text towers pooled at the EOT token (the
only ones exported; others stay in torch), as torch's own path does.

Precision (ZSS_CLIP_QUANTIZE): ``none`` is float32 everywhere. ``int8`` in torch and ONNX Runtime is dynamic
quantisation: weights int8 once, activations quantised per batch (torch: ``quantize_dynamic`` of the nn.Linear layers;
ONNX Runtime: ``onnxruntime.quantization.quantize_dynamic`` of every MatMul, with VNNI kernels where the CPU has them).
OpenVINO's ``int8`` is static, for the image tower: ``onnxruntime.quantization.quantize_static`` writes a QDQ graph
(weights int8 per channel, activations uint8 with ranges fixed on calibration images, imaging/calibration.py) that
OpenVINO runs on its int8 kernels, about 1.4x ONNX Runtime's dynamic int8 per image (BENCHMARKS.md, issue 29); its
text tower computes in float32 (calibrating it would need prompts like the user's). ``bf16`` is OpenVINO's bf16
inference of the float32 graph.

``auto`` picks per tower and precision (AUTO_CPU, AUTO_CPU_TEXT), from bench/bench_backends.py's measurements.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imaging.calibration import CalibrationSet
from imaging.preprocess import Preprocess
from settings import BACKENDS

log = logging.getLogger(__name__)

# Bump when an exported graph changes (inputs, outputs, what it computes): older exports are then not reused.
EXPORT_VERSION = 1
TEXT_EXPORT_VERSION = 1
# What ``auto`` picks on a CPU, per precision: the fastest backend whose vectors match torch's (fp32: cosine >= 0.9999)
# in bench/bench_backends.py on the development machine (BENCHMARKS.md, issue 19). On a GPU ``auto`` is torch.
AUTO_CPU = {"none": "openvino", "bf16": "openvino", "int8": "openvino"}  # the image tower
# The text tower: ONNX Runtime. OpenVINO's float32 costs a few per cent less CPU per prompt, but its one stream runs
# concurrent calls one after another, so the text encoder's short lane (``encode_now``: one prompt) would wait
# behind a deploy's batch (0.75 s against ONNX Runtime's 25 ms, BENCHMARKS.md); ONNX Runtime runs them side by side.
# In bf16 too: the short lane's latency matters more than the deploy's throughput (BENCHMARKS.md, issue 29).
AUTO_CPU_TEXT = {"none": "onnx", "bf16": "onnx", "int8": "onnx"}
# Backends and the precisions (ZSS_CLIP_QUANTIZE) they offer. bf16 is OpenVINO's inference precision on a CPU that
# executes it natively; ONNX Runtime's CPU provider has no bf16 kernels for these graphs, torch's are slower.
PRECISIONS = {
    "torch": ("none", "int8"),
    "onnx": ("none", "int8"),
    "openvino": ("none", "bf16", "int8"),
}

Runtime = Callable[[np.ndarray], np.ndarray]
ImageRuntime = Runtime  # uint8 pixels [N, H, W, 3] -> normalised float32 [N, D]
TextRuntime = Runtime  # int64 tokens [N, L] -> normalised float32 [N, D]


def choose_backend(setting: str, precision: str, device: torch.device, tower: str = "image") -> str:
    """The backend of ``tower`` ("image" or "text") for ZSS_BACKEND ``setting`` at ``precision`` (ZSS_CLIP_QUANTIZE)
    on ``device``; ValueError naming ZSS_BACKEND for a value it does not know or a combination that does not exist."""
    name = setting.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"ZSS_BACKEND must be one of {', '.join(BACKENDS)}, not {setting!r}")
    if name == "auto":
        if device.type != "cpu":
            return "torch"
        # Asked for bf16, a tower whose auto backend has none computes in float32 there (compute_precision).
        return (AUTO_CPU if tower == "image" else AUTO_CPU_TEXT)[precision]
    if name != "torch" and device.type != "cpu":
        raise ValueError(f"ZSS_BACKEND={name} is a CPU backend; on {device.type} use torch (or auto)")
    if precision not in PRECISIONS[name]:
        raise ValueError(
            f"ZSS_BACKEND={name} has no {precision} precision (ZSS_CLIP_QUANTIZE); "
            f"it offers {', '.join(PRECISIONS[name])}"
        )
    return name


class ImageGraph(torch.nn.Module):
    """What gets exported: uint8 [N, H, W, 3] -> normalise -> image tower -> L2-normalised [N, D]."""

    def __init__(self, visual: torch.nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.visual = visual
        # (x / 255 - mean) / std with one subtraction and one division.
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return F.normalize(self.visual(x), dim=-1)


def text_exportable(model: torch.nn.Module) -> bool:
    """Whether ``model``'s text tower is one TextGraph reproduces exactly with a trimmed context: open_clip's CLIP
    text transformer, causal, pooled at the EOT token (CustomTextCLIP's Hugging Face towers stay in torch)."""
    return (
        getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", "argmax") in {"argmax", "eos"}
        and all(getattr(model, a, None) is not None for a in ("token_embedding", "transformer", "ln_final"))
    )


class TextGraph(torch.nn.Module):
    """What gets exported: int64 tokens [N, L] (L <= the context, trimmed by the caller) -> text tower ->
    L2-normalised [N, D]; the computation of ``ClipEncoder``'s trimmed torch path, step for step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask.clone())
        self.pool_type = getattr(model, "text_pool_type", "argmax")
        self.eos_id = getattr(model, "text_eos_id", None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        import open_clip

        n = tokens.shape[1]
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding[:n]
        x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        x = open_clip.transformer.text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        proj = self.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)


def _export(graph: torch.nn.Module, example: torch.Tensor, name: str, dims: dict[int, object], path: Path) -> None:
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[name],
            output_names=["embeddings"],
            dynamic_shapes=(dims,),
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def export_onnx(visual: torch.nn.Module, preprocess: Preprocess, path: Path) -> None:
    """Export the float32 image tower with its normalisation to one ONNX file, batch dimension dynamic."""
    graph = ImageGraph(visual, preprocess).float().eval()
    h, w = preprocess.size
    example = torch.zeros((2, h, w, 3), dtype=torch.uint8)
    _export(graph, example, "pixels", {0: torch.export.Dim("batch", min=1, max=4096)}, path)


def full_context_text(model: torch.nn.Module) -> torch.nn.Module | None:
    """The text tower of a model read over its whole context (SigLIP: padded to the full length, not causal, pooled
    at the last position or by a head), as a module taking int64 tokens [N, C]; None where there is none. Its export
    takes the full context only: trimming would change what the padding contributes."""
    text = getattr(model, "text", None)
    return text if isinstance(text, torch.nn.Module) and not text_exportable(model) else None


class FullTextGraph(torch.nn.Module):
    """int64 tokens [N, C] (the whole context) -> ``full_context_text``'s tower -> L2-normalised [N, D]."""

    def __init__(self, text: torch.nn.Module) -> None:
        super().__init__()
        self.text = text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.text(tokens)
        return F.normalize(out[0] if isinstance(out, tuple) else out, dim=-1)


def export_full_text_onnx(model: torch.nn.Module, context: int, path: Path) -> None:
    """Export a ``full_context_text`` tower to one ONNX file, the batch dynamic, the context fixed."""
    text = full_context_text(model)
    if text is None:
        raise ValueError("the model has no full-context text tower")
    graph = FullTextGraph(text).float().eval()
    example = torch.ones((2, context), dtype=torch.int64)
    _export(graph, example, "tokens", {0: torch.export.Dim("batch", min=1, max=4096)}, path)


def export_text_onnx(model: torch.nn.Module, path: Path) -> None:
    """Export the float32 text tower to one ONNX file, batch and sequence length dynamic (2 .. the context)."""
    graph = TextGraph(model).float().eval()
    context = int(model.attn_mask.shape[0])
    example = torch.zeros((2, min(3, context)), dtype=torch.int64)
    example[:, -1] = 1  # any EOT position: argmax pooling must not be traced at a constant index
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 1: torch.export.Dim("length", min=2, max=context)}
    _export(graph, example, "tokens", dims, path)


def _versions(backend: str) -> dict[str, str]:
    import onnx

    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    if backend == "onnx":
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    if backend == "openvino":
        import openvino

        out["openvino"] = openvino.__version__
    return out


def stored_precision(precision: str) -> str:
    """The precision of the exported file: int8 graphs are their own; float32 and bf16 share one float32 graph (bf16
    is OpenVINO's inference precision, chosen when the graph is compiled)."""
    return "int8" if precision == "int8" else "none"


def export_key(
    model_id: str, backend: str, precision: str, preprocess: Preprocess, calibration: str | None = None
) -> dict[str, object]:
    """Everything an image export depends on; its digest names the export's directory. ``calibration``: the digest
    of the images a static int8 graph was calibrated on."""
    return {
        "model_id": model_id,
        "backend": backend,
        "precision": stored_precision(precision),
        "export_version": EXPORT_VERSION,
        "preprocess": preprocess.as_dict(),
        "versions": _versions(backend),
        **({"calibration": calibration} if calibration is not None else {}),
    }


def text_export_key(
    model_id: str, backend: str, precision: str, context_length: int, full_context: bool = False
) -> dict[str, object]:
    """Everything a text export depends on (the model id covers the weights and the tokenizer's model name)."""
    return {
        "model_id": model_id,
        "tower": "text",
        **({"graph": "full-context"} if full_context else {}),
        "backend": backend,
        "precision": stored_precision(precision),
        "export_version": TEXT_EXPORT_VERSION,
        "context_length": context_length,
        "versions": _versions(backend),
    }


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


META = "export.json"


def _intact(directory: Path, key: dict[str, object]) -> bool:
    try:
        meta = json.loads((directory / META).read_text())
        if meta.get("key") != key:
            return False
        files = meta["files"]
        return bool(files) and all(_digest(directory / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached_export(exports_dir: Path, key: dict[str, object], build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The directory of the export named by ``key``: reused when its files match their recorded digests, otherwise
    (missing, partial, corrupt) built by ``build(directory)``. Returns (directory, built).

    Building happens in a private temporary directory that is renamed into place, so processes that start together
    never see each other's half-written files; when two build at once, the first rename wins and the other's copy is
    dropped."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    tower = "text-" if key.get("tower") == "text" else ""  # image exports keep their original names
    final = exports_dir / f"{tower}{key['backend']}-{key['precision']}-{digest}"
    if final.exists():
        if _intact(final, key):
            log.info("%s export of %s (%s) reused from %s", key["backend"], key["model_id"], key["precision"], final)
            return final, False
        log.warning("%s export at %s is incomplete or corrupt: rebuilding it", key["backend"], final)
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=exports_dir))
        try:
            final.rename(trash / final.name)
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(trash, ignore_errors=True)
    exports_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=exports_dir))
    try:
        log.info("exporting %s to %s (%s) once, into %s", key["model_id"], key["backend"], key["precision"], final)
        build(tmp)
        files = {p.name: _digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / META).write_text(json.dumps({"key": key, "files": files}, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use its copy
            if not _intact(final, key):
                raise
            return final, False
        return final, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the runtimes -----------------------------------------------------------------------------------------------------
Exporter = Callable[[Path], None]  # writes the float32 ONNX graph of a tower to the path given


def _build_onnx(export: Exporter, precision: str) -> Callable[[Path], None]:
    def build(directory: Path) -> None:
        if precision == "none":
            export(directory / "model.onnx")
            return
        from onnxruntime.quantization import QuantType, quantize_dynamic

        float_path = directory / "float32.onnx.tmp"
        export(float_path)
        quantize_dynamic(float_path, directory / "model.onnx", weight_type=QuantType.QInt8)
        float_path.unlink()

    return build


def _build_openvino(export: Exporter, calibration: CalibrationSet | None = None) -> Callable[[Path], None]:
    """The float32 graph in OpenVINO's format; with ``calibration``, the image graph quantised statically first (QDQ:
    OpenVINO runs the quantised MatMuls and convolution in int8)."""

    def build(directory: Path) -> None:
        import openvino as ov

        float_path = directory / "float32.onnx.tmp"
        export(float_path)
        source = float_path
        if calibration is not None:
            source = directory / "int8-qdq.onnx.tmp"
            quantize_static_qdq(float_path, source, calibration.pixels())
        ov.save_model(ov.convert_model(str(source)), str(directory / "model.xml"), compress_to_fp16=False)
        for tmp in {float_path, source}:
            tmp.unlink()

    return build


def quantize_static_qdq(float_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """Static int8 of an exported image graph (input ``pixels``): MatMul, Gemm and Conv get int8 weights per output
    channel and uint8 activations whose ranges are the min and max seen on ``calibration``, one image at a time."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(range(len(calibration)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.rows, None)
            return None if i is None else {"pixels": np.ascontiguousarray(calibration[i : i + 1])}

    quantize_static(
        str(float_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def onnx_runtime(path: Path, threads: int) -> Runtime:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle pool threads must not spin: the API's decoding shares these cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(inputs: np.ndarray) -> np.ndarray:
        # Run is thread-safe: the image encoder's lanes call it concurrently, each with its own threads.
        return np.asarray(session.run(None, {name: np.ascontiguousarray(inputs)})[0], dtype=np.float32)

    return run


def openvino_runtime(path: Path, threads: int, lanes: int, precision: str = "fp32") -> Runtime:
    """``precision`` "bf16": OpenVINO's bf16 inference (only where the CPU executes it natively: the caller checks)."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(path),
        "CPU",
        {
            # One stream per lane, so the lanes' batches run side by side like torch's threads do.
            "NUM_STREAMS": max(1, lanes),
            "INFERENCE_NUM_THREADS": max(1, threads * lanes),
            # Never bf16/fp16 behind our back (a CPU with AMX would otherwise pick it): only when asked for.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "ENABLE_CPU_PINNING": False,
        },
    )
    local = threading.local()  # an infer request is not thread-safe: one per calling thread (lane)

    def run(inputs: np.ndarray) -> np.ndarray:
        req = getattr(local, "request", None)
        if req is None:
            req = local.request = compiled.create_infer_request()
        req.infer({0: np.ascontiguousarray(inputs)})
        return np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)  # the request reuses its buffer

    return run


def _load_runtime(
    key: dict[str, object],
    export: Exporter,
    data_dir: Path,
    threads: int,
    lanes: int,
    compute: str,
    calibration: CalibrationSet | None = None,
) -> tuple[Runtime, Path, bool]:
    backend, precision = str(key["backend"]), str(key["precision"])
    exports = Path(data_dir) / "exports"
    if backend == "onnx":
        build = _build_onnx(export, precision)
        load = lambda d: onnx_runtime(d / "model.onnx", threads)  # noqa: E731
    elif backend == "openvino":
        build = _build_openvino(export, calibration)
        load = lambda d: openvino_runtime(d / "model.xml", threads, lanes, compute)  # noqa: E731
    else:
        raise ValueError(f"no exported runtime for backend {backend!r}")
    directory, built = cached_export(exports, key, build)
    try:
        return load(directory), directory, built
    except Exception as exc:  # digests matched but the runtime refuses the file (e.g. written by a broken exporter)
        log.warning("%s export at %s does not load (%s): rebuilding it", backend, directory, exc)
        shutil.rmtree(directory, ignore_errors=True)
        directory, built = cached_export(exports, key, build)
        return load(directory), directory, built


def load_image_runtime(
    visual: torch.nn.Module,
    preprocess: Preprocess,
    model_id: str,
    backend: str,
    precision: str,
    data_dir: Path,
    threads: int,
    lanes: int = 1,
    calibration: CalibrationSet | None = None,
) -> tuple[ImageRuntime, Path, bool]:
    """The image tower on ``backend`` ("onnx" or "openvino"): (runtime, export directory, whether it was built now).
    ``threads`` per call (the torch threads of one lane), ``lanes``: how many calls run at once. ``calibration``
    (imaging/calibration.py): OpenVINO's int8 needs it, nothing else uses it."""
    static = backend == "openvino" and precision == "int8"
    if static and calibration is None:
        raise ValueError("OpenVINO's int8 image tower is calibrated: pass its calibration images")
    used = calibration if static else None
    key = export_key(model_id, backend, precision, preprocess, used.digest if used else None)
    export: Exporter = lambda path: export_onnx(visual, preprocess, path)  # noqa: E731
    # OpenVINO runs its int8 graph with an f32 hint: the quantised layers are int8 whatever the hint says.
    compute = "fp32" if static else precision
    return _load_runtime(key, export, data_dir, threads, lanes, compute, used)


def load_text_runtime(
    model: torch.nn.Module,
    model_id: str,
    backend: str,
    precision: str,
    data_dir: Path,
    threads: int,
    lanes: int = 1,
    context: int | None = None,
) -> tuple[TextRuntime, Path, bool]:
    """The text tower of ``model`` on ``backend``: (runtime, export directory, built now). ``text_exportable``: the
    runtime takes int64 tokens [N, L], 2 <= L <= the context length. Else ``full_context_text`` with ``context``
    (its tokenizer's length): tokens [N, context] only."""
    if context is None:
        key = text_export_key(model_id, backend, precision, int(model.attn_mask.shape[0]))
        export: Exporter = lambda path: export_text_onnx(model, path)  # noqa: E731
    else:
        key = text_export_key(model_id, backend, precision, context, full_context=True)
        export = lambda path: export_full_text_onnx(model, context, path)  # noqa: E731
    return _load_runtime(key, export, data_dir, threads, lanes, precision)
