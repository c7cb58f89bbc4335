"""``accept(...)`` / ``deny(...)``: the request, written in the caller's ``transaction.atomic()``.

Checked as ``delay()`` checks it before anything is written; no Redis here. On
PostgreSQL a NOTIFY in the same transaction wakes the relay process on commit.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

from mipos_worker.order.model import Action
from mipos_worker.order.request_check import check_request

# The channel the relay LISTENs on (mipos_worker.sql_outbox.listen.CHANNEL; that module needs
# SQLAlchemy, which a Django POS need not have).
NOTIFY_CHANNEL = "mipos_outbox"


def accept(*, using: str | None = None, **arguments: Any) -> str:
    """Write an accept in the current transaction (of database ``using``); returns its task id."""
    return _write(Action.ACCEPT, arguments, using)


def deny(*, using: str | None = None, **arguments: Any) -> str:
    """Write a deny (``message`` says why) in the current transaction; returns its task id."""
    return _write(Action.DENY, arguments, using)


def _write(action: Action, arguments: dict[str, Any], using: str | None) -> str:
    from django.db import connections, router, transaction

    from mipos_worker.django_outbox.models import DatabaseNow, OutboxRow

    request = check_request(action, arguments)
    task_id = str(uuid.uuid4())
    database = using or router.db_for_write(OutboxRow)
    OutboxRow.objects.using(database).create(
        task_id=task_id, action=action.value,
        arguments=json.dumps(request.body(), ensure_ascii=False, separators=(",", ":")),
        created_at=DatabaseNow(), tries=0)
    connection = connections[database]
    if connection.vendor == "postgresql":  # the relay process LISTENs; delivered on commit only
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])
    transaction.on_commit(_wake_relays, using=database)
    return task_id


def _wake_relays() -> None:
    """An in-process relay (mipos_worker.sql_outbox.start_relay_thread), if the POS started one."""
    background = sys.modules.get("mipos_worker.sql_outbox.background")  # not imported: no relay thread
    if background is not None:
        background.wake_relays()
