"""A local outbox for the POS: an order is never lost between the POS and Redis.

``Outbox.accept(...)`` writes the request to a SQLite file first, then tries to
enqueue it; only once Redis took it is the row deleted. When Redis is down the
row stays, and ``flush()`` (called by every later ``accept``/``deny``, or by
the POS on a timer) sends it when Redis is back. The enqueue time of the first
try is kept, so the deadline counts from when the POS stored the order.

Each row gets its Celery task id when it is written, and every publish of the
row carries it: a crash between the enqueue and the delete sends the row again
under the same task id, and the worker's ledger sends the order to mipos once.

Several processes (and several ``Outbox`` objects) may share one file: a flush
claims the rows it sends with a lease (``lease_s``) in one short write
transaction, as the SQL relay does on SQLite, so no two send the same row
while the lease holds; a process that dies holding rows leaves them to the
others once its lease is over. Files that an earlier version made get the new
columns, and task ids for the rows they hold, when first opened.

    outbox = Outbox("/var/lib/pos/mipos-outbox.sqlite3")
    outbox.accept(delivery_id=1, store_id="3", order_external_id="...")
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    last_error TEXT,
    task_id TEXT,
    claim TEXT,
    claimed_until REAL
)
"""
# Added to files an earlier version made (it had the columns above up to last_error).
_ADDED_COLUMNS = {"task_id": "TEXT", "claim": "TEXT", "claimed_until": "REAL"}
_TASK_ID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS outbox_task_id ON outbox (task_id)"


@dataclass(frozen=True)
class _Row:
    id: int
    task_id: str
    action: str
    arguments: str
    enqueued_at: float


class Outbox:
    def __init__(self, path: str | Path = "mipos-outbox.sqlite3", *, lease_s: float = 30.0,
                 batch_size: int = 100) -> None:
        self.path = Path(path)
        self.lease_s = lease_s
        self.batch_size = batch_size
        self._lock = threading.Lock()
        with self._connect() as db, _write_transaction(db):
            _prepare(db)

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
        """Enqueue what is kept and not claimed by another flush, oldest first; stops at the
        first failure. Returns how many went."""
        sent = 0
        with self._lock, self._connect() as db:
            while rows := self._claim(db):
                went = self._send(db, rows)
                sent += went
                if went < len(rows):
                    break
        return sent

    def _submit(self, action: Action, arguments: dict[str, Any]) -> SendResult:
        request = parse_order_request(action, arguments)  # ValueError naming the field
        with self._lock, self._connect() as db:
            cursor = db.execute(
                "INSERT INTO outbox (task_id, action, arguments, enqueued_at) VALUES (?, ?, ?, ?)",
                (str(uuid.uuid4()), action.value, json.dumps(request.body()), time.time()),
            )
            row_id = cursor.lastrowid
        self.flush()
        with self._connect() as db:
            kept = db.execute("SELECT 1 FROM outbox WHERE id = ?", (row_id,)).fetchone()
        return "kept" if kept else "enqueued"

    def _claim(self, db: sqlite3.Connection) -> list[_Row]:
        """The next free rows, oldest first, leased to this flush in one write transaction."""
        claim, now = uuid.uuid4().hex, time.time()
        with _write_transaction(db):
            _give_task_ids(db)  # rows written by an earlier version still running beside this one
            found = db.execute(
                "SELECT id, task_id, action, arguments, enqueued_at FROM outbox "
                "WHERE claimed_until IS NULL OR claimed_until < ? ORDER BY id LIMIT ?",
                (now, self.batch_size)).fetchall()
            db.executemany("UPDATE outbox SET claim = ?, claimed_until = ? WHERE id = ?",
                           [(claim, now + self.lease_s, row[0]) for row in found])
        return [_Row(*row) for row in found]

    def _send(self, db: sqlite3.Connection, rows: list[_Row]) -> int:
        """Publish in order, deleting each once Redis has it; at the first failure the rest
        are released at once. Returns how many went."""
        for sent, row in enumerate(rows):
            error = self._enqueue(row)
            if error is not None:
                db.execute("UPDATE outbox SET tries = tries + 1, last_error = ? WHERE id = ?",
                           (error[:500], row.id))
                db.executemany("UPDATE outbox SET claim = NULL, claimed_until = NULL WHERE id = ?",
                               [(r.id,) for r in rows[sent:]])
                return sent
            db.execute("DELETE FROM outbox WHERE id = ?", (row.id,))
        return len(rows)

    @staticmethod
    def _enqueue(row: _Row) -> str | None:
        """Publish one row under its task id; the error when Redis could not take it."""
        from mipos_worker.order_tasks import publish_order

        try:
            # The deadline counts from when the POS stored the order: its age on this
            # host's clock, turned into Redis's clock by the registration.
            publish_order(Action(row.action), json.loads(row.arguments), Stamps(),
                          age_s=max(0.0, time.time() - row.enqueued_at), task_id=row.task_id)
        except (OperationalError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None


@contextmanager
def _write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE: the file's write lock from the start, so two processes cannot both
    read the same free rows (or both add the same column) before either writes."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _prepare(db: sqlite3.Connection) -> None:
    """Make the table, or bring a file of an earlier version up to date (columns, task ids)."""
    db.execute(_SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
    for name, kind in _ADDED_COLUMNS.items():
        if name not in columns:
            db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {kind}")
    _give_task_ids(db)
    db.execute(_TASK_ID_INDEX)


def _give_task_ids(db: sqlite3.Connection) -> None:
    missing = db.execute("SELECT id FROM outbox WHERE task_id IS NULL").fetchall()
    db.executemany("UPDATE outbox SET task_id = ? WHERE id = ?",
                   [(str(uuid.uuid4()), row_id) for (row_id,) in missing])
