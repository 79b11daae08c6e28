"""engine/exemplars.py: a deployment's URL examples are fetched concurrently (bounded), in order, through the
SSRF-safe fetcher, from a real local HTTP server; and the compiled cache's byte count of a deployment with image
examples includes its probe."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache.embeddings import EmbeddingCache
from engine import exemplars
from engine.configs import ClassifierConfig, ImageUrl
from engine.exemplars import ImageEmbedder
from engine.kinds import tensor_bytes
from errors import ZssError
from imaging.sources import ImageLimits
from semantic.classify import compile_classifier
from testing.server import local_http_server

GATE_S = 10.0  # only a fetcher that never overlaps its fetches waits this out


class _Slow(BaseHTTPRequestHandler):
    """GET /<n>.png: a 4x4 PNG of grey level n; /missing.png: 404. Counts requests in flight, and answers none until
    ``overlap`` of them have been in flight at once (a gate, not a sleep: fetches one at a time would wait out
    ``GATE_S`` and leave ``peak`` at 1, on any machine)."""

    lock = threading.Lock()
    changed = threading.Condition(lock)
    in_flight = 0
    peak = 0
    overlap = 2

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        cls = type(self)
        with cls.changed:
            cls.in_flight += 1
            cls.peak = max(cls.peak, cls.in_flight)
            cls.changed.notify_all()
            cls.changed.wait_for(lambda: cls.peak >= cls.overlap, timeout=GATE_S)
        try:
            name = self.path.strip("/").removesuffix(".png")
            if not name.isdigit():
                self.send_response(404)
                self.end_headers()
                return
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), (int(name),) * 3).save(buf, format="PNG")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(buf.getvalue())))
            self.end_headers()
            self.wfile.write(buf.getvalue())
        finally:
            with cls.lock:
                cls.in_flight -= 1


@pytest.fixture
def port() -> Iterator[int]:
    _Slow.in_flight = _Slow.peak = 0
    _Slow.overlap = 2
    with local_http_server(_Slow) as p:
        yield p


def embedder(tmp_path: Path) -> ImageEmbedder:
    def encode(images: list[Image.Image]) -> np.ndarray:  # a vector that says which picture it was: its grey level
        grey = np.array([np.asarray(im)[0, 0, 0] for im in images], dtype=np.float32)
        return np.stack([np.ones_like(grey), grey / 255.0], axis=1)

    limits = ImageLimits(
        max_pixels=10**6,
        max_bytes=10**6,
        allow_url_fetch=True,
        url_allow_hosts="127.0.0.1",
        url_allow_networks="127.0.0.1/32",
        url_timeout_s=30,  # longer than GATE_S: a fetcher without overlap fails the assertion, not a timeout
    )
    return ImageEmbedder(EmbeddingCache(tmp_path / "cache"), "test-image", encode, limits)


def test_url_examples_are_fetched_concurrently_at_most_url_fetches_at_once(port: int, tmp_path: Path) -> None:
    n = exemplars.URL_FETCHES + 4
    _Slow.overlap = exemplars.URL_FETCHES  # none answered before the fetcher has its whole bound in flight
    urls = [ImageUrl(url=f"http://127.0.0.1:{port}/{10 * i}.png") for i in range(n)]
    classes = [
        ClassifierConfig(name="a", examples_to_include=urls[: n // 2]),
        ClassifierConfig(name="b", examples_to_include=urls[n // 2 :]),
    ]
    found = embedder(tmp_path).embed_classes(classes)
    got = np.concatenate(found.positives)[:, 1] * 255.0
    assert got.round().tolist() == [10 * i for i in range(n)]  # every vector in its example's place
    assert _Slow.peak == exemplars.URL_FETCHES


def test_the_first_failing_url_in_order_is_the_error(port: int, tmp_path: Path) -> None:
    ok = [ImageUrl(url=f"http://127.0.0.1:{port}/{i}.png") for i in range(3)]
    bad = ImageUrl(url=f"http://127.0.0.1:{port}/missing.png")
    classes = [ClassifierConfig(name="a", examples_to_include=["text", *ok, bad, *ok[:1]])]
    with pytest.raises(ZssError, match=r"Class 'a', examples_to_include\[4\]") as err:
        embedder(tmp_path).embed_classes(classes)
    assert err.value.status_code == 400


def test_a_compiled_deployments_bytes_count_its_probe() -> None:
    texts = [torch.eye(8)[j : j + 1] for j in range(3)]
    none = [torch.zeros(0, 8)] * 3
    images = [torch.nn.functional.normalize(torch.eye(8)[j : j + 1] + 0.1, dim=-1).repeat(2, 1) for j in range(3)]
    probed = compile_classifier(["a", "b", "c"], texts, none, images, none)
    plain = compile_classifier(["a", "b", "c"], texts, none, images, none, probe_steps=0)
    assert probed.probe is not None and plain.probe is None
    assert tensor_bytes(probed) == tensor_bytes(plain) + 3 * 8 * 4 + 3 * 8  # [3, 8] float32 weights, [3] int64 classes
