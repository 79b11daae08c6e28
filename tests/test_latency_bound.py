"""The image latency bound through a real `bentoml serve` (README, "Overload"): with more image requests than the image
encoder can answer within ``ZSS_IMAGE_MAX_LATENCY_MS``, the ones it cannot answer in time get a 503 envelope with
``Retry-After`` (never a 500, never a hang), the others 200.

The encoder is slowed by the test (testing/slow_start: each image sleeps PER_IMAGE_S in the image tower), so its rate
is the test's, about LANES / PER_IMAGE_S images a second on any machine, and CLIENTS back-to-back clients want more
than a bound's worth of it. How the API orders waiting requests (newer first) is tested on a hand-moved clock in
tests/engine/test_admission.py."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.errors import OVERLOADED
from testing.client import files
from testing.images import jpeg_bytes
from testing.models import ClipFiles, clip_env
from testing.server import Server, running_server
from testing.waits import wait_for

pytestmark = pytest.mark.server

SLOW = Path(__file__).resolve().parents[1] / "testing" / "slow_start"
PER_IMAGE_S = 0.2
LANES = 2
BOUND_MS = 1500  # a bound's worth is 2 x 1.5 / 0.2 = 15 images; CLIENTS keep 24 in the queue
CLIENTS = 24


@pytest.fixture(scope="module")
def slowed(tiny_clip: ClipFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("latency-bound")
    env = {
        **clip_env(tiny_clip, base / "data"),
        "ZSS_DETECTOR_MODEL": "none",
        "ZSS_IMAGE_MAX_LATENCY_MS": str(BOUND_MS),
        "ZSS_IMAGE_LANES": str(LANES),
        "PYTHONPATH": str(SLOW),
        "TESTING_SLOW_ENCODE": f"clip_image_encoder:{PER_IMAGE_S}",
    }
    with running_server(env, base / "serve.log") as srv:
        yield srv


def test_more_images_than_the_bound_allows_get_503_with_retry_after_and_the_rest_200(slowed: Server) -> None:
    answers: list[httpx.Response] = []
    stop = threading.Event()
    blob = jpeg_bytes(4, size=(64, 48))

    def client() -> None:
        with slowed.client(timeout=60) as c:  # a hang would be 60 s; an answer takes about the bound
            while not stop.is_set():
                answers.append(c.post("/embed_image", files=files(blob)))

    def seen(status: int) -> int:
        return sum(r.status_code == status for r in list(answers))

    with cf.ThreadPoolExecutor(CLIENTS) as pool:
        workers = [pool.submit(client) for _ in range(CLIENTS)]
        try:
            wait_for(lambda: seen(200) >= 10 and seen(503) >= 10, "both 200s and 503s under the load")
        finally:
            stop.set()
            for w in workers:
                w.result(timeout=120)  # a client's exception (a reset, a timeout) fails the test here

    assert {r.status_code for r in answers} == {200, 503}, {r.status_code for r in answers}
    for r in answers:
        if r.status_code == 503:
            body = r.json()
            # Refused by the API's admission (most: "cannot answer within N s"), or shed by the encoder's own queue
            # (README: "The encoder is overloaded; retry later."); both with Retry-After.
            assert body["status_code"] == 503, body
            assert "within" in body["message"] or body["message"] == OVERLOADED, body
            assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1, r.headers
        else:
            assert len(r.json()["embeddings"]) == 1
    log = slowed.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
