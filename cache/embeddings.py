"""The embedding cache: every example text is encoded at most once per (model id, template setting, text).

Storage layout under ``root``:
- ``keys.sqlite3``: the key table, one row per cached vector (namespace, key, text, vector bytes). SQLite gives atomic,
  multi-process-safe appends: a crash mid-write leaves the previous committed state readable, and every API worker
  sees what the others added. It is the truth; the FAISS files below only make a start faster.
- ``<namespace-hash>.faiss``: the namespace's base snapshot, and ``<namespace-hash>.seg-<id>-<pid>.faiss``: segments
  (issue 32), each ``IndexIDMap2`` over inner product with ids = SQLite rowids. A commit that brings the rows not yet
  in any file to ``SNAPSHOT_EVERY`` writes only those rows as a new segment, so a commit's cost does not grow with the
  cache (the whole snapshot was rewritten before: 0.67 s per commit at 88,000 vectors). Once there are
  ``MAX_SEGMENTS`` segments a background thread merges them from their files (into the base once they hold as many
  rows as it: amortised, each row is rewritten O(log n) times), never holding the cache's lock. Every file is written
  to a temporary file and renamed into place, so a crash never leaves a half-written one; a crash between a merge's
  rename and its removal of the merged files leaves rows in two files, read once. ``close`` writes the whole base and
  removes the segments. At start the base and segments are loaded (an unreadable one is skipped) and topped up with
  the key table's rows none of them holds; files holding ids the table lacks (a table set aside) are rebuilt from it.

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
import uuid
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
    max_id: int = 0
    # Rows held in memory but in no FAISS file yet: written as one segment once there are SNAPSHOT_EVERY.
    pending_ids: list[int] = field(default_factory=list)
    pending_vecs: list[np.ndarray] = field(default_factory=list)

    def add(self, ids: np.ndarray, vecs: np.ndarray, pending: bool = True) -> None:
        if len(ids):
            self.index.add_with_ids(vecs, ids)
            self.max_id = max(self.max_id, int(ids.max()))
            if pending:
                self.pending_ids.extend(int(i) for i in ids)
                self.pending_vecs.extend(vecs)


def _rows_of(index: faiss.IndexIDMap2) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], vectors [n, d]) held by an ``IndexIDMap2`` over a flat index, without copying row by row."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    codes = faiss.vector_to_array(faiss.downcast_index(index.index).codes)
    return ids, codes.view(np.float32).reshape(-1, index.d)


def _index_of(dim: int, ids: np.ndarray, vecs: np.ndarray) -> faiss.IndexIDMap2:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def _unique(parts: list[tuple[np.ndarray, np.ndarray]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of several files, each id once (a crash between a merge's rename and its clean-up leaves rows in two
    files)."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    ids = np.concatenate([p[0] for p in parts])
    vecs = np.concatenate([p[1] for p in parts])
    ids, first = np.unique(ids, return_index=True)
    return ids, vecs[first]


class EmbeddingCache:
    """FAISS-backed, disk-persistent text-embedding cache shared by all classifiers of a process."""

    SNAPSHOT_EVERY = 256  # rows in no file before they are written as a segment
    MAX_SEGMENTS = 16  # segments of a namespace before a background merge

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._spaces: dict[str, _Space] = {}
        self._merging: threading.Thread | None = None
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

    def _segments(self, ns: str) -> list[Path]:
        base = self._snapshot_path(ns)
        return sorted(self.root.glob(f"{base.stem}.seg-*.faiss"))

    @staticmethod
    def _read(path: Path, dim: int | None) -> faiss.IndexIDMap2 | None:
        """A snapshot or segment; None (logged) when it is missing, unreadable or not of this namespace's shape: only
        a slower start, the key table holds every row."""
        try:
            index = faiss.read_index(str(path))  # SWIG returns the concrete IndexIDMap2
            if not isinstance(index, faiss.IndexIDMap2) or (dim is not None and index.d != dim):
                raise ValueError("unexpected index type or dimension")
            return index
        except FileNotFoundError:
            return None
        except Exception as exc:
            if path.exists():
                log.warning("embedding snapshot %s unreadable (%s); its rows come from the key table", path, exc)
            return None

    def _load_space(self, ns: str, dim: int | None) -> _Space | None:
        """Base snapshot + segments (if valid) + rows of the key table none of them holds. None when the namespace
        is empty and dim is unknown."""
        indexes: list[faiss.IndexIDMap2] = []
        for path in [self._snapshot_path(ns), *self._segments(ns)]:
            index = self._read(path, dim) if path.exists() else None
            if index is not None:
                dim = index.d
                indexes.append(index)
        if dim is None:
            row = self._db.execute("SELECT dim FROM vectors WHERE ns = ? LIMIT 1", (ns,)).fetchone()
            if row is None:
                return None
            dim = int(row[0])
        space = _Space(dim=dim, index=faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))
        table = self._db.execute("SELECT key, id FROM vectors WHERE ns = ?", (ns,)).fetchall()
        space.ids = dict(table)
        known = np.fromiter(space.ids.values(), np.int64, len(space.ids))
        # One file (a clean start after close): used as it is, without copying its vectors.
        one = len(indexes) == 1
        if one:
            file_ids = faiss.vector_to_array(indexes[0].id_map).astype(np.int64)
            file_vecs = np.zeros((0, dim), np.float32)
            one = len(np.unique(file_ids)) == len(file_ids)
        if not one:
            parts = [_rows_of(index) for index in indexes]
            file_ids, file_vecs = _unique(parts, dim)
        if not np.isin(file_ids, known).all():  # files hold ids the table lacks: rebuild from the table
            file_ids, file_vecs, one = file_ids[:0], file_vecs[:0], False
        if one:
            space.index = indexes[0]
            space.max_id = int(file_ids.max()) if len(file_ids) else 0
        else:
            space.add(file_ids, file_vecs, pending=False)
        del indexes
        missing = np.setdiff1d(known, file_ids, assume_unique=True)
        if len(missing):
            ids, vecs = self._table_rows(ns, missing)
            space.add(ids, vecs)
            if len(space.pending_ids) >= self.SNAPSHOT_EVERY:
                self._write_segment(ns, space)
        return space

    def _table_rows(self, ns: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The key table's vectors of ``ids``."""
        wanted = set(ids.tolist())
        got: list[tuple[int, bytes]] = []
        if len(wanted) > 5000:  # most of the namespace: one scan
            cur = self._db.execute("SELECT id, vec FROM vectors WHERE ns = ? ORDER BY id", (ns,))
            got = [(rid, blob) for rid, blob in cur if rid in wanted]
        else:
            listed = sorted(wanted)
            for start in range(0, len(listed), 500):
                chunk = listed[start : start + 500]
                got += self._db.execute(
                    f"SELECT id, vec FROM vectors WHERE id IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
        return (
            np.asarray([r[0] for r in got], np.int64),
            np.stack([np.frombuffer(r[1], dtype=np.float32) for r in got]),
        )

    def _space(self, ns: str, dim: int | None = None) -> _Space | None:
        space = self._spaces.get(ns)
        if space is None:
            space = self._load_space(ns, dim)
            if space is not None:
                self._spaces[ns] = space
        return space

    def _write_atomic(self, index: faiss.IndexIDMap2, path: Path) -> None:
        tmp = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: readers see the old or the new file, never a torn one

    def _write_segment(self, ns: str, space: _Space) -> None:
        """The rows in no file yet, as a new segment: the commit's cost, whatever the size of the cache."""
        if not space.pending_ids:
            return
        ids = np.asarray(space.pending_ids, np.int64)
        path = self.root / f"{self._snapshot_path(ns).stem}.seg-{uuid.uuid4().hex[:16]}.faiss"
        self._write_atomic(_index_of(space.dim, ids, np.stack(space.pending_vecs)), path)
        space.pending_ids, space.pending_vecs = [], []
        if len(self._segments(ns)) >= self.MAX_SEGMENTS:
            self._merge_soon(ns, space.dim)

    def _merge_soon(self, ns: str, dim: int) -> None:
        """Merge the namespace's segments in a thread of their own (one at a time per cache)."""
        if self._merging is not None and self._merging.is_alive():
            return
        self._merging = threading.Thread(target=self._merge, args=(ns, dim), name="embedding-merge", daemon=True)
        self._merging.start()

    def _merge(self, ns: str, dim: int) -> None:
        """Segments into one, from their files (never under the cache's lock): into the base snapshot once they hold
        as many bytes as it, else into one new segment. The merged files are removed after the result is in place."""
        try:
            segments = self._segments(ns)
            if len(segments) < 2:
                return
            base = self._snapshot_path(ns)
            seg_bytes = sum(p.stat().st_size for p in segments if p.exists())
            into_base = not base.exists() or seg_bytes >= base.stat().st_size
            inputs = [base, *segments] if into_base else segments
            parts = [_rows_of(ix) for ix in (self._read(p, dim) for p in inputs) if ix is not None]
            out = base if into_base else self.root / f"{base.stem}.seg-{uuid.uuid4().hex[:16]}.faiss"
            self._write_atomic(_index_of(dim, *_unique(parts, dim)), out)
            for p in segments:
                p.unlink(missing_ok=True)
        except Exception:  # a failed merge leaves more files to read at the next start; nothing is lost
            log.warning("merging the embedding segments of %s failed", ns, exc_info=True)

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

    def uncached(self, ns: str, texts: list[str]) -> list[str]:
        """The distinct texts not cached (rows another process added are read first); no vector is read back."""
        with self._lock:
            space = self._space(ns)
            by_key = {cache_key(ns, t): t for t in reversed(texts)}  # the first occurrence's text wins
            if space is None:
                return list(dict.fromkeys(texts))
            unknown = [k for k in by_key if k not in space.ids]
            if unknown:
                self._pull(ns, space, unknown)
            missing = {by_key[k] for k in unknown if k not in space.ids}
        return [t for t in dict.fromkeys(texts) if t in missing]

    def _pull(self, ns: str, space: _Space, keys: list[str]) -> None:
        """Load rows another process added since this one loaded the namespace."""
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT id, key, vec FROM vectors WHERE ns = ? AND key IN ({marks})", (ns, *chunk)
            ).fetchall()
            new = [(rid, key, blob) for rid, key, blob in rows if key not in space.ids]
            if new:
                space.add(
                    np.asarray([r[0] for r in new], np.int64),
                    np.stack([np.frombuffer(r[2], dtype=np.float32) for r in new]),
                )
                space.ids.update((key, rid) for rid, key, _ in new)

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
            if len(space.pending_ids) >= self.SNAPSHOT_EVERY:
                self._write_segment(ns, space)

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
        """Write the rows in no file yet as segments; fold the SQLite WAL into the table."""
        with self._lock:
            for ns, space in self._spaces.items():
                self._write_segment(ns, space)
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """One whole snapshot per namespace with rows in no file or in segments (the segments are then removed), so
        the next process reads one file per namespace; then the key table is closed."""
        if self._merging is not None:
            self._merging.join()
        with self._lock:
            for ns, space in self._spaces.items():
                segments = self._segments(ns)
                if space.pending_ids or segments:
                    self._write_atomic(space.index, self._snapshot_path(ns))
                    space.pending_ids, space.pending_vecs = [], []
                    held = set(faiss.vector_to_array(space.index.id_map).tolist())
                    for path in segments:  # another process's segment may hold rows this one has not seen
                        seg = self._read(path, space.dim)
                        if seg is None or set(faiss.vector_to_array(seg.id_map).tolist()) <= held:
                            path.unlink(missing_ok=True)
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
