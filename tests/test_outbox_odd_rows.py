"""The transactional outbox under odd rows (issue 24, items 5-7), on real SQLite, PostgreSQL and
MariaDB, publishing to the session's Redis.

- A row that nothing can publish moves aside alone; the rows around it go once each.
- Outbox ids are never reused on SQLite, and the dead table never collides with its past.
- On MySQL/MariaDB the database's clock does not depend on the server's time zone.

The MariaDB server of this module runs with ``TZ=Europe/Paris`` (``time_zone=SYSTEM``), so every
MariaDB test here meets a zone with daylight saving.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa

from support.processes import RedisServer
from tests import mariadb
from tests.test_sql_outbox import engine, messages, rows, store_order

__all__ = ["engine"]  # the fixture, shared with tests/test_sql_outbox.py

QUEUE = "mipos"


@pytest.fixture(scope="module")
def maria_server() -> Iterator[mariadb.MariaDBServer | None]:
    """This module's MariaDB: in a zone with daylight saving, as many servers are."""
    server = mariadb.MariaDBServer(tz="Europe/Paris") if mariadb.available() else None
    yield server
    if server is not None:
        server.stop()


def insert_row(engine: sa.Engine, *, arguments: str, action: str = "accept",
               task_id: str | None = None) -> str:
    """A row written by hand or by another program: no check on the way in."""
    from mipos_worker.sql_outbox import outbox_table
    from mipos_worker.sql_outbox.schema import db_now

    task_id = str(uuid.uuid4()) if task_id is None else task_id
    with engine.begin() as conn:
        conn.execute(sa.insert(outbox_table).values(
            task_id=task_id, action=action, arguments=arguments,
            created_at=db_now(engine.dialect), tries=0))
    return task_id


def published_ids(redis_server: RedisServer) -> list[str]:
    return [m["headers"]["id"] for m in messages(redis_server)]


# -- item 5: whatever makes a row unpublishable moves that row alone aside -------------------

ODD_ROWS = [
    # 30,000 levels: Python 3.13's json decodes 5,000 without a RecursionError (its limit is the
    # C stack's, not sys.getrecursionlimit()), and MariaDB's TEXT holds at most 65,535 bytes.
    pytest.param({"arguments": "[" * 30000}, "RecursionError", id="nested-too-deep"),
    pytest.param({"arguments": '{"delivery_id": 1, "store_id": "3", "order_external_id": "e"}',
                  "task_id": ""}, "task_id", id="empty-task-id"),
]


@pytest.mark.parametrize("odd, why", ODD_ROWS)
def test_a_row_nothing_can_publish_moves_aside_alone_and_the_rows_around_it_go_once(
        engine: sa.Engine, redis_server: RedisServer, odd: dict[str, str], why: str) -> None:
    from mipos_worker.sql_outbox import Relay, dead_table, outbox_table

    redis_server.client.delete(QUEUE)
    before = store_order(engine, str(uuid.uuid4()))
    bad = insert_row(engine, **odd)
    after = store_order(engine, str(uuid.uuid4()))
    relay = Relay(engine, lease_s=60)

    result = relay.run_once()

    assert (result.published, result.moved_aside) == (2, 1)
    assert relay.run_once().seen == 0
    assert published_ids(redis_server) == [before, after]  # once each, oldest first
    assert rows(engine, outbox_table) == []
    [dead] = rows(engine, dead_table)
    assert dead.task_id == bad and dead.arguments == odd["arguments"]
    assert why in dead.reason


def test_a_row_sqlite_cannot_read_as_text_moves_aside_alone(
        tmp_path: Path, tasks: ModuleType, redis_server: RedisServer) -> None:
    """Bytes that are not UTF-8 (another program's write) fail the batch's SELECT itself."""
    from mipos_worker.sql_outbox import Relay, create_tables, outbox_table

    path = tmp_path / "pos.sqlite3"
    engine = sa.create_engine(f"sqlite:///{path}")
    create_tables(engine)
    sa.Table("orders", sa.MetaData(), sa.Column("external_id", sa.String(64), primary_key=True)).create(engine)
    redis_server.client.delete(QUEUE)
    before = store_order(engine, str(uuid.uuid4()))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO mipos_outbox (task_id, action, arguments, created_at, tries) "
            "VALUES ('not-utf8', 'accept', CAST(X'7B22FF22' AS TEXT), 1.7e9, 0)")
    after = store_order(engine, str(uuid.uuid4()))

    result = Relay(engine).run_once()

    assert (result.published, result.moved_aside) == (2, 1)
    assert published_ids(redis_server) == [before, after]
    assert rows(engine, outbox_table) == []
    with engine.connect() as conn:  # kept byte for byte
        raw = conn.exec_driver_sql(
            "SELECT task_id, CAST(arguments AS BLOB), reason FROM mipos_outbox_dead").one()
    assert raw[0] == "not-utf8" and raw[1] == b'{"\xff"' and "UnicodeDecodeError" in raw[2]
    assert Relay(engine).status().dead == 1


def failing_for(task_ids: set[str] | None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``publish_order`` raising an error no check foresaw, for these task ids (None: for all);
    the others go to Redis. Returns the task ids it refused."""
    from mipos_worker import order_tasks

    real = order_tasks.publish_order
    refused: list[str] = []

    def publish(*args: Any, **options: Any) -> Any:
        if task_ids is None or options.get("task_id") in task_ids:
            refused.append(options["task_id"])
            raise TypeError("an error no check foresaw")
        return real(*args, **options)

    monkeypatch.setattr(order_tasks, "publish_order", publish)
    return refused


def test_an_error_no_check_foresaw_moves_its_row_aside_once_a_later_row_went(
        engine: sa.Engine, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from mipos_worker.sql_outbox import Relay, dead_table, outbox_table

    redis_server.client.delete(QUEUE)
    before = store_order(engine, str(uuid.uuid4()))
    odd = store_order(engine, str(uuid.uuid4()))
    after = store_order(engine, str(uuid.uuid4()))
    failing_for({odd}, monkeypatch)

    result = Relay(engine, lease_s=60).run_once()

    assert (result.published, result.moved_aside) == (2, 1)
    assert published_ids(redis_server) == [before, after]
    assert rows(engine, outbox_table) == []
    [dead] = rows(engine, dead_table)
    assert dead.task_id == odd and "TypeError: an error no check foresaw" in dead.reason


def test_an_error_every_row_meets_moves_nothing_aside(
        engine: sa.Engine, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken relay (not a broken row): the rows wait, counted, and go once it is mended."""
    from mipos_worker.sql_outbox import Relay, dead_table, outbox_table

    redis_server.client.delete(QUEUE)
    task_ids = [store_order(engine, str(uuid.uuid4())) for _ in range(3)]
    refused = failing_for(None, monkeypatch)
    relay = Relay(engine, lease_s=60)

    with pytest.raises(Exception, match="an error no check foresaw"):
        relay.run_once()

    assert refused == task_ids
    kept = rows(engine, outbox_table)
    assert [r.task_id for r in kept] == task_ids
    assert all(r.tries == 1 and "no check foresaw" in r.last_error for r in kept)
    assert all(r.claimed_until is None for r in kept)  # free again at once
    assert rows(engine, dead_table) == []
    monkeypatch.undo()
    assert relay.run_once().published == 3
    assert published_ids(redis_server) == task_ids


def test_a_batch_of_odd_rows_leaves_the_good_ones_to_go_in_order(
        engine: sa.Engine, redis_server: RedisServer) -> None:
    """Odd rows of every kind among good ones, across several batches."""
    from mipos_worker.sql_outbox import Relay, dead_table, outbox_table

    redis_server.client.delete(QUEUE)
    good: list[str] = []
    for i in range(6):
        good.append(store_order(engine, str(uuid.uuid4())))
        insert_row(engine, arguments="[" * (3000 + i))
        insert_row(engine, arguments=json.dumps({"delivery_id": 1}), action="refund")
    relay = Relay(engine, batch_size=4, lease_s=60)

    while relay.run_once().seen:
        pass

    assert published_ids(redis_server) == good
    assert rows(engine, outbox_table) == []
    assert len(rows(engine, dead_table)) == 12


# -- item 6: outbox ids never reused on SQLite; the dead table never collides ---------------

def drain(engine: sa.Engine) -> None:
    from mipos_worker.sql_outbox import Relay

    relay = Relay(engine, lease_s=60)
    while relay.run_once().seen:
        pass


def restart_ids(engine: sa.Engine) -> None:
    """What makes an outbox's ids start again at 1: SQLite's rowids without AUTOINCREMENT once
    the table is empty; elsewhere a restored dump or a reset sequence (done by hand here)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            if conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").first():
                conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = 'mipos_outbox'")
        elif engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER SEQUENCE mipos_outbox_id_seq RESTART WITH 1")
        else:
            conn.exec_driver_sql("ALTER TABLE mipos_outbox AUTO_INCREMENT = 1")


def outbox_ids(engine: sa.Engine) -> list[int]:
    from mipos_worker.sql_outbox import outbox_table

    return [r.id for r in rows(engine, outbox_table)]


def test_sqlite_outbox_ids_are_never_reused(tmp_path: Path, tasks: ModuleType, redis_server: RedisServer) -> None:
    from mipos_worker.sql_outbox import create_tables

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'pos.sqlite3'}")
    create_tables(engine)
    sa.Table("orders", sa.MetaData(), sa.Column("external_id", sa.String(64), primary_key=True)).create(engine)
    store_order(engine, str(uuid.uuid4()))
    [first] = outbox_ids(engine)
    drain(engine)
    store_order(engine, str(uuid.uuid4()))
    assert outbox_ids(engine) == [first + 1]  # AUTOINCREMENT: not the drained row's id again


def test_two_rows_moved_aside_under_the_same_outbox_id_are_both_kept(
        engine: sa.Engine, redis_server: RedisServer) -> None:
    from mipos_worker.sql_outbox import Relay, dead_table

    first = insert_row(engine, arguments="[" * 5000)
    drain(engine)
    restart_ids(engine)
    second = insert_row(engine, arguments="{not json")
    good = store_order(engine, str(uuid.uuid4()))

    result = Relay(engine).run_once()

    assert (result.published, result.moved_aside) == (1, 1)
    dead = rows(engine, dead_table)
    assert [d.task_id for d in dead] == [first, second]
    assert dead[0].outbox_id == dead[1].outbox_id  # where each was in the outbox, repeated
    assert dead[0].id != dead[1].id
    assert good in published_ids(redis_server)


# The tables as mipos-worker made them before issue 24 (create_tables, and the README's SQL).
OLD = sa.MetaData()
OLD_RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
sa.Table(
    "mipos_outbox", OLD,
    sa.Column("id", OLD_RowId, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(36), nullable=False, unique=True),
    sa.Column("action", sa.String(8), nullable=False),
    sa.Column("arguments", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("claim", sa.String(36), nullable=True),
    sa.Column("claimed_until", sa.Double, nullable=True),
    sa.Column("tries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=True),
)
OLD_DEAD = sa.Table(
    "mipos_outbox_dead", OLD,
    sa.Column("id", OLD_RowId, primary_key=True, autoincrement=False),
    sa.Column("task_id", sa.String(36), nullable=False),
    sa.Column("action", sa.String(8), nullable=False),
    sa.Column("arguments", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("moved_at", sa.Double, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)
sa.Index("mipos_outbox_dead_moved_at", OLD_DEAD.c.moved_at)


@pytest.fixture
def old_engine(engine: sa.Engine) -> sa.Engine:
    """``engine``'s database with the outbox tables of an earlier mipos-worker instead."""
    from mipos_worker.sql_outbox import metadata

    metadata.drop_all(engine)
    OLD.create_all(engine)
    return engine


def test_existing_tables_are_upgraded_in_place_and_keep_their_rows(
        old_engine: sa.Engine, redis_server: RedisServer) -> None:
    from mipos_worker.sql_outbox import Relay, dead_table, upgrade_tables

    engine = old_engine
    moved_before = insert_row(engine, arguments="[" * 5000)
    [moved_id] = outbox_ids(engine)
    Relay(engine).run_once()  # moved aside into the old table, under its outbox id
    waiting = store_order(engine, str(uuid.uuid4()))
    [waiting_id] = outbox_ids(engine)

    done = upgrade_tables(engine)

    assert done and upgrade_tables(engine) == []  # once; then nothing left to do
    assert table_shapes(engine) == made_today(engine)
    assert outbox_ids(engine) == [waiting_id]
    [old_dead] = rows(engine, dead_table)
    assert old_dead.task_id == moved_before and old_dead.outbox_id == moved_id
    drain(engine)
    restart_ids(engine)
    insert_row(engine, arguments="[" * 5000)
    insert_row(engine, arguments="{not json")
    assert Relay(engine).run_once().moved_aside == 2
    dead = rows(engine, dead_table)
    assert len(dead) == 3 and len({d.id for d in dead}) == 3
    assert waiting in published_ids(redis_server)
    if engine.dialect.name == "sqlite":  # and the outbox's ids are now never reused
        with engine.connect() as conn:
            sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'mipos_outbox'").scalar_one()
        assert "AUTOINCREMENT" in sql


def table_shapes(engine: sa.Engine) -> dict[str, Any]:
    """Each outbox table's columns (name: type, nullable, assigned by the database) and indexes."""
    inspector = sa.inspect(engine)
    shapes: dict[str, Any] = {}
    for table in ("mipos_outbox", "mipos_outbox_dead"):
        columns = {c["name"]: (str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)}
        indexes = sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)
                         if not str(i["name"]).startswith("sqlite_autoindex"))
        shapes[table] = (columns, indexes, inspector.get_unique_constraints(table))
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).scalar_one()
            shapes[table] += (" ".join(sql.split()),)
        else:
            shapes[table] += (inspector.get_columns(table)[0]["autoincrement"],)
    return shapes


def made_today(engine: sa.Engine) -> dict[str, Any]:
    """``table_shapes`` of the tables ``create_tables`` makes today, in a database of their own."""
    from mipos_worker.sql_outbox import create_tables

    url = engine.url
    if engine.dialect.name == "sqlite":
        fresh = url.set(database=f"{url.database}.fresh")
    else:
        fresh = url.set(database=f"{url.database}_fresh")
        with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {fresh.database}")
    other = sa.create_engine(fresh)
    try:
        create_tables(other)
        return table_shapes(other)
    finally:
        other.dispose()


def test_a_relay_on_tables_not_yet_upgraded_still_moves_rows_aside(
        old_engine: sa.Engine, redis_server: RedisServer) -> None:
    """Between installing this version and running the upgrade: no worse than before, and
    on SQLite no collision."""
    from mipos_worker.sql_outbox import Relay

    engine = old_engine
    first = insert_row(engine, arguments="[" * 5000)
    drain(engine)
    if engine.dialect.name == "sqlite":  # the old SQLite table reuses ids by itself
        second = insert_row(engine, arguments="{not json")
        assert Relay(engine).run_once().moved_aside == 1
        assert [d.task_id for d in rows(engine, OLD_DEAD)] == [first, second]
    else:
        assert [d.task_id for d in rows(engine, OLD_DEAD)] == [first]


DJANGO_MIGRATE = """
    import os, sys
    import django
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.django_settings"
    django.setup()
    from django.core.management import call_command
    call_command("migrate", "mipos_outbox", *sys.argv[1:], verbosity=0)
    call_command("makemigrations", "mipos_outbox", check=True, dry_run=True, verbosity=0)  # models = migrations
"""


def django_migrate(database: str, *target: str) -> None:
    import os

    from tests.outbox_processes import run_script

    env = {k: v for k, v in os.environ.items() if not k.startswith("MIPOS_")}
    done = run_script({**env, "MIPOS_TEST_DJANGO_DB": database}, DJANGO_MIGRATE, *target)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_django_tables_of_an_earlier_version_are_migrated_and_keep_their_rows(
        kind: str, tmp_path: Path, tasks: ModuleType, redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    from mipos_worker.sql_outbox import Relay, dead_table

    if kind == "sqlite":
        database = str(tmp_path / "pos.sqlite3")
        url = f"sqlite:///{database}"
    else:
        url = request.getfixturevalue("pg_server").create_database(f"dj_{uuid.uuid4().hex[:10]}")
        database = url.replace("postgresql+psycopg://", "postgresql://")
    django_migrate(database, "0001")  # the tables as the first version made them
    engine = sa.create_engine(url)
    try:
        moved_before = insert_row(engine, arguments="[" * 5000)
        assert Relay(engine).run_once().moved_aside == 1

        django_migrate(database)

        [old_dead] = rows(engine, dead_table)
        assert old_dead.task_id == moved_before
        with engine.begin() as conn:  # the outbox's ids start again (a restored dump, a reset)
            if kind == "sqlite":
                conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = 'mipos_outbox'")
            else:
                conn.exec_driver_sql("ALTER TABLE mipos_outbox ALTER COLUMN id RESTART WITH 1")
        again = insert_row(engine, arguments="{not json")
        assert Relay(engine).run_once().moved_aside == 1
        dead = rows(engine, dead_table)
        assert [d.task_id for d in dead] == [moved_before, again]
        assert dead[0].outbox_id == dead[1].outbox_id and dead[0].id != dead[1].id
    finally:
        engine.dispose()


# -- item 7: MySQL/MariaDB's clock whatever the server's time zone ---------------------------

# 2024-10-27 in Europe/Paris: at 03:00 CEST the clocks go back to 02:00 CET, so every local
# time from 02:00 to 03:00 happens twice. 02:30:00.25 local, the first time and the second:
REPEATED_HOUR = [pytest.param(1729989000.25, id="02:30-CEST"), pytest.param(1729992600.25, id="02:30-CET")]


@pytest.mark.parametrize("at", REPEATED_HOUR)
def test_mysql_clock_is_right_in_the_autumns_repeated_hour(
        maria_server: mariadb.MariaDBServer | None, tasks: ModuleType, at: float) -> None:
    from types import SimpleNamespace

    from mipos_worker import sql_outbox
    from mipos_worker.django_outbox.clock import DatabaseNow
    from mipos_worker.sql_outbox.schema import db_now

    if maria_server is None:
        pytest.skip("MariaDB is not installed (optional: apt-get install mariadb-server)")
    engine = sa.create_engine(maria_server.create_database(f"tz_{uuid.uuid4().hex[:10]}"))
    sql_outbox.create_tables(engine)
    django_now, _ = DatabaseNow().as_sql(None, SimpleNamespace(vendor="mysql"))
    try:
        with engine.begin() as conn:
            zone = conn.exec_driver_sql("SELECT @@time_zone, @@system_time_zone").one()
            assert zone[0] == "SYSTEM" and zone[1] in ("CET", "CEST")  # the server runs in Paris
            conn.exec_driver_sql(f"SET timestamp = {at}")  # the session's clock: that instant
            task_id = sql_outbox.accept(conn, delivery_id=1, store_id="3", order_external_id="tz")
            created_at = conn.execute(sa.select(sql_outbox.outbox_table.c.created_at)
                                      .where(sql_outbox.outbox_table.c.task_id == task_id)).scalar_one()
            relay_now = conn.execute(sa.select(db_now(engine.dialect))).scalar_one()
            django = conn.exec_driver_sql(f"SELECT {django_now}").scalar_one()
        assert created_at == pytest.approx(at, abs=1e-3)
        assert relay_now == pytest.approx(at, abs=1e-3)
        assert django == pytest.approx(at, abs=1e-3)
    finally:
        engine.dispose()


def test_the_django_app_and_the_relay_read_the_same_clock() -> None:
    from mipos_worker.django_outbox.clock import MYSQL_NOW as DJANGO
    from mipos_worker.sql_outbox.schema import MYSQL_NOW as RELAY

    assert DJANGO == RELAY
