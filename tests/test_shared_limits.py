"""Rate limits shared by two real `bentoml serve` replicas through one real Redis (ZSS_REDIS_URL): one bucket per API
key across both, and one budget of invalid keys per client address across both, the address read from
X-Forwarded-For only on the replica that trusts the proxy it comes through (ZSS_TRUSTED_PROXIES). In-process
counterparts, and Redis down: tests/api/test_shared_limits.py."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator

import httpx
import pytest

from testing.client import assert_error, bearer
from testing.models import ClipFiles, clip_env
from testing.redis import RedisServer
from testing.server import Server, start_server, stop_server
from testing.tenancy import KEY_A, KEY_ADMIN, KEY_C, WRONG, assert_unauthorized, key_file

pytestmark = pytest.mark.server

BURST = 3
FAILURES = 3
SLOW = 1e-4  # requests per second: nothing refills during a test, however slow the machine
ELSEWHERE = "203.0.113.7"  # a client behind the proxy


@pytest.fixture(scope="module")
def replicas(
    tiny_clip: ClipFiles, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    """Replica A trusts the loopback proxy's X-Forwarded-For; replica B trusts no proxy (the default)."""
    base = tmp_path_factory.mktemp("shared-limits")
    keys = base / "keys.txt"
    keys.write_text(key_file())
    keys.chmod(0o600)
    common = {
        "ZSS_REDIS_URL": redis_server.url,
        "ZSS_REDIS_PREFIX": "shared-limits:",
        "ZSS_API_KEYS": str(keys),
        "ZSS_RATE_LIMIT_RPS": str(SLOW),
        "ZSS_RATE_LIMIT_BURST": str(BURST),
        "ZSS_AUTH_FAILURE_LIMIT": str(FAILURES),
        "ZSS_AUTH_FAILURE_WINDOW_S": str(FAILURES / SLOW),
    }
    env_a = {**clip_env(tiny_clip, base / "a"), **common, "ZSS_TRUSTED_PROXIES": "127.0.0.1"}
    env_b = {**clip_env(tiny_clip, base / "b"), **common}
    with cf.ThreadPoolExecutor(2) as pool:  # started side by side: half the wait
        starting = [
            pool.submit(start_server, env, base / f"{name}.log", admin_key=KEY_ADMIN)
            for name, env in (("a", env_a), ("b", env_b))
        ]
        errors = [f.exception() for f in cf.wait(starting).done]
    started = [f.result() for f in starting if f.exception() is None]
    try:
        if any(errors):
            raise RuntimeError(f"a replica did not start: {errors}")
        yield started[0], started[1]
    finally:
        with cf.ThreadPoolExecutor(2) as pool:
            list(pool.map(stop_server, started))


def get(server: Server, key: str | None, forwarded_for: str | None = None) -> httpx.Response:
    headers = bearer(key) | ({"X-Forwarded-For": forwarded_for} if forwarded_for else {})
    return httpx.get(server.url + "/deployments", headers=headers, timeout=120)


def test_the_replicas_share_one_bucket_per_key(replicas: tuple[Server, Server]) -> None:
    got = [get(replicas[i % 2], KEY_C).status_code for i in range(4 * BURST)]
    # Each replica alone would let its own burst through: 2 x BURST in all.
    assert got.count(200) == BURST and got.count(429) == 3 * BURST, got
    r = get(replicas[1], KEY_C)
    assert_error(r, 429)
    assert int(r.headers["Retry-After"]) >= 1


def test_invalid_keys_are_limited_per_address_across_replicas(replicas: tuple[Server, Server]) -> None:
    a, b = replicas
    for i in range(FAILURES):
        assert_unauthorized(get(replicas[i % 2], WRONG), invalid=True)
    for server in (a, b):  # this address's budget is spent on both replicas
        r = get(server, WRONG)
        assert_error(r, 429, "invalid API key from this address")
        assert int(r.headers["Retry-After"]) >= 1
    # Its valid keys are not affected.
    assert get(a, KEY_A).status_code == 200 and get(b, KEY_A).status_code == 200
    # Through the proxy A trusts, another client has its own budget...
    assert_unauthorized(get(a, WRONG, forwarded_for=ELSEWHERE), invalid=True)
    # ...but B trusts no proxy: the header is ignored there (uvicorn's own rewrite of a loopback peer's client
    # included), and the request counts against the connection's address, whose budget is spent.
    assert_error(get(b, WRONG, forwarded_for=ELSEWHERE), 429)
