"""runners/bentoml_internals.py: the one module on BentoML's private parts checks the BentoML it runs on, and no
other module of the served code reaches into ``bentoml._internal`` (but the one noted there)."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from runners.bentoml_internals import WRITTEN_FOR, check_version, is_serve_cli, stop_listening, stop_promptly

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_bentoml_is_the_series_it_was_written_for() -> None:
    check_version()  # what the service does at import


@pytest.mark.parametrize("found", ["1.5.0", "2.0.1", "1.3.9", "nonsense"])
def test_another_bentoml_stops_the_start_naming_the_module_and_both_versions(found: str) -> None:
    with pytest.raises(RuntimeError) as err:
        check_version(found)
    message = str(err.value)
    assert "runners/bentoml_internals.py" in message and found in message
    assert "BentoML " + ".".join(map(str, WRITTEN_FOR)) in message


def test_no_other_served_module_uses_bentomls_internals() -> None:
    users = sorted(
        str(path.relative_to(ROOT))
        for folder in ("api", "cache", "engine", "imaging", "runners", "semantic")
        for path in (ROOT / folder).rglob("*.py")
        if "bentoml._internal" in path.read_text(encoding="utf-8")
    ) + sorted(
        name for name in ("service.py", "settings.py", "errors.py") if "bentoml._internal" in (ROOT / name).read_text()
    )
    # runners/serving.py: _record_argument (the bento arguments of a build), left there while issue 26 changes it.
    assert users == ["runners/bentoml_internals.py", "runners/serving.py"], users


def test_only_bentoml_serve_itself_exits_without_finalizing() -> None:
    assert is_serve_cli(["/venv/bin/bentoml", "serve", "service:ZeroShot"])
    assert is_serve_cli(["/venv/lib/python3.11/site-packages/bentoml/__main__.py", "serve"])
    assert not is_serve_cli(["/venv/bin/bentoml", "build"])
    assert not is_serve_cli(["/venv/bin/pytest", "serve"])
    assert not is_serve_cli(["python", "-m", "_bentoml_impl.worker.service", "--fd", "3"])


def test_a_shut_listening_socket_refuses_new_connections_and_unix_sockets_are_left_alone() -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(str(Path(tmp) / "s"))
        unix.listen()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening
            assert stop_listening([tcp, unix]) == 1
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5)
            with socket.socket(socket.AF_UNIX) as client:  # the encoders' sockets keep serving the API worker
                client.connect(str(Path(tmp) / "s"))
        finally:
            tcp.close()
            unix.close()


def test_the_servers_workers_get_a_bounded_stop() -> None:
    from bentoml import serving

    stop_promptly(3.5)
    stop_promptly(3.5)  # idempotent: wraps BentoML's own function once
    watcher = serving.create_watcher(name="w", args=["-c", "pass"])
    assert watcher.graceful_timeout == 3.5


def test_dependency_sessions_drop_idle_connections_before_the_server_does() -> None:
    """BentoML's dependency-client sessions (aiohttp) reuse an idle connection for 15 s by default, uvicorn closes one
    after 5 s: a reused connection the encoder was closing failed the call. After the patch every new session's TCP
    connector stops reusing connections after CLIENT_KEEPALIVE_S, under uvicorn's 5 s; patching twice wraps once."""
    import asyncio

    import aiohttp
    from _bentoml_impl.client.proxy2 import SessionManager

    from runners.bentoml_internals import CLIENT_KEEPALIVE_S, shorten_client_keepalive

    async def timeout_of_a_new_session() -> float | None:
        manager = SessionManager("http://127.0.0.1:9", timeout=5.0, headers={})
        session = await manager.get_session()
        try:
            assert isinstance(session.connector, aiohttp.TCPConnector)
            return session.connector._keepalive_timeout
        finally:
            await session.close()

    original = SessionManager._make_client
    try:
        shorten_client_keepalive()
        wrapped = SessionManager._make_client
        shorten_client_keepalive()
        assert SessionManager._make_client is wrapped  # not wrapped twice
        assert asyncio.run(timeout_of_a_new_session()) == CLIENT_KEEPALIVE_S < 5.0
    finally:
        SessionManager._make_client = original  # type: ignore[method-assign]
        del SessionManager._zss_keepalive_s  # type: ignore[attr-defined]
    assert asyncio.run(timeout_of_a_new_session()) == 15.0  # aiohttp's default, which the patch replaces
