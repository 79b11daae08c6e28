"""Shared fixtures: tiny random-weight models written to disk, and a real `bentoml serve` of the project.

Nothing here reaches the network: the models are built from configs with seeded random weights, saved as files and
loaded through the same settings (ZSS_CLIP_MODEL / ZSS_CLIP_PRETRAINED) a user would set.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
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
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class ClipFiles:
    config: Path
    checkpoint: Path


def write_tiny_clip(directory: Path, seed: int = 0) -> ClipFiles:
    """A tiny open_clip model: config JSON + checkpoint of seeded random weights."""
    import open_clip
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    cfg_path = directory / "tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CFG))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CLIP_CFG)
    ckpt = directory / "tiny-clip.pt"
    torch.save(model.state_dict(), ckpt)
    return ClipFiles(cfg_path, ckpt)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> ClipFiles:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 48), quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples (all label sets) from /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric = head.split("{", 1)[0]
            if metric == name:
                total += float(value)
                found = True
        return total if found else 0.0

    def metric_lines(self, prefix: str) -> list[str]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def start_server(env: dict[str, str], log_path: Path, timeout: float = 240.0, root: Path = ROOT) -> Server:
    """Start `bentoml serve` from the repo root (or another checkout: ``root``) as a user would; wait until ready."""
    port = free_port()
    full_env = {**os.environ, **env}
    full_env.setdefault("ZSS_DETECTOR_MODEL", "none")
    full_env["PYTHONUNBUFFERED"] = "1"
    fh = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service:ZeroShot", "--host", "127.0.0.1", "--port", str(port)],
        cwd=root,
        env=full_env,
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    server = Server(url, proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{server.log()[-5000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                # Dependencies answer too once the gateway is ready; this also warms them up.
                r = httpx.get(url + "/healthz_models", timeout=120)
                if r.status_code == 200:
                    return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"bentoml serve did not become ready in {timeout}s:\n{server.log()[-5000:]}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)


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
def running_server(env: dict[str, str], log_path: Path, root: Path = ROOT) -> Iterator[Server]:
    server = start_server(env, log_path, root=root)
    try:
        yield server
    finally:
        stop_server(server)


def clip_env(files: ClipFiles, data_dir: Path) -> dict[str, str]:
    return {
        "ZSS_CLIP_MODEL": str(files.config),
        "ZSS_CLIP_PRETRAINED": str(files.checkpoint),
        "ZSS_DATA_DIR": str(data_dir),
    }


@pytest.fixture(scope="session")
def tiny_owl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight OWLv2 saved with save_pretrained (64x64 input, 64 boxes)."""
    from tests.owl_fixtures import build_tiny_owlv2

    return build_tiny_owlv2(tmp_path_factory.mktemp("tiny-owlv2"))


@pytest.fixture(scope="session")
def server(tiny_clip: ClipFiles, tiny_owl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real `bentoml serve` of the tiny CLIP and tiny OWLv2, shared by the API tests."""
    base = tmp_path_factory.mktemp("server")
    env = {**clip_env(tiny_clip, base / "data"), "ZSS_DETECTOR_MODEL": str(tiny_owl), "ZSS_DETECTOR_TOP_K": "48"}
    with running_server(env, base / "serve.log") as srv:
        yield srv
