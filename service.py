"""ZeroShot Server's HTTP API: DirectAI-compatible routes plus embedding routes. HTTP only.

Model work happens in the encoder services (runners/clip_service.py, composed with ``bentoml.depends``); storage in
cache/; scoring in semantic/ through runners/engine.py. Blocking work (image decoding, SQLite, scoring) runs in worker
threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import aiohttp
import anyio.to_thread
import bentoml
import numpy as np
import torch
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cache.embeddings import EmbeddingCache
from cache.registry import Registry
from runners.clip import Preprocess
from runners.clip_service import ClipImageEncoder, ClipTextEncoder
from runners.engine import (
    CompiledDetector,
    EmbedStats,
    TextEmbedder,
    compile_classes,
    compile_detector,
    parse_classes,
    score_detections,
    score_images,
)
from runners.images import ImageInputError, decode_base64_image, decode_image
from runners.owl_service import OwlDetectorEncoder, unpack
from runners.photofield import encode_embedding
from runners.urlfetch import fetch_image_url, parse_allow_hosts
from semantic.classify import CompiledClassifier
from semantic.templates_detect import DETECTION_TEMPLATE_VERSION, DETECTION_TEMPLATES
from settings import Settings, configure_logging, get_settings

log = logging.getLogger("zss.api")

EXAMPLES_ENCODED = Counter("zss_text_examples_encoded", "Example texts encoded (embedding-cache misses)")
CACHE_HITS = Counter("zss_embedding_cache_hits", "Example texts found in the embedding cache")
CACHE_MISSES = Counter("zss_embedding_cache_misses", "Example texts missing from the embedding cache")

INVALID_IMAGE = "Invalid image received, unable to open."


# -- request and response bodies -------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifierConfig(_Body):
    name: str = Field(min_length=1, max_length=512)
    examples_to_include: list[str] = Field(default_factory=list)
    examples_to_exclude: list[str] = Field(default_factory=list)


class DeployClassifierRequest(_Body):
    classifier_configs: list[ClassifierConfig]
    deployed_id: str | None = Field(default=None, max_length=128)
    augment_examples: bool = True


class DeployResponse(BaseModel):
    deployed_id: str
    message: str


class DetectorConfig(ClassifierConfig):
    detection_threshold: float = Field(default=0.1, ge=0.0, le=1.0)


class DeployDetectorRequest(_Body):
    detector_configs: list[DetectorConfig]
    deployed_id: str | None = Field(default=None, max_length=128)
    nms_threshold: float = Field(default=0.4, ge=0.0, le=1.0)
    class_agnostic_nms: bool = True
    augment_examples: bool = True


class Detection(BaseModel):
    tlbr: list[float] = Field(min_length=4, max_length=4)
    score: float
    class_: str = Field(alias="class")


class EmbedTextRequest(_Body):
    texts: list[str] = Field(max_length=10_000)
    augment_examples: bool = False


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]


class ClassifyResult(BaseModel):
    scores: dict[str, float]
    pred: str
    raw_scores: dict[str, float]


class PhotofieldTextRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # photofield may add fields; only texts matter
    texts: list[str] = Field(max_length=10_000)


class PhotofieldEmbedding(BaseModel):
    embedding_f16_b64: str
    embedding_inv_norm_f16_uint16: int


class PhotofieldText(PhotofieldEmbedding):
    text: str


class PhotofieldImage(PhotofieldEmbedding):
    field: str
    filename: str | None


class PhotofieldTextResponse(BaseModel):
    texts: list[PhotofieldText]


class PhotofieldImageResponse(BaseModel):
    images: list[PhotofieldImage]


class ErrorResponse(BaseModel):
    status_code: int
    message: str
    data: None = None


class ApiError(Exception):
    """An expected failure: becomes ``{"status_code", "message", "data": null}`` with that status."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


# BentoML 1.4.39's dependency client closes its aiohttp session every 100 requests while other requests may still be
# in flight on it, which surfaces as ServerDisconnectedError. Encoder calls are idempotent, so they are retried.
_TRANSIENT = (aiohttp.ClientConnectionError,)
_ATTEMPTS = 3


async def call_encoder(method: Any, *args: Any) -> Any:
    """``await method(*args)`` on a dependency, retrying transient connection failures; 503 if they persist."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return await method(*args)
        except _TRANSIENT as exc:
            if attempt == _ATTEMPTS:
                raise ApiError(503, "The encoder could not be reached; retry later.") from exc
            log.warning("encoder call failed (%s: %s); retry %d", type(exc).__name__, exc, attempt)
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


def call_encoder_sync(method: Any, *args: Any) -> Any:
    """The same for the blocking client (used from worker threads)."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return method(*args)
        except _TRANSIENT as exc:
            if attempt == _ATTEMPTS:
                raise ApiError(503, "The encoder could not be reached; retry later.") from exc
            log.warning("encoder call failed (%s: %s); retry %d", type(exc).__name__, exc, attempt)
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


def _envelope(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status_code": status, "message": message, "data": None}, status_code=status)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query")]
    return ".".join(parts) or "body"


app = FastAPI(
    title="ZeroShot Server",
    description="Zero-shot image classification defined in words, DirectAI-compatible.",
    version="0.1.0",
    responses={400: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return _envelope(exc.status_code, exc.message)


@app.exception_handler(ImageInputError)
async def _image_error(_: Request, exc: ImageInputError) -> JSONResponse:
    return _envelope(exc.status_code, getattr(exc, "message", None) or str(exc))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    if errs:
        first = errs[0]
        msg = f"Invalid request: {_field_path(tuple(first.get('loc', ())))}: {first.get('msg', 'invalid')}"
    else:
        msg = "Invalid request."
    return _envelope(422, msg)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _envelope(exc.status_code, str(exc.detail))


def _unexpected(exc: Exception) -> JSONResponse:
    """The envelope for an exception no handler took: a dependency's error code (BentoML exceptions carry one; 503 is
    an encoder shedding load) or 500."""
    status = getattr(exc, "error_code", None)
    try:
        code = int(status) if status is not None else 500
    except (TypeError, ValueError):
        code = 500
    if not 400 <= code <= 599:
        code = 500
    if code == 503:
        log.warning("encoder overloaded: %s", exc)
        return _envelope(503, "The encoder is overloaded; retry later.")
    if code >= 500:
        log.exception("unhandled error", exc_info=exc)
    return _envelope(code, "Internal server error." if code >= 500 else str(exc))


class CatchAll:
    """Answer any exception that no exception handler took with the JSON envelope, here and without re-raising.

    Starlette sends an ``@app.exception_handler(Exception)`` response from its outermost middleware and then re-raises,
    and the server then closes the connection: the client saw a reset instead of the 503 or 500 (tests/test_service.py,
    overload test)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:  # part of a response is out: nothing sensible can follow it
                raise
            await _unexpected(exc)(scope, receive, send)


def _validate_classes(configs: list[ClassifierConfig]) -> None:
    if not configs:
        raise ApiError(422, "Class list is empty.")
    seen: set[str] = set()
    for c in configs:
        if c.name in seen:
            raise ApiError(422, f"Duplicate class name: {c.name!r}.")
        seen.add(c.name)
        if not c.examples_to_include:
            raise ApiError(422, f"Class {c.name!r} has no examples_to_include.")
        for ex in (*c.examples_to_include, *c.examples_to_exclude):
            if not ex.strip():
                raise ApiError(422, f"Class {c.name!r} has an empty example.")


MAX_IMAGES_PER_REQUEST = 256

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in (
        (400, "Unknown deployed_id, or a refused image URL"),
        (413, "Body, image or image count over the limits"),
        (422, "Malformed request or an image that cannot be opened"),
        (503, "Encoder overloaded"),
    )
}
# A path the mounted app never sees (e.g. with a raw newline) gets BentoML's own plain-text 404.
_ERRORS[404] = {
    "model": ErrorResponse,
    "description": "No such route",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}


def _image_body(field: str | None) -> dict[str, Any]:
    """OpenAPI description of the image forms the parser accepts (the route reads the body itself)."""
    name = field or "any field name"
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            (field or "file"): {"type": "array", "items": {"type": "string", "format": "binary"}}
                        },
                        "required": [field or "file"],
                    },
                    "encoding": {(field or "file"): {"contentType": "image/*"}},
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "data": {
                                "description": "base64 image(s) or data: URI(s)",
                                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                            },
                            "url": {
                                "description": "image URL(s); only when the server enables URL fetching",
                                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                            },
                        },
                        "additionalProperties": False,
                    }
                },
            },
            "description": f"Image files in multipart field '{name}', or JSON with base64 data / URLs.",
        }
    }


@dataclass(frozen=True)
class ImageSource:
    """One image as the client sent it: uploaded bytes, a base64 string, or a URL."""

    kind: Literal["bytes", "base64", "url"]
    value: bytes | str
    field: str = "data"
    filename: str | None = None


def _as_list(value: Any, name: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        raise ApiError(422, f"Field '{name}' must be a string or a list of strings.")
    return items


async def image_sources(request: Request, field: str | None = "data") -> list[ImageSource]:
    """Images from multipart (files, or URL / base64 strings) or from a JSON body {"data": b64 | [...], "url": ...}.

    ``field=None`` takes every multipart field (photofield clients name their fields freely).
    """
    ctype = request.headers.get("content-type", "").lower()
    sources: list[ImageSource] = []
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=MAX_IMAGES_PER_REQUEST, max_fields=MAX_IMAGES_PER_REQUEST)
        except Exception as exc:  # malformed framing, too many parts
            raise ApiError(422, f"Malformed multipart body: {exc}") from exc
        items = form.multi_items() if field is None else [(field, v) for v in form.getlist(field)]
        for name, item in items:
            if isinstance(item, UploadFile):
                sources.append(ImageSource("bytes", await item.read(), name, item.filename))
            elif item.strip().lower().startswith(("http://", "https://")):
                sources.append(ImageSource("url", item.strip(), name))
            else:
                sources.append(ImageSource("base64", item, name))
    elif ctype.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError as exc:
            raise ApiError(422, "Invalid JSON body.") from exc
        if not isinstance(body, dict) or not set(body) <= {"data", "url"}:
            raise ApiError(422, 'JSON body must be an object with "data" (base64 images) and/or "url" (image URLs).')
        sources += [ImageSource("base64", v) for v in _as_list(body.get("data", []), "data")]
        sources += [ImageSource("url", v, "url") for v in _as_list(body.get("url", []), "url")]
    else:
        raise ApiError(
            422,
            f"Expected multipart/form-data with image files in field '{field or 'any'}', or a JSON body with "
            '"data" (base64) or "url".',
        )
    if not sources:
        raise ApiError(422, f"No image in field '{field}'." if field else "No image in the request.")
    if len(sources) > MAX_IMAGES_PER_REQUEST:
        raise ApiError(413, f"Too many images in one request (limit {MAX_IMAGES_PER_REQUEST}).")
    return sources


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length and while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        too_big = JSONResponse(
            {"status_code": 413, "message": f"Request body over {self.max_bytes} bytes.", "data": None},
            status_code=413,
        )
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await too_big(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, f"Request body over {self.max_bytes} bytes.")
            return message

        await self.app(scope, counted, send)


app.add_middleware(BodyLimit, max_bytes=get_settings().max_body_bytes)
app.add_middleware(CatchAll)  # added last, so outermost: it also answers for BodyLimit


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="zeroshot", workers=1, threads=32, traffic={"timeout": 600})
class ZeroShot:
    image_encoder = bentoml.depends(ClipImageEncoder)
    text_encoder = bentoml.depends(ClipTextEncoder)
    detector = bentoml.depends(OwlDetectorEncoder)

    def __init__(self) -> None:
        # Scoring here is small; more threads only spin against the encoders for the same cores.
        torch.set_num_threads(1)
        self.settings: Settings = get_settings()
        configure_logging(self.settings)
        self.registry = Registry(self.settings.registry_path)
        self.cache = EmbeddingCache(self.settings.cache_dir)
        self._compiled: dict[str, tuple[int, CompiledClassifier | CompiledDetector]] = {}
        self._det_embedder: TextEmbedder | None = None
        self._det_info: dict[str, Any] | None = None
        self._compile_lock = threading.Lock()
        self._embedder: TextEmbedder | None = None
        self._preprocess: Preprocess | None = None
        self._info_lock = threading.Lock()

    # -- lazily learned from the encoders (they may start after this worker) ----------------------------------
    def _text_embedder(self) -> TextEmbedder:
        with self._info_lock:
            if self._embedder is None:
                info = call_encoder_sync(self.text_encoder.info)
                self._embedder = TextEmbedder(
                    self.cache, info["model_id"], self._encode_prompts, on_lookup=self._record_lookup
                )
            return self._embedder

    def _encode_detector_prompts(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(call_encoder_sync(self.detector.encode_texts, prompts), dtype=np.float32)

    def _encode_prompts(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(call_encoder_sync(self.text_encoder.encode, prompts), dtype=np.float32)

    def _image_preprocess(self) -> Preprocess:
        with self._info_lock:
            if self._preprocess is None:
                p = call_encoder_sync(self.image_encoder.info)["preprocess"]
                self._preprocess = Preprocess(
                    size=(int(p["size"][0]), int(p["size"][1])),
                    mean=tuple(p["mean"]),  # type: ignore[arg-type]
                    std=tuple(p["std"]),  # type: ignore[arg-type]
                    interpolation=p["interpolation"],
                    resize_mode=p["resize_mode"],
                    fill_color=int(p["fill_color"]),
                )
            return self._preprocess

    # -- shared steps -----------------------------------------------------------------------------------------
    @staticmethod
    def _record_lookup(stats: EmbedStats) -> None:
        CACHE_HITS.inc(stats.hits)
        CACHE_MISSES.inc(stats.misses)
        EXAMPLES_ENCODED.inc(stats.examples_encoded)

    def _embed_examples(self, texts: list[str], augment: bool) -> np.ndarray:
        return self._text_embedder().embed(texts, augment)[0]

    def _compile(self, config: dict[str, Any]) -> CompiledClassifier:
        classes = parse_classes(config["classifier_configs"])
        return compile_classes(classes, self._text_embedder(), bool(config.get("augment_examples", True)))

    def _detector_info(self) -> dict[str, Any]:
        with self._info_lock:
            if self._det_info is None or not self._det_info.get("enabled"):
                self._det_info = call_encoder_sync(self.detector.info)
            info = self._det_info
        if not info.get("enabled"):
            raise ApiError(503, f"Detection is unavailable: {info.get('error')}.")
        return info

    def _detector_embedder(self) -> TextEmbedder:
        info = self._detector_info()
        with self._info_lock:
            if self._det_embedder is None:
                self._det_embedder = TextEmbedder(
                    self.cache,
                    info["model_id"],
                    self._encode_detector_prompts,
                    templates=DETECTION_TEMPLATES,
                    template_version=DETECTION_TEMPLATE_VERSION,
                    on_lookup=self._record_lookup,
                )
            return self._det_embedder

    def _compile_detector(self, config: dict[str, Any]) -> CompiledDetector:
        configs = config["detector_configs"]
        return compile_detector(
            parse_classes(configs),
            [float(c.get("detection_threshold", 0.1)) for c in configs],
            self._detector_embedder(),
            bool(config.get("augment_examples", True)),
            float(config.get("nms_threshold", 0.4)),
            bool(config.get("class_agnostic_nms", True)),
        )

    def _compiled_for(self, deployed_id: str, kind: str) -> Any:
        """The compiled classifier or detector for an id, recompiled only when the registry's version moved."""
        version = self.registry.version(deployed_id)
        if version is None:
            self._compiled.pop(deployed_id, None)
            raise ApiError(400, "Key not found")
        hit = self._compiled.get(deployed_id)
        if hit is not None and hit[0] == version:
            compiled = hit[1]
        else:
            with self._compile_lock:
                dep = self.registry.get(deployed_id)
                if dep is None:
                    raise ApiError(400, "Key not found")
                if dep.kind != kind:
                    raise ApiError(400, f"{deployed_id} is a {dep.kind}, not a {kind}.")
                compiled = self._compile(dep.config) if kind == "classifier" else self._compile_detector(dep.config)
                self._compiled[deployed_id] = (dep.version, compiled)
        expected = CompiledClassifier if kind == "classifier" else CompiledDetector
        if not isinstance(compiled, expected):
            raise ApiError(400, f"{deployed_id} is not a {kind}.")
        return compiled

    def _register(self, kind: str, config: dict[str, Any], requested: str | None, compiled: Any) -> DeployResponse:
        """DirectAI's deploy semantics: new id, update of an existing id, or a new id for an unknown one."""
        if requested is None:
            deployed_id, message = self.registry.new_id(), "New model deployed."
        elif self.registry.get(requested) is not None:
            deployed_id, message = requested, "Model updated."
        else:
            deployed_id = self.registry.new_id()
            message = f"{requested} model not found. Generated new model."
        dep, _ = self.registry.put(deployed_id, kind, config)
        self._compiled[deployed_id] = (dep.version, compiled)
        return DeployResponse(deployed_id=deployed_id, message=message)

    def _load_image(self, src: ImageSource, draft: int) -> Any:
        st = self.settings
        if src.kind == "bytes":
            return decode_image(src.value, max_pixels=st.max_image_pixels, draft_size=draft)  # type: ignore[arg-type]
        if src.kind == "base64":
            return decode_base64_image(
                str(src.value), max_pixels=st.max_image_pixels, draft_size=draft, max_bytes=st.max_body_bytes
            )
        if not st.allow_url_fetch:
            raise ApiError(400, "Image URLs are disabled on this server (set ZSS_ALLOW_URL_FETCH=true to enable).")
        blob = fetch_image_url(
            str(src.value),
            allow_hosts=parse_allow_hosts(st.url_allow_hosts),
            timeout_s=st.url_timeout_s,
            max_bytes=st.max_body_bytes,
        )
        return decode_image(blob, max_pixels=st.max_image_pixels, draft_size=draft)

    def _decode_to_pixels(self, sources: list[ImageSource]) -> np.ndarray:
        pre = self._image_preprocess()
        return np.stack([pre.to_pixels(self._load_image(src, pre.draft_size)) for src in sources])

    async def _embed_images(self, sources: list[ImageSource]) -> np.ndarray:
        pixels = await anyio.to_thread.run_sync(self._decode_to_pixels, sources)
        out = await call_encoder(self.image_encoder.to_async.encode_pixels, pixels)
        return np.asarray(out, dtype=np.float32)

    # -- routes -----------------------------------------------------------------------------------------------
    @app.post("/deploy_classifier", response_model=DeployResponse, responses=_ERRORS)
    def deploy_classifier(self, body: DeployClassifierRequest) -> DeployResponse:
        """Deploy (or update) a classifier defined by example texts; examples are embedded now, once."""
        _validate_classes(body.classifier_configs)
        config = {
            "classifier_configs": [c.model_dump() for c in body.classifier_configs],
            "augment_examples": body.augment_examples,
        }
        clf = self._compile(config)  # embed before registering, so a deployed id always classifies
        return self._register("classifier", config, body.deployed_id, clf)

    @app.post(
        "/classify",
        response_model=ClassifyResult | list[ClassifyResult],
        responses=_ERRORS,
        openapi_extra=_image_body("data"),
    )
    async def classify(
        self, request: Request, deployed_id: Annotated[str, Query(max_length=128)]
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Classify one image (an object back) or several (a list back), multipart field ``data``."""
        clf = await anyio.to_thread.run_sync(self._compiled_for, deployed_id, "classifier")
        emb = await self._embed_images(await image_sources(request))
        results = await anyio.to_thread.run_sync(score_images, emb, clf)
        return results[0] if len(results) == 1 else results

    @app.post("/deploy_detector", response_model=DeployResponse, responses=_ERRORS)
    def deploy_detector(self, body: DeployDetectorRequest) -> DeployResponse:
        """Deploy (or update) a detector defined by example texts, thresholds and NMS settings."""
        _validate_classes(body.detector_configs)  # type: ignore[arg-type]
        config = {
            "detector_configs": [c.model_dump() for c in body.detector_configs],
            "nms_threshold": body.nms_threshold,
            "class_agnostic_nms": body.class_agnostic_nms,
            "augment_examples": body.augment_examples,
        }
        det = self._compile_detector(config)
        return self._register("detector", config, body.deployed_id, det)

    def _decode_for_detector(self, sources: list[ImageSource], size: int) -> list[tuple[Image.Image, float, float]]:
        """Decode, then shrink so the longer side is at most the detector's input size (less to send and pad)."""
        out = []
        for src in sources:
            img = self._load_image(src, draft=0)
            w, h = img.size
            factor = size / max(w, h)
            if factor < 1.0:
                small = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BILINEAR)
                out.append((small, w / small.size[0], h / small.size[1]))
            else:
                out.append((img, 1.0, 1.0))
        return out

    @app.post(
        "/detect",
        response_model=list[list[Detection]],
        responses=_ERRORS,
        openapi_extra=_image_body("data"),
    )
    async def detect(
        self, request: Request, deployed_id: Annotated[str, Query(max_length=128)]
    ) -> list[list[dict[str, Any]]]:
        """Detect the deployed classes: one list of {"tlbr", "score", "class"} per image, best first."""
        info = await anyio.to_thread.run_sync(self._detector_info)
        det = await anyio.to_thread.run_sync(self._compiled_for, deployed_id, "detector")
        sources = await image_sources(request)
        decoded = await anyio.to_thread.run_sync(self._decode_for_detector, sources, int(info["input_size"]))
        packed = await call_encoder(self.detector.to_async.encode_images, [d[0] for d in decoded])
        packed = np.asarray(packed, dtype=np.float32)

        def score() -> list[list[dict[str, Any]]]:
            results = []
            for one, (_, sx, sy) in zip(packed, decoded):
                u = unpack(one)
                results.append(
                    score_detections(
                        u["boxes"], u["class_embeds"], u["logit_shift"], u["logit_scale"], det, scale_xy=(sx, sy)
                    )
                )
            return results

        return await anyio.to_thread.run_sync(score)

    @app.get("/model_config", responses=_ERRORS)
    def model_config(self, deployed_id: Annotated[str, Query(max_length=128)]) -> dict[str, Any]:
        """The deployed configuration, as it was deployed."""
        dep = self.registry.get(deployed_id)
        if dep is None:
            raise ApiError(400, "Key not found")
        return {"deployed_id": dep.id, "kind": dep.kind, **dep.config}

    @app.get("/deployments")
    def list_deployments(self) -> dict[str, Any]:
        """Every deployment with its kind, class count and timestamps."""
        out = []
        for d in self.registry.list():
            key = "classifier_configs" if d.kind == "classifier" else "detector_configs"
            out.append(
                {
                    "deployed_id": d.id,
                    "kind": d.kind,
                    "n_classes": len(d.config.get(key, [])),
                    "version": d.version,
                    "created_at": d.created_at,
                    "updated_at": d.updated_at,
                }
            )
        return {"deployments": out}

    @app.delete("/deployments/{deployed_id}", responses=_ERRORS)
    def delete_deployment(
        self, deployed_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
    ) -> DeployResponse:
        """Delete a deployment; its cached example embeddings stay (other classifiers may share them)."""
        if not self.registry.delete(deployed_id):
            raise ApiError(400, "Key not found")
        self._compiled.pop(deployed_id, None)
        return DeployResponse(deployed_id=deployed_id, message="Model deleted.")

    @app.post("/embed_text", response_model=EmbeddingsResponse, responses=_ERRORS)
    def embed_text(self, body: EmbedTextRequest) -> dict[str, Any]:
        """Text embeddings exactly as classifiers use them (cached; templates averaged if augment_examples)."""
        if not body.texts:
            return {"embeddings": []}
        if any(not t.strip() for t in body.texts):
            raise ApiError(422, "Texts must not be empty.")
        vecs = self._embed_examples(body.texts, body.augment_examples)
        return {"embeddings": vecs.tolist()}

    @app.post("/embed_image", response_model=EmbeddingsResponse, responses=_ERRORS, openapi_extra=_image_body("data"))
    async def embed_image(self, request: Request) -> dict[str, Any]:
        """Image embeddings exactly as classifiers use them; multipart field ``data``, one or more files."""
        emb = await self._embed_images(await image_sources(request))
        return {"embeddings": emb.tolist()}

    @app.post("/text-embeddings", response_model=PhotofieldTextResponse, responses=_ERRORS)
    def photofield_text_embeddings(self, body: PhotofieldTextRequest) -> dict[str, Any]:
        """photofield-compatible text embeddings (float16 little-endian base64 + inverse norm as float16 bits)."""
        if any(not t.strip() for t in body.texts):
            raise ApiError(422, "Texts must not be empty.")
        vecs = self._embed_examples(body.texts, False) if body.texts else np.zeros((0, 0), np.float32)
        return {"texts": [{"text": t, **encode_embedding(v)} for t, v in zip(body.texts, vecs)]}

    @app.post(
        "/image-embeddings",
        response_model=PhotofieldImageResponse,
        responses=_ERRORS,
        openapi_extra=_image_body(None),
    )
    async def photofield_image_embeddings(self, request: Request) -> dict[str, Any]:
        """photofield-compatible image embeddings; multipart files under any field names."""
        sources = await image_sources(request, field=None)
        emb = await self._embed_images(sources)
        return {
            "images": [
                {"field": src.field, "filename": src.filename, **encode_embedding(v)} for src, v in zip(sources, emb)
            ]
        }

    @app.get("/healthz_models")
    async def healthz_models(self) -> dict[str, Any]:
        """The loaded models' ids and preprocessing (also warms the encoders up)."""
        image_info, text_info, det_info = await asyncio.gather(
            self.image_encoder.to_async.info(), self.text_encoder.to_async.info(), self.detector.to_async.info()
        )
        return {"image": image_info, "text": text_info, "detector": det_info}
