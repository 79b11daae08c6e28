"""One typed settings object, read from environment variables with the prefix ``ZSS_`` (pydantic-settings).

Each process of the service (API worker, encoder workers, the folder tool) reads it once, in its constructor, with
``get_settings()``, and passes it down; the only reads at import time are the few values BentoML decorator arguments
and model references need (runners/clip_service.py and runners/owl_service.py say which). Tests change the environment
before a service starts, or build ``Settings(...)`` / ``get_settings({...})`` directly.

The services also take ``ZSS_*`` values from a bento's arguments (``bentoml build --arg ZSS_X=...``, stored in the
bento): ``get_settings(fallback=...)`` reads those under the environment, so an environment variable always wins.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "ZSS_"
# ZSS_BACKEND's values (runners/backends.py implements them).
BACKENDS = ("auto", "torch", "onnx", "openvino")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore")

    # open_clip model name (e.g. ViT-B-32), a path to an open_clip model-config JSON, or "bentoml:NAME[:VERSION]", a
    # model imported into BentoML's model store (python -m tools.models clip), which holds config, weights and
    # preprocessing (clip_pretrained is then not read).
    clip_model: str = "ViT-B-32"
    # open_clip pretrained tag, a path to a local checkpoint, or "random" (seeded random weights).
    clip_pretrained: str = "laion2b_s34b_b79k"
    # Hugging Face id or local directory of an OWLv2 / OWL-ViT model, "bentoml:NAME[:VERSION]" (a model imported into
    # BentoML's model store with python -m tools.models detector), "random", or "none" (disables the detector).
    detector_model: str = "google/owlv2-base-patch16-ensemble"
    # Boxes kept per image by objectness before scoring.
    detector_top_k: int = 300
    # Adaptive batching of the detector's image side.
    detector_max_batch_size: int = 8
    # Where the deployment registry and the embedding cache live.
    data_dir: Path = Path("./.zss")
    # Several replicas (README "Several replicas"): "" = the registry and the embedding cache on this machine only
    # (SQLite + FAISS under data_dir); a Redis URL (redis://host:6379/0) = the registry and the example vectors shared
    # there by every replica, each keeping a local read-through copy of the vectors under data_dir. The timeouts bound
    # how long a request waits on an unreachable Redis before its 503 (one reconnect is tried: at most ~2x each).
    redis_url: str = ""
    redis_connect_timeout_s: float = 0.5
    redis_timeout_s: float = 0.5
    # Prefix of every key the server writes in Redis (several deployments of the server can share one Redis).
    redis_prefix: str = "zss:"
    # "cpu", "cuda", or "auto" (cuda when available).
    device: str = "auto"
    # Half precision on CUDA (ignored on CPU).
    fp16: bool = True
    # The image encoder decodes JPEGs itself, on its device (nvJPEG on a GPU; imaging/device_decode.py): the API
    # sends the encoded bytes of eligible JPEGs instead of decoding and resizing them. Meant for a GPU encoder.
    device_decode: bool = False
    # Page-locked host memory for the pixels copied to a GPU (asynchronous copies); ignored on a CPU.
    pin_memory: bool = False
    # "none" (float32), "bf16" (OpenVINO, on a CPU with native bf16 only) or "int8": int8 quantisation, CPU only
    # (dynamic in torch and ONNX Runtime, static and calibrated in OpenVINO's image tower; see BENCHMARKS.md for speed
    # and accuracy). The model id, and so the embedding cache, differs from the float model's for bf16 and int8.
    clip_quantize: str = "none"
    # A folder of the user's own images that calibrates OpenVINO's static int8 image tower (the first 32 by name);
    # unset: a built-in synthetic set (imaging/calibration.py). A folder's images are part of the model id.
    clip_int8_calibration: Path | None = None
    # Runtime of the CLIP image tower (runners/backends.py): "torch", "onnx" (ONNX Runtime), "openvino" (CPU only), or
    # "auto": the fastest backend measured whose vectors match torch's (CPU: openvino for the image tower, onnx for the
    # text tower; GPU: torch). ONNX Runtime and OpenVINO export the tower once, at the first start, under
    # data_dir/exports.
    backend: str = "auto"
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
    # Megapixels one worker decodes at once (imaging/budget.py): a decode waits up to decode_wait_s for its share,
    # then 503 with Retry-After. An image larger than the budget waits to run alone.
    decode_budget_mp: float = 128.0
    decode_wait_s: float = 10.0
    # Requests that never finish arriving (api/connections.py): the request head must arrive within header_timeout_s
    # of the connection (or of the previous answer), and a body must not stall for body_timeout_s; else 408 and the
    # connection closes. 0 turns a limit off.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # A body must also arrive at body_min_rate bytes/s on average once body_grace_s have passed since its head (a
    # client trickling a byte every few seconds is never idle long enough for body_timeout_s): else 408. 0: off.
    body_min_rate: float = 500.0
    body_grace_s: float = 10.0
    # SIGTERM: a worker still running this long after it is told to stop is killed, and `bentoml serve` exits
    # (runners/bentoml_internals.py stop_promptly; Docker's and Kubernetes' default grace periods are 10 and 30 s).
    stop_timeout_s: float = 7.0
    # Server-side fetching of image URLs: off unless enabled; comma-separated host allow-list ("" = any public host).
    allow_url_fetch: bool = False
    url_allow_hosts: str = ""
    # Comma-separated addresses or CIDR networks trusted although not public (an internal image store), e.g.
    # "10.1.2.0/24"; cloud-metadata addresses stay refused even inside them.
    url_allow_networks: str = ""
    url_timeout_s: float = 10.0
    # Log level of the project's loggers.
    log_level: str = "INFO"
    # Deploy limits (issue 32), each over it a 4xx naming the setting: characters per example text (refused, not
    # truncated: the tokenizer would silently cut it at the model's context, 77 tokens for CLIP), examples per class
    # (texts and images, both lists), classes, prompts encoded (texts, x80 CLIP or x7 OWL templates when augmented),
    # and deploy jobs running at once per tenant (per API worker; 429).
    deploy_max_example_chars: int = 1000
    deploy_max_examples_per_class: int = 1000
    deploy_max_classes: int = 2000
    deploy_max_prompts: int = 100_000
    deploy_max_jobs_per_tenant: int = 8
    # Compiled deployments kept per API worker (least recently used dropped first), by the bytes their tensors hold.
    compiled_cache_mb: int = 256
    # API keys (api/keys.py): "" = no keys, every caller sees everything (today's behaviour); otherwise a path to a
    # file of "key tenant [admin]" lines, re-read when it changes, or a comma-separated "key:tenant[:admin]" list.
    api_keys: str = ""
    # Requests per second allowed per API key (a token bucket; 0 = no limit) and its burst (0 = the rate, at least 1).
    rate_limit_rps: float = 0.0
    rate_limit_burst: int = 0
    # With API keys: /metrics only for an admin key (it shows every tenant's counters); False leaves it open.
    metrics_require_key: bool = False
    # With API keys: invalid keys allowed per client address in a window (a token bucket of this size refilled over
    # the window; 0 = no limit); past it that address's invalid keys get 429 + Retry-After instead of 401. With
    # ZSS_REDIS_URL this budget and the per-key rate limits are shared by every worker and replica.
    auth_failure_limit: int = 30
    auth_failure_window_s: float = 60.0
    # Proxies (addresses or networks, comma-separated) whose X-Forwarded-For names the client address; "" = trust no
    # header, the connection's peer is the client.
    trusted_proxies: str = ""
    # Collections (README "Collections"): exact nearest-neighbour search up to this many vectors in a collection, a
    # FAISS inverted file above it, probing at least this many lists per query (more where the index's calibration
    # on the stored vectors needs them for recall@10 >= 0.97; BENCHMARKS.md).
    collection_exact_max: int = 100_000
    collection_nprobe: int = 16
    # "" = the embedded SQLite file above; a postgresql:// URL = a PostgreSQL database with pgvector that several
    # replicas share (cache/pg_collections.py): search in SQL, an HNSW index above collection_exact_max vectors,
    # searched with at least this hnsw.ef_search (more where its calibration needs it for recall@10 >= 0.97).
    collection_url: str = ""
    collection_ef_search: int = 200
    # Each added image keeps a thumbnail (JPEG, longer side at most this many pixels; a few kB) for the web page's
    # results (GET /collections/{name}/items/{id}/thumbnail); 0 = none.
    collection_thumbnail_px: int = 128

    @field_validator("rate_limit_rps", "rate_limit_burst", "auth_failure_limit")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if not value >= 0:  # NaN too
            raise ValueError("must be 0 (off) or more")
        return value

    @field_validator("decode_budget_mp")
    @classmethod
    def _budget(cls, value: float) -> float:
        if not value > 0:  # NaN too
            raise ValueError("must be more than 0 megapixels")
        return value

    @field_validator("stop_timeout_s")
    @classmethod
    def _stop_timeout(cls, value: float) -> float:
        if not value > 0:  # NaN too
            raise ValueError("must be more than 0 seconds")
        return value

    @field_validator("header_timeout_s", "body_timeout_s", "decode_wait_s", "body_min_rate", "body_grace_s")
    @classmethod
    def _seconds_or_off(cls, value: float) -> float:
        if not value >= 0:  # NaN too
            raise ValueError("must be 0 (off) or more seconds")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be empty or a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("collection_url")
    @classmethod
    def _collection_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be empty (SQLite in the data dir) or a postgresql:// URL")
        return value

    @field_validator("collection_thumbnail_px")
    @classmethod
    def _thumbnail_px(cls, value: int) -> int:
        if not 0 <= value <= 512:
            raise ValueError("must be 0 (no thumbnails) to 512 pixels")
        return value

    @field_validator("collection_ef_search")
    @classmethod
    def _ef_search(cls, value: int) -> int:
        if not 1 <= value <= 1000:
            raise ValueError("must be between 1 and 1000 (pgvector's range)")
        return value

    @field_validator("redis_connect_timeout_s", "redis_timeout_s")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:  # NaN too
            raise ValueError("must be more than 0 seconds")
        return value

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value.strip().lower() not in BACKENDS:
            raise ValueError(f"must be one of {', '.join(BACKENDS)}")
        return value.strip().lower()

    @field_validator("auth_failure_window_s")
    @classmethod
    def _window(cls, value: float) -> float:
        if not (value > 0 and math.isfinite(value)):  # NaN too
            raise ValueError("must be more than 0 seconds")
        return value

    @field_validator("url_allow_networks", "trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for item in value.split(","):
            if item.strip():
                ipaddress.ip_network(item.strip(), strict=False)  # ValueError names the bad entry
        return value

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.sqlite3"

    @property
    def collections_path(self) -> Path:
        return self.data_dir / "collections.sqlite3"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "embeddings"

    @property
    def detector_enabled(self) -> bool:
        return self.detector_model.strip().lower() not in {"", "none", "off"}


def get_settings(environ: Mapping[str, str] | None = None, *, fallback: Mapping[str, object] | None = None) -> Settings:
    """Settings from the process environment, or from ``environ`` alone (``ZSS_*`` keys); a bad value raises a
    ValueError naming the variable.

    ``fallback`` (``ZSS_*`` keys, e.g. a bento's arguments) fills in what the environment does not set."""
    try:
        if environ is None and not fallback:
            return Settings()
        if environ is None:
            environ = {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(PREFIX)}
        if fallback:
            environ = {**{k.upper(): str(v) for k, v in fallback.items()}, **environ}
        values = {k[len(PREFIX) :].lower(): v for k, v in environ.items() if k.startswith(PREFIX)}
        known = {k: v for k, v in values.items() if k in Settings.model_fields}
        return Settings.model_validate(known)  # model_validate reads no environment source
    except ValidationError as exc:
        problems = "; ".join(
            f"{PREFIX}{'_'.join(str(p) for p in e['loc']).upper()}={e.get('input')!r}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"invalid settings: {problems}") from None


# The project's loggers that follow ZSS_LOG_LEVEL: its packages' (named after their modules) and the API's "zss.api".
PROJECT_LOGGERS = ("api", "engine", "imaging", "runners", "cache", "semantic", "tools", "zss")


def configure_logging(settings: Settings) -> None:
    """Apply ZSS_LOG_LEVEL to the project's loggers in this process (BentoML leaves the root logger at WARNING)."""
    level = logging.getLevelName(settings.log_level.strip().upper())
    if not isinstance(level, int):
        raise ValueError(f"ZSS_LOG_LEVEL: unknown level {settings.log_level!r}")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)


class LimitedLog:
    """A warning logged at most once per ``interval_s``, with the count of those suppressed since: expected events
    that come in floods (an overloaded encoder shedding requests) must not flood the log."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> bool:
        """Log (True) or count (False) one occurrence."""
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.interval_s:
                self._suppressed += 1
                return False
            self._last, suppressed, self._suppressed = now, self._suppressed, 0
        more = f" (and {suppressed} more in the last {self.interval_s:g} s)" if suppressed else ""
        self.logger.warning(msg + more, *args)
        return True
