"""Deploys as jobs (issue 18): every deploy runs as a job of this API worker, whether its client waits or not.

A client that waits (``/deploy_classifier`` as ever) awaits its job; one that asks ``?wait=false`` gets the job's id
at once and polls ``/jobs/{id}`` for its state and progress (texts looked up of the total; the embedder commits them
to the cache chunk by chunk). A job outlives its request: a waiting client that goes away leaves the deploy to
finish as a job (its deployment is registered, the job shows its id), not cancelled, because the encoding done is
committed anyway and a retry of the same deploy then costs only the rest.

Jobs live in the memory of the API worker that runs them (BentoML's default of one API worker; with several, poll
the worker that answered, or use the deployment list): a restart forgets them, but not their committed work.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.deployments import DeployOutcome
from engine.embedder import Cancelled, Progress
from engine.tenancy import Tenant
from errors import ZssError

log = logging.getLogger(__name__)

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
STOPPING = "The server is stopping."


@dataclass
class Job:
    job_id: str
    kind: str
    tenant: str
    progress: Progress = field(default_factory=Progress)
    state: str = RUNNING
    deployed_id: str | None = None
    message: str | None = None
    status_code: int | None = None  # of a failed job: what the waiting request would have answered
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    task: asyncio.Task[DeployOutcome] | None = field(default=None, repr=False)

    def report(self) -> dict[str, Any]:
        done, total = self.progress.snapshot()
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "state": self.state,
            "done": done,
            "total": total,
            "deployed_id": self.deployed_id,
            "message": self.message,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


class Jobs:
    """The jobs of this process, the newest ``keep`` finished ones kept for their reports."""

    def __init__(self, keep: int = 1000, per_tenant: int = 0) -> None:
        self.keep = keep
        self.per_tenant = per_tenant  # jobs running at once per tenant (0: no limit)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self.stopping = False

    def start(self, kind: str, caller: Tenant, run: Callable[[Progress], Awaitable[DeployOutcome]]) -> Job:
        """A job running ``run(progress)`` on the event loop (it needs one: call from a coroutine); 429 when the
        caller's tenant already runs ``per_tenant`` jobs, 503 once the server is stopping."""
        if self.stopping:
            raise ZssError(STOPPING, 503)
        if self.per_tenant and self.running(caller.name) >= self.per_tenant:
            exc = ZssError(
                f"Too many deploy jobs in flight for this tenant: {self.per_tenant} (ZSS_DEPLOY_MAX_JOBS_PER_TENANT); "
                "wait for one to finish or cancel one (DELETE /jobs/{job_id}).",
                429,
            )
            exc.headers = {"Retry-After": "5"}
            raise exc
        job = Job(uuid.uuid4().hex, kind, caller.name)
        job.task = asyncio.get_running_loop().create_task(self._run(job, run))
        # A job nobody waits for keeps its error in its report; retrieving it here keeps asyncio from logging it.
        job.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._jobs[job.job_id] = job
        self._trim()
        return job

    async def _run(self, job: Job, run: Callable[[Progress], Awaitable[DeployOutcome]]) -> DeployOutcome:
        try:
            out = await run(job.progress)
        except Cancelled as exc:
            job.state, job.message, job.status_code = CANCELLED, exc.message, exc.status_code
            raise
        except ZssError as exc:
            job.state, job.message, job.status_code = FAILED, exc.message, exc.status_code
            raise
        except BaseException as exc:
            job.state, job.message, job.status_code = FAILED, "Internal server error.", 500
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("deploy job %s failed", job.job_id)
            raise
        finally:
            job.finished_at = time.time()
        job.state, job.deployed_id, job.message = DONE, out.deployed_id, out.message
        return out

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.state != RUNNING]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job.job_id]

    def get(self, job_id: str, caller: Tenant) -> Job | None:
        """The job, if the caller's tenant started it (an admin sees all); another tenant's is an unknown id."""
        job = self._jobs.get(job_id)
        if job is None or (not caller.admin and job.tenant != caller.name):
            return None
        return job

    def running(self, tenant: str) -> int:
        return sum(1 for j in self._jobs.values() if j.state == RUNNING and j.tenant == tenant)

    async def cancel(self, job: Job, wait_s: float = 10.0) -> Job:
        """Ask a running job to stop (its encoding stops before its next encoder call) and wait up to ``wait_s`` for
        it to end; 409 for a job that has already ended."""
        if job.state != RUNNING or job.task is None:
            raise ZssError(f"Job already {job.state}.", 409)
        job.progress.cancel()
        await asyncio.wait([job.task], timeout=wait_s)
        return job

    def stop(self) -> None:
        """The server is stopping: refuse new jobs and stop the running ones' encoding before their next encoder call,
        so the worker threads that run them let the process exit."""
        self.stopping = True
        for job in self._jobs.values():
            if job.state == RUNNING:
                job.progress.cancel(STOPPING, 503)

    def list(self, caller: Tenant) -> list[Job]:
        return [j for j in self._jobs.values() if caller.admin or j.tenant == caller.name]

    async def wait(self, job: Job) -> DeployOutcome:
        """The job's outcome (its error re-raised). Shielded: a waiting request that is cancelled (its client went
        away) does not cancel the job."""
        if job.task is None:
            raise RuntimeError(f"job {job.job_id} was not started")
        return await asyncio.shield(job.task)
