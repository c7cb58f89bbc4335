"""A local outbox for the POS: an order is never lost between the POS and Redis.

``Outbox.accept(...)`` writes the request to a SQLite file first, then tries to
enqueue it; only once Redis took it is the row deleted. When Redis is down the
row stays, and ``flush()`` (called by every later ``accept``/``deny``, or by
the POS on a timer) sends it when Redis is back. A crash between the enqueue
and the delete sends it twice, which is safe: the worker's ledger sends an
order to mipos once. The enqueue time of the first try is kept, so the
deadline counts from when the POS stored the order.

    outbox = Outbox("/var/lib/pos/mipos-outbox.sqlite3")
    outbox.accept(delivery_id=1, store_id="3", order_external_id="...")
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from kombu.exceptions import OperationalError

from mipos_worker.order.model import Action, parse_order_request
from mipos_worker.order.stamps import Stamps

SendResult = Literal["enqueued", "kept"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    arguments TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
)
"""


class Outbox:
    def __init__(self, path: str | Path = "mipos-outbox.sqlite3") -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    def accept(self, **arguments: Any) -> SendResult:
        return self._submit(Action.ACCEPT, arguments)

    def deny(self, **arguments: Any) -> SendResult:
        return self._submit(Action.DENY, arguments)

    def pending(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def flush(self) -> int:
        """Enqueue what is kept, oldest first; stops at the first failure. Returns how many went."""
        sent = 0
        with self._lock, self._connect() as db:
            rows = db.execute(
                "SELECT id, action, arguments, enqueued_at FROM outbox ORDER BY id"
            ).fetchall()
            for row_id, action, arguments, enqueued_at in rows:
                if not self._enqueue(db, row_id, Action(action), json.loads(arguments), enqueued_at):
                    break
                sent += 1
        return sent

    def _submit(self, action: Action, arguments: dict[str, Any]) -> SendResult:
        request = parse_order_request(action, arguments)  # ValueError naming the field
        with self._lock, self._connect() as db:
            cursor = db.execute(
                "INSERT INTO outbox (action, arguments, enqueued_at) VALUES (?, ?, ?)",
                (action.value, json.dumps(request.body()), time.time()),
            )
            row_id = cursor.lastrowid
        self.flush()
        with self._connect() as db:
            kept = db.execute("SELECT 1 FROM outbox WHERE id = ?", (row_id,)).fetchone()
        return "kept" if kept else "enqueued"

    @staticmethod
    def _enqueue(db: sqlite3.Connection, row_id: int, action: Action,
                 arguments: dict[str, Any], enqueued_at: float) -> bool:
        from mipos_worker.order_tasks import publish_order

        try:
            # The deadline counts from when the POS stored the order: its age on this
            # host's clock, turned into Redis's clock by the registration.
            publish_order(action, arguments, Stamps(), age_s=max(0.0, time.time() - enqueued_at))
        except (OperationalError, OSError) as exc:
            db.execute(
                "UPDATE outbox SET tries = tries + 1, last_error = ? WHERE id = ?",
                (f"{type(exc).__name__}: {exc}"[:500], row_id),
            )
            return False
        db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
        return True
