"""The transactional outbox for a POS on SQLAlchemy (PostgreSQL, MySQL/MariaDB, SQLite).

    from mipos_worker import sql_outbox as outbox

    with engine.begin() as conn:           # the POS's own transaction
        conn.execute(insert(orders).values(...))
        outbox.accept(conn, delivery_id=..., store_id=..., order_external_id=...)

A relay (``mipos-worker outbox relay --database-url URL``, or
``outbox.start_relay_thread(engine)`` in-process) publishes committed rows.
Needs ``pip install mipos-worker[sqlalchemy]``.
"""

from mipos_worker.sql_outbox.background import RelayThread, start_relay_thread
from mipos_worker.sql_outbox.relay import (
    BatchResult,
    OutboxStatus,
    PublishFailed,
    RedisUnavailable,
    Relay,
)
from mipos_worker.sql_outbox.schema import dead_table, metadata, outbox_table
from mipos_worker.sql_outbox.upgrade import pending_upgrades, upgrade_tables
from mipos_worker.sql_outbox.writer import accept, deny


def create_tables(bind: object) -> None:
    """Create the two outbox tables where missing (tests, quick starts; use a migration in production).
    Tables an earlier version made are left as they are: ``upgrade_tables`` brings them up to date."""
    metadata.create_all(bind)  # type: ignore[arg-type]


__all__ = [
    "BatchResult", "OutboxStatus", "PublishFailed", "RedisUnavailable", "Relay", "RelayThread", "accept",
    "create_tables", "dead_table", "deny", "metadata", "outbox_table", "pending_upgrades",
    "start_relay_thread", "upgrade_tables",
]
