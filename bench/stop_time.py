"""How long `bentoml serve` takes to go after SIGTERM during a long deploy (issue 32, item 1): every process of its
tree, BentoML's own server process (circus's arbiter) included, and what new connections meet after the signal.

    .venv/bin/python -m bench.stop_time [--runs 3] [--root CHECKOUT] [--hung-worker]

Serves the tiny random CLIP (as the tests do); per run: a 24,000-prompt deploy with ``?wait=false`` in flight plus 4
clients classifying and embedding, then SIGTERM to the server process. Reports, per run, when the workers and when the
server process were gone, and the outcomes of one-request connections opened one after another from the signal until
one is refused. ``--root``: another checkout to serve (a before/after comparison from one machine and one session).
``--hung-worker``: the text encoder's worker is stopped (SIGSTOP) just before the signal, so it cannot end by itself:
the bound then comes from ``ZSS_STOP_TIMEOUT_S``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import jpeg, loadavg, machine  # noqa: E402
from testing.models import clip_env, write_tiny_clip  # noqa: E402
from testing.server import start_server, stop_server  # noqa: E402

BIG = [{"name": f"class {i}", "examples_to_include": [f"thing number {i} {j}" for j in range(5)]} for i in range(60)]


def _outcome(call: object) -> str:
    try:
        r = call()  # type: ignore[operator]
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return str(r.status_code)


def one_run(env: dict[str, str], work: Path, root: Path, hung: bool = False) -> dict[str, object]:
    server = start_server(env, work / "serve.log", root=root)
    arbiter = psutil.Process(server.proc.pid)
    workers = arbiter.children(recursive=True)
    stop = threading.Event()

    def gone(p: psutil.Process) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def load(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                try:
                    if n % 2:
                        files = [("data", ("a.jpg", image, "image/jpeg"))]
                        c.post("/classify", params={"deployed_id": dep}, files=files)
                    else:
                        c.post("/embed_text", json={"texts": [f"t {n} {time.monotonic()}"]})
                except httpx.HTTPError:
                    return

    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            dep = c.post("/deploy_classifier", json={"classifier_configs": BIG[:2]}).json()["deployed_id"]
            image = jpeg(320, 240)
            r = c.post("/deploy_classifier", params={"wait": "false"}, json={"classifier_configs": BIG})
            job = r.json()["job_id"]
        with cf.ThreadPoolExecutor(4) as pool:
            for n in range(4):
                pool.submit(load, n)
            time.sleep(3)
            with httpx.Client(base_url=server.url, timeout=60) as c:
                done = c.get(f"/jobs/{job}").json()
            if hung:
                (encoder,) = [p for p in workers if "clip_text_encoder" in " ".join(p.cmdline())]
                os.kill(encoder.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            os.kill(server.proc.pid, signal.SIGTERM)
            newcomers: list[str] = []
            workers_s = server_s = None
            while time.monotonic() - t0 < 60:
                if not newcomers or newcomers[-1] != "refused":
                    newcomers.append(_outcome(lambda: httpx.post(server.url + "/embed_text", json={"texts": ["x"]})))
                if workers_s is None and all(gone(p) for p in workers):
                    workers_s = time.monotonic() - t0
                if server_s is None and gone(arbiter):
                    server_s = time.monotonic() - t0
                if workers_s is not None and server_s is not None:
                    break
                time.sleep(0.02)
            stop.set()
    finally:
        stop.set()
        stop_server(server)
    return {
        "job_progress": f"{done['done']}/{done['total']}",
        "workers_s": workers_s,
        "server_s": server_s,
        "exit_code": server.proc.returncode,
        "newcomers": {o: newcomers.count(o) for o in sorted(set(newcomers))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--hung-worker", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}; serving {args.root}")
    with tempfile.TemporaryDirectory(prefix="zss-stop-") as tmp:
        clip = write_tiny_clip(Path(tmp) / "clip")
        for i in range(args.runs):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            out = one_run(clip_env(clip, work / "data"), work, args.root, args.hung_worker)
            print(f"run {i + 1}: {out}; load {loadavg()}", flush=True)


if __name__ == "__main__":
    main()
