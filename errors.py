"""The project's one error type for expected failures.

Every layer raises :class:`ZssError` (or a subclass) for something the client did or can fix; it carries the HTTP
status the API answers with and the message it shows. The API turns it into DirectAI's envelope
(``{"status_code", "message", "data": null}``) in one handler (api/errors.py). Nothing here imports the project.
"""

from __future__ import annotations


class ZssError(Exception):
    """An expected failure: ``status_code`` is the HTTP status to answer with, ``message`` the text to show."""

    status_code: int = 400
    headers: dict[str, str] | None = None  # extra response headers (a 503's Retry-After)

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code

    def __str__(self) -> str:
        return self.message


class NotFound(ZssError):
    """An unknown deployed id (DirectAI answers 400 ``Key not found``, not 404)."""

    status_code = 400

    def __init__(self, message: str = "Key not found") -> None:
        super().__init__(message)


class Invalid(ZssError):
    """A well-formed request whose content cannot be used (an empty class list, an empty example)."""

    status_code = 422


class Unavailable(ZssError):
    """A part of the server cannot serve right now (an encoder overloaded or unreachable, the detector off)."""

    status_code = 503
