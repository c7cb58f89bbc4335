"""The periodic reconciliation sweep (scheduled by the Procfile's ``beat:`` line)."""

from __future__ import annotations

import time
from dataclasses import asdict

import structlog

from mipos_worker.order.model import Action, Order
from mipos_worker.order.stamps import Stamps
from worker.ops.reconciliation import sweep
from worker.state.locks import held_lock
from worker.wiring.celery_app import app
from worker.wiring.runtime import get_runtime

logger = structlog.stdlib.get_logger("mipos.reconcile")


def _resend(action: Action, order: Order, message: str | None) -> None:
    from mipos_worker.order_tasks import publish_order

    arguments: dict[str, str] = order.fields()
    if action is Action.DENY:
        arguments["message"] = message or "Order could not be stored"
    publish_order(action, arguments, Stamps(resend=True))


@app.task(name="mipos.reconcile", ignore_result=True)
def reconcile() -> None:
    """One sweep over the configured stores; a sweep already running elsewhere wins."""
    rt = get_runtime()
    settings = rt.settings.reconcile
    if not settings.stores:
        return
    lock_key = f"{rt.settings.redis.key_prefix}reconcile:lock"
    ttl_s = settings.interval_s + 12 * rt.settings.mipos.timeout_s * len(settings.stores)
    with held_lock(rt.redis, lock_key, ttl_s) as held:
        if not held:
            logger.info("reconcile_skipped", reason="another sweep is running")
            return
        started = time.time()
        logger.info("reconcile_started", stores=list(settings.stores), started_at=started)
        report = sweep(rt, _resend)
        logger.info("reconcile_finished", started_at=started, finished_at=time.time(),
                    **asdict(report))
