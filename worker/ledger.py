"""What the workers agree on about each order, kept in Redis.

- the ledger: orders already accepted or denied at mipos (never send again);
- the order lock: one sender per order at a time, across all processes;
- the attempt history of each task (for the attempt number and dead letters);
- the "sending" mark: set before a request leaves, cleared after its outcome
  is recorded, so a redelivered message knows the earlier outcome is unknown;
- the tasks of each order (for ``mipos-worker order``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import redis

from worker.locks import release_lock
from worker.orders import Action, Order

LEDGER_TTL_S = 7 * 24 * 3600  # far past mipos's 10-minute window; bounds Redis memory
HISTORY_TTL_S = 7 * 24 * 3600


def order_tasks_key(key_prefix: str, order_key: str) -> str:
    """The tasks ever enqueued or run for one order (``store/order``), by first sight."""
    return f"{key_prefix}order-tasks:{order_key}"


def note_order_task(pipe: Any, key_prefix: str, order_key: str, task_id: str) -> None:
    key = order_tasks_key(key_prefix, order_key)
    pipe.zadd(key, {task_id: time.time()}, nx=True)
    pipe.expire(key, HISTORY_TTL_S)


@dataclass(frozen=True)
class LedgerEntry:
    action: str
    task_id: str
    at: float
    delivery_id: str
    message: str | None = None  # a deny's reason, for a reconciliation resend


class OrderLedger:
    def __init__(self, redis_client: redis.Redis, key_prefix: str) -> None:
        self.redis = redis_client
        self.prefix = key_prefix

    def _done_key(self, order: Order) -> str:
        return f"{self.prefix}done:{order.key}"

    def done(self, order: Order) -> LedgerEntry | None:
        raw = self.redis.get(self._done_key(order))
        return LedgerEntry(**json.loads(raw)) if raw else None

    def record_done(self, order: Order, action: Action, task_id: str,
                    message: str | None = None) -> None:
        entry = LedgerEntry(action.value, task_id, time.time(), order.delivery_id, message)
        self.redis.set(self._done_key(order), json.dumps(asdict(entry)), ex=LEDGER_TTL_S)

    @contextmanager
    def order_lock(self, order: Order, ttl_s: float) -> Iterator[bool]:
        """Yields True when this process may send for ``order`` now."""
        key = f"{self.prefix}lock:{order.key}"
        lock_id = uuid.uuid4().hex
        acquired = bool(self.redis.set(key, lock_id, nx=True, px=max(1, int(ttl_s * 1000))))
        try:
            yield acquired
        finally:
            if acquired:
                release_lock(self.redis, key, lock_id)

    def _history_key(self, task_id: str) -> str:
        return f"{self.prefix}attempts:{task_id}"

    def history(self, task_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.redis.lrange(self._history_key(task_id), 0, -1)]

    def record_attempt(self, task_id: str, record: dict[str, Any], order: Order | None = None) -> None:
        key = self._history_key(task_id)
        pipe = self.redis.pipeline()
        pipe.rpush(key, json.dumps(record))
        pipe.expire(key, HISTORY_TTL_S)
        if order is not None:
            note_order_task(pipe, self.prefix, order.key, task_id)
        pipe.execute()

    def tasks_for(self, order: Order) -> list[str]:
        """Oldest first."""
        ids = self.redis.zrange(order_tasks_key(self.prefix, order.key), 0, -1)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def _sending_key(self, task_id: str) -> str:
        return f"{self.prefix}sending:{task_id}"

    def mark_sending(self, task_id: str, attempt: int) -> None:
        self.redis.set(self._sending_key(task_id), attempt, ex=HISTORY_TTL_S)

    def clear_sending(self, task_id: str) -> None:
        self.redis.delete(self._sending_key(task_id))

    def interrupted_attempt(self, task_id: str) -> int | None:
        """The attempt a crashed worker had in flight for this task, if any."""
        raw = self.redis.get(self._sending_key(task_id))
        return int(raw) if raw is not None else None
