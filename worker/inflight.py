"""Every order task that is not finished yet, kept beside the broker: nothing is lost.

kombu's Redis transport pops a message (BRPOP) and only then records it as
unacknowledged (a second command). A worker killed, or a Redis restarted,
between the two loses the message for good (seen in the chaos run; see
kombu#1733 for a cousin). So the producer registers each task here before
publishing it; the worker refreshes the entry's heartbeat at every delivery
and removes it once the order is final. A sweeper (``worker/rescue.py``)
re-publishes any entry that is stale and is neither queued nor unacknowledged.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from worker.ledger import note_order_task
from worker.orders import order_key

INFLIGHT_TTL_S = 7 * 24 * 3600
InflightEntry = tuple[dict[str, Any], float | None]  # the registered message; when it is next due


class InflightRegistry:
    def __init__(self, redis_client: redis.Redis, key_prefix: str) -> None:
        self.redis = redis_client
        self.prefix = key_prefix
        self.entries_key = f"{key_prefix}inflight"
        self.heartbeats_key = f"{key_prefix}inflight:heartbeat"

    def register(self, task_id: str, task_name: str, kwargs: dict[str, Any],
                 countdown: float | None = None) -> None:
        """Record the message about to be published; its next sign of life is due after ``countdown``."""
        entry = json.dumps({"task": task_name, "kwargs": kwargs})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.entries_key, task_id, entry)
        pipe.zadd(self.heartbeats_key, {task_id: time.time() + (countdown or 0.0)})
        note_order_task(pipe, self.prefix, order_key(kwargs.get("store_id"), kwargs.get("order_external_id")),
                        task_id)
        pipe.execute()

    def entry(self, task_id: str) -> InflightEntry | None:
        """The registered message of an unfinished task and when it is next due; None if final."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.entries_key, task_id)
        pipe.zscore(self.heartbeats_key, task_id)
        raw, due = pipe.execute()
        if raw is None:
            return None
        return json.loads(raw), (float(due) if due is not None else None)

    def heartbeat(self, task_id: str) -> None:
        self.redis.zadd(self.heartbeats_key, {task_id: time.time()}, xx=True)

    def forget(self, task_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.entries_key, task_id)
        pipe.zrem(self.heartbeats_key, task_id)
        pipe.execute()

    def stale(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, dict[str, Any], float]]:
        """Entries without a sign of life for ``older_than_s``: (task id, entry, last seen)."""
        ceiling = time.time() - older_than_s
        found: list[Any] = list(self.redis.zrangebyscore(self.heartbeats_key, "-inf", ceiling,
                                                         start=0, num=limit, withscores=True))
        result = []
        for raw_id, seen in found:
            task_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            raw = self.redis.hget(self.entries_key, task_id)
            if raw is None:
                self.redis.zrem(self.heartbeats_key, task_id)
                continue
            result.append((task_id, json.loads(raw), float(seen)))
        return result

    def order_keys(self) -> set[str]:
        """``store/order`` of every unfinished task (for reconciliation)."""
        keys = set()
        for raw in self.redis.hvals(self.entries_key):
            kwargs = json.loads(raw).get("kwargs", {})
            keys.add(order_key(kwargs.get("store_id"), kwargs.get("order_external_id")))
        return keys

    def count(self) -> int:
        return int(self.redis.hlen(self.entries_key))
