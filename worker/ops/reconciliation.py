"""Reconciliation: compare what mipos still lists as pending with what we know.

mipos lists, for 10 minutes, every order of a store that the POS has neither
accepted nor denied. That catches what a job queue cannot see: an order the POS
never enqueued, an acceptance mipos says it never got, and the true outcome of
an attempt whose answer was lost to a read timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from mipos_worker.order.model import Action, Order
from worker.mipos.pending import PendingOrder, fetch_pending
from worker.wiring.runtime import Runtime

logger = structlog.stdlib.get_logger("mipos.reconcile")

# How long an order unacknowledged by the POS stays marked as counted in
# mipos_orders_unacknowledged_total: far longer than mipos lists it as pending (10 minutes).
UNACKNOWLEDGED_MARK_TTL_S = 7 * 24 * 3600


@dataclass
class SweepReport:
    stores: int = 0
    pending: int = 0
    resent: int = 0
    in_flight: int = 0
    dead_lettered: int = 0
    unacknowledged: int = 0
    store_errors: dict[str, str] = field(default_factory=dict)


def sweep(rt: Runtime, resend: Any) -> SweepReport:
    """One pass over the configured stores. ``resend(action, order, message)`` enqueues a resend."""
    settings = rt.settings.reconcile
    report = SweepReport()
    in_flight = rt.inflight.order_keys()
    now = time.time()
    for store_id in settings.stores:
        report.stores += 1
        try:
            pending, _ = fetch_pending(rt.client, rt.tokens, store_id)
        except Exception as exc:  # one store's trouble must not stop the others
            report.store_errors[store_id] = f"{type(exc).__name__}: {exc}"
            logger.warning("reconcile_store_failed", store_id=store_id,
                           error=report.store_errors[store_id])
            continue
        for item in pending:
            report.pending += 1
            try:
                _reconcile_item(rt, item, in_flight, now, report, resend)
            except Exception as exc:  # one item's trouble must not stop the sweep
                logger.warning("reconcile_item_failed", store_id=store_id,
                               order_external_id=item.external_id,
                               error=f"{type(exc).__name__}: {exc}")
    return report


def _reconcile_item(rt: Runtime, item: PendingOrder, in_flight: set[str], now: float,
                    report: SweepReport, resend: Any) -> None:
    settings = rt.settings.reconcile
    order = Order(item.delivery_id or "?", item.store_id, item.external_id)
    age_s = round(now - item.created_at, 1) if item.created_at else None
    if order.key in in_flight:
        report.in_flight += 1  # being sent (or resent) right now
        return
    done = rt.ledger.done(order)
    if done is not None:
        if now - done.at >= settings.grace_s:
            # Resent as the POS enqueued it (the ledger's record), not as the list shows it.
            recorded = Order(done.delivery_id, order.store_id, order.order_external_id)
            resend(Action(done.action), recorded, done.message)
            report.resent += 1
            logger.warning(
                "reconcile_resend", **recorded.fields(), action=done.action,
                recorded_at=done.at, done_by_task=done.task_id,
                reason=f"we recorded it {Action(done.action).done_outcome}, "
                       "mipos still lists it as pending",
            )
        return
    letter = rt.dead_letters.latest_for(order.store_id, order.order_external_id)
    if letter is not None:
        report.dead_lettered += 1
        logger.error(
            "order_pending_after_failure", **order.fields(), order_number=item.order_number,
            age_s=age_s, dead_letter_id=letter.id, fail_reason=letter.reason,
            error=letter.error, action=letter.action,
            reason="mipos still waits for an answer we gave up on: fix the cause and replay it",
        )
    elif age_s is None or age_s >= settings.grace_s:
        report.unacknowledged += 1
        if rt.redis.set(f"{rt.settings.redis.key_prefix}unacknowledged:{order.key}", 1,
                        nx=True, ex=UNACKNOWLEDGED_MARK_TTL_S):
            rt.metrics.count("mipos_orders_unacknowledged_total")  # each order once
        logger.error(
            "order_unacknowledged", **order.fields(), order_number=item.order_number,
            total=item.total, age_s=age_s,
            reason="mipos lists it as pending and it was never enqueued: "
                   "only the POS knows whether it stored it",
        )
