"""Import models into BentoML's model store, so `bentoml build` packs them into a bento and it starts without a hub.

    python -m tools.models clip --model models/shapes-clip/shapes-clip.json \
                                --pretrained models/shapes-clip/shapes-clip.fp16.pt
    python -m tools.models clip --model ViT-B-32 --pretrained laion2b_s34b_b79k     # downloads once (needs the hub)
    python -m tools.models clip --model path/to/siglip-dir                          # transformers SiglipModel dir
    python -m tools.models detector --model path/to/owlv2-dir                        # a save_pretrained directory
    python -m tools.models detector --model google/owlv2-base-patch16-ensemble       # downloads once (needs the hub)
    python -m tools.models list

``--model`` / ``--pretrained`` take what ZSS_CLIP_MODEL / ZSS_CLIP_PRETRAINED / ZSS_DETECTOR_MODEL take, and default
to those settings. The store is ``$BENTOML_HOME/models`` (``~/bentoml/models``). Each import prints the setting that
selects the stored model, e.g. ``ZSS_CLIP_MODEL=bentoml:shapes-clip:3f0c...``; a model already stored (same files) is
found again, not copied twice. The stored model keeps the model id (the embedding cache's key) of its source.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from runners import clip, owl
from runners.store import CLIP_KIND, DETECTOR_KIND, KIND_KEY, store_value
from settings import get_settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m tools.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_clip = sub.add_parser(
        "clip",
        help="import an open_clip model (config JSON + checkpoint, or name + tag) or a transformers SigLIP",
    )
    p_clip.add_argument("--model", default=settings.clip_model, help="as ZSS_CLIP_MODEL (default: its value)")
    p_clip.add_argument("--pretrained", default=settings.clip_pretrained, help="as ZSS_CLIP_PRETRAINED")
    p_clip.add_argument("--name", help="model-store name (default: from the config file or model name)")
    p_det = sub.add_parser("detector", help="import an OWLv2 / OWL-ViT directory or Hugging Face id")
    p_det.add_argument("--model", default=settings.detector_model, help="as ZSS_DETECTOR_MODEL (default: its value)")
    p_det.add_argument("--name", help="model-store name (default: from the directory or repository name)")
    sub.add_parser("list", help="the models in the store that these commands imported")
    args = parser.parse_args(argv)

    if args.command == "list":
        return _list()
    if args.command == "clip":
        tag, created = clip.import_to_store(args.model, args.pretrained, args.name)
        setting = "ZSS_CLIP_MODEL"
    else:
        tag, created = owl.import_to_store(args.model, args.name)
        setting = "ZSS_DETECTOR_MODEL"
    print(f"{'imported' if created else 'already in the store:'} {tag}", file=sys.stderr)
    print(f"{setting}={store_value(tag)}")
    return 0


def _list() -> int:
    import bentoml

    for model in bentoml.models.list():
        meta = model.info.metadata
        if meta.get(KIND_KEY) in {CLIP_KIND, DETECTOR_KIND}:
            setting = "ZSS_CLIP_MODEL" if meta[KIND_KEY] == CLIP_KIND else "ZSS_DETECTOR_MODEL"
            print(json.dumps({"setting": f"{setting}={store_value(str(model.tag))}", "model_id": meta["model_id"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
