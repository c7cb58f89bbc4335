"""mipos-worker's POS side: enqueue the accept or deny of a delivery order.

    from mipos_worker import accept_order, deny_order

    accept_order.delay(delivery_id="1", store_id="3", order_external_id="01f1b8ce-...")

Or, so that no order is lost between the POS's commit and Redis, the
transactional outbox: ``mipos_worker.sql_outbox`` (SQLAlchemy),
``mipos_worker.django_outbox`` (a Django app), ``mipos_worker.file_outbox`` (a
SQLite file), relayed by ``mipos-worker outbox relay``.

Importing this package reads no setting and builds no Celery app; the tasks do,
when first used (they need only ``REDIS_URL``).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("mipos-worker")
except metadata.PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+checkout"

__all__ = ["accept_order", "deny_order", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("accept_order", "deny_order"):
        from mipos_worker import order_tasks

        return getattr(order_tasks, name)
    raise AttributeError(f"module 'mipos_worker' has no attribute {name!r}")
