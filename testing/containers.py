"""The bento's image run as users run it, under podman: the image built by deploy/image.sh, containers on the
machine's loopback, networks, volumes and the infrastructure image (Redis, HAProxy). Shared by tests/deploy and
bench/containers.py.

Every container and network made here carries a name with the prefix ``zss-test-`` and a random part, and is
removed by the context managers that make it (``cleanup`` removes whatever a killed run left behind).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx

from testing.server import ROOT, free_port

# The image under test: set by ./dev.sh test (it builds it first, deploy/image.sh); built here when unset.
IMAGE_ENV = "ZSS_TEST_IMAGE"
INFRA_IMAGE = "localhost/zss-infra:bookworm"
PREFIX = "zss-test-"
# Where `ZSS_DATA_DIR` points in the containers (a volume is mounted there).
DATA = "/data"


class PodmanError(RuntimeError):
    pass


def podman(*args: str, timeout: float = 300, check: bool = True) -> str:
    """Run one podman command (or docker's, where ZSS_CONTAINER_ENGINE=docker: the GPU suite on a machine that has
    only Docker); its standard output (a failure raises with the engine's own message)."""
    engine = os.environ.get("ZSS_CONTAINER_ENGINE", "podman")
    exe = shutil.which(engine)
    if exe is None:
        raise PodmanError(
            f"{engine} is not installed: ./dev.sh test installs podman (as root), or apt-get install podman"
        )
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise PodmanError(f"podman {' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def unique(kind: str) -> str:
    return f"{PREFIX}{kind}-{uuid.uuid4().hex[:8]}"


def image_under_test() -> str:
    """The image ./dev.sh test built, or one built now the same way (the machine's extra CAs trusted, as in CI)."""
    tag = os.environ.get(IMAGE_ENV, "").strip()
    if not tag:
        proc = subprocess.run(
            ["bash", str(ROOT / "deploy" / "image.sh"), "--host-cas"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise PodmanError(f"deploy/image.sh failed:\n{proc.stderr[-4000:]}")
        tag = proc.stdout.strip().splitlines()[-1]
        os.environ[IMAGE_ENV] = tag
    podman("image", "exists", tag)
    return tag


@dataclass
class Container:
    name: str
    url: str | None  # the published port on 127.0.0.1, when there is one

    def logs(self) -> str:
        return podman("logs", self.name, check=False, timeout=60)

    def client(self, timeout: float = 60.0) -> httpx.Client:
        if self.url is None:
            raise ValueError(f"{self.name} publishes no port")
        return httpx.Client(base_url=self.url, timeout=timeout)

    def state(self) -> dict[str, object]:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name))


def run_container(
    image: str,
    *,
    name: str | None = None,
    env: dict[str, str] | None = None,
    volumes: dict[str, str] | None = None,
    network: str | None = None,
    publish: int | None = 3000,
    command: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> Container:
    """``podman run -d``: ``publish`` (a port inside) is published on 127.0.0.1 at a free port."""
    name = name or unique("c")
    args = ["run", "-d", "--name", name]
    url = None
    if publish is not None:
        port = free_port()
        args += ["-p", f"127.0.0.1:{port}:{publish}"]
        url = f"http://127.0.0.1:{port}"
    for k, v in (env or {}).items():
        args += ["-e", f"{k}={v}"]
    for vol, path in (volumes or {}).items():
        args += ["-v", f"{vol}:{path}"]
    if network:
        args += ["--network", network, "--network-alias", name]
    podman(*args, *extra, image, *command)
    return Container(name, url)


def remove(*names: str) -> None:
    for name in names:
        podman("rm", "-f", "-v", "-t", "0", name, check=False, timeout=60)  # -v: its anonymous volumes too


def wait_ready(container: Container, timeout: float = 120.0, path: str = "/readyz") -> float:
    """Seconds until ``path`` answers 200; a container that exits or never gets there fails with its log."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{container.url}{path}", timeout=5).status_code == 200:
                return time.monotonic() - started
        state = container.state()
        if not state.get("Running"):
            raise PodmanError(f"{container.name} exited ({state.get('ExitCode')}):\n{container.logs()[-4000:]}")
        time.sleep(0.25)
    raise PodmanError(f"{container.name} not ready in {timeout:.0f} s:\n{container.logs()[-4000:]}")


@contextlib.contextmanager
def volume() -> Iterator[str]:
    name = unique("vol")
    podman("volume", "create", name)
    try:
        yield name
    finally:
        podman("volume", "rm", "-f", name, check=False)


@contextlib.contextmanager
def network() -> Iterator[str]:
    name = unique("net")
    podman("network", "create", name)
    try:
        yield name
    finally:
        podman("network", "rm", "-f", name, check=False)


@contextlib.contextmanager
def running(image: str, **kwargs: object) -> Iterator[Container]:
    c = run_container(image, **kwargs)  # type: ignore[arg-type]
    try:
        yield c
    finally:
        remove(c.name)


def cleanup() -> None:
    """Remove what an interrupted run left behind: containers, then networks and volumes, named with the prefix."""
    for kind, listing in (
        ("container", ["ps", "-a", "--format", "{{.Names}}"]),
        ("network", ["network", "ls", "--format", "{{.Name}}"]),
        ("volume", ["volume", "ls", "--format", "{{.Name}}"]),
    ):
        for name in podman(*listing, check=False).split():
            if name.startswith(PREFIX):
                if kind == "container":
                    remove(name)
                else:
                    podman(kind, "rm", "-f", name, check=False)


HAPROXY = ROOT / "deploy" / "haproxy"


@dataclass
class ReplicaSet:
    """Two API replicas, Redis and HAProxy on one podman network (README "Containers", deploy/haproxy)."""

    network: str
    redis: Container
    replicas: list[Container]
    balancer: Container
    stats: str  # HAProxy's statistics page (deploy/haproxy/haproxy.cfg)

    def servers(self) -> dict[str, str]:
        """The balancer's view of its servers api1, api2: their status (UP, DOWN, MAINT ...)."""
        rows = httpx.get(self.stats + "/;csv", timeout=10).text.splitlines()
        head = rows[0].lstrip("# ").split(",")
        cells = [dict(zip(head, row.split(","))) for row in rows[1:]]
        return {c["svname"]: c["status"] for c in cells if c.get("pxname") == "api" and c["svname"] != "BACKEND"}

    def in_rotation(self) -> set[str]:
        """The replicas the balancer sends to now."""
        return {name for name, status in self.servers().items() if status == "UP"}


@contextlib.contextmanager
def replica_set(image: str, ready_timeout: float = 420) -> Iterator[ReplicaSet]:
    """Start the set (Redis with its append-only file on a new volume), wait until every part is ready, remove it all
    afterwards."""
    podman("image", "exists", INFRA_IMAGE)
    names: list[str] = []
    with network() as net, volume() as redis_data:
        try:
            redis = run_container(
                INFRA_IMAGE,
                name=unique("redis"),
                network=net,
                publish=None,
                volumes={redis_data: "/data"},
                extra=["--user", "redis"],
                command=["redis-server", "--appendonly", "yes", "--dir", "/data", "--protected-mode", "no"],
            )
            names.append(redis.name)
            env = {"ZSS_REDIS_URL": f"redis://{redis.name}:6379/0", "ZSS_DATA_DIR": "/tmp/zss"}
            replicas = [run_container(image, name=unique(f"api{i}"), network=net, env=env) for i in (1, 2)]
            names += [r.name for r in replicas]
            stats_port = free_port()
            balancer = run_container(
                INFRA_IMAGE,
                name=unique("lb"),
                network=net,
                env={"ZSS_API1": replicas[0].name, "ZSS_API2": replicas[1].name},
                volumes={str(HAPROXY): "/usr/local/etc/zss:ro"},
                extra=["--user", "haproxy", "-p", f"127.0.0.1:{stats_port}:8404"],
                command=["haproxy", "-W", "-db", "-f", "/usr/local/etc/zss/haproxy.cfg"],
            )
            names.append(balancer.name)
            with cf.ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda r: wait_ready(r, timeout=ready_timeout), replicas))
            wait_ready(balancer, timeout=60)
            yield ReplicaSet(net, redis, replicas, balancer, f"http://127.0.0.1:{stats_port}")
        finally:
            remove(*names)
