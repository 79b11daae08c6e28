"""OpenAI's embeddings API: ``POST /v1/embeddings`` and ``GET /v1/models`` (``/v1/models/{model}``).

Text as OpenAI defines it (``input``: a string or a list of strings); images as infinity serves CLIP through the same
route: ``"modality": "image"`` and ``input`` holding data URIs, base64 strings or image URLs (URLs only where the
server fetches them, through the same guarded fetcher as every image route). The vectors are those of
``/embed_text`` (the plain text, ``augment_examples: false``) and ``/embed_image``: the same engine calls, encoders,
API keys, tenants, limits and image latency bound. ``encoding_format`` ``float`` (OpenAI's default) or ``base64``
(little-endian float32, what the official client asks for). ``usage.prompt_tokens`` counts the tokens the text tower
read (its own tokenizer, start and end markers included, cut at its context); images count none.

Errors come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the API's status codes
(api/protocols.py rewrites the envelope); an unknown ``model`` is OpenAI's 404 ``model_not_found``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Scope

from api.arrival import arrived
from api.auth import SCOPE_IMAGES
from api.inputs import MAX_IMAGES_PER_REQUEST
from api.protocols import SCOPE_PARAM, ErrorShape, Served, inline_schema, served
from errors import Invalid, ZssError
from imaging.sources import ImageSource

PREFIX = "/v1/"
ALIAS = "clip"  # a model name every server answers to, whatever CLIP it serves
MAX_TEXTS = 10_000  # as /embed_text
OWNER = "zeroshot-server"
STARTED = int(time.time())  # "created" of the listed models: when this API worker started

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error", 429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded", 503: "service_unavailable"}


class EmbeddingRequest(BaseModel):
    """OpenAI's create-embeddings body, plus infinity's ``modality``."""

    model_config = ConfigDict(extra="forbid")
    input: str | list[str] = Field(
        description="Text(s); with modality 'image': data URI(s), base64 image(s) or image URL(s)"
    )
    model: str = Field(description="The served model's id or an alias (GET /v1/models)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, description="Only the model's own size is supported")
    user: str | None = Field(default=None, description="Accepted and ignored")
    modality: Literal["text", "image"] = Field(default="text", description="infinity's extension for images")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 values")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: ErrorDetail


def shape(status: int, message: str, scope: Scope) -> dict[str, Any]:
    """OpenAI's error object for a status and message (``param`` where a route named the field)."""
    param = scope.get(SCOPE_PARAM)
    code = "model_not_found" if status == 404 and param == "model" else _CODES.get(status)
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError, "description": why}
    for code, why in (
        (401, "Missing or invalid API key"),
        (404, "Unknown model (code 'model_not_found')"),
        (413, "Body, image or image count over the limits"),
        (422, "Malformed request, empty input or an image that cannot be opened"),
        (429, "Over the API key's rate limit"),
        (503, "Encoder overloaded or starting"),
    )
}
# A refused image URL is 400, as on every image route.
ERRORS[400] = {"model": OpenAIError, "description": "A refused image URL"}
# A path the mounted app never sees (e.g. an encoded slash or a raw newline) gets BentoML's own plain-text 404.
ERRORS[404]["content"] = {"text/plain": {"schema": {"type": "string"}}}


def model_names(s: Served) -> list[str]:
    """The names ``model`` may take: the served ids, the configured ZSS_CLIP_MODEL, and ``clip``."""
    return list(dict.fromkeys([*s.ids, s.configured, ALIAS]))


def _fail(request: Request, param: str | None, message: str, status: int = 422) -> ZssError:
    request.scope[SCOPE_PARAM] = param
    return ZssError(message, status)


def _parse(request: Request, raw: bytes) -> EmbeddingRequest:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise _fail(request, None, "The body is not valid JSON.") from None
    if isinstance(doc, dict):
        items = doc.get("input")
        if isinstance(items, list) and any(isinstance(i, int | list) for i in items):
            raise _fail(
                request,
                "input",
                "Token arrays are not supported: send the text itself (langchain: check_embedding_ctx_length=False).",
            )
    try:
        return EmbeddingRequest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
        where = ".".join(loc) or "body"
        message = f"Invalid '{where}': {first.get('msg', 'invalid value')}."
        raise _fail(request, loc[0] if loc else None, message) from None


def _sources(items: list[str]) -> list[ImageSource]:
    out = []
    for item in items:
        if item.strip().lower().startswith(("http://", "https://")):
            out.append(ImageSource("url", item.strip(), "input"))
        else:
            out.append(ImageSource("base64", item, "input"))
    return out


def _encode(vectors: np.ndarray, fmt: str) -> list[Any]:
    if fmt == "base64":
        raw = np.ascontiguousarray(vectors, dtype="<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in raw]
    return vectors.tolist()


async def _texts(eng: Any, texts: list[str]) -> tuple[np.ndarray, int]:
    """The vectors of /embed_text (augment off) and the tokens the text tower read, asked side by side (gather, not a
    task group: a failure must reach the handlers as itself, not inside an exception group)."""
    vectors, counts = await asyncio.gather(eng.embed_texts(texts, False), eng.count_tokens(texts))
    return vectors, int(sum(counts))


router = APIRouter(tags=["OpenAI"], responses=ERRORS)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> dict[str, Any]:
    """The model names ``/v1/embeddings`` answers to: the served CLIP's id first, then its aliases."""
    names = model_names(await served(request))
    return {"object": "list", "data": [_model(n) for n in names]}


@router.get("/v1/models/{model:path}", response_model=Model)
async def retrieve_model(request: Request, model: Annotated[str, Path(max_length=512)]) -> dict[str, Any]:
    """One model by name (404 ``model_not_found`` for any other)."""
    if model not in model_names(await served(request)):
        raise _fail(request, "model", f"The model '{model}' does not exist.", 404)
    return _model(model)


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": OWNER}


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": inline_schema(EmbeddingRequest),
                    "example": {"model": ALIAS, "input": ["a red circle", "a blue square"]},
                }
            },
        }
    },
)
async def create_embeddings(request: Request) -> JSONResponse:
    """Embeddings of texts, or of images with ``"modality": "image"`` (OpenAI's create-embeddings, infinity's
    image extension)."""
    body = _parse(request, await request.body())
    model = await served(request)
    if body.model not in model_names(model):
        message = f"The model '{body.model}' does not exist; this server serves {model.ids[0]!r}."
        raise _fail(request, "model", message, 404)
    if body.dimensions is not None and body.dimensions != model.dim:
        raise _fail(
            request,
            "dimensions",
            f"'dimensions' {body.dimensions} is not supported: this model's embeddings have {model.dim} dimensions "
            "(CLIP is not trained to be shortened).",
        )
    items = [body.input] if isinstance(body.input, str) else body.input
    if not items or any(not i.strip() for i in items):
        raise _fail(request, "input", "'input' must not be empty, nor hold an empty string.")
    eng: Any = request.app.state.engine
    request.scope[SCOPE_PARAM] = "input"  # what fails from here on is about the input
    if body.modality == "image":
        if len(items) > MAX_IMAGES_PER_REQUEST:
            raise ZssError(f"Too many images in one request (limit {MAX_IMAGES_PER_REQUEST}).", 413)
        request.scope[SCOPE_IMAGES] = len(items)  # counted per tenant when the request succeeds
        vectors = await eng.embed_images(_sources(items), arrived=arrived(request))
        tokens = 0
    else:
        if len(items) > MAX_TEXTS:
            raise Invalid(f"Too many texts in one request (limit {MAX_TEXTS}).")
        vectors, tokens = await _texts(eng, items)
    encoded = _encode(vectors, body.encoding_format)
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})


def install(app: FastAPI) -> None:
    """The routes, and OpenAI's error shape for everything under /v1/ (outermost: it also rewrites the edge's)."""
    app.include_router(router)
    app.add_middleware(ErrorShape, prefix=PREFIX, shape=shape)
