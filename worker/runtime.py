"""Per-process singletons of the worker: settings, Redis, the mipos client, stores.

Built on first use, and again in a child after a fork, so no socket is shared
between prefork processes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from config import WorkerSettings, load_producer_settings, load_worker_settings
from worker.breaker import CircuitBreaker
from worker.clock import SharedClock
from worker.deadletters import DeadLetters
from worker.inflight import InflightRegistry
from worker.ledger import OrderLedger
from worker.metrics import Metrics
from worker.mipos import MiposClient
from worker.redaction import register_secret
from worker.tokens import TokenStore

REDIS_SOCKET_TIMEOUT_S = 5.0
METRICS_FLUSH_EVERY_S = 1.0  # counts reach Redis (and /metrics) within about this long


def redis_from_url(url: str, timeout_s: float = REDIS_SOCKET_TIMEOUT_S, retries: int = 3) -> redis.Redis:
    """A client that checks a rediss:// server's certificate as the broker does (config.verified_redis_url)."""
    from config import verified_redis_url

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
            for secret in (*settings.mipos.secrets(), urlsplit(settings.redis.url).password):
                register_secret(secret, permanent=True)
            client = MiposClient(settings.mipos)
            r = redis_from_url(settings.redis.url)
            prefix = settings.redis.key_prefix
            metrics = Metrics(r, prefix, flush_every_s=METRICS_FLUSH_EVERY_S)
            _runtime = Runtime(
                settings=settings,
                redis=r,
                client=client,
                tokens=TokenStore(client, r, prefix, metrics=metrics),
                ledger=OrderLedger(r, prefix),
                dead_letters=DeadLetters(r, prefix, metrics),
                inflight=InflightRegistry(r, prefix),
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
