"""Shared fixtures: tiny random-weight models written to disk, and a real `bentoml serve` of the project.

Nothing here reaches the network: the models are built from configs with seeded random weights, saved as files and
loaded through the same settings (ZSS_CLIP_MODEL / ZSS_CLIP_PRETRAINED) a user would set. The helpers themselves live
in testing/ (shared with bench/).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # BentoML's usage analytics (model saves in tests/runners)
# The suite's servers and encoders run the image tower in torch, the reference its exact-value tests were written
# against, and without an export per server start; tests/runners/test_backends.py tests the exported backends and
# what ZSS_BACKEND=auto picks (its own server included).
os.environ.setdefault("ZSS_BACKEND", "torch")

from testing.models import ClipFiles, clip_env, shapes_clip_env, write_tiny_clip  # noqa: E402
from testing.owl import build_tiny_owlv2  # noqa: E402
from testing.postgres import PostgresServer, running_postgres  # noqa: E402
from testing.redis import RedisServer, running_redis  # noqa: E402
from testing.server import Server, running_server  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> ClipFiles:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_owl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight OWLv2 saved with save_pretrained (64x64 input, 64 boxes)."""
    return build_tiny_owlv2(tmp_path_factory.mktemp("tiny-owlv2"))


@pytest.fixture(scope="session")
def server(tiny_clip: ClipFiles, tiny_owl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real `bentoml serve` of the tiny CLIP and tiny OWLv2, shared by the API tests.

    URL fetching is on, for test hosts on 127.0.0.1 only: the allow-list names that host and the trusted networks
    that one address (the SSRF guard refuses loopback otherwise)."""
    base = tmp_path_factory.mktemp("server")
    env = {
        **clip_env(tiny_clip, base / "data"),
        "ZSS_DETECTOR_MODEL": str(tiny_owl),
        "ZSS_DETECTOR_TOP_K": "48",
        "ZSS_ALLOW_URL_FETCH": "true",
        "ZSS_URL_ALLOW_HOSTS": "127.0.0.1",
        "ZSS_URL_ALLOW_NETWORKS": "127.0.0.1/32",
        "ZSS_URL_TIMEOUT_S": "5",
    }
    with running_server(env, base / "serve.log") as srv:
        yield srv


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the tests that share it; each test keeps its keys apart with a prefix of its own
    (:func:`redis_prefix`). A test that kills Redis starts its own."""
    with running_redis(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server with pgvector (the collections' shared store) for the tests that share it; each
    test takes a database of its own (testing.postgres.fresh_database)."""
    with running_postgres() as srv:
        yield srv


@pytest.fixture
def redis_prefix() -> str:
    """Key prefix of one test in the shared Redis."""
    import uuid

    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def shapes_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real `bentoml serve` of the project's trained shapes CLIP (models/shapes-clip), shared by the modules that
    test semantics with it (one start instead of one per module)."""
    base = tmp_path_factory.mktemp("shapes")
    with running_server(shapes_clip_env(base / "data"), base / "serve.log") as srv:
        yield srv
