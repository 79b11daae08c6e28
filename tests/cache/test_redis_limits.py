"""Token buckets in a real redis-server (cache/redis_limits.py): one bucket taken from by several clients at once
(as replicas do) gives out its burst and no more, on Redis's clock; Redis down is StoreUnavailable."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from cache.interfaces import StoreUnavailable
from cache.redis_limits import RedisBuckets
from cache.redis_store import connect
from testing.redis import RedisServer
from testing.server import free_port

SLOW = 1e-4  # tokens per second: nothing refills during a test, however slow the machine


def test_clients_taking_at_once_share_one_bucket(redis_server: RedisServer, redis_prefix: str) -> None:
    replicas = [RedisBuckets(connect(redis_server.url, timeout_s=30), redis_prefix) for _ in range(4)]
    with cf.ThreadPoolExecutor(8) as pool:
        waits = list(pool.map(lambda i: replicas[i % 4].take("key:a", SLOW, 10), range(40)))
    assert sum(w == 0.0 for w in waits) == 10  # the burst, across all four clients
    assert all(0 < w <= 1 / SLOW for w in waits if w > 0)
    # Another bucket is untouched.
    assert replicas[0].take("key:b", SLOW, 10) == 0.0


def test_the_wait_is_the_time_to_the_next_token(redis_server: RedisServer, redis_prefix: str) -> None:
    buckets = RedisBuckets(connect(redis_server.url, timeout_s=30), redis_prefix)
    assert buckets.take("k", 0.5, 1) == 0.0
    wait = buckets.take("k", 0.5, 1)  # one token per 2 s: just under 2 s to go (Redis's clock moved a little)
    assert 1.0 < wait <= 2.0
    # The bucket is forgotten once it would be full again (plus a second): Redis keeps recent callers only.
    ttl_ms = redis_server.client().pttl(f"{redis_prefix}rl:k")
    assert 0 < ttl_ms <= 3000 + 100


def test_a_bad_rate_is_refused(redis_server: RedisServer, redis_prefix: str) -> None:
    buckets = RedisBuckets(connect(redis_server.url), redis_prefix)
    for rate, burst in ((0, 1), (1, 0), (float("nan"), 1), (1, float("inf"))):
        with pytest.raises(ValueError):
            buckets.take("k", rate, burst)


def test_redis_down_is_store_unavailable() -> None:
    buckets = RedisBuckets(connect(f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(StoreUnavailable, match="127.0.0.1"):
        buckets.take("k", 1, 1)
