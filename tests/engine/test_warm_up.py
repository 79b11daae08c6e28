"""engine.pipelines.Engine.start_warm_up: the remote text encoder's batching is trained before the server reports ready
(issue 29: BentoML's dispatcher held a deploy's 10th and 11th chunks for ~7 s and ~9 s while it trained itself)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from cache.stores import open_stores
from engine.encoders import DISPATCHER_TRAINING_REQUESTS, LocalDetector, RemoteClipText
from engine.pipelines import Engine
from settings import get_settings


class Handle:
    """A text encoder service's handle (BentoML's, whose ``to_async`` is the async client) that is still starting for
    its first ``failures`` calls, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()  # the test opens it once it has seen the server unready
        self.to_async = SimpleNamespace(encode=self._encode)

    async def _encode(self, texts: list[str]) -> np.ndarray:
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError("the encoder is still starting")
        self.calls.append(list(texts))
        return np.zeros((len(texts), 4), np.float32)

    def info(self) -> dict[str, Any]:
        return {"model_id": "m"}


def engine_with(text: Any, tmp_path: Path) -> Engine:
    settings = get_settings({"ZSS_DATA_DIR": str(tmp_path)})
    registry, cache = open_stores(settings)
    return Engine(
        settings,
        image_encoder=None,  # type: ignore[arg-type]
        text_encoder=text,
        detector=LocalDetector(None),
        registry=registry,
        cache=cache,
    )


async def _ready(engine: Engine) -> None:
    while engine.unready() is not None:
        await asyncio.sleep(0.05)


def test_readiness_waits_until_the_text_encoders_batching_is_trained(tmp_path: Path) -> None:
    handle = Handle(failures=2)
    engine = engine_with(RemoteClipText(handle), tmp_path)
    assert engine.unready() is None  # nothing to wait for before the warm-up starts

    async def main() -> None:
        engine.start_warm_up()
        assert engine.unready() == "the text encoder's batching is warming up"
        await asyncio.sleep(0.2)
        assert engine.unready() is not None and handle.calls == []  # the encoder has not answered yet
        handle.gate.set()
        await asyncio.wait_for(_ready(engine), 60)

    asyncio.run(main())
    # Retried while the encoder was starting, then the training requests, all empty: no prompt is encoded.
    assert handle.calls == [[]] * DISPATCHER_TRAINING_REQUESTS


def test_a_warm_up_that_cannot_finish_gives_up_and_the_server_becomes_ready(tmp_path: Path) -> None:
    handle = Handle(failures=10**9)
    handle.gate.set()
    engine = engine_with(RemoteClipText(handle), tmp_path)

    async def main() -> None:
        engine.start_warm_up(give_up_s=0.0)
        await asyncio.wait_for(_ready(engine), 60)

    asyncio.run(main())
    assert handle.calls == []


class InProcess:
    def encode(self, prompts: list[str]) -> np.ndarray:
        raise AssertionError("nothing to train in-process")


def test_an_in_process_text_encoder_or_no_event_loop_has_nothing_to_warm_up(tmp_path: Path) -> None:
    async def main() -> None:
        engine = engine_with(InProcess(), tmp_path)
        engine.start_warm_up()
        assert engine.unready() is None

    asyncio.run(main())
    remote = engine_with(RemoteClipText(Handle(failures=0)), tmp_path / "script")
    remote.start_warm_up()  # no running loop: a script's engine
    assert remote.unready() is None
