"""The embedding cache: every example text is encoded at most once per (model id, template setting, text).

Storage layout under ``root``:
- ``keys.sqlite3``: the key table, one row per cached vector (namespace, key, text, vector bytes). SQLite gives atomic,
  multi-process-safe appends: a crash mid-write leaves the previous committed state readable, and every API worker
  sees what the others added.
- ``<namespace-hash>.faiss``: a FAISS snapshot of a namespace (``IndexIDMap2`` over inner product, ids = SQLite
  rowids), written to a temporary file and renamed into place, so a crash never leaves a half-written index. At start
  the snapshot is loaded and topped up with rows newer than it; a missing or corrupt snapshot is rebuilt from SQLite.

In memory each namespace is a FAISS index plus a key -> id map, shared by all classifiers of the process; lookups of
keys another process added fall through to SQLite. A corrupt key table is moved aside and the cache starts empty (the
vectors are recomputable); that is logged loudly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from cache.sqlite_files import open_checked

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    text TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vec BLOB NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (ns, key)
);
"""


def namespace(model_id: str, template_version: str | None) -> str:
    """Cache namespace: the model id plus the template setting ("raw" when no templates are applied)."""
    return f"{model_id}|{template_version or 'raw'}"


def cache_key(ns: str, text: str) -> str:
    """Content key of one example text in a namespace."""
    return hashlib.sha256(f"{ns}\x00{text}".encode()).hexdigest()


@dataclass
class LookupStats:
    hits: int = 0
    misses: int = 0
    encoded: int = 0  # distinct texts encoded (misses repeated within one call are encoded once)


@dataclass
class _Space:
    """One namespace held in memory."""

    dim: int
    index: faiss.IndexIDMap2
    ids: dict[str, int] = field(default_factory=dict)
    snapshot_max_id: int = 0  # highest id contained in the on-disk snapshot
    max_id: int = 0


class EmbeddingCache:
    """FAISS-backed, disk-persistent text-embedding cache shared by all classifiers of a process."""

    SNAPSHOT_EVERY = 256  # rows added since the last snapshot before a new snapshot is written

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._spaces: dict[str, _Space] = {}
        self._remove_orphaned_temp_files()
        self._db = self._open_db()

    def _remove_orphaned_temp_files(self) -> None:
        """Snapshot temp files (``*.tmp-<pid>-<thread>``) of processes that died while writing them; a live
        process's file (another API worker writing now) is left alone."""
        for tmp in self.root.glob("*.tmp-*"):
            try:
                pid = int(tmp.suffix.split("-")[1])
                os.kill(pid, 0)  # signal 0: is that process alive?
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
                log.info("removed %s, left by a process that died while writing it", tmp.name)
            except (ValueError, IndexError, PermissionError):
                continue  # not our name pattern, or a live process of another user

    # -- storage -----------------------------------------------------------------------------------------------
    def _open_db(self) -> sqlite3.Connection:
        path = self.root / "keys.sqlite3"

        def drop_snapshots() -> None:  # they index the rows of the file set aside
            for snap in self.root.glob("*.faiss"):
                snap.unlink(missing_ok=True)

        aside = path.with_name(f"keys.corrupt-{int(time.time())}.sqlite3")
        return open_checked(
            path, self._connect, "SELECT count(*) FROM vectors", aside, "embedding cache", on_aside=drop_snapshots
        )

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        # Rows are ~2 KB vectors: with the default 4 KB pages each takes a page of its own (half of it empty). Only
        # takes effect on a new file, before WAL is switched on.
        db.execute("PRAGMA page_size=65536")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    def _snapshot_path(self, ns: str) -> Path:
        return self.root / f"{hashlib.sha256(ns.encode()).hexdigest()[:24]}.faiss"

    def _load_space(self, ns: str, dim: int | None) -> _Space | None:
        """Snapshot (if valid) + rows newer than it. None when the namespace is empty and dim is unknown."""
        snap_path = self._snapshot_path(ns)
        index: faiss.IndexIDMap2 | None = None
        if snap_path.exists():
            try:
                index = faiss.read_index(str(snap_path))  # SWIG returns the concrete IndexIDMap2
                if not isinstance(index, faiss.IndexIDMap2) or (dim is not None and index.d != dim):
                    raise ValueError("unexpected index type or dimension")
            except Exception as exc:  # a corrupt snapshot is only a slower start: rebuild from the key table
                log.warning("embedding snapshot %s unreadable (%s); rebuilding from the key table", snap_path, exc)
                index = None
        if index is None:
            if dim is None:
                row = self._db.execute("SELECT dim FROM vectors WHERE ns = ? LIMIT 1", (ns,)).fetchone()
                if row is None:
                    return None
                dim = int(row[0])
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        space = _Space(dim=index.d, index=index)
        if index.ntotal:
            id_arr = faiss.vector_to_array(index.id_map)
            space.snapshot_max_id = space.max_id = int(id_arr.max())
        snap_ids = set(faiss.vector_to_array(index.id_map).tolist()) if index.ntotal else set()
        rows = self._db.execute("SELECT id, key, vec FROM vectors WHERE ns = ? ORDER BY id", (ns,)).fetchall()
        new_ids, new_vecs = [], []
        for rid, key, blob in rows:
            space.ids[key] = rid
            if rid not in snap_ids:
                new_ids.append(rid)
                new_vecs.append(np.frombuffer(blob, dtype=np.float32))
        if len(snap_ids) != len(rows) - len(new_ids):  # snapshot holds ids the table lacks: rebuild it
            space.index = faiss.IndexIDMap2(faiss.IndexFlatIP(space.dim))
            space.snapshot_max_id = 0
            new_ids = [r[0] for r in rows]
            new_vecs = [np.frombuffer(r[2], dtype=np.float32) for r in rows]
        if new_ids:
            space.index.add_with_ids(np.stack(new_vecs), np.asarray(new_ids, dtype=np.int64))
        space.max_id = max([space.max_id, *new_ids]) if new_ids else space.max_id
        return space

    def _space(self, ns: str, dim: int | None = None) -> _Space | None:
        space = self._spaces.get(ns)
        if space is None:
            space = self._load_space(ns, dim)
            if space is not None:
                self._spaces[ns] = space
        return space

    def _write_snapshot(self, ns: str, space: _Space) -> None:
        path = self._snapshot_path(ns)
        tmp = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
        faiss.write_index(space.index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: readers see the old or the new snapshot, never a torn one
        space.snapshot_max_id = space.max_id

    # -- public API --------------------------------------------------------------------------------------------
    def get(self, ns: str, texts: list[str]) -> tuple[dict[int, np.ndarray], list[int]]:
        """Cached vectors by position in ``texts``, and the positions that are missing."""
        with self._lock:
            space = self._space(ns)
            keys = [cache_key(ns, t) for t in texts]
            if space is None:
                return {}, list(range(len(texts)))
            unknown = [k for k in set(keys) if k not in space.ids]
            if unknown:
                self._pull(ns, space, unknown)
            found: dict[int, np.ndarray] = {}
            missing: list[int] = []
            for i, k in enumerate(keys):
                rid = space.ids.get(k)
                if rid is None:
                    missing.append(i)
                else:
                    found[i] = space.index.reconstruct(rid)
            return found, missing

    def _pull(self, ns: str, space: _Space, keys: list[str]) -> None:
        """Load rows another process added since this one loaded the namespace."""
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT id, key, vec FROM vectors WHERE ns = ? AND key IN ({marks})", (ns, *chunk)
            ).fetchall()
            for rid, key, blob in rows:
                if key in space.ids:
                    continue
                space.index.add_with_ids(np.frombuffer(blob, dtype=np.float32)[None], np.asarray([rid], np.int64))
                space.ids[key] = rid
                space.max_id = max(space.max_id, rid)

    def put(self, ns: str, texts: list[str], vectors: np.ndarray) -> None:
        """Store vectors [N, D] for texts (float32, normalised by the caller); existing keys are kept."""
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(texts):
            raise ValueError("vectors must be [len(texts), D]")
        with self._lock:
            space = self._space(ns, dim=vecs.shape[1])
            if space is None:  # unreachable with dim given; keeps the type checker honest
                raise RuntimeError("namespace could not be created")
            if space.dim != vecs.shape[1]:
                raise ValueError(f"dimension {vecs.shape[1]} does not match the namespace's {space.dim}")
            now = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for text, vec in zip(texts, vecs):
                    self._db.execute(
                        "INSERT OR IGNORE INTO vectors (ns, key, text, dim, vec, created_at) VALUES (?,?,?,?,?,?)",
                        (ns, cache_key(ns, text), text, space.dim, vec.tobytes(), now),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._pull(ns, space, [cache_key(ns, t) for t in texts])
            if space.max_id - space.snapshot_max_id >= self.SNAPSHOT_EVERY:
                self._write_snapshot(ns, space)

    def get_or_encode(
        self, ns: str, texts: list[str], encode: Callable[[list[str]], np.ndarray]
    ) -> tuple[np.ndarray, LookupStats]:
        """Vectors [N, D] for texts, encoding (once, de-duplicated) only those not cached."""
        found, missing = self.get(ns, texts)
        stats = LookupStats(hits=len(texts) - len(missing), misses=len(missing))
        if missing:
            todo = list(dict.fromkeys(texts[i] for i in missing))
            stats.encoded = len(todo)
            new = np.asarray(encode(todo), dtype=np.float32)
            self.put(ns, todo, new)
            by_text = dict(zip(todo, new))
            for i in missing:
                found[i] = by_text[texts[i]]
        if not texts:
            return np.zeros((0, 0), np.float32), stats
        return np.stack([found[i] for i in range(len(texts))]), stats

    def rows(self, batch: int = 1000) -> Iterator[tuple[str, list[str], np.ndarray]]:
        """Every cached vector as (namespace, texts, vectors [n, D]) batches, oldest first (a migration's reader)."""
        last = 0
        while True:
            with self._lock:
                got = self._db.execute(
                    "SELECT id, ns, text, vec FROM vectors WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
                ).fetchall()
            if not got:
                return
            last = got[-1][0]
            by_ns: dict[str, list[tuple[str, bytes]]] = {}
            for _, ns, text, blob in got:
                by_ns.setdefault(ns, []).append((text, blob))
            for ns, items in by_ns.items():
                yield ns, [t for t, _ in items], np.stack([np.frombuffer(b, dtype=np.float32) for _, b in items])

    def count(self, ns: str | None = None) -> int:
        if ns is None:
            return int(self._db.execute("SELECT count(*) FROM vectors").fetchone()[0])
        return int(self._db.execute("SELECT count(*) FROM vectors WHERE ns = ?", (ns,)).fetchone()[0])

    def flush(self) -> None:
        """Write snapshots of namespaces with rows newer than their snapshot; fold the SQLite WAL into the table."""
        with self._lock:
            for ns, space in self._spaces.items():
                if space.max_id > space.snapshot_max_id:
                    self._write_snapshot(ns, space)
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.flush()
        self._db.close()
