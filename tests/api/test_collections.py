"""Collections in-process (ASGI client, fake encoders, real engine; the SQLite store and the PostgreSQL + pgvector
store): every request shape of README "Collections", dedup without encoding, filters, classify = /classify, import,
thumbnails, cancelling a classification job, tenants, and bad input changing nothing.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import build_app
from testing.client import assert_error, deploy, files
from testing.fakes import FakeClip, fake_engine
from testing.postgres import fresh_database
from tools.embed_parquet import PartWriter

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 220), "grey": (128, 128, 128)}


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (24, 24), noise: int = 0) -> bytes:
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(rgb, np.uint8)
    if noise:
        arr = np.clip(arr.astype(int) + np.random.default_rng(noise).integers(-8, 8, arr.shape), 0, 255).astype(
            np.uint8
        )
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(params=["sqlite", "postgres"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TestClient, FakeClip]]:
    """The app on the SQLite store, then on the PostgreSQL + pgvector one (a real server, a database per test): the
    same requests, the same answers."""
    shared = {}
    if request.param == "postgres":
        shared["collection_url"] = fresh_database(request.getfixturevalue("postgres"))
    engine, clip = fake_engine(tmp_path / "data", detector=False, **shared)
    with TestClient(build_app(engine)) as client:
        yield client, clip
    engine.close()


def add(client: TestClient, name: str, blobs: list[bytes], metadata: list[dict] | None = None, **extra: str):
    data = {"metadata": json.dumps(metadata)} if metadata is not None else {}
    return client.post(f"/collections/{name}/images", files=files(*blobs), data={**data, **extra})


def filled(client: TestClient, name: str = "photos") -> list[str]:
    """A collection of 8 images: two noisy variants of each colour, metadata colour + n."""
    assert client.post("/collections", json={"name": name}).status_code == 201
    blobs, meta = [], []
    for k, (colour, rgb) in enumerate(COLOURS.items()):
        for j in range(2):
            blobs.append(solid(rgb, noise=10 * k + j + 1))
            meta.append({"colour": colour, "n": 2 * k + j})
    r = add(client, name, blobs, meta)
    assert r.status_code == 200, r.text
    return r.json()["ids"]


def test_create_list_get_delete(served: tuple[TestClient, FakeClip]) -> None:
    client, _ = served
    r = client.post("/collections", json={"name": "photos"})
    assert r.status_code == 201 and r.json()["name"] == "photos" and r.json()["count"] == 0
    assert r.json()["model_id"] == "fake-clip"
    assert_error(client.post("/collections", json={"name": "photos"}), 409, "already exists")
    assert client.post("/collections", json={"name": "bad name!"}).status_code == 422
    assert_error(client.post("/collections", json={"name": ".."}), 422, "not dots only")
    nan = '[{"x": NaN}]'
    assert_error(client.post("/collections/photos/images", files=files(solid((3, 3, 3))), data={"metadata": nan}), 422)
    big = {"text": "x", "filter": {"n": 2**64}}
    assert_error(client.post("/collections/photos/search", json=big), 400)
    assert [c["name"] for c in client.get("/collections").json()["collections"]] == ["photos"]
    assert client.get("/collections/photos").json()["count"] == 0
    assert client.delete("/collections/photos").status_code == 200
    assert_error(client.delete("/collections/photos"), 404, "not found")
    assert_error(client.get("/collections/photos"), 404)
    assert client.get("/collections").json()["collections"] == []


def test_add_answers_ids_in_order_and_dedups_by_content(served: tuple[TestClient, FakeClip]) -> None:
    client, clip = served
    ids = filled(client)
    assert len(ids) == 8 and len(set(ids)) == 8
    assert clip.images_encoded == 8
    assert client.get(f"/collections/photos/items/{ids[3]}").json()["metadata"] == {"colour": "green", "n": 3}
    # The same bytes again (one twice in one request): existing ids, nothing encoded or stored.
    again = add(client, "photos", [solid(COLOURS["red"], noise=1), solid(COLOURS["red"], noise=1)])
    assert again.json() == {"ids": [ids[0], ids[0]], "added": 0, "existing": 2}
    assert clip.images_encoded == 8
    assert client.get("/collections/photos").json()["count"] == 8
    # A new image twice in one request is encoded once and stored once.
    twice = add(client, "photos", [solid((1, 2, 3)), solid((1, 2, 3))]).json()
    assert twice["ids"][0] == twice["ids"][1] and twice["added"] == 1 and clip.images_encoded == 9
    # Client ids, and base64 in a JSON body.
    import base64

    body = {"data": [base64.b64encode(solid((9, 9, 9))).decode()], "ids": ["mine/one.png"], "metadata": [{"n": 99}]}
    r = client.post("/collections/photos/images", json=body)
    assert r.json()["ids"] == ["mine/one.png"]
    assert client.get("/collections/photos/items/mine/one.png").json()["metadata"] == {"n": 99}
    assert client.delete("/collections/photos/items/mine/one.png").status_code == 200
    assert_error(client.get("/collections/photos/items/mine/one.png"), 404)
    assert_error(client.delete("/collections/photos/items/mine/one.png"), 404)


def test_search_by_text_image_and_id_with_filters(served: tuple[TestClient, FakeClip]) -> None:
    client, _ = served
    ids = filled(client)
    by_image = client.post("/collections/photos/search", json={"image": _b64(solid(COLOURS["blue"])), "k": 2}).json()
    assert [h["metadata"]["colour"] for h in by_image["results"]] == ["blue", "blue"]
    assert by_image["results"][0]["score"] >= by_image["results"][1]["score"]
    by_id = client.post("/collections/photos/search", json={"id": ids[0], "k": 1}).json()["results"]
    assert [h["id"] for h in by_id] == [ids[1]]  # the query item itself is left out
    text = client.post("/collections/photos/search", json={"text": "anything", "k": 10}).json()["results"]
    assert len(text) == 8 and all(a["score"] >= b["score"] for a, b in zip(text, text[1:]))
    eq = client.post("/collections/photos/search", json={"text": "x", "filter": {"colour": "green"}}).json()
    assert sorted(h["metadata"]["n"] for h in eq["results"]) == [2, 3]
    rng = {"colour": {"in": ["red", "blue", "grey"]}, "n": {"gte": 1, "lt": 5}}
    ranged = client.post("/collections/photos/search", json={"text": "x", "filter": rng}).json()["results"]
    assert sorted(h["metadata"]["n"] for h in ranged) == [1, 4]
    assert_error(
        client.post("/collections/photos/search", json={"text": "x", "filter": {"size": 3}}), 400, "Unknown metadata"
    )
    assert_error(client.post("/collections/photos/search", json={"text": "x", "filter": {"n": {"near": 3}}}), 400)
    assert_error(client.post("/collections/photos/search", json={"k": 3}), 422, "exactly one")
    assert_error(client.post("/collections/nope/search", json={"text": "x"}), 404, "not found")
    assert_error(client.post("/collections/photos/search", json={"id": "nope"}), 404)


def test_classify_collection_equals_classify_without_encoding(served: tuple[TestClient, FakeClip]) -> None:
    client, clip = served
    filled(client)
    classes = [{"name": c, "examples_to_include": [c]} for c in COLOURS]
    deployed = deploy(client, classes, open_set={"label": "unknown", "threshold": 0.55})["deployed_id"]
    encoded = clip.images_encoded
    out = client.post("/collections/photos/classify", json={"deployed_id": deployed, "top": 2}).json()
    assert clip.images_encoded == encoded  # no image encoded
    assert out["total"] == 8 and sum(out["counts"].values()) == 8 and "unknown" in out["counts"]
    for k, (colour, rgb) in enumerate(COLOURS.items()):
        for j in range(2):
            item = out["results"][2 * k + j]
            direct = client.post(
                "/classify", params={"deployed_id": deployed}, files=files(solid(rgb, noise=10 * k + j + 1))
            )
            want = direct.json()
            assert item["pred"] == want["pred"] and item["rejected"] == want["rejected"]
            for name in COLOURS:
                assert abs(item["raw_scores"][name] - want["raw_scores"][name]) <= 1e-6
                assert abs(item["scores"][name] - want["scores"][name]) <= 1e-6
    # Pages, the top of each class, and a filter.
    page = client.post("/collections/photos/classify", json={"deployed_id": deployed, "offset": 6, "limit": 5}).json()
    assert [r["id"] for r in page["results"]] == [r["id"] for r in out["results"][6:]]
    # Past the end (the fuzzer's 7.5e12 gave a 500 from torch.arange): an empty page, the same totals.
    past = client.post("/collections/photos/classify", json={"deployed_id": deployed, "offset": 7_520_484_849_920})
    assert past.status_code == 200 and past.json()["results"] == [] and past.json()["total"] == out["total"]
    for label, rows in out["top"].items():
        assert all(r["id"] in {x["id"] for x in out["results"] if x["pred"] == label} for r in rows)
    sub = client.post("/collections/photos/classify", json={"deployed_id": deployed, "filter": {"colour": "red"}})
    assert sub.json()["total"] == 2
    assert_error(client.post("/collections/photos/classify", json={"deployed_id": "nope"}), 400, "Key not found")
    assert_error(client.post("/collections/nope/classify", json={"deployed_id": deployed}), 404)


def test_bad_input_changes_nothing(served: tuple[TestClient, FakeClip]) -> None:
    client, clip = served
    filled(client)
    encoded = clip.images_encoded
    cases = [
        (add(client, "photos", [solid((5, 5, 5)), b"not an image"]), 422),
        (add(client, "photos", [solid((6, 6, 6))], [{"a": 1}, {"b": 2}]), 422),
        (add(client, "photos", [solid((6, 6, 6))], metadata=None, ids='["a", 3]'), 422),
        (client.post("/collections/photos/images", files=files(solid((6, 6, 6))), data={"metadata": "{nope"}), 422),
        (add(client, "nope", [solid((6, 6, 6))]), 404),
        (client.post("/collections/photos/images", json={"url": "http://127.0.0.1/x.png"}), 400),
    ]
    for r, status in cases:
        assert_error(r, status)
    assert client.get("/collections/photos").json()["count"] == 8
    assert clip.images_encoded == encoded


def test_import_an_embed_dataset_checks_the_model(served: tuple[TestClient, FakeClip], tmp_path: Path) -> None:
    client, clip = served
    assert client.post("/collections", json={"name": "lib"}).status_code == 201
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder, model in ((good, "fake-clip"), (bad, "other-model")):
        w = PartWriter(folder, model, rows_per_part=3)
        w.add([f"/photos/{i}.jpg" for i in range(5)], vecs)
        w.close()

    def parts(folder: Path) -> list:
        return [
            ("data", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.glob("*.parquet"))
        ]

    assert_error(client.post("/collections/lib/import", files=parts(bad)), 422, "other-model")
    assert client.get("/collections/lib").json()["count"] == 0
    r = client.post("/collections/lib/import", files=parts(good))
    assert r.json() == {"imported": 5, "added": 5}
    assert clip.images_encoded == 0
    hits = client.post("/collections/lib/search", json={"id": "/photos/2.jpg", "k": 4}).json()["results"]
    assert len(hits) == 4
    want = np.argsort(-(vecs @ vecs[2]))[1:5]
    assert [h["id"] for h in hits] == [f"/photos/{i}.jpg" for i in want]
    assert client.get("/collections/lib/items/%2Fphotos%2F2.jpg").json()["metadata"] == {"path": "/photos/2.jpg"}
    assert_error(client.post("/collections/lib/import", files=[("data", ("x", b"junk", "x"))]), 422, "Parquet")


def test_tenants_see_only_their_own_collections(tmp_path: Path) -> None:
    ka, kb = "a" * 32, "b" * 32  # keys are at least 32 characters (api/keys.py)
    engine, _ = fake_engine(tmp_path / "data", detector=False, api_keys=f"{ka}:alice,{kb}:bob")
    with TestClient(build_app(engine)) as client:
        a, b = {"Authorization": f"Bearer {ka}"}, {"Authorization": f"Bearer {kb}"}
        assert client.post("/collections", json={"name": "mine"}, headers=a).status_code == 201
        added = client.post("/collections/mine/images", files=files(solid((1, 1, 1))), headers=a)
        assert added.status_code == 200
        thumb = f"/collections/mine/thumbnails/{added.json()['ids'][0]}"
        assert client.get(thumb, headers=a).status_code == 200
        assert_error(client.get(thumb, headers=b), 404)
        assert client.get("/collections", headers=b).json()["collections"] == []
        assert_error(client.post("/collections/mine/search", json={"text": "x"}, headers=b), 404)
        assert_error(client.delete("/collections/mine", headers=b), 404)
        assert client.post("/collections", json={"name": "mine"}, headers=b).status_code == 201  # its own, apart
        assert client.get("/collections/mine", headers=a).json()["count"] == 1
        assert client.get("/collections/mine", headers=b).json()["count"] == 0
        assert client.get("/collections").status_code == 401
    engine.close()


def _b64(blob: bytes) -> str:
    import base64

    return base64.b64encode(blob).decode()


def test_classify_as_a_job(served: tuple[TestClient, FakeClip]) -> None:
    client, _ = served
    filled(client)
    deployed = deploy(client, [{"name": c, "examples_to_include": [c]} for c in COLOURS])["deployed_id"]
    r = client.post("/collections/photos/classify", params={"wait": "false"}, json={"deployed_id": deployed})
    assert r.status_code == 202 and r.headers["location"] == r.json()["status_url"]
    job_id = r.json()["job_id"]
    for _ in range(200):
        report = client.get(f"/jobs/{job_id}").json()
        if report["state"] != "running":
            break
        time.sleep(0.05)
    assert report["state"] == "done" and report["done"] == report["total"] == 8
    result = client.get(f"/collections/photos/classify/{job_id}").json()
    direct = client.post("/collections/photos/classify", json={"deployed_id": deployed}).json()
    assert result == direct
    assert_error(client.get(f"/collections/other/classify/{job_id}"), 404)
    assert_error(client.get("/collections/photos/classify/nope"), 404)
    failed = client.post("/collections/photos/classify", params={"wait": "false"}, json={"deployed_id": "nope"})
    for _ in range(200):
        if client.get(f"/jobs/{failed.json()['job_id']}").json()["state"] != "running":
            break
        time.sleep(0.05)
    assert_error(client.get(f"/collections/photos/classify/{failed.json()['job_id']}"), 400, "Key not found")


def test_cancel_a_classification_job(served: tuple[TestClient, FakeClip], monkeypatch: pytest.MonkeyPatch) -> None:
    """DELETE /jobs/{id} stops a running ?wait=false classification before its next chunk: the job ends cancelled
    within seconds with part of the collection scored, and its result is the cancellation (409), not an answer."""
    import engine.collections as ec
    from engine.kinds import ClassifierKind

    client, _ = served
    filled(client)
    deployed = deploy(client, [{"name": c, "examples_to_include": [c]} for c in COLOURS])["deployed_id"]
    scoring = ClassifierKind.tensors

    def slow(embeddings: np.ndarray, clf: Any) -> Any:
        time.sleep(0.5)  # a long run: 8 chunks of one row, two at a time
        return scoring(embeddings, clf)

    monkeypatch.setattr(ec, "SCORE_CHUNK", 1)
    monkeypatch.setattr(ClassifierKind, "tensors", staticmethod(slow))
    r = client.post("/collections/photos/classify", params={"wait": "false"}, json={"deployed_id": deployed})
    job_id = r.json()["job_id"]
    for _ in range(100):
        if client.get(f"/jobs/{job_id}").json()["total"] == 8:
            break
        time.sleep(0.05)
    t0 = time.monotonic()
    cancelled = client.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200 and time.monotonic() - t0 < 2.0
    report = cancelled.json()
    assert report["state"] == "cancelled" and report["done"] < report["total"] == 8, report
    assert_error(client.get(f"/collections/photos/classify/{job_id}"), 409, "cancelled")
    assert_error(client.delete(f"/jobs/{job_id}"), 409)  # already ended
    monkeypatch.setattr(ClassifierKind, "tensors", staticmethod(scoring))
    done = client.post("/collections/photos/classify", json={"deployed_id": deployed})  # the next one runs whole
    assert done.status_code == 200 and done.json()["total"] == 8


def test_thumbnails_are_small_jpegs_kept_at_add_time(served: tuple[TestClient, FakeClip]) -> None:
    client, _ = served
    assert client.post("/collections", json={"name": "thumbs"}).status_code == 201
    big = solid((200, 40, 40), size=(400, 300), noise=3)
    ids = add(client, "thumbs", [big, solid((1, 2, 3))]).json()["ids"]
    r = client.get(f"/collections/thumbs/thumbnails/{ids[0]}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and img.size == (128, 96) and len(r.content) < 16_000
    red, green, blue = img.convert("RGB").getpixel((64, 48))
    assert red > 150 and green < 90 and blue < 90  # the image's own colours
    again = add(client, "thumbs", [big], ids=json.dumps(["copy"])).json()  # same content, another id: not encoded
    assert again["ids"] == ["copy"]
    assert client.get("/collections/thumbs/thumbnails/copy").content == r.content
    assert_error(client.get("/collections/thumbs/thumbnails/nope"), 404)
    assert_error(client.get(f"/collections/other/thumbnails/{ids[0]}"), 404)
