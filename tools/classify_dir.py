"""Offline batch classification and evaluation of image folders, in-process (no HTTP).

Uses the service's own encoders (runners/clip.py) and engine (engine/: the same config validation, embedding cache
and scoring), so a classifier scores here exactly as it does behind /classify. The model comes from the ZSS_*
settings (or --model, --pretrained, --data-dir).

    python -m tools.classify_dir classify CLASSIFIER.json FOLDER --out results.csv [--raw]
    python -m tools.classify_dir eval FOLDER --config CLASSIFIER.json --out-dir report/
    python -m tools.classify_dir eval FOLDER --mapping LOC_synset_mapping.txt --template "a photo of a {}." --out-dir r/
    python -m tools.classify_dir eval FOLDER --mapping LOC_synset_mapping.txt --augment --names first --out-dir r/
    python -m tools.classify_dir eval FOLDER --config CLASSIFIER.json --train TRAIN_FOLDER --shots 5 --out-dir r/
    python -m tools.classify_dir eval FOLDER --train TRAIN_FOLDER --shots 5 --out-dir r/      # images only
    python -m tools.classify_dir calibrate CLASSIFIER.json IN_FOLDER --frr 0.05 [--outside FOLDER] [--write OUT.json]
    python -m tools.classify_dir knn TRAIN_FOLDER VAL_FOLDER --k 5 --out-dir report/
    python -m tools.classify_dir embed FOLDER --out embeddings/ [--faiss photos.faiss]
    python -m tools.classify_dir classify CLASSIFIER.json FOLDER --out results.csv --ray[=ADDRESS]

``eval --shots K`` adds the first K images (sorted by path) of each class's sub-folder of TRAIN_FOLDER to that class
as image examples (classes without text examples when there is no --config / --mapping). ``calibrate`` picks the
open-set threshold (on the predicted class's raw score) that rejects the share ``--frr`` of the in-distribution
images below IN_FOLDER, prints the rates it gives (and the rejected share of --outside), and with --write saves the
config with that ``open_set``.

CLASSIFIER.json is the body of POST /deploy_classifier. ``classify`` is resumable (paths already in the CSV are
skipped) and writes unreadable files to ``<out>.errors.csv`` instead of stopping; a row cut short by a kill is
dropped and redone. Decoding and preprocessing run in a thread pool one batch ahead of the model, so they overlap the
forward pass. ``embed`` writes a resumable Parquet dataset (tools/embed_parquet.py). FOLDER may also be a list file or
an fsspec URL (tools/image_files.py). With ``--ray`` every command runs as a Ray Data job (tools/ray_jobs.py) with the
same results.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache.stores import open_stores
from engine.configs import ClassifierConfig, DeployClassifierRequest, ImageData, OpenSet
from engine.encoders import LocalClip, LocalDetector
from engine.kinds import Classification, ClassifierKind
from engine.pipelines import Engine
from errors import ZssError
from runners.clip import ClipEncoder, load_clip_encoder
from runners.device import configure_threads
from semantic.classify import CompiledClassifier, probabilities, raw_scores, rejected, rejected_by_probability
from settings import Settings, get_settings
from tools.image_files import Loaded, list_images, list_inputs, load_pixels, read_bytes


def embed_batches(
    paths: Sequence[str], encoder: ClipEncoder, batch_size: int, workers: int, max_pixels: int, progress: bool = True
) -> Iterator[tuple[list[Loaded], np.ndarray]]:
    """(loaded items, embeddings of the readable ones) per batch; batch k+1 decodes while batch k is encoded."""
    from tqdm import tqdm

    batches = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    bar = tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr, smoothing=0.1)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:

        def submit(batch: list[str]) -> list[Future[Loaded]]:
            return [pool.submit(load_pixels, p, encoder.preprocess, max_pixels) for p in batch]

        pending = submit(batches[0]) if batches else []
        for k in range(len(batches)):
            items = [f.result() for f in pending]
            pending = submit(batches[k + 1]) if k + 1 < len(batches) else []
            good = [it.pixels for it in items if it.error is None]
            emb = encoder.encode_pixels(np.stack(good)) if good else np.zeros((0, encoder.dim), np.float32)
            bar.update(len(items))
            yield items, emb
    bar.close()


Scored = list[tuple[Loaded, Classification | None]]


def embedded(paths: Sequence[str], rt: Runtime, args: argparse.Namespace) -> Iterator[tuple[list[Loaded], np.ndarray]]:
    """(items, embeddings of the readable ones) per batch: in this process, or on Ray with ``--ray``."""
    if args.ray is not None:
        from tools import ray_jobs

        yield from ray_jobs.embedded(paths, rt, args)
        return
    max_pixels = rt.settings.max_image_pixels
    yield from embed_batches(paths, rt.encoder, args.batch_size, args.workers, max_pixels, not args.quiet)


def scored(paths: Sequence[str], clf: CompiledClassifier, rt: Runtime, args: argparse.Namespace) -> Iterator[Scored]:
    """Each batch's items with their results (None for an unreadable one), scored by the engine's classifier kind:
    here, or in the Ray actors with ``--ray``."""
    if args.ray is not None:
        from tools import ray_jobs

        yield from ray_jobs.scored(paths, clf, rt, args)
        return
    for items, emb in embedded(paths, rt, args):
        results = iter(ClassifierKind.score(emb, clf)) if len(emb) else iter(())
        yield [(it, next(results) if it.error is None else None) for it in items]


@dataclass
class Runtime:
    """The in-process model (batched straight from the decoding pool) and the engine that compiles and scores."""

    settings: Settings
    encoder: ClipEncoder
    engine: Engine

    def compile(self, body: DeployClassifierRequest) -> CompiledClassifier:
        try:
            return self.engine.compile(body)  # type: ignore[return-value]
        except ZssError as exc:
            raise SystemExit(f"invalid classifier: {exc.message}") from exc

    def close(self) -> None:
        self.engine.close()  # FAISS snapshot + WAL checkpoint, so the next process starts warm


def load_config(path: Path) -> DeployClassifierRequest:
    """A /deploy_classifier body from a JSON file, validated as the API validates it."""
    try:
        return DeployClassifierRequest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise SystemExit(f"{path}: not a valid classifier config:\n{exc}") from exc


def build_engine(args: argparse.Namespace) -> Runtime:
    settings = get_settings()
    overrides: dict[str, Any] = {}
    if args.model:
        overrides["clip_model"] = args.model
    if args.pretrained:
        overrides["clip_pretrained"] = args.pretrained
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir)
    settings = settings.model_copy(update=overrides)
    configure_threads(settings.torch_threads)
    encoder = load_clip_encoder(settings, towers="both")
    local = LocalClip(encoder)
    registry, vectors = open_stores(settings)  # ZSS_REDIS_URL: the servers' shared deployments and vectors
    engine = Engine(
        settings,
        image_encoder=local,
        text_encoder=local,
        detector=LocalDetector(None),
        registry=registry,
        cache=vectors,
    )
    return Runtime(settings, encoder, engine)


# -- classify --------------------------------------------------------------------------------------------------------
def _drop_partial_last_line(path: Path) -> None:
    """A run killed while writing leaves a last line without its newline: cut it off, so that image is redone."""
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def _done_paths(path: Path, header: list[str]) -> set[str]:
    """Paths already written to a CSV with this ``header`` (rows of another length are ignored)."""
    if not path.exists():
        return set()
    _drop_partial_last_line(path)
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        first = next(reader, None)
        if first is None:
            return set()
        if first != header:
            raise SystemExit(f"{path} has other columns than this run ({first[:4]}...); use another --out")
        return {row[0] for row in reader if len(row) == len(header)}


def cmd_classify(args: argparse.Namespace, engine: Runtime) -> dict[str, Any]:
    clf = engine.compile(load_config(Path(args.config)))
    out = Path(args.out)
    errors_path = out.with_name(out.name + ".errors.csv")
    header = ["path", "pred", *clf.class_names]
    if args.raw:
        header += [f"raw:{c}" for c in clf.class_names]
    err_header = ["path", "error"]
    done = _done_paths(out, header) | _done_paths(errors_path, err_header)
    todo = [p for p in list_inputs(args.folder) if p not in done]
    n_ok = n_err = 0
    t0 = time.perf_counter()
    new_out = not out.exists() or out.stat().st_size == 0
    new_err = not errors_path.exists() or errors_path.stat().st_size == 0
    with open(out, "a", newline="") as fo, open(errors_path, "a", newline="") as fe:
        w, we = csv.writer(fo), csv.writer(fe)
        if new_out:
            w.writerow(header)
        if new_err:
            we.writerow(err_header)
        for batch in scored(todo, clf, engine, args):
            for it, r in batch:
                if r is None:
                    we.writerow([it.path, it.error])
                    n_err += 1
                    continue
                row = [it.path, r.label, *(f"{v:.6f}" for v in r.scores)]
                if args.raw:
                    row += [f"{v:.6f}" for v in r.raw_scores]
                w.writerow(row)
                n_ok += 1
            # Whole batches reach the disk as they finish, so a killed job loses at most the batch in flight.
            fo.flush()
            fe.flush()
    elapsed = time.perf_counter() - t0
    summary = {
        "classified": n_ok,
        "errors": n_err,
        "skipped": len(done),
        "seconds": elapsed,
        "images_per_s": (n_ok + n_err) / elapsed if elapsed > 0 else 0.0,
    }
    print(json.dumps(summary), file=sys.stderr)
    return summary


# -- eval ------------------------------------------------------------------------------------------------------------
def parse_mapping(path: Path, template: str | None, names_mode: str = "all") -> list[ClassifierConfig]:
    """``label name one, name two`` lines (ImageNet's LOC_synset_mapping.txt) -> one class per label.

    Every comma-separated name is a positive example (``names_mode="all"``), or only the first (``"first"``); with a
    ``template`` each name is put into it (``"a photo of a {}."``), without one the names stay bare (for --augment).
    """
    if names_mode not in {"all", "first"}:
        raise ValueError(f"names_mode must be 'all' or 'first', not {names_mode!r}")
    specs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        label, _, desc = line.strip().partition(" ")
        names = [n.strip() for n in desc.split(",") if n.strip()] or [label]
        if names_mode == "first":
            names = names[:1]
        examples = [template.replace("{}", n) if template else n for n in names]
        specs.append(ClassifierConfig(name=label, examples_to_include=examples))
    return specs


def labelled_images(folder: Path) -> list[tuple[str, str]]:
    return [(str(p), d.name) for d in sorted(folder.iterdir()) if d.is_dir() for p in list_images(d)]


def _embed_labelled(
    items: list[tuple[str, str]], engine: Runtime, args: argparse.Namespace
) -> tuple[np.ndarray, list[str], list[str]]:
    """Embeddings of the readable images in ``items`` order (a Ray job returns them in any order), their labels,
    and the unreadable ones as "path: reason"."""
    dim = engine.encoder.dim
    vectors: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for loaded, emb in embedded([p for p, _ in items], engine, args):
        good = [it for it in loaded if it.error is None]
        vectors.update(zip((it.path for it in good), emb))
        failed.update((it.path, str(it.error)) for it in loaded if it.error is not None)
    kept = [(p, label) for p, label in items if p in vectors]
    embs = np.stack([vectors[p] for p, _ in kept]).astype(np.float32, copy=False) if kept else np.zeros((0, dim))
    errors = [f"{p}: {failed[p]}" for p, _ in items if p in failed]
    return embs.astype(np.float32, copy=False), [label for _, label in kept], errors


def metrics(
    truth: list[str], ranked: list[list[str]], names: Sequence[str], rejected: Sequence[bool] | None = None
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy, per-class precision and recall, and the confusion matrix (rows = truth).

    ``rejected``: the open set's verdict per image (a config with ``open_set``). A rejected image's prediction is the
    open set's label, never its class, so it counts as wrong in top-1 and as a miss in its class's recall, and it is
    in no cell of the confusion matrix (its ``rejected`` count is per class); top-5 is the ranking of the classes,
    which the open set does not change. ``top1_kept`` is the accuracy on the images that were not rejected.
    """
    n = len(truth)
    rej = list(rejected) if rejected is not None else [False] * n
    idx = {c: i for i, c in enumerate(names)}
    conf = np.zeros((len(names), len(names)), dtype=np.int64)
    rejected_of = np.zeros(len(names), dtype=np.int64)
    for t, r, x in zip(truth, ranked, rej):
        if t in idx:
            if x:
                rejected_of[idx[t]] += 1
            else:
                conf[idx[t], idx[r[0]]] += 1
    per_class = {}
    for c, i in idx.items():
        tp, predicted, actual = conf[i, i], conf[:, i].sum(), conf[i, :].sum() + rejected_of[i]
        per_class[c] = {
            "precision": float(tp / predicted) if predicted else None,
            "recall": float(tp / actual) if actual else None,
            "support": int(actual),
        }
        if rejected is not None:
            per_class[c]["rejected"] = int(rejected_of[i])
    out: dict[str, Any] = {
        "images": n,
        "top1": sum(r[0] == t and not x for t, r, x in zip(truth, ranked, rej)) / n if n else 0.0,
        "top5": sum(t in r[:5] for t, r in zip(truth, ranked)) / n if n else 0.0,
        "per_class": per_class,
        "classes": list(names),
        "confusion": conf.tolist(),
    }
    if rejected is not None:
        kept = n - sum(rej)
        out["rejected"] = sum(rej)
        out["top1_kept"] = sum(r[0] == t for t, r, x in zip(truth, ranked, rej) if not x) / kept if kept else None
    return out


def write_report(m: dict[str, Any], out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(m, indent=2))
    lines = [
        f"# {title}",
        "",
        f"images: {m['images']}  top-1: {m['top1']:.4f}  top-5: {m['top5']:.4f}",
        *(
            [f"open set: {m['rejected']} rejected (wrong in top-1)  top-1 of the rest: {m['top1_kept'] or 0:.4f}"]
            if "rejected" in m
            else []
        ),
        "",
        "| class | precision | recall | support |",
        "|---|---:|---:|---:|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for c, v in m["per_class"].items():
        lines.append(f"| {c} | {fmt(v['precision'])} | {fmt(v['recall'])} | {v['support']} |")
    (out_dir / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(m["confusion"])
    k = len(m["classes"])
    fig, ax = plt.subplots(figsize=(min(20, 2 + 0.5 * k), min(20, 2 + 0.5 * k)))
    ax.imshow(conf, cmap="Blues")
    if k <= 50:
        ax.set_xticks(range(k), m["classes"], rotation=90)
        ax.set_yticks(range(k), m["classes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=100)
    plt.close(fig)


def exemplar_images(train: Path, shots: int) -> dict[str, list[str]]:
    """The first ``shots`` images (sorted) of every labelled sub-folder of ``train``."""
    if shots < 1:
        raise SystemExit("--shots must be at least 1")
    out: dict[str, list[str]] = {}
    for path, label in labelled_images(train):
        if len(out.setdefault(label, [])) < shots:
            out[label].append(path)
    if not out:
        raise SystemExit(f"no images in labelled sub-folders of {train}")
    return out


def with_exemplars(classes: list[ClassifierConfig], exemplars: dict[str, list[str]]) -> list[ClassifierConfig]:
    """Classes plus their folders' images as image examples; a folder without a class becomes an image-only class."""
    known = {c.name for c in classes}
    out = []
    for c in [*classes, *(ClassifierConfig(name=n, examples_to_include=[]) for n in exemplars if n not in known)]:
        images = [ImageData(image=base64.b64encode(read_bytes(p)).decode()) for p in exemplars.get(c.name, [])]
        out.append(c.model_copy(update={"examples_to_include": [*c.examples_to_include, *images]}))
    return out


def cmd_eval(args: argparse.Namespace, engine: Runtime) -> dict[str, Any]:
    classes: list[ClassifierConfig] = []
    augment = False
    open_set: OpenSet | None = None
    if args.mapping:
        template = None if args.augment else args.template
        if template is not None and "{}" not in template:
            raise SystemExit(f"--template must contain '{{}}' where the class name goes: {template!r}")
        classes, augment = parse_mapping(Path(args.mapping), template, args.names), args.augment
    elif args.config:
        config = load_config(Path(args.config))
        classes, augment, open_set = config.classifier_configs, config.augment_examples, config.open_set
    elif not args.train:
        raise SystemExit("eval needs --config, --mapping or --train with --shots")
    if args.train:
        classes = with_exemplars(classes, exemplar_images(Path(args.train), args.shots))
    items = labelled_images(Path(args.folder))
    unknown = sorted({label for _, label in items} - {c.name for c in classes})
    if unknown:
        raise SystemExit(f"folder labels with no class of that name: {', '.join(unknown[:10])}")
    body = DeployClassifierRequest(classifier_configs=classes, augment_examples=augment, open_set=open_set)
    clf = engine.compile(body)
    emb, truth, errors = _embed_labelled(items, engine, args)
    raw = raw_scores(torch.from_numpy(emb), clf) if len(emb) else torch.zeros(0, clf.n_classes)
    order = torch.argsort(raw, dim=1, descending=True)[:, :5].tolist()
    ranked = [[clf.class_names[j] for j in row] for row in order]
    # The open set as /classify applies it (a config's ``open_set``): rejected images are wrong in top-1.
    out = None
    if clf.open_set is not None:
        out = rejected(raw, clf.open_set[1]).tolist()
    elif clf.open_set_probability is not None and clf.logits is not None:  # SigLIP: no class reaches p
        out = rejected_by_probability(probabilities(raw, clf.logits), clf.open_set_probability[1]).tolist()
    m = metrics(truth, ranked, clf.class_names, out)
    m["unreadable"] = errors
    if args.train:
        m["shots"] = args.shots
    kind = f"{args.shots}-shot" if args.train else "zero-shot"
    write_report(m, Path(args.out_dir), f"{kind} evaluation of {args.folder}")
    return m


# -- calibrate -------------------------------------------------------------------------------------------------------
def best_raw_scores(source: str, clf: CompiledClassifier, engine: Runtime, args: argparse.Namespace) -> np.ndarray:
    """The predicted class's raw score of every readable image of ``source`` (a folder, list file or URL)."""
    best = []
    for _, emb in embedded(list_inputs(source), engine, args):
        if len(emb):
            best.append(raw_scores(torch.from_numpy(emb), clf).max(dim=1).values.numpy())
    return np.concatenate(best) if best else np.zeros(0, np.float32)


def open_set_threshold(best: np.ndarray, frr: float) -> float:
    """The threshold rejecting (about) a share ``frr`` of these in-distribution scores: a score below it is rejected,
    so the threshold is the lowest score kept."""
    if not len(best):
        raise SystemExit("no readable in-distribution images to calibrate on")
    if not 0.0 <= frr < 1.0:
        raise SystemExit("--frr must be in [0, 1)")
    return float(np.quantile(best, frr, method="lower"))


def cmd_calibrate(args: argparse.Namespace, engine: Runtime) -> dict[str, Any]:
    config = load_config(Path(args.config))
    clf = engine.compile(config)
    inside = best_raw_scores(args.folder, clf, engine, args)
    t = open_set_threshold(inside, args.frr)
    out: dict[str, Any] = {
        "threshold": t,
        "score": "raw score of the predicted class",
        "in_distribution_images": len(inside),
        "false_rejection_rate": float(np.mean(inside < t)),
    }
    if args.outside:
        outside = best_raw_scores(args.outside, clf, engine, args)
        out["outside_images"] = len(outside)
        out["outside_rejection_rate"] = float(np.mean(outside < t)) if len(outside) else None
    if args.write:
        body = config.model_copy(update={"open_set": OpenSet(label=args.label, threshold=t)})
        Path(args.write).write_text(body.model_dump_json(exclude_none=True, indent=2))
        out["written"] = args.write
    print(json.dumps(out, indent=2))
    return out


def cmd_knn(args: argparse.Namespace, engine: Runtime) -> dict[str, Any]:
    import faiss

    train_emb, train_lab, _ = _embed_labelled(labelled_images(Path(args.train)), engine, args)
    if not train_lab:
        raise SystemExit(f"no readable images in labelled sub-folders of {args.train}")
    val_emb, val_lab, errors = _embed_labelled(labelled_images(Path(args.val)), engine, args)
    index = faiss.IndexFlatIP(engine.encoder.dim)
    index.add(np.ascontiguousarray(train_emb, dtype=np.float32))
    k = min(args.k, len(train_lab))
    _, nn = index.search(np.ascontiguousarray(val_emb, dtype=np.float32), k)
    names = sorted(set(train_lab) | set(val_lab))
    ranked = []
    for row in nn:
        votes: dict[str, float] = {}
        for rank, j in enumerate(row):
            # One vote each; the nearest neighbour's tiny bonus breaks ties towards it.
            votes[train_lab[j]] = votes.get(train_lab[j], 0.0) + 1.0 + (1e-3 if rank == 0 else 0.0)
        ranked.append(sorted(votes, key=lambda c: -votes[c]))
    m = metrics(val_lab, ranked, names)
    m.update({"k": k, "train_images": len(train_lab), "unreadable": errors})
    write_report(m, Path(args.out_dir), f"{k}-NN evaluation of {args.val}")
    (Path(args.out_dir) / "knn.json").write_text(json.dumps({"k": k, "top1": m["top1"], "images": m["images"]}))
    return m


# -- embed -----------------------------------------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace, engine: Runtime) -> dict[str, Any]:
    """Image embeddings (what /embed_image returns) into a resumable Parquet dataset; optionally a FAISS index."""
    from tools import embed_parquet

    out = Path(args.out)
    errors_path = out.with_name(out.name + ".errors.csv")
    err_header = ["path", "error"]
    model_id = engine.encoder.model_id
    done = embed_parquet.done_paths(out, model_id) | _done_paths(errors_path, err_header)
    todo = [p for p in list_inputs(args.folder) if p not in done]
    writer = embed_parquet.PartWriter(out, model_id, args.part_rows)
    n_ok = n_err = 0
    t0 = time.perf_counter()
    new_err = not errors_path.exists() or errors_path.stat().st_size == 0
    with open(errors_path, "a", newline="") as fe:
        we = csv.writer(fe)
        if new_err:
            we.writerow(err_header)
        for items, emb in embedded(todo, engine, args):
            writer.add([it.path for it in items if it.error is None], emb)
            for it in items:
                if it.error is not None:
                    we.writerow([it.path, it.error])
            n_ok += len(emb)
            n_err += len(items) - len(emb)
            fe.flush()
    writer.close()
    elapsed = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "embedded": n_ok,
        "errors": n_err,
        "skipped": len(done),
        "seconds": elapsed,
        "images_per_s": (n_ok + n_err) / elapsed if elapsed > 0 else 0.0,
    }
    if args.faiss:
        summary["faiss"] = embed_parquet.write_index(out, Path(args.faiss), args.index)
    print(json.dumps(summary), file=sys.stderr)
    return summary


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.classify_dir", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="overrides ZSS_CLIP_MODEL")
    common.add_argument("--pretrained", help="overrides ZSS_CLIP_PRETRAINED")
    common.add_argument("--data-dir", help="overrides ZSS_DATA_DIR (embedding cache)")
    common.add_argument("--batch-size", type=int, default=32)
    common.add_argument("--workers", type=int, default=4, help="decoding threads")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = common.add_argument_group("Ray (tools/ray_jobs.py; pip install -r requirements-ray.txt)")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the job on Ray Data: a local Ray started for the job, or the cluster at ADDRESS (host:port, "
        "ray://host:port, auto); put it after the positional arguments or write --ray=ADDRESS",
    )
    ray.add_argument("--actors", type=int, default=0, help="encoder actors (default: one per GPU, else 1)")
    ray.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs Ray reserves per actor")
    ray.add_argument("--actor-gpus", type=float, default=None, help="GPUs per actor (default: 1 on a GPU cluster)")
    ray.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs Ray reserves per decoding task")
    ray.add_argument(
        "--decode-tasks", type=int, default=0, help="decoding tasks at once (default: 2 per CPU actor, no cap on GPUs)"
    )
    ray.add_argument("--ray-cpus", type=int, default=0, help="CPUs of the local Ray (default: this process's quota)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("classify", parents=[common], help="classify a folder into a CSV")
    c.add_argument("config")
    c.add_argument("folder", help="a folder, a list file (one path or URL a line) or an fsspec URL of a folder")
    c.add_argument("--out", required=True, help="CSV to write or resume; errors go to <out>.errors.csv")
    c.add_argument("--raw", action="store_true", help="also write each class's raw score (raw:<class> columns)")
    e = sub.add_parser("eval", parents=[common], help="accuracy on a labelled folder (one sub-folder per label)")
    e.add_argument("folder")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--config", help="classifier JSON whose class names are the folder names")
    src.add_argument("--mapping", help="'label description, other name' lines (LOC_synset_mapping.txt)")
    e.add_argument("--template", default="a photo of a {}.", help="prompt template for --mapping")
    e.add_argument("--augment", action="store_true", help="ensemble the 80 CLIP templates instead of --template")
    e.add_argument(
        "--names", choices=("all", "first"), default="all", help="--mapping: every comma-separated name, or the first"
    )
    e.add_argument("--train", help="labelled folder whose first --shots images per class become image examples")
    e.add_argument("--shots", type=int, default=5, help="image examples per class from --train")
    e.add_argument("--out-dir", required=True)
    cal = sub.add_parser("calibrate", parents=[common], help="open-set threshold for a target false-rejection rate")
    cal.add_argument("config")
    cal.add_argument("folder", help="in-distribution images (any layout)")
    cal.add_argument("--frr", type=float, default=0.05, help="share of in-distribution images to reject")
    cal.add_argument("--outside", help="images of none of the classes: prints the share rejected")
    cal.add_argument("--label", default="none of these", help="the open set's label (with --write)")
    cal.add_argument("--write", help="write the config with this open_set to this file")
    k = sub.add_parser("knn", parents=[common], help="k-NN accuracy from a labelled train folder")
    k.add_argument("train")
    k.add_argument("val")
    k.add_argument("--k", type=int, default=5)
    k.add_argument("--out-dir", required=True)
    m = sub.add_parser("embed", parents=[common], help="image embeddings of a folder into Parquet (+ a FAISS index)")
    m.add_argument("folder", help="a folder, a list file (one path or URL a line) or an fsspec URL of a folder")
    m.add_argument("--out", required=True, help="Parquet folder to write or resume; errors go to <out>.errors.csv")
    m.add_argument("--part-rows", type=int, default=10_000, help="rows per Parquet part (what a kill can lose)")
    m.add_argument("--faiss", help="also write a FAISS inner-product index of every embedding there")
    m.add_argument("--index", choices=("auto", "flat", "ivf"), default="auto", help="flat up to 1M vectors, else ivf")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {
        "classify": cmd_classify,
        "eval": cmd_eval,
        "calibrate": cmd_calibrate,
        "knn": cmd_knn,
        "embed": cmd_embed,
    }
    if args.ray is not None:
        from tools import ray_jobs

        ray_jobs.check_address(args.ray)  # before a model is loaded
    engine = build_engine(args)
    try:
        if args.ray is None:
            commands[args.cmd](args, engine)
        else:
            with ray_jobs.session(args.ray, args.ray_cpus, args.quiet):
                commands[args.cmd](args, engine)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
