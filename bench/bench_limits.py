"""What a keyed request pays for its rate limit: the per-worker token bucket against the bucket shared through Redis
(ZSS_REDIS_URL), as the API-key middleware takes it (api/auth.py ``take``: the shared one in a worker thread).

    .venv/bin/python -m bench.bench_limits [--takes 2000] [--rounds 3]

A real redis-server on loopback (testing/redis.py, append-only with ``--appendfsync``: a take writes its bucket, so
under ``always`` each one waits for the disk), one event loop; each round times ``--takes`` takes of each kind,
back to back, the kinds alternating so that a shared machine's load slows both alike (and the shared one's Redis
call alone, without the thread hop). Quoted: the median over rounds of the microseconds per take, and the difference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from api.auth import take
from api.limits import Limiter, RateLimiter
from bench.common import loadavg
from engine.limits import shared_limiter
from settings import Settings
from testing.redis import running_redis


async def per_take_us(limiter: Limiter, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        await take(limiter, b"key-%d" % (i % 16))
    return (time.perf_counter() - start) / n * 1e6


def direct_us(limiter: Limiter, n: int) -> float:
    """The same takes called directly (no thread hop): the Redis round trip alone."""
    start = time.perf_counter()
    for i in range(n):
        limiter.take(b"key-%d" % (i % 16))
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--takes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--appendfsync",
        default="everysec",
        choices=("always", "everysec", "no"),
        help="the Redis's append-only fsync policy (README: everysec; the tests' Redis: always, a disk write per take)",
    )
    args = parser.parse_args()
    print(f"load average at start {loadavg()}; appendfsync {args.appendfsync}")
    with tempfile.TemporaryDirectory() as tmp, running_redis(Path(tmp)) as redis:
        with redis.client() as c:
            c.config_set("appendfsync", args.appendfsync)
        local = RateLimiter(1e9, 10**9)
        shared = shared_limiter(Settings(redis_url=redis.url, redis_prefix="bench:"), "key", 1e9, 10**9)
        assert shared is not None
        rows: dict[str, list[float]] = {"local": [], "shared": [], "direct": []}
        for _ in range(args.rounds):
            rows["local"].append(anyio.run(per_take_us, local, args.takes))
            rows["shared"].append(anyio.run(per_take_us, shared, args.takes))
            rows["direct"].append(direct_us(shared, args.takes))
    loc, sh, direct = (statistics.median(rows[k]) for k in ("local", "shared", "direct"))
    print(
        f"per take, median of {args.rounds} rounds of {args.takes}: local {loc:.1f} us, shared (Redis) {sh:.1f} us, "
        f"of which the Redis call alone {direct:.1f} us"
    )
    print(f"the shared bucket adds {sh - loc:.0f} us per keyed request; load average at end {loadavg()}")


if __name__ == "__main__":
    main()
