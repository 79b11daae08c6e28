"""Requests -> image sources: multipart files (or URL / base64 strings in form fields), or a JSON body
``{"data": base64 | [...], "url": url | [...]}``. Nothing here decodes pixels; the engine does, in a worker thread.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from api.auth import SCOPE_IMAGES
from api.bodies import loads, unicode_problem
from errors import Invalid, ZssError
from imaging.sources import ImageSource

MAX_IMAGES_PER_REQUEST = 256


def _as_list(value: Any, name: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        raise Invalid(f"Field '{name}' must be a string or a list of strings.")
    for i, v in enumerate(items):
        if problem := unicode_problem(v):
            raise Invalid(f"Field '{name}' item {i}: {problem}.")
    return items


async def image_sources(request: Request, field: str | None = "data") -> list[ImageSource]:
    """Images from multipart (files, or URL / base64 strings) or from a JSON body {"data": b64 | [...], "url": ...}.

    ``field=None`` takes every multipart field (photofield clients name their fields freely).
    """
    ctype = request.headers.get("content-type", "").lower()
    sources: list[ImageSource] = []
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=MAX_IMAGES_PER_REQUEST, max_fields=MAX_IMAGES_PER_REQUEST)
        except ZssError:  # the body limit, while streaming
            raise
        except Exception as exc:  # malformed framing, too many parts
            raise Invalid(f"Malformed multipart body: {exc}") from exc
        items = form.multi_items() if field is None else [(field, v) for v in form.getlist(field)]
        for name, item in items:
            if isinstance(item, UploadFile):
                sources.append(ImageSource("bytes", await item.read(), name, item.filename))
            elif item.strip().lower().startswith(("http://", "https://")):
                sources.append(ImageSource("url", item.strip(), name))
            else:
                sources.append(ImageSource("base64", item, name))
    elif ctype.startswith("application/json"):
        body = loads(await request.body())  # with the depth limit: json.loads recurses
        if not isinstance(body, dict) or not set(body) <= {"data", "url"}:
            raise Invalid('JSON body must be an object with "data" (base64 images) and/or "url" (image URLs).')
        sources += [ImageSource("base64", v) for v in _as_list(body.get("data", []), "data")]
        sources += [ImageSource("url", v, "url") for v in _as_list(body.get("url", []), "url")]
    else:
        raise Invalid(
            f"Expected multipart/form-data with image files in field '{field or 'any'}', or a JSON body with "
            '"data" (base64) or "url".',
        )
    if not sources:
        raise Invalid(f"No image in field '{field}'." if field else "No image in the request.")
    if len(sources) > MAX_IMAGES_PER_REQUEST:
        raise ZssError(f"Too many images in one request (limit {MAX_IMAGES_PER_REQUEST}).", 413)
    request.scope[SCOPE_IMAGES] = len(sources)  # counted per tenant when the request succeeds
    return sources
