"""The engine: one awaitable per route (deploy, classify, detect, embed, configs), no HTTP and no BentoML.

It owns the deployments (registry + compiled cache), the text embedders (CLIP's and the detector's, both through the
shared embedding cache) and the encoders (engine/encoders.py: in-process or remote). Blocking work (decoding, SQLite,
compiling, scoring, synchronous encoder calls) runs in worker threads, never on the event loop. What it learns from
the encoders (model ids, preprocessing) it learns lazily: the encoder services may start after the API.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np
from PIL import Image
from prometheus_client import Counter

from cache.embeddings import namespace
from cache.interfaces import DeploymentStore, StoreUnavailable, VectorStore
from engine.admission import Admission, Refused
from engine.configs import (
    SCHEMAS,
    DeployLimits,
    DeployRequest,
    Kind,
    TooManyPrompts,
    check_classes,
    check_limits,
    example_texts,
    kind_of,
)
from engine.deployments import Compiled, DeploymentInfo, Deployments, DeployOutcome
from engine.embedder import EmbedStats, Progress, TextEmbedder
from engine.encoders import DetectorEncoder, ImageEncoder, TextEncoder
from engine.exemplars import ImageEmbedder, has_images
from engine.jobs import FAILED, Job, Jobs
from engine.kinds import KINDS, Classification, ClassifierKind, CompiledDetector, Detection, DetectorKind
from engine.tenancy import Tenant
from errors import Invalid, Unavailable
from imaging import device_decode
from imaging.budget import PixelBudget
from imaging.decode import decode_image
from imaging.geometry import shrink_to
from imaging.preprocess import Preprocess
from imaging.sources import ImageLimits, ImageSource, load_image, source_bytes
from semantic.classify import CompiledClassifier
from semantic.detect import QUERY_RULE_VERSION
from semantic.templates import CLIP_TEMPLATES
from semantic.templates_detect import DETECTION_TEMPLATE_VERSION, DETECTION_TEMPLATES
from settings import LimitedLog, Settings

log = logging.getLogger(__name__)

# What the image encoder is given: uint8 pixels decoded here, or JPEG bytes it decodes on its device.
Prepared = np.ndarray | list[bytes]

EXAMPLES_ENCODED = Counter("zss_text_examples_encoded", "Example texts encoded (embedding-cache misses)")
CACHE_HITS = Counter("zss_embedding_cache_hits", "Example texts found in the embedding cache")
CACHE_MISSES = Counter("zss_embedding_cache_misses", "Example texts missing from the embedding cache")
IMAGE_EXAMPLES_ENCODED = Counter("zss_image_examples_encoded", "Image examples encoded (embedding-cache misses)")
IMAGE_EXAMPLE_HITS = Counter("zss_image_example_cache_hits", "Image examples found in the embedding cache")
IMAGE_REQUESTS_REFUSED = Counter(
    "zss_image_requests_refused", "Image requests refused before decoding: not answerable within the latency bound"
)

P = ParamSpec("P")
T = TypeVar("T")


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run blocking work in a worker thread; a shared store that cannot be reached (Redis down) is a 503."""
    try:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
    except StoreUnavailable as exc:
        raise Unavailable(f"{exc} (retry later)") from exc


def _record_images(stats: EmbedStats) -> None:
    IMAGE_EXAMPLE_HITS.inc(stats.hits)
    IMAGE_EXAMPLES_ENCODED.inc(stats.examples_encoded)


def _record(stats: EmbedStats) -> None:
    CACHE_HITS.inc(stats.hits)
    CACHE_MISSES.inc(stats.misses)
    EXAMPLES_ENCODED.inc(stats.examples_encoded)


class Engine:
    def __init__(
        self,
        settings: Settings,
        *,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        detector: DetectorEncoder,
        registry: DeploymentStore,
        cache: VectorStore,
    ) -> None:
        self.settings = settings
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.detector = detector
        self.cache = cache
        self.deployments = Deployments(registry, self._compile, max_bytes=settings.compiled_cache_mb * 2**20)
        self.limits = ImageLimits(
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_body_bytes,
            allow_url_fetch=settings.allow_url_fetch,
            url_allow_hosts=settings.url_allow_hosts,
            url_allow_networks=settings.url_allow_networks,
            url_timeout_s=settings.url_timeout_s,
            budget=PixelBudget(int(settings.decode_budget_mp * 1_000_000), settings.decode_wait_s),
        )
        self._warm_up: asyncio.Task[None] | None = None  # start_warm_up's task; readiness waits until it is done
        self._lock = threading.Lock()  # guards the lazily learned fields below
        self._embedder: TextEmbedder | None = None
        self._det_embedder: TextEmbedder | None = None
        self._det_info: dict[str, Any] | None = None
        self._preprocess: Preprocess | None = None
        self._image_embedder: ImageEmbedder | None = None
        self._det_image_embedder: ImageEmbedder | None = None
        job_store = registry if hasattr(registry, "put_job") else None  # both registries keep jobs (issue 32)
        self.jobs = Jobs(per_tenant=settings.deploy_max_jobs_per_tenant, store=job_store)  # type: ignore[arg-type]
        self.deploy_limits = DeployLimits.from_settings(settings)
        self.admission = Admission(settings.image_max_latency_ms / 1000)
        # /detect: the same bound, on the detector's own measured rate and fastest answer.
        self.detect_admission = Admission(settings.image_max_latency_ms / 1000)
        self._refused_log = LimitedLog(log)  # expected under overload: a WARNING line now and then

    # -- learned lazily from the encoders -------------------------------------------------------------------------
    def text_embedder(self) -> TextEmbedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = TextEmbedder(
                    self.cache, self.text_encoder.info()["model_id"], self.text_encoder.encode, on_lookup=_record
                )
            return self._embedder

    def preprocess(self) -> Preprocess:
        with self._lock:
            if self._preprocess is None:
                self._preprocess = Preprocess.from_open_clip(self.image_encoder.info()["preprocess"])
            return self._preprocess

    def sigmoid_logits(self) -> tuple[float, float] | None:
        """The CLIP model's (logit scale, logit bias) when it has probabilities (SigLIP), else None."""
        info = self.image_encoder.info()
        if info.get("logit_bias") is None:
            return None
        return float(info["logit_scale"]), float(info["logit_bias"])

    def detector_info(self) -> dict[str, Any]:
        """The detector's info; 503 with the reason when this server has no detector."""
        with self._lock:
            if self._det_info is None or not self._det_info.get("enabled"):
                self._det_info = self.detector.info()
            info = self._det_info
        if not info.get("enabled"):
            raise Unavailable(f"Detection is unavailable: {info.get('error')}.")
        return info

    def detector_embedder(self) -> TextEmbedder:
        info = self.detector_info()
        with self._lock:
            if self._det_embedder is None:
                self._det_embedder = TextEmbedder(
                    self.cache,
                    info["model_id"],
                    self.detector.encode_texts,
                    templates=DETECTION_TEMPLATES,
                    template_version=DETECTION_TEMPLATE_VERSION,
                    on_lookup=_record,
                )
            return self._det_embedder

    def image_embedder(self) -> ImageEmbedder:
        """A classifier's image examples through CLIP's image tower and the shared cache (engine/exemplars.py)."""
        pre = self.preprocess()
        with self._lock:
            if self._image_embedder is None:
                self._image_embedder = ImageEmbedder.for_clip(
                    self.cache,
                    self.image_encoder.info()["model_id"],
                    pre,
                    lambda pixels: self._blocking(self.image_encoder.encode_pixels, pixels),
                    self.limits,
                    on_lookup=_record_images,
                )
            return self._image_embedder

    def detector_image_embedder(self) -> ImageEmbedder:
        """A detector's image examples as OWL query embeddings (image-guided detection), through the shared cache."""
        info = self.detector_info()
        side = int(info["input_size"])

        def encode(images: list[Image.Image]) -> np.ndarray:
            shrunk = [shrink_to(im, side)[0] for im in images]
            encodings = self._blocking(self.detector.encode_images, shrunk)
            return np.stack([DetectorKind.image_query(e, im.size) for e, im in zip(encodings, shrunk)])

        with self._lock:
            if self._det_image_embedder is None:
                ns = namespace(info["model_id"], f"image-query-{QUERY_RULE_VERSION}-{side}")
                self._det_image_embedder = ImageEmbedder(self.cache, ns, encode, self.limits, on_lookup=_record_images)
            return self._det_image_embedder

    @staticmethod
    def _blocking(fn: Callable[[Any], Awaitable[T]], arg: Any) -> T:
        """An awaitable encoder call from blocking code: through the event loop that started this worker thread (a
        route), or on an event loop of its own (the folder tool, which compiles outside any loop)."""
        try:
            return anyio.from_thread.run(fn, arg)
        except RuntimeError as exc:
            if "worker thread" not in str(exc) and "event loop" not in str(exc):
                raise
            return anyio.run(fn, arg)

    def _compile(self, kind: Kind, body: DeployRequest, progress: Progress | None = None) -> Compiled:
        # Detector examples are embedded by the detector's own towers (image examples as OWL image queries),
        # classifier examples by CLIP's (image examples by its image tower). Progress counts the texts.
        if kind is Kind.DETECTOR:
            embedder = self.detector_embedder()
            images = self.detector_image_embedder() if has_images(body.classes) else None
        else:
            embedder = self.text_embedder()
            images = self.image_embedder() if has_images(body.classes) else None
        if progress is not None:
            embedder = embedder.with_progress(progress)
        if kind is Kind.CLASSIFIER:
            return ClassifierKind.compile(body, embedder, images, self.sigmoid_logits())  # type: ignore[arg-type]
        return KINDS[kind].compile(body, embedder, images)  # type: ignore[arg-type]

    # -- images -----------------------------------------------------------------------------------------------------
    def _pixels(self, sources: list[ImageSource]) -> np.ndarray:
        pre = self.preprocess()
        return np.stack([pre.to_pixels(load_image(s, self.limits, pre.draft_size)) for s in sources])

    def _prepare(self, sources: list[ImageSource]) -> Prepared:
        """What the image encoder gets for ``sources``: with ZSS_DEVICE_DECODE, the JPEG bytes when every image can be
        decoded on the encoder's device (imaging/device_decode.py); else uint8 pixels decoded here. An unreadable
        image raises here (422), before anything else is looked at."""
        if not self.settings.device_decode:
            return self._pixels(sources)
        pre = self.preprocess()
        datas = [source_bytes(s, self.limits) for s in sources]  # a URL is fetched once, whichever path it takes
        if all(device_decode.eligible(d, self.limits.max_pixels, pre) for d in datas):
            return datas
        return self._decode_bytes(datas)

    def _decode_bytes(self, datas: list[bytes]) -> np.ndarray:
        pre, lim = self.preprocess(), self.limits
        decode = lambda d: decode_image(d, max_pixels=lim.max_pixels, draft_size=pre.draft_size, budget=lim.budget)  # noqa: E731
        return np.stack([pre.to_pixels(decode(d)) for d in datas])

    async def _encode(self, prepared: Prepared, t0: float) -> np.ndarray:
        """``_prepare``'s result -> image vectors. JPEGs the device cannot decode take the CPU path, which words the
        error a client gets exactly as without ZSS_DEVICE_DECODE."""
        if isinstance(prepared, list):
            out = await self.image_encoder.encode_jpegs(prepared, time.monotonic() - t0)
            if out is not None:
                return out
            prepared = await in_thread(self._decode_bytes, prepared)
        return await self.image_encoder.encode_pixels(prepared, time.monotonic() - t0)

    def _for_detector(self, sources: list[ImageSource], side: int) -> list[tuple[Image.Image, float, float]]:
        # Shrunk so the longer side is at most the detector's input size: less to send and to pad.
        return [shrink_to(load_image(s, self.limits), side) for s in sources]

    def compile(self, body: DeployRequest) -> Compiled:
        """Compile a deploy body without registering it (blocking; the folder tool scores with it)."""
        check_classes(body)
        return self._compile(kind_of(body), body)

    def close(self) -> None:
        """Write the cache's snapshot and checkpoint its log, so the next process starts warm."""
        self.cache.close()
        self.deployments.store.close()

    # -- the routes' work -------------------------------------------------------------------------------------------
    # Every call on deployments names its caller (engine/tenancy.py): another tenant's id is an unknown id.
    async def deploy(self, body: DeployRequest, *, caller: Tenant) -> DeployOutcome:
        """Embed every example now (once, through the cache), then register: a deployed id always scores. Runs as
        a job (engine/jobs.py) that finishes even if the caller stops waiting."""
        return await self.jobs.wait(await self.start_deploy(body, caller=caller))

    async def start_deploy(self, body: DeployRequest, *, caller: Tenant) -> Job:
        """The deploy as a job, started now and recorded in the job store before this returns; a body that cannot
        deploy is refused here, and so is one over its tenant's jobs in flight (engine/jobs.py ``begin``)."""
        check_classes(body)
        kind = kind_of(body)
        templates = len(DETECTION_TEMPLATES if kind is Kind.DETECTOR else CLIP_TEMPLATES)
        try:
            check_limits(body, self.deploy_limits, templates)
        except TooManyPrompts:  # over the limit counting every text: count those the cache lacks (blocking)
            uncached = await in_thread(self._uncached_texts, kind, body)
            check_limits(body, self.deploy_limits, templates, uncached)

        run = self._deploy_run(kind, body, caller)
        return await self.jobs.begin(kind.value, caller, run, body.model_dump(mode="json"))

    def _uncached_texts(self, kind: Kind, body: DeployRequest) -> int:
        """How many distinct example texts of ``body`` its deploy would encode now (the embedding cache's misses)."""
        embedder = self.detector_embedder() if kind is Kind.DETECTOR else self.text_embedder()
        return len(embedder.cache.uncached(embedder.namespace(body.augment_examples), example_texts(body)))

    def _deploy_run(
        self, kind: Kind, body: DeployRequest, caller: Tenant, resumed: bool = False
    ) -> Callable[[Progress], Awaitable[DeployOutcome]]:
        async def run(progress: Progress) -> DeployOutcome:
            if resumed:  # at start: the encoder services may not answer yet
                await self._encoders_answer(kind, body, progress)
            compiled = await in_thread(self._compile, kind, body, progress)
            return await in_thread(self.deployments.register, body, compiled, caller=caller)

        return run

    async def _encoders_answer(self, kind: Kind, body: DeployRequest, progress: Progress, limit_s: float = 600) -> None:
        def ready() -> None:
            if kind is Kind.DETECTOR:
                self.detector_embedder()
            else:
                self.text_embedder()
                if has_images(body.classes):
                    self.preprocess()

        deadline = time.monotonic() + limit_s
        while True:
            try:
                return await in_thread(ready)
            except Exception:
                progress.check()  # a cancel (or the server stopping) while waiting
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)

    def resume_jobs(self) -> int:
        """Take over the running deploy jobs of dead processes (engine/jobs.py) and run them again from their bodies;
        how many. Call with an event loop running (a service's constructor): the store is read in this thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return 0
        try:
            abandoned = self.jobs.abandoned()
        except Exception as exc:  # a shared store down at start: the server starts anyway (503 until it is back)
            log.warning("unfinished deploy jobs not resumed: the job store is unavailable (%s)", exc)
            return 0
        resumed = 0
        for rec in abandoned:
            job = Job.from_record(rec)
            job.progress = Progress()
            try:
                kind = Kind(job.kind)
                body = SCHEMAS[kind].model_validate(job.body)
            except Exception as exc:  # a record this version cannot read: ended, not retried at every start
                job.state, job.message, job.status_code, job.finished_at = (
                    FAILED,
                    f"not resumable: {exc}",
                    500,
                    time.time(),
                )
                self.jobs.save(job)
                continue
            caller = Tenant(job.tenant, job.admin)
            self.jobs.start(kind.value, caller, self._deploy_run(kind, body, caller, resumed=True), job=job)
            log.info("resumed deploy job %s (%s of tenant %s)", job.job_id, kind.value, job.tenant)
            resumed += 1
        return resumed

    async def classify(
        self, deployed_id: str, sources: list[ImageSource], *, caller: Tenant, arrived: float | None = None
    ) -> list[Classification]:
        """``arrived``: when the request arrived (``time.monotonic()``); given, the image latency bound applies."""
        async with self._admitted(len(sources), arrived) as t0:
            prepared = await in_thread(self._prepare, sources)  # an unreadable image is 422 whatever the id (DirectAI)
            clf: CompiledClassifier = await in_thread(
                self.deployments.compiled, deployed_id, Kind.CLASSIFIER, caller=caller
            )
            emb = await self._encode(prepared, t0)
        return await in_thread(ClassifierKind.score, emb, clf)

    async def detect(
        self, deployed_id: str, sources: list[ImageSource], *, caller: Tenant, arrived: float | None = None
    ) -> list[list[Detection]]:
        """``arrived``: as for :meth:`classify` (the detector's own admission)."""
        info = await in_thread(self.detector_info)
        async with self._admitted(len(sources), arrived, self.detect_admission):
            decoded = await in_thread(self._for_detector, sources, int(info["input_size"]))
            det: CompiledDetector = await in_thread(
                self.deployments.compiled, deployed_id, Kind.DETECTOR, caller=caller
            )
            encodings = await self.detector.encode_images([d[0] for d in decoded])

        def score() -> list[list[Detection]]:
            return [DetectorKind.score(e, det, (sx, sy)) for e, (_, sx, sy) in zip(encodings, decoded)]

        return await in_thread(score)

    async def embed_texts(self, texts: list[str], augment: bool) -> np.ndarray:
        """Text embeddings exactly as classifiers use them (cached; templates averaged when ``augment``)."""
        if any(not t.strip() for t in texts):
            raise Invalid("Texts must not be empty.")
        if not texts:
            return np.zeros((0, 0), np.float32)

        def embed() -> np.ndarray:
            return self.text_embedder().embed(texts, augment)[0]

        return await in_thread(embed)

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the text tower reads them (OpenAI's ``usage``; nothing is cached)."""
        return await in_thread(self.text_encoder.count_tokens, texts) if texts else []

    async def embed_images(self, sources: list[ImageSource], *, arrived: float | None = None) -> np.ndarray:
        """``arrived``: as for :meth:`classify`."""
        async with self._admitted(len(sources), arrived) as t0:
            return await self._encode(await in_thread(self._prepare, sources), t0)

    @asynccontextmanager
    async def _admitted(
        self, n: int, arrived: float | None, admission: Admission | None = None
    ) -> AsyncIterator[float]:
        """Wait for admission (engine/admission.py) when the request's arrival is known; yields the time the latency
        bound counts from. The time before the encoder (waiting here, decoding, which grows under load as decode
        threads queue) counts towards the encoder's bound too."""
        if arrived is None or n == 0:
            yield time.monotonic()
            return
        try:
            async with (admission or self.admission).admit(n, arrived):
                yield arrived
        except Refused:
            IMAGE_REQUESTS_REFUSED.inc()
            self._refused_log.warning("image request refused: not answerable within the latency bound now")
            raise

    async def model_config(self, deployed_id: str, *, caller: Tenant) -> dict[str, Any]:
        return await in_thread(self.deployments.config, deployed_id, caller=caller)

    async def list_deployments(self, *, caller: Tenant) -> list[DeploymentInfo]:
        return await in_thread(self.deployments.list, caller=caller)

    async def delete(self, deployed_id: str, *, caller: Tenant) -> None:
        await in_thread(self.deployments.delete, deployed_id, caller=caller)

    def start_warm_up(self, give_up_s: float = 600.0) -> None:
        """Train the remote text encoder's batching (engine/encoders.py) in a task on the running event loop,
        retrying while the encoder starts; readiness waits for it, and never longer than ``give_up_s`` (then the first
        deploy just pays the training waits). An in-process encoder has nothing to train, nor has an engine without
        an event loop (a script)."""
        train = getattr(self.text_encoder, "train_batching", None)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if train is None:
            return
        self._warm_up = loop.create_task(self._train_batching(train, give_up_s))

    async def _train_batching(self, train: Callable[[], Awaitable[None]], give_up_s: float) -> None:
        deadline = time.monotonic() + give_up_s
        failures = 0
        while True:
            try:
                await train()
                log.info("the text encoder's batching is trained")
                return
            except Exception as exc:  # noqa: BLE001 - a starting encoder answers with all kinds of errors
                failures += 1
                if time.monotonic() > deadline:
                    log.warning("gave up training the text encoder's batching: %s: %s", type(exc).__name__, exc)
                    return
                if failures % 20 == 1:  # the first and then every 10 s: why readiness still waits
                    log.info("training the text encoder's batching: %s: %s (retrying)", type(exc).__name__, exc)
                await asyncio.sleep(0.5)

    def unready(self) -> str | None:
        """Why this server cannot serve deployments now (a shared store unreachable, the text encoder's batching still
        warming up), or None (blocking: readiness)."""
        if self._warm_up is not None and not self._warm_up.done():  # done() only reads the task's state
            return "the text encoder's batching is warming up"
        for store in (self.deployments.store, self.cache):
            ping = getattr(store, "ping", None)  # only shared stores can be unreachable; local ones have no ping
            if ping is not None:
                try:
                    ping()
                except StoreUnavailable as exc:
                    return str(exc)
        return None

    def models_info(self) -> dict[str, Any]:
        """The loaded models' ids and preprocessing (blocking; the API runs it in a thread)."""
        return {"image": self.image_encoder.info(), "text": self.text_encoder.info(), "detector": self.detector.info()}
