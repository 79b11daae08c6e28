"""API keys and tenants through a real `bentoml serve`: one keyed server (a key file, a per-key rate limit, /metrics
keyed) for every check here. The same isolation checks run in-process in tests/api/test_auth.py (testing/tenancy.py);
the shared open server of the other tests stays without keys."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testing.client import assert_error, bearer, deploy, files
from testing.images import jpeg_bytes
from testing.models import ClipFiles, clip_env
from testing.server import Server, running_server
from testing.tenancy import (
    KEY_A,
    KEY_ADMIN,
    KEY_B,
    KEY_C,
    KEY_FUZZ,
    WRONG,
    assert_unauthorized,
    check_every_route_needs_a_key,
    check_isolation,
    interleaved_medians,
    key_file,
    ratio_within,
)
from testing.waits import wait_for

pytestmark = pytest.mark.server

RATE, BURST = 20, 40  # per key; the isolation checks stay well inside them, the rate-limit test goes over


@pytest.fixture(scope="module")
def keys_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    path.write_text(key_file())
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keyed(
    tiny_clip: ClipFiles, tiny_owl: Path, keys_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("keyed-server")
    env = {
        **clip_env(tiny_clip, base / "data"),
        "ZSS_DETECTOR_MODEL": str(tiny_owl),
        "ZSS_DETECTOR_TOP_K": "48",
        "ZSS_API_KEYS": str(keys_path),
        "ZSS_AUTH_FAILURE_LIMIT": "0",  # these checks send many invalid keys on purpose (tests/test_shared_limits.py)
        "ZSS_RATE_LIMIT_RPS": str(RATE),
        "ZSS_RATE_LIMIT_BURST": str(BURST),
        "ZSS_METRICS_REQUIRE_KEY": "true",
    }
    with running_server(env, base / "serve.log", admin_key=KEY_ADMIN) as srv:
        yield srv


def test_health_and_docs_are_open_every_route_needs_a_key(keyed: Server) -> None:
    with keyed.client() as c:
        assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
        assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])
        assert check_every_route_needs_a_key(c, spec) >= 12
        # /metrics is keyed by ZSS_METRICS_REQUIRE_KEY here: an admin key only (it shows every tenant's counters).
        assert_unauthorized(c.get("/metrics"), invalid=False)
        assert_unauthorized(c.get("/metrics", headers=bearer(WRONG)), invalid=True)
        assert_error(c.get("/metrics", headers=bearer(KEY_A)), 403, "admin key")
        assert c.get("/metrics", headers=bearer(KEY_ADMIN)).status_code == 200
        # An unknown path is BentoML's plain 404 (the routes' app never sees it): it reveals nothing either way.
        assert c.get("/no-such-route").status_code == 404


def samples(server: Server, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of a metric on /metrics."""
    out = []
    for line in server.metric_lines(name + "{"):
        head, _, value = line.rpartition(" ")
        out.append((dict(re.findall(r'(\w+)="([^"]*)"', head)), float(value)))
    return out


def test_tenants_see_only_their_own_deployments_and_are_counted(keyed: Server) -> None:
    with keyed.client() as c:
        check_isolation(c, jpeg_bytes(3), detector=True)
        r = c.post("/embed_image", files=files(jpeg_bytes(1), jpeg_bytes(2)), headers=bearer(KEY_B))
        assert r.status_code == 200, r.text
    images = {labels["tenant"]: value for labels, value in samples(keyed, "zss_tenant_images_total")}
    assert images["a"] >= 2 and images["b"] >= 2 and images["ops"] >= 1, images  # a: classify + detect, ops: classify
    requests = {(lb["tenant"], lb["code"]): v for lb, v in samples(keyed, "zss_tenant_requests_total")}
    assert requests[("b", "400")] >= 16 and requests[("a", "200")] >= 5, requests  # b's "Key not found"s
    assert keyed.metric("zss_auth_failures_total") > 0
    log = keyed.log()
    assert "API keys: 5 keys (1 admin) for 5 tenants" in log and "WITHOUT API KEYS" not in log
    for key in (KEY_A, KEY_B, KEY_C, KEY_ADMIN, KEY_FUZZ, WRONG):
        assert key not in log


def test_keys_rotate_by_editing_the_file_while_serving(keyed: Server, keys_path: Path) -> None:
    new = "zss-test-key-rotated-in-" + os.urandom(8).hex()
    original = keys_path.read_text()

    def status(key: str) -> int:
        return httpx.get(keyed.url + "/deployments", headers=bearer(key), timeout=30).status_code

    try:
        assert status(new) == 401 and status(KEY_B) == 200
        with keys_path.open("a") as fh:  # edited in place, as an editor appending a line would
            fh.write(f"{new} b\n")
        wait_for(lambda: status(new) == 200, "a new key")  # re-read while serving (RELOAD_CHECK_S), no restart
        # Replaced by rename (as a deploy tool would), without the old key: it stops working.
        tmp = keys_path.with_suffix(".tmp")
        tmp.write_text(original.replace(f"{KEY_B} ", f"# retired: {KEY_B[:8]}... ") + f"{new} b\n")
        os.replace(tmp, keys_path)
        wait_for(lambda: status(KEY_B) == 401, "the retired key refused")
        assert status(new) == 200
    finally:
        keys_path.write_text(original)
        wait_for(lambda: status(KEY_B) == 200 and status(new) == 401, "the original keys back")


def test_rate_limit_gives_429_with_retry_after_then_recovers(keyed: Server) -> None:
    limited: list[httpx.Response] = []
    with httpx.Client(base_url=keyed.url, timeout=30, headers=bearer(KEY_C)) as c, cf.ThreadPoolExecutor(8) as pool:

        def one(_: int) -> httpx.Response:
            return c.get("/deployments")

        sent = 0
        while not limited:  # rounds of 50 requests (8 at a time, kept-alive) until the bucket runs dry
            assert sent < 3000, f"no 429 after {sent} requests (the limit: {BURST} at once, then {RATE}/s)"
            limited = [r for r in pool.map(one, range(50)) if r.status_code == 429]
            sent += 50
        r = limited[0]
        assert_error(r, 429, "Rate limit exceeded")
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        assert httpx.get(keyed.url + "/deployments", headers=bearer(KEY_A), timeout=30).status_code == 200  # others
        wait_for(lambda: one(0).status_code == 200, "recovery after the limit")


def test_wrong_key_timing_does_not_depend_on_how_much_matches(keyed: Server) -> None:
    """Over HTTP the request's own noise (about a millisecond) is 1,000 times the comparison's time, so this shows
    only that nothing gross depends on the match (a generous bound); tests/api/test_auth.py measures the comparison
    itself in-process, where a leak would show, and shows that its harness finds a leaky comparison."""
    near = KEY_A[:-1] + ("0" if KEY_A[-1] != "0" else "1")  # all but the last character right
    far = "Z" * len(KEY_A)  # nothing right
    with httpx.Client(base_url=keyed.url, timeout=30) as c:

        def attempt(key: str) -> None:
            assert c.get("/model_config", params={"deployed_id": "x"}, headers=bearer(key)).status_code == 401

        for _ in range(20):  # warm the connection and the route
            attempt(far)
        inside, ratios = ratio_within(lambda: interleaved_medians(attempt, near, far, trials=300), 2 / 3, 3 / 2)
    assert inside, ratios


def raw_request(url: str, head: bytes) -> int:
    """Send raw request bytes (no client to clean the headers up); the response's status code (0: the server closed
    the connection without one)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    if not data:
        return 0
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    assert m, data[:200]
    return int(m.group(1))


def test_a_fuzz_of_headers_gives_no_5xx(keyed: Server) -> None:
    rng = random.Random(20261130)
    names = [b"Authorization", b"authorization", b"X-API-Key", b"x-api-key", b"Cookie", b"X-Forwarded-For", b"A"]
    prefixes = [b"Bearer ", b"bearer ", b"Bearer", b"Basic ", b"", b"Bearer \t ", b"Token "]
    keys = [KEY_FUZZ.encode(), WRONG.encode(), b"", KEY_FUZZ.encode()[:-1]]
    paths = [b"/deployments", b"/model_config?deployed_id=x", b"/classify?deployed_id=x", b"/docs", b"/metrics"]
    statuses: dict[int, int] = {}
    for _ in range(250):
        long = rng.random() < 0.1
        headers = []
        for _ in range(rng.randint(0, 4)):
            junk = bytes(rng.choice([*range(0x20, 0x7F), *range(0x80, 0x100), 0x09]) for _ in range(rng.randint(0, 40)))
            value = rng.choice(prefixes) + rng.choice([rng.choice(keys), junk, rng.choice(keys) + junk])
            headers.append(rng.choice(names) + b": " + value)
        if long:
            headers.append(b"Authorization: Bearer " + b"k" * rng.choice([5000, 20000, 70000]))  # long
        method = rng.choice([b"GET", b"POST", b"DELETE", b"OPTIONS"])
        head = method + b" " + rng.choice(paths) + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n"
        status = raw_request(keyed.url, head + b"".join(h + b"\r\n" for h in headers) + b"\r\n")
        assert status != 0 or long, head  # only an oversized header may be dropped without an answer
        statuses[status] = statuses.get(status, 0) + 1
    assert all(s < 500 for s in statuses), statuses
    assert statuses.get(401, 0) > 50, statuses
    # And the server goes on serving.
    assert httpx.get(keyed.url + "/deployments", headers=bearer(KEY_A), timeout=30).status_code == 200
    assert "unhandled error" not in keyed.log()


def test_the_web_page_on_a_keyed_server_asks_for_a_key_and_works_with_one(keyed: Server) -> None:
    """Debian's Chromium against this keyed server (no faked route): without a key the page's first call is refused
    and the key field says so; with tenant a's key the page lists a's deployments and classifies."""
    from testing.browser import chromium

    with httpx.Client(base_url=keyed.url, timeout=60, headers=bearer(KEY_A)) as c:
        dep = deploy(c)["deployed_id"]
    with chromium() as browser:
        # Playwright's wait_for_function uses eval(), which the page's CSP forbids (tests/test_ui.py says why).
        ctx = browser.new_context(bypass_csp=True)
        try:
            page = ctx.new_page()
            page.goto(keyed.url + "/ui/")
            page.locator("#api-key-error", has_text="API key").wait_for()  # the server's own 401 message
            assert page.evaluate("document.activeElement.id") == "api-key"
            page.fill("#api-key", KEY_A)
            page.dispatch_event("#api-key", "change")
            page.click("#refresh")
            page.locator(f'#deployment-rows tr[data-id="{dep}"]').wait_for()
            assert page.locator("#api-key-error").is_hidden()
            page.locator("#classes .class .name").fill("cat")
            page.locator("#classes .class .include").fill("cat")
            page.set_input_files("#file", files=[{"name": "a.jpg", "mimeType": "image/jpeg", "buffer": jpeg_bytes(5)}])
            page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=120_000)
            assert page.evaluate("document.body.dataset.state") == "done"
            assert page.locator("#strip .card .bar").count() == 1
        finally:
            ctx.close()
