"""Per-process singletons of the worker: settings, Redis, the mipos client, stores.

Built on first use, and again in a child after a fork, so no socket is shared
between prefork processes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from config import (
    RedisSettings,
    WorkerSettings,
    is_sentinel_url,
    load_producer_settings,
    load_worker_settings,
)
from worker.breaker import CircuitBreaker
from worker.clock import SharedClock
from worker.deadletters import DeadLetters
from worker.inflight import InflightRegistry
from worker.ledger import OrderLedger
from worker.metrics import Metrics
from worker.mipos import MiposClient
from worker.redaction import register_secret
from worker.replication import ReplicaAck
from worker.tokens import TokenStore
from worker.topology import sentinel_master_client, tracker

REDIS_SOCKET_TIMEOUT_S = 5.0
METRICS_FLUSH_EVERY_S = 1.0  # counts reach Redis (and /metrics) within about this long


def redis_from_url(url: str, timeout_s: float = REDIS_SOCKET_TIMEOUT_S, retries: int = 3,
                   settings: RedisSettings | None = None) -> redis.Redis:
    """A client that checks a rediss:// server's certificate as the broker does (config.verified_redis_url).

    A ``sentinel://`` URL gives a client of the master the Sentinels name, which
    follows a failover (worker/topology.py); the master's name and the Sentinels'
    password come from ``settings`` (default: the environment's). With
    REDIS_MIN_REPLICAS_ACK a read waits up to the replica timeout for a WAIT.
    """
    from config import verified_redis_url

    settings = settings or (load_producer_settings() if is_sentinel_url(url) else None)
    if settings is not None and settings.min_replicas_ack:
        timeout_s = max(timeout_s, settings.replica_ack_timeout_s + 1.0)
    if settings is not None and is_sentinel_url(url):
        return sentinel_master_client(url, settings, timeout_s, retries)
    return redis.Redis.from_url(
        verified_redis_url(url),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry=Retry(NoBackoff(), retries),
    )


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
    clock: SharedClock  # Redis's time: the deadline's one clock (worker/clock.py)


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
            r = redis_from_url(settings.redis.url, settings=settings.redis)
            prefix = settings.redis.key_prefix
            metrics = Metrics(r, prefix, flush_every_s=METRICS_FLUSH_EVERY_S)
            tracker.listen("metrics", lambda *_: metrics.count("mipos_redis_master_followed_total"))
            _runtime = Runtime(
                settings=settings,
                redis=r,
                client=client,
                tokens=TokenStore(client, r, prefix, metrics=metrics),
                ledger=OrderLedger(r, prefix, ReplicaAck.of(settings.redis), settings.retention),
                dead_letters=DeadLetters(r, prefix, metrics),
                inflight=InflightRegistry(r, prefix, settings.retention.history_s),
                breaker=CircuitBreaker(r, prefix, settings.breaker),
                metrics=metrics,
                clock=SharedClock(r),
            )
            _runtime_pid = os.getpid()
        return _runtime


def flush_metrics() -> None:
    """On a clean stop: write this process's pending counts (if it ever built a runtime)."""
    if _runtime is not None and _runtime_pid == os.getpid():
        _runtime.metrics.flush()


_producer: tuple[int, str, redis.Redis] | None = None


def producer_redis(url: str | None = None) -> redis.Redis:
    """A Redis client for the POS side (which has no mipos settings), one per process."""
    global _producer
    url = url or load_producer_settings().url
    with _lock:
        if _producer is None or _producer[0] != os.getpid() or _producer[1] != url:
            # Bounded like the broker's producer options: delay() must fail fast.
            _producer = (os.getpid(), url, redis_from_url(url, timeout_s=2.0, retries=1))
        return _producer[2]
