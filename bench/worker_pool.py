"""The chaos runs' workers: Procfile ``worker:`` processes, SIGKILLed at random and replaced."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

from support.processes import WorkerProcess, read_json_lines


class WorkerPool:
    """Live workers and the ones killed (their logs are kept, in ``workdir``, for the tally)."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.live: list[WorkerProcess] = []
        self.retired: list[WorkerProcess] = []
        self.kills: list[float] = []  # when each SIGKILL went (Unix time)
        self.lock = threading.Lock()

    def start(self) -> WorkerProcess:
        with self.lock:
            number = len(self.live) + len(self.retired)
            worker = WorkerProcess(self.env, self.workdir / f"worker-{number}.log")
            self.live.append(worker)
        return worker

    def start_ready(self, count: int, timeout: float = 60.0) -> None:
        workers = [self.start() for _ in range(count)]
        for worker in workers:
            worker.wait_ready(timeout=timeout)

    def kill(self, victim: WorkerProcess) -> None:
        """SIGKILL ``victim`` (its whole process group) and start a replacement."""
        with self.lock:
            self.live.remove(victim)
            self.retired.append(victim)
        victim.kill(signal.SIGKILL)
        self.kills.append(time.time())
        self.start()

    def kill_random(self, rng: random.Random) -> WorkerProcess:
        with self.lock:
            victim = rng.choice(self.live)
        self.kill(victim)
        return victim

    def all(self) -> list[WorkerProcess]:
        with self.lock:
            return self.live + self.retired

    def lines(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        for worker in self.all():
            lines += read_json_lines(worker.log_path)
        return lines

    def stop(self) -> None:
        for worker in self.all():
            worker.stop()
