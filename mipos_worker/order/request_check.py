"""The checks ``delay()`` makes on a caller's arguments, for the other ways in (outbox, on-commit).

Kept free of SQLAlchemy and Django: the worker imports it through mipos_worker/order_tasks.py.
"""

from __future__ import annotations

from typing import Any

from mipos_worker.order.errors import InvalidOrder
from mipos_worker.order.model import Action, OrderRequest, parse_order_request
from mipos_worker.order.stamps import PRIVATE_KEYS


def check_request(action: Action, arguments: dict[str, Any]) -> OrderRequest:
    """What ``OrderTask.apply_async`` checks for a caller (mipos_worker/order_tasks.py):
    ``ValueError`` naming the field."""
    for key in PRIVATE_KEYS:
        if key in arguments:
            raise InvalidOrder(key, "is set by mipos-worker itself; a caller may not pass it")
    return parse_order_request(action, arguments)
