"""A MariaDB server of the tests' own, in a temporary directory on a free loopback port."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from support.processes import free_port, stop_process, wait_for


def available() -> bool:
    return bool(shutil.which("mariadbd") or os.path.exists("/usr/sbin/mariadbd")) and bool(
        shutil.which("mariadb-install-db"))


class MariaDBServer:
    def __init__(self, workdir: Path | None = None, port: int | None = None, *,
                 tz: str | None = None) -> None:
        """``tz``: the server's system time zone (``TZ``), which ``time_zone=SYSTEM`` follows."""
        self.port = port or free_port()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mipos-mariadb-"))
        self.owns_workdir = workdir is None
        datadir = self.workdir / "data"
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(["mariadb-install-db", "--no-defaults", *user, f"--datadir={datadir}",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=120)
        mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        self.proc = subprocess.Popen(
            [mariadbd, "--no-defaults", *user, f"--datadir={datadir}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.workdir / 'mariadb.sock'}",
             "--innodb-flush-log-at-trx-commit=0", "--skip-log-bin",
             f"--log-error={self.workdir / 'mariadb.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "TZ": tz} if tz else None)
        try:
            wait_for(self._ready, timeout=60, interval=0.1, what="mariadbd to accept connections")
        except BaseException:
            self.stop()
            raise

    def _connect(self, database: str | None = None):  # type: ignore[no-untyped-def]
        import pymysql

        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", database=database,
                               autocommit=True, connect_timeout=2)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError((self.workdir / "mariadb.log").read_text()[-2000:])
        try:
            self._connect().close()
            return True
        except Exception:
            return False

    def create_database(self, name: str) -> str:
        with self._connect() as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}`")
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
