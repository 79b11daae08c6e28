"""Where and how wide torch runs: device choice and a thread count from the CPU quota the process really has."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_count() -> int:
    """CPUs in this process's affinity mask (the host's core count where the platform has no affinity call)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_quota(*, root: Path = CGROUP_ROOT, affinity: int | None = None) -> int:
    """CPUs this process may use: the cgroup quota (v2 or v1) and the affinity mask, not the host's core count.

    ``root`` is the cgroup mount (v2: ``root/cpu.max``; v1: ``root/cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us``)
    and ``affinity`` the affinity mask's size (default: this process's); both are there for tests."""
    n = affinity if affinity is not None else affinity_count()
    try:
        cpu_max = root / "cpu.max"
        if cpu_max.exists():
            quota, period = cpu_max.read_text().split()[:2]
            if quota != "max":
                n = min(n, max(1, math.floor(int(quota) / int(period))))
        else:
            q = root / "cpu" / "cpu.cfs_quota_us"
            p = root / "cpu" / "cpu.cfs_period_us"
            if q.exists() and p.exists() and int(q.read_text()) > 0:
                n = min(n, max(1, math.floor(int(q.read_text()) / int(p.read_text()))))
    except (OSError, ValueError, ZeroDivisionError):
        pass  # no readable cgroup limit: the affinity mask stands
    return max(1, n)


def configure_threads(requested: int, share: int = 1, *, quota: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested`` or to this process's share of the CPU quota (``quota``, default
    ``cpu_quota()``)."""
    n = requested if requested > 0 else max(1, (cpu_quota() if quota is None else quota) // max(1, share))
    torch.set_num_threads(n)
    return n


def encoder_lanes(device_name: str, requested: int = 0, workers: int = 1, *, quota: int | None = None) -> int:
    """Lanes (model threads in one process, see runners/batcher.py) of the image encoder: ``requested`` when > 0, 1 on
    a GPU, and on a CPU two when the process's part of the quota (the quota over ``workers`` encoder processes) has 2
    cores or more, so one lane's forward pass overlaps the other's batch assembly and the API's decoding. Their torch
    threads share the quota (see ``configure_threads``), so the lanes never oversubscribe the cores. ``quota``
    defaults to ``cpu_quota()``."""
    if requested > 0:
        return requested
    if select_device(device_name).type != "cpu":
        return 1
    return max(1, min(2, (cpu_quota() if quota is None else quota) // max(1, workers)))


def service_workers(name: str, default: int) -> int:
    """Workers BentoML really runs for service ``name``: the decorator's value or its override in
    ``BENTOML_CONFIG_OPTIONS`` / ``BENTOML_CONFIG`` (e.g. ``services.clip_image_encoder.workers=1``)."""
    from runners.bentoml_internals import configured_workers

    workers = configured_workers(name)
    if workers == "cpu_count":
        return cpu_quota()
    try:
        return max(1, int(workers)) if workers is not None else default
    except (TypeError, ValueError):
        return default


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# CPU flags with native bf16 arithmetic: AVX-512 BF16 (dot products) or AMX (tile matrix multiply). Without them a
# runtime emulates bf16 through float32, slower than float32 itself.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU executes bf16 natively (``BF16_FLAGS`` in the kernel's flags); False where it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(BF16_FLAGS & set(line.partition(":")[2].split()))
    return False
