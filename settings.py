"""One typed settings object, read from environment variables with the prefix ``ZSS_``.

Every process of the service (API workers, encoder workers, the batch tool) calls ``get_settings()``; nothing is read
at import time, so tests can change the environment before a service starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

PREFIX = "ZSS_"


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class Settings:
    # open_clip model name (e.g. ViT-B-32) or a path to an open_clip model-config JSON.
    clip_model: str = "ViT-B-32"
    # open_clip pretrained tag, a path to a local checkpoint, or "random" (seeded random weights).
    clip_pretrained: str = "laion2b_s34b_b79k"
    # Hugging Face id or local directory of an OWLv2 / OWL-ViT model; "none" disables the detector.
    detector_model: str = "google/owlv2-base-patch16-ensemble"
    # Boxes kept per image by objectness before scoring.
    detector_top_k: int = 300
    # Adaptive batching of the detector's image side.
    detector_max_batch_size: int = 8
    # Where the deployment registry and the embedding cache live.
    data_dir: Path = Path("./.zss")
    # "cpu", "cuda", or "auto" (cuda when available).
    device: str = "auto"
    # Half precision on CUDA (ignored on CPU).
    fp16: bool = True
    # "none", or "int8": dynamic int8 quantisation of the CLIP towers' Linear layers (CPU only; see BENCHMARKS.md for
    # its speed and accuracy). The model id, and so the embedding cache, differs from the float model's.
    clip_quantize: str = "none"
    # Seed for "random" weights, so every worker of a random model holds the same weights.
    random_seed: int = 0
    # Batching of the image encoder (runners/batcher.py): rows per forward pass; requests queued longer than the
    # latency bound get a 503 instead of a late answer; lanes (model threads; 0 = 1 on a GPU, min(2, CPU quota) on a
    # CPU); how long a free lane may wait for its share of the queue while another lane is busy (0: never; at 16
    # clients a 30 ms hold changed nothing measurable, BENCHMARKS.md).
    image_max_batch_size: int = 64
    image_max_latency_ms: int = 20000
    image_lanes: int = 0
    image_batch_hold_ms: float = 0.0
    # Adaptive batching (BentoML's) of the text encoder.
    text_max_batch_size: int = 512
    text_max_latency_ms: int = 60000
    # torch threads per encoder worker (per lane of the image encoder); 0 = derive from the CPU quota the process
    # really has.
    torch_threads: int = 0
    # Image limits (issue 5): pixels of a decoded image, bytes of a request body.
    max_image_pixels: int = 64_000_000
    max_body_bytes: int = 32 * 1024 * 1024
    # Server-side fetching of image URLs: off unless enabled; comma-separated host allow-list ("" = any public host).
    allow_url_fetch: bool = False
    url_allow_hosts: str = ""
    url_timeout_s: float = 10.0
    # Log level of the project's loggers.
    log_level: str = "INFO"

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.sqlite3"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "embeddings"

    @property
    def detector_enabled(self) -> bool:
        return self.detector_model.strip().lower() not in {"", "none", "off"}


def get_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build settings from ``ZSS_*`` variables; unknown values raise ValueError naming the variable."""
    env = os.environ if environ is None else environ
    kwargs: dict[str, object] = {}
    for f in fields(Settings):
        name = PREFIX + f.name.upper()
        if name not in env:
            continue
        raw = env[name]
        try:
            if f.type in ("bool", bool):
                kwargs[f.name] = _bool(raw)
            elif f.type in ("int", int):
                kwargs[f.name] = int(raw)
            elif f.type in ("float", float):
                kwargs[f.name] = float(raw)
            elif f.type in ("Path", Path):
                kwargs[f.name] = Path(raw)
            else:
                kwargs[f.name] = raw
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
    return Settings(**kwargs)  # type: ignore[arg-type]


# The project's loggers that follow ZSS_LOG_LEVEL: its packages' (named after their modules) and the API's "zss.api".
PROJECT_LOGGERS = ("runners", "cache", "semantic", "tools", "zss")


def configure_logging(settings: Settings) -> None:
    """Apply ZSS_LOG_LEVEL to the project's loggers in this process (BentoML leaves the root logger at WARNING)."""
    level = logging.getLevelName(settings.log_level.strip().upper())
    if not isinstance(level, int):
        raise ValueError(f"ZSS_LOG_LEVEL: unknown level {settings.log_level!r}")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
