"""A throwaway PostgreSQL cluster of Debian's PostgreSQL, for LangGraph's Postgres checkpointer.

``initdb`` into a temp dir, ``postgres`` on a free port of 127.0.0.1 (its socket in the
same dir), stopped (fast shutdown) and deleted on exit. The server's settings are the
defaults ``initdb`` writes (shared_buffers 128 MB, fsync on, synchronous_commit on), apart
from the listen address, port and ``max_connections``. PostgreSQL refuses to run as root,
so as root it runs as the ``postgres`` system user that Debian's package creates.

    with postgres_cluster() as pg:
        pg.dsn  # postgresql://bench@127.0.0.1:<port>/postgres
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.bench.peers.common import PeerError, descendants, free_port, wait_until

__all__ = ["PostgresCluster", "find_postgres_bindir", "postgres_cluster"]

SUPERUSER = "bench"


def find_postgres_bindir() -> Path:
    """The bin dir of the newest Debian PostgreSQL (``/usr/lib/postgresql/<v>/bin``), else the PATH's.

    Raises:
        PeerError: no PostgreSQL server is installed (``tests/bench/peers/setup.sh`` installs it).
    """
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("postgres"):
        return Path(initdb).resolve().parent
    raise PeerError(
        "PostgreSQL is not installed: run tests/bench/peers/setup.sh (apt-get install postgresql)"
    )


@dataclass(frozen=True)
class PostgresCluster:
    bindir: Path
    datadir: Path
    port: int
    pid: int
    version: str

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def pids(self) -> list[int]:
        """The postmaster and its backends, checkpointer, WAL writer ... (as they are now)."""
        return descendants(self.pid)


def _run_as() -> tuple[int | None, int | None]:
    """(uid, gid) of the ``postgres`` user when we are root (PostgreSQL refuses root), else no change."""
    if os.geteuid() != 0:
        return None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PeerError("running as root and there is no 'postgres' user to run PostgreSQL as") from exc
    return user.pw_uid, user.pw_gid


def _ready(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def postgres_cluster(
    *, max_connections: int = 100, settings: Mapping[str, str] | None = None, start_timeout_s: float = 60.0
) -> Iterator[PostgresCluster]:
    """Start a fresh cluster (``settings``: extra ``-c name=value``); yield it; stop it, delete its files."""
    bindir = find_postgres_bindir()
    uid, gid = _run_as()
    root = Path(tempfile.mkdtemp(prefix="agentbus-bench-pg-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        if uid is not None and gid is not None:
            os.chown(root, uid, gid)
        datadir = root / "data"
        initdb = subprocess.run(
            [str(bindir / "initdb"), "-D", str(datadir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
            user=uid,
            group=gid,
        )
        if initdb.returncode != 0:
            raise PeerError(f"initdb failed: {initdb.stderr.strip() or initdb.stdout.strip()}")
        port = free_port()
        log = open(root / "postgres.log", "wb")  # noqa: SIM115 - closed with the server below
        process = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(datadir),
                "-p",
                str(port),
                "-k",
                str(root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"max_connections={max_connections}",
                *[arg for name, value in (settings or {}).items() for arg in ("-c", f"{name}={value}")],
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=uid,
            group=gid,
        )
        log.close()
        cluster = PostgresCluster(bindir, datadir, port, process.pid, _version(bindir))
        wait_until(
            lambda: process is not None and process.poll() is None and _ready(cluster.dsn),
            start_timeout_s,
            f"PostgreSQL on port {port} (log: {root / 'postgres.log'})",
        )
        yield cluster
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(root, ignore_errors=True)


def _version(bindir: Path) -> str:
    done = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT: roll back open transactions, stop), then SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
