"""API keys and tenants, checked the same way in-process (tests/api/test_auth.py) and through `bentoml serve`
(tests/test_api_keys.py): the checks take any httpx-style client (``httpx.Client`` or Starlette's ``TestClient``) and
send each request's key themselves."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from testing.client import CLASSES, assert_error, bearer, files

# Keys of the test key files: tenant "a", tenant "b", an admin of tenant "ops", and spare ones.
KEY_A = "zss-test-key-tenant-a-3f9b1c7e2d4a"
KEY_B = "zss-test-key-tenant-b-8e1d5a0c6b2f"
KEY_ADMIN = "zss-test-key-admin-ops-51c0e9d7a3b8"
KEY_C = "zss-test-key-tenant-c-a7f3e2b9c1d0"  # for the rate limit: nothing else uses it
KEY_FUZZ = "zss-test-key-tenant-f-0d2c4e6a8b1f"  # for the header fuzz
WRONG = "zss-test-key-wrong-0000000000000000"


def key_file(*extra: str) -> str:
    """A key file's text: tenants a, b, c, f and the admin, with comments and blank lines, plus ``extra`` lines."""
    lines = [
        "# key  tenant  [admin]",
        f"{KEY_A} a",
        f"{KEY_B}   b    # two teams on one server",
        "",
        f"{KEY_ADMIN} ops admin",
        f"{KEY_C} c",
        f"{KEY_FUZZ} f",
        *extra,
    ]
    return "\n".join(lines) + "\n"


def keyed_routes(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, path) of every operation in an OpenAPI document, path parameters filled with a plausible id."""
    out = []
    for path, ops in sorted(spec["paths"].items()):
        for method in sorted(ops):
            out.append((method.upper(), path.replace("{deployed_id}", "0123abcd")))
    return out


def assert_unauthorized(r: httpx.Response, *, invalid: bool) -> None:
    """401 with the envelope and a Bearer challenge (RFC 6750: error="invalid_token" for a key that is not held)."""
    assert_error(r, 401, "Invalid API key." if invalid else "Missing API key")
    challenge = r.headers.get("www-authenticate", "")
    assert challenge.startswith("Bearer"), r.headers
    assert ('error="invalid_token"' in challenge) == invalid, challenge


def check_every_route_needs_a_key(client: Any, spec: dict[str, Any]) -> int:
    """No key, a wrong key (both headers), a non-Bearer scheme: 401 on every route of ``spec``; the number checked."""
    routes = keyed_routes(spec)
    assert len(routes) >= 12, routes
    for method, path in routes:
        assert_unauthorized(client.request(method, path), invalid=False)
        assert_unauthorized(client.request(method, path, headers={"Authorization": "Basic YTpi"}), invalid=False)
        assert_unauthorized(client.request(method, path, headers=bearer(WRONG)), invalid=True)
        assert_unauthorized(client.request(method, path, headers={"x-api-key": WRONG}), invalid=True)
    return len(routes)


def check_isolation(client: Any, image: bytes, *, detector: bool = True) -> dict[str, str]:
    """Tenant b sees none of tenant a's deployments: on each route the same answer as for an unknown id, and a deploy
    "with a's id" makes a new one; the list shows each tenant its own, the admin all. Returns the ids made."""
    a, b, admin = bearer(KEY_A), bearer(KEY_B), bearer(KEY_ADMIN)
    r = client.post("/deploy_classifier", json={"classifier_configs": CLASSES}, headers=a)
    assert r.status_code == 200, r.text
    clf = r.json()["deployed_id"]
    ids = {"a_classifier": clf}
    det = None
    if detector:
        body = {"detector_configs": [{"name": "x", "examples_to_include": ["x"], "detection_threshold": 0.0}]}
        r = client.post("/deploy_detector", json=body, headers=a)
        assert r.status_code == 200, r.text
        det = ids["a_detector"] = r.json()["deployed_id"]
    img = files(image)
    # Tenant a uses its own...
    assert client.post("/classify", params={"deployed_id": clf}, files=img, headers=a).status_code == 200
    if det:
        assert client.post("/detect", params={"deployed_id": det}, files=img, headers=a).status_code == 200
    # ...and b gets exactly what an unknown id gets, on every route.
    for own in [clf] + ([det] if det else []):
        for probe in (own, "0123456789abcdef0123456789abcdef"):  # a's id, then an id nobody has
            assert_error(client.post("/classify", params={"deployed_id": probe}, files=img, headers=b), 400, "Key not")
            assert_error(client.get("/model_config", params={"deployed_id": probe}, headers=b), 400, "Key not found")
            assert_error(client.delete(f"/deployments/{probe}", headers=b), 400, "Key not found")
            if detector:
                r = client.post("/detect", params={"deployed_id": probe}, files=img, headers=b)
                assert_error(r, 400, "Key not found")
            r = client.post("/deploy_classifier", json={"classifier_configs": CLASSES, "deployed_id": probe}, headers=b)
            assert r.status_code == 200, r.text
            assert r.json()["message"] == f"{probe} model not found. Generated new model."
            assert r.json()["deployed_id"] not in (own, probe)
            ids.setdefault("b_first", r.json()["deployed_id"])
    # a's deployments are untouched: same config, still version 1, still a's.
    cfg = client.get("/model_config", params={"deployed_id": clf}, headers=a).json()
    assert cfg == {"classifier_configs": CLASSES, "augment_examples": True, "deployed_id": clf}
    listed_a = client.get("/deployments", headers=a).json()["deployments"]
    listed_b = client.get("/deployments", headers=b).json()["deployments"]
    listed_all = client.get("/deployments", headers=admin).json()["deployments"]
    assert {d["deployed_id"] for d in listed_a} >= set(ids.values()) - {ids["b_first"]}
    assert all(d["tenant"] == "a" for d in listed_a) and all(d["tenant"] == "b" for d in listed_b)
    assert [d["version"] for d in listed_a if d["deployed_id"] == clf] == [1]
    assert ids["b_first"] in {d["deployed_id"] for d in listed_b}
    assert not {d["deployed_id"] for d in listed_a} & {d["deployed_id"] for d in listed_b}
    assert {d["deployed_id"] for d in listed_all} >= {d["deployed_id"] for d in listed_a + listed_b}
    # The admin uses, reads and updates a's deployment (it stays a's), and may delete b's.
    assert client.post("/classify", params={"deployed_id": clf}, files=img, headers=admin).status_code == 200
    assert client.get("/model_config", params={"deployed_id": clf}, headers=admin).json()["deployed_id"] == clf
    r = client.post("/deploy_classifier", json={"classifier_configs": CLASSES, "deployed_id": clf}, headers=admin)
    assert r.json() == {"deployed_id": clf, "message": "Model updated."}
    assert [
        d["tenant"] for d in client.get("/deployments", headers=admin).json()["deployments"] if d["deployed_id"] == clf
    ] == ["a"]
    r = client.delete(f"/deployments/{ids['b_first']}", headers=admin)
    assert r.json()["message"] == "Model deleted."
    # Embeddings are shared: the same text gives the same vector to every tenant.
    texts = {"texts": ["a cat"], "augment_examples": False}
    va = client.post("/embed_text", json=texts, headers=a).json()["embeddings"]
    assert client.post("/embed_text", json=texts, headers=b).json()["embeddings"] == va
    return ids


# -- timing ---------------------------------------------------------------------------------------------------------
def interleaved_medians(
    fn: Callable[[Any], Any],
    a: Any,
    b: Any,
    trials: int,
    reps: int = 1,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> tuple[float, float]:
    """Median time of ``fn(a)`` and of ``fn(b)`` over ``trials`` rounds of ``reps`` calls each, a and b alternating
    (and which goes first alternating too), so drifts in machine load hit both alike."""
    ta: list[int] = []
    tb: list[int] = []
    for i in range(trials):
        for arg, out in ((a, ta), (b, tb)) if i % 2 else ((b, tb), (a, ta)):
            t0 = clock()
            for _ in range(reps):
                fn(arg)
            out.append(clock() - t0)
    return statistics.median(ta), statistics.median(tb)


def ratio_within(
    measure: Callable[[], tuple[float, float]], low: float, high: float, attempts: int = 3
) -> tuple[bool, list[float]]:
    """Call ``measure()`` (two medians) up to ``attempts`` times until the ratio of the two is in (low, high): whether
    one was, and the ratios seen. A real difference (a comparison that exits early) is outside on every attempt; a
    burst of load from another process on a shared machine rarely is on all of them."""
    seen: list[float] = []
    for _ in range(attempts):
        a, b = measure()
        seen.append(a / b)
        if low < seen[-1] < high:
            return True, seen
    return False, seen
