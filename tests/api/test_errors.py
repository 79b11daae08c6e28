"""api.errors: the envelope for every error, and DirectAI's validation messages."""

from __future__ import annotations


def test_unhandled_exceptions_get_the_envelope_without_reraising() -> None:
    import bentoml
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from api.errors import CatchAll

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
