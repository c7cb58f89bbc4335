"""One circuit breaker and one rate limit for all workers, kept in Redis.

Backing off per order is right for a hiccup and wrong for an outage: hundreds
of orders hammer mipos on their own schedules, then sleep through its recovery.
So transient failures toward mipos (token calls included) are counted in a
sliding window shared by every process. Past a threshold the breaker opens:
nobody sends, except one probe at a time; held orders spend no attempts (their
deadline still runs). A successful probe closes it, and held orders come back
oldest deadline first, through a rate limit shared by all processes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import redis
import structlog

from config.settings import BreakerConfig

logger = structlog.stdlib.get_logger("mipos.breaker")

# Open when the window holds `threshold` failures making at least `ratio` of the
# answers; returns {1, failures} if this call opened it.
_RECORD_FAILURE = """
local now = tonumber(ARGV[1])
redis.call('zadd', KEYS[1], now, ARGV[2])
redis.call('zremrangebyscore', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('zremrangebyscore', KEYS[3], '-inf', now - tonumber(ARGV[3]))
redis.call('pexpire', KEYS[1], math.floor(tonumber(ARGV[3]) * 1000) + 1000)
local count = redis.call('zcard', KEYS[1])
local successes = redis.call('zcard', KEYS[3])
local ratio = count / (count + successes)
if count >= tonumber(ARGV[4]) and ratio >= tonumber(ARGV[5]) and redis.call('get', KEYS[2]) ~= 'open' then
  redis.call('set', KEYS[2], 'open')
  return {1, count}
end
return {0, count}
"""

def rate_slot_lua(key: str, limit: str, member: str) -> str:
    """The shared rate limit as a Lua fragment, for this module's script and the attempt's
    start (worker/state/phases.py): with ``now`` (Redis's clock) and ``slot`` (0) defined,
    sets ``slot`` to 1 if fewer than ``limit`` sends were granted in the last second (a
    sliding window: no second, wherever it starts, sees more than the limit)."""
    return f"""
redis.call('zremrangebyscore', {key}, '-inf', now - 1)
if redis.call('zcard', {key}) < tonumber({limit}) then
  redis.call('zadd', {key}, now, {member})
  redis.call('pexpire', {key}, 2000)
  slot = 1
end
"""


_TAKE_SLOT = ("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local slot = 0
""" + rate_slot_lua("KEYS[1]", "ARGV[3]", "ARGV[2]") + """
return slot
""")


Decision = Literal["send", "probe", "hold"]
STATE_KEY = "breaker:state"  # "open" or "closed", after the key prefix
WAITING_KEY = "breaker:waiting"  # held task ids, scored by deadline


class CircuitBreaker:
    def __init__(self, redis_client: redis.Redis, key_prefix: str, settings: BreakerConfig) -> None:
        self.redis = redis_client
        self.settings = settings
        self.failures_key = f"{key_prefix}breaker:failures"
        self.successes_key = f"{key_prefix}breaker:successes"
        self.state_key = f"{key_prefix}{STATE_KEY}"
        self.probe_key = f"{key_prefix}breaker:probe"
        self.waiting_key = f"{key_prefix}{WAITING_KEY}"
        self.rate_key = f"{key_prefix}ratelimit"

    def is_open(self) -> bool:
        return self.settings.enabled and self.redis.get(self.state_key) == b"open"

    def decide(self) -> Decision:
        """Before a send: go ahead, go ahead as the one probe, or hold."""
        if not self.is_open():
            return "send"
        interval_ms = int(self.settings.probe_interval_s * 1000)
        if self.redis.set(self.probe_key, uuid.uuid4().hex, nx=True, px=interval_ms):
            logger.warning("breaker_probe", failures=self.failure_count())
            return "probe"
        return "hold"

    def failure_count(self) -> int:
        self.redis.zremrangebyscore(self.failures_key, "-inf", time.time() - self.settings.window_s)
        return int(self.redis.zcard(self.failures_key))

    def record_failure(self, error: str | None) -> None:
        if not self.settings.enabled:
            return
        opened, count = self.redis.eval(
            _RECORD_FAILURE, 3, self.failures_key, self.state_key, self.successes_key, time.time(),
            uuid.uuid4().hex, self.settings.window_s, self.settings.failure_threshold,
            self.settings.failure_ratio)
        if opened:
            logger.error("breaker_opened", failures=int(count), window_s=self.settings.window_s,
                         threshold=self.settings.failure_threshold, last_error=error)

    def log_closed(self) -> None:
        logger.warning("breaker_closed", waiting=int(self.redis.zcard(self.waiting_key)))

    # -- held orders and the release ---------------------------------------------

    def hold(self, task_id: str, deadline_at: float, now: float) -> None:
        """Scored by the order's deadline (Redis's clock, like ``now``): an entry whose
        order can no longer be sent leaves the set at the next hold or release, whatever
        became of its task, so no orphan waits ahead of live orders."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(self.waiting_key, "-inf", now)
        pipe.zadd(self.waiting_key, {task_id: deadline_at})
        pipe.execute()

    def unhold(self, task_id: str) -> None:
        self.redis.zrem(self.waiting_key, task_id)

    def release_wait_s(self, task_id: str, now: float) -> float:
        """0 when a held order may go now (among the next by deadline, and a slot is free);
        else how long to wait for its turn."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(self.waiting_key, "-inf", now)
        pipe.zrank(self.waiting_key, task_id)
        raw_rank: Any = pipe.execute()[1]
        rank = int(raw_rank) if raw_rank is not None else None
        limit = self.settings.rate_limit_per_s
        if rank is not None and rank >= limit:
            return max(0.2, (rank - limit + 1) / limit)
        if not self.take_slot():
            return 0.2
        self.redis.zrem(self.waiting_key, task_id)
        return 0.0

    def take_slot(self) -> bool:
        """One send from the shared per-second budget."""
        return bool(self.redis.eval(_TAKE_SLOT, 1, self.rate_key, time.time(), uuid.uuid4().hex,
                                    self.settings.rate_limit_per_s))
