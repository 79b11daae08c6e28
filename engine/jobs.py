"""Deploys as jobs (issue 18): every deploy runs as a job of this API worker, whether its client waits or not.

A client that waits (``/deploy_classifier`` as ever) awaits its job; one that asks ``?wait=false`` gets the job's id
at once and polls ``/jobs/{id}`` for its state and progress (texts looked up of the total; the embedder commits them
to the cache chunk by chunk). A job outlives its request: a waiting client that goes away leaves the deploy to
finish as a job (its deployment is registered, the job shows its id), not cancelled, because the encoding done is
committed anyway and a retry of the same deploy then costs only the rest. ``DELETE /jobs/{id}`` cancels one (issue
32): its encoding stops before its next encoder call.

Jobs outlive their process too (issue 32): with a job store (both registries are one, cache/interfaces.py
``JobStore``) each job's record, its deploy body included, is written when it starts, as it progresses (a heartbeat)
and when it ends. A server that starts takes over the running jobs of dead processes (this machine's, by process id;
another machine's once their heartbeat is older than ``LEASE_S``) and runs them again from their body: the texts
already committed to the embedding cache are hits, so it costs only the rest. A job stopped by its stopping server
(SIGTERM) is left running in the store for the next start; status stays readable from the store after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cache.interfaces import JobStore
from engine.deployments import DeployOutcome
from engine.embedder import Cancelled, Progress
from engine.tenancy import Tenant
from errors import ZssError

log = logging.getLogger(__name__)

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
STOPPING = "The server is stopping."
HEARTBEAT_S = 2.0  # the least time between two progress writes of one job
LEASE_S = 300.0  # another machine's running job whose record is older than this is taken over at start

Run = Callable[[Progress], Awaitable[DeployOutcome]]


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead(owner: str, updated_at: float) -> bool:
    """Whether the process that ran a job is gone: on this machine by its pid; elsewhere by its heartbeat."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return time.time() - updated_at > LEASE_S
    if int(pid) == os.getpid():
        return True  # a record of this process that it does not run: a previous process with the same pid
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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
    admin: bool = False  # the caller's: a resumed job deploys as it would have
    body: dict[str, Any] | None = field(default=None, repr=False)  # the deploy body, to resume from

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

    def record(self, owner: str) -> dict[str, Any]:
        """What the job store keeps."""
        return {
            **self.report(),
            "tenant": self.tenant,
            "admin": self.admin,
            "status_code": self.status_code,
            "owner": owner,
            "body": self.body,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Job:
        job = cls(rec["job_id"], rec["kind"], rec["tenant"], admin=bool(rec.get("admin")), body=rec.get("body"))
        job.state, job.deployed_id, job.message = rec["state"], rec.get("deployed_id"), rec.get("message")
        job.status_code, job.created_at, job.finished_at = (
            rec.get("status_code"),
            rec["created_at"],
            rec.get("finished_at"),
        )
        job.progress.done, job.progress.total = int(rec.get("done") or 0), int(rec.get("total") or 0)
        return job


class Jobs:
    """The jobs of this process, the newest ``keep`` finished ones kept for their reports; with a ``store``, every
    job's record there too."""

    def __init__(self, keep: int = 1000, per_tenant: int = 0, store: JobStore | None = None) -> None:
        self.keep = keep
        self.per_tenant = per_tenant  # jobs running at once per tenant (0: no limit)
        self.store = store
        self.owner = this_process()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self.stopping = False

    def _too_many(self) -> ZssError:
        exc = ZssError(
            f"Too many deploy jobs in flight for this tenant: {self.per_tenant} (ZSS_DEPLOY_MAX_JOBS_PER_TENANT); "
            "wait for one to finish or cancel one (DELETE /jobs/{job_id}).",
            429,
        )
        exc.headers = {"Retry-After": "5"}
        return exc

    async def begin(self, kind: str, caller: Tenant, run: Run, body: dict[str, Any] | None = None) -> Job:
        """A new job, returned once its record is in the store (committed: a server killed the next moment resumes
        it at its next start, so a 202 for it never names a job that is lost); 429 when the caller's tenant already
        runs ``per_tenant`` jobs in every process sharing the store (the API workers of one registry file, the
        replicas of one Redis), 503 once the server is stopping or when the store does not answer. Without a
        store, as :meth:`start`."""
        if self.stopping:
            raise ZssError(STOPPING, 503)
        if self.store is None:
            return self.start(kind, caller, run, body)
        job = Job(uuid.uuid4().hex, kind, caller.name, admin=caller.admin, body=body)
        try:
            admitted = await asyncio.to_thread(self.store.begin_job, job.record(self.owner), self.per_tenant, LEASE_S)
        except Exception as exc:
            raise ZssError(f"The job store is unavailable ({exc}); retry later.", 503) from exc
        if not admitted:
            raise self._too_many()
        if self.stopping:  # SIGTERM while the record was written: its client gets a 503, so the job ends here too
            job.state, job.message, job.status_code, job.finished_at = FAILED, STOPPING, 503, time.time()
            await asyncio.shield(asyncio.to_thread(self.save, job))
            raise ZssError(STOPPING, 503)
        return self.start(kind, caller, run, job=job, recorded=True)

    def start(
        self,
        kind: str,
        caller: Tenant,
        run: Run,
        body: dict[str, Any] | None = None,
        job: Job | None = None,
        recorded: bool = False,
    ) -> Job:
        """A job running ``run(progress)`` on the event loop (it needs one: call from a coroutine); 429 when the
        caller's tenant already runs ``per_tenant`` jobs in this process, 503 once the server is stopping. ``job``: a
        stored job taken over (resumed), or one :meth:`begin` admitted (``recorded``), which no limit refuses here.
        Its record is written when it first runs (unless ``recorded``): deploys go through :meth:`begin`."""
        if self.stopping:
            raise ZssError(STOPPING, 503)
        if job is None and self.per_tenant and self.running(caller.name) >= self.per_tenant:
            raise self._too_many()
        if job is None:
            job = Job(uuid.uuid4().hex, kind, caller.name, admin=caller.admin, body=body)
        job.task = asyncio.get_running_loop().create_task(self._run(job, run, recorded))
        # A job nobody waits for keeps its error in its report; retrieving it here keeps asyncio from logging it.
        job.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._jobs[job.job_id] = job
        self._trim()
        return job

    def save(self, job: Job) -> None:
        """The job's record to the store (blocking); a store that fails costs the record, never the job."""
        if self.store is None:
            return
        try:
            self.store.put_job(job.record(self.owner))
        except Exception as exc:  # Redis down: the job goes on; its next write may succeed
            log.warning("deploy job %s: its record was not saved (%s)", job.job_id, exc)

    def _heartbeat(self, job: Job) -> Callable[[], None]:
        last = [0.0]

        def beat() -> None:  # from the embedding thread, between committed chunks
            if time.monotonic() - last[0] >= HEARTBEAT_S:
                last[0] = time.monotonic()
                self.save(job)
                if self._cancel_requested(job.job_id):  # DELETE /jobs/{id} answered by another process
                    job.progress.cancel()

        return beat

    async def _run(self, job: Job, run: Run, recorded: bool = False) -> DeployOutcome:
        if self.store is not None:
            if not recorded:
                await asyncio.to_thread(self.save, job)
            job.progress.on_advance = self._heartbeat(job)
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
        else:
            job.state, job.deployed_id, job.message = DONE, out.deployed_id, out.message
            return out
        finally:
            job.finished_at = time.time()
            # A job its stopping server cut short stays running in the store: the next start resumes it.
            if self.store is not None and not (self.stopping and job.state != DONE):
                await asyncio.shield(asyncio.to_thread(self.save, job))

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.state != RUNNING]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job.job_id]

    def _stored(self, job_id: str) -> Job | None:
        if self.store is None:
            return None
        try:
            rec = self.store.get_job(job_id)
        except Exception as exc:
            raise ZssError(f"The job store is unavailable ({exc}); retry later.", 503) from exc
        return None if rec is None else Job.from_record(rec)

    def get(self, job_id: str, caller: Tenant) -> Job | None:
        """The job, if the caller's tenant started it (an admin sees all); another tenant's is an unknown id. A job
        of another process (before a restart, another replica) is read from the store (blocking then)."""
        job = self._jobs.get(job_id) or self._stored(job_id)
        if job is None or (not caller.admin and job.tenant != caller.name):
            return None
        return job

    def running(self, tenant: str) -> int:
        return sum(1 for j in self._jobs.values() if j.state == RUNNING and j.tenant == tenant)

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return self.store is not None and self.store.cancel_requested(job_id)
        except Exception as exc:  # the store down: the job goes on; a later heartbeat looks again
            log.warning("deploy job %s: its cancel requests were not read (%s)", job_id, exc)
            return False

    async def cancel(self, job: Job, wait_s: float = 10.0) -> Job:
        """Ask a running job to stop (its encoding stops before its next encoder call) and wait up to ``wait_s`` for
        it to end; 409 for a job that has already ended. A job another process runs (another API worker, another
        replica) is asked through the store: its process sees the request at its next heartbeat (after the chunk
        it is encoding) and stops; the answer is its record once it has ended, or as it stands after ``wait_s``."""
        if job.state != RUNNING:
            raise ZssError(f"Job already {job.state}.", 409)
        if job.task is not None:
            job.progress.cancel()
            await asyncio.wait([job.task], timeout=wait_s)
            return job
        if self.store is None:
            raise ZssError("Job runs in another server process; cancel it there.", 409)
        try:
            await asyncio.to_thread(self.store.request_cancel, job.job_id)
        except Exception as exc:
            raise ZssError(f"The job store is unavailable ({exc}); retry later.", 503) from exc
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            now = await asyncio.to_thread(self._stored, job.job_id)
            if now is not None:
                job = now
                if job.state != RUNNING:
                    break
        return job

    def stop(self) -> None:
        """The server is stopping: refuse new jobs and stop the running ones' encoding before their next encoder call,
        so the worker threads that run them let the process exit."""
        self.stopping = True
        for job in self._jobs.values():
            if job.state == RUNNING:
                job.progress.cancel(STOPPING, 503)

    def list(self, caller: Tenant) -> list[Job]:
        """This process's jobs and the store's others (blocking with a store), oldest first."""
        jobs = {j.job_id: j for j in self._jobs.values() if caller.admin or j.tenant == caller.name}
        if self.store is not None:
            try:
                for rec in self.store.list_jobs(caller.view):
                    jobs.setdefault(rec["job_id"], Job.from_record(rec))
            except Exception as exc:
                log.warning("the job store is unavailable (%s): this process's jobs only", exc)
        return sorted(jobs.values(), key=lambda j: j.created_at)

    def abandoned(self) -> list[dict[str, Any]]:
        """Running jobs whose process is gone, claimed by this one (blocking)."""
        if self.store is None:
            return []
        out = []
        for rec in self.store.list_jobs():
            if rec["state"] == RUNNING and rec["job_id"] not in self._jobs and _dead(rec["owner"], rec["updated_at"]):
                if self.store.claim_job(rec["job_id"], rec["owner"], self.owner):
                    out.append(rec)
        return out

    async def wait(self, job: Job) -> DeployOutcome:
        """The job's outcome (its error re-raised). Shielded: a waiting request that is cancelled (its client went
        away) does not cancel the job."""
        if job.task is None:
            raise RuntimeError(f"job {job.job_id} was not started")
        return await asyncio.shield(job.task)
