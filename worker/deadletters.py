"""Orders that failed for good, kept in Redis with everything known about them."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from worker.metrics import Metrics
from worker.orders import order_key

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
    replay_of: str | None = None  # this failure ended a replay of that dead letter
    replayed: dict[str, Any] | None = None  # {"task_id", "at"} once an operator replayed it

    @property
    def order_key(self) -> str:
        return order_key(self.order.get("store_id"), self.order.get("order_external_id"))


class DeadLetters:
    """Dead letters by id, in an index by failure time, and by order."""

    def __init__(self, redis_client: redis.Redis, key_prefix: str, metrics: Metrics | None = None) -> None:
        self.redis = redis_client
        self.metrics = metrics
        self.index_key = f"{key_prefix}dead"
        self.item_prefix = f"{key_prefix}dead:"
        self.replay_prefix = f"{key_prefix}dead-replay:"
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
        replay_of: str | None = None,
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
            replay_of=replay_of,
        )
        by_order = self.by_order_prefix + letter.order_key
        pipe = self.redis.pipeline()
        pipe.set(self.item_prefix + letter.id, json.dumps(asdict(letter)), ex=DEAD_LETTER_TTL_S)
        pipe.zadd(self.index_key, {letter.id: letter.failed_at})
        pipe.zadd(by_order, {letter.id: letter.failed_at})
        pipe.expire(by_order, DEAD_LETTER_TTL_S)
        if self.metrics is not None:
            self.metrics.count("mipos_dead_letters_total", pipe, action=action, reason=reason)
        pipe.execute()
        return letter

    def for_order(self, store_id: str, order_external_id: str) -> list[DeadLetter]:
        """Oldest first."""
        ids = self.redis.zrange(self.by_order_prefix + order_key(store_id, order_external_id), 0, -1)
        return [letter for letter in map(self.get, map(_text, ids)) if letter is not None]

    def latest_for(self, store_id: str, order_external_id: str) -> DeadLetter | None:
        letters = self.for_order(store_id, order_external_id)
        return letters[-1] if letters else None

    def get(self, letter_id: str) -> DeadLetter | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.item_prefix + letter_id)
        pipe.get(self.replay_prefix + letter_id)
        raw, replay = pipe.execute()
        if not raw:
            return None
        data = json.loads(raw)
        data["replayed"] = json.loads(replay) if replay else None
        return DeadLetter(**data)

    def list(self, limit: int | None = None, *, since: float | None = None,
             reason: str | None = None, store_id: str | None = None) -> list[DeadLetter]:
        """Newest first, optionally only those failed since ``since`` (a time), for one
        reason, or for one store."""
        ids = self.redis.zrevrangebyscore(self.index_key, "+inf", since if since is not None else "-inf")
        letters = []
        for letter_id in ids:
            letter = self.get(_text(letter_id))
            if letter is None:
                continue
            if reason is not None and letter.reason != reason:
                continue
            if store_id is not None and str(letter.order.get("store_id")) != store_id:
                continue
            letters.append(letter)
            if limit is not None and len(letters) >= limit:
                break
        return letters

    def claim_replay(self, letter_id: str, task_id: str) -> dict[str, Any] | None:
        """Mark the letter replayed as ``task_id``; None if it already was (by anyone)."""
        claim = {"task_id": task_id, "at": time.time()}
        if self.redis.set(self.replay_prefix + letter_id, json.dumps(claim), nx=True,
                          ex=DEAD_LETTER_TTL_S):
            return claim
        return None

    def release_replay(self, letter_id: str, task_id: str) -> None:
        """Undo a claim whose enqueue failed, so the letter can be replayed again."""
        raw = self.redis.get(self.replay_prefix + letter_id)
        if raw and json.loads(raw).get("task_id") == task_id:
            self.redis.delete(self.replay_prefix + letter_id)

    def purge(self, older_than: float) -> int:
        """Delete the dead letters that failed before ``older_than`` (a time); how many."""
        ids = [_text(i) for i in self.redis.zrangebyscore(self.index_key, "-inf", older_than)]
        for letter_id in ids:
            letter = self.get(letter_id)
            pipe = self.redis.pipeline()
            pipe.delete(self.item_prefix + letter_id, self.replay_prefix + letter_id)
            pipe.zrem(self.index_key, letter_id)
            if letter is not None:
                pipe.zrem(self.by_order_prefix + letter.order_key, letter_id)
            pipe.execute()
        return len(ids)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def list_dead_letters(limit: int | None = None) -> list[DeadLetter]:
    """The dead letters in the Redis of ``REDIS_URL``, newest first."""
    from config import load_producer_settings
    from worker.runtime import producer_redis

    return DeadLetters(producer_redis(), load_producer_settings().key_prefix).list(limit)
