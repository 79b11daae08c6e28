"""Worker and thread layout of the encoders: derived from the CPU quota, never more threads than cores."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runners.device import configure_threads, cpu_quota, encoder_lanes, native_bf16, service_workers
from testing.server import ROOT


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, quota: str, period: str) -> Path:
    (root / "cpu").mkdir(parents=True, exist_ok=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


# cgroup v2 cpu.max, affinity mask size -> CPUs, image-encoder lanes (one encoder process), torch threads per lane
V2_LAYOUTS = [
    ("100000 100000", 16, 1, 1, 1),
    ("200000 100000", 16, 2, 2, 1),
    ("800000 100000", 16, 8, 2, 4),
    ("max 100000", 6, 6, 2, 3),  # no limit: the affinity mask
    ("max 100000", 1, 1, 1, 1),
    ("150000 100000", 16, 1, 1, 1),  # 1.5 CPUs: rounded down
    ("350000 100000", 16, 3, 2, 1),
    ("50000 100000", 16, 1, 1, 1),  # half a CPU: still one
    ("800000 100000", 4, 4, 2, 2),  # the affinity mask caps the quota
    ("800000 100000", 1, 1, 1, 1),
    ("1600000 200000", 16, 8, 2, 4),  # a period other than the default
]


@pytest.mark.parametrize(("cpu_max", "affinity", "cpus", "lanes", "threads"), V2_LAYOUTS)
def test_cgroup_v2_quota_lanes_and_threads(
    tmp_path: Path, torch_threads: None, cpu_max: str, affinity: int, cpus: int, lanes: int, threads: int
) -> None:
    quota = cpu_quota(root=cgroup_v2(tmp_path, cpu_max), affinity=affinity)
    assert quota == cpus
    assert encoder_lanes("cpu", quota=quota) == lanes
    assert configure_threads(0, share=lanes, quota=quota) == threads
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    ("quota", "period", "affinity", "cpus"),
    [
        ("-1", "100000", 6, 6),  # v1's "no limit"
        ("200000", "100000", 16, 2),
        ("100000", "100000", 16, 1),
        ("150000", "100000", 16, 1),
        ("800000", "100000", 16, 8),
        ("800000", "100000", 3, 3),  # capped by the affinity mask
    ],
)
def test_cgroup_v1_quota(tmp_path: Path, quota: str, period: str, affinity: int, cpus: int) -> None:
    assert cpu_quota(root=cgroup_v1(tmp_path, quota, period), affinity=affinity) == cpus


def test_cgroup_v2_wins_over_v1(tmp_path: Path) -> None:
    cgroup_v1(tmp_path, "100000", "100000")
    assert cpu_quota(root=cgroup_v2(tmp_path, "400000 100000"), affinity=16) == 4


@pytest.mark.parametrize(
    "cpu_max",
    ["", "garbage", "200000", "lots 100000", "200000 often", "2.5 1"],
)
def test_garbage_cpu_max_leaves_the_affinity_mask(tmp_path: Path, cpu_max: str) -> None:
    assert cpu_quota(root=cgroup_v2(tmp_path, cpu_max), affinity=5) == 5


@pytest.mark.parametrize(("quota", "period"), [("", "100000"), ("x", "100000"), ("200000", "y"), ("200000", "")])
def test_garbage_v1_files_leave_the_affinity_mask(tmp_path: Path, quota: str, period: str) -> None:
    assert cpu_quota(root=cgroup_v1(tmp_path, quota, period), affinity=5) == 5


def test_unreadable_or_missing_cgroup_files_leave_the_affinity_mask(tmp_path: Path) -> None:
    assert cpu_quota(root=tmp_path / "nothing-here", affinity=7) == 7
    assert cpu_quota(root=tmp_path, affinity=7) == 7  # a cgroup dir without cpu files
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").mkdir()  # exists but cannot be read as a file (IsADirectoryError), even as root
    assert cpu_quota(root=tmp_path / "v2", affinity=7) == 7
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(root=tmp_path / "v1", affinity=7) == 7
    only_quota = tmp_path / "v1-half"
    (only_quota / "cpu").mkdir(parents=True)
    (only_quota / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # no period file: no limit
    assert cpu_quota(root=only_quota, affinity=7) == 7


def test_affinity_defaults_to_this_process_mask(tmp_path: Path) -> None:
    mask = len(os.sched_getaffinity(0))
    assert cpu_quota(root=tmp_path) == mask
    assert cpu_quota(root=cgroup_v2(tmp_path, "max 100000")) == mask
    assert cpu_quota(root=tmp_path, affinity=3) == 3


@pytest.mark.parametrize(
    ("quota", "workers", "lanes"),
    [(1, 1, 1), (2, 1, 2), (3, 1, 2), (8, 1, 2), (8, 4, 2), (8, 5, 1), (8, 8, 1), (8, 16, 1), (2, 2, 1), (4, 2, 2)],
)
def test_cpu_lanes_split_the_quota_over_encoder_processes(quota: int, workers: int, lanes: int) -> None:
    assert encoder_lanes("cpu", workers=workers, quota=quota) == lanes


def test_requested_lanes_and_gpus() -> None:
    assert encoder_lanes("cpu", requested=3, quota=1) == 3  # ZSS_IMAGE_LANES wins, even over the quota
    assert encoder_lanes("cuda", quota=8) == 1  # one lane on a GPU
    assert encoder_lanes("cuda", requested=2, quota=8) == 2


@pytest.mark.parametrize(
    ("quota", "share", "threads"),
    [(8, 1, 8), (8, 2, 4), (8, 3, 2), (8, 4, 2), (8, 16, 1), (1, 2, 1), (2, 2, 1), (6, 4, 1), (3, 1, 3), (4, 0, 4)],
)
def test_threads_are_the_share_of_the_quota(torch_threads: None, quota: int, share: int, threads: int) -> None:
    assert configure_threads(0, share=share, quota=quota) == threads
    assert torch.get_num_threads() == threads


def test_requested_threads_win(torch_threads: None) -> None:
    assert configure_threads(3, share=2, quota=8) == 3  # ZSS_TORCH_THREADS wins
    assert torch.get_num_threads() == 3
    assert configure_threads(5, share=1, quota=1) == 5


def test_defaults_read_this_machine(torch_threads: None) -> None:
    """Without injected values everything derives from this process's real cgroup and affinity mask."""
    quota = cpu_quota()
    assert 1 <= quota <= len(os.sched_getaffinity(0))
    assert quota == cpu_quota(root=Path("/sys/fs/cgroup"), affinity=len(os.sched_getaffinity(0)))
    assert encoder_lanes("cpu") == encoder_lanes("cpu", quota=quota)
    assert encoder_lanes("cpu", workers=3) == encoder_lanes("cpu", workers=3, quota=quota)
    lanes = encoder_lanes("cpu")
    assert configure_threads(0, share=lanes) == configure_threads(0, share=lanes, quota=quota)


def test_service_workers_outside_bentoml_serve_is_the_default() -> None:
    assert service_workers("clip_image_encoder", 5) == 5


def test_service_workers_reads_bentoml_config_override() -> None:
    code = (
        "import runners.clip_service; from runners.device import service_workers; "
        "print(service_workers('clip_image_encoder', 1))"
    )
    env = {**os.environ, "BENTOML_CONFIG_OPTIONS": "services.clip_image_encoder.workers=3", "ZSS_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3"


def test_log_level_setting_applies_to_project_loggers() -> None:
    import logging

    import pytest

    from api.errors import log as api_log
    from settings import Settings, configure_logging

    try:
        configure_logging(Settings(log_level="debug"))
        for name in ("runners.clip", "engine.pipelines", "imaging.fetch", "cache.embeddings"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.DEBUG, name
        assert api_log.getEffectiveLevel() == logging.DEBUG  # the API service's own logger
        with pytest.raises(ValueError, match="ZSS_LOG_LEVEL"):
            configure_logging(Settings(log_level="loud"))
    finally:
        configure_logging(Settings())


def test_a_zero_period_is_no_limit_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000 0\n")
    assert cpu_quota(root=tmp_path, affinity=3) == 3


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse avx2 avx512f avx512_vnni avx512_bf16 vaes", True),  # Zen 4, Cooper Lake
        ("fpu avx512f amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids
        ("fpu sse avx2 avx512f avx512_vnni", False),  # Cascade Lake: emulated only
        ("fpu neon asimd", False),
    ],
)
def test_native_bf16_reads_the_kernels_flags(tmp_path: Path, flags: str, native: bool) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: X\nflags\t\t: {flags}\nbogomips\t: 1\n")
    assert native_bf16(info) is native


def test_native_bf16_is_false_where_unreadable(tmp_path: Path) -> None:
    assert native_bf16(tmp_path / "missing") is False
    (tmp_path / "no-flags").write_text("processor\t: 0\n")
    assert native_bf16(tmp_path / "no-flags") is False
