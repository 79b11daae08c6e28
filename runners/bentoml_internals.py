"""Every use of BentoML's private parts (``bentoml._internal``) in one module, written for BentoML 1.4.

BentoML has no public API for these, and a minor release may move them: ``check_version`` stops the server at start,
naming this module and the installed version, when BentoML is not the series these were written and tested for
(requirements.txt pins it). What is here:

- ``own_metrics_dir``: a Prometheus multiprocess folder per server (``BentoMLContainer.prometheus_multiproc_dir``).
- ``release_request_timers``: BentoML's ``TimeoutMiddleware`` with its per-request timer released.
- ``configured_workers``: a service's ``workers`` as BentoML's configuration says (``BentoMLContainer.config``).
- ``stop_promptly``: the server process (circus's arbiter, ``bentoml._internal.utils.circus.Arbiter``) stops
  accepting at once on SIGTERM, gives its workers a bounded time, and exits without Python's finalization.
- ``bentoml_process``: which of BentoML's processes this is (its command line, one of its service workers, or
  neither), from what BentoML 1.4 itself puts there: the service module does at import only what BentoML gives no
  later hook for, and only in the process that needs it (README, "What importing service.py does").

Still elsewhere: runners/serving.py's ``_record_argument`` (``BentoMLContainer.bento_arguments``, the bento arguments
a build records).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import socket
import sys
import threading
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


def prepare_server(stop_timeout_s: float = 7.0) -> None:
    """In BentoML's command-line process, at the service's import (before `bentoml serve` reads the metrics folder and
    starts the workers; no later hook runs there): check the version, give the server its own metrics folder, and
    make its stop prompt (``stop_promptly``: the arbiter runs in this process)."""
    check_version()
    own_metrics_dir()
    stop_promptly(stop_timeout_s)


def prepare_worker() -> None:
    """In each of BentoML's workers, before it serves: check the version, release the per-request timers and keep
    the dependency clients off connections their server is closing."""
    check_version()
    release_request_timers()
    shorten_client_keepalive()


# uvicorn closes a kept-alive connection after 5 idle seconds (BentoML's default), while aiohttp's connector reuses an
# idle one for up to 15 s: a call that took a connection the encoder was closing failed ("Can not write request body",
# or a disconnect) and only the retry saved it (seen in the suite under load, issue 28). The API's sessions to its
# encoders therefore stop reusing a connection after this many idle seconds, well before the server closes it.
CLIENT_KEEPALIVE_S = 2.0


def shorten_client_keepalive(seconds: float = CLIENT_KEEPALIVE_S) -> None:
    """Make every dependency-client session BentoML creates from now on reuse idle connections for ``seconds`` at
    most (``_bentoml_impl.client.proxy2.SessionManager``, the session of both its async and sync clients)."""
    import aiohttp
    from _bentoml_impl.client.proxy2 import SessionManager

    if getattr(SessionManager, "_zss_keepalive_s", None) is not None:
        SessionManager._zss_keepalive_s = seconds  # type: ignore[attr-defined]
        return
    original = SessionManager._make_client

    def make_client(self: Any) -> aiohttp.ClientSession:
        session = original(self)
        connector = session.connector
        if isinstance(connector, aiohttp.TCPConnector):  # not the in-process (ASGI) or Unix-socket connectors
            # aiohttp takes keepalive_timeout only when the connector is built, which BentoML does not expose.
            connector._keepalive_timeout = SessionManager._zss_keepalive_s  # type: ignore[attr-defined]
        return session

    SessionManager._zss_keepalive_s = seconds  # type: ignore[attr-defined]
    SessionManager._make_client = make_client  # type: ignore[method-assign]


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


def is_serve_cli(argv: list[str] | None = None) -> bool:
    """Whether this process is `bentoml serve` itself (``bentoml serve ...`` or ``python -m bentoml serve ...``)."""
    argv = sys.argv if argv is None else argv
    return len(argv) > 1 and argv[1] == "serve" and "bentoml" in argv[0]


def stop_promptly(stop_timeout_s: float) -> None:
    """Make `bentoml serve` stop within about ``stop_timeout_s`` of SIGTERM, refusing new connections from the first
    moment (idempotent; nothing changes in a process that is not `bentoml serve`'s own).

    What BentoML 1.4 does (measured, BENCHMARKS.md "Hardening"): on SIGTERM circus's arbiter signals the workers, which
    exit in 1-1.4 s (runners/serving.py ``on_sigterm`` stops the deploy jobs), and then the arbiter itself took 3 s idle
    and 10-13 s on a loaded 2-core machine to exit: all of it Python's finalization (``gc_collect_main`` and ``free``
    over everything the service module imported: torch, transformers, open_clip), nothing left to do. Meanwhile the
    listening socket stayed open in the arbiter after the API worker had stopped accepting: a connection made then
    waited in its queue and was reset unread when the socket closed. And BentoML gives every worker 86,400 s
    (``graceful_timeout``) before circus kills it. So:

    - at the arbiter's stop, before the workers are signalled, its TCP listening sockets are shut down
      (``shutdown(SHUT_RD)``: on Linux a listening socket stops listening for every process holding it): a new
      connection is refused at once, cleanly; accepted connections, and the Unix sockets between the API worker and
      the encoders, go on, so requests in flight finish;
    - a worker still running ``stop_timeout_s`` after its SIGTERM is killed (circus's ``graceful_timeout``);
    - once circus has stopped every worker and closed its sockets, the process leaves with ``os._exit(0)`` after
      flushing its logs and streams, skipping the finalization that has nothing left to release.
    """
    from bentoml import serving
    from bentoml._internal.utils import circus as bentoml_circus

    arbiter = bentoml_circus.Arbiter
    if not getattr(arbiter.start, "_zss_exits", False):
        start, stop = arbiter.start, arbiter.stop

        def start_then_exit(self: Any, cb: Any = None) -> None:
            start(self, cb)  # returns once the arbiter has stopped its workers and closed its sockets
            if type(self) is arbiter and threading.current_thread() is threading.main_thread() and is_serve_cli():
                logging.shutdown()
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(0)

        def refuse_then_stop(self: Any) -> Any:
            stop_listening(self.sockets.values())
            return stop(self)

        start_then_exit._zss_exits = True  # type: ignore[attr-defined]
        arbiter.start = start_then_exit  # type: ignore[method-assign]
        arbiter.stop = refuse_then_stop  # type: ignore[method-assign]

    create = getattr(serving.create_watcher, "__wrapped__", serving.create_watcher)

    @functools.wraps(create)
    def bounded_watcher(*args: Any, **kwargs: Any) -> Any:
        watcher = create(*args, **kwargs)
        watcher.graceful_timeout = float(stop_timeout_s)
        return watcher

    serving.create_watcher = bounded_watcher  # type: ignore[assignment]


def stop_listening(sockets: Any) -> int:
    """Shut down the TCP listening sockets among ``sockets`` (new connections are refused; Unix sockets are left
    alone); how many."""
    done = 0
    for sock in sockets:
        if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            continue
        with contextlib.suppress(OSError):  # not listening yet, or already closed
            sock.shutdown(socket.SHUT_RD)
            done += 1
    return done


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
