"""P3: redeploying cached examples does no text-tower work; cold template encoding, context trimming vs padding.

.venv/bin/python bench/bench_p3_text.py [--examples 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import VIT_B32_RANDOM, machine, served
from runners.clip import load_clip_encoder
from runners.device import configure_threads
from semantic.templates import CLIP_TEMPLATES, expand
from settings import get_settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=20)
    args = ap.parse_args()
    examples = [f"a kind of object number {i}" for i in range(args.examples)]
    prompts = expand(examples, CLIP_TEMPLATES)

    settings = get_settings(VIT_B32_RANDOM)
    configure_threads(settings.torch_threads)
    enc = load_clip_encoder(settings, towers="text")
    enc.encode_texts(prompts[:64])  # warm-up
    rates = {}
    for trim in (True, False):
        t = time.perf_counter()
        enc.encode_texts(prompts, trim_context=trim)
        rates[trim] = len(prompts) / (time.perf_counter() - t)
    del enc

    configs = [{"name": f"c{i}", "examples_to_include": [e]} for i, e in enumerate(examples)]
    with tempfile.TemporaryDirectory() as tmp, served(VIT_B32_RANDOM, Path(tmp)) as srv:
        body = {"classifier_configs": configs, "augment_examples": True}
        first = httpx.post(srv.url + "/deploy_classifier", json=body, timeout=3600).json()
        before = srv.metric("zss_text_prompts_encoded_total")
        t = time.perf_counter()
        httpx.post(srv.url + "/deploy_classifier", json={**body, "deployed_id": first["deployed_id"]}, timeout=600)
        redeploy_ms = 1000 * (time.perf_counter() - t)
        after = srv.metric("zss_text_prompts_encoded_total")
    print(f"machine: {machine()}")
    print(
        f"| cold prompts ({args.examples} examples x {len(CLIP_TEMPLATES)} templates) | trimmed prompts/s "
        "| padded-to-77 prompts/s | speed-up |"
    )
    print("|---:|---:|---:|---:|")
    print(f"| {len(prompts)} | {rates[True]:.0f} | {rates[False]:.0f} | {rates[True] / rates[False]:.2f}x |")
    print()
    print("| redeploy of cached classifier | text-tower prompts encoded | latency ms |")
    print("|---|---:|---:|")
    print(
        f"| {args.examples} classes, augment_examples=true | {after - before:.0f} (first deploy: {before:.0f}) "
        f"| {redeploy_ms:.0f} |"
    )


if __name__ == "__main__":
    main()
