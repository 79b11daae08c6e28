"""Per-key request rate limits: a token bucket per API key, on an injectable clock.

Each key may send ``rate`` requests per second on average and ``burst`` at once; a request over the limit waits for
nothing and is refused (429) with the seconds until a request would be allowed again (``Retry-After``).
:class:`RateLimiter`'s buckets live in the API worker's memory: with several workers or replicas each one limits on its
own. With ``ZSS_REDIS_URL`` the buckets are shared instead (engine/limits.py ``SharedLimiter``: one bucket per key
across every worker and replica); both are a :class:`Limiter`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from typing import Protocol


class Limiter(Protocol):
    rate: float
    burst: float
    shared: bool  # True: ``take`` is a round trip to a shared store, run off the event loop

    def take(self, key: Hashable) -> float: ...


def default_burst(rate: float, burst: float = 0) -> float:
    """The burst of a setting: as given, or (0) the rate rounded up, at least 1."""
    return float(burst) if burst > 0 else max(1.0, math.ceil(rate))


class RateLimiter:
    shared = False
    MAX_BUCKETS = 10_000  # buckets of keys no longer in use are dropped beyond this (a key file's worth of keys)

    def __init__(self, rate: float, burst: float = 0, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.burst = default_burst(rate, burst)
        self._clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: Hashable) -> float:
        """0.0 if ``key`` may make a request now (and counts it), else the seconds until it may."""
        now = self._clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.MAX_BUCKETS:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Drop buckets that have refilled (forgetting them changes nothing)."""
        full = self.burst / self.rate
        for key, (_, then) in list(self._buckets.items()):
            if now - then >= full:
                del self._buckets[key]


def retry_after(wait_s: float) -> str:
    """``Retry-After`` in whole seconds (RFC 9110), never 0 for a refused request."""
    return str(max(1, math.ceil(wait_s)))
