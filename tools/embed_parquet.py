"""Image embeddings as a Parquet dataset (path, embedding, model_id), written in parts so a killed job resumes, and the
FAISS index a photo library searches them with.

The dataset is a folder of ``part-NNNNNN.parquet`` files (pyarrow, pandas, DuckDB, Spark and Ray read the folder as
one table); each part is written to a hidden temporary name and renamed when complete, so a kill leaves only whole
parts behind (readers skip names starting with "." or "_").
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

# Exact search up to a million vectors: 1M x 512 float32 is 2 GB and one query scans it in tens of ms on a few cores;
# beyond that an inverted file (IVF) keeps a query to a few lists.
FLAT_MAX = 1_000_000
INDEX_KINDS = ("auto", "flat", "ivf")


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


class PartWriter:
    """Appends rows and writes a part every ``rows_per_part`` rows (and at ``close``)."""

    def __init__(self, folder: Path, model_id: str, rows_per_part: int = 10_000) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.model_id, self.rows_per_part = folder, model_id, max(1, rows_per_part)
        existing = _parts(folder)
        self.next = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.paths: list[str] = []
        self.vectors: list[np.ndarray] = []

    def add(self, paths: list[str], vectors: np.ndarray) -> None:
        self.paths += paths
        self.vectors += list(vectors)
        if len(self.paths) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.paths:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        vec = np.ascontiguousarray(np.stack(self.vectors), dtype=np.float32)
        table = pa.table(
            {
                "path": pa.array(self.paths, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float32()), vec.shape[1]),
                "model_id": pa.array([self.model_id] * len(self.paths), pa.string()),
            }
        )
        final = self.folder / f"part-{self.next:06d}.parquet"
        tmp = self.folder / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self.next += 1
        self.paths, self.vectors = [], []

    def close(self) -> None:
        self.flush()


def done_paths(folder: Path, model_id: str) -> set[str]:
    """Paths already embedded in ``folder``; parts of another model are refused (vectors must never mix)."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in _parts(folder):
        table = pq.read_table(part, columns=["path", "model_id"])
        models = set(table.column("model_id").to_pylist())
        if models - {model_id}:
            raise SystemExit(f"{part} holds embeddings of {sorted(models)}, not {model_id}; use another --out")
        done.update(table.column("path").to_pylist())
    return done


def read_embeddings(folder: Path) -> tuple[list[str], np.ndarray]:
    """Every row of the dataset, parts in name order: (paths, float32 [N, D])."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=["path", "embedding"]) for p in _parts(folder)]
    if not tables:
        return [], np.zeros((0, 0), np.float32)
    table = pa.concat_tables(tables)
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vectors = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return table.column("path").to_pylist(), vectors


def build_index(vectors: np.ndarray, kind: str = "auto", seed: int = 0):  # noqa: ANN201 - a faiss.Index
    """An inner-product index over L2-normalised vectors (inner product = cosine similarity).

    ``flat`` (IndexFlatIP): exact, no training, the default up to ``FLAT_MAX`` vectors. ``ivf`` (IndexIVFFlat): about
    4*sqrt(N) lists trained by k-means on a sample (at most 256 vectors a list), 32 of them probed per query; still
    full vectors, so no quantisation error, only the lists not probed. ``auto`` picks by size."""
    import faiss

    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, not {kind!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = max(1, min(int(4 * math.sqrt(n)), n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))]
        index.train(sample)
        index.nprobe = min(nlist, 32)
    index.add(x)
    return index


def write_index(folder: Path, index_path: Path, kind: str = "auto") -> dict[str, object]:
    """The dataset's index at ``index_path`` and, in ``<index_path>.paths.parquet``, the path of each id (row i of
    the dataset in part order is id i)."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, vectors = read_embeddings(folder)
    if not paths:
        raise SystemExit(f"{folder}: no embeddings to index")
    index = build_index(vectors, kind)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(index_path))
    pq.write_table(pa.table({"path": pa.array(paths, pa.string())}), f"{index_path}.paths.parquet")
    return {"index": type(index).__name__, "vectors": index.ntotal, "dim": int(vectors.shape[1])}
