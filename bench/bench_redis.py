"""What sharing the state through Redis costs (issue 14), in one run on one machine:

    .venv/bin/python -m bench.bench_redis [--rounds 3] [--seconds 15] [--concurrency 8] [--calls 5000]

1. The registry check every /classify makes (``version``: one HMGET on loopback) against the SQLite registry's
   primary-key lookup, per call, over ``--calls`` calls in each of ``--rounds`` alternating rounds.
2. /classify throughput of two servers (ViT-B-32 random weights, detector off, a 640x480 JPEG), one on its own data
   dir (SQLite + local FAISS) and one with ``ZSS_REDIS_URL`` (a real redis-server on loopback, append-only, fsync every
   second as the README advises), loaded in alternating rounds (``bench.common.steady_load``); the ratio is Redis /
   local per pair of rounds, the last row the median; next to it, the server's CPU milliseconds per request (its
   processes, plus redis-server's on the Redis side), which a busy shared machine disturbs much less than throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench.common import (
    VIT_B32_RANDOM,
    LoadResult,
    Post,
    image_post,
    jpeg,
    machine,
    merge,
    served,
    steady_load,
    table,
)
from cache.redis_store import RedisRegistry, connect
from cache.registry import Registry
from testing.client import CLASSES, deploy
from testing.redis import running_redis


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and all their children."""
    total = 0.0
    for pid in pids:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def loaded(url: str, post: Post, pids: list[int], args: argparse.Namespace) -> tuple[LoadResult, float]:
    """One round of load, and the server's CPU milliseconds per answered request (less sensitive than throughput to
    what else runs on a shared machine: a request costs the CPU it costs, whoever else is busy)."""
    before = cpu_s(pids)
    result = steady_load(url, post, args.concurrency, args.seconds, args.ramp)
    answered = sum(result.statuses.values())  # every request of the round, ramp included, as the CPU counts them
    return result, 1000 * (cpu_s(pids) - before) / max(answered, 1)


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def registry_check(redis_url: str, base: Path, rounds: int, calls: int) -> list[list[object]]:
    sqlite = Registry(base / "registry.sqlite3")
    shared = RedisRegistry(connect(redis_url), prefix="bench:")
    for store in (sqlite, shared):
        store.put("x", "classifier", {"classifier_configs": CLASSES})
    rows: list[list[object]] = []
    for r in range(rounds):
        s = per_call_us(lambda: sqlite.version("x", "default"), calls)
        q = per_call_us(lambda: shared.version("x", "default"), calls)
        rows.append([r + 1, f"{s:.1f}", f"{q:.1f}"])
        print(f"registry check round {r + 1}: sqlite {s:.1f} us, redis {q:.1f} us", flush=True)
    sqlite.close()
    shared.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per round")
    ap.add_argument("--ramp", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--calls", type=int, default=5000, help="registry checks per round")
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        with running_redis(base / "redis") as redis:
            redis.client().config_set("appendfsync", "everysec")  # the README's advice for production
            checks = registry_check(redis.url, base, args.rounds, args.calls)
            env_redis = {**VIT_B32_RANDOM, "ZSS_REDIS_URL": redis.url}
            with served(VIT_B32_RANDOM, base / "local") as local, served(env_redis, base / "shared") as shared:
                posts = {}
                for name, srv in (("local", local), ("redis", shared)):
                    with srv.client() as c:
                        deployed_id = deploy(c, CLASSES)["deployed_id"]
                    posts[name] = image_post(f"/classify?deployed_id={deployed_id}", jpeg())
                    steady_load(srv.url, posts[name], args.concurrency, 5.0, ramp_s=0.0)  # warm-up
                pairs, cpu = [], []
                redis_pids = [shared.proc.pid, redis.proc.pid] if redis.proc else [shared.proc.pid]
                for r in range(args.rounds):
                    a, cpu_a = loaded(local.url, posts["local"], [local.proc.pid], args)
                    b, cpu_b = loaded(shared.url, posts["redis"], redis_pids, args)
                    pairs.append((a, b))
                    cpu.append((cpu_a, cpu_b))
                    print(
                        f"round {r + 1}: local {a.per_s:.2f}, redis {b.per_s:.2f} img/s; CPU ms/request "
                        f"{cpu_a:.1f}/{cpu_b:.1f} (errors {a.errors}/{b.errors}; load {a.load}/{b.load})",
                        flush=True,
                    )

    print("\nregistry check per call (us):")
    checks.append(
        ["median", f"{statistics.median(float(r[1]) for r in checks):.1f}"]
        + [f"{statistics.median(float(r[2]) for r in checks):.1f}"]
    )
    print(table(["round", "SQLite version()", "Redis version()"], checks))
    rows = []
    for i, ((a, b), (ca, cb)) in enumerate(zip(pairs, cpu)):
        rows.append(
            [
                i + 1,
                f"{a.per_s:.2f}",
                f"{b.per_s:.2f}",
                f"{b.per_s / a.per_s:.3f}",
                f"{ca:.1f}/{cb:.1f}",
                f"{ca / cb:.3f}",
            ]
        )
    all_a, all_b = merge([a for a, _ in pairs]), merge([b for _, b in pairs])
    ratio = statistics.median(b.per_s / a.per_s for a, b in pairs)
    cpu_ratio = statistics.median(ca / cb for ca, cb in cpu)
    med_a, med_b = statistics.median(c for c, _ in cpu), statistics.median(c for _, c in cpu)
    rows.append(
        [
            "median",
            f"{all_a.per_s:.2f}",
            f"{all_b.per_s:.2f}",
            f"{ratio:.3f}",
            f"{med_a:.1f}/{med_b:.1f}",
            f"{cpu_ratio:.3f}",
        ]
    )
    print("\n/classify throughput (img/s: the whole window; CPU: the server's processes, Redis's included):")
    headers = [
        "round",
        "local img/s",
        "Redis img/s",
        "Redis / local",
        "CPU ms/request local/Redis",
        "CPU local / Redis",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
