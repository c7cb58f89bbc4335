"""Reconciliation: compare what mipos still lists as pending with what we know.

mipos lists, for 10 minutes, every order of a store that the POS has neither
accepted nor denied. That catches what a job queue cannot see: an order the POS
never enqueued, an acceptance mipos says it never got, and the true outcome of
an attempt whose answer was lost to a read timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from worker.errors import Answer, ErrorClass, PermanentError, TransientError, classify
from worker.orders import Action, Order
from worker.runtime import Runtime

logger = structlog.stdlib.get_logger("mipos.reconcile")

@dataclass(frozen=True)
class PendingOrder:
    external_id: str
    store_id: str  # the store whose list it came in
    delivery_id: str | None  # None when the list does not carry a usable one
    created_at: float | None
    order_number: str | None
    total: Any

    @classmethod
    def from_json(cls, item: Any, store_id: str) -> PendingOrder:
        """Raises ValueError, saying what is wrong, for an item without a usable ``external_id``."""
        if not isinstance(item, dict):
            raise ValueError(f"not an object: {_short(item)}")
        external_id = _id_text(item.get("external_id"))
        if external_id is None:
            raise ValueError(f"no usable external_id in {_short(item)}")
        number = item.get("order_number")
        return cls(
            external_id=external_id,
            store_id=store_id,
            delivery_id=_id_text(item.get("delivery_id")),
            created_at=_parse_time(item.get("created_at")),
            order_number=str(number) if isinstance(number, (str, int)) else None,
            total=item.get("total"),
        )


def _id_text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text or None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _parse_time(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def fetch_pending(rt: Runtime, store_id: str) -> tuple[list[PendingOrder], Answer]:
    """The store's pending orders; a refused token is replaced once. Raises MiposError."""
    token = rt.tokens.current()
    answer = rt.client.pending_orders(store_id, token)
    if classify(answer).error_class is ErrorClass.AUTH and answer.http_status is not None:
        answer = rt.client.pending_orders(store_id, rt.tokens.replace_rejected(token))
    body = answer.body
    if answer.http_status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
        orders = []
        for item in body["data"]:
            try:
                orders.append(PendingOrder.from_json(item, store_id))
            except ValueError as exc:  # one odd item must not hide the others
                logger.warning("pending_item_skipped", store_id=store_id, reason=str(exc))
        return orders, answer
    verdict = classify(answer)
    message = f"pending list of store {store_id}: {verdict.error or 'undocumented answer'}"
    if verdict.error_class is ErrorClass.PERMANENT:
        raise PermanentError(message, http_status=answer.http_status)
    raise TransientError(message, http_status=answer.http_status)


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
            pending, _ = fetch_pending(rt, store_id)
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
                        nx=True, ex=7 * 24 * 3600):
            rt.metrics.count("mipos_orders_unacknowledged_total")  # each order once
        logger.error(
            "order_unacknowledged", **order.fields(), order_number=item.order_number,
            total=item.total, age_s=age_s,
            reason="mipos lists it as pending and it was never enqueued: "
                   "only the POS knows whether it stored it",
        )
