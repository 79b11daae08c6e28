"""The image encoder service's own batching, in-process (the class behind the BentoML service, on the tiny CLIP)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import pytest
import torch

from runners.clip_service import BadPixels, ClipImageEncoder
from testing.models import ClipFiles, clip_env


@pytest.fixture()
def encoder(tiny_clip: ClipFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for k, v in {**clip_env(tiny_clip, tmp_path / "data"), "ZSS_DEVICE": "cpu", "ZSS_IMAGE_LANES": "2"}.items():
        monkeypatch.setenv(k, v)
    before = torch.get_num_threads()  # the service sets torch's threads for its whole process
    enc = ClipImageEncoder.inner()
    try:
        yield enc
    finally:
        enc.batcher.close()
        torch.set_num_threads(before)


def _pixels(enc: ClipImageEncoder, n: int, seed: int) -> np.ndarray:
    h, w = enc.size
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_batched_requests_match_one_forward_each(encoder: ClipImageEncoder) -> None:
    reqs = [_pixels(encoder, n, seed) for seed, n in enumerate([1, 3, 2, 5])]

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(encoder.encode_pixels(r) for r in reqs))

    outs = asyncio.run(main())
    for r, o in zip(reqs, outs):
        np.testing.assert_allclose(o, encoder.encoder.encode_pixels(r), atol=1e-5)
    assert encoder.batcher.stats.items == 11


def test_lanes_run_with_the_threads_share(encoder: Any) -> None:
    # torch's thread count is set in the service's thread; each lane (a pool thread) must run with the same share,
    # or two lanes would each start a team of threads and oversubscribe the cores.
    assert encoder.batcher.lanes == 2
    assert encoder.batcher._pool.submit(torch.get_num_threads).result() == encoder.threads


def test_malformed_pixels_fail_alone_with_400(encoder: ClipImageEncoder) -> None:
    h, w = encoder.size
    good = _pixels(encoder, 2, 0)
    bad = [
        np.zeros((1, h + 1, w, 3), np.uint8),  # wrong size
        np.zeros((1, h, w, 3), np.float32),  # wrong dtype
        np.zeros((h, w, 3), np.uint8),  # no batch axis
        [[1, 2, 3]],  # not an array
    ]

    async def main() -> list[object]:
        return await asyncio.gather(
            encoder.encode_pixels(good), *(encoder.encode_pixels(b) for b in bad), return_exceptions=True
        )

    ok, *errors = asyncio.run(main())
    np.testing.assert_allclose(ok, encoder.encoder.encode_pixels(good), atol=1e-5)  # the valid request is unharmed
    for e in errors:
        assert isinstance(e, BadPixels), e
        assert e.error_code == 400
        assert "expected uint8" in str(e)


def test_overloaded_queue_is_a_503(encoder: ClipImageEncoder) -> None:
    encoder.batcher.max_wait_s = -1.0  # every request has waited "too long" by the time a lane looks at it

    async def main() -> None:
        await encoder.encode_pixels(_pixels(encoder, 1, 0))

    with pytest.raises(bentoml.exceptions.ServiceUnavailable) as info:
        asyncio.run(main())
    assert info.value.error_code == 503
