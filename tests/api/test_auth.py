"""API keys, tenants and per-key limits in-process: the routes' app with its ApiKeys middleware over fake encoders and
a real registry, with an injected clock for rotation and rate limits. The same checks run through `bentoml serve` in
tests/test_api_keys.py."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from api.auth import Gate, MetricsGuard, open_server_warning, presented_key
from api.keys import KeyFileError, KeyRing, parse_key_file, parse_key_list
from api.limits import RateLimiter, retry_after
from engine.tenancy import Tenant
from service import _listening_host, build_app
from settings import Settings
from testing.client import assert_error, bearer, deploy, files
from testing.fakes import fake_engine
from testing.images import jpeg_bytes
from testing.tenancy import (
    KEY_A,
    KEY_ADMIN,
    KEY_B,
    KEY_C,
    WRONG,
    assert_unauthorized,
    check_every_route_needs_a_key,
    check_isolation,
    interleaved_medians,
    key_file,
    ratio_within,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Keyed:
    """A keyed app in-process: its client, the key file, the clock its gate runs on."""

    def __init__(self, client: TestClient, path: Path, clock: Clock, settings: Settings) -> None:
        self.client, self.path, self.clock, self.settings = client, path, clock, settings

    def regate(self, **changes: Any) -> Gate:
        """Replace the app's gate with one from changed settings (same key file, same clock)."""
        settings = self.settings.model_copy(update=changes)
        gate = Gate.from_settings(settings, clock=self.clock)
        self.client.app.state.gate = gate  # type: ignore[attr-defined]
        return gate


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[Keyed]:
    path = tmp_path / "keys.txt"
    path.write_text(key_file())
    path.chmod(0o600)
    # No budget of invalid keys per address here: these tests send many on purpose (its own tests: test_shared_limits).
    engine, _ = fake_engine(tmp_path / "data", api_keys=str(path), max_body_bytes=2**20, auth_failure_limit=0)
    clock = Clock()
    app = build_app(engine)
    app.state.gate = Gate.from_settings(engine.settings, clock=clock)
    with TestClient(app) as client:
        yield Keyed(client, path, clock, engine.settings)
    engine.close()


# -- 401 -----------------------------------------------------------------------------------------------------------
def test_every_route_needs_a_key(keyed: Keyed) -> None:
    c = keyed.client
    spec = c.get("/openapi.json").json()  # public: the docs page loads it without a key
    assert check_every_route_needs_a_key(c, spec) >= 12


def test_the_key_is_checked_before_the_body_is_read(keyed: Keyed) -> None:
    big = b"x" * (2**20 + 10)  # over this app's body limit: 413 with a key, 401 without
    assert_unauthorized(keyed.client.post("/embed_image", content=big), invalid=False)
    assert_error(keyed.client.post("/embed_image", content=big, headers=bearer(KEY_A)), 413)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY_A}"},
        {"Authorization": f"bearer {KEY_A}"},
        {"Authorization": f"BEARER   {KEY_A}  "},
        {"x-api-key": KEY_A},
        {"X-API-Key": KEY_A},
        {"Authorization": "Basic YTpi", "x-api-key": KEY_A},  # not a Bearer: the other header
    ],
)
def test_a_key_in_either_header(keyed: Keyed, headers: dict[str, str]) -> None:
    r = keyed.client.get("/deployments", headers=headers)
    assert r.status_code == 200, r.text


def test_presented_key_reads_bearer_first() -> None:
    both = [(b"x-api-key", b"second"), (b"authorization", b"Bearer first")]
    assert presented_key(both) == b"first"
    assert presented_key([(b"authorization", b"Bearer")]) is None
    assert presented_key([(b"authorization", b"Bearer   ")]) is None
    assert presented_key([(b"x-api-key", b"  ")]) is None
    assert presented_key([]) is None


def test_public_paths_need_no_key_and_the_docs_ask_for_one(keyed: Keyed) -> None:
    c = keyed.client
    assert c.get("/docs").status_code == 200 and "swagger" in c.get("/docs").text.lower()
    spec = c.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert (schemes["HTTPBearer"]["type"], schemes["HTTPBearer"]["scheme"]) == ("http", "bearer")
    assert schemes["APIKeyHeader"]["in"] == "header" and schemes["APIKeyHeader"]["name"] == "x-api-key"
    op = spec["paths"]["/classify"]["post"]
    assert {"HTTPBearer": []} in op["security"] and {"401", "429"} <= set(op["responses"])
    # The web page and its settings load without a key (the page asks for one); its API calls carry the key.
    page = c.get("/ui/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert c.get("/ui/settings.json").status_code == 200
    assert_unauthorized(c.get("/deployments"), invalid=False)
    assert_unauthorized(c.get("/uix"), invalid=False)


def test_a_request_before_the_service_set_its_gate_is_refused(tmp_path: Path) -> None:
    app = build_app()  # as at import, before the service's __init__ sets engine, settings and gate
    with TestClient(app) as c:
        assert_error(c.get("/deployments"), 503, "starting")


# -- tenants -------------------------------------------------------------------------------------------------------
def test_tenants_see_only_their_own_deployments(keyed: Keyed) -> None:
    ids = check_isolation(keyed.client, jpeg_bytes(1))
    assert len(ids) == 3


def test_an_open_server_is_one_tenant_that_sees_everything(tmp_path: Path) -> None:
    engine, _ = fake_engine(tmp_path / "data")
    with TestClient(build_app(engine)) as c:
        dep = deploy(c)
        # Any header, any key: ignored (today's behaviour).
        r = c.get("/model_config", params={"deployed_id": dep["deployed_id"]}, headers=bearer(WRONG))
        assert r.status_code == 200
        assert [d["tenant"] for d in c.get("/deployments").json()["deployments"]] == ["default"]
    engine.close()


def test_keys_turned_on_later_show_the_old_deployments_to_admins_and_to_the_default_tenant(tmp_path: Path) -> None:
    engine, _ = fake_engine(tmp_path / "data")
    with TestClient(build_app(engine)) as c:
        old = deploy(c)["deployed_id"]
    engine.close()
    keys = tmp_path / "keys.txt"
    keys.write_text(key_file(f"{'d' * 32} default"))
    engine, _ = fake_engine(tmp_path / "data", api_keys=str(keys))
    with TestClient(build_app(engine)) as c:
        assert c.get("/deployments", headers=bearer(KEY_A)).json() == {"deployments": []}
        assert [d["deployed_id"] for d in c.get("/deployments", headers=bearer(KEY_ADMIN)).json()["deployments"]] == [
            old
        ]
        r = c.post("/classify", params={"deployed_id": old}, files=files(jpeg_bytes()), headers=bearer("d" * 32))
        assert r.status_code == 200
    engine.close()


# -- rotation ------------------------------------------------------------------------------------------------------
def test_keys_rotate_when_the_file_changes(keyed: Keyed, caplog: pytest.LogCaptureFixture) -> None:
    c, new = keyed.client, "zss-rotated-key-" + secrets.token_hex(16)
    assert_unauthorized(c.get("/deployments", headers=bearer(new)), invalid=True)
    keyed.path.write_text(key_file(f"{new} a").replace(f"{KEY_B} ", f"#{KEY_B} "))
    # Looked at once a second on the gate's clock: not yet...
    assert_unauthorized(c.get("/deployments", headers=bearer(new)), invalid=True)
    keyed.clock.advance(1.0)
    assert c.get("/deployments", headers=bearer(new)).status_code == 200
    assert_unauthorized(c.get("/deployments", headers=bearer(KEY_B)), invalid=True)  # removed
    # A broken edit keeps the previous keys (never opens the server, never locks everyone out) and says why, once,
    # naming the line and not the key.
    caplog.set_level(logging.ERROR, "zss.api")
    keyed.path.write_text(key_file(f"{new} a", "half-written-line-with-a-secret"))
    for _ in range(3):
        keyed.clock.advance(1.0)
        assert c.get("/deployments", headers=bearer(new)).status_code == 200
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "line 9" in errors[0] and "secret" not in errors[0], errors
    keyed.path.unlink()  # a deleted file too
    keyed.clock.advance(1.0)
    assert c.get("/deployments", headers=bearer(KEY_A)).status_code == 200


# -- rate limit ----------------------------------------------------------------------------------------------------
def test_rate_limit_429_with_retry_after_then_recovery(keyed: Keyed) -> None:
    keyed.regate(rate_limit_rps=2.0, rate_limit_burst=3)
    c, key = keyed.client, bearer(KEY_C)
    assert [c.get("/deployments", headers=key).status_code for _ in range(3)] == [200] * 3  # the burst
    r = c.get("/deployments", headers=key)
    assert_error(r, 429, "Rate limit exceeded")
    assert r.headers["retry-after"] == "1"  # one token at 2/s: 0.5 s, rounded up to whole seconds
    # Other keys have buckets of their own; wrong keys are refused before any bucket.
    assert c.get("/deployments", headers=bearer(KEY_A)).status_code == 200
    assert_unauthorized(c.get("/deployments", headers=bearer(WRONG)), invalid=True)
    keyed.clock.advance(0.5)
    assert c.get("/deployments", headers=key).status_code == 200
    assert c.get("/deployments", headers=key).status_code == 429
    keyed.clock.advance(10)  # refills to the burst, not beyond
    assert [c.get("/deployments", headers=key).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_token_bucket_arithmetic() -> None:
    clock = Clock()
    limiter = RateLimiter(0.25, 1, clock)  # one request per 4 s
    assert limiter.take("k") == 0.0
    assert limiter.take("k") == pytest.approx(4.0)
    clock.advance(3.0)
    assert limiter.take("k") == pytest.approx(1.0)
    clock.advance(1.0)
    assert limiter.take("k") == 0.0
    assert RateLimiter(2.5).burst == 3  # the default burst: the rate, rounded up
    assert [retry_after(w) for w in (0.01, 1.0, 1.2)] == ["1", "1", "2"]
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_rate_limit_settings_are_validated() -> None:
    for bad in ({"rate_limit_rps": -1}, {"rate_limit_rps": float("nan")}, {"rate_limit_burst": -2}):
        with pytest.raises(ValueError):
            Settings(**bad)


# -- metrics -------------------------------------------------------------------------------------------------------
def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_and_images_are_counted_per_tenant(keyed: Keyed) -> None:
    keyed.regate(rate_limit_rps=1000.0)
    c, key = keyed.client, bearer(KEY_B)
    before = {
        "ok": sample("zss_tenant_requests_total", tenant="b", code="200"),
        "bad": sample("zss_tenant_requests_total", tenant="b", code="422"),
        "images": sample("zss_tenant_images_total", tenant="b"),
        "invalid": sample("zss_auth_failures_total", reason="invalid"),
    }
    assert c.post("/embed_image", files=files(jpeg_bytes(1), jpeg_bytes(2)), headers=key).status_code == 200
    assert c.post("/embed_image", files=files(b"not an image"), headers=key).status_code == 422  # not counted
    c.get("/deployments", headers=bearer(WRONG))
    assert sample("zss_tenant_requests_total", tenant="b", code="200") == before["ok"] + 1
    assert sample("zss_tenant_requests_total", tenant="b", code="422") == before["bad"] + 1
    assert sample("zss_tenant_images_total", tenant="b") == before["images"] + 2
    assert sample("zss_auth_failures_total", reason="invalid") == before["invalid"] + 1


def test_metrics_guard_needs_an_admin_key_when_asked(tmp_path: Path) -> None:
    inner = Starlette(
        routes=[Route("/metrics", lambda _: PlainTextResponse("m")), Route("/x", lambda _: PlainTextResponse("x"))]
    )
    path = tmp_path / "keys.txt"
    path.write_text(key_file())
    gates: dict[str, Gate | None] = {"now": None}
    guarded = TestClient(MetricsGuard(inner, gate=lambda: gates["now"]))
    assert_error(guarded.get("/metrics"), 503, "starting")  # before the service set its gate
    gates["now"] = Gate.from_settings(Settings(api_keys=str(path), metrics_require_key=True))
    assert_unauthorized(guarded.get("/metrics"), invalid=False)
    assert_unauthorized(guarded.get("/metrics", headers=bearer(WRONG)), invalid=True)
    assert_error(guarded.get("/metrics", headers=bearer(KEY_A)), 403, "admin key")
    assert guarded.get("/metrics", headers=bearer(KEY_ADMIN)).text == "m"
    assert guarded.get("/x").text == "x"  # everything else is the routes' app's business
    gates["now"] = Gate.from_settings(Settings(api_keys=str(path)))  # keyed server, /metrics left open
    assert guarded.get("/metrics").text == "m"
    gates["now"] = Gate.from_settings(Settings(metrics_require_key=True))  # no keys at all: nothing to ask for
    assert guarded.get("/metrics").text == "m"


# -- key files -----------------------------------------------------------------------------------------------------
def test_key_file_format() -> None:
    hashed = hashlib.sha256(b"a-key-kept-only-as-its-hash-0001").hexdigest()
    keys = parse_key_file(
        "# comment\n\nk1-0123456789abcdef0123456789abcdef t1\n"
        f"k2-0123456789abcdef0123456789abcdef t2 admin  # ops\nsha256:{hashed} t3\n"
    )
    assert [(k.tenant.name, k.tenant.admin) for k in keys] == [("t1", False), ("t2", True), ("t3", False)]
    ring = KeyRing(keys)
    assert ring.lookup(b"k2-0123456789abcdef0123456789abcdef") == keys[1]
    assert ring.lookup(b"a-key-kept-only-as-its-hash-0001") == keys[2]
    assert ring.lookup(b"k2-0123456789abcde") is None and ring.lookup(b"") is None
    assert (
        parse_key_list("k1-0123456789abcdef0123456789abcdef:t1, k2-0123456789abcdef0123456789abcdef:t2:admin")
        == keys[:2]
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("s3cr3t-0123456789abcdef0123456789abcdef\n", "line 1: expected 'key tenant'"),
        ("s3cr3t-0123456789abcdef0123456789abcdef t1 root\n", "line 1: the third field can only be 'admin'"),
        ("s3cr3t-0123456789abcdef0123456789abcdef t/1\n", "line 1: the tenant must be"),
        (
            "#\ns3cr3t-0123456789abcdef0123456789abcdef t1\ns3cr3t-0123456789abcdef0123456789abcdef t2\n",
            "line 3: the same key as line 2",
        ),
        ("s3cr3t-0123456789abcdef0123456789abcdef\u00e9 t1\n", "line 1: a key is 1-4096 visible ASCII"),
    ],
)
def test_key_file_errors_name_the_line_never_the_key(text: str, error: str) -> None:
    with pytest.raises(KeyFileError) as exc:
        parse_key_file(text)
    assert str(exc.value).startswith(error) and "s3cr3t" not in str(exc.value)


def test_the_setting_is_a_file_or_a_list_or_the_server_does_not_start(tmp_path: Path) -> None:
    assert KeyRing.from_setting("  ") is None  # empty: an open server
    ring = KeyRing.from_setting(f"{KEY_A}:a,{KEY_ADMIN}:ops:admin")
    assert ring is not None and ring.path is None and ring.lookup(KEY_ADMIN.encode()).tenant == Tenant("ops", True)
    for value in (str(tmp_path / "missing-keys.txt"), "s3cr3t-without-a-tenant", "s3cr3t:bad tenant"):
        with pytest.raises(KeyFileError) as exc:
            Gate.from_settings(Settings(api_keys=value))
        assert "s3cr3t" not in str(exc.value) and "missing-keys" not in str(exc.value)
    binary = tmp_path / "keys.bin"
    binary.write_bytes(b"\xff\xfe s3cr3t t\n")
    with pytest.raises(KeyFileError, match="not UTF-8"):
        KeyRing.from_setting(str(binary))


def test_keys_are_held_only_as_hashes(keyed: Keyed, caplog: pytest.LogCaptureFixture) -> None:
    gate: Gate = keyed.client.app.state.gate  # type: ignore[attr-defined]
    assert gate.keys is not None
    held = pickle.dumps(gate.keys.keys) + repr(gate.keys.keys).encode() + pickle.dumps(vars(gate.keys))
    for key in (KEY_A, KEY_B, KEY_ADMIN):
        assert key.encode() not in held
        assert hashlib.sha256(key.encode()).hexdigest().encode() not in repr(gate.keys.keys).encode()
    assert {k.digest for k in gate.keys.keys} >= {hashlib.sha256(KEY_A.encode()).digest()}
    caplog.set_level(logging.DEBUG)
    keyed.client.get("/deployments", headers=bearer(WRONG))
    keyed.client.get("/deployments", headers=bearer(KEY_A))
    assert WRONG not in caplog.text and KEY_A not in caplog.text
    assert "Key(tenant='a', admin=False)" in repr(gate.keys.keys)


def test_short_keys_are_refused_and_a_world_readable_file_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.txt"
    short = "s3cr3t-" + "k" * 24  # 31 characters
    for text in (f"{KEY_A} a\n{short} t\n", f"{short}:t", f"{KEY_A}:a,{short}:t"):
        if "\n" in text:
            path.write_text(text)
        with pytest.raises(KeyFileError, match="shorter than 32 characters") as exc:
            KeyRing.from_setting(str(path) if "\n" in text else text)
        assert "line 2" in str(exc.value) or "entry" in str(exc.value)
        assert "s3cr3t" not in str(exc.value)
    path.write_text(f"{short}k t\n")  # 32 characters: accepted
    path.chmod(0o644)
    caplog.set_level(logging.WARNING, "zss.api")
    assert KeyRing.from_setting(str(path)) is not None
    assert "readable by every user" in caplog.text and "s3cr3t" not in caplog.text


# -- start-up warning ------------------------------------------------------------------------------------------------
def test_an_open_server_beyond_loopback_warns_loudly() -> None:
    for host in ("127.0.0.1", "::1", "127.0.0.5"):
        assert open_server_warning(host) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", None, "not-an-address"):
        warning = open_server_warning(host)
        assert warning is not None and "WITHOUT API KEYS" in warning and "ZSS_API_KEYS" in warning


def test_the_api_worker_finds_its_listening_address_from_bentomls_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    for bind in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as sock:
            sock.bind((bind, 0))
            sock.listen()
            monkeypatch.setattr(sys, "argv", ["worker", "--fd", str(sock.fileno()), "--worker-id", "1"])
            assert _listening_host() == bind
            os.fstat(sock.fileno())  # still open: the worker's socket was duplicated, not closed
    monkeypatch.setattr(sys, "argv", ["worker"])
    assert _listening_host() is None


# -- constant time -------------------------------------------------------------------------------------------------
def test_lookup_time_does_not_depend_on_how_much_of_a_key_matches() -> None:
    """In-process, where the comparison's own time is measurable (over HTTP the network's noise is 1,000 times larger;
    tests/test_api_keys.py checks the served route with a looser bound). A wrong key sharing all but its last
    character with a held key against one sharing nothing, 3,000 interleaved rounds each: the medians are within 25%
    (on one of up to three tries). The same harness finds the leak of an early-exit comparison, so it can see one."""
    held = secrets.token_hex(512)  # 1,024 characters
    ring = KeyRing(parse_key_file(f"{held} t\n" + "".join(f"{secrets.token_hex(16)} t{i}\n" for i in range(20))))
    near = (held[:-1] + ("0" if held[-1] != "0" else "1")).encode()
    far = ("x" * len(held)).encode()
    assert ring.lookup(near) is None and ring.lookup(far) is None and ring.lookup(held.encode()) is not None
    # Up to three measurements, one inside is enough: a leak is outside on all of them, load from others rarely.
    inside, ratios = ratio_within(lambda: interleaved_medians(ring.lookup, near, far, trials=3000, reps=5), 0.8, 1.25)
    assert inside, ratios

    def leaky(candidate: bytes, target: bytes = held.encode()) -> bool:
        for x, y in zip(candidate, target):
            if x != y:
                return False
        return len(candidate) == len(target)

    t_near, t_far = interleaved_medians(leaky, near, far, trials=300, reps=5)
    assert t_near / t_far > 5, (t_near, t_far)


# -- fuzz ------------------------------------------------------------------------------------------------------------
HEADER_NAMES = st.sampled_from([b"authorization", b"x-api-key", b"Authorization", b"X-Api-Key", b"content-type", b"x"])
HEADER_VALUES = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda k, s: s + k,
        st.sampled_from([KEY_A.encode(), WRONG.encode(), b""]),
        st.sampled_from([b"Bearer ", b"bearer", b"Basic ", b"", b"Bearer\t", b"Bearer  \x00"]),
    ),
    st.text(max_size=50).map(lambda t: t.encode("utf-8")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6),
    path=st.sampled_from(["/deployments", "/model_config", "/embed_text", "/docs"]),
)
def test_any_header_bytes_get_a_4xx_or_a_2xx_never_a_5xx(
    keyed: Keyed, headers: list[tuple[bytes, bytes]], path: str
) -> None:
    """Raw ASGI (no HTTP client cleans the bytes up): whatever the headers, the gate answers and never fails."""
    app = keyed.client.app
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"deployed_id=x",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    anyio.run(app, scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    assert status < 500, (status, sent)
    has_key = presented_key(headers) == KEY_A.encode()
    if path != "/docs" and not has_key:
        assert status == 401
