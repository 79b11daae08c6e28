"""OpenAPI descriptions the routes share: the error responses, and the image bodies the parser accepts (image routes
read their body themselves, so FastAPI cannot derive it)."""

from __future__ import annotations

from typing import Any

from api.schemas import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in (
        (400, "Unknown deployed_id (or another tenant's), or a refused image URL"),
        (413, "Body, image or image count over the limits"),
        (422, "Malformed request or an image that cannot be opened"),
        (503, "Encoder overloaded"),
    )
}
# A deploy job cancelled (DELETE /jobs/{job_id}) while its client waited, or a cancel of a job that has ended.
CANCELLED: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "Job cancelled, or already ended"}
}
# Every route but the public docs, on a server with API keys (ZSS_API_KEYS).
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "Missing or invalid API key (with 'WWW-Authenticate: Bearer')",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    429: {
        "model": ErrorResponse,
        "description": "Over the API key's rate limit, or an invalid key from an address over its budget of them "
        "(with 'Retry-After', seconds)",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}
# A path the mounted app never sees (e.g. with a raw newline) gets BentoML's own plain-text 404.
ERRORS[404] = {
    "model": ErrorResponse,
    "description": "No such route",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}


def image_body(field: str | None) -> dict[str, Any]:
    """OpenAPI description of the image forms the parser accepts (the route reads the body itself)."""
    name = field or "any field name"
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            (field or "file"): {"type": "array", "items": {"type": "string", "format": "binary"}}
                        },
                        "required": [field or "file"],
                    },
                    "encoding": {(field or "file"): {"contentType": "image/*"}},
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "data": {
                                "description": "base64 image(s) or data: URI(s)",
                                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                            },
                            "url": {
                                "description": "image URL(s); only when the server enables URL fetching",
                                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                            },
                        },
                        "additionalProperties": False,
                    }
                },
            },
            "description": f"Image files in multipart field '{name}', or JSON with base64 data / URLs.",
        }
    }
