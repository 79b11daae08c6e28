import sqlite3
from pathlib import Path

import pytest

from cache.sqlite_files import OPEN_ATTEMPTS, open_checked


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS t (x)")
    return db


def test_a_transient_error_while_another_worker_opens_the_file_is_retried_and_sets_nothing_aside(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f.sqlite3"
    _connect(path).execute("INSERT INTO t VALUES (1)").connection.commit()
    fails = iter([True, True])

    def racing(p: Path) -> sqlite3.Connection:
        if next(fails, False):  # what a worker sees while another initialises the WAL index
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return _connect(p)

    db = open_checked(path, racing, "SELECT count(*) FROM t", tmp_path / "aside.sqlite3", "test")
    assert db.execute("SELECT x FROM t").fetchall() == [(1,)]
    assert not (tmp_path / "aside.sqlite3").exists()


def test_an_error_that_does_not_pass_is_raised_not_taken_for_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    _connect(path).close()
    calls = []

    def locked(p: Path) -> sqlite3.Connection:
        calls.append(p)
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError):
        open_checked(path, locked, "SELECT 1", tmp_path / "aside.sqlite3", "test")
    assert len(calls) == OPEN_ATTEMPTS and path.exists() and not (tmp_path / "aside.sqlite3").exists()


def test_a_damaged_file_is_set_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    path.write_bytes(b"not a database, " * 512)
    dropped = []
    db = open_checked(
        path, _connect, "SELECT count(*) FROM t", tmp_path / "aside.sqlite3", "test", lambda: dropped.append(1)
    )
    assert db.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert (tmp_path / "aside.sqlite3").read_bytes() == b"not a database, " * 512 and dropped == [1]
