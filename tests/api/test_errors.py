"""api.errors: the envelope for every error, and DirectAI's validation messages."""

from __future__ import annotations

import pytest


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


def test_service_catch_all_answers_what_bentomls_own_routes_raise() -> None:
    """Below BentoML's TimeoutMiddleware an exception that escapes without a response held the request for the whole
    traffic timeout: /readyz raising while a dependency starts is 503 here, anything else the envelope."""

    from starlette.responses import StreamingResponse
    from starlette.routing import Route, Router
    from starlette.testclient import TestClient

    from api.errors import ServiceCatchAll

    async def readyz(_: object) -> None:
        raise TimeoutError()  # what aiohttp raises when a probe times out

    async def other(_: object) -> None:
        raise RuntimeError("internal detail")

    async def broken_stream(_: object) -> StreamingResponse:
        async def body():  # type: ignore[no-untyped-def]
            yield b"partial"
            raise RuntimeError("mid-body")

        return StreamingResponse(body())

    # A bare router: Starlette's own error middleware, which would answer 500 first, sits above BentoML's timeout.
    app = Router(routes=[Route("/readyz", readyz), Route("/other", other), Route("/stream", broken_stream)])
    with TestClient(ServiceCatchAll(app), raise_server_exceptions=True) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["status_code"] == 503 and "Not ready" in r.json()["message"]
        r = c.get("/other")
        assert r.status_code == 500 and r.json()["message"] == "Internal server error."
        # Once part of a response is out nothing can follow it: the exception goes on (the server closes).
        with pytest.raises(RuntimeError, match="mid-body"):
            c.get("/stream")


def test_validation_message_uses_pydantic_v1_wording_for_limits_and_unknown_types() -> None:
    from api.errors import validation_message

    errors = [
        {"type": "string_too_long", "loc": ("body", "classifier_configs", 0, "name"), "ctx": {"max_length": 512}},
        {"type": "too_long", "loc": ("body", "texts"), "ctx": {"max_length": 10000}},
        {"type": "greater_than_equal", "loc": ("body", "nms_threshold"), "ctx": {"ge": 0.0}},
        {"type": "something_new", "loc": ("query", "deployed_id"), "msg": "Some new check failed"},
    ]
    assert validation_message(errors) == (
        "4 validation errors for Request "
        "body -> classifier_configs -> 0 -> name ensure this value has at most 512 characters "
        "(type=value_error.any_str.max_length; limit_value=512) "
        "body -> texts ensure this value has at most 10000 items (type=value_error.list.max_items; limit_value=10000) "
        "body -> nms_threshold ensure this value is greater than or equal to 0.0 "
        "(type=value_error.number.not_ge; limit_value=0.0) "
        "query -> deployed_id Some new check failed (type=value_error)"
    )
