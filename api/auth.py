"""API keys at the HTTP edge: who is calling (a tenant), per-key rate limits, a per-address budget of failed keys,
per-tenant counters.

:class:`ApiKeys` is an ASGI middleware of the routes' app (installed by ``build_app``, so in-process tests run it as
the server does). For each request it:
- lets the public paths through (:data:`PUBLIC_PATHS`, :data:`PUBLIC_PREFIXES`: the docs page and its OpenAPI
  document, and the web page's static files under ``/ui``; the page asks for a key and sends it like any client);
- on a server without keys (``ZSS_API_KEYS`` empty) calls every request :data:`engine.tenancy.OPEN`;
- otherwise reads ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``): none, or one that is not held, is 401
  with the envelope and ``WWW-Authenticate: Bearer``; a key over its rate is 429 with ``Retry-After``;
- counts each invalid key against the client's address (api/client_address.py): past ``ZSS_AUTH_FAILURE_LIMIT`` of
  them in ``ZSS_AUTH_FAILURE_WINDOW_S`` the address's invalid keys are 429 with ``Retry-After`` instead of 401 (its
  valid keys, and other addresses, are not affected: README "API keys and tenants");
- puts the caller's :class:`~engine.tenancy.Tenant` in the request scope for the routes (:func:`caller`) and counts
  the request (and, when it succeeded, its images) under the tenant in Prometheus.

BentoML answers ``/livez``, ``/readyz`` and ``/metrics`` itself, outside this app: health stays open, and
:class:`MetricsGuard` (a middleware of the BentoML service) keys ``/metrics`` when ``ZSS_METRICS_REQUIRE_KEY`` is set.
The policy (keys, limiters) is a :class:`Gate` on ``app.state.gate``, read per request: the service sets it when it
starts, and a request that comes before is refused (fail closed). With ``ZSS_REDIS_URL`` both limits are buckets in
Redis shared by every worker and replica (engine/limits.py); Redis down, a request that needs one is 503 (fail closed).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Hashable, Iterable

import anyio
from fastapi import Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.client_address import Network, client_address, trusted_networks
from api.errors import envelope
from api.keys import Key, KeyRing
from api.limits import Limiter, RateLimiter, default_burst, retry_after
from engine.limits import shared_limiter
from engine.tenancy import OPEN, Tenant
from errors import ZssError
from settings import Settings

log = logging.getLogger("zss.api")

# Open without a key: the docs page and what it loads, and the web page's static files (a page mounted at /ui as
# its own app never reaches this middleware; one served by these routes would, and is listed here).
PUBLIC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/ui"})
PUBLIC_PREFIXES = ("/ui/",)

SCOPE_TENANT = "zss.tenant"  # the caller, for the routes
SCOPE_IMAGES = "zss.images"  # images in the request, set by api/inputs.py, counted when the request succeeds

MISSING = "Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')."
INVALID = "Invalid API key."
FORBIDDEN = "This key may not read /metrics (an admin key may)."
LIMITED = "Rate limit exceeded for this API key; retry later."
FAILURES_LIMITED = "Too many requests with an invalid API key from this address; retry later."
STARTING = "The server is starting; retry later."

REQUESTS = Counter(
    "zss_tenant_requests", "Requests with an API key (or all, without keys) by tenant", ["tenant", "code"]
)
IMAGES = Counter("zss_tenant_images", "Images in successful requests by tenant", ["tenant"])
AUTH_FAILURES = Counter(
    "zss_auth_failures",
    "Requests refused for a missing or invalid API key (limited: 429, address over budget)",
    ["reason"],
)

# Declared for the OpenAPI document, so the docs page has an "Authorize" button (the middleware does the checking).
BEARER = HTTPBearer(auto_error=False, description="An API key: 'Authorization: Bearer <key>' (ZSS_API_KEYS).")
API_KEY_HEADER = APIKeyHeader(name="x-api-key", auto_error=False, description="An API key, as the Bearer token is.")
DOCUMENTED = [Security(BEARER), Security(API_KEY_HEADER)]


class Gate:
    """The access policy of one API worker: its keys (None: an open server), its per-key limiter, its per-address
    limiter of invalid keys and the proxies whose ``X-Forwarded-For`` it trusts, and whether /metrics needs an admin
    key."""

    def __init__(
        self,
        keys: KeyRing | None,
        limiter: Limiter | None = None,
        metrics_require_key: bool = False,
        failures: Limiter | None = None,
        trusted_proxies: tuple[Network, ...] = (),
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.failures = failures
        self.trusted_proxies = trusted_proxies
        self.metrics_require_key = metrics_require_key and keys is not None

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float] = time.monotonic) -> Gate:
        """Raises ValueError (api.keys.KeyFileError) for an unusable ZSS_API_KEYS: the server must not start open."""
        keys = KeyRing.from_setting(settings.api_keys, clock)
        limiter = failures = None
        if keys is not None and settings.rate_limit_rps > 0:
            limiter = _limiter(settings, "key", settings.rate_limit_rps, settings.rate_limit_burst, clock)
        if keys is not None and settings.auth_failure_limit > 0:
            n = settings.auth_failure_limit
            failures = _limiter(settings, "failed-key", n / settings.auth_failure_window_s, n, clock)
        return cls(keys, limiter, settings.metrics_require_key, failures, trusted_networks(settings.trusted_proxies))

    def describe(self) -> str:
        if self.keys is None:
            return "API keys: none (ZSS_API_KEYS is empty): every caller sees and may change every deployment"
        shared = " (shared through Redis)"
        limit = "no rate limit"
        if self.limiter:
            limit = f"{self.limiter.rate:g}/s per key, burst {self.limiter.burst:g}{shared * self.limiter.shared}"
        failed = "invalid keys not limited per address"
        if self.failures:
            window = self.failures.burst / self.failures.rate
            failed = f"{self.failures.burst:g} invalid keys per {window:g} s per address{shared * self.failures.shared}"
        metrics = "admin key" if self.metrics_require_key else "open"
        return f"API keys: {self.keys.summary()}; {limit}; {failed}; /metrics {metrics}"

    def identify(self, headers: Iterable[tuple[bytes, bytes]]) -> Key | str:
        """The held key the request presents, or the reason it has none (MISSING / INVALID). Keys required."""
        assert self.keys is not None
        presented = presented_key(headers)
        if presented is None:
            return MISSING
        return self.keys.lookup(presented) or INVALID


def _limiter(settings: Settings, name: str, rate: float, burst: float, clock: Callable[[], float]) -> Limiter:
    """Buckets shared through Redis with ZSS_REDIS_URL, else this worker's own."""
    burst = default_burst(rate, burst)
    return shared_limiter(settings, name, rate, burst) or RateLimiter(rate, burst, clock)


async def take(limiter: Limiter | None, key: Hashable) -> float:
    """``limiter.take(key)`` (0.0 without a limiter); a shared limiter's round trip to Redis runs in a thread."""
    if limiter is None:
        return 0.0
    if limiter.shared:
        return await anyio.to_thread.run_sync(limiter.take, key)
    return limiter.take(key)


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key of ``Authorization: Bearer <key>`` (scheme in any case), else of ``x-api-key``; None if neither."""
    authorization = api_key = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"authorization" and authorization is None:
            authorization = value
        elif lower == b"x-api-key" and api_key is None:
            api_key = value
    if authorization is not None:
        parts = authorization.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == b"bearer" and parts[1].strip():
            return parts[1].strip()
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def too_many_failures(wait: float) -> JSONResponse:
    AUTH_FAILURES.labels("limited").inc()
    return envelope(429, FAILURES_LIMITED, {"Retry-After": retry_after(wait)})


def unauthorized(reason: str) -> JSONResponse:
    AUTH_FAILURES.labels("missing" if reason == MISSING else "invalid").inc()
    challenge = 'Bearer realm="zeroshot"' if reason == MISSING else 'Bearer realm="zeroshot", error="invalid_token"'
    return envelope(401, reason, {"WWW-Authenticate": challenge})


class ApiKeys:
    """The middleware (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        gate: Gate | None = getattr(scope["app"].state, "gate", None)
        if gate is None:
            await envelope(503, STARTING)(scope, receive, send)
            return
        if gate.keys is None:
            tenant = OPEN
        else:
            key = gate.identify(scope["headers"])
            try:
                if not isinstance(key, Key):
                    # Invalid keys only: a missing key is a client not set up yet (the web page before its key).
                    failed = (
                        await take(gate.failures, client_address(scope, gate.trusted_proxies)) if key == INVALID else 0
                    )
                    await (too_many_failures(failed) if failed > 0 else unauthorized(key))(scope, receive, send)
                    return
                wait = await take(gate.limiter, key.digest)
            except ZssError as exc:  # the shared buckets are unreachable (Redis down): 503, fail closed
                await envelope(exc.status_code, exc.message, exc.headers)(scope, receive, send)
                return
            tenant = key.tenant
            if wait > 0:
                REQUESTS.labels(tenant.name, "429").inc()
                await envelope(429, LIMITED, {"Retry-After": retry_after(wait)})(scope, receive, send)
                return
        scope[SCOPE_TENANT] = tenant
        status: int | None = None

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            REQUESTS.labels(tenant.name, str(status) if status is not None else "error").inc()
            if status is not None and 200 <= status < 300 and scope.get(SCOPE_IMAGES):
                IMAGES.labels(tenant.name).inc(int(scope[SCOPE_IMAGES]))


def caller(request: Request) -> Tenant:
    """The routes' dependency: the tenant ApiKeys identified (a request it did not identify is refused)."""
    tenant = request.scope.get(SCOPE_TENANT)
    if not isinstance(tenant, Tenant):
        raise ZssError(MISSING, 401)
    return tenant


class MetricsGuard:
    """A middleware of the BentoML service (outside the routes' app): ``/metrics`` needs an admin key when the gate
    says so; every other request passes untouched. ``gate`` returns the routes' app's gate (set when it starts)."""

    def __init__(self, app: ASGIApp, gate: Callable[[], Gate | None]) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/") == "/metrics":
            gate = self.gate()
            if gate is None:
                await envelope(503, STARTING)(scope, receive, send)
                return
            if gate.metrics_require_key:
                key = gate.identify(scope["headers"])
                if not isinstance(key, Key):
                    await unauthorized(key)(scope, receive, send)
                    return
                if not key.tenant.admin:
                    await envelope(403, FORBIDDEN)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def open_server_warning(host: str | None) -> str | None:
    """The start-up warning of a server without keys that listens beyond loopback (None when it does not)."""
    try:
        if host is not None and ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
            return None
    except ValueError:
        pass
    where = f"on {host}" if host else "on an address it could not tell"
    return (
        f"\n{'!' * 100}\n"
        f"!! ZeroShot Server listens {where} WITHOUT API KEYS: anyone who can reach this port can list, use,\n"
        "!! overwrite and delete every deployment. Set ZSS_API_KEYS (README, 'API keys and tenants'), or listen on\n"
        "!! 127.0.0.1 only.\n"
        f"{'!' * 100}"
    )
