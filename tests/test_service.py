"""The HTTP API through a real `bentoml serve` of the tiny random-weight model."""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from semantic.templates import CLIP_TEMPLATES
from testing.client import CLASSES, assert_error, deploy, files
from testing.images import jpeg_bytes, png_bytes
from testing.models import ClipFiles, clip_env
from testing.reference import reference_scores
from testing.server import Server, running_server

pytestmark = pytest.mark.server


def test_deploy_messages(server: Server) -> None:
    with server.client() as c:
        first = deploy(c)
        assert first["message"] == "New model deployed."
        again = deploy(c, deployed_id=first["deployed_id"])
        assert again == {"deployed_id": first["deployed_id"], "message": "Model updated."}
        missing = deploy(c, deployed_id="no-such-id")
        assert missing["message"] == "no-such-id model not found. Generated new model."
        assert missing["deployed_id"] != "no-such-id"


def test_classify_shapes_single_and_many(server: Server) -> None:
    with server.client() as c:
        dep = deploy(c)
        r = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(jpeg_bytes(1)))
        assert r.status_code == 200, r.text
        one = r.json()
        assert set(one) == {"scores", "pred", "raw_scores"}
        assert set(one["scores"]) == {"cat", "car", "tree"}
        assert sum(one["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert one["pred"] == max(one["raw_scores"], key=one["raw_scores"].get)
        r = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(jpeg_bytes(1), png_bytes(2)))
        many = r.json()
        assert isinstance(many, list) and len(many) == 2
        assert many[0]["raw_scores"] == pytest.approx(one["raw_scores"], abs=1e-6)


@pytest.mark.parametrize("augment", [True, False])
def test_raw_scores_equal_rule_recomputed_from_embedding_routes(server: Server, augment: bool) -> None:
    with server.client() as c:
        dep = deploy(c, augment_examples=augment)
        texts = sorted({t for cl in CLASSES for t in cl["examples_to_include"] + cl["examples_to_exclude"]})
        r = c.post("/embed_text", json={"texts": texts, "augment_examples": augment})
        vec = dict(zip(texts, np.asarray(r.json()["embeddings"], dtype=np.float64)))
        blobs = [jpeg_bytes(s, size=(80 + s, 60)) for s in range(4)]
        img = np.asarray(c.post("/embed_image", files=files(*blobs)).json()["embeddings"], dtype=np.float64)
        assert img.shape == (4, 32)
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
        got = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(*blobs)).json()
        for k in range(4):
            expected = reference_scores(img[k], CLASSES, vec)
            assert got[k]["raw_scores"] == pytest.approx(expected, abs=1e-5)


def test_prompt_ensembling_is_the_normalised_mean_of_the_template_embeddings(server: Server) -> None:
    """augment_examples=True gives, per text, the normalised mean of the normalised embeddings of the text in each of
    the 80 CLIP templates, each taken from /embed_text without ensembling (the mean is written out here)."""
    texts = ["a cat", "a {weird} name"]  # braces: the text is put into the template, not formatted
    with server.client() as c:
        aug = np.asarray(c.post("/embed_text", json={"texts": texts, "augment_examples": True}).json()["embeddings"])
        for text, got in zip(texts, aug):
            prompts = [t.replace("{}", text) for t in CLIP_TEMPLATES]
            assert len(prompts) == 80 and text in prompts[0]
            r = c.post("/embed_text", json={"texts": prompts, "augment_examples": False})
            per_template = np.asarray(r.json()["embeddings"], dtype=np.float64)
            per_template /= np.linalg.norm(per_template, axis=1, keepdims=True)
            mean = per_template.mean(axis=0)
            np.testing.assert_allclose(got, mean / np.linalg.norm(mean), atol=2e-5)
        raw = c.post("/embed_text", json={"texts": texts[:1], "augment_examples": False}).json()["embeddings"]
        assert not np.allclose(raw[0], aug[0], atol=1e-3)
        assert c.post("/embed_text", json={"texts": []}).json() == {"embeddings": []}


def test_model_config_list_and_delete(server: Server) -> None:
    with server.client() as c:
        dep = deploy(c, augment_examples=False)
        cfg = c.get("/model_config", params={"deployed_id": dep["deployed_id"]}).json()
        # Exactly the deployed body plus its id (DirectAI's form), through a restart-proof registry round trip.
        assert cfg == {"classifier_configs": CLASSES, "augment_examples": False, "deployed_id": dep["deployed_id"]}
        listed = {d["deployed_id"]: d for d in c.get("/deployments").json()["deployments"]}
        assert listed[dep["deployed_id"]]["n_classes"] == 3 and listed[dep["deployed_id"]]["kind"] == "classifier"
        assert c.delete(f"/deployments/{dep['deployed_id']}").json()["message"] == "Model deleted."
        assert_error(c.get("/model_config", params={"deployed_id": dep["deployed_id"]}), 400, "Key not found")
        r = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(jpeg_bytes()))
        assert_error(r, 400, "Key not found")
        assert_error(c.delete(f"/deployments/{dep['deployed_id']}"), 400, "Key not found")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"classifier_configs": []}, 422, "Class list is empty."),
        (
            {"classifier_configs": [{"name": "a"}]},
            422,
            "body -> classifier_configs -> 0 -> examples_to_include field required (type=value_error.missing)",
        ),
        (
            {"classifier_configs": [{"name": "a", "examples_to_include": []}]},
            422,
            "Model lacks example_to_include for a class.",
        ),
        ({"classifier_configs": [{"examples_to_include": ["x"]}]}, 422, "classifier_configs -> 0 -> name"),
        ({"classifier_configs": "cats"}, 422, "classifier_configs"),
        ({}, 422, "classifier_configs"),
        (
            {"classifier_configs": [{"name": "a", "examples_to_include": ["x"]}] * 2},
            422,
            "Duplicate class name",
        ),
        ({"classifier_configs": [{"name": "a", "examples_to_include": ["  "]}]}, 422, "empty example"),
    ],
)
def test_deploy_errors(server: Server, body: dict[str, Any], status: int, message: str) -> None:
    with server.client() as c:
        assert_error(c.post("/deploy_classifier", json=body), status, message)


def test_deploy_malformed_json(server: Server) -> None:
    with server.client() as c:
        r = c.post("/deploy_classifier", content=b"{not json", headers={"content-type": "application/json"})
        assert_error(r, 422)


@pytest.mark.parametrize(
    "blob",
    [b"", b"not an image at all", jpeg_bytes()[:200], png_bytes()[:60]],
    ids=["empty", "text", "truncated-jpeg", "truncated-png"],
)
def test_classify_invalid_image(server: Server, blob: bytes) -> None:
    with server.client() as c:
        dep = deploy(c)
        r = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(blob))
        assert_error(r, 422, "Invalid image received, unable to open.")
        # The service keeps serving after bad input.
        ok = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(jpeg_bytes()))
        assert ok.status_code == 200


def test_classify_request_errors(server: Server) -> None:
    with server.client() as c:
        dep = deploy(c)
        assert_error(c.post("/classify", params={"deployed_id": "nope"}, files=files(jpeg_bytes())), 400, "Key not")
        assert_error(c.post("/classify", files=files(jpeg_bytes())), 422, "deployed_id")
        r = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, json={"data": "x"})
        assert_error(r, 422, "base64")
        headers = {"content-type": "a/b"}
        r = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, content=b"x", headers=headers)
        assert_error(r, 422, "multipart/form-data")
        r = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, data={"other": "x"}, files={"f": b"x"})
        assert_error(r, 422, "field 'data'")


def test_concurrent_requests_are_batched(server: Server) -> None:
    # On the shared server again: its /metrics went stale when other test servers started under the same
    # BENTOML_HOME, before each server had a metrics folder of its own (the test below).
    _check_batching(server)
    _check_layout_and_no_reconnects(server)


def test_two_servers_under_one_bentoml_home_keep_their_own_metrics(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    """BentoML keeps every server's multiprocess metric files in one folder per BENTOML_HOME and empties it when a
    server starts: the first server's /metrics went stale and each showed the other's counters. Each server now has a
    folder of its own (runners/bentoml_internals.py own_metrics_dir), under the same home."""

    def encode_two(server: Server, tag: str) -> None:
        with server.client() as c:
            r = c.post("/embed_text", json={"texts": [f"{tag} one", f"{tag} two"], "augment_examples": False})
            assert r.status_code == 200, r.text

    home = {"BENTOML_HOME": str(tmp_path / "home")}  # one home, as two servers of one user have
    with running_server({**clip_env(tiny_clip, tmp_path / "a"), **home}, tmp_path / "a.log") as a:
        encode_two(a, "first")
        before = a.metric("zss_text_prompts_encoded_total")
        assert before >= 2
        with running_server({**clip_env(tiny_clip, tmp_path / "b"), **home}, tmp_path / "b.log") as b:
            encode_two(a, "second")
            assert a.metric("zss_text_prompts_encoded_total") == before + 2  # not deleted by B's start
            assert b.metric("zss_text_prompts_encoded_total") == 0  # and not shown by B
        assert len(list((tmp_path / "home" / "zss-metrics").iterdir())) == 2  # a folder per server


def test_overloaded_image_encoder_is_a_503_and_the_server_goes_on(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    # A queue bound of 0 ms sheds every image request: the encoder's 503 must cross the service boundary as the API's
    # 503 envelope (not a 500), and the rest of the server must keep working.
    env = {**clip_env(tiny_clip, tmp_path / "data"), "ZSS_IMAGE_MAX_LATENCY_MS": "0"}
    with running_server(env, tmp_path / "serve.log") as server, server.client() as c:
        for _ in range(3):
            assert_error(c.post("/embed_image", files=files(jpeg_bytes())), 503, "overloaded")
        r = c.post("/embed_text", json={"texts": ["a cat"]})
        assert r.status_code == 200, r.text
        log = server.log()
        assert "unhandled error" not in log
        # Expected under overload: a WARNING line now and then, never an ERROR with a traceback per request.
        assert "Traceback" not in log and "Exception on /encode_pixels" not in log, log[-3000:]
        assert "image encoder overloaded: a request was shed" in log
        assert log.count("image encoder overloaded: a request was shed") < 3  # at most one line per 5 s
        assert server.metric("zss_images_shed_total") == 3
        # The detector is off: no detector process runs (no memory), and /detect says why.
        import psutil

        services = [" ".join(p.cmdline()) for p in psutil.Process(server.proc.pid).children(recursive=True)]
        assert any("clip_image_encoder" in cmd for cmd in services), services
        assert not any("owl_detector" in cmd for cmd in services), services
        r = c.post("/deploy_detector", json={"detector_configs": [{"name": "a", "examples_to_include": ["a"]}]})
        assert_error(r, 503, "Detection is unavailable: the detector is disabled on this server")


def _check_layout_and_no_reconnects(server: Server) -> None:
    # The CPU layout: one image-encoder process with min(2, quota) lanes, each lane with its share of the quota as
    # torch threads (ZSS_LOG_LEVEL=INFO). The quota written plainly here (not runners.device's): the server's affinity
    # mask, capped by a cgroup v2 limit where there is one.
    quota = len(os.sched_getaffinity(server.proc.pid))
    cpu_max = Path("/sys/fs/cgroup/cpu.max")
    if cpu_max.exists() and cpu_max.read_text().split()[0] != "max":
        limit, period = map(int, cpu_max.read_text().split()[:2])
        quota = min(quota, max(1, limit // period))
    pattern = r"image encoder \S+ ready \((\d+) lanes x (\d+) torch threads?, 1 of (\d+) workers\)"
    layouts = re.findall(pattern, server.log())
    lanes = min(2, quota)
    assert layouts == [(str(lanes), str(max(1, quota // lanes)), "1")], layouts
    # Well over BentoML's default of 100 requests per dependency-client session, 16 at a time: the session must not
    # be replaced under requests in flight (they failed with ServerDisconnectedError and were encoded twice).
    blob = jpeg_bytes(8, size=(320, 240))

    def one(_: int) -> int:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return c.post("/embed_image", files=files(blob)).status_code

    with cf.ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(240))) == {200}
    assert "encoder call failed" not in server.log()


def _check_batching(server: Server) -> None:
    def calls_and_singles() -> tuple[float, float]:
        lines = server.metric_lines("zss_image_batch_size")
        total = sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("zss_image_batch_size_count"))
        ones = sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if "_bucket" in ln and 'le="1.0"' in ln)
        return total, ones

    before_total, before_ones = calls_and_singles()
    blob = jpeg_bytes(7, size=(640, 480))

    def one(_: int) -> int:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return c.post("/embed_image", files=files(blob)).status_code

    # Several rounds: a round can happen to form only singles when the clients' requests arrive spread out.
    for _ in range(6):
        with cf.ThreadPoolExecutor(16) as pool:
            assert set(pool.map(one, range(32))) == {200}
        total, ones = calls_and_singles()
        if (total - before_total) > (ones - before_ones):
            break
    total, ones = calls_and_singles()
    assert total - before_total > 0, "the image encoder recorded no calls"
    assert (total - before_total) > (ones - before_ones), "no batch larger than 1 was formed"
    # Fewer encoder calls than requests: requests shared batches.
    images = server.metric("zss_image_batch_size_sum")
    assert images > total
    # Each batch's wall time is recorded too (the "one batch" of the latency bound, bench/overload.py reads it).
    assert server.metric("zss_image_batch_seconds_count") == total
    assert server.metric("zss_image_batch_seconds_sum") > 0
    # Every service set its start-up heap aside when it was ready, and its collector's pauses are measured
    # (runners/heap.py: full collections that walked that heap were most of /embed_image's p99).
    assert server.log().count("objects from the start set aside from garbage collection") >= 3  # API + 2 encoders
    assert server.metric("zss_gc_pause_seconds_count") > 0


def test_openapi_lists_the_routes(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    routes = {(p, m) for p, ops in spec["paths"].items() for m in ops}
    expected = {
        ("/deploy_classifier", "post"),
        ("/classify", "post"),
        ("/model_config", "get"),
        ("/deployments", "get"),
        ("/deployments/{deployed_id}", "delete"),
        ("/embed_text", "post"),
        ("/embed_image", "post"),
        ("/deploy_detector", "post"),
        ("/detect", "post"),
        ("/text-embeddings", "post"),
        ("/image-embeddings", "post"),
    }
    assert expected <= routes
    # Image routes document both body forms the parser accepts, and every route its error envelope.
    for path in ("/classify", "/embed_image", "/detect"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content)
        assert {"400", "413", "422"} <= set(spec["paths"][path]["post"]["responses"])


def test_restart_classifies_with_zero_text_encodes(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    env = clip_env(tiny_clip, tmp_path / "data")
    blob = jpeg_bytes(3)
    with running_server(env, tmp_path / "first.log") as srv:
        with srv.client() as c:
            dep = deploy(c)
            before = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(blob)).json()
        assert srv.metric("zss_text_examples_encoded_total") > 0
    with running_server(env, tmp_path / "second.log") as srv:
        with srv.client() as c:
            after = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(blob)).json()
            # Redeploying the same examples hits the cache too.
            deploy(c, deployed_id=dep["deployed_id"])
            # This server runs without a detector (ZSS_DETECTOR_MODEL=none): a clear 503, not a crash.
            body = {"detector_configs": [{"name": "a", "examples_to_include": ["a"]}]}
            assert_error(c.post("/deploy_detector", json=body), 503, "Detection is unavailable")
        assert after["raw_scores"] == pytest.approx(before["raw_scores"], abs=1e-6)
        assert srv.metric("zss_text_examples_encoded_total") == 0
        # ... nor did training the text encoder's batching before ready (empty requests, engine/encoders.py).
        assert srv.metric("zss_text_prompts_encoded_total") == 0
        assert "the text encoder's batching is trained" in srv.log()
        assert srv.metric("zss_embedding_cache_hits_total") > 0


def test_an_open_server_on_loopback_logs_its_open_state_without_the_warning(server: Server) -> None:
    # The shared server has no keys and listens on 127.0.0.1: said once, quietly (the loud warning is for an open
    # server beyond loopback; tests/api/test_auth.py checks it and how the worker finds its address).
    log = server.log()
    assert log.count("API keys: none (ZSS_API_KEYS is empty)") == 1 and "WITHOUT API KEYS" not in log
