"""The folder tool's jobs on Ray Data (``--ray [ADDRESS]``): the same files, pixels, encoder and scoring, on a cluster.

Imported only with ``--ray`` (Ray is optional at run time: requirements-ray.txt). The job is one Ray Data pipeline:

    paths (listed here) -> decode + preprocess in Ray tasks (tools.image_files.load_pixels: imaging/ and the model's
    own preprocessing, so the pixels are the in-process mode's) -> map_batches with a callable class in a fixed actor
    pool (each actor loads the image tower once; one GPU per actor when the cluster has GPUs) -> the engine's
    ClassifierKind.score in the actor (classify) or the embeddings (eval, embed, knn) -> this process, which writes
    each batch as it arrives (so a killed job resumes from what reached the disk).

Without an address a local Ray is started for the job and stopped after it; with one (``host:port``, ``auto``,
``ray://host:port``) the job joins that cluster and ships this checkout's code to it (runtime_env working_dir); the
nodes need requirements.txt installed and the model files at the same paths (or a shared file system). Text
embeddings (the classifier's examples) are computed here once, through the embedding cache, and travel to the
actors compiled.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.kinds import Classification, ClassifierKind
from runners.device import configure_threads, cpu_quota
from semantic.classify import CompiledClassifier
from settings import Settings, get_settings
from tools.image_files import Loaded, decode_batch, is_url

if TYPE_CHECKING:
    from tools.classify_dir import Runtime, Scored

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
# A local Ray's shared-memory object store: a batch of 32 ViT-B-32 inputs is 4.8 MB, and Ray Data streams, so a
# small store is plenty (Ray's default would take 30% of the machine's memory).
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
# What a joined cluster does not need of this checkout (runtime_env working_dir is uploaded, 500 MiB at most).
CODE_EXCLUDES = [".venv", ".git", ".zss", "tests", "docs", "bench", "models", "ui", "**/__pycache__"]
_ADDRESS = re.compile(r"^(auto|ray://[^\s]+|[A-Za-z0-9.\-\[\]:]+:\d+)$")
# The settings that decide which image encoder an actor loads (and so the vectors it makes).
ENCODER_SETTINGS = ("clip_model", "clip_pretrained", "random_seed", "device", "fp16", "clip_quantize")


def check_address(address: str) -> str:
    """``""`` (a local Ray for the job), ``auto``, ``host:port`` or ``ray://host:port``; anything else is refused
    (``--ray`` before the positional arguments would take the first of them as the address)."""
    if address == "" or _ADDRESS.match(address):
        return address
    raise SystemExit(
        f"--ray {address!r}: not a Ray address (host:port, ray://host:port or auto); put --ray after the positional "
        "arguments, or write --ray=ADDRESS"
    )


def start_local(cpus: int, quiet: bool = True) -> None:
    """A local Ray on this machine: ``cpus`` CPUs, no dashboard, a small object store, no usage reporting, and this
    checkout on the workers' import path."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home (tests run without a network)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        # Ray runs workers at niceness 15, so they yield to every other process; the job is this machine's foreground
        # work, as the in-process mode is, so its workers run at the driver's priority.
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_worker_niceness": "0"}},
        logging_level=logging.WARNING,
        log_to_driver=not quiet,
    )


@contextmanager
def session(address: str, cpus: int, quiet: bool) -> Iterator[None]:
    """Ray for one command: a session this process already holds (tests hold one per module) is used as it is;
    otherwise a local one is started, or the cluster at ``address`` joined, and left at the end."""
    import ray

    check_address(address)
    if ray.is_initialized():
        yield
        return
    if address == "":
        start_local(cpus or cpu_quota(), quiet)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            address=address,
            runtime_env={"working_dir": str(ROOT), "excludes": CODE_EXCLUDES},
            logging_level=logging.WARNING,
            log_to_driver=not quiet,
        )
    try:
        yield
    finally:
        ray.shutdown()


def encoder_environ(settings: Settings) -> dict[str, str]:
    """The encoder's settings as ``ZSS_*`` values for the actors (nothing else of the settings leaves this process,
    API keys included); local model files as absolute paths, since a joined cluster's workers run elsewhere."""
    env = {}
    for name in ENCODER_SETTINGS:
        value = str(getattr(settings, name))
        if name in ("clip_model", "clip_pretrained") and not is_url(value) and Path(value).exists():
            value = str(Path(value).resolve())
        env[f"ZSS_{name.upper()}"] = value
    return env


# -- the two stages ---------------------------------------------------------------------------------------------------
class EncodeActor:
    """Ray actor (map_batches' callable class): loads the image tower once, then encodes batches of pixels and, with a
    compiled classifier, scores them with the engine's ClassifierKind.score (the code /classify scores with)."""

    def __init__(self, environ: dict[str, str], threads: int, clf: CompiledClassifier | None = None) -> None:
        from runners.clip import load_clip_encoder

        configure_threads(threads)
        self.encoder = load_clip_encoder(get_settings(environ=environ), towers="image")
        self.clf = clf

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        # The readable rows only, stacked as the in-process mode stacks them.
        emb = self.encoder.encode_pixels(np.ascontiguousarray(batch["pixels"][ok]))
        out = {
            "path": batch["path"],
            "error": batch["error"],
            "model_id": np.full(n, self.encoder.model_id, dtype=object),
        }
        if self.clf is None:
            full = np.zeros((n, self.encoder.dim), np.float32)
            full[ok] = emb
            out["embedding"] = full
            return out
        c = self.clf.n_classes
        # float64 holds the float32 scores' Python floats exactly: the CSV prints the same digits as in-process.
        scores, raw, pred = np.zeros((n, c)), np.zeros((n, c)), np.full(n, -1, dtype=np.int64)
        for i, r in zip(np.flatnonzero(ok), ClassifierKind.score(emb, self.clf) if len(emb) else []):
            scores[i], raw[i], pred[i] = r.scores, r.raw_scores, r.pred
        out.update(scores=scores, raw=raw, pred=pred)
        return out


# -- the job ----------------------------------------------------------------------------------------------------------
def _plan(rt: Runtime, args: argparse.Namespace) -> tuple[int, float, float, int]:
    """(actors, CPUs and GPUs per actor, torch threads per actor) for the cluster this process is connected to."""
    import ray

    resources = ray.cluster_resources()
    gpus_total, cpus_total = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 1.0))
    gpus = args.actor_gpus if args.actor_gpus is not None else (1.0 if gpus_total >= 1 else 0.0)
    actors = max(1, args.actors or (int(gpus_total // gpus) if gpus > 0 else 1))
    # The actors must leave a decoding task room: actors holding every CPU would wait forever for their input.
    fit = (cpus_total - args.decode_cpus) / actors
    if fit < 0.01:
        raise SystemExit(
            f"{actors} actors and a decoding task ({args.decode_cpus} CPU) do not fit in {cpus_total:g} CPUs: "
            "lower --actors or --decode-cpus"
        )
    cpus = min(args.actor_cpus, round(fit, 2))
    if cpus < args.actor_cpus:
        log.warning("%d actors x %g CPUs leave no CPU to decode on: %g CPUs each", actors, args.actor_cpus, cpus)
    if rt.settings.torch_threads > 0:
        threads = rt.settings.torch_threads
    elif args.ray == "":  # a local Ray: the actors share this machine's cores
        threads = max(1, int(cpus_total) // actors)
    else:
        threads = max(1, math.ceil(cpus))
    return actors, cpus, gpus, threads


def _dataset(paths: Sequence[str], rt: Runtime, args: argparse.Namespace, clf: CompiledClassifier | None) -> Any:
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not args.quiet
    if args.quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    actors, cpus, gpus, threads = _plan(rt, args)
    rows = [{"path": p, "location": p if is_url(p) else str(Path(p).absolute())} for p in paths]
    # One block per batch: the first results come back after one batch, and a kill loses little.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / args.batch_size)))
    # Decoding runs in tasks of its own, so it overlaps the actors' forward passes. Ray Data fuses a task stage into
    # the actor stage after it when both ask for the same resources and the task pool's size is unset or equals the
    # actor pool's; decoding would then run in the actor, in series with the model. A GPU actor never fuses (its
    # resources differ), and there decoding must not be capped (a GPU encodes faster than one CPU decodes); CPU
    # actors get twice as many decoding tasks at most, a cap that also keeps the stages apart.
    decoders = args.decode_tasks or (None if gpus > 0 else 2 * actors)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"preprocess": rt.encoder.preprocess, "max_pixels": rt.settings.max_image_pixels},
        batch_size=args.batch_size,
        compute=ray.data.TaskPoolStrategy(size=decoders),
        num_cpus=args.decode_cpus,
    )
    return ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"environ": encoder_environ(rt.settings), "threads": threads, "clf": clf},
        batch_size=args.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )


def _batches(paths: Sequence[str], rt: Runtime, args: argparse.Namespace, clf: CompiledClassifier | None) -> Any:
    if not paths:
        return
    for b in _dataset(paths, rt, args, clf).iter_batches(batch_size=None, batch_format="numpy"):
        theirs = set(b["model_id"].tolist())
        if theirs != {rt.encoder.model_id}:
            # Another model in the actors (other files at those paths on a node) would mix vectors silently.
            raise SystemExit(f"the Ray actors loaded {sorted(theirs)}, this process {rt.encoder.model_id}")
        yield b


def _items(b: dict[str, np.ndarray]) -> list[Loaded]:
    return [Loaded(str(p), None, str(e) or None) for p, e in zip(b["path"], b["error"])]


def embedded(paths: Sequence[str], rt: Runtime, args: argparse.Namespace) -> Iterator[tuple[list[Loaded], np.ndarray]]:
    """As tools.classify_dir.embed_batches: (items, embeddings of the readable ones) per batch, in any order."""
    for b in _batches(paths, rt, args, None):
        items = _items(b)
        ok = np.array([it.error is None for it in items], dtype=bool)
        yield items, np.ascontiguousarray(b["embedding"][ok], dtype=np.float32)


def scored(paths: Sequence[str], clf: CompiledClassifier, rt: Runtime, args: argparse.Namespace) -> Iterator[Scored]:
    """Each batch's items with the actors' results, as Classification values (None for an unreadable file)."""
    for b in _batches(paths, rt, args, clf):
        out: Scored = []
        for i, it in enumerate(_items(b)):
            r = None
            if it.error is None:
                r = Classification(clf.class_names, b["scores"][i].tolist(), b["raw"][i].tolist(), int(b["pred"][i]))
            out.append((it, r))
        yield out
