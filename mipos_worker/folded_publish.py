"""``delay()``'s registration folded into its publish: one script call, one round trip.

Celery builds the message and kombu's Redis transport the commands that publish
it (the LPUSH, the task-sent event's PUBLISH), as for any publish, inside kombu's
publish batch (kombu 5.7+); instead of a pipeline, the batch here is a collector
whose flush runs them inside the registration's script
(``InflightRegistry.register_and_publish``). So the message is byte for byte
Celery's, it is never on the queue unregistered, and a failed registration
publishes nothing.

Used only where it applies (``can_fold``): kombu's Redis channel with publish
batches and no ``global_keyprefix``; elsewhere ``delay()`` registers, then
publishes, as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from mipos_worker.state.clock import redis_time
from mipos_worker.state.inflight import PUBLISH_COMMANDS

RESYNC_EVERY_S = 30.0


class RedisClock:
    """Redis's ``TIME`` read through this process's monotonic clock, resynced every
    ``resync_every_s``: the message must carry its enqueue time before the script that
    registers it runs. Monotonic, so that a host clock set wrong or stepped meanwhile
    (mipos_worker/state/clock.py's case) changes nothing; off by half a round trip, and by the
    monotonic clock's drift between two syncs (milliseconds)."""

    def __init__(self, client: redis.Redis, resync_every_s: float = RESYNC_EVERY_S) -> None:
        self.redis = client
        self.resync_every_s = resync_every_s
        self._synced: tuple[float, float] | None = None  # (monotonic, Redis's time) at the sync
        self._lock = threading.Lock()

    def now(self) -> float:
        synced = self._synced
        if synced is None or time.monotonic() - synced[0] > self.resync_every_s:
            synced = self._sync()
        return synced[1] + (time.monotonic() - synced[0])

    def _sync(self) -> tuple[float, float]:
        with self._lock:
            before = time.monotonic()
            try:
                server = redis_time(self.redis)
            except redis.RedisError:
                if self._synced is None:
                    raise
                return self._synced  # the last sync still holds; try again at the next read
            self._synced = ((before + time.monotonic()) / 2, server)
            return self._synced


class FoldedBatch:
    """A stand-in for kombu's ``PublishBatch``: collects the Redis commands kombu's transport
    would send; ``flush`` hands them to ``run`` (the registration's script)."""

    def __init__(self, channel: Any, run: Callable[[list[tuple[str, Any, Any]]], None]) -> None:
        self.channel = channel
        self._run = run
        self.commands: list[tuple[str, Any, Any]] = []
        self._collecting: list[tuple[str, tuple[Any, ...]]] | None = None
        self.flushed = False

    def publish(self, message: Any, **kwargs: Any) -> Any:
        collected: list[tuple[str, tuple[Any, ...]]] = []
        self._collecting = collected
        try:
            result = self.channel.basic_publish(message, _publish_batch=self, **kwargs)
        finally:
            self._collecting = None
        for name, args in collected:
            if name not in PUBLISH_COMMANDS or len(args) != 2:
                raise RuntimeError(f"kombu published with {name}{args!r}: not foldable")
            self.commands.append((name, args[0], args[1]))
        return result

    def add(self, name: str, *args: Any) -> None:
        if self._collecting is None:
            raise RuntimeError("a publish command outside a publish")
        self._collecting.append((name, args))

    def flush(self) -> None:
        if self.commands:
            commands, self.commands = self.commands, []
            self._run(commands)
            self.flushed = True

    def discard(self) -> None:
        self.commands = []

    def close(self) -> None:
        self.commands = []


def can_fold(producer: Any) -> bool:
    channel = producer.channel
    return (hasattr(producer, "batch") and bool(getattr(producer, "supports_batch_publish", False))
            and hasattr(channel, "create_publish_batch") and not getattr(channel, "global_keyprefix", ""))


@contextmanager
def folded(producer: Any, run: Callable[[list[tuple[str, Any, Any]]], None]) -> Iterator[FoldedBatch]:
    """Within: the producer's publishes are collected; at the end they go through ``run``
    (raising what it raises). The producer's channel is this caller's while the producer is
    acquired from the pool."""
    channel = producer.channel
    batch = FoldedBatch(channel, run)
    channel.create_publish_batch = lambda max_size: batch
    try:
        with producer.batch(max_size=1_000):
            yield batch
    finally:
        del channel.create_publish_batch
