"""Reliability figures (issue 18): cold start, kill -9 during a deploy and during cache writes, a soak.

    .venv/bin/python -m bench.reliability coldstart [--detector random] [--seconds 60]
    .venv/bin/python -m bench.reliability kill-deploy [--trials 3] [--texts 120]
    .venv/bin/python -m bench.reliability kill-cache [--trials 10]
    .venv/bin/python -m bench.reliability soak [--minutes 10] [--clients 4] [--deploy-share 0.1]
    .venv/bin/python -m bench.reliability redis-outage [--up 10] [--down 10] [--clients 4]

- coldstart: a fresh data dir, /readyz every 0.5 s from the launch; outcomes, the longest answer once the API worker
  answered, and how long a SIGTERM then takes to stop every process.
- kill-deploy: the shipped shapes CLIP; a ``?wait=false`` deploy of TEXTS texts with templates, every process of the
  server killed with SIGKILL once some chunks are committed; the cache's rows and the registry's deployments are read
  from disk (integrity checked), the server restarted and the same deploy sent again: it must encode only what was not
  committed (vectors lost: 0) and every earlier deployment must be there (deployments lost: 0).
- kill-cache: a process filling a real embedding cache through the embedder, killed with SIGKILL at a random moment;
  only whole chunks may be in the cache and a retry encodes exactly the rest.
- soak: the shapes CLIP with the detector off, CLIENTS clients mixing small deploys (new texts each time), /classify,
  /embed_text and /embed_image for MINUTES minutes; the RSS of every process sampled every 10 s, errors counted.
- redis-outage: two replicas (shapes CLIP, detector off) sharing one real redis-server (append-only, fsync always);
  CLIENTS clients /classify a deployment on both replicas in turn while Redis runs for UP s, is SIGKILLed for DOWN s
  and started again (same files) for UP s; per phase the statuses and latencies, how long after the restart each
  replica answered 200 again (no replica restarted), and whether the deployment and a new one made after the outage
  are seen by both (deployments lost).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.common import ROOT, jpeg, machine, table
from testing.models import shapes_clip_env
from testing.server import Server, launch_server, start_server, stop_server


def kill_tree(server: Server) -> None:
    """SIGKILL to the server and every worker (BentoML's workers have process groups of their own)."""
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    server.proc.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


# -- cold start -------------------------------------------------------------------------------------------------------
def coldstart(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**shapes_clip_env(Path(tmp) / "data"), "ZSS_DETECTOR_MODEL": args.detector}
        server = launch_server(env, Path(tmp) / "serve.log")
        results: list[tuple[float, str, float]] = []

        def probe() -> None:
            sent = time.monotonic()
            try:
                out = str(httpx.get(server.url + "/readyz", timeout=300).status_code)
            except httpx.ConnectError:
                out = "refused"
            except httpx.HTTPError as exc:
                out = type(exc).__name__
            results.append((sent, out, time.monotonic() - sent))

        threads = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            threads.append(threading.Thread(target=probe, daemon=True))
            threads[-1].start()
            time.sleep(0.5)
        for t in threads:
            t.join(320)
        procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
        ts = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        gone, alive = psutil.wait_procs(procs, timeout=60)
        stop_s = time.monotonic() - ts
        stop_server(server)
    answered = sorted(r for r in results if r[1] != "refused")
    up = min(s + d for s, _, d in answered) if answered else float("nan")
    counts = {o: sum(1 for r in results if r[1] == o) for o in sorted({r[1] for r in results})}
    after_up = [d for s, _, d in answered if s >= up]
    print(f"detector {args.detector}: {len(results)} requests over {args.seconds:g} s: {counts}")
    print(
        f"API worker first answered {up - t0:.1f} s after launch; longest answer to a request sent after that: "
        f"{max(after_up, default=0):.1f} s; longest wait of one sent before (kernel queue while the worker booted): "
        f"{max((d for s, _, d in answered if s < up), default=0):.1f} s"
    )
    print(f"SIGTERM -> every process gone: {stop_s:.1f} s ({len(alive)} still alive after 60 s)")


# -- kill -9 during a deploy ------------------------------------------------------------------------------------------
def kill_deploy(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        env = shapes_clip_env(base / "data")
        for trial in range(args.trials):
            server = start_server(env, base / f"serve-{trial}.log")
            with server.client(timeout=120) as c:
                before_ids = {d["deployed_id"] for d in c.get("/deployments").json()["deployments"]}
                c.post(
                    "/deploy_classifier",
                    json={"classifier_configs": [{"name": f"t{trial}", "examples_to_include": [f"kept {trial}"]}]},
                )
                body = {
                    "classifier_configs": [
                        {"name": f"c{i}", "examples_to_include": [f"trial {trial} text {i}"]} for i in range(args.texts)
                    ]
                }
                job = c.post("/deploy_classifier", params={"wait": "false"}, json=body).json()["job_id"]
                target = random.randint(1, max(1, args.texts // 12 - 1)) * 12
                while (done := c.get(f"/jobs/{job}").json())["done"] < target and done["state"] == "running":
                    time.sleep(0.05)
                ids_before_kill = {d["deployed_id"] for d in c.get("/deployments").json()["deployments"]}
            kill_tree(server)
            cache_db = base / "data" / "embeddings" / "keys.sqlite3"
            checks = (integrity(cache_db), integrity(base / "data" / "registry.sqlite3"))
            with sqlite3.connect(cache_db) as db:
                committed = db.execute(
                    "SELECT count(*) FROM vectors WHERE text LIKE ?", (f"trial {trial} text %",)
                ).fetchone()[0]
            server = start_server(env, base / f"serve-{trial}-again.log")
            try:
                misses0 = server.metric("zss_embedding_cache_misses_total")
                with server.client(timeout=300) as c:
                    ids_after = {d["deployed_id"] for d in c.get("/deployments").json()["deployments"]}
                    assert c.post("/deploy_classifier", json=body).status_code == 200
                misses = server.metric("zss_embedding_cache_misses_total") - misses0
            finally:
                stop_server(server)
            lost_vectors = int(misses - (args.texts - committed))  # a committed text encoded again = lost
            rows.append(
                [
                    trial,
                    done["done"],
                    committed,
                    int(misses),
                    lost_vectors,
                    len(ids_before_kill - ids_after),
                    "/".join(checks),
                    len(before_ids),
                ]
            )
    print(
        table(
            [
                "trial",
                "job done at kill",
                "texts committed",
                "encoded on retry",
                "vectors lost",
                "deployments lost",
                "integrity cache/registry",
                "deployments before",
            ],
            rows,
        )
    )


# -- kill -9 during cache writes --------------------------------------------------------------------------------------
_WORKER = """
import sys, time
import numpy as np
sys.path.insert(0, {root!r})
from cache.embeddings import EmbeddingCache
from engine.embedder import TextEmbedder
def encode(prompts):
    time.sleep(0.01)
    v = np.ones((len(prompts), 64), np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
TextEmbedder(EmbeddingCache({cache!r}), "m", encode, templates=("a {{}}.", "the {{}}."), commit_prompts=20).embed(
    [f"text {{i}}" for i in range({n})], augment=True)
"""


def kill_cache(args: argparse.Namespace) -> None:
    from cache.embeddings import EmbeddingCache
    from engine.embedder import TextEmbedder

    rows = []
    n = 3000
    for trial in range(args.trials):
        with tempfile.TemporaryDirectory() as tmp:
            cache = str(Path(tmp) / "cache")
            proc = subprocess.Popen([sys.executable, "-c", _WORKER.format(root=str(ROOT), cache=cache, n=n)])
            db = Path(cache) / "keys.sqlite3"
            while not db.exists() and proc.poll() is None:  # imports done, the cache open
                time.sleep(0.05)
            time.sleep(random.uniform(0.5, 4.0))  # a random moment of the writes (the whole run takes ~10 s)
            proc.kill()
            proc.wait()
            check = integrity(Path(cache) / "keys.sqlite3")
            c = EmbeddingCache(Path(cache))
            committed = c.count()

            def enc(prompts: list[str]) -> np.ndarray:
                v = np.ones((len(prompts), 64), np.float32)
                return v / np.linalg.norm(v, axis=1, keepdims=True)

            _, stats = TextEmbedder(c, "m", enc, templates=("a {}.", "the {}."), commit_prompts=20).embed(
                [f"text {i}" for i in range(n)], augment=True
            )
            c.close()
            rows.append([trial, committed, committed % 10 == 0, stats.misses, n - committed - stats.misses, check])
    print(
        table(
            ["trial", "texts committed at kill", "whole chunks only", "encoded on retry", "vectors lost", "integrity"],
            rows,
        )
    )


# -- soak -------------------------------------------------------------------------------------------------------------
def soak(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(shapes_clip_env(Path(tmp) / "data"), Path(tmp) / "serve.log")
        procs = {
            p.pid: p
            for p in [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
        }

        def name(p: psutil.Process) -> str:
            cmd = p.cmdline()
            return cmd[cmd.index("--service-name") + 1] if "--service-name" in cmd else "arbiter"

        rss: dict[str, list[float]] = {name(p): [] for p in procs.values()}
        stop = threading.Event()
        statuses: dict[str, int] = {}
        lock = threading.Lock()
        image = jpeg()

        def client(k: int) -> None:
            rnd = random.Random(k)
            with httpx.Client(base_url=server.url, timeout=120) as c:
                dep = c.post(
                    "/deploy_classifier",
                    json={
                        "classifier_configs": [
                            {"name": "circle", "examples_to_include": ["a circle"]},
                            {"name": "square", "examples_to_include": ["a square"]},
                        ]
                    },
                ).json()["deployed_id"]
                i = 0
                while not stop.is_set():
                    i += 1
                    op = rnd.random()
                    try:
                        if op < args.deploy_share:
                            r = c.post(
                                "/deploy_classifier",
                                json={
                                    "classifier_configs": [
                                        {"name": f"n{k}-{i}-{j}", "examples_to_include": [f"soak {k} {i} {j}"]}
                                        for j in range(3)
                                    ]
                                },
                            )
                        elif op < args.deploy_share + 0.5:
                            r = c.post(
                                "/classify",
                                params={"deployed_id": dep},
                                files=[("data", ("a.jpg", image, "image/jpeg"))],
                            )
                        elif op < args.deploy_share + 0.7:
                            r = c.post("/embed_text", json={"texts": [f"soak text {k} {i}"]})
                        else:
                            r = c.post("/embed_image", files=[("data", ("a.jpg", image, "image/jpeg"))])
                        key = str(r.status_code)
                    except httpx.HTTPError as exc:
                        key = type(exc).__name__
                    with lock:
                        statuses[key] = statuses.get(key, 0) + 1

        end = time.monotonic() + args.minutes * 60
        with cf.ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(client, k) for k in range(args.clients)]
            while time.monotonic() < end:
                for p in procs.values():
                    try:
                        rss[name(p)].append(p.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
                time.sleep(10)
            stop.set()
            for f in futures:
                f.result()
        stop_server(server)
    rows = []
    for svc, series in rss.items():
        first = series[min(3, len(series) - 1)]  # after a 30 s warm-up
        rows.append(
            [
                svc,
                f"{first:.0f}",
                f"{series[-1]:.0f}",
                f"{max(series):.0f}",
                f"{100 * (series[-1] - first) / first:+.1f}%",
            ]
        )
    print(f"{args.minutes:g} min, {args.clients} clients; statuses: {dict(sorted(statuses.items()))}")
    print(table(["process", "RSS MiB at 30 s", "at end", "max", "growth"], rows))


def redis_outage(args: argparse.Namespace) -> None:
    from testing.redis import running_redis

    with tempfile.TemporaryDirectory() as tmp, running_redis(Path(tmp) / "redis") as redis_srv:
        env = {"ZSS_REDIS_URL": redis_srv.url, "ZSS_DETECTOR_MODEL": "none"}
        replicas = [
            start_server({**shapes_clip_env(Path(tmp) / f"data{i}"), **env}, Path(tmp) / f"serve{i}.log")
            for i in range(2)
        ]
        body = {"classifier_configs": [{"name": n, "examples_to_include": [f"a {n}"]} for n in ("circle", "square")]}
        dep = httpx.post(replicas[0].url + "/deploy_classifier", json=body, timeout=120).json()["deployed_id"]
        image = jpeg()
        seen: list[tuple[float, float, int, int]] = []  # (start, latency, status, replica)
        lock = threading.Lock()
        stop = threading.Event()

        def client(k: int) -> None:
            clients = [httpx.Client(base_url=r.url, timeout=60) for r in replicas]
            i = k
            while not stop.is_set():
                i += 1
                t0 = time.monotonic()
                try:
                    status = (
                        clients[i % 2]
                        .post(
                            "/classify",
                            params={"deployed_id": dep},
                            files=[("data", ("a.jpg", image, "image/jpeg"))],
                        )
                        .status_code
                    )
                except httpx.HTTPError:
                    status = -1
                with lock:
                    seen.append((t0, time.monotonic() - t0, status, i % 2))
            for c in clients:
                c.close()

        with cf.ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(client, k) for k in range(args.clients)]
            time.sleep(args.up)
            redis_srv.kill()
            killed = time.monotonic()
            deploy_down = httpx.post(replicas[1].url + "/deploy_classifier", json=body, timeout=60).status_code
            time.sleep(max(0.0, args.down - (time.monotonic() - killed)))
            # Requests that start while start() waits for the new Redis to answer may find it up: their own phase
            # (in the figure of 2026-12-01 they were the four 200s counted as "Redis killed").
            restarting = time.monotonic()
            redis_srv.start()
            restarted = time.monotonic()
            time.sleep(args.up)
            stop.set()
            for f in futures:
                f.result()
        # After the outage: the deployment made before it, and one made after it, on both replicas.
        body2 = {"classifier_configs": [{"name": "after", "examples_to_include": ["a triangle"]}]}
        dep2 = httpx.post(replicas[1].url + "/deploy_classifier", json=body2, timeout=120).json()["deployed_id"]
        lost = sum(
            httpx.get(r.url + "/model_config", params={"deployed_id": d}, timeout=60).status_code != 200
            for r in replicas
            for d in (dep, dep2)
        )
        for r in replicas:
            stop_server(r)
    start = min(t for t, *_ in seen)
    phases = [
        ("Redis up", start, killed),
        ("Redis killed", killed, restarting),
        ("Redis starting", restarting, restarted),
        ("restarted", restarted, float("inf")),
    ]
    rows = []
    for name, lo, hi in phases:
        part = [(lat, st) for t, lat, st, _ in seen if lo <= t < hi]
        counts: dict[int, int] = {}
        for _, st in part:
            counts[st] = counts.get(st, 0) + 1
        lats = sorted(lat for lat, _ in part)
        p99 = lats[min(len(lats) - 1, int(0.99 * len(lats)))] if lats else float("nan")
        rows.append([name, len(part), str(dict(sorted(counts.items()))), f"{1000 * p99:.0f}", f"{1000 * lats[-1]:.0f}"])
    back = []
    for i in range(2):
        firsts = [t + lat for t, lat, st, rep in seen if rep == i and st == 200 and t >= restarted]
        back.append(f"replica {i}: {min(firsts) - restarted:.2f} s" if firsts else f"replica {i}: never")
    print(f"{args.clients} clients /classify on 2 replicas; Redis SIGKILLed for {args.down:g} s")
    print(table(["phase", "requests", "statuses", "p99 ms", "max ms"], rows))
    print(f"first 200 after the restart: {', '.join(back)}; a deploy while Redis was down: {deploy_down}")
    print(f"deployments lost (before and after the outage, looked up on both replicas): {lost}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("coldstart")
    p.add_argument("--detector", default="random")
    p.add_argument("--seconds", type=float, default=60)
    p = sub.add_parser("kill-deploy")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--texts", type=int, default=120)
    p = sub.add_parser("kill-cache")
    p.add_argument("--trials", type=int, default=10)
    p = sub.add_parser("soak")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--deploy-share", type=float, default=0.1, help="share of requests that deploy new texts")
    p = sub.add_parser("redis-outage")
    p.add_argument("--up", type=float, default=10)
    p.add_argument("--down", type=float, default=10)
    p.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    commands = {"coldstart": coldstart, "kill-deploy": kill_deploy, "kill-cache": kill_cache, "soak": soak}
    {**commands, "redis-outage": redis_outage}[args.cmd](args)


if __name__ == "__main__":
    main()
