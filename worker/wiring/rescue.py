"""The sweeper that re-publishes order tasks the broker lost (see ``mipos_worker/state/inflight.py``).

Runs as a thread in every worker's main process; a Redis lock lets one sweep
at a time. A task is re-published only when it has shown no sign of life for
longer than a message can legitimately stay silent (visibility timeout plus a
countdown hop plus two restore sweeps) and it is neither in the queue nor in
kombu's unacknowledged set. If a message is re-published that was not really
lost, the order lock and the ledger still send the order once.

A sweep costs what it finds stale, never the length of the queue. Where a message
can be (``worker/state/kombu_keys.py``): producers LPUSH and workers pop the other
end, so each list (the queue and its priority sub-queues) is ordered by when its
messages were pushed, oldest at the pop end, with two exceptions, both marked
``redelivered`` by kombu:

- Put back at the newest end: ``reject(requeue=True)`` (our task on a Redis
  error, Celery on a lost pool child) LPUSHes a message that may have been
  published long before the younger ones it now waits behind. So every worker
  notes each requeue, just before kombu pushes it (``install_requeue_notes``:
  task id -> Redis's clock, in ``<prefix>rescue:requeued``, kept a day), and a
  task was last pushed at its latest requeue note or, if later, its registration
  (``published_at``, Redis's clock).
- Put back at the pop end: a restore from the unacked hash (warm shutdown,
  visibility timeout) RPUSHes messages one after the other, so the last one
  restored, not the oldest, is first. When a list's oldest message is marked
  ``redelivered``, that run of handed-back messages is read (up to
  ``HANDED_BACK_READ`` of them, one round trip) and the tasks in it count as queued.

Queued? The first message that was not handed back, counted from the pop end, is
the oldest first publication still waiting; everything before it was read, and
everything behind it was pushed after it. Its registry entry says when it was
published. A stale task can still be waiting only if it was read among the
handed-back ones, or it was last pushed no earlier than that oldest publication
(less ``PUSH_SLACK_S``, for the time between a registration or a note and its
push). When that cannot be told (a message not ours or sent by name, an entry
from before ``published_at``, a run of handed-back messages longer than what is
read), anything may be queued and nothing is rescued this round. So a lost
message waits at most as long as it would have waited in the queue, counted from
its last push, plus the slack. This costs a round trip or two, and a note lookup
for the stale tasks only.

Held by a worker? A message taken after waiting in the queue longer than the
silence threshold is stale until its task starts and beats; until then it is
only in kombu's unacked hash. That hash is scanned (HSCAN, in pages, stopping
once every candidate is found) only when a sweep has candidates left after the
queue check: rare, and bounded by what the workers hold, not by the backlog.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
import structlog
from celery import Celery
from kombu.transport import redis as kombu_redis

from mipos_worker.state.inflight import InflightRegistry
from worker.state.kombu_keys import UNACKED_KEY, queue_keys
from worker.state.locks import take_lock

logger = structlog.stdlib.get_logger("mipos.rescue")

UNACKED_SCAN_PAGE = 500
# How many messages a sweep reads from the pop end of a list whose oldest message
# was handed back; a longer run (a big worker shutting down) is consumed first:
# nothing is rescued until it has shrunk.
HANDED_BACK_READ = 100
# Longer than a push can follow its registration or requeue note (a publish's
# retries on a slow Redis): only pushes older than the oldest queued one by more
# than this count as taken.
PUSH_SLACK_S = 60.0
# How long a requeue note is kept: far longer than a message waits in the queue.
REQUEUE_NOTE_KEEP_S = 86_400

Stale = tuple[str, dict[str, Any], float]  # task id, registry entry, last seen

# Note a requeue on Redis's clock (the clock of ``published_at``); forget notes older
# than the keep time, and the whole key a keep time after the last requeue.
_NOTE_REQUEUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('zadd', KEYS[1], string.format('%.6f', now), ARGV[1])
redis.call('zremrangebyscore', KEYS[1], '-inf', string.format('%.6f', now - tonumber(ARGV[2])))
redis.call('expire', KEYS[1], ARGV[2])
"""


def requeue_notes_key(key_prefix: str) -> str:
    return f"{key_prefix}rescue:requeued"


# -- the requeue note: written by every worker, read by the sweep ---------------------------

_notes_key: str | None = None


def install_requeue_notes(key_prefix: str) -> None:
    """Make kombu's ``reject(requeue=True)`` note the task first (idempotent, per process).

    kombu puts a requeued message back at the newest end of the queue and leaves no
    trace of it anywhere else, so the sweep could only find it by reading the whole
    queue. The note is written on the broker connection just before kombu's own
    push. If Redis cannot be reached, the error is the one kombu's push would meet:
    Celery logs that the reject failed and the message stays unacknowledged until
    kombu restores it (at the pop end) after the visibility timeout. If Redis refuses
    the note alone (an error reply), the message is requeued without it. Nothing is
    lost either way.
    """
    global _notes_key
    _notes_key = requeue_notes_key(key_prefix)
    reject = kombu_redis.QoS.reject
    if not getattr(reject, "__mipos_notes_requeue__", False):
        kombu_redis.QoS.reject = _noting_requeues(reject)  # type: ignore[method-assign]


def _noting_requeues(reject: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(reject)
    def noting(self: kombu_redis.QoS, delivery_tag: Any, requeue: bool = False) -> Any:
        if requeue:
            _note_requeue(self, delivery_tag)
        return reject(self, delivery_tag, requeue=requeue)

    noting.__mipos_notes_requeue__ = True  # type: ignore[attr-defined]
    return noting


def _note_requeue(qos: kombu_redis.QoS, delivery_tag: Any) -> None:
    message = qos._delivered.get(delivery_tag)  # what kombu is about to push back
    task_id = (getattr(message, "headers", None) or {}).get("id")
    if _notes_key is None or not task_id:
        return
    try:
        with qos.channel.conn_or_acquire() as client:
            client.eval(_NOTE_REQUEUE, 1, _notes_key, str(task_id), REQUEUE_NOTE_KEEP_S)
    except redis.ResponseError as exc:  # the note refused, not Redis gone: requeue all the same
        logger.warning("requeue_note_failed", task_id=str(task_id), error=f"{type(exc).__name__}: {exc}",
                       consequence="if it waits in the queue longer than the rescue window, "
                                   "it is re-published (the ledger still sends the order once)")


# -- reading kombu's messages ----------------------------------------------------------------

Queued = tuple[str, bool]  # task id; handed back (redelivered) rather than first published


def _queued(raw: Any) -> Queued | None:
    """A queued message's task id and whether kombu handed it back; None if not a task message."""
    try:
        message: Any = json.loads(raw)
        headers = message["headers"]
        delivery_info = message.get("properties", {}).get("delivery_info", {})
        handed_back = bool(headers.get("redelivered") or delivery_info.get("redelivered"))
        return str(headers["id"]), handed_back
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _task_id_of(raw: Any, unwrap: bool = False) -> str | None:
    try:
        message: Any = json.loads(raw)
        if unwrap:  # unacked entries are [message, exchange, routing_key]
            message = message[0]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _published_at(entry: Any) -> float | None:
    value = entry.get("published_at") if isinstance(entry, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _published_at_raw(raw_entry: Any) -> float | None:
    try:
        return _published_at(json.loads(raw_entry))
    except (ValueError, TypeError):
        return None


def _last_pushed_at(entry: dict[str, Any], requeued_at: float | None) -> float | None:
    """When the task's message last went into the queue: its registration (a publish), or a
    later requeue. None when the entry does not say (registered before ``published_at``)."""
    published = _published_at(entry)
    if published is None:
        return None
    return published if requeued_at is None else max(published, requeued_at)


@dataclass(frozen=True)
class PopEnd:
    """One list's pop end: the handed-back run read there, and the first message after it
    that was published rather than handed back (None: the list holds no other)."""
    handed_back: frozenset[str]
    first_published: str | None


def _read_pop_end(page: Sequence[Any], whole_list: bool) -> PopEnd | None:
    """``page``: the list's last messages, in list order (oldest last). None: cannot tell."""
    handed_back: set[str] = set()
    for raw in reversed(page):
        queued = _queued(raw)
        if queued is None:
            return None  # not a task message of ours: its age is unknown
        task_id, was_handed_back = queued
        if not was_handed_back:
            return PopEnd(frozenset(handed_back), task_id)
        handed_back.add(task_id)
    return PopEnd(frozenset(handed_back), None) if whole_list else None


@dataclass(frozen=True)
class QueueView:
    """What the queues say about where a stale task may wait."""
    handed_back: frozenset[str]  # tasks read at the pop ends: queued
    oldest_published_at: float  # the oldest first publication still queued; inf: none

    def may_hold(self, task_id: str, last_pushed_at: float | None) -> bool:
        if task_id in self.handed_back:
            return True
        if self.oldest_published_at == math.inf:
            return False  # nothing else is queued
        return last_pushed_at is None or last_pushed_at >= self.oldest_published_at - PUSH_SLACK_S


class LostMessageSweeper:
    def __init__(self, app: Celery, registry: InflightRegistry, redis_client: redis.Redis,
                 queue: str, silent_after_s: float, interval_s: float) -> None:
        self.app = app
        self.registry = registry
        self.redis = redis_client
        self.queue = queue
        self.silent_after_s = silent_after_s
        self.interval_s = interval_s
        self.lock_key = f"{registry.prefix}rescue:lock"  # one sweeper at a time, across processes
        self.notes_key = requeue_notes_key(registry.prefix)
        self.stopped = threading.Event()
        install_requeue_notes(registry.prefix)  # this worker's requeues, from now on

    def _queue_keys(self) -> list[str]:
        return queue_keys(self.queue)

    def _pop_ends(self) -> list[PopEnd] | None:
        """Each non-empty list's pop end: one round trip, a second only for lists whose oldest
        message was handed back. None when a list cannot be told."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self._queue_keys():
            pipe.lindex(key, -1)
        heads = {key: raw for key, raw in zip(self._queue_keys(), pipe.execute()) if raw is not None}
        ends: list[PopEnd] = []
        to_read: list[str] = []
        for key, raw in heads.items():
            queued = _queued(raw)
            if queued is None:
                return None
            if queued[1]:
                to_read.append(key)
            else:
                ends.append(PopEnd(frozenset(), queued[0]))
        if to_read:
            pipe = self.redis.pipeline(transaction=False)
            for key in to_read:
                pipe.lrange(key, -HANDED_BACK_READ, -1)
                pipe.llen(key)
            replies = pipe.execute()
            for page, length in zip(replies[::2], replies[1::2]):
                end = _read_pop_end(page, whole_list=int(length) <= len(page))
                if end is None:
                    return None
                ends.append(end)
        return ends

    def _queue_view(self) -> QueueView | None:
        ends = self._pop_ends()
        if ends is None:
            return None
        handed_back = frozenset().union(*(end.handed_back for end in ends))
        firsts = [end.first_published for end in ends if end.first_published is not None]
        if not firsts:
            return QueueView(handed_back, math.inf)
        published = [_published_at_raw(raw) if raw is not None else None
                     for raw in self.redis.hmget(self.registry.entries_key, firsts)]
        if any(at is None for at in published):
            return None  # sent by name, finished, or registered before published_at
        return QueueView(handed_back, min(at for at in published if at is not None))

    def _requeued_at(self, task_ids: Sequence[str]) -> dict[str, float]:
        """The requeue notes of ``task_ids`` (one round trip; nothing when there are none)."""
        if not task_ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.zscore(self.notes_key, task_id)
        return {task_id: float(score) for task_id, score in zip(task_ids, pipe.execute())
                if score is not None}

    def _not_queued(self, stale: Iterable[Stale], view: QueueView) -> list[Stale]:
        """Those of ``stale`` no queue can hold: a note is looked up only for a task that would
        count as taken by its registration alone."""
        maybe_taken = [item for item in stale if not view.may_hold(item[0], _published_at(item[1]))]
        notes = self._requeued_at([task_id for task_id, _, _ in maybe_taken])
        return [item for item in maybe_taken
                if not view.may_hold(item[0], _last_pushed_at(item[1], notes.get(item[0])))]

    def _held_by_workers(self, task_ids: set[str]) -> set[str]:
        """Those of ``task_ids`` in kombu's unacked hash; stops once all are found."""
        found: set[str] = set()
        cursor = 0
        while True:
            cursor, page = cast(tuple[int, dict[Any, Any]],
                                self.redis.hscan(UNACKED_KEY, cursor, count=UNACKED_SCAN_PAGE))
            for raw in page.values():
                task_id = _task_id_of(raw, unwrap=True)
                if task_id in task_ids:
                    found.add(task_id)
            if cursor == 0 or found == task_ids:
                return found

    def _lost(self, stale: list[Stale]) -> list[Stale]:
        view = self._queue_view()
        if view is None:
            return []
        candidates = self._not_queued(stale, view)
        if not candidates:
            return []
        held = self._held_by_workers({task_id for task_id, _, _ in candidates})
        return [item for item in candidates if item[0] not in held]

    def sweep_once(self) -> int:
        # Never released: held for two intervals, it lets one worker sweep per interval.
        if take_lock(self.redis, self.lock_key, 2 * self.interval_s) is None:
            return 0  # another worker is sweeping
        stale = self.registry.stale(self.silent_after_s)
        if not stale:
            return 0
        rescued = 0
        for task_id, entry, seen in self._lost(stale):
            kwargs = entry["kwargs"]
            self.registry.register(task_id, entry["task"], kwargs)
            self.app.send_task(entry["task"], kwargs=kwargs, task_id=task_id)
            rescued += 1
            logger.warning(
                "order_rescued", task_id=task_id, task_name=entry["task"],
                delivery_id=kwargs.get("delivery_id"), store_id=kwargs.get("store_id"),
                order_external_id=kwargs.get("order_external_id"),
                silent_for_s=round(time.time() - seen, 1),
                reason="the broker lost the message (neither queued nor unacknowledged)",
            )
        return rescued

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.sweep_once()
            except Exception as exc:  # Redis restarting, say: try again next round
                logger.warning("rescue_sweep_failed", error=f"{type(exc).__name__}: {exc}")

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="mipos-rescue", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopped.set()
