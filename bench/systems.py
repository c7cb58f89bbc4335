"""The systems a benchmark run compares: this worker, the stock Celery peer, and how each is
started and fed."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from support.processes import ROOT, WorkerProcess, procfile_command

STORE_ID = "5"
OURS_QUEUE = "mipos"
STOCK_QUEUE = "stock"  # bench/stock_celery.py; imported only once REDIS_URL is set
# The shared rate limit (MIPOS_RATE_LIMIT_PER_S, 200 by default) is a deliberate cap on
# sends to mipos, which the peer does not have: the throughput rows measure the machinery
# without it (the README says so).
UNCAPPED = {"MIPOS_RATE_LIMIT_PER_S": "100000"}


class CeleryProcess(WorkerProcess):
    """A Celery worker started from a command line of our choosing, logging to a file."""

    def __init__(self, command: str, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@dataclass(frozen=True)
class System:
    name: str
    queue: str
    command: Callable[[str, int], str]
    send: Callable[[int, str], None]  # (delivery id, order id): one delay()

    def start(self, env: dict[str, str], pool: str, concurrency: int, log_dir: Path) -> WorkerProcess:
        env = {**env, "WORKER_POOL": pool, "WORKER_CONCURRENCY": str(concurrency), **UNCAPPED}
        return CeleryProcess(self.command(pool, concurrency), env,
                             log_dir / f"{self.name}-{uuid.uuid4().hex[:6]}.log")


def _ours_command(pool: str, concurrency: int) -> str:
    return procfile_command("worker")  # the Procfile's line, pool and size from the environment


def _stock_command(pool: str, concurrency: int) -> str:
    return (f"celery -A bench.stock_celery worker --pool={pool} --concurrency={concurrency} "
            f"--queues={STOCK_QUEUE} --without-gossip --without-mingle --events --loglevel=INFO")


def _ours_send(delivery_id: int, order_id: str) -> None:
    from tasks import accept_order

    accept_order.delay(delivery_id=delivery_id, store_id=STORE_ID, order_external_id=order_id)


def _stock_send(delivery_id: int, order_id: str) -> None:
    from bench.stock_celery import accept_order

    accept_order.delay(delivery_id=delivery_id, store_id=STORE_ID, order_external_id=order_id)


OURS = System("ours", OURS_QUEUE, _ours_command, _ours_send)
STOCK = System("stock", STOCK_QUEUE, _stock_command, _stock_send)
SYSTEMS = {system.name: system for system in (OURS, STOCK)}
