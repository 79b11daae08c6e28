"""Benchmark: detection scoring + NMS for one image on CPU (semantic.detect), goal <= 5 ms.

Workload: 300 boxes (the default detector_top_k), 20 classes with 10 positive and 5 negative examples each (E = 300),
D = 512 (OWLv2-B/16). Boxes come in clusters around 30 synthetic objects, as OWL's dense boxes do, and box/example
embeddings are noisy copies of per-class prototypes, so a realistic share of boxes passes the thresholds and NMS has
overlapping candidates to suppress. Timed: box_example_fit + class_scores + iou_graph + detect, end to end.

    .venv/bin/python bench/bench_detect_scoring.py [--runs 300] [--threads 1] [--class-agnostic] [--threshold 0.1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semantic.classify import example_slots  # noqa: E402
from semantic.detect import box_class_scores, box_example_fit, class_scores, detect, iou_graph  # noqa: E402

N_BOXES, N_CLASSES, N_POS, N_NEG, DIM, N_OBJECTS = 300, 20, 10, 5, 512, 30


def make_workload(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(N_CLASSES, DIM, generator=g), dim=-1)
    # Examples: positives near their class prototype; negatives near a prototype of another class ("not a ...").
    pos_cls = torch.arange(N_CLASSES).repeat_interleave(N_POS)
    neg_cls = torch.arange(N_CLASSES).repeat_interleave(N_NEG)
    neg_src = (neg_cls + 1 + torch.randint(0, N_CLASSES - 1, (len(neg_cls),), generator=g)) % N_CLASSES
    pos_ex = protos[pos_cls] + 0.6 * torch.randn(len(pos_cls), DIM, generator=g) / DIM**0.5
    neg_ex = protos[neg_src] + 0.6 * torch.randn(len(neg_cls), DIM, generator=g) / DIM**0.5
    examples = F.normalize(torch.cat([pos_ex, neg_ex]), dim=-1)
    example_class = torch.cat([pos_cls, neg_cls])
    example_pos = torch.cat([torch.ones(len(pos_cls), dtype=torch.bool), torch.zeros(len(neg_cls), dtype=torch.bool)])
    # Boxes: ~10 jittered boxes per object in a 1000x1000 image; embedding = the object's prototype + heavy noise.
    obj_cls = torch.randint(0, N_CLASSES, (N_OBJECTS,), generator=g)
    obj_xy = torch.rand(N_OBJECTS, 2, generator=g) * 800
    obj_wh = 40 + torch.rand(N_OBJECTS, 2, generator=g) * 200
    which = torch.randint(0, N_OBJECTS, (N_BOXES,), generator=g)
    jitter = 1 + 0.25 * torch.randn(N_BOXES, 4, generator=g)
    xy = obj_xy[which] + 20 * torch.randn(N_BOXES, 2, generator=g)
    wh = obj_wh[which] * jitter[:, 2:].abs()
    boxes = torch.cat([xy, xy + wh], 1)
    noise = torch.rand(N_BOXES, 1, generator=g) * 2.0  # some boxes fit their object well, some barely
    box_embeds = F.normalize(protos[obj_cls[which]] + noise * torch.randn(N_BOXES, DIM, generator=g) / DIM**0.5, dim=-1)
    # OWLv2-like per-box calibration: logits = (cos + shift) * scale with shift < 0 and scale ~ 10-20.
    logit_shift = -0.6 + 0.1 * torch.randn(N_BOXES, generator=g)
    logit_scale = 10 + 10 * torch.rand(N_BOXES, generator=g)
    return {
        "boxes": boxes,
        "box_embeds": box_embeds,
        "logit_shift": logit_shift,
        "logit_scale": logit_scale,
        "examples": examples,
        "example_class": example_class,
        "example_pos": example_pos,
        "example_slot": example_slots(example_class, example_pos, N_CLASSES),  # once, as a compiled detector holds
    }


def run_once(
    w: dict[str, torch.Tensor],
    thresholds: torch.Tensor,
    nms: float,
    agnostic: bool,
    fused: bool = True,
    per_image_slots: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if fused:  # the service's path: max over raw cosines, then shift/scale/sigmoid on [N, 2C]
        pos, neg = box_class_scores(
            w["box_embeds"],
            w["examples"],
            w["logit_shift"],
            w["logit_scale"],
            w["example_class"],
            w["example_pos"],
            N_CLASSES,
            slot=None if per_image_slots else w["example_slot"],
        )
    else:  # the spelled-out path: [N, E] probabilities, then the per-class max
        fit = box_example_fit(w["box_embeds"], w["examples"], w["logit_shift"], w["logit_scale"])
        pos, neg = class_scores(fit, w["example_class"], w["example_pos"], N_CLASSES)
    graph = iou_graph(w["boxes"], nms)
    return detect(w["boxes"], pos, neg, thresholds, nms, agnostic, graph=graph)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (an API worker's share)")
    ap.add_argument("--threshold", type=float, default=0.1, help="per-class detection threshold")
    ap.add_argument("--nms", type=float, default=0.3)
    ap.add_argument("--class-agnostic", action="store_true")
    ap.add_argument("--unfused", action="store_true", help="box_example_fit + class_scores instead of box_class_scores")
    ap.add_argument(
        "--per-image-slots", action="store_true", help="recompute the example slots per image (the old service path)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = make_workload()
    thresholds = torch.full((N_CLASSES,), args.threshold)
    with torch.inference_mode():
        fused = not args.unfused
        for _ in range(20):  # warm-up: allocator, first-call dispatch
            out = run_once(w, thresholds, args.nms, args.class_agnostic, fused, args.per_image_slots)
        times, cpu = [], []
        for _ in range(args.runs):
            t, c = time.perf_counter(), time.process_time()
            out = run_once(w, thresholds, args.nms, args.class_agnostic, fused, args.per_image_slots)
            times.append((time.perf_counter() - t) * 1000)
            # CPU time of this process: on a shared machine, wall time also counts waiting for a core.
            cpu.append((time.process_time() - c) * 1000)
        fit = box_example_fit(w["box_embeds"], w["examples"], w["logit_shift"], w["logit_scale"])
        pos, neg = class_scores(fit, w["example_class"], w["example_pos"], N_CLASSES)
        candidates = int((pos >= thresholds).sum())
    times.sort()
    p90 = times[int(0.9 * (len(times) - 1))]
    mode = ("class-agnostic" if args.class_agnostic else "per-class") + (", unfused" if args.unfused else "")
    mode += ", slots per image" if args.per_image_slots else ""
    print(
        "| workload | NMS | threads | candidates | detections | median ms | p90 ms | median CPU ms | runs |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    print(
        f"| {N_BOXES} boxes x {N_CLASSES} classes ({N_POS}+/{N_NEG}-), D={DIM}, thr={args.threshold}, "
        f"IoU={args.nms} | {mode} | {args.threads} | {candidates} | {len(out[0])} | "
        f"{statistics.median(times):.2f} | {p90:.2f} | {statistics.median(cpu):.2f} | {args.runs} |"
    )


if __name__ == "__main__":
    main()
