"""When a request arrived, for the image latency bound (``ZSS_IMAGE_MAX_LATENCY_MS``, engine/admission.py).

:class:`Arrival` stamps the time on the request's scope as early as the service lets a middleware see it (the first of
the service's middlewares; the routes' app stamps it too, for in-process use, without overwriting an earlier stamp),
so the bound counts reading the body and the waits before the route runs, not only what comes after.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

ARRIVED = "zss_arrived"


class Arrival:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {}).setdefault(ARRIVED, time.monotonic())
        await self.app(scope, receive, send)


def arrived(request: Request) -> float:
    """The stamped arrival (``time.monotonic()``), or now when no middleware stamped it."""
    stamp = request.scope.get("state", {}).get(ARRIVED)
    return float(stamp) if stamp is not None else time.monotonic()
