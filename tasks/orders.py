"""The accept and deny tasks: what the POS enqueues (``from tasks import accept_order``).

The POS's side of a call is ``worker/wiring/order_task.py`` (arguments checked,
the task registered, then published); the worker's side is the story of one
delivery, ``worker/attempt/story.py``. This module joins them to Celery.
"""

from __future__ import annotations

import inspect
from typing import Any

import redis
from celery.exceptions import Reject

from worker.attempt.story import ComeBack, DeadLettered, Delivery
from worker.mipos.errors import TransientError
from worker.order.errors import OrderFailed
from worker.order.model import ORDER_FIELDS, Action
from worker.wiring.celery_app import app
from worker.wiring.order_task import TASK_NAMES, OrderTask, internal_publish, publish_order
from worker.wiring.runtime import get_runtime

__all__ = ["accept_order", "deny_order", "publish_order", "run_attempt", "OrderTask"]


@app.task(bind=True, base=OrderTask, name=TASK_NAMES[Action.ACCEPT], action=Action.ACCEPT,
          throws=(OrderFailed,))
def accept_order(self: OrderTask, *args: Any, **kwargs: Any) -> None:
    """Tell mipos the POS stored the order: ``delivery_id``, ``store_id``, ``order_external_id``."""
    run_attempt(self, Action.ACCEPT, args, kwargs)


@app.task(bind=True, base=OrderTask, name=TASK_NAMES[Action.DENY], action=Action.DENY,
          throws=(OrderFailed,))
def deny_order(self: OrderTask, *args: Any, **kwargs: Any) -> None:
    """Tell mipos the POS could not store the order; ``message`` says why."""
    run_attempt(self, Action.DENY, args, kwargs)


for _task in (accept_order, deny_order):
    # Show the POS developer the real arguments in help() and IDEs.
    _task.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in ORDER_FIELDS]
        + ([inspect.Parameter("message", inspect.Parameter.KEYWORD_ONLY)] if _task is deny_order else [])
    )


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
