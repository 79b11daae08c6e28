"""Opening the SQLite files of the cache and the registry: a transient error is retried, only a damaged file is set
aside.

Several worker processes open the same file at start-up; while one of them switches it to WAL or migrates it, the
others can see ``database is locked`` or ``attempt to write a readonly database`` (the WAL index being initialised).
Those are :class:`sqlite3.OperationalError`; a damaged file is a plain :class:`sqlite3.DatabaseError` ("file is not
a database", "database disk image is malformed"). Setting a file aside on a transient error would start a worker
empty and hide the user's deployments, so only the second kind does.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

OPEN_ATTEMPTS = 8  # ~2 s of back-off in all: start-up races end in milliseconds


def open_checked(
    path: Path,
    connect: Callable[[Path], sqlite3.Connection],
    probe: str,
    aside: Path,
    what: str,
    on_aside: Callable[[], None] | None = None,
) -> sqlite3.Connection:
    """``connect(path)`` and run ``probe``; retry transient errors; move a damaged file to ``aside`` (kept for
    recovery, never deleted) and start a new one."""
    for attempt in range(OPEN_ATTEMPTS):
        db: sqlite3.Connection | None = None
        try:
            db = connect(path)
            db.execute(probe).fetchone()
            return db
        except sqlite3.OperationalError as exc:
            if db is not None:
                db.close()
            if attempt == OPEN_ATTEMPTS - 1:
                raise
            log.info("%s %s: %s; retrying", what, path, exc)
            time.sleep(0.02 * 2**attempt)
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            log.error("%s %s is unreadable (%s); moved to %s and starting empty", what, path, exc, aside)
            os.replace(path, aside)
            if on_aside is not None:
                on_aside()
            return connect(path)
    raise AssertionError("unreachable")  # the loop returns or raises
