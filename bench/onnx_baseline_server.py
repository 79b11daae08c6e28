"""The baseline of issue 19: a minimal FastAPI server that embeds one image per request with ONNX Runtime, the way
self-hosted photo apps embed today (no batching; uvicorn's thread pool runs requests side by side).

    .venv/bin/python -m bench.onnx_baseline_server --port 8000 [--model ViT-B-32] [--pretrained random]

The same image tower as the service (``ZSS_CLIP_MODEL`` / ``ZSS_CLIP_PRETRAINED`` values, seeded random weights by
default), exported by the service's own exporter (runners/backends.py: uint8 pixels in, normalisation in the graph)
and cached under ``--data-dir``; the same preprocessing (imaging.preprocess, open_clip's resize and crop). POST
/embed_image with a multipart ``data`` file returns ``{"embedding": [...]}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile

from imaging.decode import decode_image
from runners.clip import load_clip_encoder
from runners.device import cpu_quota
from settings import get_settings


def build_app(model: str, pretrained: str, data_dir: Path, threads: int) -> FastAPI:
    env = {"ZSS_CLIP_MODEL": model, "ZSS_CLIP_PRETRAINED": pretrained, "ZSS_DATA_DIR": str(data_dir)}
    settings = get_settings({**env, "ZSS_BACKEND": "onnx"})
    torch.set_num_threads(threads)  # ONNX Runtime's intra-op threads: every core for one image at a time
    encoder = load_clip_encoder(settings, towers="image")  # exports once; then only the ONNX session runs
    run, preprocess = encoder.image_runtime, encoder.preprocess
    app = FastAPI()

    @app.post("/embed_image")
    def embed_image(data: UploadFile = File(...)) -> dict[str, list[float]]:  # sync: uvicorn's thread pool
        try:  # decoded and resized as the service does (JPEG draft decoding, open_clip's resize and crop)
            img = decode_image(data.file.read(), max_pixels=64_000_000, draft_size=preprocess.draft_size)
            pixels = preprocess.to_pixels(img)
        except Exception as exc:
            raise HTTPException(400, f"not an image: {exc}") from exc
        return {"embedding": run(pixels[np.newaxis])[0].tolist()}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default="random")
    ap.add_argument("--data-dir", type=Path, default=Path(".zss-baseline"))
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: the CPU quota)")
    args = ap.parse_args()
    app = build_app(args.model, args.pretrained, args.data_dir, args.threads or cpu_quota())
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
