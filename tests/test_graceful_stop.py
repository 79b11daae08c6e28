"""A graceful stop under load (issues 18 and 32): SIGTERM to `bentoml serve` while clients classify, embed and
deploy (a 24,000-prompt deploy in flight); the whole process tree, BentoML's own server process included, is gone
within the issue's 10 s, and every request that was in flight when the signal came ends cleanly: answered (200, or
the envelope of a 503 for one the stopping server could not finish), never a reset or a hang. A connection made after
the signal is refused at once (the server shuts its listening socket down first, runners/bentoml_internals.py
``stop_promptly``) or answered; it is never accepted and then reset. (A client that sends a new request on a kept-alive
connection just as the server closes it may still see that connection closed: HTTP/1.1's keep-alive race, which
clients retry, RFC 9112 9.3.1.)"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from testing.client import deploy, files
from testing.images import jpeg_bytes
from testing.models import ClipFiles, clip_env
from testing.server import start_server, stop_server
from testing.waits import wait_for

pytestmark = pytest.mark.server

# A deadline that catches a hang (the wait gives up there); the bound the issue sets is asserted apart, and the
# measured figure is BENCHMARKS.md's ("Hardening").
STOP_DEADLINE_S = 60.0
STOP_BOUND_S = 10.0
CLIENTS = 8


def _outcome(call: object) -> tuple[float, str]:
    sent = time.monotonic()
    return sent, _status(call)


def _status(call: object) -> str:
    try:
        r = call()  # type: ignore[operator]
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError as exc:
        return type(exc).__name__
    if r.status_code == 200:
        return "200"
    body = r.json()
    return f"{r.status_code}" if body.get("status_code") == r.status_code else f"{r.status_code}-no-envelope"


def test_sigterm_under_load_stops_within_the_bound_and_every_request_ends_cleanly(
    tiny_clip: ClipFiles, tmp_path: Path
) -> None:
    server = start_server(clip_env(tiny_clip, tmp_path / "data"), tmp_path / "serve.log")
    processes = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    stop = threading.Event()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            dep = deploy(c)["deployed_id"]
        image = jpeg_bytes(1)
        big = [
            {"name": f"class {i}", "examples_to_include": [f"thing number {i} {j}" for j in range(5)]}
            for i in range(60)
        ]

        answered = [0] * CLIENTS  # 200s per client so far: the signal waits for a real load, not for a time

        def client(n: int) -> list[tuple[float, str]]:
            out: list[tuple[float, str]] = []
            with httpx.Client(base_url=server.url, timeout=60) as c:
                while not stop.is_set():
                    if n == 0:  # a long deploy (24,000 prompts) in flight when the signal comes
                        out.append(_outcome(lambda: c.post("/deploy_classifier", json={"classifier_configs": big})))
                    elif n % 2:
                        out.append(
                            _outcome(lambda: c.post("/classify", params={"deployed_id": dep}, files=files(image)))
                        )
                    else:
                        out.append(_outcome(lambda: c.post("/embed_text", json={"texts": [f"t {n} {len(out)}"]})))
                    answered[n] += out[-1][1] == "200"
                    if out[-1][1] == "refused":
                        break
            return out

        def newcomer() -> list[str]:
            """New connections, one request each, from the signal until one is refused."""
            out: list[str] = []
            while not stop.is_set() and (not out or out[-1] != "refused"):
                out.append(
                    _status(lambda: httpx.post(server.url + "/embed_text", json={"texts": ["late"]}, timeout=30))
                )
            return out

        with cf.ThreadPoolExecutor(CLIENTS + 1) as pool:
            futures = [pool.submit(client, n) for n in range(CLIENTS)]
            # Every classify and embed client answered twice, the deploy client's first deploy still in flight.
            wait_for(lambda: all(answered[n] >= 2 for n in range(1, CLIENTS)), "load on every client")
            t0 = time.monotonic()
            os.kill(server.proc.pid, signal.SIGTERM)  # what `docker stop` / Kubernetes send
            late = pool.submit(newcomer)
            wait_for(
                lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes),
                "every process gone after SIGTERM",
                deadline_s=STOP_DEADLINE_S,
            )
            stopped_s = time.monotonic() - t0
            stop.set()
            outcomes = [o for f in futures for o in f.result(timeout=120)]
            newcomers = late.result(timeout=120)
    finally:
        stop.set()
        stop_server(server)
    before = [o for sent, o in outcomes if sent < t0]
    after = [o for sent, o in outcomes if sent >= t0]
    counts = {o: before.count(o) for o in set(before)}, {o: after.count(o) for o in set(after)}
    print(f"stopped in {stopped_s:.1f} s; new connections after the signal: {newcomers}")  # BENCHMARKS.md's figure
    assert counts[0].get("200", 0) > CLIENTS, counts  # the load was real
    assert set(counts[0]) <= {"200", "503"}, counts
    assert set(counts[1]) <= {"200", "503", "refused", "ReadError", "RemoteProtocolError"}, counts
    assert newcomers and set(newcomers) <= {"200", "503", "refused"}, newcomers
    assert server.proc.returncode == 0, server.proc.returncode
    assert stopped_s < STOP_BOUND_S, f"the process tree took {stopped_s:.1f} s to go after SIGTERM"
