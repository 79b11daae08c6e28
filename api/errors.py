"""Every error the API answers with is DirectAI's envelope: ``{"status_code": N, "message": "...", "data": null}``.

One handler per source of errors, all building the envelope with :func:`envelope`:
- :class:`~errors.ZssError` (expected failures from any layer) -> its status and message;
- request validation -> 422 with pydantic v1's message form, as DirectAI's FastAPI server wrote it;
- Starlette's HTTP exceptions (404, 405) -> their status;
- anything else, answered by the outermost middleware :class:`CatchAll` (an encoder's 503 under overload, a 500).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.bodies import MAX_JSON_DEPTH, TOO_DEEP, is_json, json_depth
from errors import ZssError
from settings import LimitedLog

log = logging.getLogger("zss.api")

OVERLOADED = "The encoder is overloaded; retry later."
_overload_log = LimitedLog(log)


def envelope(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # A message can quote the request (a field name in a validation error): a lone surrogate in it must not make the
    # answer itself unencodable (a 500 instead of the 4xx), so such characters are written as escapes.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"status_code": status, "message": message, "data": None}, status_code=status, headers=headers)


# -- pydantic v1's error wording (DirectAI's server ran pydantic 1) ---------------------------------------------------
# pydantic v2 error type -> (v1 message, v1 type) for errors without context ...
_SIMPLE: dict[str, tuple[str, str]] = {
    "missing": ("field required", "value_error.missing"),
    "extra_forbidden": ("extra fields not permitted", "value_error.extra"),
    "float_parsing": ("value is not a valid float", "type_error.float"),
    "float_type": ("value is not a valid float", "type_error.float"),
    "int_parsing": ("value is not a valid integer", "type_error.integer"),
    "int_type": ("value is not a valid integer", "type_error.integer"),
    "int_from_float": ("value is not a valid integer", "type_error.integer"),
    "bool_parsing": ("value could not be parsed to a boolean", "type_error.bool"),
    "bool_type": ("value could not be parsed to a boolean", "type_error.bool"),
    "string_type": ("str type expected", "type_error.str"),
    "list_type": ("value is not a valid list", "type_error.list"),
    "dict_type": ("value is not a valid dict", "type_error.dict"),
    "model_type": ("value is not a valid dict", "type_error.dict"),
    "model_attributes_type": ("value is not a valid dict", "type_error.dict"),
    "none_required": ("value is not None", "type_error.not_none"),
    "finite_number": ("ensure this value is a finite number", "value_error.number.not_finite_number"),
    "json_invalid": ("Expecting value", "value_error.jsondecode"),
}
# ... and for limits: (v1 message with the limit, v1 type, the context key holding the limit).
_LIMITS: dict[str, tuple[str, str, str]] = {
    "less_than_equal": ("ensure this value is less than or equal to {}", "value_error.number.not_le", "le"),
    "greater_than_equal": ("ensure this value is greater than or equal to {}", "value_error.number.not_ge", "ge"),
    "less_than": ("ensure this value is less than {}", "value_error.number.not_lt", "lt"),
    "greater_than": ("ensure this value is greater than {}", "value_error.number.not_gt", "gt"),
    "string_too_short": (
        "ensure this value has at least {} characters",
        "value_error.any_str.min_length",
        "min_length",
    ),
    "string_too_long": ("ensure this value has at most {} characters", "value_error.any_str.max_length", "max_length"),
    "too_short": ("ensure this value has at least {} items", "value_error.list.min_items", "min_length"),
    "too_long": ("ensure this value has at most {} items", "value_error.list.max_items", "max_length"),
}


def _v1(error: dict[str, Any]) -> tuple[str, str]:
    """(message, type with context) of one pydantic v2 error, in pydantic v1's words."""
    t = error.get("type", "")
    if t in _SIMPLE:
        return _SIMPLE[t]
    if t in _LIMITS:
        text, v1_type, key = _LIMITS[t]
        value = (error.get("ctx") or {}).get(key)
        return text.format(value), f"{v1_type}; limit_value={value}"
    if t == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern")
        return f'string does not match regex "{pattern}"', f"value_error.str.regex; pattern={pattern}"
    return str(error.get("msg", "invalid value")), "value_error"


def validation_message(errors: list[dict[str, Any]]) -> str:
    """``N validation error(s) for Request <loc -> path> <msg> (type=<v1 type>) ...`` on one line, as DirectAI's
    handler printed pydantic v1's ``str(exc)`` with its newlines and indentation folded into single spaces."""
    n = len(errors)
    parts = [f"{n} validation error{'' if n == 1 else 's'} for Request"]
    for e in errors:
        loc = " -> ".join(str(p) for p in e.get("loc", ()))
        msg, typ = _v1(e)
        parts.append(f"{loc} {msg} (type={typ})")
    return " ".join(parts)


def unexpected(exc: Exception) -> JSONResponse:
    """The envelope for an exception no handler took: a dependency's error code (BentoML exceptions carry one; 503 is
    an encoder shedding load) or 500."""
    status = getattr(exc, "error_code", None)
    try:
        code = int(status) if status is not None else 500
    except (TypeError, ValueError):
        code = 500
    if not 400 <= code <= 599:
        code = 500
    if code == 503:  # expected under overload: one WARNING line now and then, no traceback
        _overload_log.warning("encoder overloaded: answered 503")
        return envelope(503, OVERLOADED, headers={"Retry-After": "1"})
    if code >= 500:
        log.exception("unhandled error", exc_info=exc)
    return envelope(code, "Internal server error." if code >= 500 else str(exc))


def install(app: FastAPI, *edge: type) -> None:
    """The envelope handlers and the middlewares: the JSON depth check innermost, then the body limit, then ``edge``
    (the API keys: checked before any body is read), the catch-all outermost."""

    @app.exception_handler(ZssError)
    async def _zss(_: Request, exc: ZssError) -> JSONResponse:
        return envelope(exc.status_code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(422, validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return envelope(exc.status_code, str(exc.detail))

    app.add_middleware(JsonDepth)
    app.add_middleware(BodyLimit)
    for middleware in reversed(edge):
        app.add_middleware(middleware)
    app.add_middleware(CatchAll)  # added last, so outermost: it also answers for the others


class CatchAll:
    """Answer any exception that no exception handler took with the JSON envelope, here and without re-raising.

    Starlette sends an ``@app.exception_handler(Exception)`` response from its outermost middleware and then re-raises,
    and the server then closes the connection: the client saw a reset instead of the 503 or 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:  # the client went (or its body stalled, api/connections.py): no one to answer
            log.debug("client disconnected during %s", scope.get("path"))
        except Exception as exc:
            if started:  # part of a response is out: nothing sensible can follow it
                raise
            await self.answer(scope, exc)(scope, receive, send)

    def answer(self, scope: Scope, exc: Exception) -> ASGIApp:
        """The response to an exception that escaped before a response started."""
        return unexpected(exc)


class BodyLimit:
    """Refuse request bodies over ``app.state.settings.max_body_bytes`` with 413, by Content-Length and while
    streaming (read per request, so the app needs no settings when it is built)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = int(scope["app"].state.settings.max_body_bytes)
        too_big = f"Request body over {max_bytes} bytes."
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            await envelope(413, too_big)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise ZssError(too_big, 413)
            return message

        await self.app(scope, counted, send)


class JsonDepth:
    """Refuse a JSON body nested deeper than ``MAX_JSON_DEPTH`` (422, api/bodies.py) before any route parses it (FastAPI
    parses the pydantic bodies itself, recursively); pass the body on unchanged otherwise. It reads the whole body
    first, as the routes do anyway; the body limit, outside it, still counts the body while it streams."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_json(scope):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        try:
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        except ZssError as exc:  # the body limit, while streaming
            await envelope(exc.status_code, exc.message, exc.headers)(scope, receive, send)
            return
        if json_depth(b"".join(m.get("body", b"") for m in messages)) > MAX_JSON_DEPTH:
            await envelope(422, TOO_DEEP)(scope, receive, send)
            return

        async def replay() -> Message:  # what was read, in order (a disconnect included), then the client again
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


# BentoML's health routes; an exception out of them means "not ready" (a dependency's probe timed out or failed).
HEALTH_PATHS = frozenset({"/readyz", "/livez", "/healthz"})
NOT_READY = "Not ready: a part of the server is still starting or does not answer; retry later."


class ServiceCatchAll(CatchAll):
    """A middleware of the BentoML service (outside the routes' app, so it covers BentoML's own routes): answer an
    exception that escapes before a response started, instead of letting it rise.

    BentoML's TimeoutMiddleware, above this one, waits for the first response message and only then for the app: an
    app that raises without sending anything leaves the request waiting for the whole traffic timeout (600 s), and
    the server cannot stop while it waits. /readyz raises exactly so during a cold start: it probes each dependency
    with a 5 s timeout and lets the TimeoutError (or a refused connection) out. A health route's exception is 503
    (not ready); any other is the routes' envelope (``unexpected``)."""

    def answer(self, scope: Scope, exc: Exception) -> ASGIApp:
        if scope.get("path", "").rstrip("/") in HEALTH_PATHS:
            _not_ready_log.warning("%s: %s: %s", scope["path"], type(exc).__name__, exc)
            return envelope(503, NOT_READY, {"Retry-After": "1"})
        return unexpected(exc)


_not_ready_log = LimitedLog(log)
