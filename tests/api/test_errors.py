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
