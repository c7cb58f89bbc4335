"""The periodic reconciliation sweep (scheduled by the Procfile's ``beat:`` line)."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict

import structlog

from worker.celery_app import app
from worker.locks import release_lock
from worker.orders import Action, Order
from worker.reconcile import sweep
from worker.runtime import get_runtime
from worker.stamps import Stamps

logger = structlog.stdlib.get_logger("mipos.reconcile")



def _resend(action: Action, order: Order, message: str | None) -> None:
    from tasks.orders import publish_order

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
    lock_id = uuid.uuid4().hex
    ttl_ms = int((settings.interval_s + 12 * rt.settings.mipos.timeout_s * len(settings.stores)) * 1000)
    if not rt.redis.set(lock_key, lock_id, nx=True, px=ttl_ms):
        logger.info("reconcile_skipped", reason="another sweep is running")
        return
    started = time.time()
    try:
        logger.info("reconcile_started", stores=list(settings.stores), started_at=started)
        report = sweep(rt, _resend)
        logger.info("reconcile_finished", started_at=started, finished_at=time.time(),
                    **asdict(report))
    finally:
        release_lock(rt.redis, lock_key, lock_id)
