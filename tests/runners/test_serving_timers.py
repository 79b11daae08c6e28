"""BentoML's per-request timeout must not keep finished requests alive (issue 18: the API worker's RSS grew 80-90 MiB
a minute because every request's context stayed referenced by a 600 s timer)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from typing import Any

from bentoml._internal.server.http.traffic import TimeoutMiddleware

from runners.bentoml_internals import release_request_timers
from runners.serving import TRAFFIC

REQUEST = contextvars.ContextVar[Any]("request")


class Held:
    """Stands for what a request's context holds (BentoML's context keeps the Starlette request)."""


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _serve(n: int) -> tuple[int, list[int]]:
    """Serve ``n`` requests one after the other; how many of their contexts are still alive, with the loop running
    (closing the loop would drop its timers and hide the leak), and the statuses."""
    middleware = TimeoutMiddleware(_ok, timeout=TRAFFIC["timeout"])
    refs: list[weakref.ref[Held]] = []
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))

    async def one() -> None:
        held = Held()
        refs.append(weakref.ref(held))
        REQUEST.set(held)  # in this task's context, copied by whatever the middleware schedules
        await middleware({"type": "http", "path": "/x"}, receive, send)

    for _ in range(n):
        await asyncio.create_task(one())
    for _ in range(3):  # the loop drops cancelled timers as it runs
        await asyncio.sleep(0)
    gc.collect()
    return sum(r() is not None for r in refs), statuses


def test_finished_requests_are_released() -> None:
    release_request_timers()
    release_request_timers()  # idempotent: a second call does not wrap twice
    alive, statuses = asyncio.run(_serve(300))
    assert statuses == [200] * 300
    assert alive == 0


def test_timeout_still_answers_504() -> None:
    release_request_timers()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(30)

    async def run() -> list[int]:
        statuses: list[int] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(int(message["status"]))

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        await TimeoutMiddleware(slow, timeout=0.05)({"type": "http", "path": "/x"}, receive, send)
        return statuses

    assert asyncio.run(run()) == [504]
