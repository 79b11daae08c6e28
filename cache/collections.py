"""Image collections (issue 31): named sets of image vectors with ids and metadata, kept in one SQLite file.

Each item is one row (id, content hash, metadata JSON, float32 vector), written in one transaction per request and
committed (WAL, ``synchronous=FULL``) before the request is answered, so an acknowledged item survives a restart and a
``kill -9``. Collections belong to a tenant: every read names the tenant, and another tenant's collection is exactly
an unknown name.

Search and classification read a collection's vectors as one matrix (:class:`Snapshot`), kept per process and
refreshed from the file when the collection's ``version`` changes (only the new rows when nothing was deleted since),
so several API workers on one data dir see each other's writes. Nearest neighbours are exact (one matrix-vector
product) up to ``exact_max`` vectors and approximate above it (:class:`VectorIndex`, a FAISS inverted file).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache.sqlite_files import open_checked

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    cid INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    model_id TEXT NOT NULL,
    dim INTEGER NOT NULL,
    created_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    deletes INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    cid INTEGER NOT NULL,
    id TEXT NOT NULL,
    hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    created_at REAL NOT NULL,
    thumb BLOB,
    UNIQUE (cid, id)
);
CREATE INDEX IF NOT EXISTS items_by_hash ON items (cid, hash);
CREATE TABLE IF NOT EXISTS fields (cid INTEGER NOT NULL, key TEXT NOT NULL, PRIMARY KEY (cid, key));
"""

# Range and set operators of a metadata filter ({"field": value} is equality).
OPERATORS = {"eq": "=", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "in": "IN"}
MAX_IN = 1000


class FilterError(ValueError):
    """A filter that cannot be run: an unknown field, an unknown operator, a value of the wrong type."""


class Exists(Exception):
    """A collection of that name already exists for that tenant."""


@dataclass(frozen=True)
class CollectionInfo:
    cid: int
    tenant: str
    name: str
    model_id: str
    dim: int
    created_at: float
    version: int
    count: int = 0


@dataclass(frozen=True)
class Item:
    id: str
    hash: str
    metadata: dict[str, Any]
    vector: np.ndarray
    created_at: float


@dataclass(frozen=True)
class NewItem:
    """One item to add: ``id`` None = a new id, unless an item with the same content hash exists (then that one's)."""

    id: str | None
    hash: str
    metadata: dict[str, Any] | None
    vector: np.ndarray
    thumb: bytes | None = None  # a small JPEG (imaging/thumbnail.py); None: none kept (an import, or turned off)


@dataclass(frozen=True)
class Added:
    id: str
    added: bool  # False: an item with this content was there already (nothing written but its metadata, if given)


def content_hash(data: bytes) -> str:
    """The key of an image's content: its bytes as sent (not re-encoded), sha256."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def vector_hash(vec: np.ndarray) -> str:
    """The key of an item imported as a vector (no image bytes): the float32 bytes, sha256."""
    return "vec:" + hashlib.sha256(np.ascontiguousarray(vec, np.float32).tobytes()).hexdigest()


def _json_path(key: str) -> str:
    return '$."' + key + '"'


def valid_field(key: str) -> bool:
    """Field names a filter can name (and so the metadata keys that are indexed as fields)."""
    return 0 < len(key) <= 128 and not any(c in key for c in '"\\') and key.isprintable()


def filter_sql(flt: Mapping[str, Any], known: set[str]) -> tuple[str, list[Any]]:
    """A metadata filter -> a WHERE fragment over ``items.metadata`` and its arguments. Conditions are and-combined:
    ``{"f": v}`` is equality, ``{"f": {"gte": a, "lt": b}}`` a range (operators: eq ne gt gte lt lte in)."""
    parts: list[str] = []
    args: list[Any] = []
    for key, cond in flt.items():
        if key not in known:
            raise FilterError(f"Unknown metadata field {key!r} in the filter (no item of this collection has it).")
        expr = "json_extract(metadata, ?)"
        ops = cond if isinstance(cond, dict) else {"eq": cond}
        if not ops:
            raise FilterError(f"Empty condition for field {key!r}.")
        for op, value in ops.items():
            if op not in OPERATORS:
                raise FilterError(f"Unknown filter operator {op!r} for field {key!r} (use {', '.join(OPERATORS)}).")
            if op == "in":
                if not isinstance(value, list) or not 0 < len(value) <= MAX_IN or not all(map(_scalar, value)):
                    raise FilterError(f"'in' for field {key!r} takes a list of 1 to {MAX_IN} scalar values.")
                parts.append(f"{expr} IN ({','.join('?' * len(value))})")
                args += [_json_path(key), *value]
            elif value is None and op in ("eq", "ne"):
                parts.append(f"{expr} IS {'NOT ' if op == 'ne' else ''}NULL")
                args.append(_json_path(key))
            elif not _scalar(value) or value is None:
                raise FilterError(f"Filter value of {key!r} must be a string, number or boolean.")
            else:
                parts.append(f"{expr} {OPERATORS[op]} ?")
                args += [_json_path(key), value]
    return " AND ".join(parts) or "1 = 1", args


def _scalar(v: Any) -> bool:
    """A value SQLite can compare with: a string, a finite float, an int of 64 bits, a boolean, None."""
    if isinstance(v, int) and not isinstance(v, bool):
        return -(2**63) <= v < 2**63
    return v is None or isinstance(v, str | bool) or isinstance(v, float) and math.isfinite(v)


@dataclass
class Snapshot:
    """A collection's vectors as one matrix, rows in insertion order (``seqs`` ascending)."""

    version: int
    deletes: int
    seqs: np.ndarray  # [N] int64
    ids: list[str]
    matrix: np.ndarray  # [N, D] float32
    index: VectorIndex | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size(self) -> int:
        return len(self.ids)

    def rows_of(self, seqs: np.ndarray) -> np.ndarray:
        """Row positions of the given seqs (ascending) that this snapshot holds."""
        pos = np.searchsorted(self.seqs, seqs)
        ok = pos < len(self.seqs)
        pos, seqs = pos[ok], seqs[ok]
        return pos[self.seqs[pos] == seqs]


def grown(
    snap: Snapshot | None, version: int, deletes: int, seqs: np.ndarray, ids: list[str], mat: np.ndarray
) -> Snapshot:
    """A collection's snapshot at ``version``: the rows read (all of them when ``snap`` is None, else only those
    after its last seq) appended to ``snap``'s; its approximate index keeps up (rows added) until the collection has
    grown 4x past what it was trained on."""
    if snap is None:
        return Snapshot(version, deletes, seqs, ids, mat.copy())
    new = Snapshot(
        version, deletes, np.concatenate([snap.seqs, seqs]), snap.ids + ids, np.concatenate([snap.matrix, mat])
    )
    new.index = snap.index
    if new.index is not None:
        if new.size > 4 * new.index.trained_on:
            new.index = None  # grown well past what it was trained on: retrained by the next search that needs it
        else:
            new.index.add(mat)
    return new


def top_k(
    matrix: np.ndarray, query: np.ndarray, k: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact: (row positions, scores) of the ``k`` rows with the highest inner product with ``query``, best first."""
    sub = matrix if rows is None else matrix[rows]
    if sub.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    scores = sub @ query.astype(np.float32)
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    pos = best if rows is None else rows[best]
    return pos.astype(np.int64), scores[best]


class VectorIndex:
    """Approximate inner-product search: a FAISS inverted file (IndexIVFFlat, full vectors, so only the lists not
    probed cost recall), about sqrt(N) lists trained on a sample. How many lists a query probes is calibrated on the
    data at build time: from ``nprobe`` (at least 1/16 of the lists) up, doubled until recall@10 against exact search
    reaches ``target`` for 64 queries midway between two stored vectors (so clustered data probes few lists, diffuse
    data more). Ids are row positions of the snapshot it was built from; rows appended later are added without
    retraining (the index is rebuilt once the collection has grown 4x, or after a delete)."""

    def __init__(self, matrix: np.ndarray, nprobe: int = 16, target: float = 0.97, seed: int = 0) -> None:
        import faiss

        x = np.ascontiguousarray(matrix, dtype=np.float32)
        n, dim = x.shape
        self.trained_on = n
        nlist = max(1, min(int(math.sqrt(n)), n // 39 or 1))
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        self.index.train(sample)
        self.index.add(x)
        self.recall = self._calibrate(x, rng, max(1, min(nlist, max(nprobe, nlist // 16))), target)
        self._lock = threading.Lock()  # FAISS does not search an index while rows are being added to it

    def _calibrate(self, x: np.ndarray, rng: np.random.Generator, nprobe: int, target: float) -> float:
        # Queries: points midway between two stored vectors, normalised. They lie between the data's clusters, as
        # a text query lies away from every image (a stored vector as the query would find its own list at once).
        pairs = x[rng.choice(len(x), size=(64, 2))]
        queries = pairs.sum(axis=1)
        queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        k = min(10, len(x))
        exact = np.argpartition(-(queries @ x.T), k - 1, axis=1)[:, :k]
        while True:
            self.index.nprobe = nprobe
            _, approx = self.index.search(queries, k)
            recall = float(np.mean([len(set(e) & set(a)) / k for e, a in zip(exact, approx)]))
            if recall >= target or nprobe >= self.index.nlist:
                return recall
            nprobe = min(self.index.nlist, nprobe * 2)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, rows: np.ndarray) -> None:
        with self._lock:
            self.index.add(np.ascontiguousarray(rows, dtype=np.float32))

    def search(self, query: np.ndarray, k: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Best first; ``size``: only rows below it (the snapshot searched may be older than the index)."""
        with self._lock:
            scores, pos = self.index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), k)
        keep = (pos[0] >= 0) & (pos[0] < (size if size is not None else self.ntotal))
        return pos[0][keep].astype(np.int64), scores[0][keep]


class CollectionStore:
    """The collections of every tenant in one SQLite file (blocking; the engine calls it from worker threads)."""

    def __init__(self, path: Path, exact_max: int = 100_000, nprobe: int = 16) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.exact_max = exact_max
        self.nprobe = nprobe
        self._lock = threading.Lock()
        aside = self.path.with_name(f"{self.path.stem}.corrupt-{int(time.time())}{self.path.suffix}")
        self._db = open_checked(self.path, self._connect, "SELECT count(*) FROM collections", aside, "collections")
        self._snapshots: dict[int, Snapshot] = {}

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an acknowledged item is on disk, even if the machine then stops
        db.executescript(_SCHEMA)
        if "thumb" not in {r[1] for r in db.execute("PRAGMA table_info(items)")}:  # a file of before thumbnails
            db.execute("ALTER TABLE items ADD COLUMN thumb BLOB")
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- collections ------------------------------------------------------------------------------------------------
    def create(self, tenant: str, name: str, model_id: str, dim: int) -> CollectionInfo:
        now = time.time()
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO collections (tenant, name, model_id, dim, created_at) VALUES (?,?,?,?,?)",
                    (tenant, name, model_id, dim, now),
                )
            except sqlite3.IntegrityError as exc:
                raise Exists(name) from exc
        return CollectionInfo(int(cur.lastrowid or 0), tenant, name, model_id, dim, now, 0, 0)

    def get(self, tenant: str, name: str) -> CollectionInfo | None:
        with self._lock:
            row = self._db.execute(
                "SELECT cid, tenant, name, model_id, dim, created_at, version FROM collections "
                "WHERE tenant=? AND name=?",
                (tenant, name),
            ).fetchone()
            if row is None:
                return None
            (count,) = self._db.execute("SELECT count(*) FROM items WHERE cid=?", (row[0],)).fetchone()
        return CollectionInfo(*row, count=int(count))

    def list(self, tenant: str) -> list[CollectionInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT c.cid, c.tenant, c.name, c.model_id, c.dim, c.created_at, c.version, "
                "(SELECT count(*) FROM items i WHERE i.cid = c.cid) FROM collections c WHERE tenant=? ORDER BY name",
                (tenant,),
            ).fetchall()
        return [CollectionInfo(*r[:7], count=int(r[7])) for r in rows]

    def drop(self, tenant: str, name: str) -> bool:
        with self._lock, self._tx():
            row = self._db.execute("SELECT cid FROM collections WHERE tenant=? AND name=?", (tenant, name)).fetchone()
            if row is None:
                return False
            for table in ("items", "fields", "collections"):
                self._db.execute(f"DELETE FROM {table} WHERE cid=?", (row[0],))
        self._snapshots.pop(int(row[0]), None)
        return True

    # -- items ------------------------------------------------------------------------------------------------------
    def known_vectors(self, cid: int, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Vectors already stored in the collection for these content hashes (so they are not encoded again)."""
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for h in set(hashes):
                row = self._db.execute("SELECT vector FROM items WHERE cid=? AND hash=? LIMIT 1", (cid, h)).fetchone()
                if row is not None:
                    out[h] = np.frombuffer(row[0], np.float32).copy()
        return out

    def add(self, cid: int, items: Sequence[NewItem], new_id: Any) -> list[Added]:
        """Write the items in one transaction, committed before this returns. An item without an id whose content is
        there already is not added again: its existing id is answered (its metadata replaced when given). An item
        with an id replaces the item of that id."""
        now = time.time()
        out: list[Added] = []
        keys: set[str] = set()
        with self._lock, self._tx():
            if self._db.execute("SELECT 1 FROM collections WHERE cid=?", (cid,)).fetchone() is None:
                raise KeyError(cid)
            replaced = 0
            for it in items:
                meta = json.dumps(it.metadata or {}, ensure_ascii=False, sort_keys=True)
                if it.id is None:
                    row = self._db.execute(
                        "SELECT id FROM items WHERE cid=? AND hash=? ORDER BY seq LIMIT 1", (cid, it.hash)
                    ).fetchone()
                    if row is not None:
                        if it.metadata is not None:
                            self._db.execute("UPDATE items SET metadata=? WHERE cid=? AND id=?", (meta, cid, row[0]))
                            keys.update(it.metadata)
                        out.append(Added(row[0], False))
                        continue
                    item_id = new_id()
                else:
                    item_id = it.id
                    replaced += self._db.execute("DELETE FROM items WHERE cid=? AND id=?", (cid, item_id)).rowcount
                blob = np.ascontiguousarray(it.vector, dtype=np.float32).tobytes()
                self._db.execute(
                    "INSERT INTO items (cid, id, hash, metadata, vector, created_at, thumb) VALUES (?,?,?,?,?,?,?)",
                    (cid, item_id, it.hash, meta, blob, now, it.thumb),
                )
                keys.update((it.metadata or {}).keys())
                out.append(Added(item_id, True))
            self._db.executemany(
                "INSERT OR IGNORE INTO fields (cid, key) VALUES (?, ?)", [(cid, k) for k in keys if valid_field(k)]
            )
            self._db.execute(
                "UPDATE collections SET version = version + 1, deletes = deletes + ? WHERE cid=?", (replaced, cid)
            )
        return out

    def item(self, cid: int, item_id: str) -> Item | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, hash, metadata, vector, created_at FROM items WHERE cid=? AND id=?", (cid, item_id)
            ).fetchone()
        if row is None:
            return None
        return Item(row[0], row[1], json.loads(row[2]), np.frombuffer(row[3], np.float32).copy(), row[4])

    def thumbnail(self, cid: int, item_id: str) -> bytes | None:
        """The item's thumbnail, or that of an item of the same content (an image added again under another id)."""
        with self._lock:
            row = self._db.execute(
                "SELECT thumb FROM items WHERE cid=? AND hash=(SELECT hash FROM items WHERE cid=? AND id=?) "
                "AND thumb IS NOT NULL ORDER BY seq LIMIT 1",
                (cid, cid, item_id),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def delete_item(self, cid: int, item_id: str) -> bool:
        with self._lock, self._tx():
            n = self._db.execute("DELETE FROM items WHERE cid=? AND id=?", (cid, item_id)).rowcount
            if n:
                self._db.execute("UPDATE collections SET version=version+1, deletes=deletes+1 WHERE cid=?", (cid,))
        return n > 0

    def fields(self, cid: int) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT key FROM fields WHERE cid=?", (cid,))}

    def matching(self, cid: int, flt: Mapping[str, Any]) -> np.ndarray:
        """Seqs of the items that pass the filter, ascending (FilterError for an unusable filter)."""
        where, args = filter_sql(flt, self.fields(cid))
        with self._lock:
            rows = self._db.execute(f"SELECT seq FROM items WHERE cid=? AND {where} ORDER BY seq", (cid, *args))
            return np.fromiter((r[0] for r in rows), np.int64)

    def metadata(self, cid: int, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                q = f"SELECT id, metadata FROM items WHERE cid=? AND id IN ({','.join('?' * len(chunk))})"
                out.update((r[0], json.loads(r[1])) for r in self._db.execute(q, (cid, *chunk)))
        return out

    def import_rows(self, cid: int, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict[str, Any]]) -> int:
        """Items by id with their vectors as given (an import: nothing encoded), replacing items of the same ids; one
        transaction."""
        rows = [NewItem(i, vector_hash(v), m, v) for i, v, m in zip(ids, np.asarray(vectors, np.float32), metadata)]
        return sum(a.added for a in self.add(cid, rows, lambda: ""))

    # -- vectors ----------------------------------------------------------------------------------------------------
    def snapshot(self, cid: int, dim: int) -> Snapshot:
        """The collection's vectors, refreshed from the file when it changed (only the new rows when nothing was
        deleted since the last refresh)."""
        with self._lock:
            row = self._db.execute("SELECT version, deletes FROM collections WHERE cid=?", (cid,)).fetchone()
            if row is None:
                raise KeyError(cid)
            version, deletes = int(row[0]), int(row[1])
            snap = self._snapshots.get(cid)
            if snap is not None and snap.version == version:
                return snap
            after = int(snap.seqs[-1]) if snap is not None and snap.deletes == deletes and snap.size else -1
            if snap is None or snap.deletes != deletes:
                snap, after = None, -1
            rows = self._db.execute(
                "SELECT seq, id, vector FROM items WHERE cid=? AND seq>? ORDER BY seq", (cid, after)
            ).fetchall()
        seqs = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        ids = [r[1] for r in rows]
        mat = np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), dim)
        new = grown(snap, version, deletes, seqs, ids, mat)
        with self._lock:
            self._snapshots[cid] = new
        return new

    def nearest(
        self, snap: Snapshot, query: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(row positions, scores) best first: exact below ``exact_max`` vectors or over a filtered subset, through
        the approximate index above."""
        if rows is None and snap.size > self.exact_max:
            with snap._lock:  # built by the first search that needs it (classification never does)
                if snap.index is None:
                    snap.index = VectorIndex(snap.matrix, self.nprobe)
            return snap.index.search(query, k, snap.size)
        return top_k(snap.matrix, query, k, rows)

    def check_filter(self, cid: int, flt: Mapping[str, Any]) -> None:
        """FilterError for a filter that cannot run on this collection (before anything is encoded for a search)."""
        filter_sql(flt, self.fields(cid))

    def search(
        self, cid: int, dim: int, query: np.ndarray, k: int, flt: Mapping[str, Any] | None, exclude: str | None
    ) -> list[tuple[str, float, dict[str, Any]]]:
        """The ``k`` items of highest inner product with ``query`` (unit vectors: cosine), best first, among those
        passing the filter, leaving out the item ``exclude``: (id, score, metadata)."""
        seqs = self.matching(cid, flt) if flt is not None else None
        snap = self.snapshot(cid, dim)
        rows = snap.rows_of(seqs) if seqs is not None else None
        pos, scores = self.nearest(snap, np.asarray(query, np.float32), k + (exclude is not None), rows)
        found = [(snap.ids[p], float(s)) for p, s in zip(pos.tolist(), scores.tolist()) if snap.ids[p] != exclude]
        metas = self.metadata(cid, [i for i, _ in found[:k]])
        return [(i, s, metas.get(i, {})) for i, s in found[:k]]

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
