"""The foreign protocols' image throughput beside /embed_image, side by side in alternating rounds, one run.

    .venv/bin/python -m bench.bench_protocols [--concurrency 8] [--seconds 8] [--rounds 3]
    .venv/bin/python -m bench.bench_protocols --api-cpu [--requests 200]

ViT-B-32 with seeded random weights (the released architecture and cost), a 640x480 JPEG, detector off; one
`bentoml serve` started here. Each round loads, one after the other, the same server with the same image through:
``/embed_image`` (multipart, the reference), ``/v1/embeddings`` with ``"modality": "image"`` and a data URI in
``base64`` encoding (what the official ``openai`` client asks for) and in ``float``, and
``/v2/models/clip_image/infer`` with Triton's binary-data extension (the body ``tritonclient`` builds). The rounds
alternate so that other users of a shared machine slow every side alike; each side's rate is the steady state of
``--concurrency`` clients sending back to back (``bench.common.steady_load``), one image per request. The ratio per
round is the side's images/s over /embed_image's in that round; the median over rounds is quoted.

``--api-cpu`` measures instead what differs between the routes, free of the machine's load: the CPU time of one
request in the API worker (the routes in-process over fake encoders, the real engine decoding the same JPEG), per
route, as process CPU seconds per request over ``--requests`` requests, alternating routes.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from bench.common import (
    VIT_B32_RANDOM,
    LoadResult,
    Post,
    image_post,
    jpeg,
    loadavg,
    machine,
    merge,
    served,
    steady_load,
    table,
)


def openai_post(blob: bytes, encoding: str) -> Post:
    body = {
        "model": "clip",
        "modality": "image",
        "encoding_format": encoding,
        "input": ["data:image/jpeg;base64," + base64.b64encode(blob).decode()],
    }
    return Post("/v1/embeddings", json.dumps(body).encode(), "application/json")


def triton_post(blob: bytes) -> Post:
    import tritonclient.http as triton

    tensor = triton.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([blob], dtype=np.object_))
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor])
    return Post(
        "/v2/models/clip_image/infer",
        body,
        "application/octet-stream",
        (("Inference-Header-Content-Length", str(json_size)),),
    )


def api_cpu(blob: bytes, sides: dict[str, Post], requests: int) -> None:
    """CPU seconds per request of each route in-process (fake encoders, real engine and decoding), alternating."""
    import time

    from fastapi.testclient import TestClient

    from service import build_app
    from testing.fakes import fake_engine

    with tempfile.TemporaryDirectory() as tmp:
        engine, _ = fake_engine(Path(tmp) / "data")
        spent = {name: 0.0 for name in sides}
        with TestClient(build_app(engine)) as client:
            for i in range(requests + 10):
                for name, post in sides.items():
                    headers = {"Content-Type": post.content_type, **dict(post.headers)}
                    t0 = time.process_time()
                    r = client.post(post.path, content=post.body, headers=headers)
                    if i >= 10:  # after a warm-up
                        spent[name] += time.process_time() - t0
                    if r.status_code != 200:
                        raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
        engine.close()
    ref = spent[next(iter(sides))]
    rows = [[name, f"{1000 * t / requests:.2f}", f"{t / ref:.2f}"] for name, t in spent.items()]
    print(table(["route (in-process, fake encoders)", "CPU ms per request", "ratio"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per side and round")
    ap.add_argument("--ramp", type=float, default=2.0, help="seconds of each side's load before measuring")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--api-cpu", action="store_true", help="CPU per request in the API worker, in-process")
    ap.add_argument("--requests", type=int, default=200, help="requests per route with --api-cpu")
    args = ap.parse_args()

    print(f"machine: {machine()}", flush=True)
    blob = jpeg()
    sides = {
        "/embed_image (multipart)": image_post("/embed_image", blob),
        "/v1/embeddings (base64)": openai_post(blob, "base64"),
        "/v1/embeddings (float)": openai_post(blob, "float"),
        "/v2 clip_image infer (binary)": triton_post(blob),
    }
    if args.api_cpu:
        api_cpu(blob, sides, args.requests)
        return
    reference = next(iter(sides))
    results: dict[str, list[LoadResult]] = {name: [] for name in sides}
    ratios: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp, served(VIT_B32_RANDOM, Path(tmp)) as srv:
        for post in sides.values():  # every route answers, and the encoder is warm
            steady_load(srv.url, post, args.concurrency, 3.0, ramp_s=0.0)
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))  # no side always goes first
            for name in order:
                res = steady_load(srv.url, sides[name], args.concurrency, args.seconds, args.ramp)
                results[name].append(res)
                print(f"round {r + 1} {name}: {res.per_s:.2f} img/s, errors {res.errors}, load {res.load}", flush=True)
            for name in sides:
                ratios[name].append(results[name][-1].per_s / results[reference][-1].per_s)
        load_after = loadavg()

    print()
    rows = []
    for name in sides:
        total = merge(results[name])
        per_round = " / ".join(f"{x.per_s:.2f}" for x in results[name])
        rows.append(
            [
                name,
                per_round,
                f"{total.per_s:.2f}",
                f"**{statistics.median(ratios[name]):.2f}**",
                f"{total.p50_ms:.0f}",
                f"{total.p99_ms:.0f}",
                total.errors,
            ]
        )
    headers = ["route", "img/s per round", "img/s all", "ratio (median)", "p50 ms", "p99 ms", "errors"]
    print(table(headers, rows))
    print(f"\n{args.concurrency} clients, {args.rounds} rounds x {args.seconds:g} s per side; load after: {load_after}")


if __name__ == "__main__":
    main()
