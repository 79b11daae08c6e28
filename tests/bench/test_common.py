"""bench.common's load generator against a small local HTTP server: what it sends and what it counts."""

from __future__ import annotations

import email.parser
import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench.common import image_post, jpeg, steady_load
from testing.server import local_http_server


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the encoder's clients use it
    delay_s = 0.05
    fail_every = 0
    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        with cls.lock:
            cls.count += 1
            n = cls.count
        time.sleep(cls.delay_s)
        status = 500 if cls.fail_every and n % cls.fail_every == 0 else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _server(fail_every: int = 0) -> Iterator[str]:
    handler = type("H", (_Handler,), {"count": 0, "fail_every": fail_every, "lock": threading.Lock()})
    with local_http_server(handler) as port:
        yield f"http://127.0.0.1:{port}"


def test_image_post_is_a_form_with_the_jpeg_as_field_data() -> None:
    blob = jpeg(64, 48)
    post = image_post("/embed_image", blob)
    head = b"Content-Type: " + post.content_type.encode() + b"\r\n\r\n"
    msg = email.parser.BytesParser().parsebytes(head + post.body)
    parts = msg.get_payload()
    assert msg.is_multipart() and len(parts) == 1
    assert parts[0].get_param("name", header="content-disposition") == "data"
    assert parts[0].get_content_type() == "image/jpeg"
    assert parts[0].get_payload(decode=True) == blob


def test_steady_load_counts_only_the_window_and_every_status() -> None:
    post = image_post("/embed_image", jpeg(64, 48))
    with _server() as url:
        res = steady_load(url, post, concurrency=4, duration_s=1.0, ramp_s=0.5)
    # ~4 clients x 1 s / 50 ms = 80 in the window; the ramp's ~40 answered requests are not in the rate
    assert 30 <= res.requests <= 80
    assert res.wall_s == 1.0
    assert len(res.latencies_s) == res.requests
    assert all(lat >= 0.05 for lat in res.latencies_s)
    assert sum(res.statuses.values()) > res.requests  # the ramp's answers are kept for the error count
    assert res.errors == 0


def test_steady_load_reports_server_errors() -> None:
    post = image_post("/embed_image", jpeg(64, 48))
    with _server(fail_every=5) as url:
        res = steady_load(url, post, concurrency=2, duration_s=0.5, ramp_s=0.0)
    assert res.statuses.get(500, 0) >= 1
    assert res.errors == res.statuses[500]
    # Latencies per status cover exactly the counted requests.
    assert sorted(res.by_status) in ([200, 500], [500]) and sum(map(len, res.by_status.values())) == res.requests


@pytest.mark.parametrize("ramp", [0.0, 0.3])
def test_steady_load_stops_on_time(ramp: float) -> None:
    post = image_post("/embed_image", jpeg(64, 48))
    with _server() as url:
        t = time.perf_counter()
        steady_load(url, post, concurrency=3, duration_s=0.4, ramp_s=ramp)
        elapsed = time.perf_counter() - t
    assert ramp + 0.4 <= elapsed < ramp + 0.4 + 1.0  # the last requests finish, none start after the stop
