"""The two round trips of a plain attempt: its start and its end, each one script.

An attempt used to make some twenty round trips to Redis (heartbeat, sending
mark, history, lock, ledger, breaker, rate slot, token, then history, done
record, release, registry, breaker's window). Each phase here is one script
over the keys their owners name (ledger, in-flight registry, breaker, token
store); no key is spelled here. Rare paths (a lost worker's attempt, an
unknown outcome, the breaker open, a held order) keep their own calls.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from config.retention import PENDING_LIST_WINDOW_S
from mipos_worker.order.model import Action, Order
from mipos_worker.state.connection import milliseconds, whole_seconds
from mipos_worker.state.inflight import InflightRegistry
from worker.state.breaker import CircuitBreaker, rate_slot_lua
from worker.state.ledger import (
    UNCERTAIN_MARGIN_S,
    LedgerEntry,
    OrderLedger,
    SendingMark,
    Uncertain,
    read_entry,
)

# KEYS: heartbeats, the order's sending mark, history, lock, done, uncertain, breaker state,
#       rate window, token
# ARGV: task id, lock id, lock ttl ms, take the lock (1/0), held (1/0), resend (1/0), action,
#       rate limit per s, rate member, sending ttl s, breaker enabled (1/0),
#       a lost attempt's record (JSON), the history key prefix, deadline s, pending window s,
#       margin s, this task's enqueue time, history ttl s
# Only the lock's holder reads the order's sending mark: a mark it finds was left by a
# delivery that no longer holds the lock, so its worker was lost mid-request. In this same
# step the mark becomes the order's uncertain mark (kept while mipos may still act on the
# order) and the lost task's history gets the unknown attempt; a copy that cannot take the
# lock leaves a live request's mark alone.
# The sending mark is set (for the next attempt number) only when a plain send follows for
# sure: the lock is ours, nothing is done or maybe done, the breaker is closed, a rate slot
# was free. Otherwise the caller decides, and marks before it sends (OrderLedger.mark_sending).
_BEGIN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stamp = string.format('%.6f', now)
redis.call('zadd', KEYS[1], 'XX', now, ARGV[1])
local token = redis.call('get', KEYS[9])
if ARGV[4] ~= '1' or not redis.call('set', KEYS[4], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {stamp, false, redis.call('lrange', KEYS[3], 0, -1), 0, false, false, 0, 0, 0, token}
end
local lost = redis.call('get', KEYS[2])
if lost then
  local ok, mark = pcall(cjson.decode, lost)
  if ok and type(mark) == 'table' and type(mark['task_id']) == 'string' then
    local record = cjson.decode(ARGV[12])
    record['attempt'] = tonumber(mark['attempt']) or 0
    record['at'] = now
    local history_key = ARGV[13] .. mark['task_id']
    redis.call('rpush', history_key, cjson.encode(record))
    redis.call('expire', history_key, ARGV[18])
    local enqueued = tonumber(mark['enqueued_at']) or now
    local until_ = math.max(enqueued + tonumber(ARGV[14]), enqueued + tonumber(ARGV[15])) + tonumber(ARGV[16])
    redis.call('set', KEYS[6], cjson.encode({action = mark['action'], task_id = mark['task_id'],
      at = tonumber(mark['at']) or now, enqueued_at = enqueued}), 'EX', math.max(1, math.ceil(until_ - now)))
  end
  redis.call('del', KEYS[2])
end
local history = redis.call('lrange', KEYS[3], 0, -1)
local done = redis.call('get', KEYS[5])
local uncertain = redis.call('get', KEYS[6])
local open = ARGV[11] == '1' and redis.call('get', KEYS[7]) == 'open'
local sendable = not done
if done and ARGV[6] == '1' then
  local ok, entry = pcall(cjson.decode, done)
  sendable = ok and entry['action'] == ARGV[7]
end
local slot, marked = 0, 0
if sendable and not open and ARGV[5] ~= '1' then
""" + rate_slot_lua("KEYS[8]", "ARGV[8]", "ARGV[9]") + """
  local last_unknown = false
  if #history > 0 then
    local ok, record = pcall(cjson.decode, history[#history])
    last_unknown = (not ok) or record['outcome_unknown'] == true
  end
  if slot == 1 and not uncertain and not last_unknown then
    marked = #history + 1
    redis.call('set', KEYS[2], cjson.encode({task_id = ARGV[1], attempt = marked, action = ARGV[7],
      at = now, enqueued_at = tonumber(ARGV[17]) or now, lock = ARGV[2]}), 'EX', ARGV[10])
  end
end
return {stamp, lost or false, history, 1, done, uncertain, open and 1 or 0, slot, marked, token}
"""

# KEYS: history, order's tasks, done, uncertain, the order's sending mark, lock, in-flight entries, heartbeats,
#       breaker successes, breaker state, breaker failures
# ARGV: task id, lock id ('' none), history ttl s, clear sending (1/0), final (1/0),
#       breaker success (1/0), breaker window s, success member, local now, done ttl s,
#       done entry ('' none), then the attempt records
# Returns 1 when this end closed the breaker.
_FINISH = """
local records = #ARGV - 11
if records > 0 then
  local t = redis.call('TIME')
  for i = 12, #ARGV do redis.call('rpush', KEYS[1], ARGV[i]) end
  redis.call('expire', KEYS[1], ARGV[3])
  if KEYS[2] ~= '' then
    redis.call('zadd', KEYS[2], 'NX', tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
    redis.call('expire', KEYS[2], ARGV[3])
  end
end
if ARGV[11] ~= '' then
  redis.call('set', KEYS[3], ARGV[11], 'EX', ARGV[10])
  redis.call('del', KEYS[4])
end
if ARGV[4] == '1' and ARGV[2] ~= '' then  -- the order's sending mark, if it is this delivery's
  local mark = redis.call('get', KEYS[5])
  if mark and string.find(mark, ARGV[2], 1, true) then redis.call('del', KEYS[5]) end
end
if ARGV[2] ~= '' and redis.call('get', KEYS[6]) == ARGV[2] then redis.call('del', KEYS[6]) end
if ARGV[5] == '1' then
  redis.call('hdel', KEYS[7], ARGV[1])
  redis.call('zrem', KEYS[8], ARGV[1])
end
local closed = 0
if ARGV[6] == '1' then
  local now, window = tonumber(ARGV[9]), tonumber(ARGV[7])
  redis.call('zadd', KEYS[9], now, ARGV[8])
  redis.call('zremrangebyscore', KEYS[9], '-inf', now - window)
  redis.call('pexpire', KEYS[9], math.floor(window * 1000) + 1000)
  if redis.call('get', KEYS[10]) == 'open' then
    redis.call('set', KEYS[10], 'closed')
    redis.call('del', KEYS[11])
    closed = 1
  end
end
return closed
"""


# What a lost worker's attempt looks like in its task's history (the script fills in
# the attempt number and the time).
LOST_ATTEMPT: dict[str, Any] = {
    "attempt": 0, "at": 0.0, "outcome": "unknown", "http_status": None,
    "error": "the worker was lost during the attempt", "error_class": "transient", "retry_in_s": None,
    "elapsed_ms": None, "counted": True, "outcome_unknown": True}
_LOST_ATTEMPT_JSON = json.dumps(LOST_ATTEMPT)  # an argument of every start: packed once


def _sending_mark(raw: Any) -> SendingMark | None:
    """A lost worker's mark, as the start found it (None: none, or unreadable)."""
    if not raw:
        return None
    try:
        return SendingMark(**json.loads(raw))
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Start:
    """What an attempt knows after its first round trip."""

    now: float  # Redis's clock
    interrupted: SendingMark | None  # a lost worker's request of this order, now the uncertain mark
    history: list[dict[str, Any]]  # this task's attempts so far
    locked: bool  # the order's lock is ours (lock_id)
    lock_id: str
    done: LedgerEntry | None
    uncertain: Uncertain | None
    breaker_open: bool
    slot: bool  # a send from the shared rate limit was granted
    marked: int | None  # the sending mark was set for this attempt number
    token: bytes | None  # the stored token, as the token store keeps it


class AttemptPhases:
    def __init__(self, redis_client: redis.Redis, ledger: OrderLedger, inflight: InflightRegistry,
                 breaker: CircuitBreaker) -> None:
        self.redis = redis_client
        self.ledger = ledger
        self.inflight = inflight
        self.breaker = breaker
        self._begin = redis_client.register_script(_BEGIN)
        self._finish = redis_client.register_script(_FINISH)

    def begin(self, task_id: str, order: Order | None, action: Action, *, token_key: str,
              take_lock: bool, lock_ttl_s: float, held: bool = False, resend: bool = False,
              enqueued_at: float = 0.0, deadline_s: float = 0.0, sending_ttl_s: float = 0.0) -> Start:
        """Heartbeat, this task's history, the stored token; with ``take_lock`` also the order's
        lock, a lost worker's request turned into the uncertain mark, its ledger state, the
        breaker, a rate slot and the sending mark."""
        ledger, breaker = self.ledger, self.breaker
        lock_id = uuid.uuid4().hex
        order_keys = ([ledger.lock_key(order), ledger.done_key(order), ledger.uncertain_key(order)]
                      if order is not None else ["", "", ""])
        keys = [self.inflight.heartbeats_key, ledger.sending_key(order) if order is not None else "",
                ledger.history_key(task_id), *order_keys, breaker.state_key, breaker.rate_key, token_key]
        history_s = whole_seconds(ledger.retention.history_s)
        args: list[Any] = [task_id, lock_id, milliseconds(lock_ttl_s), int(take_lock and order is not None),
                int(held), int(resend), action.value, breaker.settings.rate_limit_per_s, uuid.uuid4().hex,
                whole_seconds(max(sending_ttl_s, ledger.retention.history_s)), int(breaker.settings.enabled),
                _LOST_ATTEMPT_JSON, ledger.history_key(""), deadline_s, PENDING_LIST_WINDOW_S,
                UNCERTAIN_MARGIN_S, repr(float(enqueued_at)), history_s]
        if ledger.ack.enabled and take_lock:  # a sending mark must be on the replicas before we send
            pipe = self.redis.pipeline(transaction=False)
            pipe.eval(_BEGIN, len(keys), *keys, *args)
            ledger.ack.queue_wait(pipe)
            reply, acked = pipe.execute()
            if int(reply[8]):
                ledger.ack.check(acked, f"the sending mark of task {task_id}")
        else:
            reply = self._begin(keys=keys, args=args)
        stamp, lost, history, locked, done, uncertain, is_open, slot, marked, token = reply
        return Start(
            now=float(stamp),
            interrupted=_sending_mark(lost),
            history=[json.loads(item) for item in history],
            locked=bool(int(locked)),
            lock_id=lock_id,
            done=read_entry(done, order) if done and order is not None else None,
            uncertain=Uncertain(**json.loads(uncertain)) if uncertain else None,
            breaker_open=bool(int(is_open)),
            slot=bool(int(slot)),
            marked=int(marked) or None,
            token=token,
        )

    def finish(self, task_id: str, order: Order | None, *, records: list[dict[str, Any]],
               lock_id: str | None, clear_sending: bool, final: bool, breaker_success: bool,
               done: LedgerEntry | None = None) -> bool:
        """The attempt's records, the done record, the sending mark cleared, the lock released,
        the task out of the in-flight registry (``final``), the breaker told of an answer.
        Returns True when this closed the breaker."""
        ledger, breaker = self.ledger, self.breaker
        if order is None:  # arguments that could not be read: no order keys
            order_keys = ["", "", ""]
        else:
            order_keys = [ledger.tasks_key(order), ledger.done_key(order), ledger.uncertain_key(order)]
        keys = [ledger.history_key(task_id), *order_keys, ledger.sending_key(order) if order is not None else "",
                ledger.lock_key(order) if order is not None else "", self.inflight.entries_key,
                self.inflight.heartbeats_key, breaker.successes_key, breaker.state_key, breaker.failures_key]
        success = breaker_success and breaker.settings.enabled
        args: list[Any] = [
            task_id, lock_id or "", whole_seconds(ledger.retention.history_s), int(clear_sending), int(final),
            int(success), breaker.settings.window_s, uuid.uuid4().hex, time.time(),
            whole_seconds(ledger.retention.done_s), done.compact_json() if done else "",
            *(json.dumps(record) for record in records)]
        if ledger.ack.enabled and done is not None:  # the done record on the replicas, or not acknowledged
            pipe = self.redis.pipeline(transaction=False)
            pipe.eval(_FINISH, len(keys), *keys, *args)
            ledger.ack.queue_wait(pipe)
            closed, acked = pipe.execute()
            ledger.ack.check(acked, f"the done record of order {done.store_id}/{done.order_external_id}")
        else:
            closed = self._finish(keys=keys, args=args)
        return bool(int(closed))
