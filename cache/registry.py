"""The deployment registry: deployed classifiers and detectors, kept in a SQLite file.

Every API worker reads the same file, so a deployment made through one worker is served by all of them; the
``version`` column lets a worker notice that a deployment it compiled has since been updated.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Deployment:
    id: str
    kind: str  # "classifier" or "detector"
    config: dict[str, Any]
    version: int
    created_at: float
    updated_at: float


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            db = self._connect()
            db.execute("SELECT count(*) FROM deployments").fetchone()
            return db
        except sqlite3.DatabaseError as exc:
            # Deployments are user data: keep the unreadable file for recovery rather than deleting it.
            aside = self.path.with_name(f"{self.path.stem}.corrupt-{int(time.time())}{self.path.suffix}")
            log.error("registry %s is unreadable (%s); moved to %s and starting empty", self.path, exc, aside)
            os.replace(self.path, aside)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        return db

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def put(self, deployed_id: str, kind: str, config: dict[str, Any]) -> tuple[Deployment, bool]:
        """Insert or replace a deployment; returns it and whether it existed before."""
        now = time.time()
        body = json.dumps(config, ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT version, created_at FROM deployments WHERE id = ?", (deployed_id,))
                prev = row.fetchone()
                version = (prev[0] + 1) if prev else 1
                created = prev[1] if prev else now
                self._db.execute(
                    "INSERT OR REPLACE INTO deployments (id, kind, config, version, created_at, updated_at) "
                    "VALUES (?,?,?,?,?,?)",
                    (deployed_id, kind, body, version, created, now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Deployment(deployed_id, kind, config, version, created, now), prev is not None

    def get(self, deployed_id: str) -> Deployment | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, kind, config, version, created_at, updated_at FROM deployments WHERE id = ?",
                (deployed_id,),
            ).fetchone()
        return None if row is None else Deployment(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])

    def version(self, deployed_id: str) -> int | None:
        """The deployment's version, or None; a primary-key lookup cheap enough for every request."""
        with self._lock:
            row = self._db.execute("SELECT version FROM deployments WHERE id = ?", (deployed_id,)).fetchone()
        return None if row is None else int(row[0])

    def list(self, kind: str | None = None) -> list[Deployment]:
        q = "SELECT id, kind, config, version, created_at, updated_at FROM deployments"
        args: tuple[str, ...] = ()
        if kind is not None:
            q += " WHERE kind = ?"
            args = (kind,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY created_at", args).fetchall()
        return [Deployment(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows]

    def delete(self, deployed_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM deployments WHERE id = ?", (deployed_id,))
        return cur.rowcount > 0

    def close(self) -> None:
        self._db.close()
