"""Rate limits shared through a real redis-server, in-process: two apps with gates of their own stand for two API
workers (or replicas); with ZSS_REDIS_URL they take from one bucket per key and count one address's invalid keys
together, and Redis down is a 503 with Retry-After (fail closed). The same through two real replicas:
tests/test_shared_limits.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.auth import FAILURES_LIMITED, LIMITED, Gate
from service import build_app
from settings import Settings
from testing.client import assert_error, bearer
from testing.fakes import fake_engine
from testing.redis import RedisServer
from testing.server import free_port
from testing.tenancy import KEY_A, KEY_C, WRONG, assert_unauthorized, key_file

BURST = 3
FAILURES = 3
SLOW = 1e-4  # requests per second: nothing refills during a test, however slow the machine


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Any]:
    """``make(**settings)``: two in-process apps (one engine) whose gates come from these settings."""
    keys = tmp_path / "keys.txt"
    keys.write_text(key_file())
    keys.chmod(0o600)
    engine, _ = fake_engine(tmp_path / "data", api_keys=str(keys))
    clients: list[TestClient] = []

    def make(**changes: Any) -> list[TestClient]:
        settings = Settings(
            api_keys=str(keys),
            rate_limit_rps=SLOW,
            rate_limit_burst=BURST,
            auth_failure_limit=FAILURES,
            auth_failure_window_s=FAILURES / SLOW,
            **changes,
        )
        made = []
        for _ in range(2):
            app = build_app(engine)
            app.state.gate = Gate.from_settings(settings)
            made.append(TestClient(app).__enter__())
        clients.extend(made)
        return made

    yield make
    for c in clients:
        c.__exit__(None, None, None)
    engine.close()


def statuses(clients: list[TestClient], n: int, key: str) -> list[int]:
    """``n`` requests, alternating between the workers."""
    return [clients[i % 2].get("/deployments", headers=bearer(key)).status_code for i in range(n)]


def test_workers_share_one_bucket_per_key(workers: Any, redis_server: RedisServer, redis_prefix: str) -> None:
    shared = workers(redis_url=redis_server.url, redis_prefix=redis_prefix)
    got = statuses(shared, 4 * BURST, KEY_C)
    assert got.count(200) == BURST and got.count(429) == 3 * BURST, got
    r = shared[0].get("/deployments", headers=bearer(KEY_C))
    assert_error(r, 429, LIMITED)
    assert int(r.headers["Retry-After"]) >= 1
    assert statuses(shared, 2, KEY_A) == [200, 200]  # another key, another bucket
    # Without Redis each worker has its own buckets: twice the burst gets through (what the shared bucket prevents).
    assert statuses(workers(), 4 * BURST, KEY_C).count(200) == 2 * BURST


def test_invalid_keys_from_one_address_are_counted_across_workers(
    workers: Any, redis_server: RedisServer, redis_prefix: str
) -> None:
    shared = workers(redis_url=redis_server.url, redis_prefix=redis_prefix)
    for i in range(FAILURES):
        assert_unauthorized(shared[i % 2].get("/deployments", headers=bearer(WRONG)), invalid=True)
    for c in shared:
        r = c.get("/deployments", headers=bearer(WRONG))
        assert_error(r, 429, FAILURES_LIMITED)
        assert int(r.headers["Retry-After"]) >= 1
    # The address's valid keys go on; a missing key is not a failed one (a client not set up yet) and stays 401.
    assert statuses(shared, 2, KEY_A) == [200, 200]
    assert_unauthorized(shared[0].get("/deployments"), invalid=False)


def test_redis_down_refuses_with_503(workers: Any) -> None:
    down = workers(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    for headers in (bearer(KEY_A), bearer(WRONG)):
        r = down[0].get("/deployments", headers=headers)
        assert_error(r, 503)
        assert r.headers["Retry-After"] == "1" and "rate limits" in r.json()["message"]
    assert_unauthorized(down[0].get("/deployments"), invalid=False)  # no key: nothing to count, still 401
    assert down[0].get("/openapi.json").status_code == 200  # public paths take no bucket


def test_the_gate_says_what_it_limits(redis_server: RedisServer, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(key_file())
    keys.chmod(0o600)
    base = {"api_keys": str(keys), "rate_limit_rps": 2, "auth_failure_limit": 30, "auth_failure_window_s": 60}
    local = Gate.from_settings(Settings(**base)).describe()
    assert "2/s per key, burst 2;" in local and "30 invalid keys per 60 s per address;" in local
    shared = Gate.from_settings(Settings(**base, redis_url=redis_server.url)).describe()
    assert shared.count("(shared through Redis)") == 2
    off = Gate.from_settings(Settings(api_keys=str(keys), auth_failure_limit=0)).describe()
    assert "no rate limit" in off and "invalid keys not limited per address" in off
