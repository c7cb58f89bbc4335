"""Redis clients: the one factory every process builds its clients with, and the text of their replies."""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mipos_worker.redis_url import is_sentinel_url
from mipos_worker.settings import (
    RedisSettings,
    load_producer_settings,
    tls_options_of,
    url_without_tls_options,
)
from mipos_worker.state.sentinel import sentinel_master_client

REDIS_SOCKET_TIMEOUT_S = 5.0

_lock = threading.Lock()


def text(value: bytes | str | Any, errors: str = "strict") -> str:
    """A Redis reply's value as text: clients built here answer bytes (no decode_responses).

    Anything that is not bytes (a str from a client that decodes, a number) is passed through ``str``.
    """
    return value.decode(errors=errors) if isinstance(value, bytes) else str(value)


def whole_seconds(duration_s: float) -> int:
    """A duration for ``EX`` / ``EXPIRE``: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(duration_s))


def milliseconds(duration_s: float) -> int:
    """A duration for ``PX`` / ``WAIT``: whole milliseconds, at least 1."""
    return max(1, int(duration_s * 1000))


def redis_from_url(url: str, timeout_s: float = REDIS_SOCKET_TIMEOUT_S, retries: int = 3,
                   settings: RedisSettings | None = None) -> redis.Redis:
    """A client that applies a rediss:// URL's TLS options as the broker does (mipos_worker.settings.TlsOptions).

    The options are read once (``tls_options_of``: ValueError when clients would read
    them differently) and given as arguments, not left to redis-py's own reading of
    the URL. A ``sentinel://`` URL gives a client of the master the Sentinels name,
    which follows a failover (mipos_worker/state/sentinel.py); the master's name and
    the Sentinels' password come from ``settings`` (default: the environment's). With
    REDIS_MIN_REPLICAS_ACK a read waits up to the replica timeout for a WAIT.
    """
    settings = settings or (load_producer_settings() if is_sentinel_url(url) else None)
    if settings is not None and settings.min_replicas_ack:
        timeout_s = max(timeout_s, settings.replica_ack_timeout_s + 1.0)
    if settings is not None and is_sentinel_url(url):
        return sentinel_master_client(url, settings, timeout_s, retries)
    tls = tls_options_of(url)
    return redis.Redis.from_url(
        url if tls is None else url_without_tls_options(url),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry=Retry(NoBackoff(), retries),
        **(tls.redis_kwargs() if tls is not None else {}),
    )


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
