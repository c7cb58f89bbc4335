"""mipos's list of a store's pending orders: what settles an unknown outcome, and what
reconciliation compares with the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from worker.mipos.classification import Answer, classify
from worker.mipos.client import MiposClient
from worker.mipos.errors import ErrorClass, PermanentError, TransientError
from worker.mipos.tokens import TokenStore

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


def fetch_pending(client: MiposClient, tokens: TokenStore, store_id: str) -> tuple[list[PendingOrder], Answer]:
    """The store's pending orders; a refused token is replaced once. Raises MiposError."""
    token = tokens.current()
    answer = client.pending_orders(store_id, token)
    if classify(answer).error_class is ErrorClass.AUTH and answer.http_status is not None:
        answer = client.pending_orders(store_id, tokens.replace_rejected(token))
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
