"""Where the image routes' tail comes from: every request's start and end under a steady load, the slow ones grouped
into the moments they happened, and the garbage collector's pauses in every service process beside them (issue 29).

    .venv/bin/python -m bench.tail [--quantize int8] [--seconds 40] [--clients 16] [--no-freeze] [--env K=V ...]

One ``bentoml serve`` of ViT-B-32 (random weights unless --model/--pretrained say otherwise); ``clients`` threads post
the same 640x480 JPEG to ``/embed_image`` back to back. Requests that end in the first ``--ramp`` seconds are not
counted. Printed: rate, p50/p90/p99/max and p99/p50; the slow requests (over 1.5x p50) grouped into clusters (a slow
request within 0.5 s of the previous one's end joins its cluster), since requests that wait out one pause end
together; and ``zss_gc_pause_seconds`` from /metrics, by generation (runners/heap.py). ``--no-freeze`` serves with
``gc.freeze`` made a no-op in every process (a ``sitecustomize`` on the server's PYTHONPATH), the A/B that found the
cause: full collections walking the start-up heap for 0.3-0.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import Post, add_model_options, image_post, jpeg, machine, model_env, served, table, timed_requests

SLOW = 1.5  # a request slower than this times p50 is slow: the bound on p99
CLUSTER_GAP_S = 0.5


@dataclass(frozen=True)
class Request:
    start: float  # seconds since the load began
    end: float
    status: int

    @property
    def latency(self) -> float:
        return self.end - self.start


def load(url: str, post: Post, clients: int, seconds: float) -> list[Request]:
    """``clients`` keep-alive connections posting back to back for ``seconds``; every request, in order of start."""
    t0 = time.perf_counter()
    done = timed_requests(url, post, clients, seconds)
    return sorted((Request(start - t0, end - t0, status) for start, end, status in done), key=lambda r: r.start)


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def clusters(slow: list[Request], gap_s: float = CLUSTER_GAP_S) -> list[list[Request]]:
    """Slow requests grouped by when they ended: one that ends within ``gap_s`` of the previous one joins its group."""
    out: list[list[Request]] = []
    for r in sorted(slow, key=lambda r: r.end):
        if out and r.end - out[-1][-1].end <= gap_s:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def gc_pauses(metrics: str) -> list[list[object]]:
    """Rows (generation, collections, total s, longest bucket reached) of ``zss_gc_pause_seconds``, all processes."""
    count: dict[str, float] = {}
    total: dict[str, float] = {}
    over: dict[str, list[tuple[float, float]]] = {}
    for line in metrics.splitlines():
        if not line.startswith("zss_gc_pause_seconds"):
            continue
        name, _, value = line.rpartition(" ")
        labels = dict(kv.split("=", 1) for kv in name[name.index("{") + 1 : name.rindex("}")].split(",") if "=" in kv)
        gen = labels.get("generation", "?").strip('"')
        if name.startswith("zss_gc_pause_seconds_count"):
            count[gen] = count.get(gen, 0) + float(value)
        elif name.startswith("zss_gc_pause_seconds_sum"):
            total[gen] = total.get(gen, 0) + float(value)
        elif name.startswith("zss_gc_pause_seconds_bucket"):
            le = labels.get("le", "").strip('"')
            if le != "+Inf":
                over.setdefault(gen, []).append((float(le), float(value)))
    rows: list[list[object]] = []
    for gen in sorted(count):
        below = sorted(over.get(gen, []))
        # The smallest bucket bound that holds every pause: the longest pause is at most this.
        longest = next((le for le, n in below if n >= count[gen]), float("inf"))
        rows.append([gen, int(count[gen]), f"{total.get(gen, 0.0):.2f}", f"<= {longest:g}"])
    return rows


def report(requests: list[Request], seconds: float, ramp_s: float) -> tuple[str, float]:
    """The summary of the counted requests and their slow clusters; and p99/p50."""
    counted = [r for r in requests if r.end > ramp_s and r.status == 200]
    errors = sum(r.status != 200 for r in requests)
    if not counted:
        return f"no request answered 200 after the ramp ({errors} errors)", float("nan")
    lat = sorted(r.latency for r in counted)
    p50, p99 = statistics.median(lat), pct(lat, 0.99)
    lines = [
        f"requests {len(counted)} in {seconds - ramp_s:.0f} s: {len(counted) / (seconds - ramp_s):.1f} img/s, "
        f"errors {errors}",
        f"p50 {1000 * p50:.0f} ms, p90 {1000 * pct(lat, 0.9):.0f} ms, p99 {1000 * p99:.0f} ms, "
        f"max {1000 * lat[-1]:.0f} ms, p99/p50 {p99 / p50:.2f}",
    ]
    slow = [r for r in counted if r.latency > SLOW * p50]
    groups = clusters(slow)
    lines.append(f"slow requests (> {SLOW}x p50): {len(slow)}, in {len(groups)} clusters")
    rows = [
        [f"{g[0].end:.2f}-{g[-1].end:.2f}", len(g), f"{1000 * max(r.latency for r in g):.0f}"]
        for g in sorted(groups, key=len, reverse=True)[:15]
    ]
    if rows:
        lines.append(table(["ended (s)", "slow requests", "slowest (ms)"], rows))
    return "\n".join(lines), p99 / p50


NO_FREEZE = "import gc\ngc.freeze = lambda: None  # bench.tail --no-freeze: the A/B of runners/heap.py\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.set_defaults(quantize="int8")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--ramp", type=float, default=3.0, help="requests ending before this are not counted")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--no-freeze", action="store_true", help="serve with gc.freeze a no-op (the A/B)")
    ap.add_argument("--env", nargs="*", default=[], metavar="K=V", help="more server settings")
    args = ap.parse_args()

    env = model_env(args)
    env.update(dict(kv.split("=", 1) for kv in args.env))
    print(f"machine: {machine()}")
    print(
        f"command: bench.tail --quantize {args.quantize} --seconds {args.seconds:g} --clients {args.clients}"
        + (" --no-freeze" if args.no_freeze else "")
        + "".join(f" --env {kv}" for kv in args.env)
    )
    post = image_post("/embed_image", jpeg())
    with tempfile.TemporaryDirectory() as tmp:
        if args.no_freeze:
            site = Path(tmp, "site")
            site.mkdir()
            (site / "sitecustomize.py").write_text(NO_FREEZE)
            env["PYTHONPATH"] = str(site)
        with served(env, Path(tmp, "serve")) as srv:
            first = httpx.post(
                srv.url + post.path, content=post.body, headers={"Content-Type": post.content_type}, timeout=120
            )
            first.raise_for_status()
            requests = load(srv.url, post, args.clients, args.seconds)
            time.sleep(1.5)  # the services record their noted pauses every second (runners/heap.py)
            metrics = httpx.get(srv.url + "/metrics", timeout=60).text
    summary, _ = report(requests, args.seconds, args.ramp)
    print(summary)
    rows = gc_pauses(metrics)
    print("garbage collections in the service processes (zss_gc_pause_seconds):")
    print(table(["generation", "collections", "total (s)", "longest (s)"], rows) if rows else "none recorded")


if __name__ == "__main__":
    main()
