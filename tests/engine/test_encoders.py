"""engine.encoders: the remote encoders' retry of transient connection failures."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from engine.encoders import call_async as call_encoder
from engine.encoders import call_sync as call_encoder_sync
from errors import Unavailable


class Flaky:
    """Fails with the disconnect BentoML's dependency client produces, ``failures`` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise aiohttp.ServerDisconnectedError()
        return x * 2

    async def acall(self, x: int) -> int:
        return self(x)


def test_transient_disconnects_are_retried() -> None:
    f = Flaky(2)
    assert asyncio.run(call_encoder(f.acall, 21)) == 42 and f.calls == 3
    g = Flaky(2)
    assert call_encoder_sync(g, 21) == 42 and g.calls == 3


def test_persistent_disconnects_become_503() -> None:
    f = Flaky(10)
    with pytest.raises(Unavailable) as err:
        asyncio.run(call_encoder(f.acall, 1))
    assert err.value.status_code == 503 and f.calls == 3
    with pytest.raises(Unavailable):
        call_encoder_sync(Flaky(10), 1)


def test_other_errors_are_not_retried() -> None:
    calls = []

    def boom(_: int) -> int:
        calls.append(1)
        raise ValueError("bad")

    with pytest.raises(ValueError):
        call_encoder_sync(boom, 1)
    assert len(calls) == 1


def test_short_prompt_lists_take_the_text_encoders_short_lane() -> None:
    """A few prompts (an /embed_text) go to ``encode_now``, beside a long deploy's batches; the engine's threshold is
    the service's (runners/clip_service.py refuses more)."""
    from engine.encoders import SHORT_LANE_PROMPTS, RemoteClipText

    calls: list[tuple[str, int]] = []

    class Handle:
        def encode(self, prompts: list[str]) -> np.ndarray:
            calls.append(("encode", len(prompts)))
            return np.zeros((len(prompts), 4), np.float32)

        def encode_now(self, prompts: list[str]) -> np.ndarray:
            calls.append(("encode_now", len(prompts)))
            return np.zeros((len(prompts), 4), np.float32)

    text = RemoteClipText(Handle())
    text.encode(["a"] * SHORT_LANE_PROMPTS)
    text.encode(["a"] * (SHORT_LANE_PROMPTS + 1))
    assert calls == [("encode_now", SHORT_LANE_PROMPTS), ("encode", SHORT_LANE_PROMPTS + 1)]
