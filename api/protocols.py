"""What the foreign-protocol routes share (OpenAI embeddings in api/openai_compat.py, KServe v2 in api/kserve.py).

- :class:`ErrorShape`: every error under a protocol's path prefix answered in that protocol's own shape. The rest of
  the API (handlers, the API keys, the body limit, the catch-all) answers with DirectAI's envelope; this middleware,
  outermost of the routes' app, rewrites such an envelope on the way out, with the same status and headers. So a
  401, 429, 413 or 503 from the edge reads as the protocol's error too, and no layer needs to know the protocols.
- :func:`served`: the served CLIP model's ids and embedding size, asked of the encoders once per engine (they may
  start after the API: a failure is not remembered).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Request
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_PARAM = "zss.error_param"  # the request field an error is about (OpenAI's ``param``), set by a route
Shape = Callable[[int, str, Scope], dict[str, Any]]


class ErrorShape:
    """Rewrite DirectAI envelopes (``{"status_code", "message", "data"}``) of requests under ``prefix`` with
    ``shape(status, message, scope)``; every other response passes untouched and unbuffered."""

    def __init__(self, app: ASGIApp, prefix: str, shape: Shape) -> None:
        self.app = app
        self.prefix = prefix
        self.shape = shape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == self.prefix.rstrip("/") or path.startswith(self.prefix)):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewriting(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if int(message["status"]) < 400:
                    await send(message)
                    return
                start = message  # an error: held until its body is complete
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await self._send_error(start, b"".join(chunks), scope, send)

        await self.app(scope, receive, rewriting)

    async def _send_error(self, start: Message, body: bytes, scope: Scope, send: Send) -> None:
        status = int(start["status"])
        headers = list(start.get("headers", []))
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        if isinstance(doc, dict) and set(doc) == {"status_code", "message", "data"}:
            body = json.dumps(self.shape(status, str(doc["message"]), scope)).encode()
            headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass(frozen=True)
class Served:
    """The CLIP model this server embeds with: its ids (image and text tower; the same unless one is exported
    differently), the configured ``ZSS_CLIP_MODEL`` and the embedding size."""

    ids: tuple[str, ...]
    configured: str
    dim: int


_lock = threading.Lock()


def _ask(eng: Any) -> Served:
    image, text = eng.image_encoder.info(), eng.text_encoder.info()
    ids = tuple(dict.fromkeys([str(image["model_id"]), str(text["model_id"])]))
    return Served(ids=ids, configured=eng.settings.clip_model, dim=int(image["dim"]))


async def served(request: Request) -> Served:
    """The served model, asked once per engine and kept on the app's state."""
    eng: Any = request.app.state.engine
    with _lock:
        known = getattr(request.app.state, "zss_served", None)
    if known is not None and known[0] is eng:
        return known[1]
    info = await anyio.to_thread.run_sync(_ask, eng)
    with _lock:
        request.app.state.zss_served = (eng, info)
    return info


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A request model's JSON schema with its nested models written in place, for a route that reads its own body
    (``openapi_extra``): the document has no ``$defs`` for them to point at."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
