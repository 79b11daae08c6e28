"""A real `bentoml serve` of the project as a user starts it, for end-to-end tests and benchmarks, and a local stdlib
HTTP server for testing clients (URL fetching, load generators)."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from testing.client import bearer

ROOT = Path(__file__).resolve().parents[1]
# What `./dev.sh serve` serves: the checkout's service.
SERVICE = "service:ZeroShot"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    # An admin API key for the helpers' own requests (readiness, /metrics) when the server has keys; None otherwise.
    admin_key: str | None = None

    def client(self, timeout: float = 120.0, key: str | None = None) -> httpx.Client:
        """A client; with ``key``, every request sends it as ``Authorization: Bearer <key>``."""
        return httpx.Client(base_url=self.url, timeout=timeout, headers=bearer(key))

    def _admin(self) -> dict[str, str]:
        return bearer(self.admin_key)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples (all label sets) from /metrics; a metric that is not there is an
        error, not 0 (a renamed or unregistered metric must fail the test that reads it)."""
        text = httpx.get(self.url + "/metrics", timeout=30, headers=self._admin()).text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric = head.split("{", 1)[0]
            if metric == name:
                total += float(value)
                found = True
        if not found:
            raise KeyError(f"metric {name!r} is not in {self.url}/metrics")
        return total

    def metric_lines(self, prefix: str) -> list[str]:
        text = httpx.get(self.url + "/metrics", timeout=30, headers=self._admin()).text
        return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def start_server(
    env: dict[str, str],
    log_path: Path,
    timeout: float = 240.0,
    root: Path = ROOT,
    admin_key: str | None = None,
    target: str = SERVICE,
    unset: tuple[str, ...] = (),
) -> Server:
    """Start `bentoml serve` from the repo root (or another checkout: ``root``) as a user would; wait until ready.
    A server with API keys (ZSS_API_KEYS in ``env``) needs ``admin_key`` for the readiness check and /metrics.

    ``target`` is what to serve: the checkout's service, or a built bento's tag (served from ``root``, any folder);
    ``unset`` names variables of this process's environment the server must not inherit.
    """
    server = launch_server(env, log_path, root=root, admin_key=admin_key, target=target, unset=unset)
    url, proc = server.url, server.proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{server.log()[-5000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                # Dependencies answer too once the gateway is ready; this also warms them up.
                r = httpx.get(url + "/healthz_models", timeout=120, headers=bearer(admin_key))
                if r.status_code == 200:
                    return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"bentoml serve did not become ready in {timeout}s:\n{server.log()[-5000:]}")


def launch_server(
    env: dict[str, str],
    log_path: Path,
    root: Path = ROOT,
    admin_key: str | None = None,
    target: str = SERVICE,
    unset: tuple[str, ...] = (),
) -> Server:
    """Start `bentoml serve` (arguments as ``start_server``) and return at once, without waiting for it to be ready
    (start-up tests send requests from the first moment).

    Each server gets a BENTOML_HOME of its own (beside its log) unless ``env`` names one, so no test touches the
    user's. (Servers under one home no longer share their metrics: each has a Prometheus folder of its own, see
    runners/serving.py ``own_metrics_dir`` and tests/test_service.py.)
    """
    port = free_port()
    full_env = {**os.environ, **env}
    for name in unset:
        full_env.pop(name, None)
    full_env.setdefault("BENTOML_HOME", str(log_path.parent / f"bentoml-home-{log_path.stem}"))
    full_env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if target == SERVICE:
        full_env.setdefault("ZSS_DETECTOR_MODEL", "none")
    full_env["PYTHONUNBUFFERED"] = "1"
    fh = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)],
        cwd=root,
        env=full_env,
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(f"http://127.0.0.1:{port}", proc, log_path, admin_key)


def stop_server(server: Server) -> None:
    """SIGTERM, then SIGKILL after 30 s. BentoML's workers run in process groups of their own: any still alive after
    the server's are killed by pid, so a worker that does not stop never outlives its test."""
    workers = _descendants(server.proc.pid)
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)
    for proc in workers:
        with contextlib.suppress(psutil.Error):
            if proc.is_running():
                proc.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@contextlib.contextmanager
def local_http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """A threaded stdlib HTTP server on 127.0.0.1 inside the test process, for testing clients; yields its port."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def serving_files(files: dict[str, tuple[bytes, str]]) -> Iterator[int]:
    """``local_http_server`` answering GET ``path`` with ``files[path]`` = (body, content type), 404 otherwise."""

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body, ctype = files.get(self.path, (b"nope", "text/plain"))
            self.send_response(200 if self.path in files else 404)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with local_http_server(Files) as port:
        yield port


@contextlib.contextmanager
def running_server(
    env: dict[str, str],
    log_path: Path,
    root: Path = ROOT,
    admin_key: str | None = None,
    target: str = SERVICE,
    unset: tuple[str, ...] = (),
) -> Iterator[Server]:
    server = start_server(env, log_path, root=root, admin_key=admin_key, target=target, unset=unset)
    try:
        yield server
    finally:
        stop_server(server)
