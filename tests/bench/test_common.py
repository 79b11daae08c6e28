"""bench.common's load generator against a small local HTTP server: what it sends and what it counts. The load
generator runs on a clock the server moves (each answer takes ``STEP`` of it), so what it counts does not depend on
how fast this machine is."""

from __future__ import annotations

import email.parser
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench.common import image_post, jpeg, steady_load
from testing.server import local_http_server

STEP = 0.0625  # seconds of the fake clock per answer (exact in binary: sums of it compare exactly)


class FakeClock:
    """A clock that only the test server moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, dt: float) -> None:
        with self.lock:
            self.now += dt


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the encoder's clients use it
    clock = FakeClock()
    fail_every = 0
    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        with cls.lock:
            cls.count += 1
            n = cls.count
            cls.clock.advance(STEP)  # this answer took STEP
        status = 500 if cls.fail_every and n % cls.fail_every == 0 else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _server(fail_every: int = 0) -> Iterator[tuple[str, type[_Handler]]]:
    handler = type(
        "H", (_Handler,), {"count": 0, "fail_every": fail_every, "lock": threading.Lock(), "clock": FakeClock()}
    )
    with local_http_server(handler) as port:
        yield f"http://127.0.0.1:{port}", handler


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
    with _server() as (url, handler):
        res = steady_load(url, post, concurrency=1, duration_s=1.0, ramp_s=0.5, clock=handler.clock)
    # One client, each answer 1/16 s: answers end at 1/16, 2/16, ... 24/16 = 1.5 s (the stop); the window [0.5, 1.5]
    # holds those ending at 8/16 ... 24/16: 17 of them, the ramp's 7 are not in the rate.
    assert handler.count == 24 and res.requests == 17
    assert res.wall_s == 1.0
    assert res.latencies_s == [STEP] * 17
    assert res.statuses == {200: 24}  # the ramp's answers are kept for the error count
    assert res.errors == 0


def test_steady_load_reports_server_errors() -> None:
    post = image_post("/embed_image", jpeg(64, 48))
    with _server(fail_every=5) as (url, handler):
        res = steady_load(url, post, concurrency=2, duration_s=0.5, ramp_s=0.0, clock=handler.clock)
    assert 8 <= handler.count <= 8 + 2 and sum(res.statuses.values()) == handler.count
    assert res.statuses[500] == handler.count // 5  # every fifth answer
    assert res.errors == res.statuses[500]
    # Latencies per status cover exactly the counted requests.
    assert sorted(res.by_status) in ([200, 500], [500]) and sum(map(len, res.by_status.values())) == res.requests


@pytest.mark.parametrize("ramp", [0.0, 0.25])
def test_steady_load_stops_on_time(ramp: float) -> None:
    post = image_post("/embed_image", jpeg(64, 48))
    with _server() as (url, handler):
        res = steady_load(url, post, concurrency=3, duration_s=0.5, ramp_s=ramp, clock=handler.clock)
    # It runs until the clock reaches the stop: (ramp + 0.5) / STEP answers move it there. After that each client
    # sends at most the one request it had decided on before it saw the stop, and every request sent is answered.
    enough = round((ramp + 0.5) / STEP)
    assert enough <= handler.count <= enough + 3, handler.count
    assert handler.clock() >= ramp + 0.5 and sum(res.statuses.values()) == handler.count
