"""The sweeper that re-publishes order tasks the broker lost (see ``mipos_worker/state/inflight.py``).

Runs as a thread in every worker's main process; a Redis lock lets one sweep
at a time. A task is re-published only when it has shown no sign of life for
longer than a message can legitimately stay silent (visibility timeout plus a
countdown hop plus two restore sweeps) and it is neither in the queue nor in
kombu's unacknowledged set. If a message is re-published that was not really
lost, the order lock and the ledger still send the order once.

A sweep costs what it finds stale, never the length of the queue:

- Queued? Producers LPUSH and workers BRPOP, and kombu hands a message back
  from its unacked set at the pop end (``rpush`` in ``_do_restore_message``),
  so the queue is ordered by the time of publishing, oldest at the pop end.
  A stale entry can still be waiting only if the oldest queued message
  (``LINDEX queue -1``, on each priority sub-queue) was published no later
  than it was. That oldest message's own registry entry says when
  (``published_at``, Redis's clock); when it cannot say (a message sent by
  name, an entry from before ``published_at``), anything may be queued and
  nothing is rescued this round. So a lost message waits at most as long as
  it would have waited in the queue.
- Held by a worker? A message taken after waiting in the queue longer than the
  silence threshold is stale until its task starts and beats; until then it
  is only in kombu's unacked hash. That hash is scanned (HSCAN, in pages,
  stopping once every candidate is found) only when a sweep has candidates
  left after the queue check: rare, and bounded by what the workers hold, not
  by the backlog.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, cast

import redis
import structlog
from celery import Celery

from mipos_worker.state.inflight import InflightRegistry
from worker.state.kombu_keys import UNACKED_KEY, queue_keys
from worker.state.locks import take_lock

logger = structlog.stdlib.get_logger("mipos.rescue")

UNACKED_SCAN_PAGE = 500

Stale = tuple[str, dict[str, Any], float]  # task id, registry entry, last seen


def _task_id_of(raw: Any, unwrap: bool = False) -> str | None:
    try:
        message: Any = json.loads(raw)
        if unwrap:  # unacked entries are [message, exchange, routing_key]
            message = message[0]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _published_at(raw_entry: Any) -> float | None:
    try:
        value = json.loads(raw_entry).get("published_at")
    except (ValueError, TypeError, AttributeError):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


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
        self.stopped = threading.Event()

    def _queue_keys(self) -> list[str]:
        return queue_keys(self.queue)

    def _oldest_queued_at(self) -> float | None:
        """When the oldest message still queued was published: ``inf`` when nothing is
        queued, None when that cannot be told (then anything may be queued)."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self._queue_keys():
            pipe.lindex(key, -1)
        heads = [raw for raw in pipe.execute() if raw is not None]
        if not heads:
            return float("inf")
        task_ids = [task_id for task_id in map(_task_id_of, heads) if task_id is not None]
        if len(task_ids) < len(heads):
            return None  # not a message of ours: its age is unknown
        entries = self.redis.hmget(self.registry.entries_key, task_ids)
        published = [_published_at(raw) if raw is not None else None for raw in entries]
        if any(at is None for at in published):
            return None
        return min(at for at in published if at is not None)

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
        oldest_queued = self._oldest_queued_at()
        if oldest_queued is None:
            return []
        candidates = []
        for item in stale:
            published = item[1].get("published_at")
            if oldest_queued == float("inf"):
                candidates.append(item)  # nothing is queued at all
            elif isinstance(published, (int, float)) and published < oldest_queued:
                candidates.append(item)  # taken from the queue: every message queued is younger
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
