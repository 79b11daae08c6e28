"""Workers end with their server (issue 32, item 8): a ``kill -9`` of `bentoml serve` alone (its workers run in
sessions of their own) ends the API and encoder workers within seconds, and the port is free for a restart."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from testing.models import ClipFiles, clip_env
from testing.server import start_server, stop_server

pytestmark = pytest.mark.server

BOUND_S = 10.0  # the "within seconds"; the watch itself takes POLL_S + GRACE_S at most (runners/lifeline.py)


def test_kill_9_of_the_server_ends_every_worker_and_frees_the_port(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    server = start_server(clip_env(tiny_clip, tmp_path / "data"), tmp_path / "serve.log")
    workers = psutil.Process(server.proc.pid).children(recursive=True)
    try:
        sessions = {w.pid: os.getsid(w.pid) for w in workers}
        assert len(workers) >= 3, workers  # the API worker and the two encoders
        assert any(sid != os.getsid(server.proc.pid) for sid in sessions.values()), "workers share the server's session"
        os.kill(server.proc.pid, signal.SIGKILL)  # the server only: its workers are not in its process group
        server.proc.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=BOUND_S)
        assert not alive, f"workers outlived their server: {alive}\n{server.log()[-3000:]}"
        port = urlsplit(server.url).port
        with socket.socket() as sock:  # what a restart does first (BentoML binds with SO_REUSEADDR too)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        stop_server(server)
        for w in workers:  # without the fix they would outlive the test (stop_server finds no children of a dead pid)
            with contextlib.suppress(psutil.Error):
                w.kill()
