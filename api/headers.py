"""Response headers every answer of the server carries, and redirects that never name the request's Host.

- ``X-Content-Type-Options: nosniff`` on every response: a browser never guesses a type other than the one sent (a
  JSON error quoting a request is never run as HTML).
- The web page (``/ui``) gets a Content-Security-Policy: its own scripts and styles only (it has no inline ones),
  images also from ``data:``/``blob:`` (uploads, pastes) and http(s) (an image URL the user typed), requests to this
  server only; ``frame-ancestors 'none'`` and ``X-Frame-Options: DENY`` (for older browsers) keep it out of other
  sites' frames (clickjacking of the deploy and delete buttons). Every other response is ``X-Frame-Options: DENY`` too.
- Starlette builds the URL of its redirects (``/deployments/`` -> ``/deployments``, ``/ui`` -> ``/ui/``) from the
  request's ``Host`` header, which the client chooses: ``Host: evil.example`` got ``Location: http://evil.example/...``
  (a poisoned cache or a proxy would pass it on). Such a Location is rewritten to the path alone (a relative
  reference, RFC 9110 10.2.2), which the client resolves against the URL it actually used.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

UI_PREFIX = "/ui"
UI_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: http: https:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
ALWAYS: tuple[tuple[bytes, bytes], ...] = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"))
UI_ONLY: tuple[tuple[bytes, bytes], ...] = ((b"content-security-policy", UI_CSP.encode()),)


def relative_location(location: bytes, host: bytes | None) -> bytes:
    """``location`` without its scheme and authority when that authority is the request's ``Host`` (what Starlette
    derived from it); any other Location as it is."""
    if host is None or not location.lower().startswith((b"http://", b"https://")):
        return location
    parts = urlsplit(location.decode("latin-1"))
    if parts.netloc.lower() != host.decode("latin-1").strip().lower():
        return location
    path = parts.path or "/"
    # "//evil/x" as a path would be read as another host: keep a single leading slash.
    path = "/" + path.lstrip("/")
    return (path + (f"?{parts.query}" if parts.query else "")).encode("latin-1")


class SecurityHeaders:
    """Adds the headers above to every HTTP response, and makes Host-derived redirects relative."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        ui = path == UI_PREFIX or path.startswith(UI_PREFIX + "/")
        host = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in _OURS]
                if 300 <= message["status"] < 400:
                    headers = [(k, relative_location(v, host) if k.lower() == b"location" else v) for k, v in headers]
                headers += ALWAYS + (UI_ONLY if ui else ())
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_OURS = frozenset(k for k, _ in ALWAYS + UI_ONLY)
