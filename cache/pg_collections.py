"""Collections in PostgreSQL with pgvector (README "Collections", ``ZSS_COLLECTION_URL``): the store several replicas
share. Same answers as the embedded SQLite store (cache/collections.py), with the search done by the database.

One table per collection (``zss_items_<cid>``: seq, id, content hash, jsonb metadata, ``vector(dim)`` embedding), so
each has its own dimension and its own index. Every add is one transaction committed before the request is answered;
a collection's ``version`` moves with every write, in that transaction, so each replica's cached copy of the vectors
(classification reads them as one matrix, paged out of the database, only new rows when nothing was deleted) knows
when it is stale. Search is SQL: ``ORDER BY embedding <#> query LIMIT k`` (negative inner product: the vectors are
unit length, so this is the cosine order, and the score is the SQLite store's) with the metadata filter as a WHERE
over the jsonb. It is exact (a scan) until the collection holds more than ``exact_max`` vectors; then one replica
builds an HNSW index in the background (``CREATE INDEX CONCURRENTLY``) and calibrates it: the least ``hnsw.ef_search``
(from ``ef_search`` up, doubled, at most 1,000) at which it finds 97% of the exact top 10 for probe queries, kept in
the collection's row. Searches stay exact until then, and for good when no ef_search reaches it (at a million
clustered 512-d vectors ef_search 200 found only 80%: BENCHMARKS.md). A filtered search is always exact: HNSW filters
after its candidate list and would answer fewer than ``k``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from cache.collections import (
    MAX_IN,
    OPERATORS,
    Added,
    CollectionInfo,
    Exists,
    FilterError,
    Item,
    NewItem,
    Snapshot,
    _scalar,
    grown,
    top_k,
    valid_field,
    vector_hash,
)
from cache.interfaces import StoreUnavailable

log = logging.getLogger(__name__)

PAGE = 20_000  # vectors per page read out of the database into a snapshot
POOL = 8  # connections per process
PLAIN_MAX_DIM = 1500  # vectors up to this size stay in their row (8 kB pages; a row holds one whole vector)
TARGET_RECALL = 0.97  # recall@10 the HNSW index must reach on probe queries, or the collection stays exact
CHECK_S = 5.0  # the least time between two looks at whether a collection needs its index
_SCHEMA_LOCK = 0x2553_5331  # advisory lock: replicas starting at once create the schema one after the other
_INDEX_LOCK = 0x2553_5332  # advisory lock (per collection): one replica builds a collection's index

_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS zss_collections (
    cid BIGSERIAL PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    model_id TEXT NOT NULL,
    dim INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    version BIGINT NOT NULL DEFAULT 0,
    deletes BIGINT NOT NULL DEFAULT 0,
    hnsw_ef INTEGER,
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS zss_collection_fields (
    cid BIGINT NOT NULL REFERENCES zss_collections ON DELETE CASCADE,
    key TEXT NOT NULL,
    PRIMARY KEY (cid, key)
);
"""


def _items(cid: int) -> str:
    return f"zss_items_{int(cid)}"


def filter_where(flt: Mapping[str, Any], known: set[str]) -> tuple[str, list[Any]]:
    """A metadata filter -> a WHERE fragment over the jsonb ``metadata`` column, as the SQLite store reads it: a
    field holding JSON null or missing matches only ``None`` (so ``ne`` leaves it out), equality compares JSON values
    (numbers by value), a range compares only values of the filter value's type (numbers, strings, booleans)."""
    parts: list[str] = []
    args: list[Any] = []
    for key, cond in flt.items():
        if key not in known:
            raise FilterError(f"Unknown metadata field {key!r} in the filter (no item of this collection has it).")
        expr = "NULLIF(metadata -> %s, 'null'::jsonb)"
        ops = cond if isinstance(cond, dict) else {"eq": cond}
        if not ops:
            raise FilterError(f"Empty condition for field {key!r}.")
        for op, value in ops.items():
            if op not in OPERATORS:
                raise FilterError(f"Unknown filter operator {op!r} for field {key!r} (use {', '.join(OPERATORS)}).")
            if op == "in":
                if not isinstance(value, list) or not 0 < len(value) <= MAX_IN or not all(map(_scalar, value)):
                    raise FilterError(f"'in' for field {key!r} takes a list of 1 to {MAX_IN} scalar values.")
                parts.append(f"{expr} = ANY(%s::jsonb[])")
                args += [key, [json.dumps(v) for v in value if v is not None]]
            elif value is None and op in ("eq", "ne"):
                parts.append(f"{expr} IS {'NOT ' if op == 'ne' else ''}NULL")
                args.append(key)
            elif not _scalar(value) or value is None:
                raise FilterError(f"Filter value of {key!r} must be a string, number or boolean.")
            elif op in ("eq", "ne"):
                parts.append(f"{expr} {OPERATORS[op]} %s::jsonb")
                args += [key, json.dumps(value)]
            else:
                parts.append(f"(jsonb_typeof(metadata -> %s) = %s AND {expr} {OPERATORS[op]} %s::jsonb)")
                args += [key, _json_type(value), key, json.dumps(value)]
    return " AND ".join(parts) or "TRUE", args


def _json_type(v: Any) -> str:
    return "boolean" if isinstance(v, bool) else "string" if isinstance(v, str) else "number"


def _array(v: Any) -> np.ndarray:
    """A pgvector value as float32 (the client's Vector, or already an array)."""
    return np.array(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32)


def _raw_vector_loader() -> type:
    from psycopg.adapt import Loader
    from psycopg.pq import Format

    class RawVector(Loader):
        """pgvector's binary form (uint16 dim, uint16 unused, big-endian float32s) -> the float bytes only."""

        format = Format.BINARY

        def load(self, data: Any) -> bytes:
            return bytes(data[4:])

    return RawVector


class _Pool:
    """A few connections, each used by one thread at a time (psycopg 3, autocommit: transactions are explicit)."""

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)

    def connect(self) -> Any:
        import psycopg
        from pgvector.psycopg import register_vector

        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10, prepare_threshold=None)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"The collections' database cannot be reached ({exc})") from exc
        try:
            register_vector(conn)
        except psycopg.ProgrammingError:
            pass  # no extension yet: the schema creates it, and the connection registers it then
        return conn

    @contextmanager
    def conn(self) -> Iterator[Any]:
        import psycopg

        self._slots.acquire()
        c = None
        try:
            try:
                c = self._idle.get_nowait()
            except queue.Empty:
                c = self.connect()
            try:
                yield c
            except psycopg.OperationalError as exc:
                c.close()
                raise StoreUnavailable(f"The collections' database failed ({exc})") from exc
        finally:
            if c is not None and not c.closed:
                self._idle.put(c)
            self._slots.release()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class PgCollectionStore:
    """The collections of every tenant in a PostgreSQL database with pgvector (blocking; the engine calls it from
    worker threads). Several processes and machines may share one database."""

    def __init__(self, url: str, exact_max: int = 100_000, ef_search: int = 200, hnsw_m: int = 16) -> None:
        self.url = url
        self.exact_max = exact_max
        self.ef_search = ef_search
        self.hnsw_m = hnsw_m
        self._pool = _Pool(url, POOL)
        self._lock = threading.Lock()
        self._snapshots: dict[int, Snapshot] = {}
        self._building: set[int] = set()
        self._checked: dict[int, float] = {}
        self._oid: int | None = None
        with self._pool.conn() as c, c.transaction():
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                c.execute(stmt)
        self._pool.close()  # connections made before the extension existed lack its types

    def close(self) -> None:
        self._pool.close()

    # -- collections ------------------------------------------------------------------------------------------------
    def create(self, tenant: str, name: str, model_id: str, dim: int) -> CollectionInfo:
        import psycopg

        now = time.time()
        with self._pool.conn() as c:
            try:
                with c.transaction():
                    (cid,) = c.execute(
                        "INSERT INTO zss_collections (tenant, name, model_id, dim, created_at) VALUES (%s,%s,%s,%s,%s) "
                        "RETURNING cid",
                        (tenant, name, model_id, dim, now),
                    ).fetchone()
                    t = _items(cid)
                    c.execute(
                        f"CREATE TABLE {t} (seq BIGSERIAL PRIMARY KEY, id TEXT NOT NULL UNIQUE, hash TEXT NOT NULL, "
                        f"metadata JSONB NOT NULL, embedding vector({int(dim)}) NOT NULL, "
                        "created_at DOUBLE PRECISION NOT NULL, thumb BYTEA)"
                    )
                    if dim <= PLAIN_MAX_DIM:
                        # Kept in the row, not TOASTed (a 512-d vector is just over TOAST's threshold): a scan, the
                        # exact search and the snapshot's pages read the rows only, not one TOAST lookup per row.
                        c.execute(f"ALTER TABLE {t} ALTER COLUMN embedding SET STORAGE PLAIN")
                    c.execute(f"CREATE INDEX ON {t} (hash)")
            except psycopg.errors.UniqueViolation as exc:
                raise Exists(name) from exc
        return CollectionInfo(int(cid), tenant, name, model_id, dim, now, 0, 0)

    def get(self, tenant: str, name: str) -> CollectionInfo | None:
        with self._pool.conn() as c:
            row = c.execute(
                "SELECT cid, tenant, name, model_id, dim, created_at, version FROM zss_collections "
                "WHERE tenant=%s AND name=%s",
                (tenant, name),
            ).fetchone()
            if row is None:
                return None
            count = self._count(c, row[0])
        return CollectionInfo(*row, count=count)

    def _count(self, c: Any, cid: int) -> int:
        import psycopg

        try:
            return int(c.execute(f"SELECT count(*) FROM {_items(cid)}").fetchone()[0])
        except psycopg.errors.UndefinedTable:  # dropped meanwhile
            return 0

    def list(self, tenant: str) -> list[CollectionInfo]:
        with self._pool.conn() as c:
            rows = c.execute(
                "SELECT cid, tenant, name, model_id, dim, created_at, version FROM zss_collections WHERE tenant=%s "
                "ORDER BY name",
                (tenant,),
            ).fetchall()
            return [CollectionInfo(*r, count=self._count(c, r[0])) for r in rows]

    def drop(self, tenant: str, name: str) -> bool:
        with self._pool.conn() as c, c.transaction():
            row = c.execute(
                "DELETE FROM zss_collections WHERE tenant=%s AND name=%s RETURNING cid", (tenant, name)
            ).fetchone()
            if row is None:
                return False
            c.execute(f"DROP TABLE IF EXISTS {_items(row[0])}")
        with self._lock:
            self._snapshots.pop(int(row[0]), None)
        return True

    # -- items ------------------------------------------------------------------------------------------------------
    def known_vectors(self, cid: int, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Vectors already stored in the collection for these content hashes (so they are not encoded again)."""
        wanted = list(set(hashes))
        if not wanted:
            return {}
        with self._pool.conn() as c, self._table(cid):
            rows = c.execute(
                f"SELECT DISTINCT ON (hash) hash, embedding FROM {_items(cid)} WHERE hash = ANY(%s) ORDER BY hash, seq",
                (wanted,),
            ).fetchall()
        return {h: _array(v) for h, v in rows}

    def add(self, cid: int, items: Sequence[NewItem], new_id: Any) -> list[Added]:
        """As the SQLite store's: one transaction, committed before this returns; an item without an id whose content
        is there already answers its existing id (its metadata replaced when given); an id replaces its item."""
        now = time.time()
        out: list[Added] = []
        keys: set[str] = set()
        t = _items(cid)
        with self._pool.conn() as c, self._table(cid), c.transaction():
            # The collection's row locked: adds to one collection run one at a time (dedup sees the other's rows),
            # and a drop waits for them.
            if c.execute("SELECT 1 FROM zss_collections WHERE cid=%s FOR UPDATE", (cid,)).fetchone() is None:
                raise KeyError(cid)
            replaced = 0
            for it in items:
                meta = json.dumps(it.metadata or {}, ensure_ascii=False, sort_keys=True)
                if it.id is None:
                    row = c.execute(f"SELECT id FROM {t} WHERE hash=%s ORDER BY seq LIMIT 1", (it.hash,)).fetchone()
                    if row is not None:
                        if it.metadata is not None:
                            c.execute(f"UPDATE {t} SET metadata=%s::jsonb WHERE id=%s", (meta, row[0]))
                            keys.update(it.metadata)
                        out.append(Added(row[0], False))
                        continue
                    item_id = new_id()
                else:
                    item_id = it.id
                    replaced += c.execute(f"DELETE FROM {t} WHERE id=%s", (item_id,)).rowcount
                c.execute(
                    f"INSERT INTO {t} (id, hash, metadata, embedding, created_at, thumb) "
                    "VALUES (%s,%s,%s::jsonb,%s,%s,%s)",
                    (item_id, it.hash, meta, np.ascontiguousarray(it.vector, dtype=np.float32), now, it.thumb),
                )
                keys.update((it.metadata or {}).keys())
                out.append(Added(item_id, True))
            fields = sorted(k for k in keys if valid_field(k))
            if fields:
                c.execute(
                    "INSERT INTO zss_collection_fields (cid, key) SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING",
                    (cid, fields),
                )
            c.execute(
                "UPDATE zss_collections SET version = version + 1, deletes = deletes + %s WHERE cid=%s", (replaced, cid)
            )
        self._maybe_index(cid)
        return out

    def item(self, cid: int, item_id: str) -> Item | None:
        with self._pool.conn() as c, self._table(cid):
            row = c.execute(
                f"SELECT id, hash, metadata, embedding, created_at FROM {_items(cid)} WHERE id=%s", (item_id,)
            ).fetchone()
        if row is None:
            return None
        return Item(row[0], row[1], row[2], _array(row[3]), row[4])

    def thumbnail(self, cid: int, item_id: str) -> bytes | None:
        """The item's thumbnail, or that of an item of the same content (an image added again under another id)."""
        t = _items(cid)
        with self._pool.conn() as c, self._table(cid):
            row = c.execute(
                f"SELECT thumb FROM {t} WHERE hash=(SELECT hash FROM {t} WHERE id=%s) AND thumb IS NOT NULL "
                "ORDER BY seq LIMIT 1",
                (item_id,),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def delete_item(self, cid: int, item_id: str) -> bool:
        with self._pool.conn() as c, self._table(cid), c.transaction():
            n = c.execute(f"DELETE FROM {_items(cid)} WHERE id=%s", (item_id,)).rowcount
            if n:
                c.execute("UPDATE zss_collections SET version=version+1, deletes=deletes+1 WHERE cid=%s", (cid,))
        return n > 0

    def fields(self, cid: int) -> set[str]:
        with self._pool.conn() as c:
            return {r[0] for r in c.execute("SELECT key FROM zss_collection_fields WHERE cid=%s", (cid,))}

    def check_filter(self, cid: int, flt: Mapping[str, Any]) -> None:
        filter_where(flt, self.fields(cid))

    def matching(self, cid: int, flt: Mapping[str, Any]) -> np.ndarray:
        """Seqs of the items that pass the filter, ascending (FilterError for an unusable filter)."""
        where, args = filter_where(flt, self.fields(cid))
        with self._pool.conn() as c, self._table(cid):
            rows = c.execute(f"SELECT seq FROM {_items(cid)} WHERE {where} ORDER BY seq", args).fetchall()
        return np.fromiter((r[0] for r in rows), np.int64, len(rows))

    def metadata(self, cid: int, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        with self._pool.conn() as c, self._table(cid):
            rows = c.execute(f"SELECT id, metadata FROM {_items(cid)} WHERE id = ANY(%s)", (list(ids),)).fetchall()
        return dict(rows)

    def import_rows(self, cid: int, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict[str, Any]]) -> int:
        rows = [NewItem(i, vector_hash(v), m, v) for i, v, m in zip(ids, np.asarray(vectors, np.float32), metadata)]
        return sum(a.added for a in self.add(cid, rows, lambda: ""))

    # -- vectors ----------------------------------------------------------------------------------------------------
    def snapshot(self, cid: int, dim: int) -> Snapshot:
        """The collection's vectors as one matrix, read out of the database in pages of ``PAGE`` rows and kept per
        process until the collection's version moves (then only the new rows, unless something was deleted)."""
        with self._lock:
            snap = self._snapshots.get(cid)
        seqs: list[np.ndarray] = []
        ids: list[str] = []
        mats: list[np.ndarray] = []
        with self._pool.conn() as c, self._table(cid), c.transaction():
            # Repeatable read: the version and the pages are one state of the collection.
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = c.execute("SELECT version, deletes FROM zss_collections WHERE cid=%s", (cid,)).fetchone()
            if row is None:
                raise KeyError(cid)
            version, deletes = int(row[0]), int(row[1])
            if snap is not None and snap.version == version:
                return snap
            if snap is not None and snap.deletes != deletes:
                snap = None
            after = int(snap.seqs[-1]) if snap is not None and snap.size else -1
            cur = c.cursor(binary=True)
            cur.adapters.register_loader(self._vector_oid(c), _raw_vector_loader())  # bytes, unpacked at once below
            while True:
                page = cur.execute(
                    f"SELECT seq, id, embedding FROM {_items(cid)} WHERE seq > %s ORDER BY seq LIMIT %s", (after, PAGE)
                ).fetchall()
                if not page:
                    break
                seqs.append(np.fromiter((r[0] for r in page), np.int64, len(page)))
                ids += [r[1] for r in page]
                mats.append(np.frombuffer(b"".join(r[2] for r in page), ">f4").reshape(len(page), dim))
                after = int(page[-1][0])
        new = grown(
            snap,
            version,
            deletes,
            np.concatenate(seqs) if seqs else np.zeros(0, np.int64),
            ids,
            np.concatenate(mats).astype(np.float32) if mats else np.zeros((0, dim), np.float32),
        )
        with self._lock:
            self._snapshots[cid] = new
        return new

    def nearest(
        self, snap: Snapshot, query: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact over a snapshot (the SQLite store's signature; searches here go through :meth:`search`)."""
        return top_k(snap.matrix, query, k, rows)

    def search(
        self, cid: int, dim: int, query: np.ndarray, k: int, flt: Mapping[str, Any] | None, exclude: str | None
    ) -> list[tuple[str, float, dict[str, Any]]]:
        """The ``k`` nearest items in SQL (see the module's doc): (id, score = inner product, metadata), best first."""
        where, args = filter_where(flt, self.fields(cid)) if flt is not None else ("TRUE", [])
        if exclude is not None:
            where += " AND id <> %s"
            args.append(exclude)
        q = np.ascontiguousarray(query, dtype=np.float32)
        with self._pool.conn() as c, self._table(cid), c.transaction():
            row = c.execute("SELECT hnsw_ef FROM zss_collections WHERE cid=%s", (cid,)).fetchone()
            ef = row[0] if row is not None else None
            if flt is not None or ef is None or ef < 0:
                # Exact over the rows that pass: a filter, no index yet, an index not calibrated yet, or one that
                # misses at every ef_search (see the module doc).
                c.execute("SET LOCAL enable_indexscan = off")
            else:  # through the HNSW index (the planner would scan a table of a few thousand rows instead)
                c.execute(f"SET LOCAL enable_seqscan = off; SET LOCAL hnsw.ef_search = {int(min(1000, max(ef, k)))}")
            rows = c.execute(
                f"SELECT id, metadata, embedding <#> %s AS d FROM {_items(cid)} WHERE {where} ORDER BY d LIMIT %s",
                [q, *args, k],
            ).fetchall()
        self._maybe_index(cid)
        return [(r[0], -float(r[2]), r[1]) for r in rows]

    def has_index(self, cid: int) -> bool:
        """Whether the collection's HNSW index is built (and valid)."""
        with self._pool.conn() as c:
            row = c.execute(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class r ON r.oid = i.indexrelid WHERE r.relname = %s",
                (f"{_items(cid)}_hnsw",),
            ).fetchone()
        return bool(row and row[0])

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _vector_oid(self, c: Any) -> int:
        with self._lock:
            if self._oid is None:
                self._oid = int(c.execute("SELECT 'vector'::regtype::oid").fetchone()[0])
            return self._oid

    @contextmanager
    def _table(self, cid: int) -> Iterator[None]:
        """A collection's table gone (dropped meanwhile) is an unknown collection: KeyError, as the SQLite store."""
        import psycopg

        try:
            yield
        except psycopg.errors.UndefinedTable as exc:
            raise KeyError(cid) from exc

    def _maybe_index(self, cid: int) -> None:
        """Above ``exact_max`` vectors, build the collection's HNSW index in a background thread (one replica at a
        time: an advisory lock; searches stay exact until it is valid). Looked at most every ``CHECK_S`` per
        collection and process."""
        now = time.monotonic()
        with self._lock:
            if cid in self._building or now - self._checked.get(cid, -CHECK_S) < CHECK_S:
                return
            self._checked[cid] = now
        if self._needs_index(cid):
            self.ensure_index(cid, wait=False)

    def _needs_index(self, cid: int) -> bool:
        with self._pool.conn() as c:
            # The planner's estimate first: no count(*) over a big table on every add.
            row = c.execute("SELECT reltuples FROM pg_class WHERE relname = %s", (_items(cid),)).fetchone()
            est = float(row[0]) if row else 0.0
            n = est if est >= 0 else self._count(c, cid)  # -1: never analyzed (autovacuum has not come by yet)
        # Above the size: no index yet, or one whose calibration did not finish (a killed process).
        return n > self.exact_max and (not self.has_index(cid) or self.hnsw_ef(cid) is None)

    def ensure_index(self, cid: int, wait: bool = True) -> None:
        """Build the collection's HNSW index now (whatever its size): in this thread, or ``wait=False`` in the
        background."""
        while True:
            with self._lock:
                if cid not in self._building:
                    self._building.add(cid)
                    break
            if not wait:
                return
            time.sleep(0.05)  # another thread builds it: wait for that build, then build only if it failed
        if wait and self.has_index(cid) and self.hnsw_ef(cid) is not None:
            with self._lock:
                self._building.discard(cid)
        elif wait:
            self._build_index(cid)
        else:
            threading.Thread(target=self._build_index, args=(cid,), name=f"zss-hnsw-{cid}", daemon=True).start()

    def _build_index(self, cid: int) -> None:
        try:
            conn = self._pool.connect()
            try:
                if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_INDEX_LOCK, cid)).fetchone()[0]:
                    return  # another process builds it
                if not self.has_index(cid):
                    conn.execute("UPDATE zss_collections SET hnsw_ef = NULL WHERE cid=%s", (cid,))
                    conn.execute(f"DROP INDEX IF EXISTS {_items(cid)}_hnsw")  # an invalid one left by a killed build
                    t0 = time.monotonic()
                    conn.execute(
                        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {_items(cid)}_hnsw ON {_items(cid)} "
                        f"USING hnsw (embedding vector_ip_ops) WITH (m = {int(self.hnsw_m)}, ef_construction = 64)"
                    )
                    log.info("collection %s: HNSW index built in %.1f s", cid, time.monotonic() - t0)
                ef, recall = self.calibrate(cid)
                log.info("collection %s: HNSW ef_search %s (recall@10 %.3f on probe queries)", cid, ef, recall)
            finally:
                conn.close()
        except Exception as exc:  # the searches stay exact; the next add or search tries again
            log.warning("collection %s: HNSW index not built (%s)", cid, exc)
        finally:
            with self._lock:
                self._building.discard(cid)

    def calibrate(self, cid: int, target: float = TARGET_RECALL, queries: int = 64) -> tuple[int, float]:
        """The least ``hnsw.ef_search`` (from ``ef_search``, doubled up to pgvector's 1,000) at which the index finds
        ``target`` of the exact top 10 for probe queries midway between two stored vectors (as the SQLite store's
        index calibrates its lists); kept in the collection's row, which searches read. -1 when even 1,000 does not:
        the collection's searches then stay exact (correct, slower) rather than miss."""
        t = _items(cid)
        with self._pool.conn() as c:
            pairs = [
                _array(r[0]) for r in c.execute(f"SELECT embedding FROM {t} ORDER BY random() LIMIT %s", (2 * queries,))
            ]
        if len(pairs) < 2:
            return -1, 0.0
        mids = [a + b for a, b in zip(pairs[0::2], pairs[1::2])]
        probes = [m / max(float(np.linalg.norm(m)), 1e-12) for m in mids]
        exact = [set(self._top_ids(cid, q, 10, exact=True)) for q in probes]
        ef, recall = max(1, min(self.ef_search, 1000)), 0.0
        while True:
            got = [set(self._top_ids(cid, q, 10, ef=ef)) for q in probes]
            recall = float(np.mean([len(e & g) / max(len(e), 1) for e, g in zip(exact, got)]))
            if recall >= target:
                break
            if ef >= 1000:
                ef = -1
                break
            ef = min(1000, 2 * ef)
        with self._pool.conn() as c:
            c.execute("UPDATE zss_collections SET hnsw_ef = %s WHERE cid=%s", (ef, cid))
        return ef, recall

    def hnsw_ef(self, cid: int) -> int | None:
        """The collection's calibrated ef_search: None = not calibrated (searches exact), -1 = the index misses
        (searches exact), else what searches use."""
        with self._pool.conn() as c:
            row = c.execute("SELECT hnsw_ef FROM zss_collections WHERE cid=%s", (cid,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _top_ids(self, cid: int, q: np.ndarray, k: int, exact: bool = False, ef: int = 0) -> list[int]:
        with self._pool.conn() as c, c.transaction():
            if exact:
                c.execute("SET LOCAL enable_indexscan = off")
            else:
                c.execute(f"SET LOCAL enable_seqscan = off; SET LOCAL hnsw.ef_search = {int(ef)}")
            rows = c.execute(
                f"SELECT seq FROM {_items(cid)} ORDER BY embedding <#> %s LIMIT %s", (np.asarray(q, np.float32), k)
            ).fetchall()
        return [r[0] for r in rows]
