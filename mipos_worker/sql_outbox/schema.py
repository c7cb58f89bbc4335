"""The outbox tables, and the database's own clock in SQL.

Times are seconds since the epoch *as the database sees them*
(``created_at``, ``claimed_until``, ``moved_at``): a row's age is computed in
SQL as the database's now minus ``created_at``, so the clocks of the POS hosts
and of the relay never enter it. The Django app (``mipos_worker/django_outbox``)
creates the same tables, so one relay serves both.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    literal_column,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement

OUTBOX_TABLE = "mipos_outbox"
DEAD_TABLE = "mipos_outbox_dead"

metadata = MetaData()

# BIGINT on the servers; INTEGER on SQLite, where only "INTEGER PRIMARY KEY" is the rowid.
_RowId = BigInteger().with_variant(Integer(), "sqlite")

outbox_table = Table(
    OUTBOX_TABLE, metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),  # the order rows are published in
    Column("task_id", String(36), nullable=False, unique=True),  # the Celery task id, the same on a resend
    Column("action", String(8), nullable=False),  # accept | deny
    Column("arguments", Text, nullable=False),  # JSON: delivery_id, store_id, order_external_id[, message]
    Column("created_at", Double, nullable=False),  # the database's clock, epoch seconds
    Column("claim", String(36), nullable=True),  # lease holder (databases without SKIP LOCKED)
    Column("claimed_until", Double, nullable=True),  # the database's clock
    Column("tries", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    sqlite_autoincrement=True,  # ids never reused, even once the table is empty
)

dead_table = Table(
    DEAD_TABLE, metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),  # its own: never collides
    Column("outbox_id", BigInteger, nullable=False),  # its id in the outbox (may repeat: a reset sequence)
    Column("task_id", String(36), nullable=False),
    Column("action", String(8), nullable=False),
    Column("arguments", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("moved_at", Double, nullable=False),
    Column("reason", Text, nullable=False),
    sqlite_autoincrement=True,
)
Index("mipos_outbox_dead_moved_at", dead_table.c.moved_at)


# Not UNIX_TIMESTAMP(NOW(6)): NOW() is the session's local time, and in the autumn's repeated
# hour of a zone with daylight saving (time_zone=SYSTEM) turning it back into epoch seconds
# picks the later of the two instants: one hour in the future. UTC_TIMESTAMP has no zone.
MYSQL_NOW = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1e6)"


def db_now(dialect: Dialect) -> ColumnElement[float]:
    """The database's current time in epoch seconds (sub-millisecond), as an SQL expression."""
    name = dialect.name
    if name == "postgresql":
        sql = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
    elif name == "sqlite":
        sql = "((julianday('now') - 2440587.5) * 86400.0)"
    elif name in ("mysql", "mariadb"):
        sql = MYSQL_NOW
    else:
        raise NotImplementedError(
            f"the mipos outbox supports PostgreSQL, MySQL/MariaDB and SQLite, not {name!r}")
    return literal_column(sql, type_=Double())


def supports_skip_locked(dialect: Dialect) -> bool:
    """PostgreSQL 9.5+, MySQL 8+ and MariaDB 10.6+ have ``FOR UPDATE SKIP LOCKED``; SQLite
    (one writer at a time) has no row locks: the relay takes a lease instead."""
    return dialect.name in ("postgresql", "mysql", "mariadb")


# The same tables in plain SQL, for a POS that keeps its migrations by hand (README).
POSTGRESQL_DDL = """\
CREATE TABLE mipos_outbox (
    id            BIGSERIAL PRIMARY KEY,
    task_id       VARCHAR(36) NOT NULL UNIQUE,
    action        VARCHAR(8) NOT NULL,
    arguments     TEXT NOT NULL,
    created_at    DOUBLE PRECISION NOT NULL,
    claim         VARCHAR(36),
    claimed_until DOUBLE PRECISION,
    tries         INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT
);
CREATE TABLE mipos_outbox_dead (
    id         BIGSERIAL PRIMARY KEY,
    outbox_id  BIGINT NOT NULL,
    task_id    VARCHAR(36) NOT NULL,
    action     VARCHAR(8) NOT NULL,
    arguments  TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    moved_at   DOUBLE PRECISION NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX mipos_outbox_dead_moved_at ON mipos_outbox_dead (moved_at);
"""
