"""Redis behind Sentinel: redis-py clients of the master the Sentinels name, and kombu's options.

Every process reaches Redis through ``redis_from_url`` (redis-py) or the Celery
app's broker connection (kombu's ``sentinel`` transport, options from
``kombu_sentinel_options``). Both ask the Sentinels for the master before each
new connection, so after a failover the next command fails once on the dead
master's connection, reconnects, and lands on the promoted replica: no restart.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedSSLConnection

from mipos_worker.redis_url import SentinelTarget, parse_sentinel_url
from mipos_worker.settings import RedisSettings, read_tls_query


def target_of(url: str) -> SentinelTarget:
    target, problems = parse_sentinel_url(url)
    if target is None:
        raise ValueError("; ".join(problems))
    return target


def ssl_kwargs(target: SentinelTarget) -> dict[str, Any]:
    """The TLS options of the URL as redis-py's arguments, read as for every other client
    (mipos_worker.settings.TlsOptions); kombu reads the same options from the URL."""
    tls = read_tls_query(target.query)
    if tls.problems:
        raise ValueError("; ".join(tls.problems))
    return tls.options.redis_kwargs()


def sentinel_kwargs(settings: RedisSettings, target: SentinelTarget, timeout_s: float) -> dict[str, Any]:
    """How to talk to the Sentinels themselves: their password, TLS as for Redis, bounded."""
    kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if settings.sentinel_password:
        kwargs["password"] = settings.sentinel_password
    if target.tls:
        kwargs.update(ssl=True, **ssl_kwargs(target))
    return kwargs


def sentinel_master_client(url: str, settings: RedisSettings, timeout_s: float,
                           retries: int) -> redis.Redis:
    """A redis-py client for the master the Sentinels name; it re-asks them on every new connection."""
    target = target_of(url)
    assert settings.sentinel_master is not None, "REDIS_SENTINEL_MASTER is checked with REDIS_URL"
    master_kwargs: dict[str, Any] = {
        "db": target.db, "username": target.username, "password": target.password,
        "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
        "health_check_interval": 30, "retry": Retry(NoBackoff(), retries),
    }
    if target.tls:
        master_kwargs.update(connection_class=SentinelManagedSSLConnection, **ssl_kwargs(target))
    sentinel = Sentinel(list(target.sentinels),
                        sentinel_kwargs=sentinel_kwargs(settings, target, timeout_s))
    return sentinel.master_for(settings.sentinel_master, **master_kwargs)


def kombu_sentinel_options(settings: RedisSettings, timeout_s: float) -> dict[str, Any]:
    """kombu's ``sentinel`` transport options: which master, and how to reach the Sentinels.
    (kombu reads the master's password, database and TLS from the URL itself.)"""
    if settings.sentinel_master is None:
        return {}
    return {
        "master_name": settings.sentinel_master,
        "sentinel_kwargs": sentinel_kwargs(settings, target_of(settings.url), timeout_s),
    }
