"""ZeroShot Server's BentoML API service: DirectAI-compatible routes plus embedding routes, over the engine.

Each route parses the request (api/), makes one engine call (engine/) and converts the result (api/convert.py).
The encoders are separate BentoML services (runners/), composed with ``bentoml.depends``; the engine reaches them
through its remote encoder interface. ``build_app()`` builds the routes on their own, so tests can run them
in-process against an engine with fake encoders; the service builds them when it starts (:data:`routes`).

Importing this module declares the service and changes nothing else: no app is built, nothing of BentoML or uvicorn
is patched, the command line is not read. The few things BentoML 1.4 runs no project code for later are done at
import only in the BentoML process that needs them (:func:`_prepare_process`; README, "What importing service.py
does").

API keys and tenants are the HTTP edge's (api/auth.py): a middleware of the routes' app identifies the caller, and
each route that touches deployments hands that caller to the engine, whose registry shows it its tenant's only.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path as FsPath
from typing import Annotated, Any

import bentoml
import torch
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from api import auth, convert, errors, kserve, openai_compat
from api.arrival import Arrival, arrived
from api.collections import build_router as collection_routes
from api.connections import guard_connections
from api.headers import SecurityHeaders
from api.inputs import image_sources
from api.openapi import AUTH_ERRORS, CANCELLED, ERRORS, image_body
from api.schemas import (
    ClassifyResult,
    DeployClassifierRequest,
    DeployDetectorRequest,
    DeploymentList,
    DeployResponse,
    Detection,
    EmbeddingsResponse,
    EmbedTextRequest,
    ErrorResponse,
    JobAccepted,
    JobList,
    JobStatus,
    PhotofieldImageResponse,
    PhotofieldTextRequest,
    PhotofieldTextResponse,
)
from cache.stores import open_stores
from engine.encoders import LocalDetector, RemoteClipImage, RemoteClipText, RemoteDetector
from engine.jobs import Job
from engine.pipelines import Engine, in_thread
from engine.tenancy import Tenant
from errors import ZssError
from runners.bentoml_internals import bentoml_process, prepare_server, prepare_worker
from runners.clip_service import ClipImageEncoder, ClipTextEncoder
from runners.heap import freeze_startup_heap
from runners.lifeline import die_with_parent
from runners.owl_service import OwlDetectorEncoder
from runners.serving import detector_declared, on_sigterm, record_build_settings, service_settings
from settings import LimitedLog, Settings, configure_logging

log = logging.getLogger("zss.api")
_unready_log = LimitedLog(log)


def _engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(_engine)]
CallerDep = Annotated[Tenant, Depends(auth.caller)]
UI_DIR = FsPath(__file__).resolve().parent / "ui"
DeployedId = Annotated[str, Query(max_length=128)]
Wait = Annotated[
    bool,
    Query(description="false: answer 202 with a job id at once; the deploy goes on as a job (GET /jobs/{job_id})"),
]
JOB_ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"model": JobAccepted, "description": "Deploy started as a job"},
    **CANCELLED,
}


def _accepted(job: Job) -> JSONResponse:
    body = JobAccepted(job_id=job.job_id, state=job.state, status_url=f"/jobs/{job.job_id}")
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": body.status_url})


async def _deploy(eng: Engine, body: DeployClassifierRequest | DeployDetectorRequest, who: Tenant, wait: bool) -> Any:
    """Both deploy routes: wait for the job (DirectAI's answer), or answer 202 with the job at once."""
    if not wait:
        return _accepted(await eng.start_deploy(body, caller=who))
    out = await eng.deploy(body, caller=who)
    return DeployResponse(deployed_id=out.deployed_id, message=out.message)


def build_app(engine: Engine | None = None, settings: Settings | None = None) -> FastAPI:
    """The routes; the engine and settings (and the API keys they name) are set here (tests) or by the service when
    it starts."""
    app = FastAPI(
        title="ZeroShot Server",
        description="Zero-shot image classification and detection defined in words, DirectAI-compatible. With API "
        "keys (ZSS_API_KEYS), every route needs one: 'Authorization: Bearer <key>' (the Authorize button).",
        version="0.1.0",
        responses={400: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, **AUTH_ERRORS},
        dependencies=auth.DOCUMENTED,
    )
    app.state.engine = engine
    app.state.settings = settings if settings is not None else (engine.settings if engine else None)
    app.state.gate = auth.Gate.from_settings(app.state.settings) if app.state.settings is not None else None
    errors.install(app, auth.ApiKeys)
    app.add_middleware(Arrival)  # outermost: the image latency bound counts from here (the service stamps earlier)

    @app.post("/deploy_classifier", response_model=DeployResponse, responses={**ERRORS, **JOB_ACCEPTED})
    async def deploy_classifier(
        body: DeployClassifierRequest, eng: EngineDep, who: CallerDep, wait: Wait = True
    ) -> Any:
        """Deploy (or update) a classifier defined by example texts and/or images (``{"image": base64}`` or
        ``{"url": ...}``), optionally with an open set; examples are embedded now, once."""
        return await _deploy(eng, body, who, wait)

    @app.post(
        "/classify",
        response_model=ClassifyResult | list[ClassifyResult],
        response_model_exclude_none=True,  # "rejected" only where the deployment has an open set
        responses=ERRORS,
        openapi_extra=image_body("data"),
    )
    async def classify(request: Request, deployed_id: DeployedId, eng: EngineDep, who: CallerDep) -> Any:
        """Classify one image (an object back) or several (a list back), multipart field ``data``."""
        results = await eng.classify(deployed_id, await image_sources(request), caller=who, arrived=arrived(request))
        return convert.classifications(results)

    @app.post("/deploy_detector", response_model=DeployResponse, responses={**ERRORS, **JOB_ACCEPTED})
    async def deploy_detector(body: DeployDetectorRequest, eng: EngineDep, who: CallerDep, wait: Wait = True) -> Any:
        """Deploy (or update) a detector defined by example texts and/or images (OWL image queries), thresholds and
        NMS settings."""
        return await _deploy(eng, body, who, wait)

    @app.post("/detect", response_model=list[list[Detection]], responses=ERRORS, openapi_extra=image_body("data"))
    async def detect(request: Request, deployed_id: DeployedId, eng: EngineDep, who: CallerDep) -> Any:
        """Detect the deployed classes: one list of {"tlbr", "score", "class"} per image, best first."""
        sources = await image_sources(request)
        return convert.detections(await eng.detect(deployed_id, sources, caller=who, arrived=arrived(request)))

    @app.get("/model_config", responses=ERRORS)
    async def model_config(deployed_id: DeployedId, eng: EngineDep, who: CallerDep) -> dict[str, Any]:
        """The deployed body as it was deployed (defaults filled in), plus its ``deployed_id``."""
        return await eng.model_config(deployed_id, caller=who)

    @app.get("/deployments", response_model=DeploymentList)
    async def list_deployments(eng: EngineDep, who: CallerDep) -> dict[str, Any]:
        """The caller's tenant's deployments (an admin key's: every tenant's) with kind, class count and timestamps."""
        return {"deployments": [convert.deployment_summary(d) for d in await eng.list_deployments(caller=who)]}

    @app.delete("/deployments/{deployed_id}", response_model=DeployResponse, responses=ERRORS)
    async def delete_deployment(
        deployed_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")], eng: EngineDep, who: CallerDep
    ) -> DeployResponse:
        """Delete a deployment; its cached example embeddings stay (other deployments may share them)."""
        await eng.delete(deployed_id, caller=who)
        return DeployResponse(deployed_id=deployed_id, message="Model deleted.")

    @app.get("/jobs/{job_id}", response_model=JobStatus, responses=ERRORS)
    async def job_status(job_id: Annotated[str, Path(max_length=64)], eng: EngineDep, who: CallerDep) -> Any:
        """A deploy job's state and progress (the caller's tenant's only; kept in the registry across restarts)."""
        job = await in_thread(eng.jobs.get, job_id, who)
        if job is None:
            raise ZssError("Job not found.", 404)
        return job.report()

    @app.delete("/jobs/{job_id}", response_model=JobStatus, responses={**ERRORS, **CANCELLED})
    async def cancel_job(job_id: Annotated[str, Path(max_length=64)], eng: EngineDep, who: CallerDep) -> Any:
        """Cancel a running deploy job (its owner's tenant or an admin): its encoding stops before its next encoder
        call (a job another API worker or replica runs: after the chunk it is encoding); the texts already encoded
        stay cached. Answers the job (``cancelled`` once it has stopped); 409 if it had already ended."""
        job = await in_thread(eng.jobs.get, job_id, who)
        if job is None:
            raise ZssError("Job not found.", 404)
        return (await eng.jobs.cancel(job)).report()

    @app.get("/jobs", response_model=JobList)
    async def list_jobs(eng: EngineDep, who: CallerDep) -> dict[str, Any]:
        """The caller's tenant's deploy jobs, running and recently finished."""
        return {"jobs": [j.report() for j in await in_thread(eng.jobs.list, who)]}

    @app.post("/embed_text", response_model=EmbeddingsResponse, responses=ERRORS)
    async def embed_text(body: EmbedTextRequest, eng: EngineDep) -> dict[str, Any]:
        """Text embeddings exactly as classifiers use them (cached; templates averaged if augment_examples)."""
        return {"embeddings": (await eng.embed_texts(body.texts, body.augment_examples)).tolist()}

    @app.post("/embed_image", response_model=EmbeddingsResponse, responses=ERRORS, openapi_extra=image_body("data"))
    async def embed_image(request: Request, eng: EngineDep) -> dict[str, Any]:
        """Image embeddings exactly as classifiers use them; multipart field ``data``, one or more files."""
        sources = await image_sources(request)
        return {"embeddings": (await eng.embed_images(sources, arrived=arrived(request))).tolist()}

    @app.post("/text-embeddings", response_model=PhotofieldTextResponse, responses=ERRORS)
    async def photofield_text_embeddings(body: PhotofieldTextRequest, eng: EngineDep) -> dict[str, Any]:
        """photofield-compatible text embeddings (float16 little-endian base64 + inverse norm as float16 bits)."""
        return convert.photofield_texts(body.texts, await eng.embed_texts(body.texts, False))

    @app.post(
        "/image-embeddings", response_model=PhotofieldImageResponse, responses=ERRORS, openapi_extra=image_body(None)
    )
    async def photofield_image_embeddings(request: Request, eng: EngineDep) -> dict[str, Any]:
        """photofield-compatible image embeddings; multipart files under any field names."""
        sources = await image_sources(request, field=None)
        return convert.photofield_images(sources, await eng.embed_images(sources, arrived=arrived(request)))

    @app.get("/healthz_models")
    async def healthz_models(eng: EngineDep) -> dict[str, Any]:
        """The loaded models' ids and preprocessing (also warms the encoders up)."""
        return await in_thread(eng.models_info)

    @app.get("/ui/settings.json", include_in_schema=False)
    async def ui_settings(request: Request, eng: EngineDep) -> dict[str, Any]:
        """What the web page needs to know about this server (no secrets): URL fetching and the detector."""
        s = request.app.state.settings
        try:  # the detector's info is cached once it has answered; an absent detector answers 503 with the reason
            detector = bool(s and s.detector_enabled) and bool(await in_thread(eng.detector_info))
        except ZssError:
            detector = False
        return {"allow_url_fetch": bool(s and s.allow_url_fetch), "detector_enabled": detector}

    openai_compat.install(app)  # POST /v1/embeddings, GET /v1/models (issue 30)
    kserve.install(app)  # the KServe v2 / Triton protocol under /v2 (issue 30)
    app.include_router(collection_routes())  # /collections (api/collections.py)

    # The web page (ui/: static HTML + JS, no build step) at /ui/.
    if UI_DIR.is_dir():
        app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    return app


class Routes(Starlette):
    """The routes' app as BentoML mounts it: an empty shell that hands every request to ``build_app()``'s FastAPI app,
    built when the service starts in its API worker (``ZeroShot.__init__``), not at import. BentoML 1.4 takes the
    mounted app when the class is declared, and starts the service (``__init__``) before it serves any request.

    A Starlette because BentoML's mount matches a request against a Starlette app's ``routes`` (here the built app's)
    and leaves an unknown path to BentoML's own 404; any other ASGI app would take every path."""

    def __init__(self) -> None:
        super().__init__()
        self._app: FastAPI | None = None

    @property
    def routes(self) -> list[BaseRoute]:
        return self.app.routes

    @property
    def built(self) -> bool:
        return self._app is not None

    @property
    def app(self) -> FastAPI:
        """The FastAPI app, built on first use."""
        if self._app is None:
            self._app = build_app()
        return self._app

    def app_state(self, name: str) -> Any:
        """``app.state.<name>`` of the built app; None before it is built."""
        return getattr(self._app.state, name, None) if self._app is not None else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


routes = Routes()

# The one read of settings at import in this module: BentoML builds the service graph from the class attributes, so
# a detector that is off (ZSS_DETECTOR_MODEL=none) is not declared at all: no process, no memory.
_BUILT_WITH = service_settings()
_DETECTOR_ON = detector_declared(_BUILT_WITH)


def _prepare_process() -> None:
    """What BentoML 1.4 runs no project code for after importing this module, done at import in the one BentoML
    process that needs it (runners/bentoml_internals.py ``bentoml_process``); imported anywhere else, nothing."""
    where = bentoml_process()
    if where == "cli":
        # `bentoml serve` reads the Prometheus folder between importing this module and starting the workers: a
        # folder per server (runners/bentoml_internals.py). `bentoml build` keeps the settings recorded here in the
        # bento, so it serves as built with no ZSS_* variable (runners/serving.py).
        prepare_server(_BUILT_WITH.stop_timeout_s)  # with the arbiter's prompt stop (runners/bentoml_internals.py)
        record_build_settings(_BUILT_WITH)
    elif where == "worker":
        # A worker builds its uvicorn configuration right after importing this module, before the service starts:
        # deadlines for request heads and bodies, 431 for oversized heads (api/connections.py; BentoML 1.4 exposes
        # neither). The per-request timers' release, dependency sessions that drop idle connections before their
        # server does (runners/bentoml_internals.py), and the watch that ends the worker with the server, even when it
        # is killed (runners/lifeline.py), as early as the worker runs project code.
        prepare_worker()
        guard_connections(service_settings)
        die_with_parent()


_prepare_process()
DETECTOR_OFF = "the detector is disabled on this server (ZSS_DETECTOR_MODEL=none, or a bento built without one)"


def _listening_host() -> str | None:
    """The address this API worker serves on: BentoML hands the worker its listening socket as ``--fd N``."""
    try:
        fd = int(sys.argv[sys.argv.index("--fd") + 1])
        with socket.socket(fileno=os.dup(fd)) as sock:
            name = sock.getsockname()
        return str(name[0]) if isinstance(name, tuple) else None
    except (ValueError, IndexError, OSError):
        return None


@bentoml.asgi_app(routes, path="/")
@bentoml.service(name="zeroshot", workers=1, threads=32, traffic={"timeout": 600})
class ZeroShot:
    image_encoder = bentoml.depends(ClipImageEncoder)
    text_encoder = bentoml.depends(ClipTextEncoder)
    if _DETECTOR_ON:
        detector = bentoml.depends(OwlDetectorEncoder)

    def __init__(self) -> None:
        # Scoring here is small; more threads only spin against the encoders for the same cores.
        torch.set_num_threads(1)
        settings = service_settings()  # the environment over the bento's arguments
        configure_logging(settings)
        # An unusable ZSS_API_KEYS stops the start: never serve open by mistake.
        gate = auth.Gate.from_settings(settings)
        log.info("%s", gate.describe())
        if gate.keys is None and (warning := auth.open_server_warning(_listening_host())):
            log.warning("%s", warning)
        app = routes.app  # built here, when the service starts
        app.state.settings = settings
        app.state.gate = gate
        registry, vectors = open_stores(settings)  # with ZSS_REDIS_URL: shared by the replicas through Redis
        if settings.redis_url:
            log.info("registry and example vectors shared through Redis (ZSS_REDIS_URL)")
        app.state.engine = Engine(
            settings,
            image_encoder=RemoteClipImage(self.image_encoder),
            text_encoder=RemoteClipText(self.text_encoder),
            detector=RemoteDetector(self.detector) if _DETECTOR_ON else LocalDetector(None, DETECTOR_OFF),
            registry=registry,
            cache=vectors,
        )
        # Full collections walked the whole start-up heap with the event loop stopped: 0.3-0.5 s pauses in every
        # request in flight (runners/heap.py). Before any thread of ours starts: what they make is not start-up heap.
        freeze_startup_heap()
        app.state.engine.start_warm_up()  # readiness waits for it: a deploy's chunks never meet the training waits
        on_sigterm(app.state.engine.jobs.stop)  # running deploy jobs stop encoding: the worker can exit in time
        if resumed := app.state.engine.resume_jobs():  # deploy jobs a killed or stopped server left unfinished
            log.info("resumed %d unfinished deploy jobs", resumed)

    def __is_ready__(self) -> bool:
        """/readyz: not ready while a shared store (Redis) does not answer; the log says why (BentoML's 503 body
        does not)."""
        reason = routes.app.state.engine.unready()
        if reason is not None:
            _unready_log.warning("not ready: %s", reason)
        return reason is None


# First of the service's middlewares: the time a request arrived, from which its image latency bound counts.
ZeroShot.add_asgi_middleware(Arrival)
# nosniff and frame headers on every answer, a CSP for /ui, no redirect to the request's Host (api/headers.py).
ZeroShot.add_asgi_middleware(SecurityHeaders)
# Outermost of the others: an exception out of BentoML's own routes (/readyz while a dependency is
# still starting) is answered, not left to hang in BentoML's TimeoutMiddleware (issue 18).
ZeroShot.add_asgi_middleware(errors.ServiceCatchAll)
# /metrics is BentoML's own route, outside the routes' app: keyed here when ZSS_METRICS_REQUIRE_KEY is set.
ZeroShot.add_asgi_middleware(auth.MetricsGuard, gate=lambda: routes.app_state("gate"))
