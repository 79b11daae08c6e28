"""Slow-loris against a served ZeroShot on 127.0.0.1 (issue 32, item 5): a few thousand connections that send part of
a request head (or of a body) and then nothing. Measures /readyz latency meanwhile, the server's open files (all its
processes), and how long the server takes to close the connections; stops by itself.

    .venv/bin/python -m bench.slowloris [--connections 3000] [--body-share 0.25] [--hold 45] [--header-timeout 10]
                                        [--root CHECKOUT]

Serves the tiny random CLIP (what tests use: the model does not matter here) with ``ZSS_HEADER_TIMEOUT_S`` and
``ZSS_BODY_TIMEOUT_S`` = ``--header-timeout``; the client keeps every connection open (sending nothing more) for up
to ``--hold`` seconds and counts those the server has closed. Only ever connects to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testing.models import clip_env, write_tiny_clip  # noqa: E402
from testing.server import Server, start_server, stop_server  # noqa: E402

HEAD = b"GET /deployments HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
BODY = b"POST /embed_text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n{"


def server_fds(server: Server) -> int:
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.num_fds()
        except psutil.Error:
            pass
    return total


def readyz_ms(url: str, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.monotonic()
        httpx.get(url + "/readyz", timeout=30).raise_for_status()
        times.append(1000 * (time.monotonic() - t))
    return statistics.median(times)


def attack(server: Server, connections: int, body_share: float, hold_s: float) -> dict[str, float]:
    port = urlsplit(server.url).port
    assert port is not None
    base_fds, base_ms = server_fds(server), readyz_ms(server.url)
    sel = selectors.DefaultSelector()
    opened = 0
    start = time.monotonic()
    for i in range(connections):
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(BODY if i < connections * body_share else HEAD)
        except OSError:
            s.close()
            continue
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        opened += 1
    open_s = time.monotonic() - start
    during_ms, peak_fds = readyz_ms(server.url), server_fds(server)
    closed_at: list[float] = []
    answered_408 = 0
    while sel.get_map() and time.monotonic() - start < hold_s:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                data = s.recv(4096)  # type: ignore[union-attr]
            except OSError:
                data = b""
            answered_408 += data.startswith(b"HTTP/1.1 408")
            sel.unregister(s)
            s.close()  # type: ignore[union-attr]
            closed_at.append(time.monotonic() - start)
        peak_fds = max(peak_fds, server_fds(server))
    still_open = len(sel.get_map())
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    time.sleep(1.0)
    return {
        "opened": opened,
        "open_s": open_s,
        "base_fds": base_fds,
        "peak_fds": peak_fds,
        "after_fds": server_fds(server),
        "readyz_before_ms": base_ms,
        "readyz_during_ms": during_ms,
        "answered_408": answered_408,
        "closed": len(closed_at),
        "last_closed_s": max(closed_at) if closed_at else float("nan"),
        "still_open_at_end": still_open,
        "readyz_after_ms": readyz_ms(server.url),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--body-share", type=float, default=0.25)
    ap.add_argument("--hold", type=float, default=45.0)
    ap.add_argument("--header-timeout", type=float, default=10.0)
    ap.add_argument("--root", type=Path, default=ROOT, help="serve another checkout (the before side of an A/B)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, args.connections + 1024)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        env = {
            **clip_env(write_tiny_clip(base / "clip"), base / "data"),
            "ZSS_HEADER_TIMEOUT_S": str(args.header_timeout),
            "ZSS_BODY_TIMEOUT_S": str(args.header_timeout),
        }
        server = start_server(env, base / "serve.log", timeout=900, root=args.root)
        try:
            r = attack(server, args.connections, args.body_share, args.hold)
        finally:
            stop_server(server)
    print(r)
    print(f"\nload average {psutil.getloadavg()[0]:.1f}\n")
    print("| connections (head / body) | server fds: before, peak, after | /readyz: before, during, after", end="")
    print(" | closed by the server (408 answered) | last closed at | open at the end |")
    print("| --- | --- | --- | --- | --- | --- |")
    n_body = int(args.connections * args.body_share)
    fds = f"{r['base_fds']:.0f}, {r['peak_fds']:.0f}, {r['after_fds']:.0f}"
    readyz = f"{r['readyz_before_ms']:.0f}, {r['readyz_during_ms']:.0f}, {r['readyz_after_ms']:.0f} ms"
    print(
        f"| {r['opened']:.0f} ({args.connections - n_body} / {n_body}) | {fds} | {readyz} | {r['closed']:.0f} "
        f"({r['answered_408']:.0f}) | {r['last_closed_s']:.1f} s | {r['still_open_at_end']:.0f} |"
    )


if __name__ == "__main__":
    main()
