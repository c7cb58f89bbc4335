"""Processes for the outbox tests: the relay as the Procfile-style line runs it, and a POS."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

from sandbox.server import ACCEPT_PATH
from support.processes import ROOT, free_port, read_json_lines, stop_process, wait_for


class RelayProcess:
    """``mipos-worker outbox relay --database-url URL``, as a POS's Procfile line runs it."""

    def __init__(self, env: dict[str, str], log_path: Path, database_url: str, *extra: str) -> None:
        self.log_path = log_path
        self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mipos-worker"), "outbox", "relay",
             "--database-url", database_url,
             "--poll-interval", "0.1", "--report-every", "5s",
             "--metrics-port", str(self.metrics_port), *extra],
            cwd=ROOT, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def published(self) -> float:
        """``mipos_outbox_published_total`` from the relay's metrics endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("mipos_outbox_published_total "):
                return float(line.split()[1])
        raise AssertionError(f"no mipos_outbox_published_total in:\n{text}")

    def lines(self) -> list[dict[str, Any]]:
        return read_json_lines(self.log_path)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)


def run_script(env: dict[str, str], script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_script(env: dict[str, str], script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def accepts_by_order(control: Any) -> collections.Counter[str]:
    """Successful accept calls at the sandbox, per order external id."""
    return collections.Counter(
        r["body"]["order_external_id"] for r in control.requests(path=ACCEPT_PATH)
        if r["status"] == 200 and isinstance(r.get("body"), dict))


def wait_accepted(control: Any, order_ids: set[str], timeout: float) -> collections.Counter[str]:
    found: list[collections.Counter[str]] = []

    def all_there() -> bool:
        found[:] = [accepts_by_order(control)]
        return order_ids <= set(found[0])
    wait_for(all_there, timeout=timeout, interval=0.2, what=f"{len(order_ids)} acceptances")
    return found[0]
