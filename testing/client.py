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


def assert_error(r: httpx.Response, status: int, message: str | None = None) -> None:
    """The response is DirectAI's envelope with that status (and a message containing ``message``)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status_code"] == status and body["data"] is None
    if message is not None:
        assert message in body["message"], body["message"]
