"""The FAISS-backed embedding cache: encode once, persist, survive restarts, corruption and killed processes.

The multi-process tests run real processes (multiprocessing's "spawn" context: fresh interpreters, as BentoML's
workers are) and synchronise on barriers and pipes, never on sleeps.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sqlite3
import threading
import traceback
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from cache.embeddings import EmbeddingCache, cache_key, namespace


def vecs(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class CountingEncoder:
    def __init__(self, d: int = 8) -> None:
        self.calls: list[list[str]] = []
        self.d = d

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        # Deterministic per text, so a re-encode would be detectable only through the call log.
        return np.stack([vecs(1, self.d, seed=sum(map(ord, t)))[0] for t in texts])


def test_keys_depend_on_model_templates_and_text() -> None:
    a = cache_key(namespace("m1", "tpl.v1"), "cat")
    assert a != cache_key(namespace("m2", "tpl.v1"), "cat")
    assert a != cache_key(namespace("m1", None), "cat")
    assert a != cache_key(namespace("m1", "tpl.v2"), "cat")
    assert a != cache_key(namespace("m1", "tpl.v1"), "cat ")


def test_encodes_each_text_once_and_survives_restart(tmp_path: Path) -> None:
    enc = CountingEncoder()
    ns = namespace("model", None)
    c = EmbeddingCache(tmp_path)
    first, stats = c.get_or_encode(ns, ["a", "b", "a"], enc)
    assert enc.calls == [["a", "b"]]
    assert (stats.hits, stats.misses, stats.encoded) == (0, 3, 2)
    second, stats = c.get_or_encode(ns, ["b", "c"], enc)
    assert enc.calls[-1] == ["c"] and stats.hits == 1
    np.testing.assert_allclose(second[0], first[1])
    c.close()

    c2 = EmbeddingCache(tmp_path)
    again, stats = c2.get_or_encode(ns, ["a", "b", "c"], enc)
    assert len(enc.calls) == 2 and stats.misses == 0
    np.testing.assert_allclose(again[:2], first[:2])


def test_two_caches_in_one_process_share_rows(tmp_path: Path) -> None:
    enc = CountingEncoder()
    ns = namespace("model", None)
    a, b = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)
    a.get_or_encode(ns, ["x"], enc)  # b loads the namespace before "y" exists
    b.get_or_encode(ns, ["x"], enc)
    a.get_or_encode(ns, ["y"], enc)
    _, stats = b.get_or_encode(ns, ["y"], enc)
    assert stats.hits == 1 and len(enc.calls) == 2


# -- real processes ------------------------------------------------------------------------------------------------
NS = namespace("model", "v1")
CHILD_TIMEOUT_S = 60.0  # only a broken test waits this long


def text_vec(text: str, d: int = 8) -> np.ndarray:
    """The vector a (fake, deterministic) encoder gives ``text``: the same in every process."""
    return vecs(1, d, seed=int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))[0]


def text_vecs(texts: list[str]) -> np.ndarray:
    return np.stack([text_vec(t) for t in texts])


def _spawn() -> Any:
    return multiprocessing.get_context("spawn")


def _concurrent_writer(
    root: str, name: str, own: list[str], other: list[str], barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    """One API worker: puts its own texts in chunks while the other worker puts its own, then reads everything."""
    try:
        cache = EmbeddingCache(Path(root))
        half = len(own) // 2
        barrier.wait(CHILD_TIMEOUT_S)  # both processes start writing together
        # Both encode "shared" at the same moment, each to a vector of its own: only one row may win.
        cache.put(NS, ["shared"], text_vec(f"shared|{name}")[None])
        for i in range(0, half, 10):
            cache.put(NS, own[i : min(i + 10, half)], text_vecs(own[i : min(i + 10, half)]))
        barrier.wait(CHILD_TIMEOUT_S)  # both namespaces are loaded and hold rows; the other's next ones are new
        for i in range(half, len(own), 10):
            cache.put(NS, own[i : i + 10], text_vecs(own[i : i + 10]))
        barrier.wait(CHILD_TIMEOUT_S)  # everything both processes put is committed
        texts = [*own, *other, "shared"]
        found, missing = cache.get(NS, texts)
        seen = np.stack([found[i] for i in range(len(texts)) if i in found])
        cache.close()  # writes this process's snapshot
        results.put((name, missing, seen))
    except BaseException:
        results.put((name, "error", traceback.format_exc()))
        raise


def test_two_processes_writing_at_once_see_each_others_rows(tmp_path: Path) -> None:
    n = 150  # each process adds more than SNAPSHOT_EVERY rows' worth of ids: both write snapshots while running
    assert 2 * n > EmbeddingCache.SNAPSHOT_EVERY
    texts = {name: [f"{name}-{i}" for i in range(n)] for name in ("A", "B")}
    ctx = _spawn()
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(
            target=_concurrent_writer,
            args=(str(tmp_path), name, texts[name], texts["B" if name == "A" else "A"], barrier, results),
        )
        for name in ("A", "B")
    ]
    for proc in procs:
        proc.start()
    try:
        got: dict[str, tuple[Any, Any]] = {}
        for _ in procs:
            name, missing, seen = results.get(timeout=CHILD_TIMEOUT_S)
            assert missing != "error", f"process {name} failed:\n{seen}"
            got[name] = (missing, seen)
    finally:
        for proc in procs:
            proc.join(CHILD_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
    assert {name: missing for name, (missing, _) in got.items()} == {"A": [], "B": []}, got
    assert [proc.exitcode for proc in procs] == [0, 0]

    shared_candidates = [text_vec("shared|A"), text_vec("shared|B")]
    for name, (_, seen) in got.items():
        other = "B" if name == "A" else "A"
        np.testing.assert_allclose(seen[:n], text_vecs(texts[name]), rtol=1e-6)
        np.testing.assert_allclose(seen[n : 2 * n], text_vecs(texts[other]), rtol=1e-6)  # the other process's rows
    # Both processes hold the same vector for the text both encoded: the one committed first.
    np.testing.assert_array_equal(got["A"][1][-1], got["B"][1][-1])
    assert any(np.allclose(got["A"][1][-1], v, rtol=1e-6) for v in shared_candidates)

    db = sqlite3.connect(tmp_path / "keys.sqlite3")
    assert db.execute("SELECT count(*) FROM vectors WHERE ns = ?", (NS,)).fetchone()[0] == 2 * n + 1
    assert db.execute("SELECT count(*) FROM vectors WHERE key = ?", (cache_key(NS, "shared"),)).fetchone()[0] == 1
    db.close()

    # A third process (this one) starts from the snapshot the children left and sees every row, exactly once.
    (snap,) = tmp_path.glob("*.faiss")
    assert faiss.read_index(str(snap)).ntotal == 2 * n + 1
    assert not list(tmp_path.glob("*.tmp-*"))
    fresh = EmbeddingCache(tmp_path)
    everything = [*texts["A"], *texts["B"], "shared"]
    found, missing = fresh.get(NS, everything)
    assert missing == []
    np.testing.assert_allclose(np.stack([found[i] for i in range(2 * n)]), text_vecs(everything[:-1]), rtol=1e-6)
    np.testing.assert_array_equal(found[2 * n], got["A"][1][-1])
    fresh.close()


def _killed_in_snapshot_write(root: str, texts: list[str], stage: str, conn: Any) -> None:  # pragma: no cover
    """Puts ``texts`` (enough to trigger a snapshot), and at ``stage`` of the snapshot write tells the parent and
    blocks until the parent kills it: "mid-write" after half the index's bytes reached the temporary file,
    "before-rename" with the temporary file complete and fsynced but not yet renamed into place."""
    if stage == "mid-write":
        real_write_index = faiss.write_index

        def torn_write_index(index: Any, path: str) -> None:
            real_write_index(index, path)
            os.truncate(path, os.path.getsize(path) // 2)  # the second half never made it to the file
            conn.send(("mid-write", path))
            threading.Event().wait()  # killed here

        faiss.write_index = torn_write_index  # what cache.embeddings calls: this child's faiss module only
    else:
        real_replace = os.replace

        def stalled_replace(src: Any, dst: Any) -> None:
            if str(dst).endswith(".faiss"):
                conn.send(("before-rename", str(src)))
                threading.Event().wait()  # killed here
            real_replace(src, dst)

        os.replace = stalled_replace  # type: ignore[assignment]
    cache = EmbeddingCache(Path(root))
    cache.put(NS, texts, text_vecs(texts))  # commits every row, then writes the snapshot
    conn.send(("not killed", ""))


@pytest.mark.parametrize("previous", [True, False], ids=["previous-snapshot", "first-snapshot"])
@pytest.mark.parametrize("stage", ["mid-write", "before-rename"])
def test_process_killed_while_writing_a_snapshot_loses_nothing(tmp_path: Path, stage: str, previous: bool) -> None:
    old = [f"old-{i}" for i in range(10)] if previous else []
    if old:
        cache = EmbeddingCache(tmp_path)
        cache.put(NS, old, text_vecs(old))
        cache.close()  # writes the snapshot the killed process will try to replace
    snaps_before = {p.name: p.read_bytes() for p in tmp_path.glob("*.faiss")}
    assert len(snaps_before) == (1 if previous else 0)
    new = [f"new-{i}" for i in range(EmbeddingCache.SNAPSHOT_EVERY + 20)]

    ctx = _spawn()
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_killed_in_snapshot_write, args=(str(tmp_path), new, stage, writer))
    proc.start()
    writer.close()
    try:
        ready = multiprocessing.connection.wait([reader, proc.sentinel], timeout=CHILD_TIMEOUT_S)
        assert reader in ready, f"the child exited ({proc.exitcode}) before reaching the snapshot write"
        reached, tmp = reader.recv()
        assert reached == stage
        proc.kill()  # SIGKILL: no cleanup, no atexit, no finally in the child
        proc.join(CHILD_TIMEOUT_S)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()

    # The kill really hit the write: its temporary file is there, torn or complete, and was never renamed.
    assert Path(tmp).exists()
    if stage == "mid-write":
        with pytest.raises(RuntimeError):
            faiss.read_index(tmp)
    else:
        assert faiss.read_index(tmp).ntotal == len(new)  # a segment: only the rows in no file yet (issue 32)
    # What is in place is exactly the previous snapshot (or none at all): never the killed process's file.
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.faiss")} == snaps_before
    if previous:
        assert faiss.read_index(str(tmp_path / next(iter(snaps_before)))).ntotal == len(old)

    # A new process opens the cache with every committed vector, and removes the dead writer's temporary file.
    cache = EmbeddingCache(tmp_path)
    assert not Path(tmp).exists()
    assert cache.count(NS) == len(old) + len(new)
    found, missing = cache.get(NS, old + new)
    assert missing == []
    np.testing.assert_allclose(np.stack([found[i] for i in range(len(old + new))]), text_vecs(old + new), rtol=1e-6)
    enc = CountingEncoder()
    _, stats = cache.get_or_encode(NS, [*new[:3], "newer"], enc)
    assert (stats.hits, stats.encoded) == (3, 1) and enc.calls == [["newer"]]
    cache.close()  # and writes a whole snapshot again
    (snap,) = tmp_path.glob("*.faiss")
    assert faiss.read_index(str(snap)).ntotal == len(old) + len(new) + 1


def test_snapshot_is_written_atomically_and_corrupt_snapshot_rebuilds(tmp_path: Path) -> None:
    ns = namespace("model", "v1")
    c = EmbeddingCache(tmp_path)
    texts = [f"t{i}" for i in range(10)]
    c.put(ns, texts, vecs(10))
    c.close()
    snaps = list(tmp_path.glob("*.faiss"))
    assert len(snaps) == 1 and not list(tmp_path.glob("*.tmp-*"))
    snaps[0].write_bytes(b"garbage")
    c2 = EmbeddingCache(tmp_path)
    found, missing = c2.get(ns, texts)
    assert missing == []
    np.testing.assert_allclose(np.stack([found[i] for i in range(10)]), vecs(10), rtol=1e-6)


def test_corrupt_key_table_is_moved_aside(tmp_path: Path) -> None:
    c = EmbeddingCache(tmp_path)
    c.put(namespace("m", None), ["a"], vecs(1))
    c.close()
    for f in tmp_path.glob("keys.sqlite3*"):
        f.write_bytes(b"not a database at all" * 100)
    c2 = EmbeddingCache(tmp_path)
    assert c2.count() == 0
    assert list(tmp_path.glob("keys.corrupt-*"))
    c2.put(namespace("m", None), ["a"], vecs(1))
    assert c2.count() == 1


def test_dimension_mismatch_is_refused(tmp_path: Path) -> None:
    c = EmbeddingCache(tmp_path)
    c.put("ns", ["a"], vecs(1, 8))
    with pytest.raises(ValueError, match="dimension"):
        c.put("ns", ["b"], vecs(1, 4))
    db = sqlite3.connect(tmp_path / "keys.sqlite3")
    assert db.execute("select count(*) from vectors").fetchone()[0] == 1


def test_a_commit_writes_only_its_rows_and_segments_merge_without_losing_or_doubling_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 32: a commit's file write holds the rows in no file yet, not the whole cache; segments are merged in the
    background, and a merge cut short between its rename and its clean-up leaves rows in two files, read once."""
    ns = namespace("model", "v1")
    n_old = 3000
    cache = EmbeddingCache(tmp_path)
    cache.put(ns, [f"old {i}" for i in range(n_old)], vecs(n_old, seed=1))
    cache.close()  # the base snapshot: 3,000 rows
    written: list[int] = []
    real_write = faiss.write_index
    monkeypatch.setattr(
        faiss, "write_index", lambda index, path: (written.append(index.ntotal), real_write(index, path))
    )
    monkeypatch.setattr(EmbeddingCache, "MAX_SEGMENTS", 4)
    cache = EmbeddingCache(tmp_path)
    step = EmbeddingCache.SNAPSHOT_EVERY
    new = [f"new {i}" for i in range(6 * step)]
    for i in range(0, len(new), step):
        cache.put(ns, new[i : i + step], vecs(step, seed=100 + i))
        assert cache._merging is None or cache._merging.join(30) is None
    # Six commits of one segment each: none rewrote the 3,000 old rows; the 4th segment started one merge of
    # 4 x 256 rows into one segment (they hold fewer bytes than the base).
    commits = [w for w in written if w != 4 * step]
    assert commits == [step] * 6 and written.count(4 * step) == 1, written
    segments = sorted(tmp_path.glob("*.seg-*.faiss"))
    assert sorted(faiss.read_index(str(p)).ntotal for p in segments) == [step, step, 4 * step]
    # A merge that died after its rename, before removing what it merged: the same rows in two files.
    (merged,) = [p for p in segments if faiss.read_index(str(p)).ntotal == 4 * step]
    twin = merged.with_name(merged.name.replace(".seg-", ".seg-0"))
    twin.write_bytes(merged.read_bytes())
    (tmp_path / f"{merged.name.split('.')[0]}.seg-garbage.faiss").write_bytes(b"torn")  # and an unreadable one
    fresh = EmbeddingCache(tmp_path)
    texts = [*(f"old {i}" for i in range(n_old)), *new]
    found, missing = fresh.get(ns, texts)
    assert missing == [] and fresh._spaces[ns].index.ntotal == n_old + len(new) == fresh.count(ns)
    np.testing.assert_allclose(found[n_old + step], vecs(step, seed=100 + step)[0], rtol=1e-6)
    fresh.close()  # one whole snapshot again, the segments gone
    assert [faiss.read_index(str(p)).ntotal for p in tmp_path.glob("*.faiss")] == [n_old + len(new)]
