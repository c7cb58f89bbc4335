"""Real processes for tests, benchmarks and the chaos run: redis-server, the sandbox, workers, Flower.

Each process is started here and ended by its PID (its process group, for the
worker's pool children). Every wait has a bound.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis

from sandbox import SANDBOX_CREDENTIALS

ROOT = Path(__file__).resolve().parent.parent

# The worker's settings for the sandbox's account.
SANDBOX_ENV = {
    "MIPOS_CLIENT_ID": SANDBOX_CREDENTIALS["client_id"],
    "MIPOS_CLIENT_SECRET": SANDBOX_CREDENTIALS["client_secret"],
    "MIPOS_EMAIL": SANDBOX_CREDENTIALS["email"],
    "MIPOS_PASSWORD": SANDBOX_CREDENTIALS["password"],
}
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll until ``condition()`` is truthy; fail the test after ``timeout`` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], *, group: bool = True, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


class RedisServer:
    """A redis-server of our own; with ``tls_dir`` (ca.crt, redis.crt, redis.key) it
    listens with TLS only, and with ``password`` it requires one."""

    def __init__(self, workdir: Path, port: int | None = None, *, appendonly: bool = False,
                 tls_dir: Path | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if appendonly else "no", "--dir", str(workdir),
                "--maxmemory-policy", "noeviction"]
        if tls_dir is not None:
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(tls_dir / "redis.crt"),
                     "--tls-key-file", str(tls_dir / "redis.key"),
                     "--tls-ca-cert-file", str(tls_dir / "ca.crt"), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if password:
            args += ["--requirepass", password]
        self.proc = subprocess.Popen(
            args, stdout=open(workdir / "redis.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        auth = f":{password}@" if password else ""
        if tls_dir is not None:  # no ssl_cert_reqs: rediss:// verifies by default, against ssl_ca_certs
            self.url = f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={tls_dir / 'ca.crt'}"
        else:
            self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            self.start()
        except BaseException:
            self.stop()  # a server that never answered must not outlive the test
            raise

    def start(self) -> None:
        """(Re)start the server with the same port and data directory."""
        if self.proc.poll() is not None:
            self.proc = subprocess.Popen(self.proc.args, stdout=open(self.workdir / "redis.log", "ab"),
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ping, timeout=15, what="redis-server to answer PING")

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)


class Sandbox:
    """``python -m sandbox`` on a free port; ``strict``: ``--strict`` (409 ``Order not found.``
    for an accept or deny of an order that is not pending; see sandbox/server.py)."""

    def __init__(self, workdir: Path, *extra_args: str, strict: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", "0", "--quiet",
             *(("--strict",) if strict else ()), *extra_args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(workdir / "sandbox.log", "wb"),
            text=True, start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the server prints its address once it listens
        match = re.search(r"http://\S+", line)
        if not match:
            stop_process(self.proc)
            raise RuntimeError(f"sandbox did not start: {line!r}")
        self.url = match.group(0)
        from sandbox import SandboxControl

        self.control = SandboxControl(self.url)
        self.control.wait_until_up(10)

    def stop(self) -> None:
        stop_process(self.proc)


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


class WorkerProcess:
    """One ``worker:`` line of the Procfile, run as written, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.proc = subprocess.Popen(
            ["bash", "-c", f"exec {procfile_command('worker')}"],
            cwd=ROOT, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            return " ready." in self.log_path.read_text()
        wait_for(ready, timeout=timeout, what="the worker to be ready")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=15)

    def stop(self) -> None:
        stop_process(self.proc, timeout=20)


class FlowerProcess:
    """The Procfile's ``flower:`` line, run as written on ``port``, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int) -> None:
        self.log_path = log_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                ["bash", "-c", f"exec {procfile_command('flower')}"],
                cwd=ROOT, env={**env, "PORT": str(port)}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def get(self, path: str, auth: tuple[str, str] | None = None, timeout: float = 5.0) -> tuple[int, str]:
        """(status, body) of a GET; an HTTP error status is returned, not raised."""
        request = urllib.request.Request(self.url + path)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until ``/healthcheck`` (served without authentication) answers OK."""
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"flower exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                return self.get("/healthcheck", timeout=1.0) == (200, "OK")
            except OSError:
                return False
        wait_for(ready, timeout=timeout, interval=0.1, what="Flower to answer /healthcheck")

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        raw = raw.strip()
        if raw.startswith("{"):
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
    return lines
