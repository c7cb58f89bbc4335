from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from support.processes import SANDBOX_ENV, RedisServer, Sandbox, WorkerProcess, read_json_lines, wait_for
from tests import postgres
from worker.state.deadletters import DeadLetter, DeadLetters

# Fast, but the same shape as production: base 0.05 s doubling up to 0.4 s.
FAST_RETRY_ENV = {
    "MIPOS_TIMEOUT_S": "1",
    "MIPOS_RETRY_BASE_DELAY_S": "0.05",
    "MIPOS_RETRY_MAX_DELAY_S": "0.4",
    "MIPOS_RETRY_MAX_ATTEMPTS": "6",
    "MIPOS_RETRY_DEADLINE_S": "60",
}
ATTEMPT_EVENTS = ("accept_attempt", "deny_attempt")
FINAL_OUTCOMES = ("accepted", "denied", "failed", "skipped")
# Every token the sandbox issued during the run, for the no-secrets check.
SEEN_TOKENS: set[str] = set()


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.PostgresServer]:
    """One PostgreSQL for the outbox tests; each test makes its own database in it."""
    if not postgres.available():
        pytest.fail("PostgreSQL is not installed: run scripts/install-system-packages")
    server = postgres.PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    server = Sandbox(tmp_path_factory.mktemp("sandbox"))
    yield server
    server.stop()


@pytest.fixture
def tasks(redis_server: RedisServer) -> ModuleType:
    """The POS side, in this test process, pointed at the test Redis."""
    import tasks as pos_tasks
    from worker.wiring.celery_app import app

    app.conf.broker_url = redis_server.url
    return pos_tasks


def new_order_id() -> str:
    return str(uuid.uuid4())


def dead_letter_of(redis_server: RedisServer, order_id: str) -> DeadLetter:
    """The order's dead letter, once a worker has written it."""
    def find() -> DeadLetter | None:
        for letter in DeadLetters(redis_server.client, "mipos:").list():
            if letter.order.get("order_external_id") == order_id:
                return letter
        return None
    return wait_for(find, timeout=10, what=f"dead letter of {order_id}")


class Cluster:
    """A group of worker processes, as the Procfile starts them, with their logs."""

    def __init__(self, redis_server: RedisServer, sandbox: Sandbox, logdir: Path,
                 processes: int, env: dict[str, str]) -> None:
        self.redis = redis_server
        self.sandbox = sandbox
        self.control = sandbox.control
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "REDIS_URL": redis_server.url,
            "MIPOS_BASE_URL": sandbox.url,
            **SANDBOX_ENV,
            **FAST_RETRY_ENV,
            "WORKER_CONCURRENCY": "4",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            **env,
        }
        self.logdir = logdir
        self.tag = uuid.uuid4().hex[:8]
        self.workers: list[WorkerProcess] = []
        for _ in range(processes):
            self.start_worker(wait=False)
        for worker in self.workers:
            worker.wait_ready()

    def start_worker(self, wait: bool = True) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.logdir / f"worker-{self.tag}-{len(self.workers)}.log")
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def lines(self) -> list[dict[str, Any]]:
        return [line for w in self.workers for line in read_json_lines(w.log_path)]

    def attempt_lines(self, order_external_id: str) -> list[dict[str, Any]]:
        lines = [
            line for line in self.lines()
            if line.get("event") in ATTEMPT_EVENTS
            and line.get("order_external_id") == order_external_id
        ]
        return sorted(lines, key=lambda line: line["timestamp"])

    def wait_final(self, order_external_id: str, count: int = 1,
                   timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until the order has ``count`` final lines; return all its attempt lines."""
        def final() -> list[dict[str, Any]] | None:
            lines = self.attempt_lines(order_external_id)
            done = [line for line in lines if line["outcome"] in FINAL_OUTCOMES]
            return lines if len(done) >= count else None
        return wait_for(final, timeout=timeout, what=f"final outcome of {order_external_id}")

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        harvest_tokens(self.sandbox)


def harvest_tokens(sandbox: Sandbox) -> None:
    for request in sandbox.control.requests():
        auth = request.get("authorization") or ""
        if auth.startswith("Bearer ") and len(auth) > 7:
            SEEN_TOKENS.add(auth[7:])


ClusterFactory = Callable[..., Cluster]


class ClusterStarter:
    """Starts workers from a clean slate (empty Redis, sandbox reset: cold tokens); stops them all."""

    def __init__(self, redis_server: RedisServer, sandbox: Sandbox, logdir: Path) -> None:
        self.redis_server, self.sandbox, self.logdir = redis_server, sandbox, logdir
        self.started: list[Cluster] = []

    def __call__(self, processes: int = 1, **env: str) -> Cluster:
        harvest_tokens(self.sandbox)
        self.redis_server.client.flushall()
        self.sandbox.control.reset()
        cluster = Cluster(self.redis_server, self.sandbox, self.logdir, processes, env)
        self.started.append(cluster)
        return cluster

    def stop_all(self) -> None:
        for cluster in self.started:
            cluster.stop()


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, sandbox: Sandbox, logdir: Path) -> Iterator[Cluster]:
    """One worker for a whole test module, started from a clean slate."""
    starter = ClusterStarter(redis_server, sandbox, logdir)
    yield starter(processes=1)
    starter.stop_all()


@pytest.fixture
def make_cluster(redis_server: RedisServer, sandbox: Sandbox, logdir: Path) -> Iterator[ClusterFactory]:
    starter = ClusterStarter(redis_server, sandbox, logdir)
    yield starter
    starter.stop_all()


def write_done(client: Any, prefix: str, order: Any, task_id: str, ack: Any = None) -> None:
    """A done record written as a worker writes it: by the attempt's end (worker/state/phases.py)."""
    from config.settings import BreakerConfig
    from mipos_worker.order.model import Action
    from worker.state.breaker import CircuitBreaker
    from mipos_worker.state.inflight import InflightRegistry
    from worker.state.ledger import OrderLedger
    from worker.state.phases import AttemptPhases
    from mipos_worker.state.replication import NO_ACK

    ledger = OrderLedger(client, prefix, ack or NO_ACK)
    breaker = CircuitBreaker(client, prefix, BreakerConfig(True, 5, 0.5, 30.0, 2.0, 200))
    phases = AttemptPhases(client, ledger, InflightRegistry(client, prefix, 3600.0), breaker)
    phases.finish(task_id, order, records=[], lock_id=None, clear_sending=True, final=True,
                  breaker_success=False, done=ledger.entry(order, Action.ACCEPT, task_id))
