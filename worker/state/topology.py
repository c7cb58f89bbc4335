"""Redis behind Sentinel, as the worker watches it: the line that says the master moved,
and what operators see (replication, the Sentinels' quorum).

The clients themselves are the POS side's (``mipos_worker/state/sentinel.py``).

``follow_master_changes`` makes a process notice that: the first time any of
its connections (ours or kombu's) is sent to a different master than before,
it logs ``redis_master_changed`` once, with the old and the new address, and
tells its listeners (the worker counts ``mipos_redis_master_followed_total``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from redis.sentinel import SentinelConnectionPoolProxy

from mipos_worker.settings import RedisSettings
from mipos_worker.state.sentinel import sentinel_kwargs, target_of

logger = structlog.stdlib.get_logger("mipos.redis")

Address = tuple[str, int]
MasterListener = Callable[[str, Address | None, Address], None]  # master name, old, new


def master_address(client: redis.Redis) -> Address | None:
    """The master a Sentinel-managed client talks to (None for a plain URL)."""
    pool = client.connection_pool
    get = getattr(pool, "get_master_address", None)
    if get is None:
        return None
    host, port = get()
    return str(host), int(port)


# -- noticing a failover ------------------------------------------------------


class MasterTracker:
    """The master this process last used, per Sentinel master name; one line when it changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, Address] = {}
        self._listeners: dict[str, MasterListener] = {}
        self.changes = 0  # failovers this process followed

    def listen(self, key: str, listener: MasterListener) -> None:
        """Call ``listener`` on every change; one per ``key`` (a forked child replaces its parent's)."""
        with self._lock:
            self._listeners[key] = listener

    def current(self, name: str) -> Address | None:
        return self._current.get(name)

    def saw(self, name: str, address: Address) -> None:
        with self._lock:
            old = self._current.get(name)
            if old == address:
                return
            self._current[name] = address
            if old is None:
                return  # the first master this process meets: nothing changed
            self.changes += 1
            listeners = list(self._listeners.values())
        logger.warning("redis_master_changed", master_name=name, old=_show(old), new=_show(address),
                       pid=os.getpid(), at=time.time())
        for listener in listeners:
            try:
                listener(name, old, address)
            except Exception:
                logger.debug("redis_master_listener_failed", exc_info=True)


def _show(address: Address | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"


tracker = MasterTracker()
_installed = False
_install_lock = threading.Lock()


def follow_master_changes() -> None:
    """Watch every Sentinel-managed pool of this process, redis-py's and kombu's alike.

    Both ask ``SentinelConnectionPoolProxy.get_master_address`` before each new
    connection to the master; wrapping it (observing only) is the one place that
    sees every pool, including the ones kombu builds inside its channels.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        original = SentinelConnectionPoolProxy.get_master_address

        def get_master_address(self: SentinelConnectionPoolProxy) -> Any:
            address = original(self)
            if self.is_master and address:
                tracker.saw(self.service_name, (str(address[0]), int(address[1])))
            return address

        SentinelConnectionPoolProxy.get_master_address = get_master_address  # type: ignore[method-assign]
        _installed = True


# -- what an operator sees (doctor, /metrics) ----------------------------------


@dataclass(frozen=True)
class Replica:
    address: str
    state: str  # "online" once it has synced
    lag_s: int  # seconds since its last acknowledgement
    behind_bytes: int  # master's replication offset minus the replica's


@dataclass(frozen=True)
class Replication:
    master: str
    replicas: tuple[Replica, ...]

    @property
    def online(self) -> int:
        return sum(1 for r in self.replicas if r.state == "online")


def replication_of(client: redis.Redis) -> Replication:
    """The master this client talks to and its replicas, from INFO replication."""
    info: dict[str, Any] = client.info("replication")  # type: ignore[assignment]
    offset = int(info.get("master_repl_offset", 0))
    replicas = []
    for key, value in sorted(info.items()):
        if key.startswith("slave") and isinstance(value, dict):
            replicas.append(Replica(f"{value.get('ip')}:{value.get('port')}", str(value.get("state")),
                                    int(value.get("lag", 0)), max(0, offset - int(value.get("offset", 0)))))
    where = master_address(client)
    kwargs = client.connection_pool.connection_kwargs
    master = f"{where[0]}:{where[1]}" if where else f"{kwargs.get('host')}:{kwargs.get('port')}"
    return Replication(master, tuple(replicas))


@dataclass(frozen=True)
class SentinelView:
    answered: int  # Sentinels that answered
    configured: int
    quorum: int | None
    quorum_ok: bool
    quorum_detail: str  # SENTINEL CKQUORUM's answer, or why there is none
    failovers: int | None  # the master's config epoch: one per failover since it was first monitored


def sentinel_view(settings: RedisSettings, timeout_s: float = 2.0) -> SentinelView:
    """Ask every Sentinel about the master: how many answer, the quorum, failovers so far."""
    assert settings.sentinel_master is not None
    target = target_of(settings.url)
    kwargs = sentinel_kwargs(settings, target, timeout_s)
    answered, quorum, epoch = 0, None, None
    ok, detail = False, "no Sentinel answered"
    for host, port in target.sentinels:
        client = redis.Redis(host, port, **kwargs)
        try:
            state: dict[str, Any] = client.sentinel_master(settings.sentinel_master)  # type: ignore[assignment]
            answered += 1
            quorum = int(state.get("quorum", 0))
            epoch = max(epoch or 0, int(state.get("config-epoch", 0)))
            if not ok:
                try:
                    detail = str(client.execute_command("SENTINEL CKQUORUM", settings.sentinel_master))
                    ok = True
                except redis.ResponseError as exc:
                    detail = str(exc)
        except redis.RedisError as exc:
            if answered == 0:
                detail = f"{host}:{port}: {exc}"
        finally:
            client.close()
    return SentinelView(answered, len(target.sentinels), quorum, ok, detail, epoch)
