"""Small HTTP helpers shared by the API tests (in-process and through `bentoml serve`) and the benchmarks."""

from __future__ import annotations

from typing import Any

import httpx

CLASSES: list[dict[str, Any]] = [
    {"name": "cat", "examples_to_include": ["cat", "kitten"], "examples_to_exclude": ["cartoon cat"]},
    {"name": "car", "examples_to_include": ["car"], "examples_to_exclude": []},
    {"name": "tree", "examples_to_include": ["tree", "oak", "pine"], "examples_to_exclude": ["bush", "shrub"]},
]


def deploy(client: Any, classes: list[dict[str, Any]] = CLASSES, **extra: Any) -> dict[str, Any]:
    """POST /deploy_classifier and return its body (the deploy must succeed)."""
    r = client.post("/deploy_classifier", json={"classifier_configs": classes, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def bearer(key: str | None) -> dict[str, str]:
    """The header that sends an API key (none for None)."""
    return {"Authorization": f"Bearer {key}"} if key is not None else {}


def files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``data`` fields, one per image."""
    return [("data", (f"img{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]


def error_message(r: httpx.Response) -> str:
    """The message of an error response in the shape of its route's protocol: OpenAI's under /v1 (``{"error":
    {"message", "type", "param", "code"}}``), KServe's under /v2 (``{"error": str}``), DirectAI's envelope elsewhere."""
    body = r.json()
    path = r.request.url.path
    if path == "/v1" or path.startswith("/v1/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return str(body["error"]["message"])
    if path == "/v2" or path.startswith("/v2/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return str(body["error"])
    assert body["status_code"] == r.status_code and body["data"] is None, body
    return str(body["message"])


def assert_error(r: httpx.Response, status: int, message: str | None = None) -> None:
    """The response is an error with that status in its protocol's shape (DirectAI's envelope but under /v1 and
    /v2: :func:`error_message`), and a message containing ``message``."""
    assert r.status_code == status, r.text
    text = error_message(r)
    if message is not None:
        assert message in text, text
