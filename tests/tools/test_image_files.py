"""Inputs of the folder tool (folders, list files, fsspec URLs) and the FAISS index of an embedding dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imaging.preprocess import Preprocess
from tools.embed_parquet import build_index
from tools.image_files import list_inputs, load_pixels

PRE = Preprocess(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_a_folder_a_list_file_and_a_file_url_name_the_same_images(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.jpg", "sub/a.png", "sub/c.webp"):
        Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image suffix: not listed")
    local = list_inputs(str(folder))
    assert [Path(p).relative_to(folder).as_posix() for p in local] == ["b.jpg", "sub/a.png", "sub/c.webp"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\n{local[2]}\n\n{local[0]}\n{local[2]}\n")
    assert list_inputs(str(listing)) == [local[2], local[0]]  # in the file's order, once each
    urls = list_inputs(folder.as_uri())
    assert urls == [Path(p).as_uri() for p in local]
    for path, url in zip(local, urls):
        a, b = load_pixels(path, PRE, 10**6), load_pixels(url, PRE, 10**6)
        assert a.error is None and b.error is None and np.array_equal(a.pixels, b.pixels)
    gone = load_pixels(str(folder / "missing.jpg"), PRE, 10**6)
    assert gone.pixels is None and "FileNotFoundError" in str(gone.error)


def test_the_ivf_index_finds_each_vector_itself(tmp_path: Path) -> None:
    import faiss

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat, ivf = build_index(x, "auto"), build_index(x, "ivf")
    assert isinstance(flat, faiss.IndexFlatIP) and isinstance(ivf, faiss.IndexIVFFlat)
    assert ivf.nlist == 80 and ivf.nprobe == 32 and ivf.ntotal == 400
    for index in (flat, ivf):
        _, nn = index.search(x, 1)
        assert (nn[:, 0] == np.arange(400)).all()
