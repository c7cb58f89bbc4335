"""One clock for every producer and worker: Redis's ``TIME``.

The deadline compares the time an order was enqueued with the time an attempt
starts, on different hosts. Host clocks drift and are set wrong; the Redis
server every process already shares is one clock for all. Producers stamp the
enqueue time from ``TIME`` in the same round trip as their registration
(``mipos_worker/state/inflight.py``); a worker keeps its offset from Redis's clock,
measured now and then, and reads its own clock through it.
"""

from __future__ import annotations

import threading
import time

import redis

RESYNC_EVERY_S = 30.0


def redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1_000_000


class SharedClock:
    def __init__(self, client: redis.Redis, resync_every_s: float = RESYNC_EVERY_S) -> None:
        self.redis = client
        self.resync_every_s = resync_every_s
        self._offset = 0.0
        self._synced_at: float | None = None  # monotonic
        self._lock = threading.Lock()

    def now(self) -> float:
        """Redis's time, read through this host's clock and the last measured offset."""
        synced = self._synced_at
        if synced is None or time.monotonic() - synced > self.resync_every_s:
            self._sync()
        return time.time() + self._offset

    def _sync(self) -> None:
        with self._lock:
            before = time.time()
            try:
                server = redis_time(self.redis)
            except redis.RedisError:
                if self._synced_at is None:
                    raise
                return  # keep the last offset; try again on the next read
            after = time.time()
            self._offset = server - (before + after) / 2
            self._synced_at = time.monotonic()
