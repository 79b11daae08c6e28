"""JSON request bodies, checked before anything parses them, and the text they carry.

Python's ``json`` parser recurses once per nesting level: about 1,000 levels of ``[[[...]]]`` raise RecursionError
(a 500 where nothing catches it), and a few hundred still make every later walk of the value deep. No body of this API
nests more than a handful of levels, so a JSON body nested deeper than ``MAX_JSON_DEPTH`` is refused (422) before it
is parsed: by api/errors.py's ``JsonDepth`` for every route (FastAPI parses the pydantic bodies itself) and by
:func:`loads` where the routes parse a body themselves (api/inputs.py).

Text is the other hazard: JSON's ``"\\ud800"`` escape (and the raw bytes ``ED A0 80``, which ``json`` decodes with
``surrogatepass``) give a ``str`` holding a lone surrogate, which no UTF-8 encoder accepts (the embedding cache's key,
SQLite, the response). :func:`unicode_problem` (engine/configs.py, beside the deploy bodies) finds one, so the
bodies' models refuse it naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
from starlette.types import Scope

from engine.configs import unicode_problem
from errors import Invalid

__all__ = ["MAX_JSON_DEPTH", "TOO_DEEP", "is_json", "json_depth", "loads", "unicode_problem"]

MAX_JSON_DEPTH = 32  # the deepest body of this API (a deploy with an image example) nests 5 levels

TOO_DEEP = f"JSON body nested deeper than {MAX_JSON_DEPTH} levels."
# A JSON string (its escapes included); removed before the brackets are counted, so "[" inside text is not nesting.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in ``body`` (JSON text; brackets inside strings do not count).

    Linear and without recursion, whatever the input: malformed JSON gets a number too, and the parser that runs
    afterwards refuses it."""
    brackets = np.frombuffer(_STRING.sub(b"", body), np.uint8)
    steps = np.isin(brackets, _OPEN).astype(np.int32) - np.isin(brackets, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0)) if steps.size else 0


def loads(body: bytes) -> Any:
    """``json.loads`` with the depth limit: Invalid (422) for a body nested too deep or not JSON."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise Invalid(TOO_DEEP)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Invalid("Invalid JSON body.") from exc


def is_json(scope: Scope) -> bool:
    """Whether the request says its body is JSON (``application/json`` or ``application/*+json``, as FastAPI reads
    it)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))
    return False
