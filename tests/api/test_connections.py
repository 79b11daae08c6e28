"""api/connections.py on real sockets: uvicorn (as BentoML runs it, ``http="auto"``) with the guarded protocol, in
this process, with short timeouts; the served checks are in tests/test_hardening.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from api.connections import GuardedH11Protocol, guard_connections
from settings import Settings
from testing.server import free_port

HEAD_S, BODY_S = 0.5, 0.5
MIN_RATE, GRACE_S = 1000.0, 1.0  # bytes/s a body must average once GRACE_S have passed


async def echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{len(await request.body())}")


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    before = dict(uvicorn.config.HTTP_PROTOCOLS)
    guard_connections(
        lambda: Settings(header_timeout_s=HEAD_S, body_timeout_s=BODY_S, body_min_rate=MIN_RATE, body_grace_s=GRACE_S)
    )
    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert config.http_protocol_class is GuardedH11Protocol
        yield config.port
    finally:
        server.should_exit = True
        thread.join(10)
        uvicorn.config.HTTP_PROTOCOLS.clear()
        uvicorn.config.HTTP_PROTOCOLS.update(before)


def _complete(out: bytes) -> bool:
    head, sep, body = out.partition(b"\r\n\r\n")
    length = [ln.split(b":")[1] for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length:")]
    return bool(sep) and bool(length) and len(body) >= int(length[0])


def raw(port: int, data: bytes, wait_s: float = 5.0) -> tuple[bytes, float]:
    """Send ``data`` and read until a whole answer came or the server closed: (what came back, seconds it took)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        start = time.monotonic()
        s.sendall(data)
        out = b""
        try:
            while not _complete(out) and (chunk := s.recv(65536)):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out, time.monotonic() - start


def test_ordinary_requests_and_kept_alive_connections_still_work(port: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
        assert c.post("/echo", content=b"x" * 100_000).text == "100000"
        time.sleep(HEAD_S * 1.5)  # idle between requests: the keep-alive timeout's business, not the head deadline
        assert c.get("/echo").text == "0"


def test_a_partial_head_is_answered_408_and_closed(port: int) -> None:
    out, took = raw(port, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert out.startswith(b"HTTP/1.1 408 "), out
    assert HEAD_S * 0.8 < took < HEAD_S + 4


def test_an_idle_connection_is_closed_without_an_answer(port: int) -> None:
    out, took = raw(port, b"")
    assert out == b"" and took < HEAD_S + 4


def test_a_stalled_body_is_answered_408_and_closed(port: int) -> None:
    out, took = raw(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial")
    assert out.startswith(b"HTTP/1.1 408 "), out
    assert BODY_S * 0.8 < took < BODY_S + 4


def test_a_200_kb_header_is_answered_431(port: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
        r = c.get("/echo", headers={"X-Big": "a" * 200_000})
    assert r.status_code == 431, r.text
    out, _ = raw(port, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 "), out[:100]


def test_a_body_trickling_below_the_minimum_rate_is_answered_408(port: int) -> None:
    """A byte every 0.2 s: never idle for BODY_S, far below MIN_RATE once GRACE_S have passed (issue 32)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        start = time.monotonic()
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        s.settimeout(0.2)
        out = b""
        while not out and time.monotonic() - start < 6:
            try:
                s.sendall(b"x")
                out = s.recv(1000)
            except TimeoutError:
                continue
            except OSError:
                break
        took = time.monotonic() - start
    assert out.startswith(b"HTTP/1.1 408 ") and b"too slowly" in out, (took, out)
    assert GRACE_S * 0.8 < took < GRACE_S + 3


def test_every_answer_of_the_connection_carries_the_security_headers(port: int) -> None:
    """The app's own answers (this app has no SecurityHeaders middleware: what BentoML's middlewares outside the
    service's send) and uvicorn's raw 400."""
    r = httpx.get(f"http://127.0.0.1:{port}/echo")
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY", r.headers
    out, _ = raw(port, b"NOT AN HTTP REQUEST\r\n\r\n")
    head = out.lower()
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert b"x-content-type-options: nosniff" in head and b"x-frame-options: deny" in head, out
