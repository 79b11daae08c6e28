"""Container figures (issue 26): the bento's image under podman against the same bento served by `bentoml serve`.

    .venv/bin/python -m bench.containers size
    .venv/bin/python -m bench.containers coldstart [--rounds 3]
    .venv/bin/python -m bench.containers throughput [--rounds 3] [--seconds 20] [--clients 8]
    .venv/bin/python -m bench.containers failover [--seconds 20] [--users 8]

The image is ZSS_TEST_IMAGE or the one deploy/image.sh builds (the shipped shapes CLIP, detector off); its bento is
read from BentoML's store (the image's tag is the bento's).
- size: the image's size and its largest layers' packages (what a CPU-wheel image would save).
- coldstart: alternating rounds of `podman run` and `bentoml serve TAG` (from an empty folder, no ZSS_* variable),
  each from its launch to /readyz 200 and then /healthz_models (the encoders answered).
- throughput: /embed_image (a 640x480 JPEG) on both, side by side in alternating rounds, CLIENTS closed-loop
  clients for SECONDS seconds each (bench.common.steady_load).
- failover: two replicas, Redis and HAProxy (testing.containers.replica_set, as the tests run them) under a Locust load
  (locustfile.py, /classify users) through the balancer; one replica killed after a third of the run: requests
  lost (Locust's failures), deployments lost; then Redis stopped for 10 s and started again: how long until each
  replica answers 200 again (no replica restarted).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.common import ROOT, image_post, jpeg, machine, steady_load, table
from testing import containers as pc
from testing.server import Server, launch_server, stop_server

DATA_ENV = {"ZSS_DATA_DIR": pc.DATA}
RED = {
    "classifier_configs": [
        {"name": "red", "examples_to_include": ["red shape"]},
        {"name": "other", "examples_to_include": ["blue shape", "green shape", "yellow shape"]},
    ],
    "augment_examples": False,
}


def wait_models(url: str, started: float, timeout: float = 300) -> float:
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                if httpx.get(url + "/healthz_models", timeout=120).status_code == 200:
                    return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(url)


@contextlib.contextmanager
def container(image: str) -> Iterator[tuple[str, float]]:
    with pc.volume() as vol:
        started = time.monotonic()
        c = pc.run_container(image, env=DATA_ENV, volumes={vol: pc.DATA})
        try:
            assert c.url is not None
            yield c.url, wait_models(c.url, started)
        finally:
            pc.remove(c.name)


@contextlib.contextmanager
def bento_serve(tag: str) -> Iterator[tuple[str, float]]:
    """`bentoml serve TAG` as an operator runs it: an empty folder, no ZSS_* variable, the user's BentoML store."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"BENTOML_HOME": os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml")), "HF_HUB_OFFLINE": "1"}
        unset = (*(k for k in os.environ if k.startswith("ZSS_")), "PYTHONPATH")
        started = time.monotonic()
        server: Server = launch_server(env, Path(tmp) / "serve.log", root=Path(tmp), target=tag, unset=unset)
        try:
            yield server.url, wait_models(server.url, started)
        finally:
            stop_server(server)


def cmd_size(image: str) -> None:
    size = int(pc.podman("image", "inspect", "--format", "{{.Size}}", image))
    print(f"{image}: {size / 1e9:.2f} GB")
    out = subprocess.run(
        [
            "podman",
            "run",
            "--rm",
            "--entrypoint",
            "sh",
            image,
            "-c",
            "du -sm /app/.venv/lib/python3.11/site-packages/* | sort -n | tail -8",
        ],
        capture_output=True,
        text=True,
    ).stdout
    print("largest packages (MB):\n" + out)


def cmd_coldstart(image: str, rounds: int) -> None:
    rows = []
    for i in range(rounds):
        for name, ctx in (("container", container(image)), ("bentoml serve", bento_serve(image))):
            with ctx as (_, seconds):
                rows.append([i + 1, name, f"{seconds:.1f}"])
                print(rows[-1], flush=True)
    print(table(["round", "server", "launch to ready + models (s)"], rows))


def cmd_throughput(image: str, rounds: int, seconds: float, clients: int) -> None:
    post = image_post("/embed_image", jpeg())
    rows = []
    for i in range(rounds):
        got = {}
        for name, ctx in (("container", container(image)), ("bentoml serve", bento_serve(image))):
            with ctx as (url, _):
                steady_load(url, post, clients, 5)  # warm-up
                res = steady_load(url, post, clients, seconds)
                got[name] = res
                rows.append([i + 1, name, f"{res.per_s:.1f}", f"{res.p50_ms:.0f}", f"{res.p99_ms:.0f}", res.errors])
                print(rows[-1], flush=True)
        ratio = got["container"].per_s / got["bentoml serve"].per_s
        rows.append([i + 1, "ratio container / serve", f"{ratio:.2f}", "", "", ""])
    print(table(["round", "server", "img/s", "p50 ms", "p99 ms", "errors"], rows))


def locust(url: str, users: int, seconds: int, csv_prefix: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "locustfile.py"),
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            f"{seconds}s",
            "--host",
            url,
            "--csv",
            str(csv_prefix),
            "--only-summary",
            "--class-sizes",
            "10",
            "--w-embed-image",
            "0",
            "--w-embed-text",
            "0",
            "--w-deploy",
            "0",
            "--w-detect",
            "0",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def locust_totals(csv_prefix: Path) -> tuple[int, int]:
    with open(f"{csv_prefix}_stats.csv") as fh:
        for row in csv.DictReader(fh):
            if row["Name"] == "Aggregated":
                return int(row["Request Count"]), int(row["Failure Count"])
    raise ValueError("no aggregated row")


def cmd_failover(image: str, seconds: int, users: int) -> None:
    with pc.replica_set(image, ready_timeout=600) as rs, tempfile.TemporaryDirectory() as tmp:
        lb, (victim, survivor) = rs.balancer, rs.replicas
        assert lb.url is not None and survivor.url is not None
        with httpx.Client(base_url=lb.url, timeout=120) as c:
            deps = {c.post("/deploy_classifier", json=RED).json()["deployed_id"] for _ in range(3)}
        prefix = Path(tmp) / "locust"
        load = locust(lb.url, users, seconds, prefix)
        time.sleep(seconds / 3)
        pc.podman("kill", victim.name)
        killed = time.monotonic()
        while rs.in_rotation() != {"api2"}:
            time.sleep(0.1)
        out_of_rotation = time.monotonic() - killed
        load.wait(timeout=seconds * 3 + 60)
        total, failures = locust_totals(prefix)
        with httpx.Client(base_url=lb.url, timeout=120) as c:
            listed = {d["deployed_id"] for d in c.get("/deployments").json()["deployments"]}
        print(
            table(
                ["Locust requests", "failed", "deployments lost", "killed at (s)", "out of rotation after (s)"],
                [[total, failures, len(deps - listed), f"{seconds / 3:.0f}", f"{out_of_rotation:.1f}"]],
            )
        )
        # Redis down for 10 s, then back: how long until the survivor answers 200 again (no replica restarted).
        pc.podman("stop", "-t", "2", rs.redis.name)
        time.sleep(10)
        with httpx.Client(base_url=survivor.url, timeout=30) as c:
            during = c.post("/deploy_classifier", json=RED).status_code
            pc.podman("start", rs.redis.name)
            back = time.monotonic()
            while c.get("/deployments").status_code != 200:
                time.sleep(0.05)
            recovered = time.monotonic() - back
            still = {d["deployed_id"] for d in c.get("/deployments").json()["deployments"]}
        print(
            table(
                ["deploy during the outage", "200 again after `podman start` returned (s)", "deployments lost"],
                [[during, f"{recovered:.2f}", len(deps - still)]],
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["size", "coldstart", "throughput", "failover"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--users", type=int, default=8)
    args = ap.parse_args()
    image = pc.image_under_test()
    print(machine())
    print(f"image {image}")
    if args.what == "size":
        cmd_size(image)
    elif args.what == "coldstart":
        cmd_coldstart(image, args.rounds)
    elif args.what == "throughput":
        cmd_throughput(image, args.rounds, args.seconds, args.clients)
    else:
        cmd_failover(image, int(args.seconds), args.users)


if __name__ == "__main__":
    main()
