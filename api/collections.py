"""The collections' routes (issue 31; README "Collections"): create, list and delete collections, add images (as
``/classify`` takes them, plus ids and metadata), get and delete items, import an ``embed`` dataset, search, and
classify a whole collection with a deployment. The work is the engine's (engine/collections.py)."""

from __future__ import annotations

import json
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from api import auth, convert
from api.arrival import arrived
from api.inputs import MAX_IMAGES_PER_REQUEST, image_sources
from api.openapi import ERRORS as BASE_ERRORS
from api.schemas import ErrorResponse, JobAccepted
from engine.collections import CollectionClassification, CollectionInfo, Collections
from engine.collections import Query as SearchQuery
from engine.tenancy import Tenant
from errors import Invalid, ZssError
from imaging.sources import ImageSource

_open_lock = threading.Lock()
ERRORS: dict[int | str, dict[str, Any]] = {
    **BASE_ERRORS,
    404: {**BASE_ERRORS[404], "description": "Unknown collection (or another tenant's), item or job; or no such route"},
    409: {
        "model": ErrorResponse,
        "description": "The collection exists already, holds another model's vectors, or the job is still running",
    },
}


def _collections(request: Request) -> Collections:
    """The app's collections, opened on first use (the engine is set when the service starts)."""
    state = request.app.state
    with _open_lock:
        if getattr(state, "collections", None) is None or state.collections.engine is not state.engine:
            state.collections = Collections.open(state.engine)
        return state.collections


CollectionsDep = Annotated[Collections, Depends(_collections)]
CallerDep = Annotated[Tenant, Depends(auth.caller)]
Name = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
ItemId = Annotated[str, Path(max_length=512)]
Wait = Annotated[
    bool, Query(description="false: answer 202 with a job id at once; the classification goes on as a job")
]


class CreateCollection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class CollectionOut(BaseModel):
    name: str
    model_id: str
    dim: int
    count: int
    created_at: float


class CollectionList(BaseModel):
    collections: list[CollectionOut]


class AddedOut(BaseModel):
    ids: list[str] = Field(description="The items' ids, in the order the images were sent")
    added: int = Field(description="Images stored now (encoded, or their vector reused by content)")
    existing: int = Field(description="Images the collection held already (same content): their existing ids")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, max_length=2000)
    image: str | None = Field(None, description="base64 image or data: URI")
    url: str | None = Field(None, max_length=4096, description="image URL; only when the server enables URL fetching")
    id: str | None = Field(
        None, max_length=512, description="a stored item: its vector is the query (and it is left out)"
    )
    k: int = Field(10, ge=1, le=1000)
    filter: dict[str, Any] | None = Field(
        None, description='and-combined metadata conditions: {"field": value} or {"field": {"gte": a, "lt": b}}'
    )
    augment_examples: bool = Field(False, description="text query averaged over the prompt templates")


class Hit(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    results: list[Hit]


class ClassifyCollectionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    deployed_id: str = Field(max_length=128)
    offset: int = Field(0, ge=0)
    limit: int = Field(100, ge=0, le=1000, description="per-item results in this page (insertion order)")
    top: int | None = Field(None, ge=1, le=1000, description="also the top N items of each class by raw score")
    filter: dict[str, Any] | None = None


class ItemOut(BaseModel):
    id: str
    hash: str
    metadata: dict[str, Any]
    created_at: float


class Message(BaseModel):
    message: str


def _info(c: CollectionInfo) -> dict[str, Any]:
    return {"name": c.name, "model_id": c.model_id, "dim": c.dim, "count": c.count, "created_at": c.created_at}


def _json_list(value: Any, field: str) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise Invalid(f"Field '{field}' must be a JSON list.") from exc
    if not isinstance(value, list):
        raise Invalid(f"Field '{field}' must be a JSON list, one entry per image.")
    return value


async def _images(request: Request) -> tuple[list[ImageSource], list[Any] | None, list[Any] | None]:
    """Images as ``/classify`` takes them plus ``metadata`` and ``ids`` (JSON lists, one entry per image): multipart
    form fields, or keys of a JSON body {"data", "url", "metadata", "ids"}."""
    if request.headers.get("content-type", "").lower().startswith("application/json"):
        try:
            body = await request.json()
        except ValueError as exc:
            raise Invalid("Invalid JSON body.") from exc
        if not isinstance(body, dict) or not set(body) <= {"data", "url", "metadata", "ids"}:
            raise Invalid('JSON body must be an object with "data" and/or "url", and optional "metadata" and "ids".')
        sources = []
        for key, kind in (("data", "base64"), ("url", "url")):
            values = body.get(key, [])
            for v in values if isinstance(values, list) else [values]:
                if not isinstance(v, str):
                    raise Invalid(f"Field '{key}' must be a string or a list of strings.")
                sources.append(ImageSource(kind, v, key))  # type: ignore[arg-type]
        if not sources:
            raise Invalid("No image in the request.")
        if len(sources) > MAX_IMAGES_PER_REQUEST:
            raise ZssError(f"Too many images in one request (limit {MAX_IMAGES_PER_REQUEST}).", 413)
        request.scope[auth.SCOPE_IMAGES] = len(sources)  # counted per tenant when the request succeeds
        return sources, _json_list(body.get("metadata"), "metadata"), _json_list(body.get("ids"), "ids")
    sources = await image_sources(request)
    form = await request.form()  # parsed once already: the same form
    return sources, _json_list(form.get("metadata"), "metadata"), _json_list(form.get("ids"), "ids")


def build_router() -> APIRouter:
    router = APIRouter(tags=["collections"])

    @router.post("/collections", response_model=CollectionOut, status_code=201, responses=ERRORS)
    async def create_collection(body: CreateCollection, cols: CollectionsDep, who: CallerDep) -> Any:
        """A new, empty collection of the caller's tenant, for the served image model."""
        return _info(await cols.create(body.name, caller=who))

    @router.get("/collections", response_model=CollectionList, responses=ERRORS)
    async def list_collections(cols: CollectionsDep, who: CallerDep) -> Any:
        """The caller's tenant's collections with their item counts."""
        return {"collections": [_info(c) for c in await cols.list(caller=who)]}

    @router.get("/collections/{name}", response_model=CollectionOut, responses=ERRORS)
    async def get_collection(name: Name, cols: CollectionsDep, who: CallerDep) -> Any:
        return _info(await cols.get(name, caller=who))

    @router.delete("/collections/{name}", response_model=Message, responses=ERRORS)
    async def delete_collection(name: Name, cols: CollectionsDep, who: CallerDep) -> Any:
        """Delete a collection and every item in it."""
        await cols.drop(name, caller=who)
        return {"message": "Collection deleted."}

    @router.post(
        "/collections/{name}/images",
        response_model=AddedOut,
        responses=ERRORS,
        openapi_extra=_add_body(),
    )
    async def add_images(request: Request, name: Name, cols: CollectionsDep, who: CallerDep) -> Any:
        """Add images (multipart field ``data`` as ``/classify``, with optional form fields ``metadata`` and ``ids``:
        JSON lists, one entry per file); answers the items' ids in file order. An image whose content the collection
        holds already is not encoded again: its existing id is answered."""
        sources, metadata, ids = await _images(request)
        added = await cols.add(name, sources, caller=who, metadata=metadata, ids=ids, arrived=arrived(request))
        n = sum(a.added for a in added)
        return {"ids": [a.id for a in added], "added": n, "existing": len(added) - n}

    @router.get("/collections/{name}/items/{item_id:path}", response_model=ItemOut, responses=ERRORS)
    async def get_item(name: Name, item_id: ItemId, cols: CollectionsDep, who: CallerDep) -> Any:
        return await cols.item(name, item_id, caller=who)

    @router.get(
        "/collections/{name}/thumbnails/{item_id:path}",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"image/jpeg": {}}, "description": "The item's thumbnail (JPEG)"}},
    )
    async def get_thumbnail(name: Name, item_id: ItemId, cols: CollectionsDep, who: CallerDep) -> Response:
        """A stored image's thumbnail (JPEG, longer side at most ZSS_COLLECTION_THUMBNAIL_PX), for the web page;
        404 for an item imported as a vector."""
        data = await cols.thumbnail(name, item_id, caller=who)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @router.delete("/collections/{name}/items/{item_id:path}", response_model=Message, responses=ERRORS)
    async def delete_item(name: Name, item_id: ItemId, cols: CollectionsDep, who: CallerDep) -> Any:
        await cols.delete_item(name, item_id, caller=who)
        return {"message": "Item deleted."}

    @router.post("/collections/{name}/import", responses=ERRORS, openapi_extra=_import_body())
    async def import_dataset(request: Request, name: Name, cols: CollectionsDep, who: CallerDep) -> dict[str, int]:
        """Import Parquet parts written by the folder tool's ``embed`` job (multipart field ``data``, one file per
        part): id = the row's path, metadata ``{"path": ...}``; the model id must be the collection's; nothing is
        encoded."""
        try:
            form = await request.form(max_files=MAX_IMAGES_PER_REQUEST)
        except ZssError:
            raise
        except Exception as exc:
            raise Invalid(f"Expected multipart/form-data with Parquet files in field 'data': {exc}") from exc
        parts = [await f.read() for f in form.getlist("data") if isinstance(f, UploadFile)]
        if not parts:
            raise Invalid("No Parquet file in field 'data'.")
        return await cols.import_parquet(name, parts, caller=who)

    @router.post("/collections/{name}/search", response_model=SearchResponse, responses=ERRORS)
    async def search(body: SearchRequest, name: Name, cols: CollectionsDep, who: CallerDep) -> Any:
        """The ``k`` items nearest a text, an image (base64 or URL) or a stored item, among those passing the
        metadata filter; best first (score: cosine similarity)."""
        given = [v is not None for v in (body.text, body.image, body.url, body.id)]
        if sum(given) != 1:
            raise Invalid('A search takes exactly one of "text", "image", "url" or "id".')
        query = SearchQuery(
            text=body.text,
            image=ImageSource("base64", body.image)
            if body.image is not None
            else (ImageSource("url", body.url, "url") if body.url is not None else None),
            item_id=body.id,
            augment=body.augment_examples,
        )
        hits = await cols.search(name, query, caller=who, k=body.k, flt=body.filter)
        return {"results": [{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits]}

    @router.post("/collections/{name}/classify", responses={**ERRORS, 202: {"model": JobAccepted}})
    async def classify_collection(
        body: ClassifyCollectionRequest, name: Name, cols: CollectionsDep, who: CallerDep, wait: Wait = True
    ) -> Any:
        """Score every stored image with a deployed classifier exactly as ``/classify`` would (no image encoded):
        ``counts`` per class (an open set's label for rejected items), ``results`` one page of per-item results
        (``id``, ``metadata`` and ``/classify``'s ``scores``, ``pred``, ``raw_scores``, ``rejected``), and with
        ``top`` the best items of each class."""
        options = {"offset": body.offset, "limit": body.limit, "top": body.top, "flt": body.filter}
        if not wait:
            job = cols.start_classify(name, body.deployed_id, caller=who, **options)
            url = f"/jobs/{job.job_id}"
            accepted = JobAccepted(job_id=job.job_id, state=job.state, status_url=url)
            return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": url})
        return _classified(await cols.classify(name, body.deployed_id, caller=who, **options))

    @router.get("/collections/{name}/classify/{job_id}", responses=ERRORS)
    async def classify_job_result(
        name: Name, job_id: Annotated[str, Path(max_length=64)], cols: CollectionsDep, who: CallerDep
    ) -> dict[str, Any]:
        """The answer of a classification started with ``?wait=false``, once its job is done (409 while it runs;
        ``GET /jobs/{job_id}`` has its progress: items scored of the total)."""
        return _classified(cols.job_result(name, job_id, caller=who))

    return router


def _classified(out: CollectionClassification) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "deployed_id": out.deployed_id,
        "total": out.total,
        "counts": out.counts,
        "offset": out.offset,
        "results": [{"id": i.id, **convert.classification(i.result), "metadata": i.metadata} for i in out.items],
    }
    if out.top is not None:
        answer["top"] = {
            label: [{"id": i, "raw_score": r, "score": p} for i, r, p in rows] for label, rows in out.top.items()
        }
    return answer


def _add_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "data": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "metadata": {"type": "string", "description": "JSON list: one object per file"},
                            "ids": {"type": "string", "description": "JSON list: one id per file (optional)"},
                        },
                        "required": ["data"],
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "data": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                            "url": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                            "metadata": {"type": "array", "items": {"type": "object"}},
                            "ids": {"type": "array", "items": {"type": "string"}},
                        },
                        "additionalProperties": False,
                    }
                },
            },
        }
    }


def _import_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"data": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                        "required": ["data"],
                    }
                }
            },
        }
    }
