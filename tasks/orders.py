"""The accept and deny tasks in a worker: the POS-side tasks (``mipos_worker``) given their delivery.

The tasks themselves, their names and their checks are the POS side's
(``mipos_worker/order_tasks.py``); this module, which the worker imports
(``include``), hands them the story of one delivery (``worker/attempt/story.py``)
and turns its ending into Celery's terms.
"""

from __future__ import annotations

from typing import Any

import redis
from celery.exceptions import Reject

from mipos_worker.order.errors import OrderFailed
from mipos_worker.order.model import Action
from mipos_worker.order_tasks import (
    OrderTask,
    accept_order,
    deliver_with,
    deny_order,
    internal_publish,
    publish_order,
)
from worker.attempt.story import ComeBack, DeadLettered, Delivery
from worker.mipos.errors import TransientError
from worker.wiring.runtime import get_runtime

__all__ = ["accept_order", "deny_order", "publish_order", "run_attempt", "OrderTask"]


def run_attempt(task: OrderTask, action: Action, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """One delivery, then its ending in Celery's terms: return, retry, or fail the task."""
    try:
        ending = Delivery(action, task.request.id, get_runtime(), args, kwargs).run()
        if isinstance(ending, ComeBack):
            # With ``exc``, Flower's RETRY row says why: "Retry in 3s: TransientError('Server Error')".
            exc = TransientError(ending.reason) if ending.reason else None
            with internal_publish():
                raise task.retry(args=(), kwargs=ending.message, countdown=ending.countdown_s, exc=exc)
    except redis.RedisError as exc:
        # Shared state unreachable: hand the message back rather than lose it; if Redis
        # is gone altogether the message stays in the unacked set and kombu restores it
        # after the visibility timeout.
        raise Reject(exc, requeue=True) from exc
    if isinstance(ending, DeadLettered):
        raise OrderFailed.for_letter(ending.letter_id, ending.reason, ending.error)


deliver_with(run_attempt)
