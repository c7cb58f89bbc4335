"""The sweeper that re-publishes order tasks the broker lost (see ``worker/inflight.py``).

Runs as a thread in every worker's main process; a Redis lock lets one sweep
at a time. A task is re-published only when it has shown no sign of life for
longer than a message can legitimately stay silent (visibility timeout plus a
countdown hop plus two restore sweeps) and it is neither in the queue nor in
kombu's unacknowledged set. If a message is re-published that was not really
lost, the order lock and the ledger still send the order once.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import redis
import structlog
from celery import Celery

from worker.inflight import InflightRegistry

logger = structlog.stdlib.get_logger("mipos.rescue")

UNACKED_KEY = "unacked"  # kombu's Redis transport defaults
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)


def _ids_in(raw_messages: list[Any], unwrap: bool) -> set[str]:
    ids = set()
    for raw in raw_messages:
        try:
            message: Any = json.loads(raw)
            if unwrap:  # unacked entries are [message, exchange, routing_key]
                message = message[0]
            ids.add(str(message["headers"]["id"]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue
    return ids


class LostMessageSweeper:
    def __init__(self, app: Celery, registry: InflightRegistry, redis_client: redis.Redis,
                 queue: str, silent_after_s: float, interval_s: float, lock_key: str) -> None:
        self.app = app
        self.registry = registry
        self.redis = redis_client
        self.queue = queue
        self.silent_after_s = silent_after_s
        self.interval_s = interval_s
        self.lock_key = lock_key
        self.stopped = threading.Event()

    def _task_ids_in_broker(self) -> set[str]:
        keys = [self.queue] + [f"{self.queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]
        # Unacked, queue, unacked again: a message moving from the queue to the
        # unacked set while we read is seen in one of them.
        ids = _ids_in(self.redis.hvals(UNACKED_KEY), unwrap=True)
        for key in keys:
            ids |= _ids_in(self.redis.lrange(key, 0, -1), unwrap=False)
        ids |= _ids_in(self.redis.hvals(UNACKED_KEY), unwrap=True)
        return ids

    def sweep_once(self) -> int:
        lock_id = uuid.uuid4().hex
        if not self.redis.set(self.lock_key, lock_id, nx=True, px=int(self.interval_s * 2000)):
            return 0  # another worker is sweeping
        stale = self.registry.stale(self.silent_after_s)
        if not stale:
            return 0
        present = self._task_ids_in_broker()
        rescued = 0
        for task_id, entry, seen in stale:
            if task_id in present:
                continue  # queued behind others, or reserved: not lost
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
