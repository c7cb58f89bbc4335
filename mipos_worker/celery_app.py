"""The Celery app the accept and deny tasks belong to, as the POS's process needs it.

Importing this needs only ``REDIS_URL``. Everything here is what a producer and
a worker must agree on (serializer, queue, the at-least-once options the task
class carries); what only a consuming process needs (the visibility timeout,
the worker's signals, the task modules to import) is added by the worker's
wiring in its checkout (``worker/wiring/celery_app.py``) on this same app.

The app never becomes Celery's current app, and its tasks are not shared with
other apps: a POS with a Celery app of its own keeps it as it was.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from mipos_worker.names import QUEUE
from mipos_worker.settings import RedisSettings, load_producer_settings
from mipos_worker.state.sentinel import kombu_sentinel_options

__all__ = ["QUEUE", "app", "transport_options"]

# Bounded so that a POS calling `delay()` never hangs on a Redis that is down
# or does not answer: it gets an exception within a few seconds.
PRODUCER_TRANSPORT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 3,
    "socket_connect_timeout": 2,
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 0.5,
}

# Behind Sentinel (REDIS_URL=sentinel://...): how long to wait for a Sentinel's answer;
# kombu asks them for the master on every new connection, so it follows a failover.
SENTINEL_TIMEOUT_S = 2.0


def transport_options(settings: RedisSettings) -> dict[str, Any]:
    return {**PRODUCER_TRANSPORT_OPTIONS, **kombu_sentinel_options(settings, SENTINEL_TIMEOUT_S)}


def _build_app() -> Celery:
    settings = load_producer_settings()
    app = Celery("mipos", set_as_current=False)
    app.conf.update(
        broker_url=settings.url,
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(settings),
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 0.5,
        },
        # JSON only: a pickled message is refused, never executed.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=QUEUE,
        # At-least-once: acknowledge after the attempt, hand the message back if
        # the process running it dies, and reserve one message at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Flower sees tasks as they are sent and run.
        worker_send_task_events=True,
        task_send_sent_event=True,
        enable_utc=True,
    )
    return app


app = _build_app()
