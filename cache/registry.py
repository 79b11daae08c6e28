"""The deployment registry: deployed classifiers and detectors, kept in a SQLite file.

Every API worker reads the same file, so a deployment made through one worker is served by all of them; the
``version`` column lets a worker notice that a deployment it compiled has since been updated.

Every deployment belongs to a tenant (the ``tenant`` column). Reads take an optional ``tenant``: given, a deployment of
another tenant is exactly as absent as an unknown id; ``None`` sees every tenant's (an admin). A file written before
tenants existed is migrated in place when it is opened: its rows belong to :data:`DEFAULT_TENANT`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.sqlite_files import open_checked

log = logging.getLogger(__name__)

# The tenant of deployments made while the server had no API keys, and of rows written before tenants existed.
DEFAULT_TENANT = "default"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    tenant TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}'
);
"""
# Deploy jobs (issue 32): the record (JSON: state, progress, the body to resume from) of each job, kept so that a job
# outlives a restart; ``owner`` is the process running it (engine/jobs.py), ``updated_at`` its last heartbeat.
_JOBS = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    record TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS job_cancels (id TEXT PRIMARY KEY, at REAL NOT NULL);
"""
# Finished jobs kept for their reports (the newest); running ones are always kept.
KEEP_JOBS = 1000
_INDEX = "CREATE INDEX IF NOT EXISTS deployments_by_tenant ON deployments (tenant, created_at)"
_COLUMNS = "id, kind, config, version, created_at, updated_at, tenant"


class OtherTenant(Exception):
    """``put`` on an id that another tenant owns: a store never hands a deployment from one tenant to another."""


@dataclass(frozen=True)
class Deployment:
    id: str
    kind: str  # "classifier" or "detector"
    config: dict[str, Any]
    version: int
    created_at: float
    updated_at: float
    tenant: str = DEFAULT_TENANT


def _row(r: tuple[Any, ...]) -> Deployment:
    return Deployment(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6])


def _owned(tenant: str | None) -> tuple[str, tuple[str, ...]]:
    """The WHERE clause (and its arguments) that keeps one tenant's rows, or every row for ``None``."""
    return (" AND tenant = ?", (tenant,)) if tenant is not None else ("", ())


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        # Deployments are user data: an unreadable file is kept aside for recovery, never deleted.
        aside = self.path.with_name(f"{self.path.stem}.corrupt-{int(time.time())}{self.path.suffix}")
        return open_checked(
            self.path, lambda _p: self._connect(), "SELECT count(*) FROM deployments", aside, "registry"
        )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        db.executescript(_JOBS)
        self._migrate(db)
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Add the tenant column to a file written before tenants existed (its rows go to DEFAULT_TENANT). Several
        workers may open the file at once: the change is checked again inside its write transaction."""

        def has_tenant() -> bool:
            return "tenant" in {r[1] for r in db.execute("PRAGMA table_info(deployments)")}

        if not has_tenant():
            db.execute("BEGIN IMMEDIATE")
            try:
                if not has_tenant():
                    db.execute(f"ALTER TABLE deployments ADD COLUMN tenant TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}'")
                    log.info("registry %s: added the tenant column (old rows: %r)", self.path, DEFAULT_TENANT)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        db.execute(_INDEX)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def put(
        self, deployed_id: str, kind: str, config: dict[str, Any], tenant: str = DEFAULT_TENANT
    ) -> tuple[Deployment, bool]:
        """Insert a deployment owned by ``tenant``, or update the one with that id if ``tenant`` owns it; returns it
        and whether it existed before. An id another tenant owns raises :class:`OtherTenant` and changes nothing."""
        now = time.time()
        body = json.dumps(config, ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT version, created_at, tenant FROM deployments WHERE id = ?", (deployed_id,)
                )
                prev = row.fetchone()
                if prev is not None and prev[2] != tenant:
                    raise OtherTenant(deployed_id)
                version = (prev[0] + 1) if prev else 1
                created = prev[1] if prev else now
                self._db.execute(
                    f"INSERT OR REPLACE INTO deployments ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                    (deployed_id, kind, body, version, created, now, tenant),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Deployment(deployed_id, kind, config, version, created, now, tenant), prev is not None

    def get(self, deployed_id: str, tenant: str | None = None) -> Deployment | None:
        """The deployment, or None when there is none with that id that ``tenant`` owns (``None``: any tenant)."""
        where, args = _owned(tenant)
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM deployments WHERE id = ?{where}", (deployed_id, *args)
            ).fetchone()
        return None if row is None else _row(row)

    def version(self, deployed_id: str, tenant: str | None = None) -> int | None:
        """The deployment's version, or None (as ``get``); a primary-key lookup cheap enough for every request."""
        where, args = _owned(tenant)
        with self._lock:
            row = self._db.execute(
                f"SELECT version FROM deployments WHERE id = ?{where}", (deployed_id, *args)
            ).fetchone()
        return None if row is None else int(row[0])

    def list(self, kind: str | None = None, tenant: str | None = None) -> list[Deployment]:
        """Deployments oldest first, of one kind and one tenant when given."""
        q = f"SELECT {_COLUMNS} FROM deployments WHERE 1 = 1"
        args: tuple[str, ...] = ()
        if kind is not None:
            q += " AND kind = ?"
            args = (kind,)
        where, owner = _owned(tenant)
        with self._lock:
            rows = self._db.execute(q + where + " ORDER BY created_at", (*args, *owner)).fetchall()
        return [_row(r) for r in rows]

    def delete(self, deployed_id: str, tenant: str | None = None) -> bool:
        """Delete it if ``tenant`` owns it (``None``: whoever does); whether something was deleted."""
        where, args = _owned(tenant)
        with self._lock:
            cur = self._db.execute(f"DELETE FROM deployments WHERE id = ?{where}", (deployed_id, *args))
        return cur.rowcount > 0

    # -- deploy jobs (cache/interfaces.py JobStore) --------------------------------------------------------------
    def put_job(self, record: dict[str, Any]) -> None:
        """Insert or replace a job's record (``job_id``, ``tenant``, ``state``, ``owner``, ``created_at`` and whatever
        else it holds); finished jobs beyond the newest KEEP_JOBS are dropped."""
        body = json.dumps(record, ensure_ascii=False, sort_keys=True)
        row = (record["job_id"], record["tenant"], record["state"], record["owner"], body, record["created_at"])
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (id, tenant, state, owner, record, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (*row, time.time()),
            )
            if record["state"] != "running":
                self._db.execute("DELETE FROM job_cancels WHERE id = ?", (record["job_id"],))
                self._db.execute(
                    "DELETE FROM jobs WHERE state != 'running' AND id NOT IN (SELECT id FROM jobs WHERE state != "
                    "'running' ORDER BY created_at DESC LIMIT ?)",
                    (KEEP_JOBS,),
                )

    def begin_job(self, record: dict[str, Any], limit: int, fresh_s: float) -> bool:
        """cache/interfaces.py ``JobStore.begin_job``: one write transaction (``BEGIN IMMEDIATE``) counts and inserts,
        so the API workers sharing this file never admit more than ``limit`` jobs of a tenant between them."""
        body = json.dumps(record, ensure_ascii=False, sort_keys=True)
        now = time.time()
        row = (record["job_id"], record["tenant"], record["state"], record["owner"], body, record["created_at"], now)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (running,) = self._db.execute(
                    "SELECT count(*) FROM jobs WHERE tenant = ? AND state = 'running' AND updated_at > ?",
                    (record["tenant"], now - fresh_s),
                ).fetchone()
                if limit and running >= limit:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    "INSERT INTO jobs (id, tenant, state, owner, record, created_at, updated_at) "
                    "VALUES (?,?,?,?,?,?,?)",
                    row,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT record, owner, updated_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else {**json.loads(row[0]), "owner": row[1], "updated_at": row[2]}

    def list_jobs(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Jobs oldest first, of one tenant when given."""
        where, args = _owned(tenant)
        with self._lock:
            rows = self._db.execute(
                f"SELECT record, owner, updated_at FROM jobs WHERE 1 = 1{where} ORDER BY created_at", args
            ).fetchall()
        return [{**json.loads(r[0]), "owner": r[1], "updated_at": r[2]} for r in rows]

    def request_cancel(self, job_id: str) -> None:
        """A cancel for the process running the job, whichever API worker that is (cache/interfaces.py)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO job_cancels (id, at) VALUES (?, ?)", (job_id, time.time()))

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM job_cancels WHERE id = ?", (job_id,)).fetchone() is not None

    def claim_job(self, job_id: str, owner_was: str, owner: str) -> bool:
        """Take over a running job from ``owner_was`` (a dead process); False if it is not running or another process
        claimed it first."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET owner = ?, updated_at = ? WHERE id = ? AND owner = ? AND state = 'running'",
                (owner, time.time(), job_id, owner_was),
            )
        return cur.rowcount > 0

    def close(self) -> None:
        self._db.close()
