"""What the workers agree on about each order, kept in Redis.

- the ledger: orders already accepted or denied at mipos (never send again);
- the order lock: one sender per order at a time, across all processes (phases.py takes it);
- the attempt history of each task (for the attempt number and dead letters);
- the "sending" mark of each order: set before a request leaves, cleared after
  its outcome is recorded. Whichever task of the order takes the lock next and
  still finds it knows that request's outcome is unknown (its worker was lost):
  the mark becomes the order's uncertain mark in the same step (phases.py);
- the uncertain mark of each order: a request whose answer never came, kept
  while mipos may still act on the order, until the pending list settles it;
- the tasks of each order (for ``mipos-worker order``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis

from config import RetentionSettings, configured_retention
from config.retention import PENDING_LIST_WINDOW_S
from mipos_worker.order.model import Action, Order
from mipos_worker.state.connection import text, whole_seconds
from mipos_worker.state.inflight import order_tasks_key
from mipos_worker.state.replication import NO_ACK, ReplicaAck

# How long each kind of record stays: settings (config/settings.py), floors in config/retention.py.
# An uncertain or sending mark outlives what it guards by this much (clocks, a slow sweep).
UNCERTAIN_MARGIN_S = 60.0


def note_order_task(pipe: Any, key_prefix: str, order_key: str, task_id: str, ttl_s: float) -> None:
    key = order_tasks_key(key_prefix, order_key)
    pipe.zadd(key, {task_id: time.time()}, nx=True)
    pipe.expire(key, whole_seconds(ttl_s))


@dataclass(frozen=True)
class LedgerEntry:
    action: str
    task_id: str
    at: float
    delivery_id: str
    message: str | None = None  # a deny's reason, for a reconciliation resend
    store_id: str | None = None
    order_external_id: str | None = None
    confirmed_by: str | None = None  # "pending_list": mipos stopped listing it after an unknown outcome

    def compact_json(self) -> str:
        """The stored form: no field the key already holds (the store and order ids), no
        null field, the time to the millisecond; ``LedgerEntry(**json.loads(...))`` reads
        it as it reads the records of earlier versions, which carried every field."""
        kept = {"action": self.action, "task_id": self.task_id, "at": round(self.at, 3),
                "delivery_id": self.delivery_id, "message": self.message, "confirmed_by": self.confirmed_by}
        return json.dumps({k: v for k, v in kept.items() if v is not None}, separators=(",", ":"))


def read_entry(raw: bytes | str, order: Order) -> LedgerEntry:
    entry = LedgerEntry(**json.loads(raw))
    if entry.store_id is None and entry.order_external_id is None:
        entry = replace(entry, store_id=order.store_id, order_external_id=order.order_external_id)
    return entry


@dataclass(frozen=True)
class SendingMark:
    """A request about to leave: which task, which attempt, since when (Redis's clock)."""

    task_id: str
    attempt: int
    action: str
    at: float  # when it was sent: a lost worker's request may land up to one call's bound later
    enqueued_at: float  # of that task: how long mipos may still act on the order
    lock: str  # the lock id of the delivery that sent it: only that delivery clears it

    def json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def remembered_until(enqueued_at: float, deadline_s: float) -> float:
    """Until when an unknown request of an order matters: while its task may still be
    retried, and while mipos may still take either action (it lists the order for
    PENDING_LIST_WINDOW_S from its arrival, which came before the enqueue)."""
    return max(enqueued_at + deadline_s, enqueued_at + PENDING_LIST_WINDOW_S) + UNCERTAIN_MARGIN_S


@dataclass(frozen=True)
class Uncertain:
    """An accept or deny that may have reached mipos: its answer never came."""

    action: str
    task_id: str
    at: float
    enqueued_at: float  # of that task: bounds the order's age at mipos from below


class OrderLedger:
    """With ``ack`` (REDIS_MIN_REPLICAS_ACK > 0) the writes a failover must not lose, the done
    record and the "sending" mark, return only once that many replicas have them
    (mipos_worker/state/replication.py); else NotReplicated, and the task is not acknowledged."""

    def __init__(self, redis_client: redis.Redis, key_prefix: str, ack: ReplicaAck = NO_ACK,
                 retention: RetentionSettings | None = None) -> None:
        self.redis = redis_client
        self.prefix = key_prefix
        self.ack = ack
        self._retention = retention

    @property
    def retention(self) -> RetentionSettings:
        """Given, else read from the environment when first needed (only writers need it)."""
        if self._retention is None:
            self._retention = configured_retention()
        return self._retention

    def done_key(self, order: Order) -> str:
        return f"{self.prefix}done:{order.key}"

    def uncertain_key(self, order: Order) -> str:
        return f"{self.prefix}uncertain:{order.key}"

    def done(self, order: Order) -> LedgerEntry | None:
        raw = self.redis.get(self.done_key(order))
        return read_entry(raw, order) if raw else None

    @staticmethod
    def entry(order: Order, action: Action, task_id: str, message: str | None = None,
              *, confirmed_by: str | None = None) -> LedgerEntry:
        return LedgerEntry(action.value, task_id, time.time(), order.delivery_id, message,
                           order.store_id, order.order_external_id, confirmed_by)

    def record_uncertain(self, order: Order, uncertain: Uncertain, ttl_s: float) -> None:
        """Until settled (a 200, the pending list) or ``ttl_s`` passes (``remembered_until``:
        after it neither the task nor mipos acts on the order any more)."""
        self.redis.set(self.uncertain_key(order), json.dumps(asdict(uncertain)), ex=whole_seconds(ttl_s))

    def clear_uncertain(self, order: Order) -> None:
        self.redis.delete(self.uncertain_key(order))

    def lock_key(self, order: Order) -> str:
        """One sender per order at a time: taken and released by the attempt's phases (phases.py)."""
        return f"{self.prefix}lock:{order.key}"

    def tasks_key(self, order: Order) -> str:
        return order_tasks_key(self.prefix, order.key)

    def history_key(self, task_id: str) -> str:
        return f"{self.prefix}attempts:{task_id}"

    def history(self, task_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.redis.lrange(self.history_key(task_id), 0, -1)]

    def record_attempt(self, task_id: str, record: dict[str, Any], order: Order | None = None) -> None:
        key = self.history_key(task_id)
        pipe = self.redis.pipeline()
        pipe.rpush(key, json.dumps(record))
        pipe.expire(key, whole_seconds(self.retention.history_s))
        if order is not None:
            note_order_task(pipe, self.prefix, order.key, task_id, self.retention.history_s)
        pipe.execute()

    def tasks_for(self, order: Order) -> list[str]:
        """Oldest first."""
        ids = self.redis.zrange(order_tasks_key(self.prefix, order.key), 0, -1)
        return [text(i) for i in ids]

    def sending_key(self, order: Order) -> str:
        return f"{self.prefix}sending:{order.key}"

    def mark_sending(self, order: Order, mark: SendingMark, ttl_s: float) -> None:
        """Before a request leaves; replicated first when asked, so that an answer lost in a
        failover still counts as unknown (settled through the pending list, flagged)."""
        ttl = whole_seconds(max(ttl_s, self.retention.history_s))
        if self.ack.enabled:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self.sending_key(order), mark.json(), ex=ttl)
            self.ack.queue_wait(pipe)
            self.ack.check(pipe.execute()[-1], f"the sending mark of task {mark.task_id}")
            return
        self.redis.set(self.sending_key(order), mark.json(), ex=ttl)

    def clear_sending(self, order: Order, lock_id: str) -> None:
        """The mark of the delivery holding ``lock_id``, once its request's outcome is recorded."""
        self.redis.eval(_CLEAR_OWN_MARK, 1, self.sending_key(order), lock_id)


# The mark holds its delivery's lock id (a 32-digit hex): delete it only if it is ours.
_CLEAR_OWN_MARK = """
local mark = redis.call('get', KEYS[1])
if mark and string.find(mark, ARGV[1], 1, true) then return redis.call('del', KEYS[1]) end
return 0
"""
