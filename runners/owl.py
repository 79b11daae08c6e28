"""OWLv2 / OWL-ViT model I/O: loading through transformers, batched image and text encoding. No BentoML in here.

One image is encoded once into per-box data (boxes, class embeddings, logit shift/scale, objectness); any detector,
with any number of positive and negative examples, is then scored against it by ``semantic.detect`` without touching
the model again. Text examples go through the detector's own text tower (``encode_texts``), not CLIP's.

Preprocessing departs from ``Owlv2ImageProcessor`` on purpose: HF pads the ORIGINAL image to a square and then
resizes, which for an 800x15000 image allocates a 15000x15000 float intermediate (2.7 GB). We resize first (longer
side = the model's input size, aspect kept, PIL's antialiased bilinear filter) and then pad bottom/right with the same
value HF pads with (0 in [0, 1] pixel space, before mean/std normalisation). Geometry is therefore identical to HF's;
only the resampling filter differs slightly (HF: gaussian anti-aliasing + bilinear).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imaging.geometry import pad_to_square, padded_square_cxcywh_to_xyxy
from runners.device import select_device
from runners.store import DETECTOR_KIND, KIND_KEY, StoreEntry, open_entry, store_tag
from settings import Settings

log = logging.getLogger(__name__)

DEFAULT_DETECTOR_MODEL = "google/owlv2-base-patch16-ensemble"
# CLIP's normalisation, the OWL processors' default; used only if a checkpoint ships no image processor config.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Files whose content identifies a local checkpoint (weights, configs, tokenizer files).
_ID_SUFFIXES = {".json", ".safetensors", ".bin", ".txt", ".model", ".pt", ".pth"}

ImageEncoding = dict[str, np.ndarray]


def _id_files(root: Path) -> list[Path]:
    """The files whose content identifies a checkpoint directory (hidden files and folders left out)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in _ID_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def content_hash(path: Path) -> str:
    """A hash of a checkpoint directory's config/weights/tokenizer files: their relative names and contents."""
    root = path.expanduser().resolve()
    h = hashlib.sha256()
    for f in _id_files(root):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with f.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def local_model_id(path: Path) -> str:
    """Stable id of a local checkpoint directory: its resolved path plus a content hash of its config/weights files.

    The hash makes cache keys change when the files are replaced in place (the path alone would not).
    """
    return f"{path.expanduser().resolve()}#sha256:{content_hash(path)}"


def model_id_for(source: str) -> str:
    """The cache id of a ``detector_model`` value: a local directory's path+hash, else the Hugging Face id itself.

    A model in BentoML's model store (``bentoml:NAME[:VERSION]``) keeps the id its source had when it was imported.
    """
    tag = store_tag(source)
    if tag is not None:
        return str(_open_stored(tag).metadata["model_id"])
    p = Path(source).expanduser()
    return local_model_id(p) if p.is_dir() else source


def _open_stored(tag: str) -> StoreEntry:
    """A stored detector whose files still hash to what was recorded at import."""
    entry = open_entry(tag, DETECTOR_KIND)
    if content_hash(entry.path) != entry.metadata["content_hash"]:
        raise ValueError(f"model {entry.tag}: its files do not match the content hash recorded at import")
    return entry


def import_to_store(source: str, name: str | None = None) -> tuple[str, bool]:
    """Copy an OWLv2 / OWL-ViT checkpoint into BentoML's model store; returns (tag, created).

    ``source`` is what ZSS_DETECTOR_MODEL takes: a local directory (``save_pretrained``) or a Hugging Face id, which
    is downloaded here (config, tokenizer, processor and safetensors weights; this needs the hub). The entry holds the
    directory's files (hidden ones left out) and, in its metadata, the model id ``model_id_for`` gives the source.
    """
    from transformers import AutoConfig

    from runners.store import content_version, create_entry, tag_name

    if store_tag(source) is not None:
        raise ValueError(f"{source} is already a model-store tag")
    if source.strip().lower() in {"", "none", "off", "random"}:
        raise ValueError(f"{source!r} is not a checkpoint to store")
    local = Path(source).expanduser()
    root = local.resolve() if local.is_dir() else Path(_download_hub(source))
    model_type = AutoConfig.from_pretrained(str(root)).model_type
    if model_type not in {"owlv2", "owlvit"}:
        raise ValueError(f"{source}: not an OWLv2/OWL-ViT checkpoint (model_type={model_type!r})")
    files = {
        str(p.relative_to(root)): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
    model_id = model_id_for(str(local)) if local.is_dir() else source
    digest = content_hash(root)
    metadata = {
        KIND_KEY: DETECTOR_KIND,
        "model_id": model_id,
        "content_hash": digest,
        "model_type": model_type,
        "source": source if not local.is_dir() else local.name,
    }
    stem = local.name if local.is_dir() else source.rsplit("/", 1)[-1]
    return create_entry(
        name or tag_name(stem),
        content_version(model_id, digest),
        files,
        metadata,
        {"project": "zeroshot-server", "kind": "detector"},
    )


def _download_hub(repo_id: str) -> str:
    """A Hugging Face snapshot of the files a detector needs (safetensors weights, else the .bin ones)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model"]
    path = snapshot_download(repo_id, allow_patterns=[*patterns, "*.safetensors"])
    if not any(Path(path).glob("*.safetensors")):
        path = snapshot_download(repo_id, allow_patterns=[*patterns, "*.bin"])
    return path


def _load_model(source: str, model_type: str) -> torch.nn.Module:
    from transformers import Owlv2ForObjectDetection, OwlViTForObjectDetection

    classes: dict[str, Any] = {"owlv2": Owlv2ForObjectDetection, "owlvit": OwlViTForObjectDetection}
    if model_type not in classes:
        raise ValueError(f"{source}: not an OWLv2/OWL-ViT checkpoint (model_type={model_type!r})")
    cls = classes[model_type]
    # Both classes declare SDPA support in transformers >= 4.4x (torch's fused attention kernels, flash /
    # memory-efficient on CUDA). Fall back to eager where an older transformers refuses the argument.
    try:
        return cls.from_pretrained(source, attn_implementation="sdpa")
    except (ValueError, ImportError, TypeError) as exc:
        log.warning("SDPA attention unavailable for %s (%s); using eager attention", source, exc)
        return cls.from_pretrained(source, attn_implementation="eager")


class OwlDetector:
    """An OWLv2 (or OWL-ViT) checkpoint ready to encode images into per-box data and texts into query embeddings.

    ``model`` is a Hugging Face id (resolved by transformers' own cache/download logic; set HF_HUB_OFFLINE=1 for
    air-gapped deployments with a pre-filled cache), a local directory written by ``save_pretrained``, or
    ``bentoml:NAME[:VERSION]``, a model ``import_to_store`` put into BentoML's model store (served under the model id
    its source had, so the embedding cache does not depend on where the weights live).
    ``max_batch`` splits one ``encode_images`` call into several vision-tower passes (None: one pass per call); the
    caller's batch size (BentoML's adaptive batching) already bounds it, so it is only a memory guard.
    """

    def __init__(
        self,
        model: str = DEFAULT_DETECTOR_MODEL,
        *,
        top_k: int = 300,
        device: str = "auto",
        fp16: bool = True,
        max_batch: int | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        tag = store_tag(model)
        if tag is not None:
            entry = _open_stored(tag)
            source, self.model_id = str(entry.path), str(entry.metadata["model_id"])
            log.info("detector %s from BentoML's model store (%s)", self.model_id, entry.tag)
        else:
            local = Path(model).expanduser()
            source = str(local.resolve()) if local.is_dir() else model
            self.model_id = model_id_for(model)
        self.top_k = top_k
        self.max_batch = max_batch
        self.device = select_device(device)
        # fp16 only where it is fast and well supported; CPU half matmuls are slow or missing.
        self.dtype = torch.float16 if (fp16 and self.device.type == "cuda") else torch.float32

        config = AutoConfig.from_pretrained(source)
        self.model_type: str = config.model_type
        self.model = _load_model(source, self.model_type).to(self.device, self.dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        try:
            proc = AutoImageProcessor.from_pretrained(source)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError) as exc:
            log.warning("no image processor config in %s (%s); using CLIP mean/std", source, exc)
            mean, std = _CLIP_MEAN, _CLIP_STD
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # The box bias is built for exactly this grid, so the model's own image_size is authoritative.
        self.input_size: int = int(config.vision_config.image_size)
        self.context_length: int = int(config.text_config.max_position_embeddings)
        self.embed_dim: int = int(config.text_config.hidden_size)
        # OWL-ViT (v1) has no objectness head: it keeps every box (top_k does not apply) and reports objectness 1.
        self.has_objectness: bool = hasattr(self.model, "objectness_predictor")
        log.info(
            "detector %s (%s) on %s/%s, input %d px, attention %s",
            self.model_id,
            self.model_type,
            self.device,
            self.dtype,
            self.input_size,
            getattr(self.model.config, "_attn_implementation", "?"),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> OwlDetector:
        return cls(
            settings.detector_model,
            top_k=settings.detector_top_k,
            device=settings.device,
            fp16=settings.fp16,
        )

    # ---------------------------------------------------------------------------------------------------------------
    # Images
    # ---------------------------------------------------------------------------------------------------------------

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Resize (longer side = input size), pad bottom/right to a square, normalise: -> [B, 3, S, S] float32."""
        # Zeros = HF's pad value (0 in [0, 1] pixel space); normalisation turns them into (0 - mean) / std.
        batch = torch.from_numpy(pad_to_square(images, self.input_size))
        return (batch - self._mean) / self._std

    def _encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One vision-tower pass over [B, 3, S, S] -> per-box tensors for all patches (cxcywh boxes in the square)."""
        m = self.model
        feature_map, _ = m.image_embedder(pixel_values=pixels.to(self.device, self.dtype))
        b, gh, gw, d = feature_map.shape
        feats = feature_map.reshape(b, gh * gw, d)
        boxes = m.box_predictor(feats, feature_map)
        # The class head's projection, normalised as Owlv2ClassPredictionHead normalises it before the cosine (HF adds
        # 1e-6 to the norm; a relative 1e-6 difference). class_predictor(feats) without queries would return the same
        # projection but also allocate an unused [B, P, D] zero tensor.
        emb = F.normalize(m.class_head.dense0(feats), dim=-1)
        shift = m.class_head.logit_shift(feats)[..., 0]
        scale = F.elu(m.class_head.logit_scale(feats)[..., 0]) + 1.0  # the head's final scale, as in HF
        # Logits, not probabilities: the top-k ranking must not suffer from sigmoid saturation ties.
        objectness = m.objectness_predictor(feats) if self.has_objectness else torch.full_like(shift, float("inf"))
        return {
            "boxes": boxes,
            "class_embeds": emb,
            "logit_shift": shift,
            "logit_scale": scale,
            "objectness": objectness,
        }

    def encode_images(self, images: list[Image.Image]) -> list[ImageEncoding]:
        """Per image: ``boxes`` [k, 4] xyxy in original pixels, ``class_embeds`` [k, D] (L2-normalised),
        ``logit_shift`` [k], ``logit_scale`` [k], ``objectness`` [k] in [0, 1]; all float32, sorted by objectness.

        k = min(top_k, number of patches) for OWLv2; OWL-ViT keeps all patches.
        """
        if not images:
            return []
        sizes = [im.size for im in images]
        step = self.max_batch or len(images)
        out: list[ImageEncoding] = []
        with torch.inference_mode():
            for start in range(0, len(images), step):
                chunk = images[start : start + step]
                t = self._encode_pixels(self.preprocess(chunk))
                n_boxes = t["objectness"].shape[1]
                k = min(self.top_k, n_boxes) if self.has_objectness else n_boxes
                if self.has_objectness:
                    idx = torch.topk(t["objectness"].float(), k, dim=1, sorted=True).indices  # [B, k]
                else:  # OWL-ViT: every patch, in grid order
                    idx = torch.arange(n_boxes, device=self.device).expand(len(chunk), n_boxes)
                rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
                picked = {name: v[rows, idx].float().cpu() for name, v in t.items()}
                picked["objectness"] = torch.sigmoid(picked["objectness"])
                for j, (w, h) in enumerate(sizes[start : start + len(chunk)]):
                    enc = {name: v[j] for name, v in picked.items()}
                    enc["boxes"] = padded_square_cxcywh_to_xyxy(enc["boxes"], w, h)
                    # Own copies: a view would keep the whole batch's arrays alive in caches and pickles.
                    out.append({name: np.array(v.numpy(), dtype=np.float32) for name, v in enc.items()})
        return out

    # ---------------------------------------------------------------------------------------------------------------
    # Texts
    # ---------------------------------------------------------------------------------------------------------------

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """[N, D] L2-normalised float32 query embeddings, as OWL's forward() feeds text queries to the class head.

        Texts are padded to the model's context (16 tokens for the released models) and longer ones truncated,
        keeping the end-of-text token the pooling reads.
        """
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_tensors="pt",
        )
        base = self.model.base_model  # Owlv2Model / OwlViTModel
        with torch.inference_mode():
            pooled = base.text_model(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            ).pooler_output
            q = F.normalize(base.text_projection(pooled).float(), dim=-1)
        return q.cpu().numpy().astype(np.float32, copy=False)


def load_detector(settings: Settings) -> OwlDetector | None:
    """The configured detector, or None when ``detector_model`` disables it.

    ``random`` builds the full-size OWLv2 base architecture with seeded random weights under the data directory
    (benchmarks and offline smoke runs; predictions are meaningless) and loads it like any local directory.
    """
    if not settings.detector_enabled:
        return None
    if settings.detector_model.strip().lower() == "random":
        from runners.owl_random import random_owl_dir

        local = random_owl_dir(settings.data_dir, settings.random_seed)
        log.warning("detector has RANDOM weights (%s): use it only for tests and benchmarks", local)
        return OwlDetector(str(local), top_k=settings.detector_top_k, device=settings.device, fp16=settings.fp16)
    return OwlDetector.from_settings(settings)
