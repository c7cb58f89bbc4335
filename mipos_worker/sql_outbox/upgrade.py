"""Outbox tables made by an earlier mipos-worker, brought to today's shape in place, rows kept.

Two changes since the first tables (issue 24):

- ``mipos_outbox_dead`` has an id of its own; the row's id in the outbox is kept in
  ``outbox_id``. Outbox ids can repeat (SQLite before AUTOINCREMENT, a reset sequence,
  a restored dump), and a second row moved aside under an id already there used to fail,
  leaving it, and the rows leased beside it, in the outbox for good.
- On SQLite, ``mipos_outbox`` has AUTOINCREMENT: its ids are never reused once it is empty.

``upgrade_tables(engine)`` does what is left to do, in one transaction where the database
has transactional DDL (PostgreSQL, SQLite), and returns what it did: nothing the second
time. The Django app has the same change as a migration (0002). The README has the SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

from mipos_worker.sql_outbox.schema import (
    DEAD_TABLE,
    OUTBOX_TABLE,
)

# After ``ADD COLUMN outbox_id``: each statement may run again (MySQL commits DDL one by one).
DEAD_TABLE_SQL: dict[str, tuple[str, ...]] = {
    "postgresql": (
        "UPDATE mipos_outbox_dead SET outbox_id = id WHERE outbox_id IS NULL",
        "ALTER TABLE mipos_outbox_dead ALTER COLUMN outbox_id SET NOT NULL",
        "CREATE SEQUENCE IF NOT EXISTS mipos_outbox_dead_id_seq OWNED BY mipos_outbox_dead.id",
        "SELECT setval('mipos_outbox_dead_id_seq', (SELECT COALESCE(MAX(id), 0) + 1 FROM mipos_outbox_dead), false)",
        "ALTER TABLE mipos_outbox_dead ALTER COLUMN id SET DEFAULT nextval('mipos_outbox_dead_id_seq')",
    ),
    "mysql": (
        "UPDATE mipos_outbox_dead SET outbox_id = id WHERE outbox_id IS NULL",
        "ALTER TABLE mipos_outbox_dead MODIFY id BIGINT NOT NULL AUTO_INCREMENT, MODIFY outbox_id BIGINT NOT NULL",
    ),
}
ADD_OUTBOX_ID = "ALTER TABLE mipos_outbox_dead ADD COLUMN outbox_id BIGINT NULL"

# SQLite cannot alter a primary key: the tables are made again (as create_tables makes them
# today) and the rows copied over.
SQLITE_DEAD_TABLE_SQL = (
    "DROP INDEX IF EXISTS mipos_outbox_dead_moved_at",
    "ALTER TABLE mipos_outbox_dead RENAME TO mipos_outbox_dead_before_upgrade",
    """CREATE TABLE mipos_outbox_dead (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    outbox_id BIGINT NOT NULL,
    task_id VARCHAR(36) NOT NULL,
    action VARCHAR(8) NOT NULL,
    arguments TEXT NOT NULL,
    created_at DOUBLE NOT NULL,
    moved_at DOUBLE NOT NULL,
    reason TEXT NOT NULL
)""",
    ("INSERT INTO mipos_outbox_dead (outbox_id, task_id, action, arguments, created_at, moved_at, reason) "
     "SELECT id, task_id, action, arguments, created_at, moved_at, reason "
     "FROM mipos_outbox_dead_before_upgrade ORDER BY id"),
    "DROP TABLE mipos_outbox_dead_before_upgrade",
    "CREATE INDEX mipos_outbox_dead_moved_at ON mipos_outbox_dead (moved_at)",
)
_OUTBOX_COLUMNS = "id, task_id, action, arguments, created_at, claim, claimed_until, tries, last_error"
SQLITE_OUTBOX_TABLE_SQL = (
    "ALTER TABLE mipos_outbox RENAME TO mipos_outbox_before_upgrade",
    """CREATE TABLE mipos_outbox (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    task_id VARCHAR(36) NOT NULL,
    action VARCHAR(8) NOT NULL,
    arguments TEXT NOT NULL,
    created_at DOUBLE NOT NULL,
    claim VARCHAR(36),
    claimed_until DOUBLE,
    tries INTEGER DEFAULT '0' NOT NULL,
    last_error TEXT,
    UNIQUE (task_id)
)""",
    f"INSERT INTO mipos_outbox ({_OUTBOX_COLUMNS}) SELECT {_OUTBOX_COLUMNS} FROM mipos_outbox_before_upgrade",
    "DROP TABLE mipos_outbox_before_upgrade",
    # New ids above every id the dead table remembers, not only above those still in the outbox.
    ("INSERT INTO sqlite_sequence (name, seq) SELECT 'mipos_outbox', 0 "
     "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'mipos_outbox')"),
    ("UPDATE sqlite_sequence SET seq = MAX(seq, (SELECT COALESCE(MAX(outbox_id), 0) FROM mipos_outbox_dead)) "
     "WHERE name = 'mipos_outbox'"),
)


def upgrade_tables(bind: Engine | Connection) -> list[str]:
    """Bring the outbox tables to today's shape; returns what was done (``[]``: nothing to do).

    With an Engine it owns the transaction (on SQLite ``BEGIN IMMEDIATE``: the POS and the
    relays wait for it, briefly); with a Connection (Alembic's ``op.get_bind()``) it runs
    in the caller's.
    """
    with _transaction(bind) as conn:
        done = []
        if not dead_table_upgraded(conn):
            _upgrade_dead_table(conn)
            done.append(f"{DEAD_TABLE}: an id of its own; the row's outbox id in outbox_id")
        if conn.dialect.name == "sqlite" and not sqlite_autoincrement(conn):
            _run(conn, SQLITE_OUTBOX_TABLE_SQL)
            done.append(f"{OUTBOX_TABLE}: AUTOINCREMENT, ids never reused")
        return done


def pending_upgrades(conn: Connection) -> list[str]:
    """What ``upgrade_tables`` would do (for a status or a doctor check)."""
    pending = [] if dead_table_upgraded(conn) else [f"{DEAD_TABLE}: outbox_id and an id of its own"]
    if conn.dialect.name == "sqlite" and not sqlite_autoincrement(conn):
        pending.append(f"{OUTBOX_TABLE}: AUTOINCREMENT")
    return pending


def dead_table_upgraded(conn: Connection) -> bool:
    """The dead table has ``outbox_id``, filled, and an id that the database assigns."""
    columns = {c["name"]: c for c in inspect(conn).get_columns(DEAD_TABLE)}
    if "outbox_id" not in columns or columns["outbox_id"]["nullable"]:
        return False
    if conn.dialect.name == "sqlite":
        return True  # made again whole, never half
    return columns["id"].get("autoincrement") is True  # a sequence, an identity, AUTO_INCREMENT


def sqlite_autoincrement(conn: Connection) -> bool:
    sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (OUTBOX_TABLE,)).scalar_one()
    return "AUTOINCREMENT" in str(sql).upper()


def _upgrade_dead_table(conn: Connection) -> None:
    name = conn.dialect.name
    if name == "sqlite":
        _run(conn, SQLITE_DEAD_TABLE_SQL)
        return
    if "outbox_id" not in {c["name"] for c in inspect(conn).get_columns(DEAD_TABLE)}:
        conn.exec_driver_sql(ADD_OUTBOX_ID)
    _run(conn, DEAD_TABLE_SQL["postgresql" if name == "postgresql" else "mysql"])


def _run(conn: Connection, statements: tuple[str, ...]) -> None:
    for statement in statements:
        conn.exec_driver_sql(statement)


@contextmanager
def _transaction(bind: Engine | Connection) -> Iterator[Connection]:
    if isinstance(bind, Connection):
        yield bind
        return
    with bind.connect() as conn:
        if conn.dialect.name == "sqlite":
            # pysqlite opens a transaction only before DML; the DDL must be inside one.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
