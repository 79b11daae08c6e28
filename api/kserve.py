"""The KServe v2 / Triton HTTP inference protocol for the two CLIP towers (what a Triton deployment spoke).

Two models: ``clip_image`` (input ``IMAGE``, BYTES: one encoded image per element, as the files' bytes) and
``clip_text`` (input ``TEXT``, BYTES: UTF-8 strings); each answers ``EMBEDDING``, FP32 ``[n, dim]``, the vectors of
``/embed_image`` and ``/embed_text`` (augment off), through the same engine calls, limits and latency bound. The
input's shape is ``[n]`` or ``[n, 1]``. Version ``1`` is the only one.

Bodies come as JSON, or with Triton's binary-data extension (what ``tritonclient`` sends by default): the header
``Inference-Header-Content-Length`` gives the JSON's length, and each input with ``parameters.binary_data_size`` has
its bytes after the JSON, in input order (BYTES: each element a 4-byte little-endian length and its bytes). In JSON,
a BYTES element is a string: an image there is base64 (or a data URI), since JSON cannot hold its bytes. Outputs come
back binary when the request asks (``parameters.binary_data_output`` or an output's ``parameters.binary_data``).

Errors are the protocol's ``{"error": "<message>"}``: 400 for a request the protocol refuses (a wrong datatype,
shape, input name), 404 for an unknown model or version, and the API's codes otherwise (422 an image that cannot be
opened, 413 too many, 401 / 429 / 503 from the edge; api/protocols.py rewrites the envelope).
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import numpy as np
from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api.arrival import arrived
from api.auth import SCOPE_IMAGES
from api.inputs import MAX_IMAGES_PER_REQUEST
from api.openai_compat import MAX_TEXTS
from api.protocols import ErrorShape, inline_schema, served
from errors import ZssError
from imaging.sources import ImageSource

PREFIX = "/v2"
HEADER = "Inference-Header-Content-Length"
VERSION = "1"
SERVER_VERSION = "0.1.0"
IMAGE_MODEL, TEXT_MODEL = "clip_image", "clip_text"
INPUTS = {IMAGE_MODEL: "IMAGE", TEXT_MODEL: "TEXT"}
OUTPUT = "EMBEDDING"
PLATFORM = "zeroshot_clip"

ModelName = Annotated[str, Path(max_length=256, examples=[IMAGE_MODEL, TEXT_MODEL])]
Version = Annotated[str, Path(max_length=64, examples=[VERSION])]


class TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class InferInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(max_length=256)
    shape: list[int] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferRequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """A KServe v2 inference request (JSON part)."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput]
    outputs: list[InferRequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    datatype: Literal["FP32"]
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class KServeError(BaseModel):
    error: str


def shape(status: int, message: str, scope: Any) -> dict[str, Any]:
    return {"error": message}


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": KServeError, "description": why}
    for code, why in (
        (400, "A request the protocol refuses (datatype, shape, input name, binary framing), or a refused URL"),
        (401, "Missing or invalid API key"),
        (404, "Unknown model or version"),
        (413, "Body, image or image count over the limits"),
        (422, "An image that cannot be opened, or an empty text"),
        (429, "Over the API key's rate limit"),
        (503, "Encoder overloaded or starting"),
    )
}


# A path the mounted app never sees (e.g. an encoded slash or a raw newline) gets BentoML's own plain-text 404.
ERRORS[404]["content"] = {"text/plain": {"schema": {"type": "string"}}}


class Bad(ZssError):
    """A request the protocol refuses."""

    status_code = 400


def _check_model(name: str, version: str | None = None) -> None:
    if name not in INPUTS:
        raise ZssError(f"Request for unknown model: '{name}' is not found (models: {', '.join(INPUTS)}).", 404)
    if version not in (None, "", VERSION):
        raise ZssError(f"Request for unknown model: '{name}' version {version} is not found (versions: 1).", 404)


async def _metadata(request: Request, name: str) -> dict[str, Any]:
    dim = (await served(request)).dim
    return {
        "name": name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": INPUTS[name], "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, dim]}],
    }


# -- parsing -----------------------------------------------------------------------------------------------------------
def split_body(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON part (parsed) and the binary part after it."""
    if header_length is None:
        head, rest = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise Bad(f"{HEADER} {header_length!r} is not a length within the body ({len(body)} bytes).")
        n = int(header_length)
        head, rest = body[:n], body[n:]
    try:
        doc = json.loads(head)
    except ValueError:
        raise Bad("The inference request header is not valid JSON.") from None
    try:
        return InferRequest.model_validate(doc), rest
    except ValueError as exc:
        raise Bad(f"Invalid inference request: {_first(exc)}") from None


def _first(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}"
    return str(exc)


def unpack_bytes(raw: bytes) -> list[bytes]:
    """Triton's serialised BYTES tensor: each element a uint32 little-endian length, then that many bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise Bad("BYTES binary data ends inside an element's length.")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise Bad("BYTES binary data ends inside an element.")
        out.append(raw[at : at + n])
        at += n
    return out


def elements(request: InferRequest, binary: bytes, model: str) -> list[bytes | str]:
    """The one input's elements: bytes from the binary part, strings from JSON."""
    want = INPUTS[model]
    if len(request.inputs) != 1:
        raise Bad(f"Model '{model}' takes exactly one input, '{want}'; the request has {len(request.inputs)}.")
    tensor = request.inputs[0]
    if tensor.name != want:
        raise Bad(f"Unexpected input '{tensor.name}' for model '{model}': its input is '{want}'.")
    if tensor.datatype != "BYTES":
        raise Bad(f"Input '{want}' has datatype BYTES, not {tensor.datatype}.")
    dims = tensor.shape
    if not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)) or any(d < 0 for d in dims):
        raise Bad(f"Input '{want}' has shape [n] or [n, 1] (one element per item), not {dims}.")
    size = (tensor.parameters or {}).get("binary_data_size")
    items: list[bytes | str]
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise Bad(f"binary_data_size {size!r} of input '{want}' does not fit the {len(binary)} binary bytes.")
        if size != len(binary):
            raise Bad(f"The body holds {len(binary) - size} bytes after input '{want}''s binary data.")
        if tensor.data is not None:
            raise Bad(f"Input '{want}' has both binary data and JSON data.")
        items = list(unpack_bytes(binary))
    else:
        if binary:
            raise Bad(f"The body holds {len(binary)} binary bytes but no input declares binary_data_size.")
        if tensor.data is None:
            raise Bad(f"Input '{want}' has no data.")
        flat = _flatten(tensor.data)
        if not all(isinstance(v, str) for v in flat):
            raise Bad(f"Input '{want}' (BYTES) holds strings in JSON.")
        items = list(flat)
    if dims[0] != len(items):
        raise Bad(f"Input '{want}' has shape {dims} but holds {len(items)} elements.")
    if not items:
        raise ZssError(f"Input '{want}' holds no element.", 422)
    limit = MAX_IMAGES_PER_REQUEST if model == IMAGE_MODEL else MAX_TEXTS
    if len(items) > limit:
        raise ZssError(f"Too many elements in one request (limit {limit}).", 413)
    return items


def _flatten(data: list[Any]) -> list[Any]:
    """JSON tensor data may be nested by the shape ([[a], [b]] for [2, 1]) or flat."""
    out: list[Any] = []
    for v in data:
        if isinstance(v, list):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


def _binary_out(request: InferRequest) -> bool:
    """Whether the output goes back as binary data, and a check of the requested outputs."""
    wanted = request.outputs or []
    for out in wanted:
        if out.name != OUTPUT:
            raise Bad(f"Unknown output '{out.name}': the model's output is '{OUTPUT}'.")
    if wanted:
        return bool((wanted[0].parameters or {}).get("binary_data", False))
    return bool((request.parameters or {}).get("binary_data_output", False))


def _texts(items: list[bytes | str]) -> list[str]:
    try:
        return [i.decode("utf-8") if isinstance(i, bytes) else i for i in items]
    except UnicodeDecodeError:
        raise Bad("Input 'TEXT' holds bytes that are not UTF-8.") from None


def _images(items: list[bytes | str]) -> list[ImageSource]:
    return [
        ImageSource("bytes", i, "IMAGE") if isinstance(i, bytes) else ImageSource("base64", i, "IMAGE") for i in items
    ]


def respond(model: str, request: InferRequest, vectors: np.ndarray, binary: bool) -> Response:
    arr = np.ascontiguousarray(vectors, dtype="<f4")
    out: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(arr.shape)}
    head: dict[str, Any] = {"model_name": model, "model_version": VERSION}
    if request.id is not None:
        head["id"] = request.id
    if not binary:
        out["data"] = arr.reshape(-1).tolist()
        return JSONResponse({**head, "outputs": [out]})
    raw = arr.tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({**head, "outputs": [out]}).encode()
    return Response(header + raw, media_type="application/octet-stream", headers={HEADER: str(len(header))})


# -- routes ----------------------------------------------------------------------------------------------------------
router = APIRouter(tags=["KServe v2"], responses=ERRORS)


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> dict[str, Any]:
    """Server metadata (the binary tensor data extension is supported)."""
    return {"name": "zeroshot", "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live", response_model=Live)
async def server_live() -> dict[str, Any]:
    """Live: this API worker answers."""
    return {"live": True}


@router.get("/v2/health/ready", response_model=Ready, responses={503: {"model": Ready, "description": "Not ready"}})
async def server_ready(request: Request) -> Any:
    """Ready: the shared stores answer (as /readyz; the encoders are asked on the first request)."""
    eng: Any = request.app.state.engine
    reason = await anyio.to_thread.run_sync(eng.unready)
    return {"ready": True} if reason is None else JSONResponse({"ready": False}, status_code=503)


@router.get("/v2/models/{model}", response_model=ModelMetadata)
async def model_metadata(request: Request, model: ModelName) -> dict[str, Any]:
    """A model's inputs and outputs."""
    _check_model(model)
    return await _metadata(request, model)


@router.get("/v2/models/{model}/versions/{version}", response_model=ModelMetadata)
async def model_version_metadata(request: Request, model: ModelName, version: Version) -> dict[str, Any]:
    """A model version's inputs and outputs (version 1 only)."""
    _check_model(model, version)
    return await _metadata(request, model)


@router.get("/v2/models/{model}/ready", response_model=ModelReady)
async def model_ready(request: Request, model: ModelName) -> dict[str, Any]:
    """A model is ready once its encoder has told its size (asked now if not yet)."""
    _check_model(model)
    await served(request)
    return {"name": model, "ready": True}


@router.get("/v2/models/{model}/versions/{version}/ready", response_model=ModelReady)
async def model_version_ready(request: Request, model: ModelName, version: Version) -> dict[str, Any]:
    """As ``/v2/models/{model}/ready``, for version 1."""
    _check_model(model, version)
    await served(request)
    return {"name": model, "ready": True}


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": inline_schema(InferRequest),
                "example": {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a red circle"]}]},
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"JSON of {HEADER} bytes, then the inputs' binary data",
            },
        },
    }
}
INFER_OK = {
    200: {
        "model": InferResponse,
        "description": "Outputs in JSON, or (binary requested) JSON then the output's bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post("/v2/models/{model}/infer", response_model=InferResponse, responses=INFER_OK, openapi_extra=INFER_BODY)
async def infer(request: Request, model: ModelName) -> Response:
    """Embed the input's images (``clip_image``) or texts (``clip_text``): FP32 ``EMBEDDING`` ``[n, dim]``."""
    return await _infer(request, model, None)


@router.post(
    "/v2/models/{model}/versions/{version}/infer",
    response_model=InferResponse,
    responses=INFER_OK,
    openapi_extra=INFER_BODY,
)
async def infer_version(request: Request, model: ModelName, version: Version) -> Response:
    """As ``/v2/models/{model}/infer``, for version 1."""
    return await _infer(request, model, version)


async def _infer(request: Request, model: str, version: str | None) -> Response:
    _check_model(model, version)
    body, binary = split_body(await request.body(), request.headers.get(HEADER))
    items = elements(body, binary, model)
    want_binary = _binary_out(body)
    eng: Any = request.app.state.engine
    if model == IMAGE_MODEL:
        request.scope[SCOPE_IMAGES] = len(items)  # counted per tenant when the request succeeds
        vectors = await eng.embed_images(_images(items), arrived=arrived(request))
    else:
        vectors = await eng.embed_texts(_texts(items), False)
    return respond(model, body, vectors, want_binary)


def install(app: FastAPI) -> None:
    """The routes, and the protocol's error shape for everything under /v2 (outermost: it also rewrites the edge's)."""
    app.include_router(router)
    app.add_middleware(ErrorShape, prefix=PREFIX + "/", shape=shape)
