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
    pytest.param({"arguments": "[" * 5000}, "RecursionError", id="nested-too-deep"),
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
