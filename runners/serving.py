"""What the BentoML services share: traffic and connection settings, the settings of a service process (environment
over bento arguments), and the model-store references that make `bentoml build` pack the configured models."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from runners.store import pin, store_tag, store_value
from settings import PREFIX, Settings, get_settings

log = logging.getLogger(__name__)

# Long requests (a cold deploy of thousands of prompts) must not time out.
TRAFFIC: dict[str, Any] = {"timeout": 600}

# Read by the callers' dependency clients. BentoML 1.4.39 replaces a client's aiohttp session every `max_requests`
# requests (default 100) or `max_age` seconds and closes the old one with requests still in flight on it: they fail
# with ServerDisconnectedError and, after service.call_encoder's retry, are encoded twice. At 16 clients that cost
# P1 about half its throughput and gave multi-second p99 spikes (BENCHMARKS.md). The session is therefore never
# replaced; the retry stays as a safety net.
RUNNER_CONNECTION: dict[str, Any] = {"max_requests": 2**31 - 1, "max_age": 1e9}


def bento_arguments() -> dict[str, str]:
    """The ``ZSS_*`` bento arguments of this process (``bentoml build --arg ZSS_X=...``, or recorded by
    ``bento_model``); a served bento restores the ones it was built with."""
    import bentoml

    args = vars(bentoml.use_arguments())
    return {k.upper(): str(v) for k, v in args.items() if k.upper().startswith(PREFIX) and v is not None}


def service_settings() -> Settings:
    """The settings of a service process: ``ZSS_*`` environment variables over the bento's arguments over defaults."""
    return get_settings(fallback=bento_arguments())


def bento_model(setting: str, value: str) -> Any:
    """The BentoML model reference for a setting that names a model-store tag (``bentoml:NAME[:VERSION]``), else None.

    A service declares it as a class attribute, which is how `bentoml build` learns which models to pack into the
    bento. The tag is pinned to its concrete version and recorded as the bento argument ``setting``, so a bento built
    with ``ZSS_CLIP_MODEL=bentoml:shapes-clip bentoml build`` (or ``--arg ZSS_CLIP_MODEL=...``) serves exactly the
    model it carries, with no environment variable, even after a newer version is imported into the store.
    A tag that is not in the store is declared as given: `bentoml build` then fails naming it, and a server started
    from the checkout reports it when the encoder loads (BentoML resolves only a served bento's models at start).
    """
    from bentoml.models import BentoModel

    tag = store_tag(value)
    if tag is None:
        return None
    try:
        pinned = pin(tag)
        ref = BentoModel(pinned)
    except ValueError as exc:  # not a valid tag: the encoder's loader says so
        log.error("%s=%r: %s", setting, value, exc)
        return None
    _record_argument(setting, store_value(pinned))
    return ref


# The settings that decide which services a bento has and which models they load. A build records each of them as a
# bento argument (the value it was built with), so the bento serves as built with no ZSS_* variable: without this a
# bento built with ZSS_DETECTOR_MODEL=none, served with no variable, declared a detector service the bento does not
# have and BentoML stopped at start (issue 26). An environment variable where the bento runs still wins.
BUILD_SETTINGS = (
    "ZSS_CLIP_MODEL",
    "ZSS_CLIP_PRETRAINED",
    "ZSS_CLIP_QUANTIZE",
    "ZSS_DETECTOR_MODEL",
    "ZSS_RANDOM_SEED",
)


def record_build_settings(settings: Settings) -> None:
    """Record ``BUILD_SETTINGS`` as bento arguments; a value already recorded (a model tag pinned by
    :func:`bento_model`, or a ``--arg``) is kept."""
    recorded = bento_arguments()
    for name in BUILD_SETTINGS:
        if name not in recorded:
            _record_argument(name, str(getattr(settings, name.removeprefix(PREFIX).lower())))


def detector_declared(settings: Settings) -> bool:
    """Whether the service graph has the detector service: as the settings say, except that a bento built without one
    cannot gain it from an environment variable (BentoML finds no such service in the bento and stops at start with a
    bare StopIteration); that is logged and the detector stays off. Turning a built-in detector off still works."""
    built = bento_arguments().get("ZSS_DETECTOR_MODEL")
    built_without = built is not None and not get_settings({"ZSS_DETECTOR_MODEL": built}).detector_enabled
    if settings.detector_enabled and built_without:
        log.warning(
            "ZSS_DETECTOR_MODEL=%s is ignored: this bento was built without a detector (ZSS_DETECTOR_MODEL=%s); "
            "build a bento with the detector to serve one",
            settings.detector_model,
            built,
        )
        return False
    return settings.detector_enabled


def _record_argument(name: str, value: str) -> None:
    # BentoML 1.4 stores the bento arguments of the build process in the bento (bento.yaml `args`) and restores them
    # before a served bento is imported. There is no public setter; the container below is where `--arg` lands.
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        args = dict(BentoMLContainer.bento_arguments.get())
        args[name] = value
        BentoMLContainer.bento_arguments.set(args)
    except Exception as exc:  # a private API that may move: the model is still declared and packed
        log.warning("could not record %s=%s as a bento argument (%s); set it where the bento runs", name, value, exc)


def on_sigterm(callback: Callable[[], None]) -> None:
    """Call ``callback`` first when this worker gets SIGTERM (the server stopping), then the handler there was
    (uvicorn's, which stops serving). ``callback`` runs in a signal handler: it only sets flags. Called from a thread
    other than the main one (no signal can be set there), it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        callback()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
