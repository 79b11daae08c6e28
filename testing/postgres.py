"""A real PostgreSQL server with pgvector for tests and benchmarks (the collections' shared store, README
"Collections"): the PostgreSQL 16 binaries and pgvector extension that the ``pgserver`` wheel bundles
(requirements-dev.txt; Debian's PostgreSQL here has no pgvector package), started here as a plain ``postgres``
process on a loopback port of ours, its data in a folder of ours, killed at the end. pgserver's own Python API is not
used: as root it adds a system user and opens the permissions of every parent folder.

PostgreSQL refuses to run as root; as root, the server runs as ``nobody`` (its folders made over to it, and the
binaries copied once to a folder it can reach when the virtual environment's is not)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testing.server import free_port


def pg_install() -> Path:
    """The folder of the bundled PostgreSQL (bin/, lib/, share/); a missing one says how to get it."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pgserver is not installed: pip install -r requirements-dev.txt (it bundles PostgreSQL)")
    found = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (found / "bin" / "postgres").exists():
        raise RuntimeError(f"pgserver has no PostgreSQL binaries under {found}")
    return found


def _reachable_by_all(path: Path) -> bool:
    return all(p.stat().st_mode & 0o005 == 0o005 for p in [path, *path.parents])


def _runnable_install(user: pwd.struct_passwd | None) -> Path:
    """The install, or (as root, when another user cannot reach it) a copy of it that ``nobody`` can run."""
    src = pg_install()
    if user is None or _reachable_by_all(src):
        return src
    # The binaries find their libraries at $ORIGIN/../../../pgserver.libs (the wheel's layout): copied alike.
    site = src.parents[1]
    dest = Path(tempfile.gettempdir()) / f"zss-pginstall-{src.stat().st_mtime_ns}"
    if not (dest / "pgserver" / "pginstall" / "bin" / "postgres").exists():
        part = Path(tempfile.mkdtemp(prefix="zss-pginstall-"))
        for sub in ("bin", "lib", "share"):
            shutil.copytree(src / sub, part / "pgserver" / "pginstall" / sub, symlinks=True)
        shutil.copytree(site / "pgserver.libs", part / "pgserver.libs", symlinks=True)
        for d in (part, part / "pgserver", part / "pgserver" / "pginstall"):
            d.chmod(0o755)
        with contextlib.suppress(OSError):
            part.rename(dest)  # another test process may have made it first
        shutil.rmtree(part, ignore_errors=True)
    return dest / "pgserver" / "pginstall"


def _as_user(user: pwd.struct_passwd | None):  # noqa: ANN202 - a preexec_fn
    if user is None:
        return None

    def drop() -> None:
        os.setgid(user.pw_gid)
        os.setgroups([])
        os.setuid(user.pw_uid)

    return drop


@dataclass
class PostgresServer:
    """``start()`` (again: same port and files), ``url``, ``kill()`` (SIGKILL), ``stop()`` (and delete its files)."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="zss-pg-")))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        self.install = _runnable_install(self.user)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def _own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def start(self, timeout: float = 30.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        self._own(self.directory)
        pre = _as_user(self.user)
        if not (self.data / "PG_VERSION").exists():
            init = subprocess.run(
                [str(self.install / "bin" / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                 "-E", "UTF8", "--locale=C", "--no-sync"],
                preexec_fn=pre, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if init.returncode != 0:
                raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        log = open(self.directory / "postgres.log", "ab")  # noqa: SIM115 - the server's, closed with it
        self.proc = subprocess.Popen(
            [str(self.install / "bin" / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.directory), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
             "-c", "shared_buffers=256MB", "-c", "maintenance_work_mem=512MB"],
            preexec_fn=pre, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"postgres on port {self.port} did not answer in {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "postgres.log").read_text(errors="replace")
        return ""

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash: what was committed stays)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server (fast shutdown, then SIGKILL) and delete its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(directory: Path | None = None) -> Iterator[PostgresServer]:
    server = PostgresServer(directory) if directory is not None else PostgresServer()
    try:
        server.start()  # a failed start removes its folder too
        yield server
    finally:
        server.stop()


def fresh_database(server: PostgresServer) -> str:
    """A new, empty database on ``server`` (one per test: nothing seen from another test); its URL."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + "/" + name
