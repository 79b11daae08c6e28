"""Collections through a real `bentoml serve` (the session's tiny-CLIP server): the minimal request shapes of README
"Collections" as written, classifying a collection = /classify on each image, bad input changing nothing; on a
server of its own, `kill -9` during adds and a restart losing no acknowledged item; and two replicas sharing one
PostgreSQL + pgvector store (a real server: tests/conftest.py ``postgres``)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from testing.client import assert_error, deploy, files
from testing.images import png_bytes
from testing.models import ClipFiles, clip_env
from testing.postgres import PostgresServer, fresh_database
from testing.server import Server, running_server, start_server, stop_server

pytestmark = pytest.mark.server


def test_minimal_request_shapes_and_classify_equals_classify(server: Server) -> None:
    blobs = [png_bytes(seed=500 + i, size=(40, 32)) for i in range(6)]
    meta = [{"i": i, "half": "a" if i < 3 else "b"} for i in range(6)]
    with server.client() as c:
        assert c.post("/collections", json={"name": "served"}).status_code == 201
        r = c.post("/collections/served/images", files=files(*blobs), data={"metadata": json.dumps(meta)})
        assert r.status_code == 200, r.text
        ids = r.json()["ids"]
        assert len(ids) == 6 and r.json()["added"] == 6
        encoded = server.metric("zss_images_encoded_total")
        again = c.post("/collections/served/images", files=files(blobs[2])).json()
        assert again["ids"] == [ids[2]] and again["existing"] == 1

        hits = c.post("/collections/served/search", json={"text": "a photo", "k": 10}).json()["results"]
        assert len(hits) == 6 and set(hits[0]) == {"id", "score", "metadata"}
        assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
        flt = c.post("/collections/served/search", json={"text": "x", "k": 10, "filter": {"half": "b", "i": {"lt": 5}}})
        assert sorted(h["metadata"]["i"] for h in flt.json()["results"]) == [3, 4]
        import base64

        by_image = c.post("/collections/served/search", json={"image": base64.b64encode(blobs[4]).decode(), "k": 1})
        assert by_image.json()["results"][0]["id"] == ids[4]
        by_id = c.post("/collections/served/search", json={"id": ids[0], "k": 3}).json()["results"]
        assert len(by_id) == 3 and ids[0] not in {h["id"] for h in by_id}

        deployed = deploy(c)["deployed_id"]
        out = c.post("/collections/served/classify", json={"deployed_id": deployed}).json()
        assert server.metric("zss_images_encoded_total") == encoded  # neither the duplicate nor the collection
        assert out["total"] == 6 and sum(out["counts"].values()) == 6
        for item, blob in zip(out["results"], blobs):
            want = c.post("/classify", params={"deployed_id": deployed}, files=files(blob)).json()
            assert item["pred"] == want["pred"]
            for name, raw in want["raw_scores"].items():
                assert abs(item["raw_scores"][name] - raw) <= 1e-6
                assert abs(item["scores"][name] - want["scores"][name]) <= 1e-6

        # Bad input: a clear 4xx, nothing changed.
        assert_error(c.post("/collections/served/images", files=files(png_bytes(seed=1), b"\x89PNG broken")), 422)
        assert_error(c.post("/collections/nope/images", files=files(png_bytes(seed=1))), 404)
        assert_error(c.post("/collections/served/search", json={"text": "x", "filter": {"colour": "red"}}), 400)
        assert c.get("/collections/served").json()["count"] == 6

        assert c.delete(f"/collections/served/items/{ids[5]}").status_code == 200
        assert c.get("/collections/served").json()["count"] == 5
        assert c.post("/collections/served/classify", json={"deployed_id": deployed}).json()["total"] == 5
        assert c.delete("/collections/served").status_code == 200
        assert_error(c.get("/collections/served"), 404)


def _kill_9(srv: Server) -> None:
    """SIGKILL the server and every process under it at once: nothing gets to clean up or flush."""
    procs = [srv.proc.pid, *(p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True))]
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    srv.proc.wait(timeout=30)


def test_kill_9_during_adds_then_restart_loses_no_acknowledged_item(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    env = clip_env(tiny_clip, tmp_path / "data")
    srv = start_server(env, tmp_path / "first.log")
    acked: list[str] = []
    stop = threading.Event()
    try:
        with srv.client() as c:
            assert c.post("/collections", json={"name": "durable"}).status_code == 201

        def adder(lane: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                k = lane * 100_000
                while not stop.is_set():
                    try:
                        r = c.post(
                            "/collections/durable/images",
                            files=files(png_bytes(seed=10_000 + k, size=(24, 24))),
                            data={"ids": json.dumps([f"img-{k}"])},
                        )
                    except httpx.HTTPError:
                        return  # the server is gone
                    if r.status_code == 200:
                        acked.append(r.json()["ids"][0])
                    k += 1

        threads = [threading.Thread(target=adder, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(acked) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill_9(srv)  # adds still in flight
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        stop.set()
        stop_server(srv)
    assert len(acked) >= 12
    with running_server(env, tmp_path / "second.log") as again, again.client() as c:
        info = c.get("/collections/durable").json()
        assert info["count"] >= len(acked)
        for item_id in acked:
            assert c.get(f"/collections/durable/items/{item_id}").status_code == 200, item_id
        hits = c.post("/collections/durable/search", json={"id": acked[0], "k": 5}).json()["results"]
        assert len(hits) == 5


def test_two_replicas_share_a_postgres_collection(
    tiny_clip: ClipFiles, postgres: PostgresServer, tmp_path: Path
) -> None:
    """Two `bentoml serve` replicas (data dirs of their own) on one PostgreSQL + pgvector (ZSS_COLLECTION_URL): what
    is added through one is listed, searched (same answers) and classified (= /classify) by the other; a delete is
    seen by both; bad input through either changes nothing."""
    url = fresh_database(postgres)
    envs = [{**clip_env(tiny_clip, tmp_path / name), "ZSS_COLLECTION_URL": url} for name in ("a", "b")]
    with cf.ThreadPoolExecutor(2) as pool:  # started side by side: half the wait
        starting = [pool.submit(start_server, env, tmp_path / f"{n}.log") for n, env in zip("ab", envs)]
        cf.wait(starting)
    started = [f.result() for f in starting if f.exception() is None]
    try:
        assert len(started) == 2, [f.exception() for f in starting]
        a, b = started
        blobs = [png_bytes(seed=700 + i, size=(40, 32)) for i in range(6)]
        meta = [{"i": i, "half": "a" if i < 3 else "b"} for i in range(6)]
        with a.client() as ca, b.client() as cb:
            assert ca.post("/collections", json={"name": "shared"}).status_code == 201
            assert_error(cb.post("/collections", json={"name": "shared"}), 409)  # one collection, both see it
            r = ca.post("/collections/shared/images", files=files(*blobs), data={"metadata": json.dumps(meta)})
            assert r.status_code == 200, r.text
            ids = r.json()["ids"]
            assert [c["name"] for c in cb.get("/collections").json()["collections"]] == ["shared"]
            assert cb.get("/collections/shared").json()["count"] == 6
            assert cb.get(f"/collections/shared/items/{ids[3]}").json()["metadata"] == meta[3]
            again = cb.post("/collections/shared/images", files=files(blobs[1])).json()  # dedup across replicas
            assert again["ids"] == [ids[1]] and again["existing"] == 1

            query = {"text": "a photo", "k": 10}
            on_a = ca.post("/collections/shared/search", json=query).json()["results"]
            on_b = cb.post("/collections/shared/search", json=query).json()["results"]
            assert [h["id"] for h in on_a] == [h["id"] for h in on_b] and len(on_b) == 6
            assert all(abs(x["score"] - y["score"]) <= 1e-6 for x, y in zip(on_a, on_b))
            flt = {"text": "x", "k": 10, "filter": {"half": "b", "i": {"lt": 5}}}
            assert sorted(
                h["metadata"]["i"] for h in cb.post("/collections/shared/search", json=flt).json()["results"]
            ) == [3, 4]
            by_image = cb.post(
                "/collections/shared/search", json={"image": base64.b64encode(blobs[4]).decode(), "k": 1}
            )
            assert by_image.json()["results"][0]["id"] == ids[4]

            deployed = deploy(cb)["deployed_id"]
            out = cb.post("/collections/shared/classify", json={"deployed_id": deployed}).json()
            assert out["total"] == 6 and sum(out["counts"].values()) == 6
            for item, blob in zip(out["results"], blobs):
                want = cb.post("/classify", params={"deployed_id": deployed}, files=files(blob)).json()
                assert item["pred"] == want["pred"]
                for name, raw in want["raw_scores"].items():
                    assert abs(item["raw_scores"][name] - raw) <= 1e-6

            assert ca.delete(f"/collections/shared/items/{ids[0]}").status_code == 200
            assert cb.get("/collections/shared").json()["count"] == 5
            assert_error(cb.get(f"/collections/shared/items/{ids[0]}"), 404)
            assert ids[0] not in {h["id"] for h in cb.post("/collections/shared/search", json=query).json()["results"]}
            assert cb.post("/collections/shared/classify", json={"deployed_id": deployed}).json()["total"] == 5

            # Bad input through either replica: a clear 4xx, nothing changed for the other.
            assert_error(cb.post("/collections/shared/images", files=files(png_bytes(seed=1), b"\x89PNG broken")), 422)
            assert_error(cb.post("/collections/shared/search", json={"text": "x", "filter": {"colour": "red"}}), 400)
            assert_error(ca.post("/collections/nope/images", files=files(png_bytes(seed=1))), 404)
            assert ca.get("/collections/shared").json()["count"] == 5
            assert ca.delete("/collections/shared").status_code == 200
            assert_error(cb.get("/collections/shared"), 404)
    finally:
        with cf.ThreadPoolExecutor(2) as pool:
            list(pool.map(stop_server, started))
