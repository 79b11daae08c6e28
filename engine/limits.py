"""Rate limits shared by every API worker and replica through Redis (``ZSS_REDIS_URL``): what
``api.limits.RateLimiter`` is inside one worker, as one token bucket per key in Redis (cache/redis_limits.py).

Redis unreachable: the request is refused with a 503 and ``Retry-After`` (fail closed), as every request that needs
a shared store is (cache/redis_store.py). Failing open would lift every limit whenever Redis is down, and falling back
to the per-worker buckets would multiply the limit by the number of workers and replicas; a replica whose Redis is
down is also not ready (/readyz), so a load balancer sends its traffic elsewhere.
"""

from __future__ import annotations

from collections.abc import Hashable

from cache.interfaces import StoreUnavailable
from cache.redis_limits import RedisBuckets
from cache.redis_store import connect
from errors import Unavailable
from settings import Settings


class LimitsUnavailable(Unavailable):
    """The shared buckets cannot be reached: 503, retry in a second."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": "1"}


class SharedLimiter:
    """Token buckets named ``<name>:<key>`` in Redis, ``rate`` tokens per second, ``burst`` at most."""

    shared = True  # a take is a Redis round trip: the caller runs it off the event loop

    def __init__(self, buckets: RedisBuckets, name: str, rate: float, burst: float) -> None:
        if not (rate > 0 and burst >= 1):
            raise ValueError("rate must be > 0 and burst >= 1")
        self.buckets = buckets
        self.name = name
        self.rate = float(rate)
        self.burst = float(burst)

    def take(self, key: Hashable) -> float:
        """0.0 if ``key`` may go on now (the token is spent), else the seconds until it may; LimitsUnavailable when
        Redis does not answer."""
        text = key.hex() if isinstance(key, bytes) else str(key)
        try:
            return self.buckets.take(f"{self.name}:{text}", self.rate, self.burst)
        except StoreUnavailable as exc:
            raise LimitsUnavailable(f"The shared rate limits are unavailable ({exc}); retry later.") from exc


def shared_limiter(settings: Settings, name: str, rate: float, burst: float) -> SharedLimiter | None:
    """A limiter shared through ``settings.redis_url``; None without one (the caller keeps its own buckets).
    Connecting is lazy: made while Redis is down, it answers 503 until Redis is up."""
    if not settings.redis_url:
        return None
    client = connect(settings.redis_url, settings.redis_connect_timeout_s, settings.redis_timeout_s)
    return SharedLimiter(RedisBuckets(client, settings.redis_prefix), name, rate, burst)
