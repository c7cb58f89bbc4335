"""The Celery app in the worker's processes: the POS side's app, given what consuming needs.

The app, its serializer, queue and task options are the POS side's
(``mipos_worker/celery_app.py``). Here it gets what only a consuming process
needs: the task modules to import, the visibility timeout and kombu's restore
interval (from ``MIPOS_TIMEOUT_S`` and ``MIPOS_VISIBILITY_TIMEOUT_S``), the
beat schedule and the worker's signals. Every process that builds the app here
(a worker, Flower, ``doctor``'s ping) sweeps the unacked messages with its own
value, so all must share the workers'. A worker checks every setting in
``celeryd_init`` and exits with one message if any is wrong.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import signals

from config import (
    DeliverySettings,
    ReconcileSettings,
    SettingsError,
    load_checked_worker_settings,
    load_delivery_settings,
    load_producer_settings,
    load_reconcile_settings,
    load_worker_settings,
)
from config import timing as delivery
from mipos_worker.celery_app import QUEUE, app, transport_options
from worker.logs.setup import bind_task_context, clear_task_context, configure_logging
from worker.state.topology import follow_master_changes
from worker.wiring import events_patch
from worker.wiring.rescue import LostMessageSweeper, install_requeue_notes
from worker.wiring.runtime import flush_metrics, get_runtime

__all__ = ["app"]

_redis = load_producer_settings()
_delivery: DeliverySettings
try:
    _delivery = load_delivery_settings()
except SettingsError:
    # Reported where it matters: a worker refuses to start (celeryd_init), Flower and
    # doctor refuse to consume (delivery.broker_settings_problems). A producer only
    # publishes, and publishing never re-queues anything.
    _delivery = load_delivery_settings({})
events_patch.install()  # celery#10434: task events lost with the threads pool
install_requeue_notes(_redis.key_prefix)  # a message handed back is noted before it is (rescue.py)
if _redis.sentinel:
    follow_master_changes()  # one line when a failover moves this process to a new master

app.conf.update(
    include=["tasks.orders", "tasks.reconcile"],
    broker_transport_options={
        **transport_options(_redis),
        "visibility_timeout": delivery.visibility_timeout_s(_delivery),
        "unacked_restore_interval": delivery.restore_interval_s(_delivery),
        "unacked_restore_throttle": 1,
    },
    # Our logging stays in charge.
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)


_reconcile: ReconcileSettings | None
try:
    _reconcile = load_reconcile_settings()
except SettingsError:
    _reconcile = None  # the worker reports it; beat schedules nothing
if _reconcile is not None and _reconcile.stores:
    app.conf.beat_schedule = {
        "reconcile": {
            "task": "mipos.reconcile",
            "schedule": _reconcile.interval_s,
            "options": {"expires": _reconcile.interval_s},  # a late sweep is replaced by the next
        },
    }


@signals.celeryd_init.connect
def _check_settings(**_: Any) -> None:
    """Refuse to start a worker with a broken configuration, naming every problem."""
    try:
        load_checked_worker_settings()
    except SettingsError as exc:
        print(f"mipos-worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    try:
        settings = load_worker_settings()
        configure_logging(settings.log_level, settings.log_format)
    except SettingsError:
        configure_logging()


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    bind_task_context(task_id or "", getattr(task, "name", ""))


@signals.task_postrun.connect
def _clear_task(**_: Any) -> None:
    clear_task_context()


_sweeper: LostMessageSweeper | None = None


@signals.worker_ready.connect
def _start_rescue(**_: Any) -> None:
    """Re-publish order tasks the broker lost (worker/wiring/rescue.py); one thread per worker."""
    global _sweeper
    runtime = get_runtime()
    settings = runtime.settings
    _sweeper = LostMessageSweeper(
        app=app,
        registry=runtime.inflight,
        redis_client=runtime.redis,
        queue=QUEUE,
        silent_after_s=delivery.rescue_after_s(settings),
        interval_s=max(1.0, delivery.restore_interval_s(settings)),
    )
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_rescue(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    flush_metrics()


@signals.worker_process_shutdown.connect
def _flush_child_metrics(**_: Any) -> None:
    flush_metrics()  # a prefork child: its own counts
