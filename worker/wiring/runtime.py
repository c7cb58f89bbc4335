"""Per-process singletons of the worker: settings, Redis, the mipos client, stores.

Built on first use, and again in a child after a fork, so no socket is shared
between prefork processes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis

from config import (
    WorkerSettings,
    load_worker_settings,
)
from mipos_worker.state.clock import SharedClock
from mipos_worker.state.connection import redis_from_url
from mipos_worker.state.inflight import InflightRegistry
from mipos_worker.state.replication import ReplicaAck
from worker.logs.redaction import register_secret
from worker.mipos.client import MiposClient
from worker.mipos.tokens import TokenStore
from worker.state.breaker import CircuitBreaker
from worker.state.counters import Metrics
from worker.state.deadletters import DeadLetters
from worker.state.ledger import OrderLedger
from worker.state.phases import AttemptPhases
from worker.state.topology import follow_master_changes, tracker

METRICS_FLUSH_EVERY_S = 1.0  # counts reach Redis (and /metrics) within about this long


@dataclass(frozen=True)
class Runtime:
    settings: WorkerSettings
    redis: redis.Redis
    client: MiposClient
    tokens: TokenStore
    ledger: OrderLedger
    dead_letters: DeadLetters
    inflight: InflightRegistry
    breaker: CircuitBreaker
    metrics: Metrics
    clock: SharedClock  # Redis's time: the deadline's one clock (mipos_worker/state/clock.py)
    phases: AttemptPhases  # the start and end of an attempt, one round trip each


_lock = threading.Lock()
_runtime: Runtime | None = None
_runtime_pid: int | None = None


def get_runtime() -> Runtime:
    global _runtime, _runtime_pid
    with _lock:
        if _runtime is None or _runtime_pid != os.getpid():
            settings = load_worker_settings()
            for secret in (*settings.mipos.secrets(), *settings.redis.secrets()):
                register_secret(secret, permanent=True)
            client = MiposClient(settings.mipos)
            if settings.redis.sentinel:
                follow_master_changes()
            r = redis_from_url(settings.redis.url, settings=settings.redis)
            prefix = settings.redis.key_prefix
            metrics = Metrics(r, prefix, flush_every_s=METRICS_FLUSH_EVERY_S)
            tracker.listen("metrics", lambda *_: metrics.count("mipos_redis_master_followed_total"))
            ledger = OrderLedger(r, prefix, ReplicaAck.of(settings.redis), settings.retention)
            inflight = InflightRegistry(r, prefix, settings.retention.history_s)
            breaker = CircuitBreaker(r, prefix, settings.breaker)
            _runtime = Runtime(
                settings=settings,
                redis=r,
                client=client,
                tokens=TokenStore(client, r, prefix, metrics=metrics),
                ledger=ledger,
                dead_letters=DeadLetters(r, prefix, metrics),
                inflight=inflight,
                breaker=breaker,
                metrics=metrics,
                clock=SharedClock(r),
                phases=AttemptPhases(r, ledger, inflight, breaker),
            )
            _runtime_pid = os.getpid()
        return _runtime


def flush_metrics() -> None:
    """On a clean stop: write this process's pending counts (if it ever built a runtime)."""
    if _runtime is not None and _runtime_pid == os.getpid():
        _runtime.metrics.flush()
