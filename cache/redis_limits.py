"""Token buckets shared by every API worker and replica through one Redis (``ZSS_REDIS_URL``): the per-key rate limits
and the per-address budget of failed API keys (api/auth.py).

One bucket is one hash, ``<prefix>rl:<bucket>``: ``tokens`` and ``at`` (when they were counted, Redis's clock). A take
is one Lua script, so refilling, testing and spending a token is one atomic step however many workers take from the
bucket at once, and its clock is the Redis server's (``TIME``; Redis >= 5 replicates a script's effects, not the
script): the replicas' own clocks do not matter. A bucket expires once it would be full again (nothing is lost: a
missing bucket is a full one), so Redis keeps only the buckets of recent callers.

Redis unreachable: :class:`~cache.interfaces.StoreUnavailable` naming the server, as every Redis store here raises
(cache/redis_store.py); the caller answers 503 (fail closed, see README "Rate limits").
"""

from __future__ import annotations

import math

import redis

from cache.interfaces import StoreUnavailable
from cache.redis_store import describe

_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)

# KEYS = the bucket; ARGV = rate (tokens per second), burst (the bucket's size). Returns the seconds to wait as a
# string ("0" = taken): a Lua number returned as such would be truncated to an integer.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return string.format('%.17g', wait)
"""


class RedisBuckets:
    """Token buckets in Redis; ``take`` spends one token of a named bucket (see the module's docstring)."""

    def __init__(self, client: redis.Redis, prefix: str = "zss:") -> None:
        self.client = client
        self.prefix = prefix
        self._take = client.register_script(_TAKE)

    def take(self, bucket: str, rate: float, burst: float) -> float:
        """0.0 when ``bucket`` had a token (now spent), else the seconds until it will have one. Raises
        StoreUnavailable when Redis cannot answer."""
        if not (rate > 0 and burst >= 1 and math.isfinite(rate) and math.isfinite(burst)):
            raise ValueError("rate must be > 0 and burst >= 1")
        try:
            out = self._take(keys=[f"{self.prefix}rl:{bucket}"], args=[repr(float(rate)), repr(float(burst))])
        except _DOWN as exc:
            raise StoreUnavailable(
                f"Redis at {describe(self.client)} unavailable: {exc or type(exc).__name__}"
            ) from exc
        return max(0.0, float(out.decode() if isinstance(out, bytes) else out))
