"""What the BentoML services share: traffic and connection settings, the settings of a service process (environment
over bento arguments), and the model-store references that make `bentoml build` pack the configured models."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
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


def own_metrics_dir() -> Path | None:
    """Give this `bentoml serve` a Prometheus folder of its own; the folder, or None where it is not ours to choose.

    BentoML keeps the multiprocess metric files of every server in one folder per user,
    ``$BENTOML_HOME/prometheus_multiproc_dir``, and empties it when a server starts: two servers of one user show each
    other's counters, and a server started later deletes the first one's files (its /metrics goes stale). The server
    process (BentoML's arbiter) reads the folder from its configuration after importing the service and before
    starting the workers, and hands it to them as ``PROMETHEUS_MULTIPROC_DIR``; so the service module calls this at
    import, and the folder becomes ``$BENTOML_HOME/zss-metrics/<pid of the server>``. Folders of servers that are no
    longer running are removed. A process that already has ``PROMETHEUS_MULTIPROC_DIR`` (a worker, or a user who
    chose a folder) is left alone.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    from bentoml._internal.configuration.containers import BentoMLContainer

    base = Path(BentoMLContainer.bentoml_home.get()) / "zss-metrics"
    if base.is_dir():
        for old in base.iterdir():
            if old.name.isdigit() and not _alive(int(old.name)):
                shutil.rmtree(old, ignore_errors=True)
    own = base / str(os.getpid())
    BentoMLContainer.prometheus_multiproc_dir.set(str(own))
    return own


def release_request_timers() -> None:
    """Make BentoML's per-request timeout release its timer when the request ends (idempotent).

    BentoML 1.4's ``TimeoutMiddleware`` arms ``loop.call_later(timeout, ...)`` for every request and never cancels it.
    The timer keeps a copy of the request's context (which holds the Starlette request and, through it, uvicorn's
    request cycle, the middlewares' closures and OpenTelemetry's span) until it fires: with ``TRAFFIC``'s 600 s, each
    worker kept the last 10 minutes of requests, about 14 KB each; the API worker's RSS grew 80-90 MiB a minute under
    4 clients (issue 18, BENCHMARKS.md "Soak"). This is the same middleware with the timer cancelled when the request
    ends; asyncio drops cancelled timers from its queue, so nothing of a finished request stays.
    """
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse

    if getattr(TimeoutMiddleware.__call__, "_zss_releases_timer", False):
        return

    async def call(self: TimeoutMiddleware, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def started(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, started))
        try:
            await waiter
        except TimeoutError:
            if fut.cancel():
                body = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(body, status_code=504)(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    call._zss_releases_timer = True  # type: ignore[attr-defined]
    TimeoutMiddleware.__call__ = call  # type: ignore[method-assign]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: does the process exist?
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
