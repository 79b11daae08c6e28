"""CLIP model I/O: loading open_clip models offline or from tags, preprocessing, and batched encoding.

This is a library with no BentoML in it: the encoder services (runners/clip_service.py), the batch tool and the
benchmarks all use it. One entry point, ``load_clip_encoder(settings)``.

Model selection (see settings.py):
- ``clip_model``: an open_clip model name, or a path to a model-config JSON. The JSON is either a plain open_clip
  config ({"embed_dim", "vision_cfg", "text_cfg"}, optionally with a "preprocess_cfg" key) or open_clip's
  ``open_clip_config.json`` form ({"model_cfg": ..., "preprocess_cfg": ...}); the preprocessing travels with it.
  Or ``bentoml:NAME[:VERSION]``: a model ``import_to_store`` put into BentoML's model store (config, checkpoint and
  preprocessing together; ``clip_pretrained`` is then not read), served under the model id of its original files.
- ``clip_pretrained``: an open_clip pretrained tag (downloads through open_clip's own code where a hub is reachable),
  a path to a local checkpoint, or ``random`` (seeded random weights, for benchmarks and tests).

Attention runs through PyTorch's ``scaled_dot_product_attention`` (nn.MultiheadAttention's fast path), which picks
flash / memory-efficient kernels on a GPU by itself; flash-attn and torch-scatter are therefore not needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from imaging.calibration import CalibrationSet, calibration_set
from imaging.preprocess import Preprocess
from runners.backends import (
    PRECISIONS,
    choose_backend,
    full_context_text,
    load_image_runtime,
    load_text_runtime,
    text_exportable,
)
from runners.device import BF16_FLAGS, native_bf16, select_device
from runners.store import CLIP_KIND, KIND_KEY, open_entry, store_tag
from settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What to load, resolved from settings; ``model_id`` is the stable id used in cache keys."""

    name: str
    pretrained: str | None
    model_id: str
    preprocess_override: dict[str, Any]
    random_seed: int | None
    # "open_clip", or "transformers" (a SiglipModel / Siglip2Model directory or hub id in ``name``; runners/siglip.py)
    form: str = "open_clip"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _is_config_path(model: str) -> bool:
    return model.endswith(".json") or Path(model).is_file()


def resolve_model(settings: Settings) -> ModelSpec:
    """Turn ZSS_CLIP_MODEL / ZSS_CLIP_PRETRAINED into open_clip arguments and a content-based model id.

    A ``bentoml:`` tag in ZSS_CLIP_MODEL names a model imported into BentoML's model store (``import_to_store``); it
    keeps the model id its original files or tag had, so the embedding cache does not depend on where weights live.
    """
    tag = store_tag(settings.clip_model)
    if tag is not None:
        return _resolve_stored(tag, settings.random_seed)
    return _resolve(settings.clip_model, settings.clip_pretrained, settings.random_seed)


def _resolve(model: str, pretrained: str, random_seed: int, checkpoint_digest: str | None = None) -> ModelSpec:
    """``checkpoint_digest``: the checkpoint file's digest where the caller has just computed it."""
    override: dict[str, Any] = {}
    model_path = Path(model)
    if is_transformers(model):
        return _resolve_transformers(model, pretrained, random_seed)
    if _is_config_path(model):
        if not model_path.is_file():
            raise FileNotFoundError(f"ZSS_CLIP_MODEL: model config {model_path} not found")
        raw = json.loads(model_path.read_text())
        model_cfg = raw.get("model_cfg", raw)
        override = dict(raw.get("preprocess_cfg", {}))
        model_cfg = {k: v for k, v in model_cfg.items() if k != "preprocess_cfg"}
        if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{model_path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        model_cfg, tokenizer_digest = _local_tokenizer(model_cfg, model_path)
        # open_clip registers configs by file stem; write the bare model config where it can find it.
        registered = json.dumps(model_cfg, sort_keys=True).encode()
        name = f"zss-{model_path.stem}-{hashlib.sha256(model_path.read_bytes() + registered).hexdigest()[:12]}"
        reg_dir = Path(tempfile.gettempdir()) / "zss-open-clip-configs"
        reg_dir.mkdir(parents=True, exist_ok=True)
        reg_file = reg_dir / f"{name}.json"
        if not reg_file.exists():
            tmp = reg_file.with_suffix(f".tmp{id(raw)}")
            tmp.write_text(json.dumps(model_cfg))
            tmp.replace(reg_file)
        open_clip.add_model_config(reg_file)
        arch_id = f"config:{model_path.stem}:{hashlib.sha256(model_path.read_bytes()).hexdigest()[:16]}"
        if tokenizer_digest:  # a tokenizer directory beside the config: its content keys the cache too
            arch_id += f"+tok:{tokenizer_digest}"
    else:
        name = model
        arch_id = model
    pre = pretrained.strip()
    if pre.lower() == "random":
        if not override and "siglip" in name.lower():
            override = _tag_preprocess(name)
        return ModelSpec(name, None, f"{arch_id}@random-seed{random_seed}", override, random_seed)
    if Path(pre).is_file():
        digest = checkpoint_digest or _file_digest(Path(pre))
        return ModelSpec(name, str(Path(pre).resolve()), f"{arch_id}@file:{digest}", override, None)
    if pre in {"", "none"}:
        raise ValueError("ZSS_CLIP_PRETRAINED is empty: give a tag, a checkpoint path, or 'random'")
    return ModelSpec(name, pre, f"{arch_id}@{pre}", override, None)


def _tag_preprocess(name: str) -> dict[str, Any]:
    """The preprocessing of a named open_clip model's first pretrained tag. open_clip keeps it with the tag, not the
    architecture, so random weights would get CLIP's defaults: a SigLIP's random-weight tower is then given its own
    (mean/std 0.5, ``squash``), as a benchmark of it should run."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tags = list_pretrained_tags_by_model(name)
    cfg = get_pretrained_cfg(name, tags[0]) if tags else {}
    keys = ("mean", "std", "interpolation", "resize_mode")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def is_transformers(model: str) -> bool:
    """A transformers SigLIP directory, or a Hugging Face id (``org/name``, not open_clip's ``hf-hub:`` form) that
    is no local path."""
    from runners.siglip import hf_model_type

    model = model.strip()
    if hf_model_type(model) is not None:
        return True
    return (
        "/" in model
        and ":" not in model
        and not Path(model).exists()
        and not model.endswith(".json")
        and not model.startswith((".", "/", "~"))
    )


def _resolve_transformers(model: str, pretrained: str, random_seed: int) -> ModelSpec:
    """A transformers SigLIP: its weights come with it (ZSS_CLIP_PRETRAINED is read only for ``random``); a local
    directory is keyed by its content, a hub id by itself."""
    from runners.siglip import content_hash

    local = Path(model).expanduser()
    arch_id = f"hf:{local.name}:{content_hash(local.resolve())}" if local.is_dir() else f"hf:{model}"
    source = str(local.resolve()) if local.is_dir() else model
    if pretrained.strip().lower() == "random":
        return ModelSpec(source, None, f"{arch_id}@random-seed{random_seed}", {}, random_seed, "transformers")
    return ModelSpec(source, source, arch_id, {}, None, "transformers")


def _local_tokenizer(model_cfg: dict[str, Any], config_path: Path) -> tuple[dict[str, Any], str | None]:
    """A config whose text tower names a Hugging Face tokenizer by a path relative to the config file (a SigLIP's
    tokenizer kept beside it): the config with that path made absolute, and the tokenizer directory's digest."""
    from runners.siglip import content_hash

    text_cfg = model_cfg.get("text_cfg", {})
    name = text_cfg.get("hf_tokenizer_name")
    if not name or Path(name).is_absolute():
        return model_cfg, None
    folder = (config_path.parent / name).resolve()
    if not folder.is_dir():
        return model_cfg, None  # a hub id
    return {**model_cfg, "text_cfg": {**text_cfg, "hf_tokenizer_name": str(folder)}}, content_hash(folder)


def _resolve_stored(tag: str, random_seed: int) -> ModelSpec:
    """The spec of a stored model: its stored config and checkpoint, under the model id recorded at import."""
    entry = open_entry(tag, CLIP_KIND)
    if entry.metadata.get("form") == "transformers":
        from runners.siglip import content_hash

        if content_hash(entry.path) != entry.metadata["content_hash"]:
            raise ValueError(f"model {entry.tag}: its files do not match the content hash recorded at import")
        spec = _resolve_transformers(str(entry.path), "", random_seed)
        log.info("SigLIP %s from BentoML's model store (%s)", entry.metadata["model_id"], entry.tag)
        return replace(spec, model_id=str(entry.metadata["model_id"]))
    config, checkpoint = entry.file("config"), entry.file("checkpoint")
    digests = {path: _file_digest(path) for path in (config, checkpoint)}
    for path, key in ((config, "config_digest"), (checkpoint, "checkpoint_digest")):
        if digests[path] != entry.metadata[key]:
            raise ValueError(f"model {entry.tag}: {path.name} does not match the digest recorded at import")
    spec = _resolve(str(config), str(checkpoint), random_seed, checkpoint_digest=digests[checkpoint])
    log.info("CLIP %s from BentoML's model store (%s)", entry.metadata["model_id"], entry.tag)
    return replace(spec, model_id=str(entry.metadata["model_id"]))


def import_to_store(model: str, pretrained: str, name: str | None = None) -> tuple[str, bool]:
    """Copy an open_clip model into BentoML's model store; returns (tag, created).

    ``model`` / ``pretrained`` are what ZSS_CLIP_MODEL / ZSS_CLIP_PRETRAINED take: a model-config JSON and a local
    checkpoint, or an open_clip name with a pretrained tag (downloaded once through open_clip's own code, so this
    needs the hub) or a local checkpoint. The entry holds the config (a JSON file is copied byte for byte, under its
    own name: the model id hashes both; a named model's config is written out with the tag's preprocessing), the
    checkpoint byte for byte, and in its metadata the model id ``resolve_model`` gives the original arguments.
    """
    from runners.store import content_version, create_entry, tag_name

    if store_tag(model) is not None:
        raise ValueError(f"{model} is already a model-store tag")
    if is_transformers(model):
        return _import_transformers(model, name)
    spec = _resolve(model, pretrained, 0)
    if spec.pretrained is None:
        raise ValueError("random weights: there is nothing to store (serve ZSS_CLIP_PRETRAINED=random directly)")
    # Load it once: a broken checkpoint fails here, not when a container starts; a tag is downloaded here.
    loaded = open_clip.create_model(
        spec.name, pretrained=spec.pretrained, device="cpu", force_preprocess_cfg=spec.preprocess_override or None
    )
    preprocess = open_clip.get_model_preprocess_cfg(loaded)
    del loaded
    with tempfile.TemporaryDirectory(prefix="zss-clip-import-") as tmp:
        if _is_config_path(model):
            config = Path(model)
        else:
            model_cfg = open_clip.get_model_config(spec.name)
            if model_cfg is None:
                raise ValueError(f"{spec.name}: open_clip has no config of that name")
            hf_tokenizer = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
            if hf_tokenizer:
                raise ValueError(
                    f"{spec.name} tokenises with the Hugging Face tokenizer {hf_tokenizer!r}, which would still come "
                    "from the hub; only models with open_clip's own tokenizer can be stored"
                )
            config = Path(tmp) / "open_clip_config.json"
            config.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
        if Path(spec.pretrained).is_file():
            checkpoint = Path(spec.pretrained)
        else:
            checkpoint = Path(_download_pretrained(spec.name, spec.pretrained))
        if config.name == checkpoint.name:
            raise ValueError(f"the config and the checkpoint are both named {config.name}")
        files = {config.name: config, checkpoint.name: checkpoint}
        if _is_config_path(model):
            # A tokenizer directory named relative to the config travels with it, under the same relative name.
            text_cfg = json.loads(config.read_text()).get("model_cfg", json.loads(config.read_text()))["text_cfg"]
            tok = text_cfg.get("hf_tokenizer_name")
            if tok and not Path(tok).is_absolute() and (config.parent / tok).is_dir():
                root = (config.parent / tok).resolve()
                rel = Path(tok)
                if ".." in rel.parts:
                    raise ValueError(f"the tokenizer {tok} must lie in or below the config's folder to be stored")
                files.update({str(rel / p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()})
        if _is_config_path(model):
            stem = Path(model).stem
        else:
            stem = f"{model}-{checkpoint.stem if Path(pretrained).is_file() else pretrained}"
        metadata = {
            KIND_KEY: CLIP_KIND,
            "model_id": spec.model_id,
            "config": config.name,
            "config_digest": _file_digest(config),
            "checkpoint": checkpoint.name,
            "checkpoint_digest": _file_digest(checkpoint),
            "source_model": model if not _is_config_path(model) else Path(model).name,
            "source_pretrained": pretrained if not Path(pretrained).is_file() else Path(pretrained).name,
            "preprocess": json.dumps(preprocess),
        }
        version = content_version(spec.model_id, metadata["config_digest"], metadata["checkpoint_digest"])
        return create_entry(
            name or tag_name(stem),
            version,
            files,
            metadata,
            {"project": "zeroshot-server", "kind": "clip"},
        )


def _import_transformers(model: str, name: str | None) -> tuple[str, bool]:
    """A transformers SigLIP directory (or a hub id, downloaded here) into the store: its files as they are."""
    from runners.siglip import content_hash, load_hf
    from runners.store import content_version, create_entry, tag_name

    local = Path(model).expanduser()
    if local.is_dir():
        root = local.resolve()
    else:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"]))
    load_hf(str(root))  # a broken checkpoint fails here, not when a container starts
    spec = _resolve_transformers(model, "", 0)
    files = {
        str(p.relative_to(root)): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
    digest = content_hash(root)
    metadata = {KIND_KEY: CLIP_KIND, "form": "transformers", "model_id": spec.model_id, "content_hash": digest}
    stem = local.name if local.is_dir() else model.rsplit("/", 1)[-1]
    return create_entry(
        name or tag_name(stem),
        content_version(spec.model_id, digest),
        files,
        metadata,
        {"project": "zeroshot-server", "kind": "clip"},
    )


def _download_pretrained(name: str, tag: str) -> str:
    """The local file of an open_clip pretrained tag (downloaded into the hub cache if it is not there yet)."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        raise ValueError(f"{name}: open_clip has no pretrained tag {tag!r}")
    return str(download_pretrained(cfg))


class ClipEncoder:
    """A loaded open_clip model with batched, normalised image and text encoding."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        preprocess: Preprocess,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype,
        text_batch_size: int = 256,
        image_runtime: Any = None,
        backend: str = "torch",
        dim: int | None = None,
        text_runtime: Any = None,
        text_backend: str = "torch",
        logits: tuple[float, float] | None = None,
        precision: str = "fp32",
        text_precision: str = "fp32",
        text_trims: bool = True,
    ) -> None:
        self.model = model
        # (logit scale, logit bias) of a sigmoid-loss model (SigLIP), None for a CLIP: see ``sigmoid_logits``.
        self.logits = logits
        # Exported towers (runners/backends.py), None = torch: uint8 pixels -> normalised float32 (image), int64
        # tokens [N, L] with L trimmed to the batch's longest prompt -> normalised float32 (text).
        self.image_runtime = image_runtime
        self.backend = backend
        self.text_runtime = text_runtime
        self.text_backend = text_backend
        # What each tower computes in: "fp32", "bf16" (OpenVINO on a CPU with native bf16), "int8" or "fp16" (CUDA).
        self.precision = precision
        self.text_precision = text_precision
        self.pin_memory = False  # ZSS_PIN_MEMORY: pixels go to a GPU through page-locked memory
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.text_batch_size = text_batch_size
        self.dim = int(dim or getattr(model, "embed_dim", 0) or self._probe_dim())
        # Trimming the context is exact only for causal text towers pooled at the EOT token (the only ones exported).
        # An exported SigLIP text tower (``text_trims`` False) takes the full context only.
        self.can_trim_context = text_trims if text_runtime is not None else text_exportable(model)

    def _probe_dim(self) -> int:
        text = getattr(self.model, "text", None)  # CustomTextCLIP (SigLIP): the projection is the text tower's
        proj = getattr(text if text is not None else self.model, "text_projection", None)
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[1])
        visual = getattr(self.model, "visual", None)
        if isinstance(getattr(visual, "output_dim", None), int):
            return int(visual.output_dim)
        if visual is not None:  # e.g. a timm image tower whose text tower was dropped: one forward pass tells
            p = next(visual.parameters())
            with torch.inference_mode():
                x = torch.zeros((1, 3, *self.preprocess.size), device=p.device, dtype=p.dtype)
                return int(self.model.encode_image(x).shape[-1])
        raise ValueError("cannot determine the embedding dimension")

    @property
    def info(self) -> dict[str, Any]:
        p = self.preprocess
        return {
            "model_id": self.model_id,
            "dim": self.dim,
            "preprocess": p.as_dict(),
            "context_length": int(getattr(self.model, "context_length", 77)),
            # Present only for sigmoid-loss models, so a CLIP's info reads as before.
            **({"logit_scale": self.logits[0], "logit_bias": self.logits[1]} if self.logits else {}),
            "device": str(self.device),
            "backend": self.backend,
            "text_backend": self.text_backend,
            "precision": self.precision,
            "text_precision": self.text_precision,
        }

    # -- images ------------------------------------------------------------------------------------------------
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] at the model's input size -> L2-normalised float32 [N, D]."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.image_runtime is not None:
            return self.image_runtime(pixels)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels))
            if self.pin_memory and self.device.type == "cuda":
                # Page-locked (from torch's caching host allocator): the copy to the GPU is one asynchronous DMA.
                x = x.pin_memory().to(self.device, non_blocking=True)
            else:
                x = x.to(self.device)
            x = self.preprocess.normalise(x).to(self.dtype)
            feats = self.model.encode_image(x)
            return F.normalize(feats.float(), dim=-1).cpu().numpy()

    # -- text --------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("this encoder holds the image tower only")
        return self.tokenizer(texts)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the text tower reads them (start and end markers included, cut at the context)."""
        if not texts:
            return []
        return [int(n) for n in (self.tokenize(list(texts)) != 0).sum(dim=1)]

    def _encode_tokens(self, tokens: torch.Tensor, trim: bool) -> torch.Tensor:
        m = self.model
        if not (trim and self.can_trim_context):
            return m.encode_text(tokens.to(self.device))
        # Cut the context to the longest prompt in the batch: with a causal mask no position attends to the padding
        # after it, so the EOT features are the same as with the full context (tested).
        length = int((tokens != 0).sum(dim=1).max().item())
        length = max(1, min(length, tokens.shape[1]))
        tokens = tokens[:, :length].to(self.device)
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast)
        x = x + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = open_clip.transformer.text_global_pool(
            x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None)
        )
        proj = m.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return x

    def encode_texts(self, texts: list[str], trim_context: bool = True) -> np.ndarray:
        """Texts (no templates applied here) -> L2-normalised float32 [N, D].

        Texts are sorted by token length and encoded in chunks, so each chunk is trimmed to its own longest prompt.
        """
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenize(list(texts))
        lengths = (tokens != 0).sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.text_batch_size):
                idx = order[start : start + self.text_batch_size]
                if self.text_runtime is not None:
                    chunk = tokens[idx]
                    if trim_context and self.can_trim_context:  # at least SOT + EOT: the export's shortest context
                        chunk = chunk[:, : max(2, int(lengths[idx].max().item()))]
                    out[idx] = torch.from_numpy(self.text_runtime(chunk.numpy().astype(np.int64, copy=False)))
                    continue
                feats = self._encode_tokens(tokens[idx], trim=trim_context)
                out[idx] = F.normalize(feats.float(), dim=-1).cpu()
        return out.numpy()


def load_clip_encoder(settings: Settings, towers: str = "both", lanes: int = 1) -> ClipEncoder:
    """Build the encoder described by ``settings``. ``towers`` = "image", "text" or "both" (drops the other tower).

    Each tower runs on ZSS_BACKEND (runners/backends.py; ``auto`` picks per tower; exported once and cached under
    ZSS_DATA_DIR) with torch's current thread count per call; ``lanes``: how many image batches the caller runs at
    once (OpenVINO gives each its own stream). A text tower that cannot be exported exactly (not open_clip's causal
    transformer) stays in torch."""
    spec = resolve_model(settings)
    device = select_device(settings.device)
    precision = quantize_mode(settings.clip_quantize, device)
    backend = choose_backend(settings.backend, precision, device) if towers != "text" else "torch"
    text_backend = choose_backend(settings.backend, precision, device, tower="text") if towers != "image" else "torch"
    if spec.pretrained is None:
        log.warning(
            "ZSS_CLIP_PRETRAINED=random: %s has RANDOM weights (seed %d). Predictions are meaningless; use this only "
            "for tests and benchmarks.",
            spec.name,
            spec.random_seed,
        )
        torch.manual_seed(spec.random_seed or 0)
    tokenizer: Any
    if spec.form == "transformers":
        from runners.siglip import load_hf

        model, tokenizer, pp_cfg = load_hf(spec.name, random=spec.pretrained is None)
    else:
        model = open_clip.create_model(
            spec.name,
            pretrained=spec.pretrained,
            device="cpu",
            force_preprocess_cfg=spec.preprocess_override or None,
        )
        # Read the preprocessing before a tower is dropped: it travels with the model's config and weights.
        pp_cfg = open_clip.get_model_preprocess_cfg(model)
        # The image encoder needs no tokenizer (a SigLIP's may live on the hub: an image tower then loads offline).
        tokenizer = open_clip.get_tokenizer(spec.name) if towers != "image" else None
    model.eval()
    logits = sigmoid_logits(model)
    # The tower a service does not use is dropped to halve its memory.
    if towers == "image":
        for attr in ("transformer", "token_embedding", "ln_final", "text"):
            if hasattr(model, attr):
                setattr(model, attr, None)
    elif towers == "text":
        model.visual = None  # type: ignore[assignment]
    dtype = torch.float16 if (device.type == "cuda" and settings.fp16) else torch.float32
    model = model.to(device=device, dtype=dtype)
    preprocess = Preprocess.from_open_clip(pp_cfg)
    runtime, dim, text_runtime = None, None, None
    calibration: CalibrationSet | None = None
    # What a tower left in torch computes in; an exported tower's is compute_precision's.
    torch_precision = "fp16" if dtype == torch.float16 else "int8" if precision == "int8" else "fp32"
    text_precision = image_precision = torch_precision
    full_text = text_backend != "torch" and not text_exportable(model) and full_context_text(model) is not None
    if text_backend != "torch" and not (text_exportable(model) or full_text):
        log.warning("the text tower of %s cannot be exported exactly: it runs in torch", spec.model_id)
        text_backend = "torch"
    if text_backend != "torch":
        # Like the image tower: float32 exports give torch's vectors (tested) and share its model id. A SigLIP's text
        # tower reads its whole context (padded to the full length): exported with that length fixed.
        text_precision = compute_precision(precision, text_backend, tower="text")
        context = int(tokenizer(["a"]).shape[1]) if full_text else None
        text_runtime, directory, _ = load_text_runtime(
            model,
            spec.model_id,
            text_backend,
            text_precision,
            settings.data_dir,
            torch.get_num_threads(),
            context=context,
        )
        if full_text and not _same_text_vectors(model, tokenizer, text_runtime, text_precision):
            log.warning("the exported text tower of %s does not match torch's: it runs in torch", spec.model_id)
            text_backend, text_runtime, text_precision = "torch", None, torch_precision
        else:
            probe = tokenizer(["a"]).numpy().astype(np.int64) if full_text else np.array([[1, 2]], np.int64)
            dim = int(text_runtime(probe).shape[1])
            for attr in ("text",) if full_text else ("transformer", "token_embedding", "ln_final"):
                setattr(model, attr, None)
            log.info("CLIP text tower on %s (%s) from %s", text_backend, text_precision, directory)
    if backend != "torch" and not getattr(model, "image_exportable", True):
        log.warning("the image tower of %s cannot be exported: it runs in torch", spec.model_id)
        backend = "torch"
    if backend != "torch":
        # The exported tower replaces torch's, whose weights are then dropped. Float32 backends give torch's vectors
        # (cosine >= 0.9999, tested), so they share its model id and cached text vectors.
        threads = torch.get_num_threads()
        image_precision = compute_precision(precision, backend)
        visual = model.visual
        if spec.form == "transformers":  # SigLIP 2: its position embeddings fixed to the input size for the export
            from runners.siglip import export_visual

            visual = export_visual(visual, preprocess.size)
        if (backend, image_precision) == ("openvino", "int8"):
            calibration = calibration_set(preprocess, settings.clip_int8_calibration)
        runtime, directory, _ = load_image_runtime(
            visual, preprocess, spec.model_id, backend, image_precision, settings.data_dir, threads, lanes, calibration
        )
        dim = int(runtime(np.zeros((1, *preprocess.size, 3), np.uint8)).shape[1])
        model.visual = None  # type: ignore[assignment]
        log.info("CLIP image tower on %s (%s) from %s", backend, image_precision, directory)
    model_id = spec.model_id
    if precision == "int8":
        if (towers != "text" and backend == "torch") or (towers != "image" and text_backend == "torch"):
            model = quantize_int8(model)  # the towers left in torch
        # Other vectors than the float model's, and than another runtime's int8 (each quantises its own way): never
        # share cache entries with either.
        used = {backend} if towers == "image" else {text_backend} if towers == "text" else {backend, text_backend}
        model_id += "+int8" + "".join(f"-{b}" for b in sorted(used - {"torch"}))
        if calibration is not None and settings.clip_int8_calibration is not None:
            model_id += f"-cal{calibration.digest[:12]}"  # the user's calibration images: other ranges, other vectors
    elif precision == "bf16":
        # Not torch's vectors to the float32 backends' standard (BENCHMARKS.md, issue 29): a cache namespace of its
        # own, the same for both towers (one service's text tower may compute in float32: still one namespace).
        model_id += "+bf16"
    encoder = ClipEncoder(
        model,
        tokenizer,
        preprocess,
        model_id,
        device,
        dtype,
        image_runtime=runtime,
        backend=backend if towers != "text" else text_backend,
        dim=dim,
        text_runtime=text_runtime,
        text_backend=text_backend,
        logits=logits,
        precision=image_precision if towers != "text" else text_precision,
        text_precision=text_precision,
        text_trims=not full_text,
    )
    encoder.pin_memory = settings.pin_memory
    return encoder


def _same_text_vectors(model: torch.nn.Module, tokenizer: Any, runtime: Any, precision: str) -> bool:
    """Whether an exported full-context text tower gives torch's vectors on a few prompts (cosine >= 0.9999 in
    float32, 0.999 in bf16; int8 is checked by its own tests): a tower whose forward the exporter got wrong stays in
    torch rather than serving other vectors under the same model id."""
    if precision == "int8":
        return True
    tokens = tokenizer(["a photo of a dog", "x", "two red squares on a light background"])
    with torch.inference_mode():
        want = F.normalize(model.encode_text(tokens).float(), dim=-1).numpy()
    got = runtime(tokens.numpy().astype(np.int64))
    return float((got * want).sum(axis=1).min()) >= (0.999 if precision == "bf16" else 0.9999)


def sigmoid_logits(model: torch.nn.Module) -> tuple[float, float] | None:
    """(scale, bias) of a model trained with the sigmoid loss (SigLIP: it has a logit bias), where
    sigmoid(scale * cos + bias) is the probability that an image matches a text; None for a CLIP (no bias)."""
    bias = getattr(model, "logit_bias", None)
    scale = getattr(model, "logit_scale", None)
    if not isinstance(bias, torch.Tensor) or not isinstance(scale, torch.Tensor):
        return None
    return float(scale.detach().float().exp().reshape(-1)[0]), float(bias.detach().float().reshape(-1)[0])


# ZSS_CLIP_QUANTIZE: "none" (float32), "bf16" (OpenVINO's bf16 inference, only on a CPU that executes bf16
# natively), "int8" (dynamic int8 quantisation; static and calibrated in OpenVINO's image tower). bf16 moved the
# shapes evaluation by up to 0.4 points where the float32 backends move it by none (BENCHMARKS.md, issue 29), so like
# int8 it is asked for, never picked, and keyed apart.
QUANTIZE_MODES = ("none", "bf16", "int8")


def quantize_mode(value: str, device: torch.device, bf16: bool | None = None) -> str:
    """Validate ZSS_CLIP_QUANTIZE against the device: int8 and bf16 are CPU precisions, and bf16 needs a CPU that
    executes it natively (``bf16``: whether it does; default: read from this CPU)."""
    mode = value.strip().lower() or "none"
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"ZSS_CLIP_QUANTIZE must be one of {', '.join(QUANTIZE_MODES)}, not {value!r}")
    if mode in ("int8", "bf16") and device.type != "cpu":
        raise ValueError(f"ZSS_CLIP_QUANTIZE={mode} is a CPU precision; on a GPU use ZSS_FP16=true instead")
    if mode == "bf16" and not (native_bf16() if bf16 is None else bf16):
        raise ValueError(
            "ZSS_CLIP_QUANTIZE=bf16 needs a CPU that executes bf16 natively (AVX-512 BF16 or AMX: flags "
            f"{' or '.join(sorted(BF16_FLAGS))}); this one would emulate it, slower than float32. "
            "Use none (float32 here) or int8"
        )
    return mode


def compute_precision(mode: str, backend: str, tower: str = "image") -> str:
    """What ``tower`` on ``backend`` computes in for ZSS_CLIP_QUANTIZE ``mode`` (validated): "fp32", "bf16" or "int8".
    bf16 asked of a backend that has none (ZSS_BACKEND=auto's text tower, ONNX Runtime) computes in float32 there, and
    so does int8 asked of OpenVINO's text tower (its int8 is static, calibrated on images: the image tower's only)."""
    if mode == "bf16":
        return "bf16" if "bf16" in PRECISIONS.get(backend, ()) else "fp32"
    if mode == "int8":
        return "fp32" if (backend, tower) == ("openvino", "text") else "int8"
    return "fp32"


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of every nn.Linear (weights int8 once, activations per batch).

    In open_clip's transformers these are the MLPs, two thirds of a block's matmul work; nn.MultiheadAttention's
    projections stay float (PyTorch does not quantise them dynamically), and so do patch embedding and projections.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import quantize_dynamic

    dtype = next(model.parameters()).dtype
    # Linears whose callers read them as float stay float: a projection open_clip applies with `isinstance(proj,
    # nn.Linear)` or else `x @ proj` (a SigLIP text tower's, with a bias), and SigLIP 2's patch embedding (transformers
    # reads its `weight.dtype`, a method on a quantised Linear).
    names = ("text_projection", "patch_embedding")
    keep = {n: m for n, m in model.named_modules() if n.endswith(names) and type(m) is torch.nn.Linear}
    model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    for name, module in keep.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    for m in model.modules():
        if isinstance(m, DynamicInt8Linear):
            # open_clip reads a block's compute dtype from its MLP weight, or from this attribute when it is int8.
            m.int8_original_dtype = dtype
    return model
