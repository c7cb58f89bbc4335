"""Orders that failed for good, kept in Redis with everything known about them."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

DEAD_LETTER_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True)
class DeadLetter:
    id: str
    action: str
    order: dict[str, Any]  # the arguments as received (they may be the invalid ones)
    reason: str  # permanent, attempts, deadline, invalid
    error: str | None
    task_id: str
    enqueued_at: float | None
    failed_at: float
    attempts: list[dict[str, Any]] = field(default_factory=list)


class DeadLetters:
    def __init__(self, redis_client: redis.Redis, key_prefix: str) -> None:
        self.redis = redis_client
        self.index_key = f"{key_prefix}dead"
        self.item_prefix = f"{key_prefix}dead:"
        self.by_order_prefix = f"{key_prefix}dead-order:"

    def add(
        self,
        *,
        action: str,
        order: dict[str, Any],
        reason: str,
        error: str | None,
        task_id: str,
        enqueued_at: float | None,
        attempts: list[dict[str, Any]],
    ) -> DeadLetter:
        letter = DeadLetter(
            id=uuid.uuid4().hex[:16],
            action=action,
            order=order,
            reason=reason,
            error=error,
            task_id=task_id,
            enqueued_at=enqueued_at,
            failed_at=time.time(),
            attempts=attempts,
        )
        pipe = self.redis.pipeline()
        pipe.set(self.item_prefix + letter.id, json.dumps(asdict(letter)), ex=DEAD_LETTER_TTL_S)
        pipe.zadd(self.index_key, {letter.id: letter.failed_at})
        order_key = f"{order.get('store_id')}/{order.get('order_external_id')}"
        pipe.set(self.by_order_prefix + order_key, letter.id, ex=DEAD_LETTER_TTL_S)
        pipe.execute()
        return letter

    def latest_for(self, store_id: str, order_external_id: str) -> DeadLetter | None:
        letter_id: Any = self.redis.get(f"{self.by_order_prefix}{store_id}/{order_external_id}")
        if not letter_id:
            return None
        return self.get(letter_id.decode() if isinstance(letter_id, bytes) else str(letter_id))

    def get(self, letter_id: str) -> DeadLetter | None:
        raw = self.redis.get(self.item_prefix + letter_id)
        return DeadLetter(**json.loads(raw)) if raw else None

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        """Newest first."""
        ids: list[Any] = list(self.redis.zrevrange(self.index_key, 0, -1 if limit is None else limit - 1))
        letters = []
        for letter_id in ids:
            letter = self.get(letter_id.decode() if isinstance(letter_id, bytes) else str(letter_id))
            if letter is not None:
                letters.append(letter)
        return letters


def list_dead_letters(limit: int | None = None) -> list[DeadLetter]:
    """The dead letters in the Redis of ``REDIS_URL``, newest first."""
    from worker.runtime import producer_redis
    from config import load_producer_settings

    return DeadLetters(producer_redis(), load_producer_settings().key_prefix).list(limit)
