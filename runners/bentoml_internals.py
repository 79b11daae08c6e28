"""Every use of BentoML's private parts (``bentoml._internal``) in one module, written for BentoML 1.4.

BentoML has no public API for these, and a minor release may move them: ``check_version`` stops the server at start,
naming this module and the installed version, when BentoML is not the series these were written and tested for
(requirements.txt pins it). What is here:

- ``own_metrics_dir``: a Prometheus multiprocess folder per server (``BentoMLContainer.prometheus_multiproc_dir``).
- ``release_request_timers``: BentoML's ``TimeoutMiddleware`` with its per-request timer released.
- ``configured_workers``: a service's ``workers`` as BentoML's configuration says (``BentoMLContainer.config``).
- ``bentoml_process``: which of BentoML's processes this is (its command line, one of its service workers, or
  neither), from what BentoML 1.4 itself puts there: the service module does at import only what BentoML gives no
  later hook for, and only in the process that needs it (README, "What importing service.py does").

Still elsewhere: runners/serving.py's ``_record_argument`` (``BentoMLContainer.bento_arguments``, the bento arguments
a build records).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

WRITTEN_FOR = (1, 4)  # BentoML major.minor whose private layout this module uses


def check_version(found: str | None = None) -> None:
    """Fail, naming this module, unless the installed BentoML is the WRITTEN_FOR series."""
    found = found if found is not None else installed_version("bentoml")
    parts = found.split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        major_minor = None
    if major_minor != WRITTEN_FOR:
        want = ".".join(map(str, WRITTEN_FOR))
        raise RuntimeError(
            f"runners/bentoml_internals.py uses BentoML {want}'s private modules (bentoml._internal: the metrics "
            f"folder, TimeoutMiddleware, the service configuration) and BentoML {found} is installed: install "
            f"bentoml=={want}.* (requirements.txt) or port that module to {found}"
        )


def bentoml_process() -> str | None:
    """``"worker"`` in one of BentoML's service workers (BentoML 1.4's arbiter starts every worker, the API's and each
    dependency's, with ``BENTOML_RUNNER_MAP`` in its environment), ``"cli"`` in a process of BentoML's command line
    (`bentoml serve`, `bentoml build`: ``bentoml_cli`` is loaded), None anywhere else (a test or a tool that imports
    the service). Reads neither the command line nor anything it would change."""
    if os.environ.get("BENTOML_RUNNER_MAP"):
        return "worker"
    if "bentoml_cli" in sys.modules:
        return "cli"
    return None


def prepare_server() -> None:
    """In BentoML's command-line process, at the service's import (before `bentoml serve` reads the metrics folder and
    starts the workers; no later hook runs there): check the version and give the server its own metrics folder."""
    check_version()
    own_metrics_dir()


def prepare_worker() -> None:
    """In each of BentoML's workers, before it serves: check the version and release the per-request timers."""
    check_version()
    release_request_timers()


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


def configured_workers(name: str) -> Any:
    """The ``workers`` BentoML's configuration gives service ``name`` (the decorator's value, or its override in
    ``BENTOML_CONFIG_OPTIONS`` / ``BENTOML_CONFIG``); None outside `bentoml serve` or where the layout changed."""
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        return BentoMLContainer.config.services[name].get().get("workers")
    except Exception:  # not under bentoml serve, or the private config layout changed
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: does the process exist?
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
