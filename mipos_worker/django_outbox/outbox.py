"""``accept(...)`` / ``deny(...)``: the request, written in the caller's ``transaction.atomic()``.

Checked as ``delay()`` checks it before anything is written; no Redis here.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

from mipos_worker.order.model import Action
from mipos_worker.order.request_check import check_request


def accept(*, using: str | None = None, **arguments: Any) -> str:
    """Write an accept in the current transaction (of database ``using``); returns its task id."""
    return _write(Action.ACCEPT, arguments, using)


def deny(*, using: str | None = None, **arguments: Any) -> str:
    """Write a deny (``message`` says why) in the current transaction; returns its task id."""
    return _write(Action.DENY, arguments, using)


def _write(action: Action, arguments: dict[str, Any], using: str | None) -> str:
    from django.db import router, transaction

    from mipos_worker.django_outbox.models import DatabaseNow, OutboxRow

    request = check_request(action, arguments)
    task_id = str(uuid.uuid4())
    database = using or router.db_for_write(OutboxRow)
    OutboxRow.objects.using(database).create(
        task_id=task_id, action=action.value,
        arguments=json.dumps(request.body(), ensure_ascii=False, separators=(",", ":")),
        created_at=DatabaseNow(), tries=0)
    transaction.on_commit(_wake_relays, using=database)
    return task_id


def _wake_relays() -> None:
    """An in-process relay (mipos_worker.sql_outbox.start_relay_thread), if the POS started one."""
    background = sys.modules.get("mipos_worker.sql_outbox.background")  # not imported: no relay thread
    if background is not None:
        background.wake_relays()
