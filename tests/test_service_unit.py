"""Pieces of service.py that need no server: retries of encoder calls and the error envelope."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from service import ApiError, call_encoder, call_encoder_sync


class Flaky:
    """Fails with the disconnect BentoML's dependency client produces, ``failures`` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise aiohttp.ServerDisconnectedError()
        return x * 2

    async def acall(self, x: int) -> int:
        return self(x)


def test_transient_disconnects_are_retried() -> None:
    f = Flaky(2)
    assert asyncio.run(call_encoder(f.acall, 21)) == 42 and f.calls == 3
    g = Flaky(2)
    assert call_encoder_sync(g, 21) == 42 and g.calls == 3


def test_persistent_disconnects_become_503() -> None:
    f = Flaky(10)
    with pytest.raises(ApiError) as err:
        asyncio.run(call_encoder(f.acall, 1))
    assert err.value.status_code == 503 and f.calls == 3
    with pytest.raises(ApiError):
        call_encoder_sync(Flaky(10), 1)


def test_other_errors_are_not_retried() -> None:
    calls = []

    def boom(_: int) -> int:
        calls.append(1)
        raise ValueError("bad")

    with pytest.raises(ValueError):
        call_encoder_sync(boom, 1)
    assert len(calls) == 1


def test_unhandled_exceptions_get_the_envelope_without_reraising() -> None:
    import bentoml
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from service import CatchAll

    app = FastAPI()
    app.add_middleware(CatchAll)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("internal detail")

    @app.get("/busy")
    def busy() -> None:
        raise bentoml.exceptions.ServiceUnavailable("queued too long")

    @app.get("/bad")
    def bad() -> None:
        raise bentoml.exceptions.InvalidArgument("expected uint8 pixels")

    # raise_server_exceptions: an exception that escapes the app (what made the server reset the connection) fails here.
    with TestClient(app, raise_server_exceptions=True) as c:
        r = c.get("/boom")
        assert r.status_code == 500
        assert r.json() == {"status_code": 500, "message": "Internal server error.", "data": None}
        r = c.get("/busy")
        assert r.status_code == 503 and "overloaded" in r.json()["message"]
        r = c.get("/bad")
        assert r.status_code == 400 and r.json()["message"] == "expected uint8 pixels"
