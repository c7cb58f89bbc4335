"""A PostgreSQL server of the tests' own, in a temporary directory on a free loopback port.

``initdb`` and ``postgres`` refuse to run as root: as root they run as the
``postgres`` OS user (the Debian package creates it), which gets the directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from support.processes import free_port, stop_process, wait_for


def postgres_bin(name: str) -> str:
    found = shutil.which(name)
    if found and name != "postgres":
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if candidates:
        return candidates[0]
    if found:
        return found
    raise FileNotFoundError(f"{name} not found: install PostgreSQL (scripts/install-system-packages)")


def available() -> bool:
    try:
        postgres_bin("initdb")
        postgres_bin("postgres")
        return True
    except FileNotFoundError:
        return False


class PostgresServer:
    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.as_user: list[str] = []
        self.owns_workdir = workdir is None or os.geteuid() == 0
        if os.geteuid() == 0:
            # pytest's temporary directories are root's alone (0700): one the postgres user can reach.
            workdir = Path(tempfile.mkdtemp(prefix="mipos-postgres-"))
            shutil.chown(workdir, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        elif workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="mipos-postgres-"))
        self.workdir = workdir
        self.datadir = workdir / "data"
        workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [*self.as_user, postgres_bin("initdb"), "-D", str(self.datadir), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120)
        log = open(workdir / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [*self.as_user, postgres_bin("postgres"), "-D", str(self.datadir), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", str(workdir), "-c", "fsync=off", "-c", "max_connections=200",
             "-c", "synchronous_commit=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._ready, timeout=30, interval=0.1, what="postgres to accept connections")
        except BaseException:
            self.stop()
            raise

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError((self.workdir / "postgres.log").read_text()[-2000:])
        probe = subprocess.run([postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True)
        return probe.returncode == 0

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown: ends open sessions
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                stop_process(self.proc, timeout=10)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
