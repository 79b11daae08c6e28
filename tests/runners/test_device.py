"""Worker and thread layout of the encoders: derived from the CPU quota, never more threads than cores."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from runners.device import configure_threads, cpu_quota, encoder_lanes, service_workers
from testing.server import ROOT


def test_cpu_encoder_lanes_split_the_quota_without_oversubscribing() -> None:
    quota = cpu_quota()
    workers = encoder_lanes("cpu")
    assert workers == min(2, quota)
    assert encoder_lanes("cpu", requested=3) == 3  # ZSS_IMAGE_LANES wins
    # More encoder processes (BentoML's workers override) split the quota first: never more lanes than cores.
    assert encoder_lanes("cpu", workers=quota) == 1
    assert encoder_lanes("cpu", workers=2 * quota) == 1
    before = torch.get_num_threads()
    try:
        threads = configure_threads(0, share=workers)
        assert threads == max(1, quota // workers)
        assert workers * threads <= max(quota, workers)
        assert configure_threads(3, share=workers) == 3  # ZSS_TORCH_THREADS wins
    finally:
        torch.set_num_threads(before)


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
