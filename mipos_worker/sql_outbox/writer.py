"""``accept(conn, ...)`` / ``deny(conn, ...)``: the request, written in the caller's transaction.

Checked exactly as ``delay()`` checks it (``ValueError`` naming the field, and
the keys only mipos-worker sets refused) before anything is written. Nothing
here talks to Redis: the POS's commit never waits for it. On PostgreSQL the
row's INSERT also notifies the relays (listen.py), delivered on commit only.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import Insert, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable

from mipos_worker.order.model import Action
from mipos_worker.order.request_check import check_request
from mipos_worker.sql_outbox.listen import CHANNEL
from mipos_worker.sql_outbox.schema import db_now, outbox_table

# Set in ``Session.info`` / ``Connection.info`` when an outbox row was written: the
# in-process relay's after-commit hook wakes the relay only then (background.py).
WROTE_KEY = "mipos_outbox_wrote"


def accept(conn: Connection | Session, **arguments: Any) -> str:
    """Write an accept beside the order, in ``conn``'s transaction; returns its task id."""
    return _write(conn, Action.ACCEPT, arguments)


def deny(conn: Connection | Session, **arguments: Any) -> str:
    """Write a deny (``message`` says why) in ``conn``'s transaction; returns its task id."""
    return _write(conn, Action.DENY, arguments)


def _write(conn: Connection | Session, action: Action, arguments: dict[str, Any]) -> str:
    request = check_request(action, arguments)
    task_id = str(uuid.uuid4())
    dialect = conn.get_bind().dialect if isinstance(conn, Session) else conn.dialect
    row = insert(outbox_table).values(
        task_id=task_id, action=action.value,
        arguments=json.dumps(request.body(), ensure_ascii=False, separators=(",", ":")),
        created_at=db_now(dialect), tries=0,
    )
    conn.execute(_notifying(row) if dialect.name == "postgresql" else row)
    conn.info[WROTE_KEY] = True
    return task_id


def _notifying(row: Insert) -> Executable:
    """PostgreSQL: the insert and a NOTIFY to the relays (listen.py) in one statement, one
    round trip. PostgreSQL delivers the notification only when the transaction commits."""
    inserted = row.returning(outbox_table.c.id).cte("mipos_outbox_row")
    return select(func.pg_notify(CHANNEL, "")).select_from(inserted)
