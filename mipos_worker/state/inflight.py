"""Every order task that is not finished yet, kept beside the broker: nothing is lost.

kombu's Redis transport pops a message (BRPOP) and only then records it as
unacknowledged (a second command). A worker killed, or a Redis restarted,
between the two loses the message for good (seen in the chaos run; see
kombu#1733 for a cousin). So the producer registers each task here before
publishing it; the worker refreshes the entry's heartbeat at every delivery
and removes it once the order is final (both in an attempt's phases,
``worker/state/phases.py``). A sweeper (``worker/wiring/rescue.py``)
re-publishes any entry that is stale and is neither queued nor unacknowledged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis

from mipos_worker.order.model import order_key
from mipos_worker.order.stamps import STAMPS_KEY, stamps_of
from mipos_worker.settings import load_retention_settings
from mipos_worker.state.clock import redis_time
from mipos_worker.state.connection import text, whole_seconds


def order_tasks_key(key_prefix: str, order_key: str) -> str:
    """The tasks ever enqueued or run for one order (``store/order``), by first sight: written
    here at the registration, and by the worker's ledger after each attempt."""
    return f"{key_prefix}order-tasks:{order_key}"


InflightEntry = tuple[dict[str, Any], float | None]  # the registered message; when it is next due

# Register messages about to be published, each stamped with Redis's clock in the same
# round trip: the enqueue time (given, or now minus the order's age on the producer's
# own clock) and the publish time. KEYS: the registry, the heartbeats, each message's
# order task index, then the keys of the publish commands; ARGV: the index's least TTL,
# the number of messages, six per message (task id, task name, kwargs JSON, countdown,
# enqueue time or "", age), then the publish commands kombu built (register_and_publish),
# three each: lpush/pexpire, the KEYS index of its key, the value; or publish, the
# channel, the payload. They run only once every message is registered, in the same
# script: a message is never on the queue unregistered. Returns the enqueue times as
# strings (a Lua number would come back truncated to an integer). An order's task index
# is kept at least MIPOS_HISTORY_RETENTION_S, never shortened: the worker sets it to its
# own retention after each attempt (worker/state/ledger.py).
_REGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local published = string.format('%.6f', now)
local ttl = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local stamps = {}
for i = 1, count do
  local a = 2 + (i - 1) * 6
  local id = ARGV[a + 1]
  local stamp = string.format('%.6f', tonumber(ARGV[a + 5]) or (now - tonumber(ARGV[a + 6])))
  redis.call('hset', KEYS[1], id, '{"task":' .. cjson.encode(ARGV[a + 2]) .. ',"enqueued_at":' .. stamp
    .. ',"published_at":' .. published .. ',"kwargs":' .. ARGV[a + 3] .. '}')
  redis.call('zadd', KEYS[2], now + tonumber(ARGV[a + 4]), id)
  local index = KEYS[i + 2]
  redis.call('zadd', index, 'NX', now, id)
  if redis.call('ttl', index) < ttl then redis.call('expire', index, ttl) end
  stamps[i] = stamp
end
for c = 3 + count * 6, #ARGV, 3 do
  if ARGV[c] == 'publish' then
    redis.call('publish', ARGV[c + 1], ARGV[c + 2])
  else
    redis.call(ARGV[c], KEYS[tonumber(ARGV[c + 1])], ARGV[c + 2])
  end
end
return stamps
"""
PUBLISH_COMMANDS = ("lpush", "pexpire", "publish")  # what kombu's Redis transport publishes with


class Registration(NamedTuple):
    """One message to register (``InflightRegistry.register_many``)."""

    task_id: str
    task_name: str
    kwargs: dict[str, Any]
    countdown: float | None = None
    enqueued_at: float | None = None
    age_s: float = 0.0


class InflightRegistry:
    def __init__(self, redis_client: redis.Redis, key_prefix: str,
                 index_ttl_s: float | None = None) -> None:
        self.redis = redis_client
        self.prefix = key_prefix
        self._index_ttl_s = index_ttl_s
        self.entries_key = f"{key_prefix}inflight"
        self.heartbeats_key = f"{key_prefix}inflight:heartbeat"
        self._register = redis_client.register_script(_REGISTER)

    def register(self, task_id: str, task_name: str, kwargs: dict[str, Any],
                 countdown: float | None = None, *, enqueued_at: float | None = None,
                 age_s: float = 0.0) -> float:
        """Record the message about to be published; its next sign of life is due after ``countdown``.

        Returns the enqueue time on Redis's clock: ``enqueued_at`` when given (a
        retry), else the one the message's stamps carry, else now minus ``age_s``.
        """
        [stamp] = self.register_many([Registration(task_id, task_name, kwargs, countdown,
                                                   enqueued_at, age_s)])
        return stamp

    def register_many(self, registrations: Sequence[Registration]) -> list[float]:
        """``register`` for several messages in one script call (one round trip); their
        enqueue times, in the same order."""
        if not registrations:
            return []
        return self.register_and_publish(registrations, [])

    def register_and_publish(self, registrations: Sequence[Registration],
                             commands: Sequence[tuple[str, Any, Any]]) -> list[float]:
        """Register, then run kombu's publish ``commands`` (``PUBLISH_COMMANDS``: name, key or
        channel, value) in the same script: one round trip, the messages never on the queue
        unregistered, and none of them there when the registration fails."""
        keys = [self.entries_key, self.heartbeats_key]
        args: list[Any] = [whole_seconds(self.index_ttl_s), len(registrations)]
        for one in registrations:
            kwargs = one.kwargs
            keys.append(order_tasks_key(self.prefix, order_key(kwargs.get("store_id"),
                                                               kwargs.get("order_external_id"))))
            # None: a message published again as it was (the rescue sweep) keeps its own stamp.
            enqueued_at = stamps_of(kwargs).enqueued_at if one.enqueued_at is None else one.enqueued_at
            args += [one.task_id, one.task_name, json.dumps(kwargs), one.countdown or 0.0,
                     "" if enqueued_at is None else repr(float(enqueued_at)), max(0.0, one.age_s)]
        for name, target, value in commands:
            if name not in PUBLISH_COMMANDS:
                raise ValueError(f"{name!r} is not a publish command ({', '.join(PUBLISH_COMMANDS)})")
            if name != "publish":  # a key: declared in KEYS, as a script's keys must be
                keys.append(target)
                target = len(keys)
            args += [name, target, value]
        stamps = self._register(keys=keys, args=args)
        return [float(stamp) for stamp in stamps]

    @property
    def index_ttl_s(self) -> float:
        """MIPOS_HISTORY_RETENTION_S: given, else read when first needed (the POS side)."""
        if self._index_ttl_s is None:
            self._index_ttl_s = load_retention_settings().history_s
        return self._index_ttl_s

    def entry(self, task_id: str) -> InflightEntry | None:
        """The registered message of an unfinished task and when it is next due; None if final."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.entries_key, task_id)
        pipe.zscore(self.heartbeats_key, task_id)
        raw, due = pipe.execute()
        if raw is None:
            return None
        return _message(raw), (float(due) if due is not None else None)

    def stale(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, dict[str, Any], float]]:
        """Entries without a sign of life for ``older_than_s``: (task id, entry, last seen)."""
        ceiling = redis_time(self.redis) - older_than_s
        found: list[Any] = list(self.redis.zrangebyscore(self.heartbeats_key, "-inf", ceiling,
                                                         start=0, num=limit, withscores=True))
        result = []
        for raw_id, seen in found:
            task_id = text(raw_id)
            raw = self.redis.hget(self.entries_key, task_id)
            if raw is None:
                self.redis.zrem(self.heartbeats_key, task_id)
                continue
            result.append((task_id, _message(raw), float(seen)))
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


def _message(raw: bytes | str) -> dict[str, Any]:
    """A registry entry with the enqueue time put back among the message's stamps,
    so that ``entry["kwargs"]`` is the message to publish again."""
    entry: dict[str, Any] = json.loads(raw)
    kwargs = entry.get("kwargs")
    if isinstance(kwargs, dict) and entry.get("enqueued_at") is not None:
        stamps = kwargs.get(STAMPS_KEY)
        kwargs[STAMPS_KEY] = {**(stamps if isinstance(stamps, dict) else {}),
                              "enqueued_at": entry["enqueued_at"]}
    return entry
