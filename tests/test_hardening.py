"""Issue 32's probe through a real `bentoml serve` (the session server): hostile bodies are a 4xx, never a 500, and
the server answers at the HTTP level as it should (headers, redirects, oversized headers)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import pytest

from api.bodies import MAX_JSON_DEPTH
from testing.client import assert_error
from testing.server import Server
from tests import bad_inputs as bad

pytestmark = pytest.mark.server

JSON = {"content-type": "application/json"}


def test_deeply_nested_json_is_a_422_on_every_route(server: Server) -> None:
    routes = [*bad.IMAGE_JSON_ROUTES, "/deploy_classifier", "/deploy_detector", "/embed_text", "/text-embeddings"]
    with server.client() as c:
        for route in routes:
            for body in (bad.nested_json(1000), bad.nested_objects(1000, "url")):
                assert_error(c.post(route, content=body, headers=JSON), 422, f"deeper than {MAX_JSON_DEPTH} levels")


def test_a_lone_surrogate_is_a_422_naming_the_field_and_no_job_fails(server: Server) -> None:
    with server.client() as c:
        for route, body, field in bad.surrogate_bodies():
            r = c.post(route, content=body, headers=JSON)
            assert_error(r, 422, field)
        jobs = c.get("/jobs").json()["jobs"]
        assert not [j for j in jobs if j["state"] == "failed"], jobs
        # The server still embeds ordinary (and non-ASCII) text.
        r = c.post("/embed_text", json={"texts": ["caf\u00e9 \U0001f600"]})
        assert r.status_code == 200, r.text


# -- HTTP: headers, redirects, oversized heads, requests that never finish ---------------------------------------------
def test_every_answer_says_nosniff_and_the_page_has_a_csp_that_keeps_it_out_of_frames(server: Server) -> None:
    with server.client() as c:
        for path in ("/deployments", "/readyz", "/metrics", "/no-such-route", "/ui/", "/ui/app.js"):
            r = c.get(path)
            assert r.headers.get("x-content-type-options") == "nosniff", (path, r.headers)
            assert r.headers.get("x-frame-options") == "DENY", (path, r.headers)
        csp = c.get("/ui/").headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_redirects_never_name_the_requests_host(server: Server) -> None:
    with server.client() as c:
        for path, target in (("/deployments/", "/deployments"), ("/ui", "/ui/")):
            r = c.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
            assert r.status_code in (307, 308), r.text
            assert r.headers["location"] == target, r.headers
        # A client following the redirect lands on the route it meant.
        assert c.get("/deployments/", follow_redirects=True).json()["deployments"] is not None


def test_a_200_kb_header_is_answered_431_and_the_server_goes_on(server: Server) -> None:
    with server.client() as c:
        r = c.get("/deployments", headers={"X-Big": "a" * 200_000})
        assert r.status_code == 431, r.text
        assert c.get("/readyz").status_code == 200


def test_requests_that_never_finish_arriving_are_closed_and_readyz_stays_quick(server: Server) -> None:
    """Slow-loris in small: partial request heads are answered 408 and closed by the header deadline (10 s by
    default) while /readyz answers at once (stalled bodies: tests/api/test_connections.py; thousands of connections:
    bench/slowloris.py)."""
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    assert host is not None and port is not None
    start = time.monotonic()
    conns = [socket.create_connection((host, port), timeout=30) for _ in range(30)]
    try:
        for s in conns:
            s.sendall(b"GET /deployments HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        with server.client(timeout=10) as c:
            t = time.monotonic()
            assert c.get("/readyz").status_code == 200
            assert time.monotonic() - t < 5
        heads = []
        for s in conns:
            s.settimeout(max(1.0, start + 25 - time.monotonic()))
            heads.append(s.recv(200))
        assert all(h.startswith(b"HTTP/1.1 408 ") for h in heads), heads
    finally:
        for s in conns:
            s.close()


def test_a_body_trickling_in_below_the_minimum_rate_is_answered_408(server: Server) -> None:
    """One byte every 2 s never leaves the connection idle for the body timeout (30 s), but is far under the minimum
    rate (ZSS_BODY_MIN_RATE, 500 bytes/s after ZSS_BODY_GRACE_S, 10 s): 408 with the security headers, well before
    the idle timeout would have fired."""
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    assert host is not None and port is not None
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(bad.trickled_body_head())
        s.settimeout(2.0)
        answer = b""
        while not answer and time.monotonic() - start < 25:
            try:
                s.sendall(b" ")
                answer = s.recv(1000)
            except TimeoutError:
                continue
            except OSError:  # closed under us: the answer, if any, is what recv got
                break
    elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), (elapsed, answer)
    assert b"x-content-type-options: nosniff" in answer.lower() and b"too slowly" in answer, answer
    assert elapsed < 25
