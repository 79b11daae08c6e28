"""Collections (issue 31): images embedded once with the served image model, then searched and classified by any
deployment without encoding them again. No HTTP; the storage is cache/collections.py.

Adding images reads each image's bytes as sent (multipart, base64, or a URL through the SSRF-safe fetcher), keys it by
its content hash, and encodes only the images the collection does not hold yet, through the same decoding,
preprocessing, admission and encoder as ``/classify``; the vectors are committed before the request is answered.
Classifying a collection scores its stored vectors with the deployment's compiled classifier through the engine's
own scoring (engine/kinds.py ``ClassifierKind``), so every raw score, probability and open-set verdict is what
``/classify`` answers for that image, with no image encoded.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import anyio.to_thread
import numpy as np
import torch

# CollectionInfo is the edge's view of a collection too (the API sees storage only through the engine).
from cache.collections import (
    Added,
    CollectionInfo,
    CollectionStore,
    Exists,
    FilterError,
    NewItem,
    content_hash,
)
from cache.interfaces import CollectionBackend, StoreUnavailable
from engine.configs import Kind
from engine.deployments import DeployOutcome
from engine.embedder import Progress
from engine.jobs import Job
from engine.kinds import Classification, ClassifierKind, Scored, open_set_label
from engine.tenancy import Tenant
from errors import Invalid, Unavailable, ZssError
from imaging.sources import ImageSource, load_image, source_bytes
from imaging.thumbnail import thumbnail
from semantic.classify import CompiledClassifier

NAME = re.compile(r"^(?!\.+$)[A-Za-z0-9_.-]{1,64}$")  # not "." or "..": they would read as path steps
MAX_ID_CHARS = 512
MAX_METADATA_BYTES = 16_384
MAX_K = 1000
MAX_PAGE = 1000
SCORE_CHUNK = 8192  # rows scored at once: bounds the [rows, examples] similarity matrix
SCORED_KEPT = 2
RESULTS_KEPT = 100
JOB_KIND = "collection_classify"


P = ParamSpec("P")
T = TypeVar("T")


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Blocking work in a worker thread; a shared store that cannot be reached (PostgreSQL down) is a 503."""
    try:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
    except StoreUnavailable as exc:
        raise Unavailable(f"{exc} (retry later)") from exc


class NoCollection(ZssError):
    status_code = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"Collection {name!r} not found.")


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Query:
    """What a search looks for: exactly one of a text, an image (its source) or a stored item's id."""

    text: str | None = None
    image: ImageSource | None = None
    item_id: str | None = None
    augment: bool = False


@dataclass(frozen=True)
class ClassifiedItem:
    id: str
    result: Classification
    metadata: dict[str, Any]


@dataclass(frozen=True)
class CollectionClassification:
    deployed_id: str
    total: int
    counts: dict[str, int]
    offset: int
    items: list[ClassifiedItem]
    top: dict[str, list[tuple[str, float, float]]] | None  # class -> (id, raw score, probability), best first


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise Invalid("A collection name is 1 to 64 characters of letters, digits, '_', '.' and '-' (not dots only).")
    return name


def check_id(item_id: Any) -> str:
    if not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ID_CHARS or not item_id.isprintable():
        raise Invalid(f"An item id is a string of 1 to {MAX_ID_CHARS} printable characters.")
    return item_id


def check_metadata(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise Invalid("Each item's metadata must be a JSON object.")
    try:
        text = json.dumps(meta, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise Invalid("Metadata values must be JSON: no NaN or infinity.") from exc
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise Invalid(f"An item's metadata is limited to {MAX_METADATA_BYTES} bytes of JSON.")
    return meta


def _new_id() -> str:
    return uuid.uuid4().hex


class Collections:
    """The collections' work, one awaitable per route; blocking work (SQLite, hashing, decoding, scoring) in
    worker threads."""

    # ``engine``: the Engine (engine/pipelines.py), not imported here: the API imports this module, and the
    # pipelines module reaches the encoders' wire types.
    def __init__(self, engine: Any, store: CollectionBackend) -> None:
        self.engine = engine
        self.store = store
        self._lock = threading.Lock()
        self._model: tuple[str, int] | None = None
        # The scores of the last few classifications (a collection version, a compiled deployment, a filter): the
        # pages of one answer are scored once.
        self._results: OrderedDict[str, tuple[str, CollectionClassification]] = OrderedDict()
        self._scored: OrderedDict[tuple[Any, ...], tuple[CompiledClassifier, Scored]] = OrderedDict()

    @classmethod
    def open(cls, engine: Any) -> Collections:
        """The collections of the engine's data dir (ZSS_DATA_DIR/collections.sqlite3), or with ZSS_COLLECTION_URL
        those of a PostgreSQL database (pgvector) that several replicas share."""
        s = engine.settings
        if s.collection_url:
            from cache.pg_collections import PgCollectionStore

            try:
                store = PgCollectionStore(s.collection_url, s.collection_exact_max, s.collection_ef_search)
            except StoreUnavailable as exc:  # the database not up yet: 503, and the next request tries again
                raise Unavailable(f"{exc} (retry later)") from exc
            return cls(engine, store)
        return cls(engine, CollectionStore(s.collections_path, s.collection_exact_max, s.collection_nprobe))

    def model(self) -> tuple[str, int]:
        """(model id, dimension) of the served image model, learned once (blocking)."""
        with self._lock:
            if self._model is None:
                info = self.engine.image_encoder.info()
                self._model = (str(info["model_id"]), int(info["dim"]))
            return self._model

    def _collection(self, caller: Tenant, name: str, *, same_model: bool = True) -> CollectionInfo:
        info = self.store.get(caller.name, name)
        if info is None:
            raise NoCollection(name)
        if same_model and info.model_id != self.model()[0]:
            raise ZssError(
                f"Collection {name!r} holds vectors of model {info.model_id!r}; this server serves "
                f"{self.model()[0]!r}.",
                409,
            )
        return info

    # -- collections ------------------------------------------------------------------------------------------------
    async def create(self, name: str, *, caller: Tenant) -> CollectionInfo:
        check_name(name)

        def run() -> CollectionInfo:
            model_id, dim = self.model()
            try:
                return self.store.create(caller.name, name, model_id, dim)
            except Exists as exc:
                raise ZssError(f"Collection {name!r} already exists.", 409) from exc

        return await in_thread(run)

    async def list(self, *, caller: Tenant) -> list[CollectionInfo]:
        return await in_thread(self.store.list, caller.name)

    async def get(self, name: str, *, caller: Tenant) -> CollectionInfo:
        return await in_thread(self._collection, caller, name, same_model=False)

    async def drop(self, name: str, *, caller: Tenant) -> None:
        if not await in_thread(self.store.drop, caller.name, name):
            raise NoCollection(name)

    # -- items ------------------------------------------------------------------------------------------------------
    async def add(
        self,
        name: str,
        sources: Sequence[ImageSource],
        *,
        caller: Tenant,
        metadata: Sequence[Any] | None = None,
        ids: Sequence[Any] | None = None,
        arrived: float | None = None,
    ) -> list[Added]:
        """Add images (answered in their order). Everything is checked, fetched and decoded before anything is
        written: a bad image, id or metadata refuses the whole request and changes nothing."""
        if metadata is not None and len(metadata) != len(sources):
            raise Invalid(f"'metadata' holds {len(metadata)} objects for {len(sources)} images: one per image.")
        if ids is not None and len(ids) != len(sources):
            raise Invalid(f"'ids' holds {len(ids)} ids for {len(sources)} images: one per image.")
        metas = [check_metadata(m) for m in metadata] if metadata is not None else None
        given = [check_id(i) for i in ids] if ids is not None else None
        if given is not None and len(set(given)) != len(given):
            raise Invalid("'ids' holds the same id twice.")
        info = await in_thread(self._collection, caller, name)
        raws = await in_thread(lambda: [source_bytes(s, self.engine.limits) for s in sources])
        hashes = [content_hash(b) for b in raws]
        vectors = await in_thread(self.store.known_vectors, info.cid, hashes)
        todo: dict[str, int] = {}
        thumbs: dict[str, bytes | None] = {}
        for i, h in enumerate(hashes):
            if h not in vectors and h not in todo:
                todo[h] = i
        if todo:
            fresh = [ImageSource("bytes", raws[i]) for i in todo.values()]
            async with self.engine._admitted(len(fresh), arrived) as t0:
                pixels, made = await in_thread(self._pixels, fresh)  # the decoding and preprocessing of /classify
                emb = await self.engine.image_encoder.encode_pixels(pixels, time.monotonic() - t0)
            if emb.shape[1] != info.dim:
                raise ZssError(f"The image encoder's vectors ({emb.shape[1]}) are not the collection's ({info.dim}).")
            vectors.update(zip(todo, np.asarray(emb, np.float32)))
            thumbs.update(zip(todo, made))
        items = [
            NewItem(given[i] if given else None, h, metas[i] if metas else None, vectors[h], thumbs.get(h))
            for i, h in enumerate(hashes)
        ]
        return await in_thread(self._add, info, items)

    def _pixels(self, sources: list[ImageSource]) -> tuple[np.ndarray, list[bytes | None]]:
        """``/classify``'s pixels of each image and, from the same decoded image, its thumbnail (blocking)."""
        pre = self.engine.preprocess()
        side = self.engine.settings.collection_thumbnail_px
        pixels, thumbs = [], []
        for src in sources:
            img = load_image(src, self.engine.limits, pre.draft_size)
            pixels.append(pre.to_pixels(img))
            thumbs.append(thumbnail(img, side) if side else None)
        return np.stack(pixels), thumbs

    def _add(self, info: CollectionInfo, items: list[NewItem]) -> list[Added]:
        try:
            return self.store.add(info.cid, items, _new_id)
        except KeyError as exc:  # dropped meanwhile
            raise NoCollection(info.name) from exc

    async def item(self, name: str, item_id: str, *, caller: Tenant) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            info = self._collection(caller, name, same_model=False)
            it = self.store.item(info.cid, item_id)
            if it is None:
                raise ZssError(f"Item {item_id!r} not found in collection {name!r}.", 404)
            return {"id": it.id, "hash": it.hash, "metadata": it.metadata, "created_at": it.created_at}

        return await in_thread(run)

    async def thumbnail(self, name: str, item_id: str, *, caller: Tenant) -> bytes:
        """An item's thumbnail (JPEG); 404 for an unknown item or one without (imported as a vector)."""

        def run() -> bytes:
            info = self._collection(caller, name, same_model=False)
            try:
                thumb = self.store.thumbnail(info.cid, item_id)
            except KeyError as exc:
                raise NoCollection(name) from exc
            if thumb is None:
                raise ZssError(f"Item {item_id!r} of collection {name!r} has no thumbnail (or does not exist).", 404)
            return thumb

        return await in_thread(run)

    async def delete_item(self, name: str, item_id: str, *, caller: Tenant) -> None:
        def run() -> None:
            info = self._collection(caller, name, same_model=False)
            if not self.store.delete_item(info.cid, item_id):
                raise ZssError(f"Item {item_id!r} not found in collection {name!r}.", 404)

        await in_thread(run)

    async def import_parquet(self, name: str, parts: Sequence[bytes], *, caller: Tenant) -> dict[str, int]:
        """Rows of an ``embed`` dataset (tools/embed_parquet.py: path, embedding, model_id) as items: id = path,
        metadata ``{"path": path}``, the vector as written; nothing encoded. Every part is checked (columns, model
        id, dimension) before anything is written; one transaction."""

        def run() -> dict[str, int]:
            import pyarrow as pa
            import pyarrow.parquet as pq

            info = self._collection(caller, name)
            paths: list[str] = []
            blocks: list[np.ndarray] = []
            for k, blob in enumerate(parts):
                try:
                    table = pq.read_table(pa.BufferReader(blob))
                except (pa.ArrowException, OSError) as exc:
                    raise Invalid(f"Part {k} is not a Parquet file: {exc}") from exc
                missing = {"path", "embedding", "model_id"} - set(table.column_names)
                if missing:
                    raise Invalid(f"Part {k} lacks the column(s) {sorted(missing)} of an embed dataset.")
                models = set(table.column("model_id").to_pylist())
                if models - {info.model_id}:
                    raise Invalid(
                        f"Part {k} holds embeddings of {sorted(map(str, models))}, not of this collection's model "
                        f"{info.model_id!r}."
                    )
                emb = table.column("embedding").combine_chunks()
                if not pa.types.is_fixed_size_list(emb.type) or emb.type.list_size != info.dim:
                    raise Invalid(f"Part {k}: embeddings must be fixed-size lists of {info.dim} floats.")
                vec = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, info.dim)
                if not np.all(np.isfinite(vec)):
                    raise Invalid(f"Part {k} holds embeddings that are not finite.")
                paths += [check_id(p) for p in table.column("path").to_pylist()]
                blocks.append(vec)
            if len(set(paths)) != len(paths):
                raise Invalid("The parts name the same path twice.")
            vectors = np.concatenate(blocks) if blocks else np.zeros((0, info.dim), np.float32)
            added = self.store.import_rows(info.cid, paths, vectors, [{"path": p} for p in paths])
            return {"imported": len(paths), "added": added}

        return await in_thread(run)

    # -- search -----------------------------------------------------------------------------------------------------
    async def search(
        self, name: str, query: Query, *, caller: Tenant, k: int = 10, flt: Mapping[str, Any] | None = None
    ) -> list[Hit]:
        """The ``k`` items nearest the query (cosine), best first, among those passing the metadata filter. A
        stored item's id as the query leaves that item out of its results."""
        if not 0 < k <= MAX_K:
            raise Invalid(f"k must be between 1 and {MAX_K}.")
        info = await in_thread(self._collection, caller, name)
        if flt is not None:
            await in_thread(self._check_filter, info, flt)  # a bad filter is refused before any encoding
        exclude: str | None = None
        if query.text is not None:
            vec = (await self.engine.embed_texts([query.text], query.augment))[0]
        elif query.image is not None:
            vec = await self._image_vector(info, query.image)
        elif query.item_id is not None:
            it = await in_thread(self.store.item, info.cid, query.item_id)
            if it is None:
                raise ZssError(f"Item {query.item_id!r} not found in collection {name!r}.", 404)
            vec, exclude = it.vector, it.id
        else:
            raise Invalid('A search needs one of "text", "image" or "id".')

        def run() -> list[Hit]:
            try:
                found = self.store.search(info.cid, info.dim, np.asarray(vec, np.float32), k, flt, exclude)
            except FilterError as exc:
                raise ZssError(str(exc), 400) from exc
            except KeyError as exc:  # dropped meanwhile
                raise NoCollection(name) from exc
            return [Hit(i, s, m) for i, s, m in found]

        return await in_thread(run)

    def _check_filter(self, info: CollectionInfo, flt: Mapping[str, Any]) -> None:
        if not isinstance(flt, Mapping):
            raise Invalid('"filter" must be an object of field conditions.')
        try:
            self.store.check_filter(info.cid, flt)
        except FilterError as exc:
            raise ZssError(str(exc), 400) from exc

    def _matching(self, info: CollectionInfo, flt: Mapping[str, Any] | None) -> np.ndarray | None:
        if flt is None:
            return None
        self._check_filter(info, flt)
        try:
            return self.store.matching(info.cid, flt)
        except FilterError as exc:
            raise ZssError(str(exc), 400) from exc

    async def _image_vector(self, info: CollectionInfo, src: ImageSource) -> np.ndarray:
        raw = await in_thread(source_bytes, src, self.engine.limits)
        known = await in_thread(self.store.known_vectors, info.cid, [content_hash(raw)])
        if known:
            return next(iter(known.values()))
        return (await self.engine.embed_images([ImageSource("bytes", raw)]))[0]

    # -- classify ---------------------------------------------------------------------------------------------------
    async def classify(
        self,
        name: str,
        deployed_id: str,
        *,
        caller: Tenant,
        offset: int = 0,
        limit: int = 100,
        top: int | None = None,
        flt: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> CollectionClassification:
        """Every stored vector (those passing the filter) scored by the deployed classifier: the counts per label
        (an open set's label for rejected items), one page of per-item results in insertion order, and with ``top``
        the ``top`` items of highest raw score predicted as each class."""
        if offset < 0 or not 0 <= limit <= MAX_PAGE:
            raise Invalid(f"offset must be 0 or more and limit between 0 and {MAX_PAGE}.")
        if top is not None and not 0 < top <= MAX_K:
            raise Invalid(f"top must be between 1 and {MAX_K}.")
        info = await in_thread(self._collection, caller, name)
        rows_seqs = await in_thread(self._matching, info, flt)
        clf: CompiledClassifier = await in_thread(
            self.engine.deployments.compiled, deployed_id, Kind.CLASSIFIER, caller=caller
        )

        def run() -> CollectionClassification:
            try:
                snap = self.store.snapshot(info.cid, info.dim)
            except KeyError as exc:  # dropped meanwhile
                raise NoCollection(name) from exc
            if progress is not None:
                progress.check()
            rows = snap.rows_of(rows_seqs) if rows_seqs is not None else np.arange(snap.size)
            key = (info.cid, snap.version, deployed_id, id(clf), json.dumps(flt, sort_keys=True, default=str))
            with self._lock:
                scored = self._scored.get(key)
            if scored is None or scored[0] is not clf:
                scored = (clf, score_rows(snap.matrix, rows, clf, progress))
                with self._lock:  # the next page of the same question is not scored again
                    self._scored[key] = scored
                    while len(self._scored) > SCORED_KEPT:
                        self._scored.popitem(last=False)
            total, counts, page, results, best = classify_rows(snap.matrix, rows, clf, offset, limit, top, scored[1])
            page_ids = [snap.ids[int(rows[i])] for i in page]
            metas = self.store.metadata(info.cid, page_ids)
            items = [ClassifiedItem(i, r, metas.get(i, {})) for i, r in zip(page_ids, results)]
            tops = None
            if best is not None:
                tops = {c: [(snap.ids[int(rows[i])], r, p) for i, r, p in rs] for c, rs in best.items()}
            return CollectionClassification(deployed_id, total, counts, offset, items, tops)

        return await in_thread(run)

    def start_classify(self, name: str, deployed_id: str, *, caller: Tenant, **options: Any) -> Job:
        """:meth:`classify` as a job (engine/jobs.py, as long deploys): its report counts the items scored; its
        answer is kept for :meth:`job_result` (the newest ``RESULTS_KEPT``)."""
        check_name(name)
        holder: dict[str, str] = {}

        async def run(progress: Progress) -> DeployOutcome:
            out = await self.classify(name, deployed_id, caller=caller, progress=progress, **options)
            with self._lock:
                self._results[holder["job_id"]] = (name, out)
                while len(self._results) > RESULTS_KEPT:
                    self._results.popitem(last=False)
            return DeployOutcome(deployed_id, f"Classified {out.total} items of collection {name!r}.")

        job = self.engine.jobs.start(JOB_KIND, caller, run)
        holder["job_id"] = job.job_id  # before the job first runs: it starts when the caller next awaits
        return job

    def job_result(self, name: str, job_id: str, *, caller: Tenant) -> CollectionClassification:
        """A classification job's answer; 404 for an unknown job (or another tenant's, or another collection's), 409
        while it runs, and a failed job's own error."""
        job = self.engine.jobs.get(job_id, caller)
        if job is None or job.kind != JOB_KIND:
            raise ZssError("Job not found.", 404)
        if job.state == "running":
            raise ZssError("The job is still running (GET /jobs/{job_id} for its progress).", 409)
        if job.state in ("failed", "cancelled"):
            raise ZssError(job.message or f"The job {job.state}.", job.status_code or 500)
        with self._lock:
            found = self._results.get(job_id)
        if found is None or found[0] != name:
            raise ZssError("Job not found.", 404)
        return found[1]


def classify_rows(
    matrix: np.ndarray,
    rows: np.ndarray,
    clf: CompiledClassifier,
    offset: int,
    limit: int,
    top: int | None,
    scored: Scored | None = None,
) -> tuple[int, dict[str, int], list[int], list[Classification], dict[str, list[tuple[int, float, float]]] | None]:
    """Score the given rows (unless ``scored`` holds their scores): (total, counts per label, the page's positions in
    ``rows``, their results, and with ``top`` the best positions of each class as (position, raw score,
    probability))."""
    if scored is None:
        scored = score_rows(matrix, rows, clf)
    labels = list(clf.class_names)
    counts = dict.fromkeys(labels, 0)
    for c, n in zip(*np.unique(scored.pred.numpy(), return_counts=True)):
        counts[labels[int(c)]] += int(n)
    rejected_as = open_set_label(clf)
    if scored.rejected is not None and rejected_as is not None:
        for c, n in zip(*np.unique(scored.pred[scored.rejected].numpy(), return_counts=True)):
            counts[labels[int(c)]] -= int(n)
        counts[rejected_as] = counts.get(rejected_as, 0) + int(scored.rejected.sum())
    start = min(offset, len(rows))  # an offset past the end is an empty page, as in any paged answer
    page = torch.arange(start, min(start + limit, len(rows)))
    results = ClassifierKind.results(scored.rows(page), clf) if len(page) else []
    best = _top(scored, clf, top) if top else None
    return len(rows), counts, page.tolist(), results, best


def _top(scored: Scored, clf: CompiledClassifier, top: int) -> dict[str, list[tuple[int, float, float]]]:
    out: dict[str, list[tuple[int, float, float]]] = {}
    kept = torch.ones_like(scored.pred, dtype=torch.bool) if scored.rejected is None else scored.rejected.logical_not()
    for c, label in enumerate(clf.class_names):
        members = ((scored.pred == c) & kept).nonzero(as_tuple=True)[0]
        order = members[torch.argsort(scored.raw[members, c], descending=True, stable=True)[:top]]
        out[label] = [(i, float(scored.raw[i, c]), float(scored.probs[i, c])) for i in order.tolist()]
    return out


def score_rows(
    matrix: np.ndarray, rows: np.ndarray, clf: CompiledClassifier, progress: Progress | None = None
) -> Scored:
    """The classifier's scores of the given rows through the engine's scoring (``ClassifierKind.tensors``), in
    chunks scored side by side on the process's cores (torch runs one thread per call in the API worker; its
    matrix products release the GIL)."""
    chunks = [rows[i : i + SCORE_CHUNK] for i in range(0, len(rows), SCORE_CHUNK)]
    if not chunks:
        return ClassifierKind.tensors(np.zeros((0, matrix.shape[1]), np.float32), clf)
    workers = min(len(chunks), len(os.sched_getaffinity(0)))
    if progress is not None:
        progress.start(len(rows))

    def one(chunk: np.ndarray) -> Scored:
        if progress is not None:
            progress.check()  # a cancelled job (DELETE /jobs/{id}) stops before its next chunk
        out = ClassifierKind.tensors(matrix[chunk], clf)
        if progress is not None:
            progress.advance(len(chunk))
        return out

    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(one, chunks))
    rej = None if parts[0].rejected is None else torch.cat([p.rejected for p in parts])  # type: ignore[misc]
    sig = None if parts[0].sigmoid is None else torch.cat([p.sigmoid for p in parts])  # type: ignore[misc]
    return Scored(
        torch.cat([p.raw for p in parts]),
        torch.cat([p.probs for p in parts]),
        torch.cat([p.pred for p in parts]),
        rej,
        sig,
    )
